"""Compare synthetic image sets with real images; write report.json and a self-contained report.html.

Per synthetic set ("run"; several runs make an epsilon sweep): FID and KID by clean-fid's rules,
k-NN precision/recall and, given held-out real images (`test`), memorisation scores and the
accuracy of a classifier trained on the synthetic set (downstream.py), all in one feature space;
given labelled sets, the label agreement: the share of synthetic images that a classifier trained
on the real images puts in their intended class.

Pipeline, the same for every set:
1. `data.scan`, then decoding by data.py's rules as RGB (grey repeated) at one resolution R: the
   shorter side of the synthetic sets' first images (all runs must agree). Real images are brought
   to R so every set is compared at the resolution the generator produced.
2. clean-fid's "clean" resize to the feature network's input size, batched features (fidelity.py;
   the feature spaces and why, there).
3. FID, KID (fidelity.py), k-NN precision/recall and memorisation (manifold.py) from the features;
   the classifiers (downstream.py) from the pixels.

Each image set is decoded and encoded once, in batches, and its features cached by content hash
in `cache_dir` (default `out/cache`): a second report on the same files reads them back.

Under torchrun (privsynth.distributed) the ranks take turns over each set's batches and rank 0
gathers the features in batch order (the same rows a single process gets); rank 0 alone reads
and writes the cache, computes the metrics and the classifier, and writes the report.

Privacy: every number computed from the real images is a statistic of possibly private data, made
without differential privacy. `not_covered_by_dp` lists each such field; they go to the report
folder (and `cache_dir`), never to clean-fid's package folder or the temp folder.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privsynth import __version__, distributed, downstream, manifold
from privsynth.data import Listing, grey_only, load, scan
from privsynth.downstream import ClassifierConfig, accuracy, describe, train_classifier
from privsynth.errors import DataError, UsageError
from privsynth.files import sha256_of
from privsynth.fidelity import (FEATURE_SPACES, INCEPTION_FILE, INCEPTION_URL,  # noqa: F401
                                FeatureSpace, Progress, encode, fid_from_features,
                                kid_from_features, load_feature_space)
from privsynth.report import render_html

SCHEMA = "privsynth.report/2"
CACHE_VERSION = 2  # bump when what a cache file holds changes
REPORT, HTML = "report.json", "report.html"
GRID_PER_CLASS, GRID_CLASSES = 8, 20  # sample grids in the HTML
# Per-run fields computed from the real images without DP (`not_covered`); `synthetic`,
# `privacy` (read from the DP certificate) and `notes` are not.
RUN_NOT_COVERED = ("fid", "kid", "per_class_fid", "precision", "recall", "memorisation", "utility",
                   "label_agreement")
MEMORISATION_LABEL = "computed on private data, not covered by the DP guarantee, owner only"
# Label agreement's judge: a SmallCNN trained on the --real images with downstream.py's loop, kept
# cheap (20 epochs on at most AGREEMENT_MAX_TRAIN images; about 14 s for 450 MNIST digits on one
# core, held-out accuracy 0.98 on the demo's 50 against 0.92 after 5 epochs), its epoch chosen on
# --val or on a seeded split of --real.
AGREEMENT_EPOCHS, AGREEMENT_LR, AGREEMENT_MAX_TRAIN, AGREEMENT_CHUNK = 20, 3e-3, 10_000, 1000
AGREEMENT_WHAT = ("share of synthetic images that a classifier trained on the --real images puts in "
                  "their intended (synthetic) class; chance is 1 / the number of real classes")
OWNER_ONLY = ("Every number listed in not_covered_by_dp was computed from the real images without "
              "differential privacy: this report is for the data owner only; do not publish it "
              "when the real images are private.")


@dataclass
class _Encoded:
    features: np.ndarray
    labels: np.ndarray
    rows: np.ndarray  # index into listing.files of each feature row (rejected files have none)
    rejected: int


def _cache_key(listing: Listing, resolution: int, space: FeatureSpace) -> str:
    """sha256 over every file's content hash and class, the resolution and the feature space."""
    digest = hashlib.sha256(f"{SCHEMA}|{CACHE_VERSION}|{space.name}|{space.layer}|"
                            f"{space.input_size}|{space.weights_sha256}|{resolution}\n".encode())
    for path, label in zip(listing.files, listing.labels):
        digest.update(f"{sha256_of(path)} {listing.classes[label]}\n".encode())
    return digest.hexdigest()


