"""One benchmark row with the DPImageBench protocol: MNIST 55k private / 5k validation / 10k test,
CIFAR-10 45k / 5k / 10k; delta = 1/(N ln N), 60k class-conditional synthetic images, classifier
epoch chosen on the validation split only."""
from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from privsynth import defaults
from privsynth import recipe as recipes
from privsynth import run as runs
from privsynth.data import load, scan
from privsynth.downstream import accuracy, preset, train_classifier

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist.npz"
TINY_IMAGENET = MNIST.parent / "tiny_imagenet_200_subset.zip"
CIFAR10 = MNIST.parent / "cifar10_jpeg.zip"
SHAPE = {"mnist": (28, 1), "cifar10": (32, 3)}  # resolution, channels
# What a fit reads from the prepared folders' headers and class folders (and the Tiny-ImageNet
# public folder), for tools that resolve the defaults without the folders (bench.chart)
FACTS = {"mnist": defaults.Facts(size=(28, 28), grey=True, classes=10, public_classes=200),
         "cifar10": defaults.Facts(size=(32, 32), grey=False, classes=10, public_classes=200)}
SPLITS = {"private": (0, 55000), "val": (55000, 60000)}
# Where each classifier's figures go in a row: the SmallCNN keeps the field names rows always had.
FIELDS = {"smallcnn": "", "resnet": "_resnet"}


def prepare(work: Path) -> dict[str, Path]:
    """Write the three splits as ImageFolder PNG folders once (reused afterwards)."""
    data = np.load(MNIST)
    folders = {}
    for name, (x, y) in {"private": (data["x_train"][:55000], data["y_train"][:55000]),
                         "val": (data["x_train"][55000:], data["y_train"][55000:]),
                         "test": (data["x_test"], data["y_test"])}.items():
        folder = work / "data" / "mnist" / name
        folders[name] = folder
        done = folder / ".complete"
        if done.exists():
            continue
        for i, (img, label) in enumerate(zip(x, y)):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").save(folder / str(label) / f"{i:05d}.png", compress_level=1)
        done.write_text("ok\n")
    return folders


def prepare_cifar10(work: Path) -> dict[str, Path]:
    """CIFAR-10 (the lossy JPEG copy in ../shared/data) as ImageFolders, once: per class, training
    images 0000-4499 are private (45k), 4500-4999 validation (5k); the 10k test images are the test."""
    import zipfile

    root = work / "data" / "cifar10"
    folders = {name: root / name for name in ("private", "val", "test")}
    if (root / ".complete").exists():
        return folders
    with zipfile.ZipFile(CIFAR10) as zf:
        for name in zf.namelist():
            if not name.endswith(".jpg"):
                continue
            split, label, file = name.split("/")
            role = "test" if split == "test" else ("private" if int(Path(file).stem) < 4500 else "val")
            target = folders[role] / label / file
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
    (root / ".complete").write_text("ok\n")
    return folders


def prepare_dataset(dataset: str, work: Path) -> dict[str, Path]:
    """The private / val / test ImageFolders of `dataset`."""
    return prepare_cifar10(work) if dataset == "cifar10" else prepare(work)


def prepare_public(work: Path) -> Path:
    """Tiny-ImageNet's 200 x 100 training images as an ImageFolder (the public source), once."""
    import zipfile

    folder = work / "data" / "tiny-imagenet"
    if not (folder / ".complete").exists():
        with zipfile.ZipFile(TINY_IMAGENET) as zf:
            zf.extractall(folder, [n for n in zf.namelist() if n.startswith("train/")])
        (folder / ".complete").write_text("ok\n")
    return folder / "train"


