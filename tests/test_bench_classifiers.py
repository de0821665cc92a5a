"""The bench with two downstream classifiers: a row carries the SmallCNN's figures (as rows always
have) and the ResNet's (`_resnet`), RESULTS.md shows both columns, the chart draws both."""
from __future__ import annotations

import json
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench import chart, mnist
from privsynth import downstream
from privsynth.errors import UsageError


def _digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = (torch.rand(n, 1, 28, 28, generator=g) * 40).to(torch.uint8)
    for i, label in enumerate(y.tolist()):
        x[i, 0, 2 + 2 * label:5 + 2 * label, 6:22] = 255
    return x, y


def test_a_bench_row_carries_both_classifiers_and_the_table_both_columns(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mnist, "preset", lambda name, channels: replace(  # 1 epoch, 4 channels
        downstream.preset(name, channels), epochs=1, width=4))
    scores = mnist.classify("both", _digits(64, 0), _digits(32, 1), _digits(32, 2))
    assert 0 <= scores["accuracy"] <= 1 and 0 <= scores["accuracy_resnet"] <= 1
    assert scores["classifier"]["model"] == "smallcnn" and scores["classifier"]["lr"] == 1e-3
    assert scores["classifier_resnet"]["model"] == "resnet"
    assert scores["classifier_resnet"]["crop_pad"] == 2 and len(scores["val_curve_resnet"]) == 1
    only = mnist.classify("smallcnn", _digits(32, 0), _digits(16, 1), _digits(16, 2))
    assert "accuracy" in only and not any(k.endswith("resnet") for k in only)
    base = {"dataset": "mnist", "method": "dp-mepf", "epsilon": 10.0, "delta": 1e-6,
            "accountant": "prv", "device": "cpu", "fit_s": 1.0, "sample_s": 2.0,
            "peak_rss_mb": 3.0, "commit": "abc", "overrides": []}
    mnist._append(tmp_path, {**base, **scores})
    mnist._append(tmp_path, {**base, "accuracy": 0.5})
    header, _, both, old = (line.split(" | ") for line in
                            (tmp_path / "RESULTS.md").read_text().splitlines())
    at = header.index("SmallCNN %"), header.index("ResNet %")
    assert [both[i] for i in at] == [f"{100 * scores['accuracy']:.2f}",
                                     f"{100 * scores['accuracy_resnet']:.2f}"]
    assert [old[i] for i in at] == ["50.00", "-"]


def _row(method: str, eps: float, **fields: object) -> dict:
    return {"dataset": "mnist", "method": method, "epsilon_target": eps, "recipe": None,
            "overrides": [], **fields}


def test_the_chart_draws_each_classifier_from_the_rows_that_have_it(tmp_path: Path) -> None:
    ceiling = "real data (ceiling)"
    rows = [_row(ceiling, float("inf"), accuracy=0.986),
            _row(ceiling, float("inf"), accuracy_resnet=0.994),
            _row("dp-mepf", 10.0, accuracy=0.90, accuracy_resnet=0.91),
            _row("dp-mepf", 10.0, accuracy=0.95, accuracy_resnet=0.96),  # newer: replaces it
            _row("dp-mepf", 1.0, accuracy=0.92, accuracy_resnet=0.93),
            _row("dp-mepf", 1.0, accuracy=0.94),  # newer, SmallCNN only: no ResNet point at 1
            _row("privimage", 10.0, accuracy=0.93)]
    assert chart.latest(rows, "mnist") == ({"dp-mepf": {10.0: 95.0, 1.0: 94.0},
                                            "privimage": {10.0: 93.0}}, 98.6)
    assert chart.latest(rows, "mnist", "accuracy_resnet") == ({"dp-mepf": {10.0: 96.0}}, 99.4)
    colours = {}
    for name, keep in (("both", rows), ("smallcnn", [r for r in rows if "accuracy" in r])):
        out = chart.draw(keep, "mnist", tmp_path / f"{name}.png")
        colours[name] = {c for _, c in Image.open(out).convert("RGB").getcolors(1 << 20)}
    resnet_ceiling = chart.CLASSIFIERS["ResNet"][3]
    assert resnet_ceiling in colours["both"] and resnet_ceiling not in colours["smallcnn"]
    assert chart.CLASSIFIERS["SmallCNN"][3] in colours["smallcnn"]


