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
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privsynth import defaults
from privsynth import recipe as recipes
from privsynth import run as runs
from privsynth.data import load, scan
from privsynth.downstream import ClassifierConfig, accuracy, train_classifier

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist.npz"
TINY_IMAGENET = MNIST.parent / "tiny_imagenet_200_subset.zip"
CIFAR10 = MNIST.parent / "cifar10_jpeg.zip"
SHAPE = {"mnist": (28, 1), "cifar10": (32, 3)}  # resolution, channels
# What a fit reads from the prepared folders' headers and class folders (and the Tiny-ImageNet
# public folder), for tools that resolve the defaults without the folders (bench.chart)
FACTS = {"mnist": defaults.Facts(size=(28, 28), grey=True, classes=10, public_classes=200),
         "cifar10": defaults.Facts(size=(32, 32), grey=False, classes=10, public_classes=200)}
SPLITS = {"private": (0, 55000), "val": (55000, 60000)}


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


def request(method: str, epsilon: float, recipe_file: str | None, overrides: list[str]) -> dict:
    """The raw recipe table a bench row fits: `recipe_file` (none: the defaults alone) with
    `overrides` applied, the method and epsilon; run.fit completes it with the defaults for the
    data, as it does a user's `privsynth fit`."""
    raw = recipes.apply_overrides(recipes.read(Path(recipe_file) if recipe_file else None),
                                  overrides)
    raw["method"] = raw.get("method", method)
    raw["privacy"] = {**raw.get("privacy", {}), "epsilon": float(epsilon)}
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
    tag = f"{ds}-{args.method}-eps{args.epsilon:g}-{time.strftime('%Y%m%d-%H%M%S')}"
    raw = request(args.method, args.epsilon, args.recipe, args.overrides)
    times, t0 = {}, time.time()
    last = [0.0]

    def progress(what: str, done: int, total: int) -> None:
        if time.time() - last[0] > 60 or done == total:
            print(f"[{time.time() - t0:6.0f}s] {what} {done}/{total}", flush=True)
            last[0] = time.time()

    public = prepare_public(work) if args.method == "privimage" else None
    result = runs.fit(folders["private"], public, raw, work / "runs" / tag, progress=progress)
    recipe = result.recipe
    times["fit_s"] = time.time() - t0
    t1 = time.time()
    synth = runs.sample(result.run, args.synthetic, work / "synth" / tag, seed=0)
    times["sample_s"] = time.time() - t1
    t2 = time.time()
    sx, sy = _tensors(synth, ds)
    vx, vy = _tensors(folders["val"], ds)
    tx, ty = _tensors(folders["test"], ds)
    clf = ClassifierConfig()
    model, curve = train_classifier(sx, sy, vx, vy, classes=10, config=clf)
    times["classifier_s"] = time.time() - t2
    row = {"dataset": ds, "method": args.method, "epsilon": result.certificate["epsilon"]["spent"],
           "epsilon_target": args.epsilon, "delta": result.certificate["delta"],
           "accountant": result.certificate["accountant"], "device": recipe.run.device,
           "accuracy": accuracy(model, tx, ty), "val_curve": curve, "classifier": clf.to_dict(),
           "synthetic": args.synthetic, **times,
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "recipe": args.recipe, "overrides": args.overrides, "commit": _commit(),
           "resolved": recipe.to_dict(), "chosen": sorted(result.chosen or {}),
           "run": str(result.run), "load_1min": os.getloadavg()[0]}
    _append(Path(args.results), row)
    return row


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
               ["dataset", "method", "eps", "delta", "accountant", "device", "accuracy %", "fit s",
                "sample s", "peak RSS MB", "commit", "overrides"],
               [row["dataset"], row["method"], eps, f"{row['delta']:.2e}", row["accountant"],
                row["device"], f"{100 * row['accuracy']:.2f}", f"{row['fit_s']:.0f}",
                f"{row['sample_s']:.0f}", f"{row['peak_rss_mb']:.0f}", row["commit"],
                " ".join(row["overrides"])])
