"""Read image folders (ImageFolder, flat, Hugging Face imagefolder) and convert them by fixed rules.

Every entry under the root is either accepted or rejected with a reason (accepted + rejected =
entries seen); `owner/rejects.jsonl` in a run folder lists the rejects. The rules, also in docs/inputs.md:

Layouts, checked in this order:
1. `metadata.jsonl` at the root: Hugging Face imagefolder; `file_name` per row, the label from a
   `label` column if present, else from the first folder level. Image files it does not list, and
   rows naming a missing file or a path outside the root, are rejected.
2. A sub-folder holding image files: torchvision ImageFolder. Each top-level folder is a class;
   files in nested folders belong to their top-level class; image files directly in the root are
   rejected. A folder without image files is not a class (noted). One class is allowed (noted).
   Class names differing only in case, or not valid UTF-8, are a data error (rename them).
3. Otherwise a flat folder: unlabelled (one class named "all").

Entries: hidden files and anything inside hidden folders (name starting with ".", e.g. .DS_Store,
._* AppleDouble files) are rejected; so are extensions not in IMAGE_SUFFIXES (matched ignoring
case), broken or looping symlinks, symlinks to folders (never followed, so no loop can form) and
anything not a regular file. Symlinks to files are followed. Names that are not valid UTF-8 are
read normally and shown with \\x escapes. Exact duplicates are kept (`inspect` counts them).

Decoding: only FORMATS are opened (whatever the extension says); an image over MAX_PIXELS pixels
is rejected from its header, before any pixel is decoded (decompression bombs); any decode error
(truncated, zero-byte, not an image) rejects that file.

Conversion rules:
- EXIF orientation applied; the first frame of animated or multi-page files.
- Alpha (RGBA, LA, palette transparency) composited on black.
- 16-bit grey scaled to 8 bits as round(value * 255 / 65535), never clipped; 16-bit colour PNGs
  keep their high byte (value // 256, Pillow's decoding). Float images ("F") are rejected.
- CMYK to RGB by Pillow's conversion (no colour profile applied).
- Grey from RGB by ITU-R 601-2 luma (PIL "L"); grey to RGB by repetition.
- The centred square of side min(width, height) is resized to the resolution (bicubic).
"""
from __future__ import annotations

import json
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from privsynth.errors import DataError
from privsynth.files import sha256_of
from privsynth.progress import Progress

if TYPE_CHECKING:  # torch is imported by load() only: `privsynth inspect` starts in ~1 s, not ~5
    import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP", "PPM")  # JPEG includes MPO (multi-picture)
UNLABELLED = "all"
OWN_FILES = {".privsynth-dataset"}  # privsynth's own marker in the root (privacy/ledger.py): not input
MAX_PIXELS = 2**25  # 33.5 M; above this a header is a decompression bomb (peak memory < 1 GB)
Image.MAX_IMAGE_PIXELS = 2 * MAX_PIXELS  # Pillow's own guard, behind ours
_RGB16 = ("I;16", "I;16B", "I;16L", "I")

Reject = tuple[str, str]  # (path relative to the root, reason)


@dataclass(frozen=True)
class Listing:
    """What a folder holds, found without reading any pixel."""

    root: Path
    layout: str  # "imagefolder-metadata" | "imagefolder" | "flat"
    files: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]
    skipped: tuple[Reject, ...] = ()  # entries rejected without decoding (hidden, not an image...)
    notes: tuple[str, ...] = ()  # folder-level rules that applied (empty folder, one class ...)
    units: tuple[int, ...] = ()  # privacy unit of each file (privacy.units); () = one per file

    @property
    def labelled(self) -> bool:
        """Whether the folder carries class labels."""
        return self.layout != "flat"

    @property
    def seen(self) -> int:
        """Entries found under the root: listed files plus those skipped."""
        return len(self.files) + len(self.skipped)

    @property
    def unit_count(self) -> int:
        """N, the number of privacy units: the distinct units `units` names, else one per listed
        file. Every mechanism sized from N (delta, DP-SGD sample rates) reads it here."""
        return len(set(self.units)) if self.units else len(self.files)

    @property
    def unit_sizes(self) -> list[int] | None:
        """Listed files per unit (index = unit), or None when every file is its own unit."""
        return unit_sizes(self.units)


def unit_sizes(units: Sequence[int]) -> list[int] | None:
    """How many entries of `units` (each file's unit, an index) name each unit; None if empty."""
    if not units:
        return None
    sizes = [0] * (max(units) + 1)
    for unit in units:
        sizes[unit] += 1
    return sizes


