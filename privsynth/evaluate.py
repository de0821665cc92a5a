"""Compare a synthetic image set with real images: FID and KID by clean-fid's rules, one report.json.

Pipeline, the same for both sets:
1. `data.scan` + `data.load` as RGB (grey repeated) at one resolution R: the shorter side of the
   synthetic set's first image. Real images are brought to R (shorter side, centre crop) so both
   sets are compared at the resolution the generator produced; when both sets already are R x R
   nothing is resized here (data.py's colour rules still apply: EXIF, alpha on black, 16-bit).
2. clean-fid's "clean" resize (PIL bicubic on float channels, no re-quantisation) to the feature
   network's input size, then batched features under `torch.no_grad()`.
3. FID by clean-fid's Fréchet formula (solved differently, see `frechet_distance`), KID by
   `cleanfid.fid.kernel_distance` with a fixed seed.

Feature spaces: "inception" is clean-fid's InceptionV3 (pool3, 2048-d, 299 px): the only one whose
numbers compare with published FIDs. "efficientnet-lite0" (the offline default) is the global
average pool of EfficientNet-Lite0's head (1280-d, 224 px): the penultimate layer of an ImageNet
classifier at its native size, as pool3 is for Inception. It is deliberately not the multi-stage
embedding that dp-mepf trains against, which would grade the generator on its own objective.

Privacy: every number computed from the real images is a statistic of possibly private data, made
without differential privacy. It goes to `out/report.json` (and, only if asked, to `cache_dir`),
never to clean-fid's package folder or the temp folder.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from privsynth import __version__
from privsynth.data import Listing, load, scan
from privsynth.errors import DataError, MissingResourceError, UsageError
from privsynth.features import EFFICIENTNET_LITE0_SHA256, load_encoder, sha256_of

Progress = Callable[[str, int, int], None]

SCHEMA = "privsynth.report/1"
REPORT = "report.json"
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://github.com/GaParmar/clean-fid/releases/download/v0.1.10/inception-2015-12-05.pt"
FEATURE_SPACES = ("efficientnet-lite0", "inception")
KID_SUBSETS = 100  # clean-fid's defaults; each subset also gives one sample for the std
KID_SUBSET_SIZE = 1000
KID_SEED = 0  # kernel_distance draws subsets from numpy's global RNG: seeded so reports repeat
OWNER_ONLY = ("Every number listed in not_covered_by_dp was computed from the real images without "
              "differential privacy: this report is for the data owner only; do not publish it "
              "when the real images are private.")
NOT_INCEPTION = ("not comparable with Inception FID from papers or leaderboards: compare only with "
                 "reports in the same feature space, at the same image counts")


@dataclass(frozen=True)
class FeatureSpace:
    """A frozen feature network with clean-fid's preprocessing: uint8 images -> feature rows."""

    name: str
    layer: str
    input_size: int
    weights_sha256: str
    net: Callable[[torch.Tensor], torch.Tensor]  # float (N, 3, S, S) in [0, 255] -> (N, dim)

    @property
    def is_inception(self) -> bool:
        """Whether numbers in this space compare with published (clean-fid) Inception FIDs."""
        return self.name == "inception"

    def describe(self) -> dict:
        """The report's `feature_space` entry."""
        out = {"name": self.name, "is_inception": self.is_inception, "layer": self.layer,
               "input_size": self.input_size, "resize": "clean-fid PIL bicubic, float (mode='clean')",
               "weights_sha256": self.weights_sha256}
        if not self.is_inception:
            out["note"] = NOT_INCEPTION
        return out


