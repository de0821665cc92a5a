"""Publish a synthetic image set as a folder that torchvision and Hugging Face both read unchanged.

Layout of `out/`:
    <class>/<index:06d>.png   one PNG per image, no text/EXIF chunks; `index` is its row in `images`
    metadata.jsonl            {"file_name": "<class>/<index>.png", "label": "<class>"} per image
    classes.json              every class name, in class-index order (empty classes included)
    certificate.json          the privacy certificate, as given
    README.md                 a dataset card: YAML header (license, Hugging Face ClassLabel
                              features in class-index order), method, epsilon, delta, counts
    MANIFEST.sha256           `sha256sum -c` format, every other file, sorted by path

The folder appears all at once: it is written under a hidden sibling `.<name>.partial-<hex>` and
renamed to `out` only when complete, so a crash never leaves a half dataset under the real name.
Only classes with at least one image get a folder (torchvision refuses empty class folders), so
`ImageFolder`'s indices (sorted folder names) can differ from the model's and from a real test set's:
`classes.json` and the card's ClassLabel block keep the true order, and the card lists every class
with its count, zeros included.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privsynth import __version__, manifest
from privsynth.errors import UsageError

MANIFEST = manifest.MANIFEST
METADATA = "metadata.jsonl"
CLASSES = "classes.json"
CERTIFICATE = "certificate.json"
CARD = "README.md"
RESERVED = {MANIFEST, METADATA, CLASSES, CERTIFICATE, CARD}
# The card's `license:` unless the card dict names one: the images are the data owner's to
# license (privsynth's own Apache-2.0 does not cover what it generates), so the default says so.
DEFAULT_LICENSE = "other"
# PIL's default. Measured on 10k MNIST digits: level 1 writes ~2x faster for 3% larger files,
# level 9 saves 1% more and is slower.
PNG_COMPRESS_LEVEL = 6


def write_dataset(
    out: Path,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    *,
    certificate: dict,
    card: dict,
    replace: bool = False,
) -> Path:
    """Write images, metadata, class list, certificate, card and manifest to a new folder `out`;
    return it. `replace`: `out` may also be a dataset folder written here before (see
    `is_dataset`); it is swapped for the new one only once the new one is complete."""
    out = Path(out)
    pixels, label_list = _check_arrays(images, labels, len(classes))
    classes = _check_classes(classes)
    _check_target(out, replace)
    cert_text = json.dumps(certificate, indent=2, sort_keys=True, allow_nan=False) + "\n"
    card_text = render_card(card, classes, np.bincount(label_list, minlength=len(classes)))
    classes_text = json.dumps(list(classes), ensure_ascii=False) + "\n"
    with atomic_folder(out, replace=replace) as partial:
        digests = _write_images(partial, pixels, label_list, classes)
        for name, text in ((CLASSES, classes_text), (CERTIFICATE, cert_text), (CARD, card_text)):
            digests[name] = _write_bytes(partial / name, text.encode("utf-8"))
        manifest.write(partial, digests)
    return out


@contextmanager
def atomic_folder(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new hidden sibling of `out` to fill; rename it to `out` when the block succeeds,
    delete it when it fails. `out` must not exist or be an empty folder (never overwritten), or,
    with `replace`, be a dataset folder (`is_dataset`): that one is moved aside and deleted only
    after the new folder is complete."""
    out = Path(out)
    _check_target(out, replace)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    partial.mkdir()  # a plain mkdir, not mkdtemp, so the folder gets the user's umask, not 0700
    try:
        yield partial
        old = None
        if replace and out.is_dir() and any(out.iterdir()):
            _check_target(out, replace)  # still a dataset folder after the (long) writing
            old = out.parent / f".{out.name}.replaced-{secrets.token_hex(4)}"
            out.rename(old)
        try:
            _publish(partial, out)
        except BaseException:
            if old is not None:
                old.rename(out)  # put the previous dataset back
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def is_dataset(folder: Path) -> bool:
    """Whether `folder` looks like a dataset folder `write_dataset` wrote: its manifest,
    metadata, class list and certificate are there (what `--overwrite` may replace)."""
    folder = Path(folder)
    return not folder.is_symlink() and all(
        (folder / name).is_file() for name in (MANIFEST, METADATA, CLASSES, CERTIFICATE))


