"""Epsilon of a composition of (subsampled) Gaussian mechanisms, via opacus' accountants.

A history entry is `(noise_multiplier, sample_rate, steps)`: sigma is std / L2 sensitivity, as in
opacus. A one-shot release is `(sigma, 1.0, 1)`. GDP is refused: it under-reports epsilon.
Where PRV's numerics cannot represent a composition (sigma << 1 at q=1, epsilon in the hundreds),
the RDP bound is returned instead: also a valid upper bound, never an under-estimate.
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

from privsynth.errors import UsageError

ACCOUNTANTS = ("prv", "rdp")
# PRV's epsilon is an upper bound within eps_error of the truth. eps_error is set to this fraction
# of the (fast, looser) RDP bound, so PRV stays within ~0.3% of the truth while its cost stays
# at about a second; it depends only on the history, so `verify` recomputes the same number.
PRV_RELATIVE_ERROR = 3e-3

History = Sequence[tuple[float, float, int]]


def _effective(history: History) -> list[tuple[float, float, int]]:
    """Drop entries that touch no data (q=0, T=0, sigma=inf); validate the rest."""
    kept = []
    for sigma, q, steps in history:
        if not (0.0 <= q <= 1.0) or steps < 0 or sigma < 0 or math.isnan(sigma):
            raise UsageError(f"invalid mechanism (sigma={sigma}, q={q}, steps={steps})")
        if q == 0.0 or steps == 0 or math.isinf(sigma):
            continue
        kept.append((float(sigma), float(q), int(steps)))
    return kept


def epsilon(history: History, delta: float, accountant: str = "prv") -> float:
    """Epsilon at `delta` of all mechanisms in `history` composed; inf if any has sigma=0."""
    if accountant == "gdp":
        raise UsageError("the GDP accountant under-reports epsilon; use 'prv' or 'rdp'")
    if accountant not in ACCOUNTANTS:
        raise UsageError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    if not 0.0 < delta < 1.0:
        raise UsageError(f"delta must be in (0, 1), got {delta}")
    entries = _effective(history)
    if not entries:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in entries):
        return math.inf
    return _prv(entries, delta) if accountant == "prv" else _rdp(entries, delta)


def _prv(entries: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import PRVAccountant

    eps_error = min(max(PRV_RELATIVE_ERROR * _rdp(entries, delta), 1e-4), 0.05)

    acc = PRVAccountant()
    acc.history = list(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns about log(0) at q=1; the result is right
        try:
            return float(acc.get_epsilon(delta=delta, eps_error=eps_error))
        except (RuntimeError, MemoryError, ValueError, OverflowError):
            # PRV's discretisation fails far from useful budgets (sigma << 1, epsilon in the hundreds).
            # RDP is also a valid upper bound, and deterministic, so `verify` reproduces it.
            return _rdp(entries, delta)


def _rdp(entries: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": still an upper bound
        return float(acc.get_epsilon(delta=delta))
