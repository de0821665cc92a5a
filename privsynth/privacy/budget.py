"""One privacy budget per fit: every mechanism that touches private data is a `Charge` on it.

Charges are planned and recorded *before* any private pixel is read, so an impossible recipe
fails in seconds, and the certificate is written from exactly what was charged.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from privsynth.errors import BudgetError, UsageError
from privsynth.privacy.accounting import epsilon

# Calibration stops once the planned charges spend at least (1 - this) of the target epsilon.
CALIBRATION_RTOL = 1e-3


def _secant_log(lo: float, f_lo: float, hi: float, f_hi: float, target: float) -> float:
    """Next scale to try: secant on (log s, log eps), kept strictly inside the bracket."""
    if math.isinf(f_lo) or f_lo <= 0 or f_hi <= 0:
        return math.sqrt(lo * hi)
    a, b = math.log(lo), math.log(hi)
    fa, fb, ft = math.log(f_lo), math.log(f_hi), math.log(target)
    x = b - (fb - ft) * (b - a) / (fb - fa) if fb != fa else (a + b) / 2
    # Stay away from the ends so the bracket always shrinks (Illinois-style safeguard).
    margin = 0.05 * (b - a)
    return math.exp(min(max(x, a + margin), b - margin))


@dataclass(frozen=True)
class Charge:
    """One (subsampled) Gaussian mechanism: noise std = noise_multiplier * sensitivity."""

    name: str  # e.g. "dpmepf.phi1"
    noise_multiplier: float
    sample_rate: float  # 1.0 for a one-shot release over the whole dataset
    steps: int  # 1 for a one-shot release
    sensitivity: float  # L2 sensitivity under add/remove one privacy unit
    releases: str  # plain words: what the mechanism outputs

    def history(self) -> tuple[float, float, int]:
        """The entry an accountant composes."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def to_dict(self) -> dict:
        """Plain JSON-able form for the certificate."""
        return asdict(self)


class Budget:
    """A target (epsilon, delta) and the charges spent against it, composed in one accountant."""

    def __init__(self, *, epsilon: float, delta: float, accountant: str = "prv",
                 charges: Sequence[Charge] = (),
                 on_charge: Callable[[list[Charge]], None] | None = None) -> None:
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise UsageError(f"epsilon must be a positive finite number, got {epsilon}")
        self.epsilon_target = float(epsilon)
        self.delta = float(delta)
        self.accountant = accountant
        self.charges: list[Charge] = list(charges)
        self._on_charge = on_charge  # write-ahead hook: persist before any noise is drawn
        self._claimed: set[int] = set()  # indices of charges already used by a mechanism
        self.spent()  # validates delta and accountant now, not at the first charge

    def spent(self, extra: Sequence[Charge] = ()) -> float:
        """Epsilon of every recorded charge (plus `extra`) composed."""
        history = [c.history() for c in [*self.charges, *extra]]
        return epsilon(history, self.delta, self.accountant)

    def fits(self, extra: Sequence[Charge]) -> bool:
        """Whether `extra` can be charged without exceeding the target."""
        return self.spent(extra) <= self.epsilon_target

    def calibrate(self, plan: Callable[[float], list[Charge]], *,
                  lo: float = 1e-3, hi: float = 1e6) -> list[Charge]:
        """The charges `plan(s)` for the smallest noise scale s in [lo, hi] that fits the target.

        `plan` must give charges whose epsilon falls as s grows. The search keeps a bracket whose
        upper end always fits, so the result never exceeds the target; it stops once that end
        spends at least (1 - CALIBRATION_RTOL) of the target.
        """
        spent = lambda s: self.spent(plan(s))  # noqa: E731
        target = self.epsilon_target
        a, f_a, b, f_b = self._bracket(spent, self._rdp_hint(plan, lo, hi), lo, hi)
        if f_a is None:  # even the least noise allowed fits
            return plan(b)
        for _ in range(60):
            if f_b >= target * (1 - CALIBRATION_RTOL) or b / a < 1 + 1e-9:
                break
            mid = _secant_log(a, f_a, b, f_b, target)
            f_mid = spent(mid)
            if f_mid <= target:
                b, f_b = mid, f_mid
            else:
                a, f_a = mid, f_mid
        return plan(b)

    def _bracket(self, spent: Callable[[float], float], start: float, lo: float,
                 hi: float) -> tuple[float, float | None, float, float]:
        """(a, eps(a), b, eps(b)) with a not fitting and b fitting, a >= lo, b <= hi."""
        target = self.epsilon_target
        s, f = start, spent(start)
        if f <= target:
            while s > lo:
                a = max(s / 2, lo)
                f_a = spent(a)
                if f_a > target:
                    return a, f_a, s, f
                s, f = a, f_a
            return s, None, s, f
        while s < hi:
            b = min(s * 2, hi)
            f_b = spent(b)
            if f_b <= target:
                return s, f, b, f_b
            s, f = b, f_b
        raise BudgetError(
            f"the budget (epsilon={target:g}, delta={self.delta:g}) cannot pay for this recipe "
            f"even with noise scale {hi:g}; already spent {self.spent():.4g}")

    def _rdp_hint(self, plan: Callable[[float], list[Charge]], lo: float, hi: float) -> float:
        """Where RDP (fast, looser) would put the scale: a starting point, never the answer."""
        def rdp(s: float) -> float:
            return epsilon([c.history() for c in [*self.charges, *plan(s)]], self.delta, "rdp")

        if rdp(hi) > self.epsilon_target:  # RDP cannot certify this target at all
            return 1.0
        a, b = lo, hi
        while b / a > 1.01:
            mid = math.sqrt(a * b)
            a, b = (a, mid) if rdp(mid) <= self.epsilon_target else (mid, b)
        return b

    def unclaimed(self) -> list[Charge]:
        """Recorded charges no mechanism has used yet (a resumed fit's written-ahead charges)."""
        return [c for i, c in enumerate(self.charges) if i not in self._claimed]

    def claim(self, charge: Charge) -> None:
        """Mark one recorded charge equal to `charge` as used by a mechanism (BudgetError if none).

        One charge pays for one release: a second mechanism with the same charge needs its own.
        """
        for i, recorded in enumerate(self.charges):
            if recorded == charge and i not in self._claimed:
                self._claimed.add(i)
                return
        raise BudgetError(f"mechanism {charge.name} was not charged to the budget before use "
                          "(or its charge was already used by another mechanism)")

    def charge(self, charges: Sequence[Charge]) -> None:
        """Record `charges`; refuse (BudgetError) if they would exceed the target."""
        total = self.spent(charges)
        if total > self.epsilon_target:
            raise BudgetError(
                f"charging {', '.join(c.name for c in charges)} would spend epsilon={total:.4g}, "
                f"over the target {self.epsilon_target:g}")
        if self._on_charge is not None:
            self._on_charge(list(charges))
        self.charges.extend(charges)