def verify_manifest(folder: Path) -> list[str]:
    """Problems found checking `folder` against its MANIFEST.sha256; empty when all is well."""
    folder = Path(folder)
    return manifest.verify(folder, (p for p in folder.rglob("*") if p.is_file()))


def render_card(card: dict, classes: Sequence[str], counts: Sequence[int]) -> str:
    """The dataset card (README.md): facts from `card` (method, epsilon, delta) and the counts."""
    missing = [key for key in ("method", "epsilon", "delta") if key not in card]
    if missing:
        raise ValueError(f"card needs {', '.join(missing)}")
    eps, delta = card["epsilon"], card["delta"]
    rows = "\n".join(f"| {name} | {int(count)} |" for name, count in zip(classes, counts))
    facts = {"method", "epsilon", "delta", "images", "classes", "license"}  # not repeated below
    extra = "".join(f"- {k}: {v}\n" for k, v in sorted(card.items()) if k not in facts)
    license_id = card.get("license", DEFAULT_LICENSE)
    return f"""---
license: {_yaml_scalar(license_id)}
tags: [synthetic, differential-privacy, privsynth]
task_categories: [image-classification]
{_features_yaml(classes)}---
# Synthetic image dataset ({card["method"]}, ε = {eps:g}, δ = {delta:g})

Every image in this folder is **synthetic**: drawn from a generative model trained with
{card["method"]} under ({eps:g}, {delta:g})-differential privacy with respect to its private
training images. Differential privacy bounds how much any one private training image can change
what was released; the images, labels and class counts here are computed from that trained model
(and any public data it used), so the guarantee covers all of them. It says nothing about the public data.
`certificate.json` records how the budget was spent; `privsynth verify <this folder>` recomputes ε
from it and checks every file against `MANIFEST.sha256`.

- method: {card["method"]}
- epsilon: {eps:g}
- delta: {delta:g}
- images: {int(sum(counts))}
- classes: {len(classes)}
- created by: privsynth {__version__}
{extra}
| class | images |
|---|---|
{rows}

Layout: `<class>/<index>.png` (torchvision `ImageFolder`), `metadata.jsonl` (Hugging Face
`imagefolder`), `classes.json` (every class name in class-index order) and `MANIFEST.sha256`
(check with `sha256sum -c MANIFEST.sha256`). Classes with no image get no folder, so
`ImageFolder`'s indices can differ from the class order above and from a real test set's: map
labels through `classes.json`. `datasets.load_dataset("<this folder>")` reads `label` as the
ClassLabel declared in this card's header, in that order.
{_license_note(license_id, card)}"""


def _license_note(license_id: str, card: dict) -> str:
    if "license" in card:
        return f"\nLicense: {license_id}.\n"
    return ("\nLicense: not set (`license: other`). The data owner decides how these images may be "
            "used;\nset the header's `license:` before publishing.\n")


def _yaml_string(text: str) -> str:
    """`text` as a YAML double-quoted scalar (JSON's escapes are valid YAML)."""
    return json.dumps(str(text), ensure_ascii=False)


def _yaml_scalar(text: str) -> str:
    """A license id as the Hub writes it (`apache-2.0`, `other`), quoted only when it must be."""
    return text if re.fullmatch(r"[a-z0-9][a-z0-9.+-]*", text) else _yaml_string(text)


def _features_yaml(classes: Sequence[str]) -> str:
    """The Hugging Face features (image, ClassLabel in class-index order), twice: `dataset_info`
    describes the data on the Hub, and the default config's `features` makes
    `datasets.load_dataset(folder)` apply it (a folder loader ignores `dataset_info`)."""
    names = "".join(f"          '{i}': {_yaml_string(name)}\n" for i, name in enumerate(classes))
    features = ("  features:\n  - name: image\n    dtype: image\n  - name: label\n    dtype:\n"
                "      class_label:\n        names:\n" + names)
    return "dataset_info:\n" + features + "configs:\n- config_name: default\n" + features


