"""Feature spaces and the fidelity numbers computed in them: FID and KID by clean-fid's rules.

Feature spaces: "inception" is clean-fid's InceptionV3 (pool3, 2048-d, 299 px): the only one whose
numbers compare with published FIDs. "efficientnet-lite0" (the offline default) is the global
average pool of EfficientNet-Lite0's head (1280-d, 224 px): the penultimate layer of an ImageNet
classifier at its native size, as pool3 is for Inception. It is deliberately not the multi-stage
embedding that dp-mepf trains against, which would grade the generator on its own objective.
Images reach either network through clean-fid's "clean" resize (PIL bicubic on float channels).
"""
from __future__ import annotations

import platform
import urllib.error
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from privsynth.errors import MissingResourceError, UsageError
from privsynth.features import EFFICIENTNET_LITE0_SHA256, load_encoder
from privsynth.files import sha256_of
from privsynth.progress import Progress

INCEPTION_FILE = "inception-2015-12-05.pt"
# Where clean-fid itself downloads it from (cleanfid/downloads_helper.py; a test pins the two equal).
INCEPTION_URL = ("https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/"
                 "inception-2015-12-05.pt")
# clean-fid records no checksum for this file (none in its package, none checked on download), and
# we state none we have not verified: the report records the sha256 of the file actually used.
FEATURE_SPACES = ("efficientnet-lite0", "inception")
KID_SUBSETS = 100  # clean-fid's defaults; each subset also gives one sample for the std
KID_SUBSET_SIZE = 1000
KID_SEED = 0  # kernel_distance draws subsets from numpy's global RNG: seeded so reports repeat
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
            f"file itself with --inception-weights (library: inception_weights=PATH). Its sha256: "
            f"clean-fid publishes none, so none is checked; each report records the sha256 of the "
            f"file used (feature_space.weights_sha256).")


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
