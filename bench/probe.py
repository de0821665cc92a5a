"""Quick dp-mepf probe: one setting in 10-20 minutes of one core (MNIST), to compare settings.

    python -m bench.probe TAG [--dataset mnist|cifar10] [--recipe FILE]
                          [--set section.key=value ...] [--steps 1000] [--epsilon 10]

The recipe (default: none, the defaults for the dataset's facts, privsynth.defaults) and its
`--set` overrides are read as `bench run` reads them (bench.mnist.resolved); `--steps` replaces
`dpmepf.steps` (probes are short). The noisy releases (the real `Generator.release` on the
private split, 55k MNIST / 45k CIFAR-10 images, delta 1 / (N ln N), PRV) are cached per dataset,
encoder, release settings and budget under bench-work/probe/, so settings that only change
training share one release. The releases are calibrated with the label filters' charges the
recipe has (as a fit calibrates them), but the filters are not trained: probes compare the
generator alone, on unfiltered samples. The generator is trained by the real `Generator.train`, then judged
on 20k samples:

- `fidelity`: how often a SmallCNN trained on the real private split (3 epochs, cached) gives
  a sample the label it was drawn for;
- `val`: the best validation accuracy over 6 epochs of the downstream SmallCNN trained on the
  20k samples (the validation split, never the test set).

Both are proxies for the full protocol (`python -m bench run`: 60k samples, 10 epochs, test
accuracy); rows go to benchmarks/probes.jsonl and a 10 x 16 sample grid to bench-work/probe/.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from bench.mnist import SHAPE, _tensors, prepare_dataset, resolved
from privsynth import recipe as recipes
from privsynth.data import scan
from privsynth.downstream import ClassifierConfig, SmallCNN, accuracy, train_classifier
from privsynth.generators import dpmepf
from privsynth.privacy import Budget
from privsynth.run import default_delta, encoder_for

PRIVATE = {"mnist": 55000, "cifar10": 45000}  # private images: delta = 1 / (N ln N)
RELEASE_KEYS = ("share_phi1", "share_phi2", "share_counts", "phi2_bound", "split_bits",
                "share_centre", "split_seed", "split_noise")


def release_key(recipe: recipes.Recipe, dataset: str = "mnist") -> str:
    """What a release depends on (dataset, encoder, budget, release settings, the label filters
    that share the budget), hashed; MNIST's keys without filters are those of earlier caches."""
    cfg = recipe.generator
    key = json.dumps([dataclasses.asdict(recipe.features), recipe.privacy.epsilon,
                      [getattr(cfg, k) for k in RELEASE_KEYS]]
                     + [dataset] * (dataset != "mnist")
                     + [["judges", cfg.judge, cfg.scatter_judge]] * (cfg.judge or cfg.scatter_judge))
    return hashlib.sha1(key.encode()).hexdigest()[:10]


@dataclasses.dataclass(frozen=True)
class Probe:
    """One probe's request: its tag, dataset, resolved recipe, the override words (recorded with
    the row) and the work folder."""

    tag: str
    dataset: str
    recipe: recipes.Recipe
    words: list[str]
    work: Path


def parse(argv: list[str]) -> Probe:
    """The probe the command line asks for."""
    ap = argparse.ArgumentParser(prog="python -m bench.probe")
    ap.add_argument("tag")
    ap.add_argument("--dataset", default="mnist", choices=sorted(PRIVATE))
    ap.add_argument("--recipe", default=None, help="recipe file [default: none, the defaults]")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="recipe override section.key=value (repeatable)")
    ap.add_argument("--steps", type=int, default=1000, help="generator steps [1000]")
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--work", default="bench-work", help="folder for data and the probe cache")
    args = ap.parse_args(argv)

    sets = [*args.overrides, f"dpmepf.steps={args.steps}"]
    recipe = resolved(args.dataset, "dp-mepf", args.epsilon, args.recipe, sets)
    if recipe.method != "dp-mepf":
        raise SystemExit(f"bench.probe compares dp-mepf settings; the recipe is {recipe.method}")
    words = [f"--dataset={args.dataset}"] * (args.dataset != "mnist") + [
        f"--recipe={args.recipe}"] * bool(args.recipe) + sets
    return Probe(args.tag, args.dataset, recipe, words, Path(args.work))


def judge(work: Path, folders: dict, dataset: str = "mnist") -> SmallCNN:
    """The real-data classifier that scores fidelity (trained once per dataset, cached)."""
    path = work / "probe" / ("judge.safetensors" if dataset == "mnist" else
                             f"judge-{dataset}.safetensors")
    model = SmallCNN(SHAPE[dataset][1], 10)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x, y = _tensors(folders["private"], dataset)
    vx, vy = _tensors(folders["val"], dataset)
    model, _ = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=3))
    save_file(model.state_dict(), str(path))
    return model


def main(argv: list[str] | None = None) -> dict:
    """Run one probe and append its row."""
    asked = parse(argv)
    tag, dataset, recipe, words, work = (asked.tag, asked.dataset, asked.recipe, asked.words,
                                         asked.work)
    folders = prepare_dataset(dataset, work)
    (work / "probe").mkdir(parents=True, exist_ok=True)
    cfg = recipe.generator
    torch.manual_seed(0)
    encoder = encoder_for(recipe)
    cache = work / "probe" / f"release-{release_key(recipe, dataset)}.pt"
    g = dpmepf.Generator(cfg, encoder, resolution=recipe.data.resolution,
                         channels=SHAPE[dataset][1])
    listing = scan(folders["private"])
    if cache.exists():
        rel = dpmepf.Releases(**torch.load(cache))
    else:
        budget = Budget(epsilon=recipe.privacy.epsilon, delta=default_delta(PRIVATE[dataset]),
                        accountant="prv")
        rel = g.release(listing, budget, g.plan(budget, listing.unit_count))  # the judges share it
        torch.save(rel.__dict__, cache)
    t0 = time.time()
    sampler = g.train(rel, listing.classes)
    train_s = time.time() - t0
    x, y = sampler.sample(20000, seed=1)
    fidelity = accuracy(judge(work, folders, dataset), x, y)
    vx, vy = _tensors(folders["val"], dataset)
    _, curve = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=6))
    rows = [torch.cat([x[i] for i in (y == k).nonzero()[:16, 0]], 2) for k in range(10)]
    grid = torch.cat(rows, 1).permute(1, 2, 0).numpy()  # (H, W, C)
    Image.fromarray(grid[..., 0] if grid.shape[2] == 1 else grid).save(
        work / "probe" / f"{tag}.png")
    row = {"tag": tag, "dataset": dataset, "args": words, "features": dataclasses.asdict(recipe.features),
           "dpmepf": dataclasses.asdict(cfg), "encoder": encoder.name, "dim": encoder.dim,
           "train_s": round(train_s), "per_step_s": train_s / cfg.steps, "fidelity": fidelity,
           "val": max(curve), "curve": curve}
    print(json.dumps(row), flush=True)
    with open(Path("benchmarks") / "probes.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