def read_rows(listing: Listing, resolution: int, rows: Sequence[int] | None = None,
              channels: int = 3) -> tuple[np.ndarray, torch.Tensor]:
    """(rows that decoded, their uint8 images) for `rows` of `listing` (all when None), by
    data.py's rules; files that do not decode are left out."""
    kept, images = [], []
    for i in range(len(listing.files)) if rows is None else rows:
        one = replace(listing, files=(listing.files[i],), labels=(listing.labels[i],), skipped=())
        try:
            images.append(load(one, resolution=resolution, channels=channels).images)
        except DataError:
            continue
        kept.append(i)
    empty = torch.zeros((0, channels, resolution, resolution), dtype=torch.uint8)
    return np.array(kept, dtype=np.int64), torch.cat(images) if images else empty


def _encode_listing(listing: Listing, resolution: int, space: FeatureSpace, *, batch_size: int,
                    device: str, progress: Progress | None, what: str) -> _Encoded | None:
    """Decode and encode in batches (memory ~ one batch of images), keeping each row's file.

    Under torchrun, rank r encodes batches r, r + world, ...; rank 0 gathers each round in rank
    order (so in batch order) and returns the whole; the other ranks return None."""
    parts, total, world = [], len(listing.files), distributed.world()
    starts = range(0, total, batch_size)
    for first in range(0, len(starts), world):
        part = None
        if first + distributed.rank() < len(starts):
            start = starts[first + distributed.rank()]
            kept, images = read_rows(listing, resolution, range(start, min(start + batch_size, total)))
            if len(kept):
                part = (kept, encode(images, space, batch_size=batch_size, device=device))
        parts += [p for p in distributed.gather(part) or [] if p is not None]
        if progress:
            progress(f"features of {what}", min((first + world) * batch_size, total), total)
    return distributed.on_main(_merged, listing, parts, send=lambda _: None)


def _merged(listing: Listing, parts: list[tuple[np.ndarray, np.ndarray]]) -> _Encoded:
    """One set's (rows, features) batches joined in order."""
    if not parts:
        raise DataError(f"{listing.root}: none of {len(listing.files)} files could be read")
    rows = np.concatenate([p[0] for p in parts])
    labels = np.array(listing.labels, dtype=np.int64)[rows]
    return _Encoded(np.concatenate([p[1] for p in parts]), labels, rows,
                    len(listing.files) - len(rows))


def _features_of(listing: Listing, resolution: int, space: FeatureSpace, cache_dir: Path | None,
                 encode_kw: dict) -> tuple[_Encoded | None, bool]:
    """Features of one image set, from `cache_dir` when present there; (result, was cached).
    Under torchrun the result is rank 0's; the other ranks get None."""
    path = None
    if cache_dir is not None:  # hashing every file: rank 0's job
        path = distributed.on_main(lambda: Path(cache_dir) / (
            f"{_cache_key(listing, resolution, space)}.safetensors"))
    if path is not None and distributed.on_main(path.is_file):
        return distributed.on_main(_read_cache, path, send=lambda _: None), True
    found = _encode_listing(listing, resolution, space, **encode_kw)
    if path is not None:
        distributed.on_main(_write_cache, path, found)
    return found, False


def _read_cache(path: Path) -> _Encoded:
    from safetensors.numpy import load_file

    saved = load_file(path)
    return _Encoded(saved["features"], saved["labels"], saved["rows"], int(saved["rejected"][0]))


def _write_cache(path: Path, found: _Encoded) -> None:
    """Private statistics: a folder only its owner reads, written atomically."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    partial = path.with_suffix(".partial")
    save_file({"features": found.features, "labels": found.labels, "rows": found.rows,
               "rejected": np.array([found.rejected])}, str(partial))
    os.replace(partial, path)


def _resolution(listing: Listing) -> int:
    """The shorter side of the set's first image (header only)."""
    try:
        with Image.open(listing.files[0]) as img:
            return min(img.size)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read the first image {listing.files[0]} to fix the resolution: "
                        f"{exc}") from None


