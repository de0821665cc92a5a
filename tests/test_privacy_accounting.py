"""privacy.accounting: golden values, an independent cross-check against Google's dp_accounting
(PLD, pessimistic), the exact Gaussian mechanism, and the edge cases (docs/RELIABILITY.md section B).

`epsilon` is an upper bound on the true epsilon. Google's PLD accountant (pessimistic
discretisation) is an independent, tight upper bound, so ours must never be below it (beyond
numerical noise), and PRV, which is tuned to stay within ~0.3% of the truth, must be within 1%.
"""
from __future__ import annotations

import functools
import math
import time

import dp_accounting
import pytest
from dp_accounting import pld
from scipy.optimize import brentq
from scipy.stats import norm

from privsynth.errors import UsageError
from privsynth.privacy import accounting
from privsynth.privacy.accounting import epsilon

# ---------------------------------------------------------------------------------------------
# helpers


def _dp_event(history):
    """The same history as a dp_accounting event (add/remove-one neighbours, like ours)."""
    events = []
    for sigma, q, steps in history:
        event = dp_accounting.GaussianDpEvent(sigma)
        if q < 1.0:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        if steps > 1:
            event = dp_accounting.SelfComposedDpEvent(event, steps)
        events.append(event)
    return dp_accounting.ComposedDpEvent(events)


@functools.lru_cache(maxsize=None)
def _pld_epsilon(history: tuple, delta: float) -> float:
    # 1e-4 is dp_accounting's default. 1e-3 is ~8x faster but too pessimistic for long runs
    # (sigma=2, q=0.005, T=20000: 1.6895 at 1e-3 vs 1.6690 at 1e-4, below our PRV 1.6742).
    acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                            value_discretization_interval=1e-4)
    acc.compose(_dp_event(history))
    return float(acc.get_epsilon(delta))


def _gaussian_exact(mu: float, delta: float) -> float:
    """Exact epsilon at `delta` of one Gaussian mechanism with sensitivity/std = mu (Balle-Wang)."""
    def excess(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2) - delta

    if excess(0.0) <= 0:
        return 0.0
    return brentq(excess, 0.0, 500.0, xtol=1e-12)


# ---------------------------------------------------------------------------------------------
# golden values (opacus' own, docs/RELIABILITY.md B)

GOLDEN = [(1.5, 0.04, 2250)]


def test_golden_rdp():
    assert epsilon(GOLDEN, 1e-5, "rdp") == pytest.approx(7.3291, abs=1e-3)


def test_golden_prv():
    eps = epsilon(GOLDEN, 1e-5, "prv")
    # Pinned: our PRV runs opacus with eps_error = 0.3% of RDP (0.022 here), a slightly looser
    # upper bound than opacus' default eps_error=0.01 run, which gives 6.7774.
    assert eps == pytest.approx(6.7911, abs=5e-3)
    assert 6.7774 - 1e-3 <= eps <= 6.7774 + 0.03
    assert eps < epsilon(GOLDEN, 1e-5, "rdp")  # PRV is the tighter of the two
    assert epsilon(GOLDEN, 1e-5) == eps  # PRV is the default


def test_prv_is_deterministic():
    """`verify` recomputes the certificate's epsilon: the same history gives the same number."""
    history = [(3.0, 1.0, 1), (1.2, 0.02, 300)]
    assert epsilon(history, 1e-5) == epsilon(list(history), 1e-5)


# ---------------------------------------------------------------------------------------------
# independent cross-check against Google's dp_accounting PLD accountant

GRID = [
    # single DP-SGD runs
    (((1.5, 0.04, 2250),), 1e-5),
    (((1.0, 0.01, 10000),), 1e-5),
    (((0.8, 0.1, 100),), 1e-6),
    (((2.0, 0.005, 20000),), 1e-6),
    (((0.6, 0.02, 1000),), 1e-5),
    # one-shot releases (q=1)
    (((4.0, 1.0, 1),), 1e-5),
    (((1.0, 1.0, 10),), 1e-3),
    # multi-stage: one-shot releases composed with DP-SGD
    (((3.0, 1.0, 1), (1.2, 0.02, 3000)), 1e-5),
    (((5.0, 1.0, 1), (7.0, 1.0, 1), (0.9, 0.05, 500)), 1e-5),
]


@pytest.mark.parametrize("history,delta", GRID, ids=lambda v: str(v))
def test_cross_check_against_dp_accounting_pld(history, delta):
    reference = _pld_epsilon(history, delta)
    prv = epsilon(list(history), delta, "prv")
    rdp = epsilon(list(history), delta, "rdp")
    assert prv >= reference - 1e-3, "PRV under-reports epsilon"
    assert rdp >= reference - 1e-3, "RDP under-reports epsilon"
    assert prv <= reference * 1.01 + 1e-3, "PRV is more than 1% looser than PLD"
    assert prv <= rdp


@pytest.mark.parametrize("sigma,steps,delta", [(4.0, 1, 1e-5), (1.0, 1, 1e-5), (20.0, 1, 1e-6),
                                               (2.0, 4, 1e-5), (0.7, 1, 1e-3)])