@dataclass
class ImageSet:
    """Decoded images, uint8 (N, C, H, W), with integer labels indexing `classes`."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    rejects: list[Reject] = field(default_factory=list)
    units: torch.Tensor | None = None  # privacy unit of each image, when the listing names units

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batches(self, size: int, device: str | torch.device, *, progress: Progress | None = None,
                what: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The images in order, `size` at a time: (floats in [0, 1] on `device`, labels, units or
        None); after each batch is used, `progress(what, images done, len(self))`."""
        import torch

        for start in range(0, len(self), size):
            x = self.images[start:start + size].to(device, torch.float32) / 255.0
            u = None if self.units is None else self.units[start:start + size]
            yield x, self.labels[start:start + size], u
            if progress:
                progress(what, min(start + size, len(self)), len(self))


def display(path: str | Path) -> str:
    """A path as printable text: bytes that are not UTF-8 become \\x escapes."""
    return os.fsencode(str(path)).decode("utf-8", "backslashreplace")


def _walk(root: Path) -> tuple[list[Path], list[Reject]]:
    """Candidate image files (sorted) and the entries rejected on sight, under `root`."""
    found, rejects = [], []
    for folder, dirs, names in os.walk(root, followlinks=False):
        here = Path(folder)
        for name in list(dirs):
            if (here / name).is_symlink():
                dirs.remove(name)
                rejects.append((display((here / name).relative_to(root)),
                                "symlink to a folder: not followed"))
        dirs.sort()
        for name in names:
            path = here / name
            rel = path.relative_to(root)
            why = _why_not(path, rel)
            if why:
                rejects.append((display(rel), why))
            elif rel.as_posix() not in OWN_FILES | {"metadata.jsonl"}:
                found.append(path)
    return sorted(found), sorted(rejects)


def _why_not(path: Path, rel: Path) -> str | None:
    """Why an entry is not a candidate image file, or None when it is one."""
    if rel.as_posix() in OWN_FILES:
        return None
    if any(part.startswith(".") for part in rel.parts[:-1]):
        return "inside a hidden folder"
    if rel.name.startswith("."):
        return "hidden file"
    try:
        if not path.is_file():  # follows symlinks; False for FIFOs, devices, sockets
            return "broken symlink or symlink loop" if path.is_symlink() else "not a regular file"
    except OSError as exc:  # a symlink loop
        return f"unreadable entry ({exc.strerror or exc})"
    if rel.as_posix() == "metadata.jsonl":
        return None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"extension {path.suffix or '(none)'!r} is not an image type"
    return None


