"""k-NN precision/recall and memorisation: brute-force references and known answers."""
from __future__ import annotations

import numpy as np
import pytest

from privsynth import manifold


def brute_precision_recall(real: np.ndarray, synth: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkäänniemi et al. written out with full float64 distance matrices."""
    def radii(x: np.ndarray) -> np.ndarray:
        d = np.linalg.norm(x[:, None] - x[None], axis=2)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    d = np.linalg.norm(synth[:, None] - real[None], axis=2)  # (S, R)
    precision = np.mean((d <= radii(real)[None, :]).any(1))
    recall = np.mean((d.T <= radii(synth)[None, :]).any(1))
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_precision_recall_matches_brute_force(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifold, "CHUNK", 7)  # several chunks, a ragged last one
    rng = np.random.default_rng(k)
    real = rng.standard_normal((60, 5))
    synth = 0.7 * rng.standard_normal((45, 5)) + 1.0
    got = manifold.precision_recall(real, synth, k=k)
    want = brute_precision_recall(real, synth, k)
    assert (got["precision"], got["recall"]) == pytest.approx(want, abs=1e-12)
    assert got["precision"] > 0 and 0 < got["recall"] < 1  # not a trivial 0 or 1 case


def test_identical_sets_are_perfect_and_far_sets_are_zero() -> None:
    x = np.random.default_rng(0).standard_normal((80, 8))
    assert manifold.precision_recall(x, x.copy(), k=3) == {"precision": 1.0, "recall": 1.0, "k": 3}
    far = manifold.precision_recall(x, x + 100.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def test_mode_collapse_keeps_precision_and_halves_recall() -> None:
    rng = np.random.default_rng(1)
    mode_a, mode_b = rng.standard_normal((300, 4)), rng.standard_normal((300, 4)) + 50.0
    only_a = rng.standard_normal((300, 4))
    pr = manifold.precision_recall(np.concatenate([mode_a, mode_b]), only_a, k=3)
    assert pr["precision"] > 0.9  # same distribution: ~0.94 at k=3 in 4-d
    assert 0.45 < pr["recall"] <= 0.5


def test_k_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="k must be"):
        manifold.knn_radii(np.zeros((3, 2)), 3)


def test_memorisation_flags_copies_and_not_fresh_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manifold, "CHUNK", 50)
    rng = np.random.default_rng(2)
    private, holdout = rng.standard_normal((400, 6)) * 10, rng.standard_normal((400, 6)) * 10
    fresh = rng.standard_normal((200, 6)) * 10
    clean = manifold.memorisation(fresh, private, holdout, quantile=0.05)
    assert clean["exact_copies"] == 0 and clean["suspicious_fraction"] < 0.15
    copies = private[:20] + 1e-3 * rng.standard_normal((20, 6))  # 20 near-copies among 200
    leaky = manifold.memorisation(np.concatenate([fresh[:180], copies]), private, holdout,
                                  quantile=0.05)
    assert leaky["suspicious_fraction"] >= 0.1
    assert {p["private"] for p in leaky["closest"]} <= set(range(20))
    assert [p["synthetic"] for p in leaky["closest"]][0] >= 180
    assert sum(leaky["histogram"]["synthetic"]) == 200 and sum(leaky["histogram"]["holdout"]) == 400


def test_exact_copy_distance_is_exactly_zero() -> None:
    # Large-norm rows: float32 Gram distances of identical rows are not 0; the recomputation is.
    rng = np.random.default_rng(3)
    private = rng.standard_normal((50, 1280)) * 30 + 100
    d, idx = manifold.nearest(private[[7, 3]], private)
    assert d.tolist() == [0.0, 0.0] and idx.tolist() == [7, 3]
    mem = manifold.memorisation(private[:5], private, rng.standard_normal((50, 1280)) * 30 + 100)
    assert mem["exact_copies"] == 5 and mem["closest"][0]["distance"] == 0.0
