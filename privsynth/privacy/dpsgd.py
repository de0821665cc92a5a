"""DP-SGD: Poisson sampling, per-sample gradients, clipping and Gaussian noise for one `Charge`.

One `DPSGD` object is the whole mechanism of a charge `(sigma, q, T, C)`: it draws exactly T
Poisson batches at rate q (from OS entropy: the subsampling must stay secret for the amplification
the accountant assumes), clips every per-sample gradient to L2 norm C, and adds N(0, (sigma C)^2)
noise once per step -- also to an empty batch, which still counts as a step.

Per-sample gradients come from opacus' functorch grad-sample mode or from `torch.func.vmap`; both
are checked against a one-example-at-a-time loop on the real UNet (tests/test_privimage.py).
opacus' "hooks" mode is refused: it returns wrong gradients for convolutions whose input is
channels-last strided, which diffusers' attention blocks produce.

Privacy units (user-level DP): Poisson sampling is over units; `unit_passes` lays out a sampled
unit's images (at most `cap` of them) and `clipped_sum(..., owners=)` averages them into one row
before clipping, so a unit adds at most C to a step whatever its number of images.

Data-parallel (torchrun, `sharded=True`): rank 0 draws each Poisson batch and broadcasts it, so
there is one batch per step over the whole dataset, as in one process; each rank clips and sums
its share of it (`clipped_sum`); rank 0 adds the step's noise to its own share and the shares are
all-reduced. The noise thus enters exactly once per step, whatever the number of processes, every
rank gets the same noisy gradient (so the same optimiser step keeps the weights identical), and
the accounting -- (sigma, q, T) over the whole dataset -- is that of the one-process run.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from privsynth import distributed
from privsynth.errors import BudgetError, UsageError
from privsynth.privacy.budget import Budget, Charge
from privsynth.privacy.mechanisms import NoiseSource

GRAD_SAMPLE_MODES = ("functorch", "vmap")  # the modes that pass the exactness test
Loss = Callable[..., torch.Tensor]  # loss(net, *inputs) -> one loss per input row, shape (B,)


class PerSampleGradients:
    """Per-row gradients of `loss(net, *inputs)` for every trainable parameter of `model`.

    mode "functorch": opacus `GradSampleModule(force_functorch=True)`; "vmap": `torch.func`.
    """

    def __init__(self, model: nn.Module, mode: str = "vmap") -> None:
        if mode not in GRAD_SAMPLE_MODES:
            raise UsageError(f"grad_sample_mode must be one of {', '.join(GRAD_SAMPLE_MODES)}, got "
                             f"{mode!r} (opacus 'hooks'/'ghost' give wrong gradients after "
                             "channels-last activations)")
        from opacus.validators import ModuleValidator

        errors = ModuleValidator.validate(model, strict=False)
        if errors:  # e.g. BatchNorm mixes samples: per-sample clipping would not bound anything
            raise UsageError(f"model cannot be trained with DP-SGD: {errors[0]}")
        self.model, self.mode = model, mode
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._gsm = None
        if mode == "functorch":
            from opacus import GradSampleModule

            self._gsm = GradSampleModule(model, force_functorch=True, loss_reduction="sum")

    def __call__(self, loss: Loss, *inputs: torch.Tensor, group: int = 1) -> list[torch.Tensor]:
        """One tensor (B, *p.shape) per parameter; rows in consecutive groups of `group` are
        averaged (several noise draws of one example count as one example)."""
        rows = self._functorch(loss, inputs) if self._gsm is not None else self._vmap(loss, inputs)
        if group > 1:
            rows = [g.reshape(g.shape[0] // group, group, *g.shape[1:]).mean(1) for g in rows]
        return rows

    def _functorch(self, loss: Loss, inputs: tuple) -> list[torch.Tensor]:
        loss(self._gsm, *inputs).sum().backward()
        out = []
        for p in self.params:
            out.append(p.grad_sample)
            p.grad_sample, p.grad = None, None
        return out

    def _vmap(self, loss: Loss, inputs: tuple) -> list[torch.Tensor]:
        from torch.func import functional_call, grad, vmap

        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        fixed = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}

        def one(params: dict, *row: torch.Tensor) -> torch.Tensor:
            net = lambda *a, **k: functional_call(self.model, {**params, **fixed}, a, k)  # noqa: E731
            return loss(net, *(x[None] for x in row)).sum()

        params = {n: p.detach() for n, p in zip(names, self.params)}
        grads = vmap(grad(one), in_dims=(None, *([0] * len(inputs))))(params, *inputs)
        return [grads[n] for n in names]

    def close(self) -> None:
        """Remove opacus' hooks (the model is then an ordinary module again)."""
        if self._gsm is not None:
            self._gsm._close()
            self._gsm = None


