"""Many dp-mepf MNIST settings at once on an accelerator, scored by the full protocol.

    python -m bench.sweep pack SWEEP.json --out DIR     # here, on the CPU: the noisy releases
    python -m bench.sweep run DIR --device cuda --jobs 4 [--out ROWS.jsonl]

SWEEP.json is a list of {"tag": ..., "set": ["section.key=value", ...], "steps": N,
"epsilon": E} (the defaults for MNIST unless "recipe" names a file). `pack` resolves each
setting as `bench run` does (bench.mnist.resolved), makes its noisy releases with the real
`Generator.release` on the 55k private split (PRV, delta 1/(N ln N)), once per distinct release
(cached with bench.probe's), and writes them with the validation and test images to DIR. DIR is
all that `run` reads, so it can travel to a machine with a GPU and no private data. `run` trains
each generator with the real `Generator.train` on `--device`, draws 60k images and scores them as
`python -m bench run` does: SmallCNN, 10 epochs, the epoch chosen on the validation split, test
accuracy of that epoch. Rows are appended as they finish. A GPU row measures the *setting*; the
CPU fit time of a setting is its steps x images per step at the measured CPU cost per image.
"""
from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import json
import multiprocessing
import time
from pathlib import Path

import torch

from bench.mnist import _tensors, prepare, resolved
from bench.probe import release_key
from privsynth import recipe as recipes
from privsynth.data import scan
from privsynth.generators import dpmepf
from privsynth.privacy import Budget
from privsynth.run import default_delta, encoder_for

PRIVATE = 55000


def resolve(spec: dict) -> recipes.Recipe:
    """The recipe of one sweep entry, as `bench run --recipe R --set ...` would resolve it."""
    sets = [*spec.get("set", []), f"dpmepf.steps={spec['steps']}"]
    return resolved("mnist", "dp-mepf", float(spec.get("epsilon", 10.0)), spec.get("recipe"), sets)


def pack(specs: list[dict], out: Path, work: Path = Path("bench-work")) -> None:
    """Releases (CPU, private data) and evaluation images for `run`."""
    folders = prepare(work)
    (out / "releases").mkdir(parents=True, exist_ok=True)
    listing = scan(folders["private"])
    delta = default_delta(PRIVATE)
    for spec in specs:
        recipe = resolve(spec)
        key = release_key(recipe)
        target = out / "releases" / f"{key}.pt"
        spec["release"] = key
        if target.exists():
            continue
        torch.manual_seed(0)
        g = dpmepf.Generator(recipe.generator, encoder_for(recipe),
                             resolution=recipe.data.resolution, channels=1)
        budget = Budget(epsilon=recipe.privacy.epsilon, delta=delta, accountant="prv")
        t0 = time.time()
        rel = g.release(listing, budget, g.plan(budget, listing.unit_count))  # the judges share it
        torch.save(dict(rel.__dict__, spent=budget.spent(), delta=delta), target)
        print(f"release {key} ({spec['tag']}): {rel.cells} cells, {time.time() - t0:.0f} s",
              flush=True)
    vx, vy = _tensors(folders["val"])
    tx, ty = _tensors(folders["test"])
    torch.save({"val": (vx, vy), "test": (tx, ty)}, out / "eval.pt")
    (out / "sweep.json").write_text(json.dumps(specs, indent=1) + "\n")


def one(spec: dict, folder: str, device: str, threads: int, samples: int = 60000,
        epochs: int = 10) -> dict:
    """Train, sample and score one setting (in a worker process)."""
    from privsynth.downstream import ClassifierConfig, accuracy, train_classifier

    torch.set_num_threads(threads)
    recipe = resolve(spec)
    saved = torch.load(Path(folder) / "releases" / f"{spec['release']}.pt")
    spent, delta = saved.pop("spent"), saved.pop("delta")
    rel = dpmepf.Releases(**saved)
    cfg = recipe.generator
    torch.manual_seed(0)
    g = dpmepf.Generator(cfg, encoder_for(recipe), resolution=recipe.data.resolution,
                         channels=1, device=device)
    t0 = time.time()
    sampler = g.train(rel, tuple(str(c) for c in range(10)))
    train_s = time.time() - t0
    x, y = sampler.to(device).sample(samples, seed=0)
    data = torch.load(Path(folder) / "eval.pt")
    (vx, vy), (tx, ty) = data["val"], data["test"]
    model, curve = train_classifier(x, y, vx, vy, classes=10, config=ClassifierConfig(epochs=epochs), device=device)
    per_slot = max(1, cfg.batch_per_class // rel.cells)
    return {"tag": spec["tag"], "set": spec.get("set", []), "steps": cfg.steps,
            "epsilon": spent, "delta": delta, "cells": rel.cells,
            "images_per_step": per_slot * rel.cells * 10, "device": device,
            "train_s": round(train_s, 1), "samples": samples, "epochs": epochs, "val": max(curve), "curve": curve,
            "test": accuracy(model, tx, ty), "dpmepf": dataclasses.asdict(cfg),
            "features": dataclasses.asdict(recipe.features)}


def run(folder: Path, device: str, jobs: int, out: Path, threads: int, samples: int = 60000,
        epochs: int = 10) -> None:
    """Every setting of `folder`, `jobs` at a time; rows appended to `out` as they finish."""
    specs = json.loads((folder / "sweep.json").read_text())
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        pending = {pool.submit(one, s, str(folder), device, threads, samples, epochs): s["tag"] for s in specs}
        for done in futures.as_completed(pending):
            try:
                row = done.result()
            except Exception as exc:  # noqa: BLE001 - one failed setting must not lose the others
                row = {"tag": pending[done], "error": repr(exc)}
            print(json.dumps({k: v for k, v in row.items() if k not in ("dpmepf", "features")}),
                  flush=True)
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.sweep")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="make the releases (CPU, reads private data)")
    p.add_argument("sweep", type=Path)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="train and score every setting of a packed folder")
    r.add_argument("folder", type=Path)
    r.add_argument("--device", default="cuda")
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--threads", type=int, default=1, help="torch threads per job")
    r.add_argument("--out", type=Path, default=Path("benchmarks/sweeps.jsonl"))
    r.add_argument("--samples", type=int, default=60000, help="synthetic images per setting")
    r.add_argument("--epochs", type=int, default=10, help="classifier epochs")
    args = ap.parse_args(argv)
    if args.cmd == "pack":
        pack(json.loads(args.sweep.read_text()), args.out)
    else:
        run(args.folder, args.device, args.jobs, args.out, args.threads, args.samples, args.epochs)


if __name__ == "__main__":
    main()
