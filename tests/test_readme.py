"""The README's promises: its quick start runs, every `privsynth ...` command it (or docs/) shows
is accepted by the CLI's parser, it stays short, and its relative links and docs' links resolve.

The quick start is the fenced block right after the QUICK_START marker in README.md. The default
run executes those exact commands on tiny stand-ins for `assets/demo` (and a few `--set`
overrides that make the fit take seconds); the real quick start (minutes on a CPU) runs under the
`slow` marker."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privsynth.cli import app

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
QUICK_START = "<!-- quick-start: tests/test_readme.py runs this block -->"
MAX_README_BYTES = 12_000
# Make the quick start's fit and evaluate take seconds on the tiny folders (the commands stay as
# written; these only add to them).
TINY_FIT = ["--set", "dpmepf.steps=3", "--set", "dpmepf.batch_per_class=2", "--set",
            "dpmepf.width=16", "--set", "data.resolution=16", "--set", "features.input_size=32"]
TINY_COUNT = "12"

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def _fenced_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def _shell_lines(block: str) -> list[str]:
    """A block's commands: backslash continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        line = line.split("  #")[0].strip()  # "cmd   # comment" (a lone "#" starts a comment)
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def quick_start_block(text: str | None = None) -> str:
    """The fenced block right after the quick-start marker."""
    text = README.read_text(encoding="utf-8") if text is None else text
    assert QUICK_START in text, f"README.md lost its quick-start marker {QUICK_START!r}"
    after = text.split(QUICK_START, 1)[1]
    match = FENCE.search(after)
    assert match and after[:match.start()].strip() == "", "the marker must sit right above a block"
    return match.group(1)


def quick_start_commands() -> list[list[str]]:
    commands = [shlex.split(line) for line in _shell_lines(quick_start_block())]
    assert commands and all(argv[0] == "privsynth" for argv in commands), commands
    return commands


# -- every privsynth command shown parses --------------------------------------------------------

def _documented_commands() -> list[tuple[str, str]]:
    """(where, command line) for each `privsynth ...` line in the fenced blocks of README.md and
    docs/*.md (`torchrun ... -m privsynth ...` included), and each inline `privsynth ...` code
    span of README.md. Lines with placeholders for elided flags ('...', '[--x]') are skipped."""
    found = []
    for path in [README, *DOCS]:
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(ROOT).as_posix()
        for block in _fenced_blocks(text):
            for line in _shell_lines(block):
                match = re.search(r"(?:^|-m )(privsynth\s.*)$", line)
                if match:
                    found.append((where, match.group(1)))
        if path == README:
            for span in re.findall(r"`(privsynth [^`]+)`", FENCE.sub("", text)):
                found.append((where, span.replace("\\|", "|").split("|")[0].strip()))
    return [(w, c) for w, c in found if "..." not in c and "[" not in c and "COMMAND" not in c]


def _parse(argv: list[str]) -> None:
    """Parse (never run) `privsynth ARGV` as the CLI would: the subcommand, its options, their
    types and callbacks (e.g. --method's choices). Raises on anything the CLI would refuse."""
    from typer.main import get_command

    root = get_command(app)
    ctx = root.context_class(root, info_name="privsynth")
    if argv and argv[0] in ("--help", "--version"):
        return
    name, cmd, rest = root.resolve_command(ctx, list(argv))
    assert cmd is not None, f"no command {argv[0]!r}"
    if "--help" in rest or not rest:  # `privsynth resume` named in prose: the command exists
        return
    sub = cmd.make_context(name, list(rest), parent=ctx)
    sub.close()


def test_the_readme_and_docs_show_privsynth_commands() -> None:
    commands = _documented_commands()
    assert len(commands) >= 10, commands
    shown = {shlex.split(c)[1] for _, c in commands}
    assert {"fit", "sample", "evaluate", "verify", "budget", "resume"} <= shown, shown


