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
    assert "privsynth fit --resume" in cut.output
    work = run.work_folder(out)
    assert not out.exists() and (work / run.FIT_STATE).is_file()
    assert [e["status"] for e in _ledger(ledger)["entries"]] == ["failed"]

    refused = runner.invoke(app, _fit_args(private, out, ledger, 12, 0))
    assert refused.exit_code == 2 and "--resume" in refused.output

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