def _set_entry(listing: Listing, found: _Encoded) -> dict:
    counts = np.bincount(found.labels, minlength=len(listing.classes))
    return {"path": str(listing.root), "images": len(found.features), "rejected": found.rejected,
            "layout": listing.layout, "classes": dict(zip(listing.classes, counts.tolist()))}


def _versions(space: FeatureSpace) -> dict:
    names = ["clean-fid", "torch", "numpy", "pillow"]
    names += ["efficientnet-lite-pytorch"] if space.name == "efficientnet-lite0" else []
    return {"privsynth": __version__, **{n: metadata.version(n) for n in names}}


class _Sets:
    """Features of every image set of one evaluation, each encoded once (or read from the cache)."""

    def __init__(self, resolution: int, space: FeatureSpace, cache_dir: Path | None, kw: dict):
        self.resolution, self.space, self.cache_dir, self.kw = resolution, space, cache_dir, kw
        self.encoded, self.seconds = 0, 0.0

    def __call__(self, listing: Listing, what: str) -> _Encoded | None:
        """The set's features (None on torchrun ranks other than 0, which encode their share)."""
        t0 = time.perf_counter()
        found, cached = _features_of(listing, self.resolution, self.space, self.cache_dir,
                                     {**self.kw, "what": what})
        if found is not None and not cached:
            self.encoded += len(found.features)
            self.seconds += time.perf_counter() - t0
        distributed.on_main(_at_least_two, found, listing, what)
        return found

    def throughput(self) -> float | None:
        """Images/s (decode + resize + network) over the sets actually encoded; None if none."""
        return round(self.encoded / self.seconds, 2) if self.encoded else None


def _at_least_two(found: _Encoded, listing: Listing, what: str) -> None:
    if len(found.features) < 2:
        raise DataError(f"{what} {listing.root}: FID needs at least 2 readable images")


def _fidelity(syn: _Encoded, rea: _Encoded, a: Listing, b: Listing, k: int) -> dict:
    """fid, kid, per_class_fid where it applies, precision/recall, notes."""
    if k >= min(len(syn.features), len(rea.features)):
        raise UsageError(f"--k {k} needs more than {k} readable images in each set (synthetic "
                         f"{a.root}: {len(syn.features)}, real: {len(rea.features)})")
    out = {"fid": fid_from_features(syn.features, rea.features),
           "kid": kid_from_features(syn.features, rea.features),
           **manifold.precision_recall(rea.features, syn.features, k=k),
           "notes": [f"FID is biased upwards at small image counts: compare reports only at equal "
                     f"counts ({len(syn.features)} synthetic, {len(rea.features)} real here)"]}
    n = len(b.classes)
    if (a.labelled and b.labelled and a.classes == b.classes
            and min(np.bincount(s.labels, minlength=n).min() for s in (syn, rea)) >= 2):
        out["per_class_fid"] = {name: fid_from_features(syn.features[syn.labels == c],
                                                        rea.features[rea.labels == c])
                                for c, name in enumerate(b.classes)}
    else:
        out["notes"].append("no per_class_fid: it needs both sets labelled with the same class "
                            "names and at least 2 images per class in each")
    return out


def _memorisation(syn: _Encoded, rea: _Encoded, hold: _Encoded, a: Listing, b: Listing) -> dict:
    """manifold.memorisation with the closest pairs named by file (relative to their roots)."""
    mem = manifold.memorisation(syn.features, rea.features, hold.features)
    for pair in mem["closest"]:
        pair["synthetic_row"], pair["private_row"] = (int(syn.rows[pair.pop("synthetic")]),
                                                      int(rea.rows[pair.pop("private")]))
        pair["synthetic_file"] = a.files[pair["synthetic_row"]].relative_to(a.root).as_posix()
        pair["private_file"] = b.files[pair["private_row"]].relative_to(b.root).as_posix()
    return {"label": MEMORISATION_LABEL, "reference": "the --real images",
            "holdout": "the --test images", "space": "feature space (Euclidean)", **mem}