def _tensors(folder: Path, dataset: str = "mnist") -> tuple[torch.Tensor, torch.Tensor]:
    resolution, channels = SHAPE[dataset]
    images = load(scan(folder), resolution=resolution, channels=channels)
    return images.images, images.labels


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def request(method: str, epsilon: float, recipe_file: str | None, overrides: list[str],
            seed: int | None = None) -> dict:
    """The raw recipe table a bench row fits: `recipe_file` (none: the defaults alone) with
    `overrides` applied, the method and epsilon (and `seed` as run.seed when given); run.fit
    completes it with the defaults for the data, as it does a user's `privsynth fit`."""
    raw = recipes.apply_overrides(recipes.read(Path(recipe_file) if recipe_file else None),
                                  overrides)
    raw["method"] = raw.get("method", method)
    raw["privacy"] = {**raw.get("privacy", {}), "epsilon": float(epsilon)}
    if seed is not None:
        raw["run"] = {**raw.get("run", {}), "seed": int(seed)}
    return raw


def resolved(dataset: str, method: str, epsilon: float, recipe_file: str | None,
             overrides: list[str]) -> recipes.Recipe:
    """The recipe a bench row of `dataset` fits now (defaults for its facts < file < overrides)."""
    return defaults.complete(request(method, epsilon, recipe_file, overrides), FACTS[dataset])[0]


def run(args) -> dict:
    """One benchmark row; appended to RESULTS.md and results.jsonl."""
    work = Path(args.work)
    ds = args.dataset
    folders = prepare_dataset(ds, work)
    tag = f"{ds}-{args.method}-eps{args.epsilon:g}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    raw = request(args.method, args.epsilon, args.recipe, args.overrides, args.seed)
    seed = args.seed or 0
    times, t0 = {}, time.time()
    last = [0.0]

    def progress(what: str, done: int, total: int) -> None:
        if time.time() - last[0] > 60 or done == total:
            print(f"[{time.time() - t0:6.0f}s] {what} {done}/{total}", flush=True)
            last[0] = time.time()

    if getattr(args, "fitted", None):
        result, times["fit_s"] = fitted(Path(args.fitted), args.method, args.epsilon, ds)
        tag = result.run.name
    else:
        public = prepare_public(work) if args.method == "privimage" else None
        result = runs.fit(folders["private"], public, raw, work / "runs" / tag, progress=progress)
        times["fit_s"] = time.time() - t0
    recipe = result.recipe
    t1 = time.time()
    synth = runs.sample(result.run, args.synthetic, work / "synth" / tag, seed=seed)
    times["sample_s"] = time.time() - t1
    sx, sy = _tensors(synth, ds)
    scores = classify(args.classifier, (sx, sy),
                      *(_tensors(folders[k], ds) for k in ("val", "test")), seed=seed)
    row = {"dataset": ds, "method": args.method, "epsilon": result.certificate["epsilon"]["spent"],
           "epsilon_target": args.epsilon, "delta": result.certificate["delta"],
           "accountant": result.certificate["accountant"], "device": recipe.run.device,
           **scores, "synthetic": args.synthetic, "seed": seed, **times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "recipe": args.recipe, "overrides": args.overrides, "commit": _commit(),
           "resolved": recipe.to_dict(), "chosen": sorted(result.chosen or {}),
           "run": str(result.run), "load_1min": os.getloadavg()[0],
           "note": "; ".join(args.notes)}
    _append(Path(args.results), row)
    return row


