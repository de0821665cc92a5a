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
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from privsynth.privacy import Budget, Charge, NoiseSource
from privsynth.privacy.dpsgd import DPSGD, clipped_sum, hidden_generator, unit_passes

Progress = Callable[[str, int, int], None]
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


def charge(sigma: float, batch: int, epochs: float, clip: float, n: int) -> Charge:
    """The DP-SGD charge for `n` privacy units: q = batch / n, T = epochs / q steps."""
    q = min(batch / max(n, 1), 1.0)
    return Charge("dpmepf.judge", sigma, q, max(1, round(epochs / q)), clip,
                  "weights of a linear classifier of the encoder features, trained by DP-SGD (one "
                  "clipped gradient per sampled privacy unit + Gaussian noise, Poisson sampling of "
                  "units); used only to redraw generated images it assigns to another class")


def per_example(judge: Judge, feats: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """Each row's gradient of the cross-entropy, for (weight, bias): (p - onehot) f^T and p - onehot."""
    with torch.no_grad():
        residual = torch.softmax(judge(feats), 1)
        residual[torch.arange(len(labels)), labels] -= 1.0
        return [residual[:, :, None] * feats[:, None, :], residual]


def train(feats: torch.Tensor, labels: torch.Tensor, classes: int, budget: Budget,
          the_charge: Charge, *, lr: float, groups: list[np.ndarray],
          progress: Progress | None = None) -> Judge:
    """Exactly `the_charge.steps` noisy DP-SGD steps over `groups` (the rows of each privacy unit:
    a unit's gradients are averaged into one row before clipping). Returns the judge, eval mode."""
    judge = Judge(feats.shape[1], classes).to(feats.device)
    params = [judge.linear.weight, judge.linear.bias]
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=the_charge.steps)
    mech = DPSGD(budget, the_charge, expected_batch=the_charge.sample_rate * len(groups),
                 noise=NoiseSource())
    gen = hidden_generator()
    cap = max(len(g) for g in groups)
    for batch in mech.batches(len(groups)):
        sums = [torch.zeros_like(p) for p in params]
        for idx, owners in unit_passes(groups, batch, cap=cap, per_pass=PASS, generator=gen):
            idx = torch.from_numpy(idx)
            rows = per_example(judge, feats[idx], labels[idx].to(feats.device))
            sums = [s + c for s, c in zip(sums, clipped_sum(rows, the_charge.sensitivity,
                                                            owners=owners))]
        for p, g in zip(params, mech.noisy_gradient(sums)):
            p.grad = g
        opt.step()
        sched.step()
        if progress and (mech.steps_done % 200 == 0 or mech.steps_done == the_charge.steps):
            progress("training the DP-SGD label filter", mech.steps_done, the_charge.steps)
    return judge.eval().requires_grad_(False)


def filtered(draw: Callable[[torch.Tensor], torch.Tensor],
             classify: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
             classes: torch.Tensor, rounds: int) -> tuple[torch.Tensor, int]:
    """`draw(labels)` (uint8 images), then up to `rounds` redraws of the images that `classify`
    puts in another class than `classes`; images still rejected after the last round are kept
    as drawn. Returns the images and how many draws were rejected."""
    images = draw(labels)
    rejected = 0
    for _ in range(rounds):
        bad = (classify(images) != classes).nonzero()[:, 0]
        if not len(bad):
            break
        rejected += len(bad)
        images[bad] = draw(labels[bad])
    return images, rejected