def test_exact_gaussian_mechanism(sigma, steps, delta):
    """q=1: T releases at sigma are exactly one Gaussian with mu = sqrt(T)/sigma (closed form)."""
    exact = _gaussian_exact(math.sqrt(steps) / sigma, delta)
    prv = epsilon([(sigma, 1.0, steps)], delta, "prv")
    rdp = epsilon([(sigma, 1.0, steps)], delta, "rdp")
    assert prv >= exact - 1e-6
    assert rdp >= exact - 1e-6
    assert prv <= exact * 1.01 + 1e-3


# ---------------------------------------------------------------------------------------------
# composition behaves like composition


def test_order_and_splitting_do_not_matter():
    a, b = (3.0, 1.0, 1), (1.2, 0.02, 600)
    for acc in ("rdp", "prv"):
        ab, ba = epsilon([a, b], 1e-5, acc), epsilon([b, a], 1e-5, acc)
        assert ab == pytest.approx(ba, rel=1e-3)
        split = epsilon([a, (1.2, 0.02, 200), (1.2, 0.02, 400)], 1e-5, acc)
        assert split == pytest.approx(ab, rel=1e-3)


def test_more_is_never_cheaper():
    base = [(1.0, 0.02, 1000)]
    for acc in ("rdp", "prv"):
        e = epsilon(base, 1e-5, acc)
        assert epsilon([(1.0, 0.02, 2000)], 1e-5, acc) > e  # more steps
        assert epsilon([(1.0, 0.04, 1000)], 1e-5, acc) > e  # larger sample rate
        assert epsilon([(0.8, 0.02, 1000)], 1e-5, acc) > e  # less noise
        assert epsilon([*base, (5.0, 1.0, 1)], 1e-5, acc) > e  # one more release
        assert epsilon(base, 1e-6, acc) > e  # smaller delta


# ---------------------------------------------------------------------------------------------
# edge cases


@pytest.mark.parametrize("acc", ["prv", "rdp"])
def test_empty_history_spends_nothing(acc):
    assert epsilon([], 1e-5, acc) == 0.0


@pytest.mark.parametrize("acc", ["prv", "rdp"])
@pytest.mark.parametrize("entry", [(1.0, 0.0, 100), (1.0, 0.5, 0), (math.inf, 0.5, 10),
                                   (0.0, 0.0, 10), (0.0, 1.0, 0)], ids=str)
def test_entries_that_touch_no_data_spend_nothing(acc, entry):
    """q=0, T=0 or infinite noise: nothing about the data is released (even with sigma=0)."""
    assert epsilon([entry], 1e-5, acc) == 0.0
    assert epsilon([entry, (2.0, 1.0, 1)], 1e-5, acc) == epsilon([(2.0, 1.0, 1)], 1e-5, acc)


@pytest.mark.parametrize("acc", ["prv", "rdp"])
def test_zero_noise_is_infinite_epsilon(acc):
    """Documented: sigma=0 on data is no privacy at all: epsilon is inf (never an error, never
    finite), so any Budget refuses it (see test_privacy_budget)."""
    assert epsilon([(0.0, 0.01, 10)], 1e-5, acc) == math.inf
    assert epsilon([(2.0, 1.0, 1), (0.0, 1.0, 1)], 1e-5, acc) == math.inf


def test_huge_number_of_steps_is_finite_fast_and_bounded():
    """T=1e7 at sigma=1, q=0.01 made opacus' PRV ask for a ~450M-point grid (~90 GB: the process
    was OOM-killed). The grid is now capped; past the cap the bound is RDP's (or a looser PRV)."""
    history = [(1.0, 0.01, 10_000_000)]
    start = time.perf_counter()
    eps = epsilon(history, 1e-5, "prv")
    assert time.perf_counter() - start < 10
    assert math.isfinite(eps)
    assert eps == epsilon(history, 1e-5, "rdp")  # far past the cap: RDP, a valid upper bound
    assert eps > 1000


def test_prv_grid_cap_loosens_but_stays_an_upper_bound(monkeypatch):
    """With a tiny grid cap, PRV runs with a looser eps_error: still >= PLD, still <= RDP."""
    monkeypatch.setattr(accounting, "PRV_MAX_POINTS", 2**15)
    history = ((1.5, 0.04, 2250),)
    eps = epsilon(list(history), 1e-5, "prv")
    assert _pld_epsilon(history, 1e-5) - 1e-3 <= eps <= epsilon(list(history), 1e-5, "rdp")
    assert eps > 6.7911 + 5e-3  # the loosened run really is looser than the pinned one


def test_gdp_is_refused():
    with pytest.raises(UsageError, match="GDP"):
        epsilon(GOLDEN, 1e-5, "gdp")
    with pytest.raises(UsageError, match="unknown accountant"):
        epsilon(GOLDEN, 1e-5, "pld")
    assert "gdp" not in accounting.ACCOUNTANTS


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_bad_delta_is_refused(delta):
    with pytest.raises(UsageError, match="delta"):
        epsilon(GOLDEN, delta)


@pytest.mark.parametrize("entry", [(-1.0, 0.1, 10), (math.nan, 0.1, 10), (1.0, -0.1, 10),
                                   (1.0, 1.5, 10), (1.0, math.nan, 10), (1.0, 0.1, -1),
                                   (1.0, 0.1, 2.5), (1.0, 0.1, math.inf), (1.0, 0.1, math.nan)],
                         ids=str)
def test_invalid_entries_are_refused(entry):
    """Fractional steps used to be truncated (2.9 steps counted as 2): an under-count."""
    with pytest.raises(UsageError, match="invalid mechanism"):
        epsilon([entry], 1e-5)
