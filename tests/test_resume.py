"""Interrupted fits: the work folder keeps the written-ahead spend and the last saved state;
`privsynth fit --resume RUN` finishes the run without spending again, and its certificate equals
an uninterrupted fit's. Includes a real kill -9 of a fitting process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_folder
from privsynth import run
from privsynth.checkpoint import WorkState
from privsynth.cli import app
from privsynth.generators import convgen

runner = CliRunner()
TINY = ["--set", "dpmepf.batch_per_class=2", "--set", "dpmepf.width=8", "--set", "dpmepf.latent_dim=8",
        "--set", "data.resolution=16", "--set", "features.input_size=32"]


def _fit_args(private: Path, out: Path, ledger: Path, steps: int, every: float) -> list[str]:
    return ["fit", str(private), "--method", "dp-mepf", "--epsilon", "4", "--delta", "1e-5",
            "--out", str(out), "--ledger", str(ledger), "--dataset", "toy", *TINY,
            "--set", f"dpmepf.steps={steps}", "--set", f"run.checkpoint_every={every}"]


def _comparable(cert: dict) -> dict:
    return {k: v for k, v in cert.items() if k != "created"}


def _ledger(ledger: Path) -> dict:
    return json.loads(next(ledger.glob("*.json")).read_text())


def test_interrupted_fit_resumes_without_spending_again(tmp_path: Path, monkeypatch) -> None:
    private = make_folder(tmp_path / "p", per_class=4)
    whole = runner.invoke(app, _fit_args(private, tmp_path / "whole", tmp_path / "l1", 12, 0))
    assert whole.exit_code == 0, whole.output

    calls = {"n": 0}
    forward = convgen.ConvGenerator.forward

    def dies_at_the_sixth_step(self, z, labels):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return forward(self, z, labels)

    monkeypatch.setattr(convgen.ConvGenerator, "forward", dies_at_the_sixth_step)
    out, ledger = tmp_path / "run", tmp_path / "l2"
    cut = runner.invoke(app, _fit_args(private, out, ledger, 12, 0))
    assert cut.exit_code == 130
    assert "privsynth resume" in cut.output
    work = run.work_folder(out)
    assert not out.exists() and (work / run.FIT_STATE).is_file()
    assert [e["status"] for e in _ledger(ledger)["entries"]] == ["failed"]

    refused = runner.invoke(app, _fit_args(private, out, ledger, 12, 0))
    assert refused.exit_code == 2 and "privsynth resume" in refused.output

    monkeypatch.setattr(convgen.ConvGenerator, "forward", forward)
    resumed = runner.invoke(app, ["fit", "--resume", str(out), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert not work.exists() and (out / "model").is_dir()
    first = json.loads((tmp_path / "whole" / "certificate.json").read_text())
    again = json.loads((out / "certificate.json").read_text())
    assert _comparable(again) == _comparable(first)
    entries = _ledger(ledger)["entries"]
    assert len(entries) == 1 and entries[0]["status"] == "completed"  # spent once, not twice

    nothing = runner.invoke(app, ["fit", "--resume", str(tmp_path / "never")])
    assert nothing.exit_code == 2 and "nothing to resume" in nothing.output
    mixed = runner.invoke(app, ["fit", "--resume", str(out), "--epsilon", "3"])
    assert mixed.exit_code == 2 and "--epsilon" in mixed.output


@pytest.mark.slow  # a real SIGKILL of a separate process; in-process: the test above
def test_kill_9_during_training_then_resume(tmp_path: Path) -> None:
    private = make_folder(tmp_path / "p", per_class=4)
    out, ledger = tmp_path / "run", tmp_path / "ledger"
    env = dict(os.environ, NO_COLOR="1")
    cmd = [sys.executable, "-m", "privsynth", *_fit_args(private, out, ledger, 30, 0)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    generator_state = run.work_folder(out) / "generator.state.pt"
    try:
        deadline = time.monotonic() + 240
        while not generator_state.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert generator_state.exists(), "the fit saved no training state before the deadline"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    entries = _ledger(ledger)["entries"]
    assert len(entries) == 1 and entries[0]["status"] == "charged"  # a kill leaves it pending
    done = subprocess.run([sys.executable, "-m", "privsynth", "fit", "--resume", str(out),
                           "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["epsilon"]["spent"] <= 4.0
    entries = _ledger(ledger)["entries"]
    assert len(entries) == 1 and entries[0]["status"] == "completed"
    assert [c["name"] for c in cert["mechanisms"]] == [c["name"] for c in entries[0]["charges"]]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    try:
        while not ready() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _charged(out: Path) -> bool:
    try:
        doc = json.loads((run.work_folder(out) / run.FIT_STATE).read_text())
    except (OSError, ValueError):
        return False
    return bool(doc["charges"])


@pytest.mark.slow  # 4 x (a fit, a killed fit in a subprocess, a resume in another)
@pytest.mark.parametrize("point", ["charged", "released", "training", "random"])
def test_kill_9_at_any_point_never_under_counts(point: str, tmp_path: Path) -> None:
    """Kill the fitting process at one of several points (or at a random moment); whatever stage
    it reached, the ledger holds the spend at most once per fit and never less, and the resumed
    (or, if nothing was charged, repeated) fit certifies exactly what an uninterrupted fit does."""
    private = make_folder(tmp_path / "p", per_class=4)
    reference = runner.invoke(app, _fit_args(private, tmp_path / "ref", tmp_path / "l0", 30, 0))
    assert reference.exit_code == 0, reference.output
    out, ledger = tmp_path / "run", tmp_path / "ledger"
    work = run.work_folder(out)
    triggers = {"charged": lambda: _charged(out),
                "released": lambda: (work / "releases.state.pt").exists(),
                "training": lambda: (work / "generator.state.pt").exists()}
    delay = time.monotonic() + __import__("random").Random().uniform(0.0, 6.0)
    ready = triggers.get(point, lambda: time.monotonic() >= delay)
    env = dict(os.environ, NO_COLOR="1")
    cmd = [sys.executable, "-m", "privsynth", *_fit_args(private, out, ledger, 30, 0)]
    _kill_when(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL), ready)
    entries = _ledger(ledger)["entries"] if any(ledger.glob("*.json")) else []
    stage = ("complete" if out.exists() else "nothing charged" if not _charged(out) else
             "training state saved" if (work / "generator.state.pt").exists() else
             "releases saved" if (work / "releases.state.pt").exists() else "charged, no release saved")
    print(f"kill at {point}: reached '{stage}', ledger entries {len(entries)}")
    if out.exists():  # the kill came after the rename: the run is complete
        assert len(entries) == 1
        cert = json.loads((out / "certificate.json").read_text())
    elif _charged(out):
        assert len(entries) == 1 and entries[0]["status"] == "charged"
        done = subprocess.run([sys.executable, "-m", "privsynth", "fit", "--resume", str(out)],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        cert = json.loads((out / "certificate.json").read_text())
    else:  # killed before anything was written ahead of the first charge
        assert len(entries) <= 1  # a charge recorded in the ledger but not yet in the work folder
        again = runner.invoke(app, _fit_args(private, out, ledger, 30, 0))
        assert again.exit_code == 0, again.output
        cert = json.loads((out / "certificate.json").read_text())
    entries = _ledger(ledger)["entries"]
    assert entries[-1]["status"] == "completed" and len(entries) in (1, 2)
    expected = json.loads((tmp_path / "ref" / "certificate.json").read_text())
    assert _comparable(cert) == _comparable(expected)


# ---------------------------------------------------------------------------------------------
# privimage: the histogram is released once, DP-SGD continues with the steps left (T in all)

PRIVIMAGE_TINY = ["--set", "privimage.draft=none", "--set", "privimage.strength=1.0",
                  "--set", "privacy.accountant=rdp", "--set", "privimage.width=8",
                  "--set", "data.resolution=8", "--set", "privimage.pretrain_steps=3",
                  "--set", "privimage.pretrain_batch=8", "--set", "privimage.dp_batch=4",
                  "--set", "privimage.physical_batch=4", "--set", "privimage.query_epochs=1",
                  "--set", "privimage.sample_steps=2"]
DEMO = Path(__file__).resolve().parents[1] / "assets" / "demo"
T = 12  # DP-SGD steps charged in these fits


@pytest.fixture(scope="module")
def demo_slice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A few of the embedded demo images: 2 private digit classes, 4 public classes."""
    import shutil

    root = tmp_path_factory.mktemp("demo")
    for side, classes, n in (("private", ("0", "1"), 6), ("public", None, 5)):
        folders = sorted(p for p in (DEMO / side).iterdir() if p.is_dir())
        for folder in [f for f in folders if classes is None or f.name in classes][:4]:
            (root / side / folder.name).mkdir(parents=True)
            for f in sorted(p for p in folder.iterdir() if p.is_file())[:n]:
                shutil.copy(f, root / side / folder.name / f.name)
    return root / "private", root / "public"


