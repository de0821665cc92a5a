"""Clipping and Gaussian noise: every line in privsynth that adds noise is in this file.

Noise comes from NumPy's PCG64 seeded with 256 bits from the OS (`os.urandom`); the seed is never
stored or logged, and `--seed` never reaches this module.

`privsynth audit` (privsynth.audit) is the one other user of this module's state: inside its own
fit (`audit_scope`) it sees every `GaussianSum` release, and its positive control turns every
noise draw into zeros (`noise_off`). That switch is an in-process flag (no environment variable,
recipe key or `fit` flag reaches it), and outside an audit any fit or draw of noise under it is
refused (`check_noise_on`), so no certificate can be issued for a noiseless release.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from privsynth import distributed
from privsynth.errors import BudgetError
from privsynth.privacy.budget import Budget, Charge


# The audit's state (module doc): set only by the two context managers below.
_AUDIT: dict = {"depth": 0, "noise_off": 0, "observers": []}


@contextlib.contextmanager
def audit_scope(observe: Callable[["Charge", torch.Tensor], None] | None = None) -> Iterator[None]:
    """`privsynth audit`'s own fit: `observe(charge, noisy sums)` sees each GaussianSum release."""
    _AUDIT["depth"] += 1
    if observe is not None:
        _AUDIT["observers"].append(observe)
    try:
        yield
    finally:
        _AUDIT["depth"] -= 1
        if observe is not None:
            _AUDIT["observers"].remove(observe)


@contextlib.contextmanager
def noise_off() -> Iterator[None]:
    """The audit's positive control: every draw is 0. Usable inside `audit_scope` only."""
    _AUDIT["noise_off"] += 1
    try:
        yield
    finally:
        _AUDIT["noise_off"] -= 1


def check_noise_on() -> None:
    """Refuse (BudgetError) when noise is switched off outside an audit: a fit must not run."""
    if _AUDIT["noise_off"] and not _AUDIT["depth"]:
        raise BudgetError("noise is switched off (privsynth.privacy.mechanisms.noise_off): only "
                          "`privsynth audit --control no-noise` may release without noise; a fit "
                          "is refused")


class NoiseSource:
    """Gaussian noise from a generator seeded from OS entropy (never from a user seed)."""

    description = {"rng": "numpy.random.PCG64", "seeded_from": "os.urandom(32) at release time",
                   "sampler": "numpy Generator.normal (float64)", "seed_recorded": False}

    def __init__(self) -> None:
        check_noise_on()
        entropy = int.from_bytes(os.urandom(32), "little")
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        """Independent N(0, std^2) draws, float64 (zeros only under the audit's control)."""
        check_noise_on()
        if _AUDIT["noise_off"]:
            return np.zeros(shape)
        return self._rng.normal(0.0, std, size=shape)


def clip_rows(rows: torch.Tensor, bound: float) -> torch.Tensor:
    """Scale each row down so its L2 norm is at most `bound` (rows already inside are unchanged).

    Norms are taken of rows divided by their largest entry, so a finite row whose norm overflows
    (entries above ~1e154) is still clipped to `bound`, not zeroed.
    """
    peak = rows.abs().amax(dim=1, keepdim=True)
    unit = rows / torch.clamp(peak, min=torch.finfo(rows.dtype).tiny)
    unit_norm = unit.norm(dim=1, keepdim=True)  # in [1, sqrt(dim)] for non-zero rows
    outside = unit_norm * peak > bound
    return torch.where(outside, unit * (bound / torch.clamp(unit_norm, min=1.0)), rows)


class GaussianSum:
    """Per-slot sums of clipped contributions, released once with Gaussian noise.

    Each privacy unit adds one row (L2 norm clipped to `charge.sensitivity`) to one slot (its class),
    so adding or removing a unit moves the whole (slots x dim) sum by at most the sensitivity.

    `sharded=True` (torchrun): every rank adds a disjoint share of the rows, and `release` sums the
    shares over the ranks with rank 0's noise in them: one noise draw, the same release everywhere.
    """

    def __init__(self, budget: Budget, charge: Charge, slots: int, dim: int,
                 noise: NoiseSource, *, unit_sizes: Sequence[int] | None = None,
                 sharded: bool = False) -> None:
        if charge.sample_rate != 1.0 or charge.steps != 1:
            raise BudgetError(f"{charge.name}: a one-shot release must have sample_rate=1, steps=1")
        budget.claim(charge)  # recorded before use, and used by this mechanism only
        self.charge = charge
        self._sum = torch.zeros(slots, dim, dtype=torch.float64)
        self._noise = noise
        self._released = False
        self._sharded = sharded
        # User-level privacy: unit u may add at most sizes[u] rows, each weighted 1/sizes[u].
        self._sizes = None if unit_sizes is None else torch.tensor(list(unit_sizes), dtype=torch.float64)
        self._used = None if unit_sizes is None else torch.zeros(len(unit_sizes), dtype=torch.float64)

    def add(self, rows: torch.Tensor, slots: torch.Tensor, units: torch.Tensor | None = None) -> None:
        """Accumulate rows into their slots after clipping each to the sensitivity.

        Without `unit_sizes`, each row is one unit. With them, `units` names each row's unit, and
        a unit's rows are weighted 1/size, so a whole unit moves the sum by at most the sensitivity
        (more rows than its size is refused: the bound would break).
        """
        if self._released:
            raise BudgetError(f"{self.charge.name} was already released; it cannot take more data")
        if (units is None) != (self._sizes is None):
            raise BudgetError(f"{self.charge.name}: rows must name their units exactly when the "
                              "mechanism was built with unit sizes")
        rows = rows.detach().to(torch.float64)
        if not torch.isfinite(rows).all():
            raise BudgetError(f"{self.charge.name}: non-finite statistics; nothing was released")
        rows = clip_rows(rows, self.charge.sensitivity)
        if units is not None:
            units = units.to(torch.long)
            used = self._used.index_add(0, units, torch.ones(len(units), dtype=torch.float64))
            if bool((used > self._sizes).any()):
                raise BudgetError(f"{self.charge.name}: a unit added more rows than its declared "
                                  "size; nothing was released")
            self._used = used
            rows = rows / self._sizes[units][:, None]
        self._sum.index_add_(0, slots.to(torch.long), rows)

    def release(self) -> torch.Tensor:
        """The noisy sums (float64). Can be called once."""
        if self._released:
            raise BudgetError(f"{self.charge.name} can be released only once")
        self._released = True
        total = self._sum.clone()
        if self._sharded and self._used is not None:  # a unit's rows may sit on several ranks
            used = self._used.clone()
            distributed.all_sum([used])
            if bool((used > self._sizes).any()):
                raise BudgetError(f"{self.charge.name}: a unit added more rows than its declared "
                                  "size; nothing was released")
        if not self._sharded or distributed.is_main():
            std = self.charge.noise_multiplier * self.charge.sensitivity
            total += torch.from_numpy(self._noise.normal(tuple(total.shape), std))
        if self._sharded:
            distributed.all_sum([total])
        for observe in list(_AUDIT["observers"]):  # privsynth audit only (module doc)
            observe(self.charge, total.clone())
        return total
