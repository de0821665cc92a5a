"""Benchmark helpers: which rows the chart draws, how a probe reads its settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import chart, probe

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "mnist-privimage.toml")


def _row(acc: float, overrides: list[str], eps: float = 10.0) -> dict:
    return {"dataset": "mnist", "method": "privimage", "epsilon_target": eps, "accuracy": acc,
            "recipe": RECIPE, "overrides": overrides}


def test_chart_draws_the_newest_row_and_skips_ablations() -> None:
    rows = [_row(0.1, []), _row(0.2, ["privimage.selection=semantic"]),  # the recipe's own value
            _row(0.9, ["privimage.selection=random"]),  # an ablation: not the method's point
            _row(0.3, [], eps=1.0),
            {"dataset": "mnist", "method": "real data (ceiling)", "epsilon_target": float("inf"),
             "accuracy": 0.98, "overrides": ["trained on the real images"]}]
    series, ceiling = chart.latest(rows, "mnist")
    assert series == {"privimage": {10.0: 20.0, 1.0: 30.0}}
    assert ceiling == 98.0


def test_probe_arguments_are_typed_and_unknown_keys_refused() -> None:
    feat, gen, eps = probe.parse(["steps=50", "f.grid=2", "lr=0.002", "eps=1", "balance_phi2=true",
                                  "f.weights=/x.th"])
    assert feat["grid"] == 2 and feat["weights"] == "/x.th" and feat["pixels"] == 0.5
    assert gen == {"steps": 50, "lr": 0.002, "balance_phi2": True} and eps == 1.0
    with pytest.raises(SystemExit, match="unknown key"):
        probe.parse(["stepz=3"])
