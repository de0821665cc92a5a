"""Nearest neighbours in a feature space: k-NN precision/recall and memorisation scores.

Precision and recall follow Kynkäänniemi et al. 2019 ("Improved Precision and Recall Metric for
Assessing Generative Models"): each real feature row is the centre of a ball reaching its k-th
nearest other real row; precision is the fraction of synthetic rows inside at least one real ball,
recall the fraction of real rows inside at least one synthetic ball (balls built the same way).

Memorisation compares, for each synthetic image, the distance to its nearest private image with
the same distance for real images the generator never saw (held out): a generator that copies no
more than a fresh draw from the data would puts about `quantile` of its images below the
`quantile`-th quantile of the held-out distances. Both use private images without differential
privacy: the numbers are for the data owner only.

Distances are Euclidean. Matrices are built in row chunks (memory ~ chunk x N floats) in float32
by the Gram identity; the nearest pair's distance is then recomputed in float64, so an exact copy
reads 0 instead of float32 cancellation noise.
"""
from __future__ import annotations

import numpy as np
import torch

CHUNK = 1024  # query rows per distance block: 1024 x 10k float32 = 40 MB
QUANTILE = 0.01  # memorisation: "closer than 99% of held-out real images are"
PAIRS = 8  # closest synthetic/private pairs kept for the report


def _distances(a: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between rows of `a` and `b` (float32, Gram identity, clamped at 0)."""
    sq = (a * a).sum(1, keepdim=True) + b_sq[None, :] - 2.0 * (a @ b.T)
    return sq.clamp_min_(0.0).sqrt_()


def _chunks(queries: np.ndarray, refs: np.ndarray):
    """(start, distance block) over `queries` in CHUNK rows against all of `refs`."""
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    r = torch.from_numpy(np.ascontiguousarray(refs, dtype=np.float32))
    r_sq = (r * r).sum(1)
    for start in range(0, len(q), CHUNK):
        yield start, _distances(q[start:start + CHUNK], r, r_sq)


def knn_radii(feats: np.ndarray, k: int) -> np.ndarray:
    """Distance from each row to its k-th nearest other row (the row itself excluded)."""
    if not 1 <= k < len(feats):
        raise ValueError(f"k must be in [1, {len(feats) - 1}] for {len(feats)} rows, got {k}")
    radii = np.empty(len(feats), dtype=np.float32)
    for start, block in _chunks(feats, feats):
        rows = torch.arange(len(block))
        block[rows, rows + start] = float("inf")  # exclude self, keep duplicates as neighbours
        radii[start:start + len(block)] = block.kthvalue(k, dim=1).values.numpy()
    return radii


def inside_fraction(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> float:
    """Fraction of `points` within distance radii[j] of some centres[j]."""
    r = torch.from_numpy(radii)
    inside = sum(int((block <= r[None, :]).any(1).sum()) for _, block in _chunks(points, centres))
    return inside / len(points)


def precision_recall(real: np.ndarray, synthetic: np.ndarray, k: int = 3) -> dict:
    """k-NN manifold precision and recall of `synthetic` against `real` feature rows."""
    precision = inside_fraction(synthetic, real, knn_radii(real, k))
    recall = inside_fraction(real, synthetic, knn_radii(synthetic, k))
    return {"precision": precision, "recall": recall, "k": k}


def nearest(queries: np.ndarray, refs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row: (float64 distance to its nearest ref row, that row's index)."""
    index = np.empty(len(queries), dtype=np.int64)
    for start, block in _chunks(queries, refs):
        index[start:start + len(block)] = block.argmin(1).numpy()
    diff = np.asarray(queries, dtype=np.float64) - np.asarray(refs, dtype=np.float64)[index]
    return np.sqrt((diff * diff).sum(1)), index


def memorisation(synthetic: np.ndarray, private: np.ndarray, holdout: np.ndarray, *,
                 quantile: float = QUANTILE, pairs: int = PAIRS, bins: int = 30) -> dict:
    """Nearest-private distances of synthetic rows against those of held-out real rows."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    d_syn, idx = nearest(synthetic, private)
    d_hold, _ = nearest(holdout, private)
    threshold = float(np.quantile(d_hold, quantile))
    scale = float(np.median(d_hold)) or 1.0
    edges = np.linspace(0.0, float(max(d_syn.max(), d_hold.max())) or 1.0, bins + 1)
    closest = np.argsort(d_syn, kind="stable")[:pairs]
    return {
        "quantile": quantile, "threshold": threshold,
        "suspicious_fraction": float(np.mean(d_syn < threshold)),
        "expected_fraction": quantile,
        "exact_copies": int(np.sum(d_syn <= 1e-6 * scale)),
        "synthetic_median": float(np.median(d_syn)), "holdout_median": float(np.median(d_hold)),
        "synthetic_min": float(d_syn.min()), "holdout_min": float(d_hold.min()),
        "histogram": {"edges": edges.tolist(),
                      "synthetic": np.histogram(d_syn, edges)[0].tolist(),
                      "holdout": np.histogram(d_hold, edges)[0].tolist()},
        "closest": [{"synthetic": int(i), "private": int(idx[i]), "distance": float(d_syn[i])}
                    for i in closest],
    }