def _check_arrays(
    images: torch.Tensor, labels: torch.Tensor, n_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        got = f"{images.dtype} {tuple(images.shape)}"
        raise ValueError(f"images must be uint8 (N, 1|3, H, W), got {got}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must be ({images.shape[0]},), got {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise UsageError("nothing to publish: 0 images")
    label_list = labels.detach().cpu().to(torch.int64).numpy()
    if label_list.min() < 0 or label_list.max() >= n_classes:
        got = f"{label_list.min()}..{label_list.max()}"
        raise ValueError(f"labels must lie in [0, {n_classes}), got {got}")
    return images.detach().cpu().numpy(), label_list


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for name in classes:
        if not isinstance(name, str) or not name or name in (".", "..") or name.startswith("."):
            raise UsageError(f"class name {name!r} cannot be a folder name (empty, '.' or hidden)")
        if any(ch in name for ch in "/\\") or not name.isprintable() or len(name.encode()) > 255:
            raise UsageError(f"class name {name!r} cannot be a folder name "
                             "(path separator, control character, or over 255 bytes)")
        if name in RESERVED:
            raise UsageError(f"class name {name!r} would collide with the file {name}")
        if name.casefold() in seen:  # two folders differing only in case merge on macOS and Windows
            other = seen[name.casefold()]
            raise UsageError(f"class names {other!r} and {name!r} differ only in case")
        seen[name.casefold()] = name
    return tuple(classes)


def check_new(out: Path, *, replace: bool = False) -> None:
    """UsageError unless `out` is absent or an empty folder (outputs are never overwritten), or,
    with `replace`, a dataset folder (`is_dataset`)."""
    _check_target(Path(out), replace)


def move_into_place(folder: Path, out: Path) -> None:
    """Rename a complete `folder` to `out` in one step (same file system)."""
    _check_target(Path(out))
    _publish(Path(folder), Path(out))


def _check_target(out: Path, replace: bool = False) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UsageError(f"{out} already exists and is not a folder; refusing to overwrite it")
    if out.is_dir() and any(out.iterdir()):
        if not replace:
            raise UsageError(f"{out} already exists and is not empty; refusing to overwrite it "
                             "(choose a new --out)")
        if not is_dataset(out):
            raise UsageError(f"{out} is not a dataset folder written by `privsynth sample` (no "
                             f"{MANIFEST}, {METADATA}, {CLASSES} and {CERTIFICATE}); --overwrite "
                             "replaces only those")


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def _write_images(
    folder: Path, pixels: np.ndarray, labels: np.ndarray, classes: Sequence[str]
) -> dict[str, str]:
    digests, rows = {}, []
    for label in np.unique(labels):
        (folder / classes[label]).mkdir()
    for index, (pixel, label) in enumerate(zip(pixels, labels)):
        rel = f"{classes[label]}/{index:06d}.png"
        buffer = io.BytesIO()
        # HW -> "L", HWC -> "RGB". A fresh image carries no info dict, so PIL writes IHDR/IDAT/IEND
        # only; transposing one image at a time avoids a second copy of the whole set.
        array = pixel[0] if pixel.shape[0] == 1 else np.ascontiguousarray(pixel.transpose(1, 2, 0))
        Image.fromarray(array).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        digests[rel] = _write_bytes(folder / rel, buffer.getvalue())
        rows.append(json.dumps({"file_name": rel, "label": classes[label]}, ensure_ascii=False))
    digests[METADATA] = _write_bytes(folder / METADATA, ("\n".join(rows) + "\n").encode("utf-8"))
    return digests


def _publish(partial: Path, out: Path) -> None:
    # rename(2) is atomic and replaces only an empty folder, so a racing writer is never clobbered.
    try:
        partial.rename(out)
    except OSError as exc:
        raise UsageError(f"cannot publish to {out}: {exc.strerror or exc}") from None