@pytest.mark.parametrize(("where", "command"), _documented_commands())
def test_each_documented_command_parses(where: str, command: str) -> None:
    argv = shlex.split(command)[1:]
    try:
        _parse(argv)
    except Exception as exc:  # click's errors carry the message the user would see
        message = exc.format_message() if hasattr(exc, "format_message") else repr(exc)
        pytest.fail(f"{where}: `{command}` is refused by the CLI: {message}")


def test_the_parser_check_catches_a_bad_command() -> None:
    """The check above is not vacuous: a wrong flag, a wrong method and a missing option fail."""
    for argv in (["sample", "runs/demo", "--cnt", "5", "--out", "x"],
                 ["fit", "private", "--method", "dpmepf", "--out", "r"],
                 ["fit", "private", "--epsilon", "1"],
                 ["no-such-command"], ["no-such-command", "x"]):
        with pytest.raises(Exception):
            _parse(argv)


# -- the quick start runs -----------------------------------------------------------------------

def _tiny_demo(root: Path) -> None:
    """`assets/demo` and `recipes/demo-dpmepf.toml` under `root`, with tiny image folders."""
    from conftest import make_folder

    make_folder(root / "assets" / "demo" / "private", per_class=12)
    make_folder(root / "assets" / "demo" / "real-test", per_class=4, seed=1)
    make_folder(root / "assets" / "demo" / "public", per_class=4, classes=("a", "b"), seed=2)
    (root / "recipes").mkdir()
    for recipe in (ROOT / "recipes").glob("demo-*.toml"):
        shutil.copy(recipe, root / "recipes" / recipe.name)


def _tiny(argv: list[str]) -> list[str]:
    """The same command on the tiny demo: a few overrides for fit, fewer samples."""
    argv = list(argv)
    if argv[0] == "fit":
        argv += TINY_FIT
    for flag in ("--count", "-n"):
        if flag in argv:
            argv[argv.index(flag) + 1] = TINY_COUNT
    return argv


def _expected_output() -> str:
    """The README's expected-output block: the first fenced block after the quick start's."""
    text = README.read_text(encoding="utf-8")
    after = text.split(QUICK_START, 1)[1]
    return _fenced_blocks(after)[1]


def _shape(line: str) -> str:
    """A line of output with its numbers and trailing comment dropped (for comparison)."""
    return re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line.split("  #")[0].strip())


