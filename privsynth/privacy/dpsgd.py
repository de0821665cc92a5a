"""DP-SGD: Poisson sampling, per-sample gradients, clipping and Gaussian noise for one `Charge`.

One `DPSGD` object is the whole mechanism of a charge `(sigma, q, T, C)`: it draws exactly T
Poisson batches at rate q (from OS entropy: the subsampling must stay secret for the amplification
the accountant assumes), clips every per-sample gradient to L2 norm C, and adds N(0, (sigma C)^2)
noise once per step -- also to an empty batch, which still counts as a step.

Per-sample gradients come from opacus' functorch grad-sample mode or from `torch.func.vmap`; both
are checked against a one-example-at-a-time loop on the real UNet (tests/test_privimage.py).
opacus' "hooks" mode is refused: it returns wrong gradients for convolutions whose input is
channels-last strided, which diffusers' attention blocks produce.

Data-parallel use (torchrun) fits this split: each rank clips and sums its share of the batch
(`clipped_sum`), the sums are all-reduced, and one rank draws the noise (`noisy_gradient`).
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

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


def clipped_sum(grads: Sequence[torch.Tensor], bound: float) -> list[torch.Tensor]:
    """Sum over rows after scaling each row (across all tensors) to L2 norm <= `bound`."""
    if not grads or grads[0].shape[0] == 0:
        return [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads]
    norms = torch.stack([g.flatten(1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    if not torch.isfinite(norms).all():
        raise BudgetError("non-finite per-sample gradient; nothing was released")
    scale = (bound / (norms + 1e-6)).clamp(max=1.0)
    return [torch.einsum("b,b...->...", scale.to(g.dtype), g) for g in grads]


class DPSGD:
    """The DP-SGD mechanism of one charge: T Poisson batches, clipped sums, one noise draw each."""

    def __init__(self, budget: Budget, charge: Charge, *, expected_batch: float,
                 noise: NoiseSource) -> None:
        if not 0 < charge.sample_rate <= 1 or charge.steps < 1:
            raise BudgetError(f"{charge.name}: DP-SGD needs 0 < sample_rate <= 1 and steps >= 1")
        budget.claim(charge)  # recorded before use, and used by this mechanism only
        self.charge, self.bound = charge, charge.sensitivity
        self.expected_batch = float(expected_batch)  # public constant: the update divides by it
        self._noise = noise
        entropy = int.from_bytes(os.urandom(32), "little")  # secret subsampling, never a user seed
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
        self.steps_done = 0

    def batches(self, n: int) -> Iterator[np.ndarray]:
        """Exactly `charge.steps` Poisson batches: each of `n` indices kept with prob. q."""
        for _ in range(self.charge.steps):
            yield np.flatnonzero(self._rng.random(n) < self.charge.sample_rate)

    def noisy_gradient(self, summed: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """(clipped sum + N(0, (sigma C)^2)) / expected batch; counts one step (empty ones too)."""
        if self.steps_done >= self.charge.steps:
            raise BudgetError(f"{self.charge.name}: all {self.charge.steps} charged steps are spent")
        self.steps_done += 1
        std = self.charge.noise_multiplier * self.bound
        out = []
        for s in summed:
            noise = torch.from_numpy(self._noise.normal(tuple(s.shape), std))
            out.append((s.double().cpu() + noise).div(self.expected_batch).to(s.device, s.dtype))
        return out
