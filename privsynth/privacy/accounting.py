"""Epsilon of a composition of (subsampled) Gaussian mechanisms, via opacus' accountants.

A history entry is `(noise_multiplier, sample_rate, steps)`: sigma is std / L2 sensitivity, as in
opacus. A one-shot release is `(sigma, 1.0, 1)`. GDP is refused: it under-reports epsilon.
Where PRV's numerics cannot represent a composition (sigma << 1 at q=1, epsilon in the hundreds),
the RDP bound is returned instead: also a valid upper bound, never an under-estimate.
PRV's grid grows with the number of steps; past PRV_MAX_POINTS its error is loosened to fit
(still an upper bound), and where even that fails, RDP is used. Both bounds hold at once, so the
smaller is returned.
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
# Largest PRV discretisation grid (points) opacus may allocate: each point costs ~200 bytes and
# ~3.5 us, so this caps one call near 1 GB and 15 s (sigma=1, q=0.01, T=1e7 would otherwise ask
# for ~90 GB and be killed by the OS). Typical fits use 1e5-2e6 points.
PRV_MAX_POINTS = 2**22
# Largest eps_error we loosen to; opacus' safe-domain rule is only vouched for below 1.
PRV_MAX_EPS_ERROR = 0.5

History = Sequence[tuple[float, float, int]]


def _effective(history: History) -> list[tuple[float, float, int]]:
    """Drop entries that touch no data (q=0, T=0, sigma=inf); validate the rest."""
    kept = []
    for sigma, q, steps in history:
        integral = steps >= 0 and math.isfinite(steps) and steps == int(steps)
        if not (0.0 <= q <= 1.0) or not integral or sigma < 0 or math.isnan(sigma):
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
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    rdp = _rdp(entries, delta)
    eps_error = min(max(PRV_RELATIVE_ERROR * rdp, 1e-4), 0.05)
    delta_error = delta / 1000  # opacus' default

    acc = PRVAccountant()
    acc.history = list(entries)
    prvs = [PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in entries]
    steps = [t for _, _, t in entries]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opacus warns about log(0) at q=1; the result is right
        try:
            for _ in range(4):  # loosen eps_error until the grid fits in PRV_MAX_POINTS
                size = acc._get_domain(prvs=prvs, num_self_compositions=steps,
                                       eps_error=eps_error, delta_error=delta_error).size
                if size <= PRV_MAX_POINTS:
                    break
                eps_error *= 1.05 * size / PRV_MAX_POINTS
                if eps_error > PRV_MAX_EPS_ERROR:
                    return rdp
            else:
                return rdp
            prv = float(acc.get_epsilon(delta=delta, eps_error=eps_error,
                                        delta_error=delta_error))
        except (RuntimeError, MemoryError, ValueError, OverflowError):
            # PRV's discretisation fails far from useful budgets (sigma << 1, epsilon in the hundreds).
            # RDP is also a valid upper bound, and deterministic, so `verify` reproduces it.
            return rdp
    return min(prv, rdp)


def _rdp(entries: list[tuple[float, float, int]], delta: float) -> float:
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(entries)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": still an upper bound
        return float(acc.get_epsilon(delta=delta))
