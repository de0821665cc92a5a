"""`privsynth audit`: the one-run bound against hand-derived values, the no-noise switch that
every real fit refuses, and the audit of both generators at tiny scale: with the real noise the
bound stays at or below the certified epsilon, with the noise off (the positive control) it is
far above it."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_folder
from privsynth import recipe as recipes
from privsynth import run
from privsynth.audit import bound
from privsynth.cli import app
from privsynth.errors import BudgetError
from privsynth.privacy import NoiseSource, mechanisms

runner = CliRunner()
# dp-mepf as the defaults configure it for these 16 px grey images (cells, both DP-SGD label
# filters, pooled-pixel features), at tiny sizes; privimage: tests/test_privimage.py's DRAFTED
# (its dp-mepf drafts, whose releases the audit scores along with the UNet's loss).
DPMEPF = ["--set", "dpmepf.steps=3", "--set", "dpmepf.width=8", "--set", "data.resolution=16",
          "--set", "features.input_size=32", "--set", "dpmepf.judge_epochs=1", "--set",
          "dpmepf.scatter_epochs=1", "--set", "dpmepf.judge_batch=8", "--set",
          "dpmepf.scatter_batch=8", "--set", "privacy.accountant=rdp"]
PRIVIMAGE = ["--set", "privacy.accountant=rdp", "--set", "privimage.width=8", "--set",
             "data.resolution=8", "--set", "privimage.pretrain_steps=2", "--set",
             "privimage.pretrain_batch=8", "--set", "privimage.draft_images=12", "--set",
             "privimage.draft_steps=2", "--set", "privimage.dp_steps=2", "--set",
             "privimage.dp_batch=8", "--set", "privimage.physical_batch=8", "--set",
             "privimage.query_epochs=1", "--set", "privimage.sample_steps=2", "--set",
             "privimage.strength=0.2", "--set", "privimage.dpmepf.steps=3", "--set",
             "privimage.dpmepf.split_bits=0", "--set", "privimage.dpmepf.judge=false", "--set",
             "privimage.dpmepf.scatter_judge=false", "--set", "privimage.dpmepf.unbiased=false",
             "--set", "features.input_size=32"]


def _q(epsilon: float) -> float:
    return math.exp(epsilon) / (1 + math.exp(epsilon))


def test_all_guesses_right_without_delta_gives_the_cap() -> None:
    """delta = 0, v = r: p = q^r, so the bound is log(q / (1 - q)) at q = level^(1/r)."""
    for r, level in ((32, 0.05), (64, 0.05 / 3), (1000, 0.005)):
        q = level ** (1 / r)
        assert bound.epsilon_lower_bound(r, r, r, 0.0, level=level) == pytest.approx(
            math.log(q / (1 - q)), abs=1e-5)
    # the figures quoted in privsynth/audit/bound.py's docstring
    assert bound.epsilon_lower_bound(32, 32, 32, 0.0, level=0.01) == pytest.approx(1.866, abs=1e-3)
    assert bound.epsilon_lower_bound(1000, 1000, 1000, 0.0, level=0.005) == pytest.approx(
        5.238, abs=1e-3)


def test_p_value_matches_the_theorem_by_hand() -> None:
    """r = v = 3: beta = q^3; alpha = max(P[B=2], (P[B=2] + P[B=1]) / 2, (1 - q^3) / 3)."""
    m, delta, eps = 10, 1e-3, 2.0
    q = _q(eps)
    b2, b1 = 3 * q * q * (1 - q), 3 * q * (1 - q) ** 2
    want = q ** 3 + 2 * m * delta * max(b2, (b2 + b1) / 2, (1 - q ** 3) / 3)
    assert bound.p_value(m, 3, 3, eps, delta) == pytest.approx(want, rel=1e-12)
    # v = r - 1 without delta: P[B >= r - 1] = q^r + r q^(r-1) (1 - q)
    assert bound.p_value(50, 20, 19, 1.0, 0.0) == pytest.approx(
        _q(1.0) ** 20 + 20 * _q(1.0) ** 19 * (1 - _q(1.0)), rel=1e-12)
    assert bound.p_value(5, 4, 0, 3.0, 0.1) == 1.0  # no correct guess proves nothing


def test_bound_is_zero_for_chance_and_grows_with_correct_guesses() -> None:
    assert bound.epsilon_lower_bound(100, 100, 50, 1e-5) == 0.0  # coin-flip accuracy
    bounds = [bound.epsilon_lower_bound(1000, 200, v, 1e-6) for v in (120, 150, 180, 200)]
    assert bounds[0] < bounds[1] < bounds[2] < bounds[3]
    # the delta term: 2 m delta = 2 x 64 x 0.0167 > 1 leaves nothing to reject
    assert bound.epsilon_lower_bound(64, 64, 64, 0.0167) == 0.0
    # the bound itself is rejected at exactly the level (p just below it)
    eps = bound.epsilon_lower_bound(1000, 200, 180, 1e-6)
    assert bound.p_value(1000, 200, 180, eps, 1e-6) < 0.05 <= bound.p_value(1000, 200, 180,
                                                                            eps + 1e-5, 1e-6)


def test_guesses_take_the_top_and_bottom_scores_with_bonferroni() -> None:
    included = np.array([True] * 32 + [False] * 32)
    best, tried = bound.audit(np.where(included, 1.0, 0.0), included, 0.0)
    assert [t.k_in for t in tried] == [32, 16, 8]
    assert all(t.correct == t.guesses for t in tried)
    q = (0.05 / 3) ** (1 / 64)
    assert best.k_in == 32 and best.epsilon_lb == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    best, _ = bound.audit(np.where(included, 0.0, 1.0), included, 0.0)  # scores upside down
    assert best.correct == 0 and best.epsilon_lb == 0.0


def test_noise_off_is_refused_outside_an_audit(tmp_path: Path) -> None:
    """The switch zeroes every draw inside the audit's own fit only; `fit` and `resume` refuse
    it before anything is recorded, and any noise source outside an audit refuses it."""
    private = make_folder(tmp_path / "private", per_class=4, size=16)
    ledger = Path(os.environ["PRIVSYNTH_LEDGER"])
    before = sorted(ledger.rglob("*"))
    with mechanisms.noise_off():
        res = runner.invoke(app, ["fit", str(private), "--method", "dp-mepf", "--epsilon", "1",
                                  "--out", str(tmp_path / "run"), *DPMEPF])
        assert res.exit_code == 4 and "noise is switched off" in res.output
        assert runner.invoke(app, ["resume", str(tmp_path / "run")]).exit_code == 4
        assert sorted(ledger.rglob("*")) == before and not (tmp_path / "run").exists()
        assert not (private / ".privsynth-dataset").exists()
        rec = recipes.with_privacy(recipes.resolve(recipes.apply_overrides(
            {"method": "dp-mepf"}, DPMEPF[1::2])), epsilon=1.0)
        with pytest.raises(BudgetError, match="noise is switched off"):
            run.fit(private, None, rec, tmp_path / "run2", dataset="refused")
        assert not (tmp_path / "run2").exists()
        assert sorted(ledger.rglob("*")) == before  # a library call is refused before charging
        with pytest.raises(BudgetError):
            NoiseSource()
        with mechanisms.audit_scope():
            assert not NoiseSource().normal((3,), 5.0).any()
    assert NoiseSource().normal((1000,), 1.0).std() > 0.5  # back on


def _audit(private: Path, method: str, control: str, tiny: list[str], *extra: str) -> dict:
    res = runner.invoke(app, ["audit", str(private), "--method", method, "--epsilon", "1",
                              "--delta", "1e-6", "--canaries", "64", "--control", control,
                              "--json", *tiny, *extra])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("method", ["dp-mepf", "privimage"])
def test_audit_bound_stays_below_epsilon_and_the_no_noise_control_exceeds_it(
        method: str, tmp_path: Path) -> None:
    """64 canaries: the bound cannot pass about 2.7 (the ceiling at delta 1e-6); without noise
    the dp-mepf releases (privimage: its drafts') give every canary away."""
    size = 16 if method == "dp-mepf" else 8
    private = make_folder(tmp_path / "private", per_class=10, size=size)
    tiny = DPMEPF if method == "dp-mepf" else PRIVIMAGE
    extra = [] if method == "dp-mepf" else [
        "--public", str(make_folder(tmp_path / "public", per_class=4, classes=tuple("abcde"),
                                    size=12, seed=3))]
    snapshot = sorted(p.relative_to(private) for p in private.rglob("*"))
    real = _audit(private, method, "none", tiny, *extra, "--out", str(tmp_path / "report"))
    assert 0.99 <= real["certified_epsilon"] <= 1.0 and real["delta"] == 1e-6
    assert real["epsilon_lower_bound"] <= real["certified_epsilon"]
    assert real["verdict"] == "consistent" and real["canaries"] == 64
    assert real["ceiling"] > 1.8
    assert set(real["kinds"]) == ({"releases"} if method == "dp-mepf" else {"releases", "unet_loss"})
    control = _audit(private, method, "no-noise", tiny, *extra, "--out", str(tmp_path / "ctl"))
    assert control["epsilon_lower_bound"] > 1.5 and control["verdict"] == "detected"
    seen = json.loads((tmp_path / "ctl" / "audit.json").read_text())
    scores, member = np.array(seen["kinds"]["releases"]["scores"]), np.array(seen["membership"])
    assert scores[member].min() > 0.99 and abs(scores[~member]).max() < 0.01  # 1 in, 0 out
    # nothing was written into PRIVATE (no ledger id, no canary), and the report is complete
    assert sorted(p.relative_to(private) for p in private.rglob("*")) == snapshot
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == ["AUDIT.md", "audit.json",
                                                                      "scores.svg"]
    full = json.loads((tmp_path / "report" / "audit.json").read_text())
    assert len(full["membership"]) == 64 and sum(full["membership"]) == real["included"]
    assert "<svg" in (tmp_path / "report" / "scores.svg").read_text()


def test_audit_refuses_bad_requests(tmp_path: Path) -> None:
    private = make_folder(tmp_path / "private", per_class=4, size=16)
    base = ["audit", str(private), "--method", "dp-mepf", "--epsilon", "1", *DPMEPF]
    res = runner.invoke(app, [*base, "--canaries", "4"])
    assert res.exit_code == 2 and "--canaries" in res.output
    res = runner.invoke(app, [*base, "--control", "off"])
    assert res.exit_code == 2 and "--control" in res.output
    res = runner.invoke(app, [*base, "--set", "privacy.unit=folder:1"])
    assert res.exit_code == 2 and "privacy.unit=image" in res.output


def test_bench_audit_appends_a_row_at_tiny_scale(tmp_path: Path) -> None:
    """bench/audit.py's MNIST benchmark on a tiny folder (the defaults at tiny sizes), one
    audit."""
    from bench import audit as bench_audit

    assert bench_audit.plan(["dp-mepf", "privimage"], [1.0, 10.0], 1.0) == [
        ("dp-mepf", 1.0, "none"), ("dp-mepf", 10.0, "none"), ("privimage", 1.0, "none"),
        ("privimage", 10.0, "none"), ("dp-mepf", 1.0, "no-noise"), ("privimage", 1.0, "no-noise")]
    assert bench_audit.plan(["dp-mepf"], [], 1.0) == [("dp-mepf", 1.0, "no-noise")]  # --epsilons
    private = make_folder(tmp_path / "private", per_class=10, size=16)
    overrides = [arg for arg in DPMEPF if arg != "--set"] + ["privacy.delta=1e-6"]
    argv = ["--methods", "dp-mepf", "--epsilons", "1", "--control-epsilon", "-1", "--canaries",
            "32", "--private", str(private), "--work", str(tmp_path / "work"), "--results",
            str(tmp_path / "results"), "--note", "quiet machine"]
    assert bench_audit.main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    table = (tmp_path / "results" / "AUDIT.md").read_text().splitlines()
    assert table[0].startswith("| method | control | certified eps") and len(table) == 3
    row = json.loads((tmp_path / "results" / "audit.jsonl").read_text())
    g = row["guesses"]
    assert table[2].endswith(f": {row['included']} of 32 canaries included by the coins, "
                             f"{g['k_in']} guessed in and {g['k_out']} out ({g['correct_in']} "
                             f"and {g['correct_out']} right): quiet machine |")
    assert row["canaries"] == 32 and row["epsilon_lower_bound"] <= row["certified_epsilon"]
    assert len(list((tmp_path / "work" / "audits").glob("*/AUDIT.md"))) == 1


def test_a_bound_above_the_certificate_exits_6(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's verdict line, and exit 6 (with the numbers) when the bound exceeds the
    certified epsilon: here a fit certified at 0.5 whose 64 canaries are all given away."""
    import privsynth.audit as audits

    included = np.array([True, False] * 32)
    cert = {"delta": 1e-6, "epsilon": {"spent": 0.5}}
    rec = recipes.resolve({"method": "dp-mepf"})
    caught = audits._result(rec, cert, {"releases": included * 1.0}, included, "none", 1.0, 2.0)
    monkeypatch.setattr(audits, "audit", lambda *a, **k: caught)
    res = runner.invoke(app, ["audit", "somewhere", "--method", "dp-mepf", "--epsilon", "0.5"])
    assert res.exit_code == 6, res.output
    assert "lower bound 2.717 at 95% confidence (ceiling 2.72) [VIOLATION]" in res.output
    assert "guesses: 32 in (32 right), 32 out (32 right)" in res.output
    assert "exceeds the certified epsilon 0.5" in res.output
    fine = audits._result(rec, dict(cert, epsilon={"spent": 5.0}), {"releases": included * 1.0},
                          included, "none", 1.0, 2.0)
    monkeypatch.setattr(audits, "audit", lambda *a, **k: fine)
    res = runner.invoke(app, ["audit", "somewhere", "--method", "dp-mepf", "--epsilon", "5"])
    assert res.exit_code == 0 and "[consistent]" in res.output
