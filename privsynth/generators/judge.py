"""dp-mepf's label filter: a linear classifier of the private images' encoder features trained by
DP-SGD (the "judge"), and the sampling rule that redraws generated images it puts in another class.

Matching noisy feature means pins down each class's images on average but not one by one: on
MNIST at epsilon 10 a classifier trained on the real images disagrees with the label of about
6 % of the generated digits (a 3 drawn like a 9), and that label noise costs the downstream
classifier about a point. The judge is one more mechanism on the same budget: DP-SGD
(`privsynth.privacy.dpsgd`: Poisson sampling of privacy units from OS entropy, each unit's
gradient clipped to C, Gaussian noise once per step, empty batches counted), charged as
`dpmepf.judge` and calibrated together with the releases. It reads the same bounded feature rows
as the releases (norm <= 1), so its per-example gradients have a closed form and training costs
seconds. Its weights are published with the generator; sampling with it reads no private data,
so it is post-processing at no further cost.

A second judge (`dpmepf.scatter_judge`, its own charge) is the same linear DP-SGD model on
another view of the pixels: the wavelet scattering transform (privsynth.scattering). A judge that
reads the very rows the generator was trained to match misses the mistakes those rows cannot
see; with both, an image is kept only when every judge agrees with its label (on the 60k samples
of an epsilon-10 MNIST run: downstream test accuracy 95.09 % with the feature judge alone, 95.32 %
with both, one classifier training each).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from privsynth.privacy import Budget, Charge, NoiseSource
from privsynth.privacy.dpsgd import (DPSGD, clip_factors, clipped_sum, hidden_generator,
                                     unit_passes)
from privsynth.progress import Progress

PASS = 4096  # rows per gradient pass (bounds memory, not privacy)


class Judge(nn.Module):
    """Softmax regression on encoder feature rows: logits = W f + b."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.linear(feats)


VIEWS = {"dpmepf.judge": "the encoder features", "dpmepf.scatter_judge": "the wavelet scattering "
         "transform of the pixels (privsynth.scattering, group-normalised)"}


def key(name: str) -> str:
    """The short name of judge `name` (a key of VIEWS): its weights file, config entry and saved
    training state ('judge', 'scatter_judge')."""
    return name.split(".", 1)[1]


def charge(sigma: float, batch: int, epochs: float, clip: float, n: int,
           name: str = "dpmepf.judge") -> Charge:
    """The DP-SGD charge `name` (a key of VIEWS) for `n` privacy units: q = batch / n,
    T = epochs / q steps."""
    q = min(batch / max(n, 1), 1.0)
    return Charge(name, sigma, q, max(1, round(epochs / q)), clip,
                  f"weights of a linear classifier of {VIEWS[name]}, trained by DP-SGD (one "
                  "clipped gradient per sampled privacy unit + Gaussian noise, Poisson sampling of "
                  "units); used only to redraw generated images it assigns to another class")


def per_example(judge: Judge, feats: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Each row's gradient of the cross-entropy, for (weight, bias): (p - onehot) f^T and p - onehot."""
    with torch.no_grad():
        residual = torch.softmax(judge(feats), 1)
        residual[torch.arange(len(labels)), labels] -= 1.0
        return [residual[:, :, None] * feats[:, None, :], residual]


def clipped_gradient(judge: Judge, feats: torch.Tensor, labels: torch.Tensor, bound: float, *,
                     owners: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`clipped_sum(per_example(...), bound, owners=owners)` without the per-example tensors.

    A row's gradient (r f^T, r) has norm |r| sqrt(|f|^2 + 1), so when every unit has one row the
    clipped sum is (c r)^T F and sum(c r), c the per-row clip factors: one matrix product
    instead of a B x classes x dim tensor. Units with several rows take the general path."""
    if owners is not None and len(owners) and int(owners.max()) + 1 < len(owners):
        return clipped_sum(per_example(judge, feats, labels), bound, owners=owners)
    w = judge.linear.weight
    if not len(feats):
        return [torch.zeros_like(w), torch.zeros_like(judge.linear.bias)]
    with torch.no_grad():
        residual = torch.softmax(judge(feats), 1)
        residual[torch.arange(len(labels)), labels] -= 1.0
        norms = residual.norm(dim=1) * (feats.pow(2).sum(1) + 1.0).sqrt()
        scaled = residual * clip_factors(norms, bound)[:, None]
        return [scaled.T @ feats, scaled.sum(0)]


def train(feats: torch.Tensor, labels: torch.Tensor, classes: int, budget: Budget,
          the_charge: Charge, *, lr: float, groups: list[np.ndarray], units: int,
          progress: Progress | None = None) -> Judge:
    """Exactly `the_charge.steps` noisy DP-SGD steps over `groups` (the rows of each privacy unit:
    a unit's gradients are averaged into one row before clipping). Returns the judge, eval mode.

    Each noisy sum is divided by q x `units`, the charged number of units (public: the
    certificate names it), never by `len(groups)`, which moves with the files that failed to
    decode."""
    judge = Judge(feats.shape[1], classes).to(feats.device)
    params = [judge.linear.weight, judge.linear.bias]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=the_charge.steps)
    mech = DPSGD(budget, the_charge, expected_batch=the_charge.sample_rate * units,
                 noise=NoiseSource())
    gen = hidden_generator()
    cap = max(len(g) for g in groups)
    for batch in mech.batches(len(groups)):
        sums = [torch.zeros_like(p) for p in params]
        for idx, owners in unit_passes(groups, batch, cap=cap, per_pass=PASS, generator=gen):
            idx = torch.from_numpy(idx)
            part = clipped_gradient(judge, feats[idx], labels[idx].to(feats.device),
                                    the_charge.sensitivity, owners=owners)
            sums = [s + c for s, c in zip(sums, part)]
        for p, g in zip(params, mech.noisy_gradient(sums)):
            p.grad = g
        opt.step()
        sched.step()
        if progress and (mech.steps_done % 200 == 0 or mech.steps_done == the_charge.steps):
            progress(f"training the DP-SGD label filter ({the_charge.name})", mech.steps_done,
                     the_charge.steps)
    return judge.eval().requires_grad_(False)


def filtered(draw: Callable[[torch.Tensor], torch.Tensor],
             accept: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], labels: torch.Tensor,
             classes: torch.Tensor, rounds: int) -> tuple[torch.Tensor, int]:
    """`draw(labels)` (uint8 images), then up to `rounds` redraws of the images that
    `accept(images, classes)` (a bool per image) rejects; images still rejected after the last
    round are kept as drawn. Returns the images and how many draws were rejected.

    Only the images redrawn in the previous round are judged again (an accepted image is never
    redrawn), so a round costs the judges in proportion to what it redrew."""
    images = draw(labels)
    rejected = 0
    pending = torch.arange(len(labels))
    for _ in range(rounds):
        bad = pending[~accept(images[pending], classes[pending])]
        if not len(bad):
            break
        rejected += len(bad)
        images[bad] = draw(labels[bad])
        pending = bad
    return images, rejected
