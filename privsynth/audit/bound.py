"""One-run auditing's statistics (Steinke, Nasr and Jagielski, "Privacy Auditing with One (1)
Training Run", NeurIPS 2023, arXiv 2305.08846): guesses from scores, and a lower bound on epsilon.

m canaries are each included independently with probability 1/2. The auditor guesses "in" for
the k+ highest scores, "out" for the k- lowest and abstains on the rest: r = k+ + k- guesses,
v of them correct. If the algorithm is (epsilon, delta)-DP, the paper's approximate-DP theorem
(Section 5) bounds the chance of v or more correct guesses by

    p(epsilon) = P[B >= v] + 2 m delta * max_{i = 1..v} P[v - i <= B < v] / i,
    B ~ Binomial(r, e^eps / (1 + e^eps))  (the accuracy of eps-DP randomised response),

so every epsilon with p(epsilon) < 1 - confidence is rejected, and the largest such epsilon is a
lower bound at that confidence. With delta = 0 and all r guesses correct, p = q^r, so the bound
can never pass log(q / (1 - q)) with q = (1 - confidence)^(1 / r): one run with m canaries caps
the measurable epsilon (1.87 for r = 32 at 99 %, 5.24 for r = 1000 at 99.5 %; see `ceiling`).

k+ and k-: the paper sweeps them and reports the best bound. Here the candidates are fixed
before any score is seen (k+ = k- = k for k = m/2, m/4, ... down to 5) and each is tested at
(1 - confidence) / (number of candidates) (Bonferroni), so the best of them still holds at the
stated confidence.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

SMALLEST_K = 5  # r = 10 guesses: fewer can hardly reject anything at 95 %


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """The chance of >= v correct guesses out of r (m canaries) under (epsilon, delta)-DP."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, q))  # P[B >= v]
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], ..., P[B = 0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, beta + 2 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, *, level: float = 0.05) -> float:
    """The largest epsilon that `v` correct of `r` guesses reject at p-value < `level` (0 when
    even epsilon = 0 is not rejected); bisection to 1e-6 (p grows with epsilon)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < level:
        low, high = high, 2 * high
        if high > 1e3:  # v = r = m with delta = 0 and huge m: beyond anything meaningful
            return low
    while high - low > 1e-6:
        mid = (low + high) / 2
        low, high = (mid, high) if p_value(m, r, v, mid, delta) < level else (low, mid)
    return low


def candidates(m: int) -> list[int]:
    """The k (= k+ = k-) tried, fixed by m alone: m // 2, m // 4, ... while >= SMALLEST_K."""
    ks, k = [], m // 2
    while k >= SMALLEST_K:
        ks.append(k)
        k //= 2
    return ks


def ceiling(m: int, delta: float, *, confidence: float = 0.95) -> float:
    """The largest bound `audit` can report for m canaries: every guess of a candidate right."""
    ks = candidates(m)
    level = (1 - confidence) / max(len(ks), 1)
    return max((epsilon_lower_bound(m, 2 * k, 2 * k, delta, level=level) for k in ks), default=0.0)


@dataclass(frozen=True)
class Guesses:
    """One choice of k+ and k- applied to the scores, and what it proves."""

    k_in: int  # guessed "in": the k_in highest scores
    k_out: int  # guessed "out": the k_out lowest scores
    correct_in: int
    correct_out: int
    epsilon_lb: float  # lower bound at this candidate's (Bonferroni) level

    @property
    def guesses(self) -> int:
        """r: guesses made (abstentions excluded)."""
        return self.k_in + self.k_out

    @property
    def correct(self) -> int:
        """v: correct guesses."""
        return self.correct_in + self.correct_out

    def to_dict(self) -> dict:
        """JSON-able, with r and v."""
        return dict(asdict(self), guesses=self.guesses, correct=self.correct)


def audit(scores: np.ndarray, included: np.ndarray, delta: float, *,
          confidence: float = 0.95) -> tuple[Guesses | None, list[Guesses]]:
    """Every candidate's guesses and bound, and the best (None when m < 2 * SMALLEST_K).

    `scores`: higher means "more likely included"; `included`: the truth (bool per canary).
    Ties are broken by canary index, a rule fixed in advance."""
    scores, included = np.asarray(scores, dtype=float), np.asarray(included, dtype=bool)
    m = len(scores)
    if len(included) != m or not np.isfinite(scores).all():
        raise ValueError("need one finite score per canary")
    order = np.argsort(-scores, kind="stable")  # highest first
    ks = candidates(m)
    level = (1 - confidence) / max(len(ks), 1)
    tried = []
    for k in ks:
        hit_in = int(included[order[:k]].sum())
        hit_out = int((~included[order[m - k:]]).sum())
        tried.append(Guesses(k, k, hit_in, hit_out,
                             epsilon_lower_bound(m, 2 * k, hit_in + hit_out, delta, level=level)))
    best = max(tried, key=lambda g: (g.epsilon_lb, g.correct), default=None)
    return best, tried