def scan(root: str | Path) -> Listing:
    """List the images under `root` and their labels; reads no pixel."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root} is not a folder")
    files, rejects = _walk(root)
    if (root / "metadata.jsonl").is_file():
        return _scan_metadata(root, files, rejects)
    if not files:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}); "
                        f"{len(rejects)} other entries")
    if all(len(f.relative_to(root).parts) == 1 for f in files):
        return Listing(root, "flat", tuple(files), (0,) * len(files), (UNLABELLED,), tuple(rejects))
    loose = [f for f in files if len(f.relative_to(root).parts) == 1]
    rejects += [(display(f.relative_to(root)), "not in a class folder (ImageFolder layout: every "
                 "image belongs in a class sub-folder)") for f in loose]
    files = [f for f in files if len(f.relative_to(root).parts) > 1]
    names = [f.relative_to(root).parts[0] for f in files]
    classes = _check_classes(sorted(set(names)))
    index = {name: i for i, name in enumerate(classes)}
    notes = _folder_notes(root, files, classes)
    return Listing(root, "imagefolder", tuple(files), tuple(index[n] for n in names), classes,
                   tuple(sorted(rejects)), notes)


def _check_classes(names: list[str]) -> tuple[str, ...]:
    """Class names must be valid UTF-8 and distinct ignoring case (a published folder per class)."""
    seen: dict[str, str] = {}
    for name in names:
        if display(name) != name or not name.isprintable():
            raise DataError(f"class folder {display(name)!r} is not a printable UTF-8 name; "
                            "rename it (it becomes a folder name in the published dataset)")
        if name.casefold() in seen:
            raise DataError(f"class folders {seen[name.casefold()]!r} and {name!r} differ only in "
                            "case (they would merge on macOS and Windows); rename or merge them")
        seen[name.casefold()] = name
    return tuple(names)


def _folder_notes(root: Path, files: list[Path], classes: tuple[str, ...]) -> tuple[str, ...]:
    notes = []
    empty = sorted(display(p.name) for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                   and not p.name.startswith(".") and p.name not in classes)
    if empty:
        notes.append(f"folders without image files, not classes: {', '.join(empty)}")
    nested = sorted({f.relative_to(root).parts[0] for f in files if len(f.relative_to(root).parts) > 2})
    if nested:
        notes.append(f"nested folders read into their top-level class: {', '.join(nested)}")
    if len(classes) == 1:
        notes.append(f"a single class ({classes[0]!r}): every image gets the same label")
    return tuple(notes)


def _scan_metadata(root: Path, on_disk: list[Path], rejects: list[Reject]) -> Listing:
    rows = []
    for n, line in enumerate((root / "metadata.jsonl").read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{root}/metadata.jsonl line {n}: not JSON ({exc.msg})") from None
    if not rows or any(not isinstance(r, dict) or "file_name" not in r for r in rows):
        raise DataError(f"{root}/metadata.jsonl: every row needs a file_name")
    kept, listed = [], set()
    for row in rows:
        rel = Path(row["file_name"])
        listed.add(rel.as_posix())
        if rel.is_absolute() or ".." in rel.parts:
            rejects.append((display(rel), "metadata.jsonl names a path outside the folder"))
        elif not (root / rel).is_file():
            rejects.append((display(rel), "listed in metadata.jsonl but not found"))
        else:
            kept.append(row)
    rejects += [(display(f.relative_to(root)), "not listed in metadata.jsonl")
                for f in on_disk if f.relative_to(root).as_posix() not in listed]
    if not kept:
        raise DataError(f"{root}/metadata.jsonl: none of its {len(rows)} files exist")
    files = [root / r["file_name"] for r in kept]
    skipped = tuple(sorted(rejects))
    if all("label" in r for r in kept):
        names = [str(r["label"]) for r in kept]
    elif all(len(Path(r["file_name"]).parts) > 1 for r in kept):
        names = [Path(r["file_name"]).parts[0] for r in kept]
    else:
        return Listing(root, "flat", tuple(files), (0,) * len(files), (UNLABELLED,), skipped)
    classes = _check_classes(sorted(set(names)))
    index = {name: i for i, name in enumerate(classes)}
    return Listing(root, "imagefolder-metadata", tuple(files), tuple(index[n] for n in names),
                   classes, skipped)


def open_image(path: Path) -> Image.Image:
    """Open one file as its first frame, refusing other formats and oversized headers."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(path, formats=FORMATS)
        except UnidentifiedImageError:
            raise ValueError(f"not an image in an accepted format ({', '.join(FORMATS)})") from None
        except Image.DecompressionBombError as exc:  # Pillow's guard fired first (> 2x ours)
            raise ValueError(f"{exc.args[0].split(',')[0]} (decompression-bomb guard)") from None
    img.seek(0)
    if img.width * img.height > MAX_PIXELS:
        size = f"{img.width} x {img.height}"
        img.close()
        raise ValueError(f"{size} pixels is over the {MAX_PIXELS:,} limit (decompression-bomb guard)")
    return img


def convert(img: Image.Image, resolution: int, channels: int) -> np.ndarray:
    """One decoded image -> uint8 (channels, resolution, resolution) by the module's rules."""
    img.seek(0)
    img = ImageOps.exif_transpose(img, in_place=True) or img  # in place: no second full copy
    if img.mode == "F":
        raise ValueError("floating-point images have no fixed range to scale from")
    if img.mode in _RGB16:
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"{img.mode} pixel values outside 0..65535")
        arr = arr.astype(np.uint32)  # in place from here: peak memory stays ~3 copies of 16 bits
        arr *= 255
        arr += 32767
        arr //= 65535  # round(x * 255 / 65535): x / 257 is never exactly half-way
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "La", "RGBa"):
        canvas = Image.new("L" if img.mode in ("LA", "La") else "RGB", img.size, 0)
        canvas.paste(img, (0, 0), img)  # composite on black: colour * alpha / 255
        img = canvas
    target = "L" if channels == 1 else "RGB"
    if img.mode != target:
        img = img.convert(target)
    if img.size != (resolution, resolution):
        side = min(img.size)  # crop before resizing: a 1 x 10^6 strip never grows to 64 x 6.4 10^7
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.resize((resolution, resolution), Image.Resampling.BICUBIC,
                         box=(left, top, left + side, top + side))
    arr = np.asarray(img, dtype=np.uint8)
    return arr[None] if channels == 1 else arr.transpose(2, 0, 1)