def load_feature_space(name: str, *, inception_weights: Path | None = None,
                       device: str = "cpu") -> FeatureSpace:
    """The feature space called `name` ('efficientnet-lite0' or 'inception'), loaded on `device`."""
    if name == "efficientnet-lite0":
        # channels_last: same numbers, ~40% faster depthwise convolutions on CPU (measured).
        net = load_encoder(name, input_size=224).net.to(device, memory_format=torch.channels_last)

        def head_pool(x: torch.Tensor) -> torch.Tensor:  # the package's (x*255 - 127)/128 on [0, 255]
            x = ((x - 127.0) / 128.0).contiguous(memory_format=torch.channels_last)
            return net.extract_features(x).mean(dim=(2, 3))
        return FeatureSpace(name, "head global average pool (1280)", 224, EFFICIENTNET_LITE0_SHA256,
                            head_pool)
    if name == "inception":
        model, path = _inception(inception_weights)
        model = model.to(device)
        return FeatureSpace(name, "pool3 (2048), clean-fid torchscript", 299, sha256_of(path), model)
    raise UsageError(f"unknown feature space {name!r}: use one of {', '.join(FEATURE_SPACES)}")


def _inception_help(problem: str) -> str:
    return (f"{problem}. Download {INCEPTION_FILE} from {INCEPTION_URL} and pass its folder or the "
            f"file itself with --inception-weights (library: inception_weights=PATH)")


def _inception(weights: Path | None) -> tuple[torch.nn.Module, Path]:
    with warnings.catch_warnings():  # torch 2.x calls torch.jit.load (clean-fid's loader) deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return _load_inception(weights)


def _load_inception(weights: Path | None) -> tuple[torch.nn.Module, Path]:
    from cleanfid.inception_torchscript import InceptionV3W

    if weights is None:  # asked for inception without a file: clean-fid's own download location
        folder = Path("./" if platform.system() == "Windows" else "/tmp")
        try:
            return InceptionV3W(str(folder), download=True), folder / INCEPTION_FILE
        except (urllib.error.URLError, OSError) as exc:
            raise MissingResourceError(_inception_help(f"could not download the Inception weights "
                                                       f"({type(exc).__name__}: {exc})")) from exc
        except RuntimeError as exc:  # a partial download left behind by an earlier failure
            raise MissingResourceError(_inception_help(f"{folder / INCEPTION_FILE} is not a "
                                                       f"TorchScript file (delete it)")) from exc
    weights = Path(weights).expanduser()
    if weights.is_file() and weights.name != INCEPTION_FILE:
        raise UsageError(f"clean-fid loads the Inception weights by file name: rename or link "
                         f"{weights} to {INCEPTION_FILE}")
    path = weights if weights.is_file() else weights / INCEPTION_FILE
    if not path.is_file():
        raise MissingResourceError(_inception_help(f"Inception weights not found: {path}"))
    try:
        return InceptionV3W(str(path.parent), download=False), path
    except RuntimeError as exc:
        raise MissingResourceError(_inception_help(f"{path} is not the TorchScript Inception "
                                                   f"file ({exc})")) from exc


def encode(images: torch.Tensor, space: FeatureSpace, *, batch_size: int = 100, device: str = "cpu",
           progress: Progress | None = None, what: str = "images") -> np.ndarray:
    """uint8 (N, 3, H, W) -> float64 (N, dim) features, after clean-fid's resize, in batches."""
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (space.input_size, space.input_size))
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size].permute(0, 2, 3, 1).numpy()
            x = torch.from_numpy(np.stack([resize(im) for im in batch]).transpose(0, 3, 1, 2))
            rows.append(space.net(x.to(device)).double().cpu().numpy())
            if progress:
                progress(f"features of {what}", min(start + batch_size, len(images)), len(images))
    return np.concatenate(rows)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)): clean-fid's formula, by symmetric eigensolves.

    tr (S1 S2)^(1/2) is the sum of square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (same
    spectrum as S1 S2). This equals `cleanfid.fid.frechet_distance` (checked in the tests) but never
    fails on singular covariances, and at 2048-d took 10 s where clean-fid's scipy `sqrtm` took 98 s
    (2 busy cores, scipy 1.17).
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean
    return max(float(value), 0.0)  # rounding can give -1e-12 for identical sets


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """FID between two sets of feature rows (each needs at least 2 rows).

    With fewer rows than dimensions (small sets, per-class FID) the same value comes from the rows:
    for centred rows A1, A2, tr (S1 S2)^(1/2) = ||A1 A2^T||_* / sqrt((n1-1)(n2-1)), which costs
    n1 n2 d instead of d^3 (6 ms instead of 13 s for 100 + 100 rows at 2048-d on 2 busy cores).
    """
    (n1, dim), n2 = feats1.shape, len(feats2)
    if n1 * n2 > dim * dim:
        return frechet_distance(feats1.mean(0), np.cov(feats1, rowvar=False),
                                feats2.mean(0), np.cov(feats2, rowvar=False))
    a1, a2 = feats1 - feats1.mean(0), feats2 - feats2.mean(0)
    tr_covmean = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    diff = feats1.mean(0) - feats2.mean(0)
    value = diff @ diff + (a1 * a1).sum() / (n1 - 1) + (a2 * a2).sum() / (n2 - 1) - 2 * tr_covmean
    return max(float(value), 0.0)