def clipped_sum(grads: Sequence[torch.Tensor], bound: float, *,
                owners: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Sum over rows after scaling each row (across all tensors) to L2 norm <= `bound`.

    With `owners` (each row's unit, numbered 0..U-1 within this call), the rows of one unit are
    first averaged into one row: each unit then adds at most `bound`, however many rows it has.
    """
    if not grads or grads[0].shape[0] == 0:
        return [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads]
    if owners is not None and int(owners.max()) + 1 < len(owners):  # some unit has several rows
        grads = unit_means(grads, owners)
    scale = clip_factors(torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt(),
                         bound)
    return [torch.einsum("b,b...->...", scale.to(g.dtype), g) for g in grads]


def clip_factors(norms: torch.Tensor, bound: float) -> torch.Tensor:
    """Per-row factors min(1, bound / norm) that clip rows of L2 norm `norms` to `bound`;
    BudgetError (nothing released) if a norm is not finite."""
    if not torch.isfinite(norms).all():
        raise BudgetError("non-finite per-sample gradient; nothing was released")
    return (bound / (norms + 1e-6)).clamp(max=1.0)


def unit_means(grads: Sequence[torch.Tensor], owners: torch.Tensor) -> list[torch.Tensor]:
    """One row per unit: the mean of the rows that `owners` assigns to it (units 0..U-1)."""
    owners = owners.to(torch.long)
    units = int(owners.max()) + 1
    counts = torch.bincount(owners, minlength=units).clamp(min=1)
    out = []
    for g in grads:
        total = torch.zeros((units, *g.shape[1:]), dtype=g.dtype, device=g.device)
        total.index_add_(0, owners.to(g.device), g)
        out.append(total / counts.to(g.device, g.dtype).view(-1, *([1] * (g.dim() - 1))))
    return out


def unit_members(units: torch.Tensor | None, n: int, count: int | None) -> list[np.ndarray]:
    """The images (indices into n images) of each of `count` units: one image each when `units`
    (each image's unit) is None, else grouped by it."""
    if units is None:
        return [np.array([i]) for i in range(n)]
    owner = units.numpy()
    order = np.argsort(owner, kind="stable")
    counts = np.bincount(owner, minlength=count)
    return np.split(order, np.cumsum(counts)[:-1])


def unit_passes(members: Sequence[np.ndarray], sampled: np.ndarray, *, cap: int, per_pass: int,
                generator: torch.Generator) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The sampled units' images in passes of whole units: (image indices, owner of each image).

    `members[u]` lists unit u's images. A unit with more than `cap` images gives `cap` of them,
    drawn with `generator` (this bounds compute, not privacy: the unit's rows are averaged into
    one clipped row either way). A pass holds at most max(per_pass, cap) images; owners number
    the units of one pass 0, 1, ... for `clipped_sum(..., owners=)`.
    """
    index: list[int] = []
    owner: list[int] = []
    for u in sampled:
        images = members[u]
        if len(images) > cap:
            images = images[torch.randperm(len(images), generator=generator)[:cap].numpy()]
        if index and len(index) + len(images) > per_pass:
            yield np.asarray(index), torch.tensor(owner)
            index, owner = [], []
        unit = owner[-1] + 1 if owner else 0
        index += [int(i) for i in images]
        owner += [unit] * len(images)
    if index:
        yield np.asarray(index), torch.tensor(owner)


def hidden_generator() -> torch.Generator:
    """A torch generator seeded from OS entropy, for the per-example draws inside a DP-SGD step
    (diffusion timesteps and noise, label dropout, which images of a unit).

    The accounting treats the per-unit term of a step as a function of that unit with its own
    randomness. A generator seeded from `--seed` would be known, and its stream is consumed in an
    order set by the secret Poisson batch: adding one unit would shift the draws of every later
    unit, so a known seed would not give the per-unit bound. Hidden, independent draws do.
    """
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class DPSGD:
    """The DP-SGD mechanism of one charge: T Poisson batches, clipped sums, one noise draw each."""

    def __init__(self, budget: Budget, charge: Charge, *, expected_batch: float,
                 noise: NoiseSource, steps_done: int = 0, sharded: bool = False) -> None:
        if not 0 < charge.sample_rate <= 1 or charge.steps < 1:
            raise BudgetError(f"{charge.name}: DP-SGD needs 0 < sample_rate <= 1 and steps >= 1")
        if not 0 <= steps_done <= charge.steps:
            raise BudgetError(f"{charge.name}: {steps_done} steps done is outside the charged "
                              f"0..{charge.steps}")
        budget.claim(charge)  # recorded before use, and used by this mechanism only
        self.charge, self.bound = charge, charge.sensitivity
        self.expected_batch = float(expected_batch)  # public constant: the update divides by it
        self._noise = noise
        entropy = int.from_bytes(os.urandom(32), "little")  # secret subsampling, never a user seed
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        # Steps an earlier, interrupted attempt already applied to the saved model (resume).
        self.steps_done = int(steps_done)
        self.sharded = sharded  # every rank runs this mechanism on its share (see the module doc)

    def batches(self, n: int) -> Iterator[np.ndarray]:
        """The charged steps not yet done, one Poisson batch each: every one of `n` indices (images,
        or privacy units) kept with probability q. A fresh mechanism draws exactly `charge.steps`.
        Sharded, rank 0's draw is every rank's batch (each then takes its share of it)."""
        return self._poisson(n, self.charge.steps - self.steps_done)

    def _poisson(self, n: int, steps: int) -> Iterator[np.ndarray]:
        draws = not self.sharded or distributed.is_main()
        for _ in range(steps):
            keep = (torch.from_numpy(self._rng.random(n) < self.charge.sample_rate)
                    if draws else torch.empty(n, dtype=torch.bool))
            if self.sharded:
                keep = distributed.broadcast(keep.to(torch.uint8)).bool()
            yield np.flatnonzero(keep.numpy())

    def noisy_gradient(self, summed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(clipped sum + N(0, (sigma C)^2)) / expected batch; counts one step (empty ones too).

        Sharded, `summed` is this rank's share: rank 0 adds the noise to its share before the
        shares are summed over the ranks, so the noise is drawn once per step, not once per rank.
        """
        if self.steps_done >= self.charge.steps:
            raise BudgetError(f"{self.charge.name}: all {self.charge.steps} charged steps are spent")
        self.steps_done += 1
        total = [s.detach().double() for s in summed]
        if not self.sharded or distributed.is_main():
            std = self.charge.noise_multiplier * self.bound
            total = [t + torch.from_numpy(self._noise.normal(tuple(t.shape), std)).to(t.device)
                     for t in total]
        if self.sharded:
            distributed.all_sum(total)
        return [t.div(self.expected_batch).to(s.dtype) for t, s in zip(total, summed)]
