"""The small image classifier and its training loop, shared by privimage's semantic query (trained
on public images) and the downstream utility check (trained on synthetic images).

Kept apart from `downstream` so that a fit imports no evaluation code. Inputs are uint8 images
scaled to [-1, 1] (`data.scaled`), one batch at a time.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class SmallCNN(nn.Module):
    """conv-relu-pool x2 -> fc(128) -> fc(classes); any input size, 1 or 3 channels."""

    def __init__(self, channels: int, classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Dropout(0.25),
                                  nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(x))


def train_epochs(model: nn.Module, inputs: Callable[[torch.Tensor], torch.Tensor],
                 labels: torch.Tensor, *, epochs: int, batch: int, opt: torch.optim.Optimizer,
                 order: Callable[[], torch.Tensor],
                 sched: torch.optim.lr_scheduler.LRScheduler | None = None,
                 after_epoch: Callable[[int], None] | None = None) -> nn.Module:
    """`epochs` passes of cross-entropy steps in batches of `batch` rows, each pass in the order
    `order()` gives (a permutation drawn from the caller's random stream); `inputs(idx)` is the
    model's input for rows `idx` on its device (where the scaling runs is the caller's choice:
    a CUDA division by a scalar multiplies by its reciprocal, which can move the last bit).
    `after_epoch(epoch)` runs after each pass; the next pass puts the model back in training
    mode."""
    device = next(model.parameters()).device
    for epoch in range(epochs):
        model.train()
        rows = order()
        for start in range(0, len(rows), batch):
            idx = rows[start:start + batch]
            loss = F.cross_entropy(model(inputs(idx)), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
        if after_epoch:
            after_epoch(epoch)
    return model