def kid_from_features(feats1: np.ndarray, feats2: np.ndarray, *, subsets: int = KID_SUBSETS,
                      subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> dict:
    """KID mean and std over random subsets, each one call of `cleanfid.fid.kernel_distance`."""
    from cleanfid.fid import kernel_distance

    if len(feats1) == len(feats2) <= subset_size:
        subsets = 1  # every subset would be both whole sets, in another order: one is enough
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        values = [kernel_distance(feats1, feats2, num_subsets=1, max_subset_size=subset_size)
                  for _ in range(subsets)]
    finally:
        np.random.set_state(state)  # leave the caller's global RNG as it was
    size = min(len(feats1), len(feats2), subset_size)
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "subsets": subsets,
            "subset_size": size}


@dataclass
class _Encoded:
    features: np.ndarray
    labels: np.ndarray
    rejected: int


def _cache_key(listing: Listing, resolution: int, space: FeatureSpace) -> str:
    """sha256 over every file's content hash and class, the resolution and the feature space."""
    digest = hashlib.sha256(f"{SCHEMA}|{space.name}|{space.layer}|{space.input_size}|"
                            f"{space.weights_sha256}|{resolution}\n".encode())
    for path, label in zip(listing.files, listing.labels):
        digest.update(f"{sha256_of(path)} {listing.classes[label]}\n".encode())
    return digest.hexdigest()


def _features_of(listing: Listing, resolution: int, space: FeatureSpace, cache_dir: Path | None,
                 encode_kw: dict) -> tuple[_Encoded, bool]:
    """Features of one image set, from `cache_dir` when present there; (result, was cached)."""
    from safetensors.numpy import load_file, save_file

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{_cache_key(listing, resolution, space)}.safetensors"
        if path.is_file():
            saved = load_file(path)
            return _Encoded(saved["features"], saved["labels"], int(saved["rejected"][0])), True
    images = load(listing, resolution=resolution, channels=3)
    found = _Encoded(encode(images.images, space, **encode_kw), images.labels.numpy(),
                     len(images.rejects) - len(listing.skipped))
    if path is not None:  # private statistics: a folder only its owner reads, written atomically
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_suffix(".partial")
        save_file({"features": found.features, "labels": found.labels,
                   "rejected": np.array([found.rejected])}, str(partial))
        os.replace(partial, path)
    return found, False


def _resolution(listing: Listing) -> int:
    """The shorter side of the set's first image (header only)."""
    try:
        with Image.open(listing.files[0]) as img:
            return min(img.size)
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read the first image {listing.files[0]} to fix the resolution: "
                        f"{exc}") from None


def _set_entry(root: Path, listing: Listing, found: _Encoded) -> dict:
    counts = np.bincount(found.labels, minlength=len(listing.classes))
    return {"path": str(root), "images": len(found.features), "rejected": found.rejected,
            "layout": listing.layout, "classes": dict(zip(listing.classes, counts.tolist()))}


