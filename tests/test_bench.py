"""Benchmark helpers: which rows the chart draws, how a probe reads its settings."""
from __future__ import annotations

from pathlib import Path

import pytest

from bench import chart, probe
from privsynth.errors import UsageError



def _row(acc: float, overrides: list[str], eps: float = 10.0) -> dict:  # made with the defaults
    return {"dataset": "mnist", "method": "privimage", "epsilon_target": eps, "accuracy": acc,
            "recipe": None, "overrides": overrides}


def test_chart_draws_the_newest_row_and_skips_ablations() -> None:
    rows = [_row(0.1, []), _row(0.2, ["privimage.selection=semantic"]),  # the recipe's own value
            _row(0.9, ["privimage.selection=random"]),  # an ablation: not the method's point
            _row(0.3, [], eps=1.0),
            {"dataset": "mnist", "method": "real data (ceiling)", "epsilon_target": float("inf"),
             "accuracy": 0.98, "overrides": ["trained on the real images"]}]
    series, ceiling = chart.latest(rows, "mnist")
    assert series == {"privimage": {10.0: 20.0, 1.0: 30.0}}
    assert ceiling == 98.0


def test_probe_reads_the_recipe_with_its_overrides() -> None:
    asked = probe.parse(["t", "--set", "dpmepf.lr=0.003", "--set", "features.grid=4",
                         "--steps", "50", "--epsilon", "1"])
    tag, dataset, recipe, words = asked.tag, asked.dataset, asked.recipe, asked.words
    assert tag == "t" and recipe.generator.steps == 50 and recipe.generator.lr == 0.003
    assert recipe.features.grid == 4 and recipe.privacy.epsilon == 1.0
    assert recipe.features.pixels == 0.5 and recipe.generator.split_bits == 3  # the defaults
    assert words[-1] == "dpmepf.steps=50" and "dpmepf.lr=0.003" in words
    with pytest.raises(UsageError, match="did you mean 'steps'"):
        probe.parse(["t", "--set", "dpmepf.stepz=3"])
    assert dataset == "mnist" and recipe.data.resolution == 28 and recipe.data.channels == "1"
    asked = probe.parse(["t", "--dataset", "cifar10", "--epsilon", "1", "--work", "w"])
    colour, recipe, words = asked.dataset, asked.recipe, asked.words
    assert colour == "cifar10" and asked.work == Path("w") and recipe.data.resolution == 32 and recipe.data.channels == "3"
    assert words[0] == "--dataset=cifar10" and recipe.privacy.epsilon == 1.0


def test_the_linear_probe_separates_what_is_separable_and_nothing_else() -> None:
    import torch

    from bench import linear_probe

    g = torch.Generator().manual_seed(0)
    y = torch.arange(600) % 3
    x = torch.randn(600, 20, generator=g) + 4 * torch.nn.functional.one_hot(y, 20).float()
    assert linear_probe.probe((x[:300], y[:300]), (x[300:], y[300:])) > 0.95
    noise = torch.randn(600, 20, generator=g)
    assert linear_probe.probe((noise[:300], y[:300]), (noise[300:], y[300:])) < 0.5
    kept, labels = linear_probe.per_class(x, y, 5)
    assert labels.tolist() == [0] * 5 + [1] * 5 + [2] * 5 and torch.equal(kept[5], x[1])