@pytest.fixture(scope="module")
def tiny_quick_start(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The quick start's commands, run once in a folder holding the tiny demo: (folder, each
    command's stdout)."""
    root = tmp_path_factory.mktemp("quick-start")
    _tiny_demo(root)
    runner, outputs, here = CliRunner(), [], Path.cwd()
    os.chdir(root)  # the commands' relative paths (assets/demo/..., runs/demo) start here
    try:
        for argv in quick_start_commands():
            result = runner.invoke(app, _tiny(argv[1:]))
            assert result.exit_code == 0, f"{shlex.join(argv)}: {result.output}"
            outputs.append(result.stdout)
    finally:
        os.chdir(here)
    return root, outputs


def _out(name: str) -> Path:
    """The --out of the quick start's `privsynth NAME` command, as written in the README."""
    argv = next(a for a in quick_start_commands() if a[1] == name)
    return Path(argv[argv.index("--out") + 1])


def test_the_quick_start_runs_and_prints_what_the_readme_shows(
        tiny_quick_start: tuple[Path, list[str]]) -> None:
    root, outputs = tiny_quick_start
    run, synth, report = root / _out("fit"), root / _out("sample"), root / _out("evaluate")
    assert (run / "certificate.json").is_file() and (run / "model" / "config.json").is_file()
    assert (synth / "MANIFEST.sha256").is_file() and (synth / "metadata.jsonl").is_file()
    assert len(list(synth.rglob("*.png"))) == int(TINY_COUNT)
    assert (report / "report.json").is_file() and (report / "report.html").is_file()
    expected = [_shape(line) for line in _expected_output().splitlines() if line.strip()]
    printed = [_shape(line) for out in outputs for line in out.splitlines() if line.strip()]
    assert _matches(expected, printed), ("README's expected output no longer matches what the "
                                         f"quick start prints:\n{expected}\n{printed}")


def _matches(expected: list[str], printed: list[str]) -> bool:
    """Whether `printed` is `expected` with any lines in place of each '...' line."""
    chunks, chunk = [], []
    for line in expected:
        if line == "...":
            chunks.append(chunk)
            chunk = []
        else:
            chunk.append(line)
    chunks.append(chunk)
    pattern = "\n(?:.*?\n)?".join(re.escape("\n".join(c)) for c in chunks)
    return re.fullmatch(pattern, "\n".join(printed), re.S) is not None


def test_the_output_check_allows_gaps_only_where_the_readme_says() -> None:
    assert _matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert _matches(["a", "b"], ["a", "b"])
    assert not _matches(["a", "d"], ["a", "b", "d"])
    assert not _matches(["a", "...", "d"], ["a", "b", "c", "d", "e"])
    assert not _matches(["a", "...", "d"], ["b", "d"])
    assert not _matches(["a", "...", "d"], ["a", "bd"])


def test_the_readme_names_what_the_run_and_dataset_folders_hold(
        tiny_quick_start: tuple[Path, list[str]]) -> None:
    """The files the README's 'What you get' tables name for dp-mepf exist after the quick
    start, and the folders hold no pickles."""
    root, _ = tiny_quick_start
    run, synth = root / _out("fit"), root / _out("sample")
    text = README.read_text(encoding="utf-8")
    for name, shown in (("certificate.json", None), ("CERTIFICATE.md", None), ("recipe.json", None),
                        ("MANIFEST.sha256", None), ("owner/rejects.jsonl", None),
                        ("model/config.json", "config.json"),
                        ("model/generator.safetensors", "generator.safetensors")):
        assert (run / name).exists(), name
        assert f"`{shown or name}`" in text, name
    for name in ("metadata.jsonl", "classes.json", "README.md", "certificate.json",
                 "MANIFEST.sha256"):
        assert (synth / name).is_file(), name
        assert f"`{name}`" in text, name
    assert not [p for p in run.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".pickle")]
    rows = [json.loads(line) for line in (synth / "metadata.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"file_name", "label"}
    assert (synth / rows[0]["file_name"]).is_file()


@pytest.mark.slow
def test_the_real_quick_start(tmp_path: Path) -> None:
    """The README's quick start as written, on the real `assets/demo` (minutes on a CPU), with
    the installed `privsynth` on PATH, then the figures the README quotes."""
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", quick_start_block()], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "reports" / "demo" / "report.json").read_text())
    (run,) = report["runs"]
    assert run["label_agreement"]["agreement"] >= 0.8  # the README quotes 0.874 (one run)
    assert "OK: epsilon recomputes to 10" in done.stdout


# -- size and links -----------------------------------------------------------------------------

def test_the_readme_stays_short() -> None:
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, (f"README.md is {size} bytes (limit {MAX_README_BYTES}): "
                                      "move detail to docs/ or benchmarks/")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(h) for h in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def _relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)  # code spans: `[--json]` is not a link
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    return [link for link in links if not re.match(r"[a-z][a-z0-9+.-]*:", link, re.I)]


LINKED = [README, *DOCS, ROOT / "benchmarks" / "README.md", ROOT / "benchmarks" / "HISTORY.md"]


@pytest.mark.parametrize("path", LINKED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    assert path.is_file(), path
    broken = []
    for link in _relative_links(path):
        target, _, anchor = link.partition("#")
        file = (path.parent / target).resolve() if target else path
        if not file.exists():
            broken.append(f"{link} (no {file.relative_to(ROOT) if ROOT in file.parents else file})")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{link} (no heading #{anchor} in {file.name})")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


def test_the_link_check_sees_links() -> None:
    links = _relative_links(README)
    assert "docs/privacy.md" in links and "CHANGELOG.md" in links, links
    assert _slug("`privsynth evaluate`: quality report") == "privsynth-evaluate-quality-report"
    assert _slug("torchrun scaling on 2 CPU cores") == "torchrun-scaling-on-2-cpu-cores"
