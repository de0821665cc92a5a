"""Read image folders (ImageFolder, flat, Hugging Face imagefolder) and convert them by fixed rules.

Layouts, checked in this order:
1. `metadata.jsonl` at the root: Hugging Face imagefolder; `file_name` per row, the label from a
   `label` column if present, else from the first folder level.
2. Sub-folders holding images: torchvision ImageFolder; each top-level folder is a class.
3. Otherwise a flat folder: unlabelled (one class named "all").

Conversion rules (documented in the README):
- EXIF orientation applied; the first frame of animated or multi-page files.
- Alpha (RGBA, LA, palette transparency) composited on black.
- 16-bit images scaled to 8 bits (value * 255 / 65535), never clipped.
- Grey from RGB by ITU-R 601-2 luma (PIL "L"); grey to RGB by repetition.
- Resized so the shorter side equals the resolution (bicubic, antialiased), then centre-cropped
  to a square.
Files that cannot be decoded are rejected with a reason; accepted + rejected = files seen.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from privsynth.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNLABELLED = "all"
Image.MAX_IMAGE_PIXELS = 64 * 1024 * 1024  # larger headers are rejected as decompression bombs


@dataclass(frozen=True)
class Listing:
    """What a folder holds, found without reading any pixel."""

    root: Path
    layout: str  # "imagefolder-metadata" | "imagefolder" | "flat"
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (relative path, reason) for non-image entries

    @property
    def labelled(self) -> bool:
        """Whether the folder carries class labels."""
        return self.layout != "flat"


@dataclass
class ImageSet:
    """Decoded images, uint8 (N, C, H, W), with integer labels indexing `classes`."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    rejects: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _image_files(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(path)
    return found


def scan(root: str | Path) -> Listing:
    """List the images under `root` and their labels; reads no pixel."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    if (root / "metadata.jsonl").is_file():
        return _scan_metadata(root)
    files = _image_files(root)
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    top = [f.relative_to(root).parts for f in files]
    if all(len(parts) > 1 for parts in top):
        classes = tuple(sorted({parts[0] for parts in top}))
        index = {name: i for i, name in enumerate(classes)}
        return Listing(root, "imagefolder", tuple(files), tuple(index[p[0]] for p in top), classes)
    return Listing(root, "flat", tuple(files), (0,) * len(files), (UNLABELLED,))


def _scan_metadata(root: Path) -> Listing:
    rows = []
    for n, line in enumerate((root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{root}/metadata.jsonl line {n}: not JSON ({exc.msg})") from None
    if not rows or any("file_name" not in r for r in rows):
        raise DataError(f"{root}/metadata.jsonl: every row needs a file_name")
    files = [root / r["file_name"] for r in rows]
    if all("label" in r for r in rows):
        names = [str(r["label"]) for r in rows]
    elif all(len(Path(r["file_name"]).parts) > 1 for r in rows):
        names = [Path(r["file_name"]).parts[0] for r in rows]
    else:
        return Listing(root, "flat", tuple(files), (0,) * len(files), (UNLABELLED,))
    classes = tuple(sorted(set(names)))
    index = {name: i for i, name in enumerate(classes)}
    return Listing(root, "imagefolder-metadata", tuple(files), tuple(index[n] for n in names), classes)


def convert(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """One decoded image -> uint8 (channels, resolution, resolution) by the module's rules."""
    img.seek(0)
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img.convert("RGBA"))
    img = img.convert("L" if channels == 1 else "RGB")
    scale = resolution / min(img.size)
    if img.size != (resolution, resolution):
        size = (max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)
        left, top = (img.width - resolution) // 2, (img.height - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def load(listing: Listing, *, resolution: int, channels: int) -> ImageSet:
    """Decode and convert every listed file; undecodable files become rejects."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    arrays, labels, rejects = [], [], list(listing.skipped)
    for path, label in zip(listing.files, listing.labels):
        try:
            with Image.open(path) as img:
                arrays.append(convert(img, resolution, channels))
            labels.append(label)
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
            rejects.append((str(path.relative_to(listing.root)), f"{type(exc).__name__}: {exc}"))
    if not arrays:
        raise DataError(f"{listing.root}: none of {len(listing.files)} files could be read")
    images = torch.from_numpy(np.stack(arrays))
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), listing.classes, rejects)


def grey_only(listing: Listing) -> bool:
    """Whether every listed file is single-channel, from file headers only (no pixel is decoded)."""
    for path in listing.files:
        try:
            with Image.open(path) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    return False
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
            continue  # unreadable files are rejected later, with a reason
    return True