def fitted(folder: Path, method: str, epsilon: float,
           dataset: str) -> tuple[runs.FitResult, float]:
    """A finished bench fit (WORK/runs/TAG, TAG ending in the bench's YYYYmmdd-HHMMSS-PID stamp)
    as `runs.fit` returned it, and its fit time: from the stamp (local time, when the bench
    process started) to the certificate's creation. Refuses a run of another method, epsilon or
    image shape than the row's."""
    cert = json.loads((folder / "certificate.json").read_text())
    doc = json.loads((folder / "recipe.json").read_text())
    recipe = runs.run_recipe(doc)
    if recipe.method != method or not math.isclose(recipe.privacy.epsilon, epsilon):
        raise SystemExit(f"{folder} is a {recipe.method} fit at epsilon {recipe.privacy.epsilon:g},"
                         f" not {method} at {epsilon:g}")
    shape = (recipe.data.resolution, recipe.data.channels)
    if shape != (SHAPE[dataset][0], str(SHAPE[dataset][1])):
        raise SystemExit(f"{folder} fitted {shape[0]} px images of {shape[1]} channel(s), not "
                         f"{dataset}'s")
    try:
        stamp = "-".join(folder.name.split("-")[-3:-1])
        start = time.mktime(time.strptime(stamp, "%Y%m%d-%H%M%S"))
    except ValueError:
        raise SystemExit(f"{folder.name} does not end in a bench stamp (YYYYmmdd-HHMMSS-PID)")
    end = datetime.fromisoformat(cert["created"]).timestamp()
    return runs.FitResult(folder, cert, recipe, [], doc.get("chosen")), end - start


def classify(which: str, train: tuple, val: tuple, test: tuple, seed: int = 0) -> dict:
    """Train the classifier(s) `which` names ("smallcnn", "resnet" or "both") on `train` from
    `seed`, each epoch chosen on `val`, and score `test` once: the row's accuracy, val_curve,
    classifier and classifier_s fields (the ResNet's with the suffix _resnet)."""
    fields = {}
    for name in FIELDS if which == "both" else (which,):
        t0, config = time.time(), replace(preset(name, train[0].shape[1]), seed=seed)
        model, curve = train_classifier(*train, *val, classes=10, config=config,
                                        progress=_epochs(name))
        fields |= {f"accuracy{FIELDS[name]}": accuracy(model, *test),
                   f"val_curve{FIELDS[name]}": curve, f"classifier{FIELDS[name]}": config.to_dict(),
                   f"classifier{FIELDS[name]}_s": time.time() - t0}
    return fields


def _epochs(name: str) -> Callable[[str, int, int], None]:
    """A progress callback printing each epoch's validation accuracy and the time since now."""
    t0 = time.time()
    return lambda what, done, total: print(f"[{time.time() - t0:6.0f}s] {name} {what} {done}/"
                                           f"{total}", flush=True)


def _percent(row: dict, field: str) -> str:
    return f"{100 * row[field]:.2f}" if field in row else "-"


def append_row(folder: Path, name: str, row: dict, columns: list[str], cells: list[str]) -> None:
    """Append `row` to `name`.jsonl and its `cells` to the Markdown table `NAME`.md (header
    `columns`, written when the table is new)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.jsonl", "a") as fh:
        fh.write(json.dumps(row) + "\n")
    table = folder / f"{name.upper()}.md"
    if not table.exists():
        table.write_text("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
    with open(table, "a") as fh:
        fh.write("| " + " | ".join(cells) + " |\n")


def _append(folder: Path, row: dict) -> None:
    eps = "no privacy" if math.isinf(row["epsilon"]) else f"{row['epsilon']:.3g}"
    append_row(folder, "results", row,
               ["dataset", "method", "eps", "delta", "accountant", "device", "SmallCNN %",
                "ResNet %", "fit s", "sample s", "peak RSS MB", "commit", "overrides and notes"],
               [row["dataset"], row["method"], eps, f"{row['delta']:.2e}", row["accountant"],
                row["device"], _percent(row, "accuracy"), _percent(row, "accuracy_resnet"),
                f"{row['fit_s']:.0f}",
                f"{row['sample_s']:.0f}", f"{row['peak_rss_mb']:.0f}", row["commit"],
                notes_cell(" ".join(row["overrides"]), _seed(row), row.get("note", ""))])


def notes_cell(*parts: str) -> str:
    """A table's last cell: the non-empty `parts` (overrides, then notes) joined by ": "."""
    return ": ".join(x for x in parts if x)


def _seed(row: dict) -> str:
    """"seed N" for a row run with `--seed` N other than 0 (rows before --seed used seed 0)."""
    return f"seed {row['seed']}" if row.get("seed") else ""