def test_a_second_seed_is_the_same_configuration_and_the_chart_draws_the_mean(
        tmp_path: Path) -> None:
    raw = mnist.request("dp-mepf", 10.0, None, ["dpmepf.steps=7"], seed=3)
    assert raw["run"]["seed"] == 3 and raw["privacy"]["epsilon"] == 10.0
    assert "run" not in mnist.request("dp-mepf", 10.0, None, [])  # no --seed: the recipe's
    one, two = (mnist.resolved("mnist", "dp-mepf", 10.0, None, [f"run.seed={s}"]) for s in (0, 1))
    assert chart._setting(one) == chart._setting(two)  # not an ablation, not stale
    seeded = [_row("dp-mepf", 10.0, accuracy=0.90, commit="a", seed=0),
              _row("dp-mepf", 10.0, accuracy=0.94, commit="a", seed=1),
              _row("dp-mepf", 1.0, accuracy=0.80, commit="old"),  # another configuration
              _row("dp-mepf", 1.0, accuracy=0.86, commit="new", seed=1)]
    assert chart.latest(seeded, "mnist") == ({"dp-mepf": {10.0: 92.0, 1.0: 86.0}}, None)
    base = {"dataset": "mnist", "method": "dp-mepf", "epsilon": 10.0, "delta": 1e-6,
            "accountant": "prv", "device": "cpu", "fit_s": 1.0, "sample_s": 2.0,
            "peak_rss_mb": 3.0, "commit": "abc", "overrides": ["x.y=1"], "note": "quiet"}
    mnist._append(tmp_path, {**base, "accuracy": 0.5, "seed": 2})
    mnist._append(tmp_path, {**base, "accuracy": 0.5, "seed": 0})
    rows = (tmp_path / "RESULTS.md").read_text().splitlines()[2:]
    assert rows[0].endswith("| x.y=1: seed 2: quiet |") and rows[1].endswith("| x.y=1: quiet |")


def test_rescore_adds_the_resnet_to_the_row_that_sampled_the_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import rescore

    monkeypatch.setattr(mnist, "preset", lambda name, channels: replace(
        downstream.preset(name, channels), epochs=1, width=4))
    folders = {}
    for name, (n, seed) in {"synth": (40, 0), "val": (20, 1), "test": (20, 2)}.items():
        folder = tmp_path / "work" / ("synth/mnist-dp-mepf-eps1-x" if name == "synth" else name)
        for i, (img, label) in enumerate(zip(*_digits(n, seed))):
            (folder / str(label.item())).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img[0].numpy(), "L").save(folder / str(label.item()) / f"{i}.png")
        folders[name] = folder
    monkeypatch.setattr(mnist, "prepare_dataset", lambda ds, work: folders)
    row = {"dataset": "mnist", "method": "dp-mepf", "epsilon": 1.0, "epsilon_target": 1.0,
           "delta": 1e-6, "accountant": "prv", "device": "cpu", "accuracy": 0.9, "fit_s": 1.0,
           "sample_s": 2.0, "peak_rss_mb": 3.0, "commit": "abc", "overrides": [],
           "run": "bench-work/runs/mnist-dp-mepf-eps1-x", "note": "one thread"}
    results = tmp_path / "results"
    results.mkdir()
    later = {**row, "accuracy": 0.1, "overrides": ["privimage.strength=0.001"]}  # resampled
    (results / "results.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(later) + "\n")
    args = Namespace(tag="mnist-dp-mepf-eps1-x", classifier="resnet", notes=["quiet"],
                     work=str(tmp_path / "work"), results=str(results))
    with pytest.raises(UsageError, match="not a complete synthetic folder"):
        rescore.run(args)
    (folders["synth"] / "MANIFEST.sha256").write_text("")
    new = rescore.run(args)
    assert new["accuracy"] == 0.9 and 0 <= new["accuracy_resnet"] <= 1  # the first row's, kept
    assert new["overrides"] == [] and new["note"].startswith("one thread; rescored ")
    assert new["note"].endswith("; quiet")
    assert json.loads((results / "results.jsonl").read_text().splitlines()[-1]) == new
    with pytest.raises(UsageError, match="no row"):
        rescore.run(Namespace(**{**vars(args), "tag": "elsewhere"}))


def test_a_fitted_run_is_read_back_with_its_fit_time(tmp_path: Path) -> None:
    """`bench run --fitted RUN` scores a finished fit: its recipe, certificate and defaults' choices
    as the fit returned them, its fit time from the folder's start stamp to the certificate."""
    import time

    from privsynth import recipe as recipes

    folder = tmp_path / "runs" / "cifar10-dp-mepf-eps10-20261207-143243-18498"
    folder.mkdir(parents=True)
    start = time.mktime(time.strptime("20261207-143243", "%Y%m%d-%H%M%S"))
    created = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(start + 4343))
    (folder / "certificate.json").write_text(json.dumps({"created": created, "delta": 1e-6}))
    doc = recipes.resolve({"method": "dp-mepf", "privacy": {"epsilon": 10.0},
                           "data": {"resolution": 32, "channels": "3"}}).to_dict()
    (folder / "recipe.json").write_text(json.dumps({**doc, "chosen": {"dpmepf.steps": {}}}))
    result, fit_s = mnist.fitted(folder, "dp-mepf", 10.0, "cifar10")
    assert fit_s == pytest.approx(4343) and result.run == folder
    assert result.recipe.privacy.epsilon == 10.0 and result.chosen == {"dpmepf.steps": {}}
    with pytest.raises(SystemExit, match="not privimage at 10"):
        mnist.fitted(folder, "privimage", 10.0, "cifar10")
    with pytest.raises(SystemExit, match="not dp-mepf at 1"):
        mnist.fitted(folder, "dp-mepf", 1.0, "cifar10")
    with pytest.raises(SystemExit, match="32 px images of 3 channel"):
        mnist.fitted(folder, "dp-mepf", 10.0, "mnist")
    other = folder.rename(tmp_path / "runs" / "mine")
    with pytest.raises(SystemExit, match="bench stamp"):
        mnist.fitted(other, "dp-mepf", 10.0, "cifar10")