def read(path: Path, resolution: int, channels: int) -> np.ndarray:
    """Open, check and convert one file; raises ValueError/OSError-like errors on a bad file."""
    with open_image(path) as img:
        return convert(img, resolution, channels)


def scaled(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> floats in [-1, 1] (x / 127.5 - 1): the UNet's and the classifiers' input."""
    return images.float() / 127.5 - 1.0


def reason(exc: Exception) -> str:
    """The reject reason for a decode error."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def load(listing: Listing, *, resolution: int, channels: int) -> ImageSet:
    """Decode and convert every listed file; undecodable files become rejects."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    arrays, labels, units, rejects = [], [], [], list(listing.skipped)
    for i, (path, label) in enumerate(zip(listing.files, listing.labels)):
        try:
            arrays.append(read(path, resolution, channels))
            labels.append(label)
            units.append(listing.units[i] if listing.units else i)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - any decoder failure rejects this file only
            rejects.append((display(path.relative_to(listing.root)), reason(exc)))
    if not arrays:
        raise DataError(f"{listing.root}: none of {len(listing.files)} files could be read")
    import torch

    images = torch.from_numpy(np.stack(arrays))
    return ImageSet(images, torch.tensor(labels, dtype=torch.long), listing.classes, rejects,
                    torch.tensor(units, dtype=torch.long) if listing.units else None)


def grey_only(listing: Listing) -> bool:
    """Whether every listed file is single-channel, from file headers only (no pixel is decoded)."""
    for path in listing.files:
        try:
            with open_image(path) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
                    return False
        except Exception:  # noqa: BLE001 - unreadable files are rejected later, with a reason
            continue
    return True


def survey(listing: Listing) -> dict:
    """Decode every listed file as `fit` would and describe the folder: per-class counts, formats,
    modes, sizes, exact duplicates (kept), notes and rejects. Writes nothing."""
    counts = dict.fromkeys(listing.classes, 0)
    formats: Counter[str] = Counter()
    modes: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    copies: Counter[str] = Counter()
    rejects = list(listing.skipped)
    for path, label in zip(listing.files, listing.labels):
        try:
            with open_image(path) as img:
                fmt, mode, size = img.format, img.mode, img.size
                convert(img, 8, 3)  # the checks and conversions fit applies, at a tiny size
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the same per-file rule as load()
            rejects.append((display(path.relative_to(listing.root)), reason(exc)))
            continue
        counts[listing.classes[label]] += 1
        formats[str(fmt)] += 1
        modes[mode] += 1
        sizes[f"{size[0]}x{size[1]}"] += 1
        copies[sha256_of(path)] += 1
    groups = [n for n in copies.values() if n > 1]
    accepted = sum(counts.values())
    return {"root": display(listing.root), "layout": listing.layout, "seen": listing.seen,
            "accepted": accepted, "rejected": len(rejects), "classes": counts,
            "formats": dict(formats.most_common()), "modes": dict(modes.most_common()),
            "sizes": dict(sizes.most_common()),
            "duplicates": {"groups": len(groups), "extra_copies": sum(groups) - len(groups),
                           "rule": "exact duplicates are kept: each copy counts as an image"},
            "notes": list(listing.notes),
            "rejects": [{"file": f, "reason": why} for f, why in sorted(rejects)]}


def require_clean(listing: Listing) -> None:
    """DataError if any entry would be rejected (`--strict`): decodes every file, spends nothing."""
    rejects = survey(listing)["rejects"]
    if rejects:
        shown = "; ".join(f"{r['file']}: {r['reason']}" for r in rejects[:3])
        more = f" and {len(rejects) - 3} more" if len(rejects) > 3 else ""
        raise DataError(f"--strict: {len(rejects)} of {listing.seen} entries in {display(listing.root)} "
                        f"would be rejected ({shown}{more}); list them with `privsynth inspect`")


def write_rejects(path: Path, rejects: list[Reject]) -> None:
    """`rejects.jsonl`: one {"file", "reason"} row per rejected entry (owner-side: it names files)."""
    rows = "".join(json.dumps({"file": f, "reason": why}) + "\n" for f, why in rejects)
    Path(path).write_text(rows, encoding="utf-8")