def _pixels(listing: Listing, rows: Sequence[int] | None, resolution: int, channels: int,
            classes: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `rows` of `listing` that decode, with labels indexing `classes` by class name."""
    index = {name: i for i, name in enumerate(classes)}
    kept, images = read_rows(listing, resolution, rows, channels)
    labels = [index[listing.classes[listing.labels[r]]] for r in kept.tolist()]
    return images, torch.tensor(labels, dtype=torch.long)


def _judges(other: Listing | None, real: Listing) -> bool:
    """Whether `other` is labelled with class names the real-trained classifier knows."""
    return other is not None and other.labelled and set(other.classes) <= set(real.classes)


def _train_judge(real: Listing, val: Listing | None, test: Listing | None, resolution: int,
                 config: ClassifierConfig, progress: Progress | None) -> dict:
    """The label-agreement classifier: downstream.train_classifier on the --real images (at most
    AGREEMENT_MAX_TRAIN, a seeded choice), its epoch chosen on --val when that is labelled with
    real class names, else on a seeded VAL_FRACTION split of --real left out of training; its
    held-out accuracy on --test when labelled likewise (never used to choose), else on that
    validation set. {"model", "channels", "entry"}, or {"skipped": why}."""
    channels = 1 if grey_only(real) else 3
    order = torch.randperm(len(real.files),
                           generator=torch.Generator().manual_seed(config.seed)).numpy()
    if _judges(val, real):
        train_rows = order[:AGREEMENT_MAX_TRAIN]
        vx, vy = _pixels(val, None, resolution, channels, real.classes)
        chosen_on = "the --val images"
    else:
        cut = max(1, round(downstream.VAL_FRACTION * len(order)))
        train_rows = order[cut:cut + AGREEMENT_MAX_TRAIN]
        vx, vy = _pixels(real, np.sort(order[:cut]), resolution, channels, real.classes)
        chosen_on = (f"a seeded {downstream.VAL_FRACTION:.0%} split of the --real images (seed "
                     f"{config.seed}) left out of training")
    x, y = _pixels(real, np.sort(train_rows), resolution, channels, real.classes)
    if len(x) < 1 or len(vx) < 1:
        return {"skipped": "no label_agreement: too few readable --real images to train and "
                           "validate its classifier"}
    recipe = replace(config, epochs=AGREEMENT_EPOCHS, lr=AGREEMENT_LR,
                     batch_size=min(config.batch_size, max(16, len(x) // 32)))
    say = (lambda what, done, total: progress(f"label-agreement {what}", done, total)
           ) if progress else None
    model, curve = train_classifier(x, y, vx, vy, classes=len(real.classes), config=recipe,
                                    progress=say)
    best = int(np.argmax(curve))  # the first best epoch, the one train_classifier kept
    entry = {"trained_on": "the --real images", "train_images": len(x),
             "selected_epoch": best + 1, "selected_on": chosen_on, "validation_images": len(vx),
             "validation_accuracy": curve[best], "validation_curve": curve}
    if _judges(test, real):
        tx, ty = _pixels(test, None, resolution, channels, real.classes)
        entry |= {"held_out_accuracy": accuracy(model, tx, ty), "held_out_images": len(tx),
                  "held_out_on": "the --test images (never used to choose)"}
    else:
        entry |= {"held_out_accuracy": curve[best], "held_out_images": len(vx),
                  "held_out_on": f"{chosen_on} (it also chose the epoch: slightly optimistic)"}
    entry |= {"resolution": resolution, "channels": channels,
              "architecture": describe(channels, len(real.classes), recipe.width),
              "recipe": {**recipe.to_dict(), "optimizer": "Adam, cosine learning-rate decay per "
                         "step", "loss": "cross-entropy", "augmentation": "none"}}
    return {"model": model, "channels": channels, "entry": entry}


def _label_agreement(listing: Listing, real: Listing, resolution: int, opts: dict) -> dict:
    """Share of the synthetic images the real-trained classifier puts in their own class, overall
    and per class; {"skipped": why} when the labels or options do not allow it."""
    config = opts["classifier"]
    if config is None or config.epochs < 1:
        return {"skipped": "no label_agreement: the classifier was switched off"}
    if not listing.labelled or not real.labelled:
        return {"skipped": "no label_agreement: it needs both the synthetic and the --real set "
                           "labelled (the " + ("synthetic" if not listing.labelled else "--real")
                           + " set is unlabelled)"}
    if len(real.classes) < 2:
        return {"skipped": "no label_agreement: the --real set has a single class"}
    missing = sorted(set(listing.classes) - set(real.classes))
    if missing:
        return {"skipped": f"no label_agreement: synthetic classes {missing} are not --real "
                           f"classes (class names must match)"}
    judge = opts["judge"]()
    if "skipped" in judge:
        return judge
    correct, count = np.zeros(len(real.classes)), np.zeros(len(real.classes), dtype=np.int64)
    for start in range(0, len(listing.files), AGREEMENT_CHUNK):  # memory: one chunk of pixels
        rows = range(start, min(start + AGREEMENT_CHUNK, len(listing.files)))
        x, y = _pixels(listing, rows, resolution, judge["channels"], real.classes)
        for c in y.unique().tolist():
            mine = y == c
            n = int(mine.sum())
            correct[c] += round(accuracy(judge["model"], x[mine], y[mine]) * n)
            count[c] += n
    if not count.sum():
        return {"skipped": "no label_agreement: no synthetic image could be read"}
    per_class = {real.classes[c]: {"agreement": float(correct[c] / count[c]),
                                   "images": int(count[c])} for c in np.flatnonzero(count).tolist()}
    return {"agreement": float(correct.sum() / count.sum()), "what": AGREEMENT_WHAT,
            "chance": 1 / len(real.classes), "images": int(count.sum()), "per_class": per_class,
            "classifier": judge["entry"]}


def _privacy_of(folder: Path) -> dict | None:
    """epsilon/delta from the certificate.json that `privsynth sample` copies into its dataset."""
    try:
        cert = json.loads((Path(folder) / "certificate.json").read_text(encoding="utf-8"))
        return {"epsilon": float(cert["epsilon"]["spent"]), "delta": float(cert["delta"]),
                "accountant": cert.get("accountant")}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def not_covered(report: dict) -> list[str]:
    """The report fields computed from real images without DP (dotted paths, runs[i].key)."""
    paths = [key for key in ("real", "test", "val") if key in report]
    for i, run in enumerate(report["runs"]):
        paths += [f"runs[{i}].{key}" for key in RUN_NOT_COVERED if key in run]
    return paths


def _run(listing: Listing, syn: _Encoded, sets: _Sets, real: tuple[Listing, _Encoded],
         test: tuple[Listing, _Encoded] | None, val: Listing | None, opts: dict) -> dict:
    """Every metric of one synthetic set."""
    run = {"name": opts["names"][listing.root], "privacy": _privacy_of(listing.root),
           "synthetic": _set_entry(listing, syn),
           **_fidelity(syn, real[1], listing, real[0], opts["k"])}
    agreement = _label_agreement(listing, real[0], sets.resolution, opts)
    if "skipped" in agreement:
        run["notes"].append(agreement["skipped"])
    else:
        run["label_agreement"] = agreement
    if test is None:
        run["notes"].append("no memorisation or utility: they need --test (real images held out "
                            "from the private training images)")
        return run
    run["memorisation"] = _memorisation(syn, real[1], test[1], listing, real[0])
    if opts["classifier"] is None or opts["classifier"].epochs < 1:
        run["notes"].append("no utility: the classifier was switched off")
    else:
        found = downstream.utility(listing, test[0], val, resolution=sets.resolution,
                                   config=opts["classifier"], progress=opts["progress"])
        if "skipped" in found:
            run["notes"].append(found["skipped"])
        else:
            run["utility"] = found
    return run


def _gallery(report: dict, runs: list[Listing], real: Listing, resolution: int) -> dict:
    """The images the HTML shows: per-class grids of each set and the closest memorisation pairs."""
    def grids(listing: Listing) -> dict[str, np.ndarray]:
        labels = np.array(listing.labels)
        return {name: read_rows(listing, resolution, np.flatnonzero(labels == c)[:GRID_PER_CLASS]
                                )[1].numpy() for c, name in enumerate(listing.classes[:GRID_CLASSES])}

    pairs = [[(read_rows(listing, resolution, [p["synthetic_row"]])[1][0].numpy(),
               read_rows(real, resolution, [p["private_row"]])[1][0].numpy())
              for p in run.get("memorisation", {}).get("closest", [])]
             for listing, run in zip(runs, report["runs"])]
    return {"real": grids(real), "runs": [grids(s) for s in runs], "pairs": pairs}


def evaluate(synthetic: Path | Sequence[Path], real: Path, out: Path, *, test: Path | None = None,
             val: Path | None = None, feature_space: str = "efficientnet-lite0",
             inception_weights: Path | None = None, cache_dir: Path | None = None, k: int = 3,
             classifier: ClassifierConfig | None = ClassifierConfig(), device: str = "cpu",
             batch_size: int = 100, progress: Progress | None = None,
             overwrite: bool = False) -> dict | None:
    """Compare one or more synthetic sets with `real` (and `test`): write `out/report.json` and
    `out/report.html` and return the report. Features are cached in `cache_dir` (default
    `out/cache`), keyed by file contents. Under torchrun every rank calls this and encodes its
    share of each set; rank 0 does the rest and returns the report, the other ranks None."""
    start = time.perf_counter()
    out = Path(out)
    distributed.on_main(_check_request, out, overwrite, batch_size, k)
    synthetic = [Path(synthetic)] if isinstance(synthetic, (str, Path)) else [Path(s) for s in synthetic]
    runs = [scan(s) for s in synthetic]  # reads no pixel: fails fast
    listings = {"real": scan(real), **({"test": scan(test)} if test else {}),
                **({"val": scan(val)} if val else {})}
    resolutions = {s.root: _resolution(s) for s in runs}
    if len(set(resolutions.values())) > 1:
        raise UsageError(f"the synthetic sets have different resolutions ({resolutions}): "
                         f"evaluate them separately")
    resolution = resolutions[runs[0].root]
    space = load_feature_space(feature_space, inception_weights=inception_weights, device=device)
    sets = _Sets(resolution, space, out / "cache" if cache_dir is None else Path(cache_dir),
                 {"batch_size": batch_size, "device": device, "progress": progress})
    real_found = sets(listings["real"], "real images")
    test_found = sets(listings["test"], "test images") if test else None
    syn_found = [sets(s, f"synthetic images {s.root.name}") for s in runs]
    if not distributed.is_main():
        return None  # its share of the features was all this rank had to do
    names = {s.root: s.root.name for s in runs}  # folder names, or paths where those repeat
    if len(set(names.values())) < len(runs):
        names = {s.root: str(s.root) for s in runs}
    opts = {"k": k, "classifier": classifier, "progress": progress, "names": names,
            "judge": functools.cache(lambda: _train_judge(  # trained once, when a run needs it
                listings["real"], listings.get("val"), listings.get("test"), resolution,
                classifier, progress))}
    report = {"schema": SCHEMA, "feature_space": space.describe(), "resolution": resolution,
              "real": _set_entry(listings["real"], real_found)}
    if test:
        report["test"] = _set_entry(listings["test"], test_found)
    if val:
        report["val"] = {"path": str(val), "images": len(listings["val"].files),
                         "classes": list(listings["val"].classes)}
    report["runs"] = [_run(s, found, sets, (listings["real"], real_found),
                           (listings["test"], test_found) if test else None, listings.get("val"),
                           opts) for s, found in zip(runs, syn_found)]
    report |= {"not_covered_by_dp": [], "privacy_note": OWNER_ONLY, "versions": _versions(space),
               "throughput_images_per_s": sets.throughput()}
    report["not_covered_by_dp"] = not_covered(report)
    report["wall_time_s"] = round(time.perf_counter() - start, 3)
    html = render_html(report, _gallery(report, runs, listings["real"], resolution))
    _write(out / REPORT, json.dumps(report, indent=2) + "\n")
    _write(out / HTML, html)
    return report


def _check_request(out: Path, overwrite: bool, batch_size: int, k: int) -> None:
    """UsageError before any image is read."""
    if (out / REPORT).exists() and not overwrite:
        raise UsageError(f"{out / REPORT} already exists: choose another --out or remove it")
    if batch_size < 1 or k < 1:
        raise UsageError(f"batch_size and k must be >= 1, got {batch_size} and {k}")


def _write(path: Path, text: str) -> None:
    """Write atomically: a crash never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)
