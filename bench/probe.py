"""Quick dp-mepf probe on MNIST: one setting in 10-20 minutes of one core, to compare settings.

    python -m bench.probe TAG [--recipe FILE] [--set section.key=value ...] [--steps 1000]
                          [--epsilon 10]

The recipe (default: none, the defaults for MNIST's facts, privsynth.defaults) and its `--set`
overrides are read as `bench run` reads them (bench.mnist.resolved); `--steps` replaces `dpmepf.steps` (probes are short). The noisy
releases (the real `Generator.release` on the 55k private split, delta 1.67e-6, PRV) are cached
per encoder, release settings and budget under bench-work/probe/, so settings that only change
training share one release. The generator is trained by the real `Generator.train`, then judged
on 20k samples:

- `fidelity`: how often a classifier trained on the real private split (3 epochs, cached) gives
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

from bench.mnist import _tensors, prepare, resolved
from privsynth import recipe as recipes
from privsynth.data import scan
from privsynth.downstream import ClassifierConfig, SmallCNN, accuracy, train_classifier
from privsynth.generators import dpmepf
from privsynth.privacy import Budget
from privsynth.run import default_delta, encoder_for

DELTA = default_delta(55000)  # 1 / (N ln N) = 1.666e-6
RELEASE_KEYS = ("share_phi1", "share_phi2", "share_counts", "phi2_bound", "split_bits",
                "share_centre", "split_seed", "split_noise")


def parse(argv: list[str]) -> tuple[str, recipes.Recipe, list[str]]:
    """Tag, resolved recipe and the override words (recorded with the row)."""
    ap = argparse.ArgumentParser(prog="python -m bench.probe")
    ap.add_argument("tag")
    ap.add_argument("--recipe", default=None, help="recipe file [default: none, the defaults]")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="recipe override section.key=value (repeatable)")
    ap.add_argument("--steps", type=int, default=1000, help="generator steps [1000]")
    ap.add_argument("--epsilon", type=float, default=10.0)
    args = ap.parse_args(argv)
    sets = [*args.overrides, f"dpmepf.steps={args.steps}"]
    recipe = resolved("mnist", "dp-mepf", args.epsilon, args.recipe, sets)
    if recipe.method != "dp-mepf":
        raise SystemExit(f"bench.probe compares dp-mepf settings; the recipe is {recipe.method}")
    return args.tag, recipe, [f"--recipe={args.recipe}"] * bool(args.recipe) + sets


def judge(work: Path, folders: dict) -> SmallCNN:
    """The real-data classifier that scores fidelity (trained once, cached)."""
    path = work / "probe" / "judge.safetensors"
    model = SmallCNN(1, 10)
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    x, y = _tensors(folders["private"])
    vx, vy = _tensors(folders["val"])
    model, _ = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=3))
    save_file(model.state_dict(), str(path))
    return model


def main(argv: list[str] | None = None) -> dict:
    """Run one probe and append its row."""
    tag, recipe, words = parse(argv)
    work = Path("bench-work")
    folders = prepare(work)
    (work / "probe").mkdir(parents=True, exist_ok=True)
    cfg = recipe.generator
    torch.manual_seed(0)
    encoder = encoder_for(recipe)
    release_key = json.dumps([dataclasses.asdict(recipe.features), recipe.privacy.epsilon,
                              [getattr(cfg, k) for k in RELEASE_KEYS]])
    cache = work / "probe" / f"release-{hashlib.sha1(release_key.encode()).hexdigest()[:10]}.pt"
    g = dpmepf.Generator(cfg, encoder, resolution=recipe.data.resolution, channels=1)
    listing = scan(folders["private"])
    if cache.exists():
        rel = dpmepf.Releases(**torch.load(cache))
    else:
        budget = Budget(epsilon=recipe.privacy.epsilon, delta=DELTA, accountant="prv")
        rel = g.release(listing, budget, g.plan(budget))
        torch.save(rel.__dict__, cache)
    t0 = time.time()
    sampler = g.train(rel, listing.classes)
    train_s = time.time() - t0
    x, y = sampler.sample(20000, seed=1)
    fidelity = accuracy(judge(work, folders), x, y)
    vx, vy = _tensors(folders["val"])
    _, curve = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=6))
    rows = [torch.cat([x[i, 0] for i in (y == k).nonzero()[:16, 0]], 1) for k in range(10)]
    Image.fromarray(torch.cat(rows, 0).numpy()).save(work / "probe" / f"{tag}.png")
    row = {"tag": tag, "args": words, "features": dataclasses.asdict(recipe.features),
           "dpmepf": dataclasses.asdict(cfg), "encoder": encoder.name, "dim": encoder.dim,
           "train_s": round(train_s), "per_step_s": train_s / cfg.steps, "fidelity": fidelity,
           "val": max(curve), "curve": curve}
    print(json.dumps(row), flush=True)
    with open(Path("benchmarks") / "probes.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


if __name__ == "__main__":
    main()
