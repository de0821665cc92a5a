"""Make the embedded demo data in assets/demo from the project's shared copies of MNIST and Tiny-ImageNet.

Run once, from the repository root, with the shared data beside the checkout:

    .venv/bin/python assets/make_demo_data.py                       # writes assets/demo
    .venv/bin/python assets/make_demo_data.py --out /tmp/demo       # same bytes elsewhere

The output is the same bytes on every run (fixed seed, sorted inputs, PNGs without metadata):
  private/<digit>/<nnnnn>.png    2000 MNIST training digits, 200 per class; nnnnn = index in x_train
  real-test/<digit>/<nnnnn>.png  500 MNIST test digits, 50 per class;      nnnnn = index in x_test
  public/<wnid>/<name>.JPEG      300 Tiny-ImageNet train images, 10 classes x 30, copied byte for byte
  TERMS.md                       the sources, their terms, and which file came from where
The product never needs this script or the shared data: the demo ships the folders it writes.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 20240601
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PER_CLASS = {"private": 200, "real-test": 50}
PUBLIC_CLASSES, PUBLIC_PER_CLASS = 10, 30


def pick_per_class(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """`per_class` indices of each label 0..9, drawn without replacement, in ascending order."""
    chosen = [rng.choice(np.flatnonzero(labels == digit), per_class, replace=False) for digit in range(10)]
    return np.sort(np.concatenate(chosen))


def write_digits(folder: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> None:
    """One grey 28x28 PNG per index, named by its index in the source array."""
    for index in indices:
        path = folder / str(labels[index]) / f"{index:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # compress_level 9: these files ship in the repository; no text chunks are written.
        Image.fromarray(images[index]).save(path, format="PNG", compress_level=9)


def pick_public(archive: zipfile.ZipFile, rng: np.random.Generator) -> dict[str, list[str]]:
    """10 seeded wnids, 30 seeded RGB train images each: {wnid: [member names]}."""
    wnids = sorted(archive.read("wnids.txt").decode().split())
    picked = {}
    for wnid in sorted(rng.choice(wnids, PUBLIC_CLASSES, replace=False)):
        prefix = f"train/{wnid}/images/"
        members = sorted(n for n in archive.namelist() if n.startswith(prefix) and n.endswith(".JPEG"))
        # Tiny-ImageNet mixes in a few grey JPEGs; the demo's public folder is described as RGB.
        rgb = [n for n in members if Image.open(io.BytesIO(archive.read(n))).mode == "RGB"]
        picked[str(wnid)] = sorted(rng.choice(rgb, PUBLIC_PER_CLASS, replace=False).tolist())
    return picked


def write_public(folder: Path, archive: zipfile.ZipFile, picked: dict[str, list[str]]) -> None:
    """Copy the picked JPEGs unchanged into an ImageFolder named by wnid."""
    for wnid, members in picked.items():
        (folder / wnid).mkdir(parents=True)
        for member in members:
            (folder / wnid / Path(member).name).write_bytes(archive.read(member))


def sha256(path: Path) -> str:
    """Hex SHA-256 of a source file, recorded in TERMS.md."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def terms(mnist: Path, tiny: Path, words: dict[str, str], picked: dict[str, list[str]]) -> str:
    """TERMS.md: where every file came from and under which terms."""
    table = "\n".join(f"| `{w}` | {words[w]} | {len(m)} |" for w, m in picked.items())
    return f"""# Demo data: sources and terms

Made by `assets/make_demo_data.py` (seed {SEED}); rerunning it gives the same bytes.

## `private/` and `real-test/`: MNIST

MNIST handwritten digits, by Yann LeCun and Corinna Cortes (with Christopher J.C. Burges), made
available under the terms of the Creative Commons Attribution-Share Alike 3.0 license
(CC BY-SA 3.0), as stated on the MNIST home page. These files are derived from it and are shared
under the same licence.

- `private/<digit>/<nnnnn>.png`: 2000 training digits, 200 per class, chosen at random with the
  seed above; `nnnnn` is the digit's index in the MNIST training set (original order).
- `real-test/<digit>/<nnnnn>.png`: 500 test digits, 50 per class; `nnnnn` is the index in the
  MNIST test set (the official t10k order).
- Pixels are unchanged: 28x28 8-bit grey, stored as PNG without metadata.
- Source file: `mnist.npz`, sha256 `{sha256(mnist)}`.

## `public/`: Tiny-ImageNet-200

300 training images of Tiny-ImageNet-200 (64x64 JPEG, copied byte for byte, original file
names), 30 per class from 10 classes chosen at random with the seed above, RGB images only.
Tiny-ImageNet is a subset of ImageNet and is under the ImageNet terms of access: use for
non-commercial research and educational purposes only; the images belong to their owners.
Replace this folder with your own public data for anything else.

| folder (wnid) | ImageNet class | images |
|---|---|---|
{table}

- `public/<wnid>/<wnid>_<k>.JPEG` is `train/<wnid>/images/<wnid>_<k>.JPEG` in the source archive.
- Source file: `tiny_imagenet_200_subset.zip`, sha256 `{sha256(tiny)}`.
"""


def main() -> None:
    """Write the demo folders (refuses to overwrite unless --force)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "demo")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder holding the two source files")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args()
    if args.out.exists():
        if not args.force:
            raise SystemExit(f"{args.out} exists; pass --force to replace it")
        shutil.rmtree(args.out)
    rng = np.random.default_rng(SEED)
    mnist, tiny = args.data / "mnist.npz", args.data / "tiny_imagenet_200_subset.zip"
    with np.load(mnist) as d:
        for name, split in (("private", "train"), ("real-test", "test")):
            x, y = d[f"x_{split}"], d[f"y_{split}"]
            write_digits(args.out / name, x, y, pick_per_class(y, PER_CLASS[name], rng))
    with zipfile.ZipFile(tiny) as archive:
        picked = pick_public(archive, rng)
        write_public(args.out / "public", archive, picked)
        words = dict(line.split("\t", 1) for line in archive.read("words.txt").decode().splitlines())
    (args.out / "TERMS.md").write_text(terms(mnist, tiny, words, picked), encoding="utf-8")


if __name__ == "__main__":
    main()
