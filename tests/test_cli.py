"""The CLI end to end: fit -> sample -> verify -> evaluate on a tiny folder, exit codes, help."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privsynth import cli, run
from privsynth.cli import app
from privsynth.privacy import ledger as ledgers

runner = CliRunner()
COMMANDS = ["fit", "resume", "sample", "evaluate", "budget", "inspect", "verify", "audit"]
TINY = ["--set", "dpmepf.steps=3", "--set", "dpmepf.batch_per_class=2", "--set", "dpmepf.width=16",
        "--set", "data.resolution=16", "--set", "features.input_size=32",
        # the Config class values these tests were written for, not the defaults (test_defaults)
        "--set", "features.grid=1", "--set", "dpmepf.split_bits=0", "--set", "dpmepf.lr=0.001",
        "--set", "dpmepf.judge=false", "--set", "dpmepf.scatter_judge=false",
        "--set", "dpmepf.split_noise=0", "--set", "dpmepf.unbiased=false"]


def _fit(private: Path, out: Path, *extra: str, epsilon: str = "5"):
    return runner.invoke(app, ["fit", str(private), "--method", "dp-mepf", "--epsilon", epsilon,
                               "--out", str(out), *TINY, *extra])


def _keys_named(obj: object, names: set[str]) -> list[str]:
    """Every key in a JSON tree whose name is in `names`."""
    if isinstance(obj, dict):
        return [k for k in obj if k in names] + [x for v in obj.values() for x in _keys_named(v, names)]
    if isinstance(obj, list):
        return [x for v in obj for x in _keys_named(v, names)]
    return []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_folder

    root = tmp_path_factory.mktemp("cli")
    private = make_folder(root / "private")
    result = _fit(private, root / "run", "--public", str(private), "--json")
    assert result.exit_code == 0, result.output
    return root


def test_fit_writes_a_complete_run(fitted: Path) -> None:
    run = fitted / "run"
    assert sorted(p.name for p in run.iterdir()) == ["CERTIFICATE.md", "MANIFEST.sha256",
                                                     "certificate.json", "model", "owner",
                                                     "recipe.json"]
    assert [p.name for p in (run / "owner").iterdir()] == ["rejects.jsonl"]  # owner-only, apart
    assert (run / "owner" / "rejects.jsonl").read_text() == ""  # a clean folder: nothing rejected
    listed = [line.split("  ", 1)[1] for line in (run / "MANIFEST.sha256").read_text().splitlines()]
    assert listed == ["CERTIFICATE.md", "certificate.json", "model/config.json",
                      "model/generator.safetensors", "recipe.json"]  # the publishable files
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json",
                                                                 "generator.safetensors"]
    cert = json.loads((run / "certificate.json").read_text())
    assert 5 * (1 - 2e-3) <= cert["epsilon"]["spent"] <= 5.0
    assert [m["name"] for m in cert["mechanisms"]] == ["dpmepf.phi1", "dpmepf.phi2", "dpmepf.counts"]
    n = 24  # files in the private folder: delta defaults to 1 / (N ln N)
    import math
    assert cert["delta"] == pytest.approx(1 / (n * math.log(n)))
    assert not _keys_named(cert, {"seed", "noise_seed", "entropy"})
    assert cert["implementation"]["noise_rng"]["seed_recorded"] is False
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["dpmepf"]["steps"] == 3 and recipe["data"]["channels"] == "1"
    assert not list(fitted.glob(".run.partial-*"))


def test_a_split_fit_certifies_the_centre_and_samples_by_class(fitted: Path, tmp_path: Path) -> None:
    run, out = tmp_path / "split", tmp_path / "data"
    result = _fit(fitted / "private", run, "--set", "dpmepf.split_bits=1")
    assert result.exit_code == 0, result.output
    # stderr is not a terminal here: plain progress lines, each stage's last one included
    assert re.search(r"^training generator \(loss [^)]*\): 3/3 \[0:\d\d:\d\d\]$", result.stderr,
                     re.M), result.stderr
    cert = json.loads((run / "certificate.json").read_text())
    assert [m["name"] for m in cert["mechanisms"]] == ["dpmepf.centre", "dpmepf.phi1",
                                                      "dpmepf.phi2", "dpmepf.counts"]
    assert 5 * (1 - 2e-3) <= cert["epsilon"]["spent"] <= 5.0
    assert any("cells" in note for note in json.dumps(cert).split("\""))
    assert runner.invoke(app, ["verify", str(run)]).exit_code == 0
    sampled = runner.invoke(app, ["sample", str(run), "--count", "12", "--out", str(out)])
    assert sampled.exit_code == 0, sampled.output
    classes = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert classes == sorted(p.name for p in (fitted / "private").iterdir() if p.is_dir())
    assert sum(len(list((out / c).glob("*.png"))) for c in classes) == 12


@pytest.mark.slow  # 14 CPU s, the default run's costliest; a judged fit's charges, saved judges
# and filtered sampling stay in the default run (test_dpmepf: a judged fit charges the judges)
def test_a_judged_fit_certifies_the_filter_and_samples_through_it(fitted: Path,
                                                                  tmp_path: Path) -> None:
    run, out = tmp_path / "judged", tmp_path / "data"
    result = _fit(fitted / "private", run, "--set", "dpmepf.judge=true", "--set",
                  "dpmepf.judge_epochs=2", "--set", "dpmepf.judge_batch=4", "--set",
                  "dpmepf.scatter_judge=true", "--set", "dpmepf.scatter_epochs=1", "--set",
                  "dpmepf.scatter_batch=4")
    assert result.exit_code == 0, result.output
    cert = json.loads((run / "certificate.json").read_text())
    for name in ("dpmepf.judge", "dpmepf.scatter_judge"):
        judge = next(m for m in cert["mechanisms"] if m["name"] == name)
        assert judge["sample_rate"] < 1 and judge["steps"] >= 1
    assert 5 * (1 - 2e-3) <= cert["epsilon"]["spent"] <= 5.0
    assert runner.invoke(app, ["verify", str(run)]).exit_code == 0
    sampled = runner.invoke(app, ["sample", str(run), "-n", "12", "--out", str(out)])
    assert sampled.exit_code == 0, sampled.output
    assert "label filter" in (out / "README.md").read_text()
    assert len(list(out.rglob("*.png"))) == 12


def test_fit_refuses_to_overwrite(fitted: Path) -> None:
    result = _fit(fitted / "private", fitted / "run")
    assert result.exit_code == 2
    assert "already exists" in result.output


def test_unknown_recipe_key_suggests_the_right_one(fitted: Path, tmp_path: Path) -> None:
    result = _fit(fitted / "private", tmp_path / "r", "--set", "dpmepf.stepz=4")
    assert result.exit_code == 2
    assert "did you mean 'steps'" in result.output
    assert not (tmp_path / "r").exists()


def test_missing_private_folder_is_a_data_error(tmp_path: Path) -> None:
    result = _fit(tmp_path / "nope", tmp_path / "r")
    assert result.exit_code == 3


def test_gdp_accountant_is_refused(fitted: Path, tmp_path: Path) -> None:
    result = _fit(fitted / "private", tmp_path / "r", "--set", "privacy.accountant=gdp")
    assert result.exit_code == 2 and "GDP" in result.output


def test_sample_verify_and_tamper(fitted: Path) -> None:
    out = fitted / "synth"
    result = runner.invoke(app, ["sample", str(fitted / "run"), "-n", "20", "--out", str(out),
                                 "--seed", "1", "--json"])
    assert result.exit_code == 0, result.output
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 20
    assert {p.parent.name for p in pngs} <= {"circle", "square"}
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    assert runner.invoke(app, ["verify", str(fitted / "run")]).exit_code == 0
    again = runner.invoke(app, ["sample", str(fitted / "run"), "-n", "20", "--out", str(out)])
    assert again.exit_code == 2
    data = bytearray(pngs[0].read_bytes())
    data[-20] ^= 0xFF
    pngs[0].write_bytes(bytes(data))
    bad = runner.invoke(app, ["verify", str(out)])
    assert bad.exit_code == 6 and "FAILED" in bad.output


def test_sample_overwrite_replaces_only_a_dataset_folder(fitted: Path, tmp_path: Path) -> None:
    out, other = tmp_path / "synth", tmp_path / "notes"
    run_dir = str(fitted / "run")
    first = runner.invoke(app, ["sample", run_dir, "-n", "6", "--out", str(out), "--seed", "1"])
    assert first.exit_code == 0, first.output
    (out / "stale.txt").write_text("a file the new dataset does not have")
    again = runner.invoke(app, ["sample", run_dir, "-n", "9", "--out", str(out), "--seed", "2",
                                "--overwrite"])
    assert again.exit_code == 0, again.output
    assert len(list(out.rglob("*.png"))) == 9 and not (out / "stale.txt").exists()
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial or old copy
    other.mkdir()
    (other / "keep.txt").write_text("not a dataset")
    refused = runner.invoke(app, ["sample", run_dir, "-n", "3", "--out", str(other), "--overwrite"])
    assert refused.exit_code == 2 and "not a dataset folder" in refused.output
    assert [p.name for p in other.iterdir()] == ["keep.txt"]


def test_verify_run_catches_a_changed_weight_file(fitted: Path, tmp_path: Path) -> None:
    import shutil

    run = Path(shutil.copytree(fitted / "run", tmp_path / "run"))
    ok = runner.invoke(app, ["verify", str(run)])
    assert ok.exit_code == 0 and "manifest matches" in ok.output and "owner-only" in ok.output
    (run / "owner" / "notes.txt").write_text("the owner's own files are not checked")
    assert runner.invoke(app, ["verify", str(run)]).exit_code == 0
    weights = run / "model" / "generator.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(raw))
    bad = runner.invoke(app, ["verify", str(run), "--json"])
    assert bad.exit_code == 6, bad.output
    assert json.loads(bad.stdout)["problems"] == ["changed: model/generator.safetensors"]
    assert "error: 1 problem(s) in" in bad.stderr  # one line on stderr, the exit-code convention
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    (run / "model" / "extra.safetensors").write_bytes(b"x")  # a file a sampler could pick up
    extra = runner.invoke(app, ["verify", str(run), "--json"])
    assert extra.exit_code == 6 and json.loads(extra.stdout)["problems"] == [
        "not in manifest: model/extra.safetensors"]


def test_a_run_from_before_the_manifest_still_verifies_and_samples(fitted: Path, tmp_path: Path) -> None:
    import shutil

    from privsynth import manifest

    run = Path(shutil.copytree(fitted / "run", tmp_path / "run"))
    (run / "MANIFEST.sha256").unlink()  # the old layout: no manifest, rejects.jsonl at the top
    (run / "owner" / "rejects.jsonl").rename(run / "rejects.jsonl")
    (run / "owner").rmdir()
    assert manifest.rejects_path(run) == run / "rejects.jsonl"
    old = runner.invoke(app, ["verify", str(run)])
    assert old.exit_code == 0 and "weights not checked" in old.output, old.output
    done = runner.invoke(app, ["sample", str(run), "-n", "2", "--out", str(tmp_path / "synth")])
    assert done.exit_code == 0, done.output
    assert manifest.rejects_path(fitted / "run") == fitted / "run" / "owner" / "rejects.jsonl"


def test_verify_catches_an_edited_epsilon(fitted: Path, tmp_path: Path) -> None:
    cert = json.loads((fitted / "run" / "certificate.json").read_text())
    cert["mechanisms"][0]["noise_multiplier"] /= 2  # claims less noise than the recorded epsilon
    (tmp_path / "certificate.json").write_text(json.dumps(cert))
    assert runner.invoke(app, ["verify", str(tmp_path / "certificate.json")]).exit_code == 6


def test_same_seed_same_images(fitted: Path) -> None:
    a, b = fitted / "s_a", fitted / "s_b"
    for out in (a, b):
        assert runner.invoke(app, ["sample", str(fitted / "run"), "-n", "6", "--out", str(out),
                                   "--seed", "7"]).exit_code == 0
    assert (a / "MANIFEST.sha256").read_text() == (b / "MANIFEST.sha256").read_text()


def test_evaluate_names_its_feature_space(fitted: Path) -> None:
    from conftest import make_folder

    real = make_folder(fitted / "real", seed=3)
    synth = fitted / "synth_eval"
    assert runner.invoke(app, ["sample", str(fitted / "run"), "-n", "24", "--out",
                               str(synth)]).exit_code == 0
    test = make_folder(fitted / "test", per_class=6, seed=4)
    result = runner.invoke(app, ["evaluate", str(synth), "--real", str(real), "--test", str(test),
                                 "--classifier-epochs", "1", "--k", "2", "--out",
                                 str(fitted / "report"), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads((fitted / "report" / "report.json").read_text())
    assert json.loads(result.stdout) == report
    assert report["feature_space"]["name"] == "efficientnet-lite0"
    run = report["runs"][0]
    assert run["fid"] >= 0 and run["k"] == 2 and run["utility"]["recipe"]["epochs"] == 1
    assert run["privacy"]["epsilon"] > 0 and "memorisation" in run
    assert (fitted / "report" / "report.html").is_file()
    again = runner.invoke(app, ["evaluate", str(synth), "--real", str(real), "--out",
                                str(fitted / "report")])
    assert again.exit_code == 2 and "already exists" in again.output


def _listed_commands(help_text: str) -> list[str]:
    """The names in the Commands section of a group's help (rich panel or click's plain list)."""
    section = help_text.split("Commands", 1)[1]
    return re.findall(r"^(?:│ | {2})([a-z][a-z-]*) {2,}\S", section, re.M)


def test_help_lists_the_commands_with_examples() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert _listed_commands(result.output) == COMMANDS  # names, not substrings ("fits")
    for command in COMMANDS:
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Examples" in sub.output


def test_help_shows_readable_metavars_and_what_is_required() -> None:
    import typer

    group = typer.main.get_command(app)
    for name in COMMANDS:
        text = runner.invoke(app, [name, "--help"], env={"COLUMNS": "200"}).output
        assert not re.search(r"<(str|int|float|bool|path|list\[\w+\])>", text, re.I), (name, text)
    fit_help = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "200"}).output
    assert "KEY=VALUE" in fit_help and "[dp-mepf|privimage]" in fit_help
    assert "privsynth resume RUN" in fit_help  # --resume points to the new command
    fit = group.get_command(None, "fit")
    required = {p.name for p in fit.params if p.required}
    assert required == {"private", "out"}
    sample = group.get_command(None, "sample")
    count = next(p for p in sample.params if p.name == "n")
    assert "--count" in count.opts and "-n" in count.opts and count.required
    assert {"device", "overwrite"} <= {p.name for p in group.get_command(None, "evaluate").params}


@pytest.mark.parametrize("args", [["fit", "x", "--out", "y", "--epsilonn", "1"], ["fitt"],
                                  ["--bogus"], ["sample", "r"],
                                  ["sample", "r", "-n", "x", "-o", "y"],
                                  ["fit", "x", "--out", "y", "--method", "dpmepf"]])
def test_usage_errors_are_one_line_on_stderr(args: list[str]) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "╭" not in result.stderr, lines


def test_method_is_a_choice_with_a_suggestion(tmp_path: Path) -> None:
    result = runner.invoke(app, ["fit", str(tmp_path), "--out", str(tmp_path / "r"),
                                 "--epsilon", "1", "--method", "dpmepf"])
    assert result.exit_code == 2
    assert "did you mean 'dp-mepf'?" in result.stderr
    assert "dp-mepf, privimage" in result.stderr


def test_a_refused_fit_writes_nothing_into_the_private_folder(tmp_path: Path) -> None:
    from conftest import make_folder

    private = make_folder(tmp_path / "private", per_class=2)
    before = sorted(p.name for p in private.rglob("*"))
    book = tmp_path / "ledger"
    base = ["fit", str(private), "--method", "dp-mepf", "--out", str(tmp_path / "r"),
            "--ledger", str(book)]
    missing = runner.invoke(app, base)
    assert missing.exit_code == 2
    assert missing.stderr.strip() == ("error: --epsilon is required (or set privacy.epsilon in "
                                      "the recipe)")
    zero = runner.invoke(app, [*base, "--set", "privacy.epsilon=0"])
    assert zero.exit_code == 2 and "privacy.epsilon must be > 0" in zero.stderr
    negative = runner.invoke(app, [*base, "--epsilon", "-1"])
    assert negative.exit_code == 2 and "--epsilon must be > 0" in negative.stderr
    assert sorted(p.name for p in private.rglob("*")) == before  # no .privsynth-dataset
    assert not (private / ledgers.ID_FILE).exists()
    assert not (tmp_path / "r").exists() and not book.exists()


def test_resume_is_a_command_and_fit_resume_its_alias(tmp_path: Path) -> None:
    never = tmp_path / "never"
    for args in (["resume", str(never)], ["fit", "--resume", str(never)],
                 ["fit", "--resume", str(never), "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "nothing to resume" in result.stderr, (args, result.output)
    mixed = runner.invoke(app, ["fit", str(tmp_path), "--resume", str(never), "--epsilon", "3",
                                "--set", "a=b"])
    assert mixed.exit_code == 2
    assert "drop PRIVATE, --epsilon, --set" in mixed.stderr
    shown = runner.invoke(app, ["fit", "--resume", str(never), "--help"])
    assert shown.exit_code == 0 and "privsynth fit" in shown.output  # fit's help, not a resume


def test_progress_lines_without_a_terminal_are_rate_limited(monkeypatch) -> None:
    from rich.console import Console

    buffer = io.StringIO()
    monkeypatch.setattr(cli, "err", Console(file=buffer, no_color=True, soft_wrap=True))
    now = [100.0]
    bars = cli._Bars(False, lines=True, every=5.0, clock=lambda: now[0])
    for step in range(1, 101):  # 100 steps, one every 0.2 s: 20 s of training
        now[0] += 0.2
        bars(f"training generator (loss {1 / step:.3g})", step, 100)
        bars("reading (pass 1)", min(step, 10), 10)
    lines = buffer.getvalue().splitlines()
    training = [line for line in lines if line.startswith("training generator")]
    assert training[0] == "training generator (loss 1): 1/100 [0:00:00]"
    assert training[-1] == "training generator (loss 0.01): 100/100 [0:00:19]"
    assert 4 <= len(training) <= 6  # one line per 5 s, and the last
    reading = [line for line in lines if line.startswith("reading")]
    assert reading == ["reading (pass 1): 1/10 [0:00:00]", "reading (pass 1): 10/10 [0:00:01]"]


def test_no_progress_lines_on_a_terminal(monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bars = cli._progress(json_out=False)
    assert not bars.lines and not bars.progress.disable


def test_sigterm_in_process_exits_143_with_the_resume_hint(tmp_path: Path, monkeypatch) -> None:
    """SIGTERM during training (sent to this process): the handler stops the fit as on Ctrl-C,
    exit 143 with the resume hint; `resume` then finishes without spending again. The same with
    a real `kill` of a separate process is the slow test below."""
    from conftest import make_folder
    from privsynth.generators import dpmepf

    private = make_folder(tmp_path / "p", per_class=4)
    out, book = tmp_path / "run", tmp_path / "ledger"
    train = dpmepf.Generator.train

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises at the next bytecode, long before this ends
        raise AssertionError("SIGTERM did not stop the fit")

    monkeypatch.setattr(dpmepf.Generator, "train", terminated)
    before = signal.getsignal(signal.SIGTERM)
    cut = runner.invoke(app, ["fit", str(private), "--method", "dp-mepf", "--epsilon", "3",
                              "--out", str(out), "--ledger", str(book), *TINY])
    assert signal.getsignal(signal.SIGTERM) == before  # the fit's handler is gone again
    assert cut.exit_code == 143, cut.output
    assert f"privsynth resume {out}" in cut.stderr and "terminated" in cut.stderr
    assert not out.exists() and (run.work_folder(out) / run.FIT_STATE).is_file()
    monkeypatch.setattr(dpmepf.Generator, "train", train)
    done = runner.invoke(app, ["resume", str(out), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["epsilon"] <= 3.0 and (out / "model").is_dir()
    (entry,) = json.loads(next(book.glob("*.json")).read_text())["entries"]  # spent once
    assert entry["status"] == "completed"


@pytest.mark.slow
def test_sigterm_says_how_to_resume_and_resume_finishes(tmp_path: Path) -> None:
    """`kill PID` (SIGTERM) of a separate fitting process: the fit stops as on Ctrl-C, says how
    to resume, and `privsynth resume RUN` finishes it without spending again."""
    from conftest import make_folder

    private = make_folder(tmp_path / "p", per_class=4)
    out, book, marker = tmp_path / "run", tmp_path / "ledger", tmp_path / "training"
    args = ["fit", str(private), "--method", "dp-mepf", "--epsilon", "3", "--out", str(out),
            "--ledger", str(book), *TINY]
    code = ("import pathlib, sys, time\n"
            "from privsynth import cli\n"
            "from privsynth.generators import dpmepf\n"
            "def train(*a, **k):\n"
            f"    pathlib.Path({str(marker)!r}).touch()\n"
            "    time.sleep(600)\n"
            "dpmepf.Generator.train = train\n"
            f"sys.argv = ['privsynth', *{args!r}]\n"
            "cli.main()\n")
    env = dict(os.environ, NO_COLOR="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert marker.exists(), proc.communicate(timeout=30)[1]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr
    assert f"privsynth resume {out}" in stderr and "terminated" in stderr
    assert not out.exists() and (run.work_folder(out) / run.FIT_STATE).is_file()
    done = subprocess.run([sys.executable, "-m", "privsynth", "resume", str(out), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["epsilon"] <= 3.0 and (out / "model").is_dir()
    (entry,) = json.loads(next(book.glob("*.json")).read_text())["entries"]  # spent once
    assert entry["status"] == "completed"


@pytest.mark.slow
def test_subprocess_end_to_end(tmp_path: Path) -> None:
    """The installed entry point, as a shell pipeline would call it: JSON on stdout, codes.
    (`python -m privsynth` itself runs in the default tests below; the fit in-process above.)"""
    from conftest import make_folder

    private = make_folder(tmp_path / "p", per_class=6)
    env = dict(os.environ, NO_COLOR="1")
    cmd = [sys.executable, "-m", "privsynth", "fit", str(private), "--method", "dp-mepf",
           "--epsilon", "3", "--out", str(tmp_path / "run"), "--json", *TINY]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["epsilon"] <= 3.0 and Path(summary["run"]).is_dir()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2 and "already exists" in again.stderr and again.stdout == ""


def _inspect_cmd(folder: Path) -> list[str]:
    return [sys.executable, "-m", "privsynth", "inspect", str(folder), "--json"]


def test_closed_stdout_exits_quietly(tmp_path: Path) -> None:
    """`privsynth inspect X --json | head -c1`: the reader is gone before we write."""
    from conftest import make_folder

    private = make_folder(tmp_path / "p", per_class=2)
    read_end, write_end = os.pipe()
    os.close(read_end)
    done = subprocess.run(_inspect_cmd(private), stdout=write_end, stderr=subprocess.PIPE,
                          timeout=120)
    os.close(write_end)
    assert done.returncode == 141 and done.stderr == b""


def test_no_ansi_codes_without_a_tty_or_with_no_color(tmp_path: Path) -> None:
    import pty

    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR")}
    piped = subprocess.run(_inspect_cmd(tmp_path / "nope"), capture_output=True, env=env,
                           timeout=120)
    assert piped.returncode == 3 and b"error:" in piped.stderr and b"\x1b" not in piped.stderr
    leader, follower = pty.openpty()  # stderr is a terminal here: only NO_COLOR keeps it plain
    for extra, coloured in (({"NO_COLOR": "1"}, False), ({"TERM": "xterm-256color"}, True)):
        done = subprocess.run(_inspect_cmd(tmp_path / "nope"), stdout=subprocess.PIPE,
                              stderr=follower, env=dict(env, **extra), timeout=120)
        got = os.read(leader, 4096)
        assert done.returncode == 3 and b"error:" in got and (b"\x1b[" in got) == coloured
    os.close(leader)
    os.close(follower)


def test_user_errors_are_one_line_and_bugs_show_no_locals(tmp_path: Path, monkeypatch) -> None:
    from privsynth import data

    missing = runner.invoke(app, ["inspect", str(tmp_path / "nope")])
    assert missing.exit_code == 3 and len(missing.stderr.strip().splitlines()) == 1

    def boom(_root: object) -> None:
        secret = "private-local-value"  # noqa: F841 - must never be printed
        raise RuntimeError("boom")

    monkeypatch.delenv("PRIVSYNTH_DEBUG", raising=False)
    monkeypatch.setattr(data, "scan", boom)
    bug = runner.invoke(app, ["inspect", str(tmp_path)])
    assert bug.exit_code == 1 and bug.stderr.strip() == "internal error: RuntimeError: boom"

    def interrupt(_root: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "scan", interrupt)
    assert runner.invoke(app, ["inspect", str(tmp_path)]).exit_code == 130


def test_help_documents_the_exit_codes() -> None:
    out = " ".join(runner.invoke(app, ["--help"]).output.split())  # undo rich's line wrapping
    for code in ("0 ok", "1 internal error", "2 usage", "3 data", "4 budget", "5 missing resource",
                 "6 verification failed", "130 interrupted", "141 stdout closed"):
        assert code in out, code


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_fit_on_a_missing_cuda_device_is_a_usage_error_before_any_spend(tmp_path: Path) -> None:
    from conftest import make_folder

    private = make_folder(tmp_path / "private", per_class=4)
    result = CliRunner().invoke(app, ["fit", str(private), "--method", "dp-mepf", "--epsilon", "1",
                                      "--device", "cuda", "--out", str(tmp_path / "run"),
                                      "--ledger", str(tmp_path / "ledger")])
    assert result.exit_code == 2, result.output
    assert "CUDA is not available" in result.output
    assert not (tmp_path / "run").exists() and not any((tmp_path / "ledger").glob("**/*.json*"))