def _privimage_args(demo: tuple[Path, Path], out: Path, ledger: Path, steps: int,
                    every: float) -> list[str]:
    private, public = demo
    return ["fit", str(private), "--public", str(public), "--method", "privimage", "--epsilon", "4",
            "--delta", "1e-5", "--out", str(out), "--ledger", str(ledger), "--dataset", "toy",
            *PRIVIMAGE_TINY, "--set", f"privimage.dp_steps={steps}",
            "--set", f"run.checkpoint_every={every}"]


@pytest.fixture(scope="module")
def privimage_reference(demo_slice, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The certificate of an uninterrupted privimage fit (T DP-SGD steps)."""
    tmp = tmp_path_factory.mktemp("ref")
    res = runner.invoke(app, _privimage_args(demo_slice, tmp / "run", tmp / "ledger", T, 0))
    assert res.exit_code == 0, res.output
    return json.loads((tmp / "run" / "certificate.json").read_text())


def test_privimage_resumes_with_the_steps_left_and_never_releases_twice(
        demo_slice, privimage_reference, tmp_path: Path, monkeypatch) -> None:
    from privsynth.privacy import mechanisms
    from privsynth.privacy.dpsgd import DPSGD

    steps, released = [], []
    noisy, release = DPSGD.noisy_gradient, mechanisms.GaussianSum.release

    def dies_at_the_third_step(self, summed):
        if len(steps) == 2:
            raise KeyboardInterrupt
        steps.append(self.charge.steps)
        return noisy(self, summed)

    def counted_release(self):
        released.append(self.charge.name)
        return release(self)

    monkeypatch.setattr(DPSGD, "noisy_gradient", dies_at_the_third_step)
    monkeypatch.setattr(mechanisms.GaussianSum, "release", counted_release)
    out, ledger = tmp_path / "run", tmp_path / "ledger"
    cut = runner.invoke(app, _privimage_args(demo_slice, out, ledger, T, 0))
    assert cut.exit_code == 130 and "privsynth resume" in cut.output
    work = run.work_folder(out)
    saved = WorkState(work)
    assert released == ["privimage.query"] and saved.load("dpsgd")["steps_done"] == 2
    assert saved.load("pretrain")["step"] == 3
    query = saved.load("query")
    assert [e["status"] for e in _ledger(ledger)["entries"]] == ["failed"]

    extra = demo_slice[0] / "0" / "extra.png"  # the data changed: its charges no longer fit it
    extra.write_bytes((next((demo_slice[0] / "0").glob("*.png"))).read_bytes())
    changed = runner.invoke(app, ["fit", "--resume", str(out)])
    extra.unlink()
    assert changed.exit_code == 3 and "changed since the fit began" in changed.output

    monkeypatch.setattr(DPSGD, "noisy_gradient", lambda self, summed: (
        steps.append(self.charge.steps), noisy(self, summed))[1])
    resumed = runner.invoke(app, ["fit", "--resume", str(out), "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert len(steps) == T == steps[0]  # 2 before the cut + the T - 2 left: exactly as charged
    assert released == ["privimage.query"]  # the histogram was not released again
    model = json.loads((out / "model" / "config.json").read_text())
    hist = query["histogram"]
    assert list(model["selection"].values()) == [
        [sorted(p.name for p in demo_slice[1].iterdir())[j] for j in js] for js in query["selection"]]
    weights = (hist.sum(1)).clamp(min=1.0)
    assert model["class_weights"] == pytest.approx((weights / weights.sum()).tolist())
    assert _comparable(json.loads((out / "certificate.json").read_text())) == \
        _comparable(privimage_reference)
    entries = _ledger(ledger)["entries"]
    assert len(entries) == 1 and entries[0]["status"] == "completed"  # charged once
    assert not work.exists()


@pytest.mark.slow  # a real SIGKILL mid DP-SGD; in-process: the test above
def test_privimage_kill_9_during_dpsgd_then_resume(demo_slice, privimage_reference,
                                                    tmp_path: Path) -> None:
    out, ledger = tmp_path / "run", tmp_path / "ledger"
    env = dict(os.environ, NO_COLOR="1")
    cmd = [sys.executable, "-m", "privsynth", *_privimage_args(demo_slice, out, ledger, T, 0)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: (run.work_folder(out) / "dpsgd.state.pt").exists())
    assert not out.exists(), "the fit finished before the kill"
    assert 1 <= WorkState(run.work_folder(out)).load("dpsgd")["steps_done"] < T
    entries = _ledger(ledger)["entries"]
    assert len(entries) == 1 and entries[0]["status"] == "charged"
    done = subprocess.run([sys.executable, "-m", "privsynth", "fit", "--resume", str(out), "--json"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cert = json.loads((out / "certificate.json").read_text())
    assert _comparable(cert) == _comparable(privimage_reference)
    entries = _ledger(ledger)["entries"]
    assert len(entries) == 1 and entries[0]["status"] == "completed"


def test_a_resumed_dpsgd_draws_only_the_steps_left_and_never_more() -> None:
    """T noisy steps in all, however the fit was cut: a resumed mechanism draws T - done batches
    and refuses a step past T; a count of steps done outside 0..T is refused outright."""
    import torch

    from privsynth.errors import BudgetError
    from privsynth.privacy import Budget, Charge, NoiseSource
    from privsynth.privacy.dpsgd import DPSGD

    charge = Charge("privimage.dpsgd", 1.0, 0.5, 5, 1.0, "test")
    budget = Budget(epsilon=1e6, delta=1e-5, accountant="rdp", charges=[charge] * 4)
    for done in (0, 2, 5):
        mech = DPSGD(budget, charge, expected_batch=2.0, noise=NoiseSource(), steps_done=done)
        for _ in mech.batches(10):
            mech.noisy_gradient([torch.zeros(3)])
        assert mech.steps_done == 5
        with pytest.raises(BudgetError, match="spent"):
            mech.noisy_gradient([torch.zeros(3)])
    with pytest.raises(BudgetError, match="outside"):
        DPSGD(budget, charge, expected_batch=2.0, noise=NoiseSource(), steps_done=6)


def test_a_dpsgd_stopped_by_the_private_data_is_not_resumed(tmp_path: Path) -> None:
    """A non-finite gradient depends on the private data: retrying would pick batches that avoid
    it. The failing step marks the work folder, and a resumed fine-tuning refuses to start."""
    import torch

    from privsynth.errors import BudgetError
    from privsynth.generators.privimage import finetune

    state = WorkState(tmp_path)
    with pytest.raises(BudgetError, match="non-finite"):
        finetune._clipped([torch.tensor([[float("nan"), 1.0]])], 1.0, torch.tensor([0]), state)
    assert "non-finite" in state.load_json(finetune.STOPPED)["reason"]
    with pytest.raises(BudgetError, match="fit again"):
        finetune.finetune(None, None, None, None, None, state=state)  # refused before any use


def test_interrupted_pretraining_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Public pretraining is checkpointed too; resumed, it ends where an uninterrupted one does."""
    import torch

    from privsynth.data import ImageSet
    from privsynth.generators import privimage
    from privsynth.generators.privimage import pretrain, unet

    shape = unet.UNetConfig(classes=2, channels=1, resolution=8, widths=(8, 16),
                            attention=(False, True), groups=4)
    gen = torch.Generator().manual_seed(0)
    public = ImageSet(torch.randint(0, 256, (20, 1, 8, 8), generator=gen, dtype=torch.uint8),
                      torch.arange(20) % 4, ("a", "b", "c", "d"))
    cfg = privimage.Config(pretrain_steps=12, pretrain_batch=4, draft="none", strength=1.0)
    whole = pretrain.pretrain(shape, lambda: public, [[0], [2]], cfg)

    def stop_at_ten(what, done, total):
        if done == 10:
            raise KeyboardInterrupt

    state = WorkState(tmp_path, every=0)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(shape, lambda: public, [[0], [2]], cfg, progress=stop_at_ten, state=state)
    assert state.load(pretrain.STATE)["step"] == 9  # saved before the step that was cut
    resumed = pretrain.pretrain(shape, lambda: public, [[0], [2]], cfg, state=state)
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert state.load(pretrain.STATE)["step"] == 12
    done = pretrain.pretrain(shape, lambda: pytest.fail("reads no public image"), [[0], [2]], cfg,
                             state=state)
    for a, b in zip(whole.state_dict().values(), done.state_dict().values()):
        torch.testing.assert_close(a, b)