def _versions(space: FeatureSpace) -> dict:
    names = ["clean-fid", "torch", "numpy", "pillow"]
    names += ["efficientnet-lite-pytorch"] if space.name == "efficientnet-lite0" else []
    return {"privsynth": __version__, **{n: metadata.version(n) for n in names}}


def _encode_sets(listings: dict[str, Listing], resolution: int, space: FeatureSpace,
                 cache_dir: Path | None, encode_kw: dict) -> tuple[dict[str, _Encoded], float | None]:
    """Features of each set, and images/s (decode + resize + network) over the sets actually
    encoded; None when both came from the cache."""
    found, encoded, seconds = {}, 0, 0.0
    for role, listing in listings.items():
        t0 = time.perf_counter()
        kw = {**encode_kw, "what": f"{role} images"}
        found[role], cached = _features_of(listing, resolution, space, cache_dir, kw)
        if not cached:
            encoded, seconds = encoded + len(found[role].features), seconds + time.perf_counter() - t0
        if len(found[role].features) < 2:
            raise DataError(f"{role} set {listing.root}: FID needs at least 2 readable images")
    return found, (round(encoded / seconds, 2) if encoded else None)


def _metrics(syn: _Encoded, rea: _Encoded, listings: dict[str, Listing]) -> dict:
    """fid, kid, per_class_fid where it applies, notes, and which of them DP does not cover."""
    out = {"fid": fid_from_features(syn.features, rea.features),
           "kid": kid_from_features(syn.features, rea.features),
           "notes": [f"FID is biased upwards at small image counts: compare reports only at equal "
                     f"counts ({len(syn.features)} synthetic, {len(rea.features)} real here)"]}
    not_dp = ["fid", "kid", "real.images", "real.classes", "real.rejected"]
    a, b = listings["synthetic"], listings["real"]
    k = len(b.classes)
    if (a.labelled and b.labelled and a.classes == b.classes
            and min(np.bincount(s.labels, minlength=k).min() for s in (syn, rea)) >= 2):
        out["per_class_fid"] = {name: fid_from_features(syn.features[syn.labels == c],
                                                        rea.features[rea.labels == c])
                                for c, name in enumerate(b.classes)}
        not_dp.insert(2, "per_class_fid")
    else:
        out["notes"].append("no per_class_fid: it needs both sets labelled with the same class "
                            "names and at least 2 images per class in each")
    return out | {"not_covered_by_dp": not_dp, "privacy_note": OWNER_ONLY}


def evaluate(synthetic: Path, real: Path, out: Path, *, feature_space: str = "efficientnet-lite0",
             inception_weights: Path | None = None, cache_dir: Path | None = None,
             device: str = "cpu", batch_size: int = 100, progress: Progress | None = None,
             overwrite: bool = False) -> dict:
    """Write `out/report.json` comparing `synthetic` with `real` (FID, KID) and return it."""
    start = time.perf_counter()
    report_path = Path(out) / REPORT
    if report_path.exists() and not overwrite:
        raise UsageError(f"{report_path} already exists: choose another --out or remove it")
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    listings = {"synthetic": scan(synthetic), "real": scan(real)}  # reads no pixel: fails fast
    space = load_feature_space(feature_space, inception_weights=inception_weights, device=device)
    resolution = _resolution(listings["synthetic"])
    kw = {"batch_size": batch_size, "device": device, "progress": progress}
    found, throughput = _encode_sets(listings, resolution, space, cache_dir, kw)
    report = {"schema": SCHEMA, "feature_space": space.describe(), "resolution": resolution,
              "synthetic": _set_entry(Path(synthetic), listings["synthetic"], found["synthetic"]),
              "real": _set_entry(Path(real), listings["real"], found["real"]),
              **_metrics(found["synthetic"], found["real"], listings),
              "versions": _versions(space), "throughput_images_per_s": throughput}
    report["wall_time_s"] = round(time.perf_counter() - start, 3)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    partial = report_path.with_suffix(".json.partial")
    partial.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, report_path)  # a crash never leaves half a report
    return report
