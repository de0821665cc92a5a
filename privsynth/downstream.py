"""Downstream utility: train a small CNN on one image set, pick the epoch on a validation set.

The test set is only ever scored with the epoch the validation set chose (DPImageBench shows that
picking on the test set overstates utility).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ClassifierConfig:
    """The recorded training recipe of the downstream classifier."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 128
    lr: float = 1e-3  # Adam, cosine-decayed
    width: int = 32  # channels of the first conv layer; the second has twice as many
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


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


def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of `model` on uint8 images."""
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        pred = model(_scaled(images[start:start + batch])).argmax(1)
        correct += int((pred == labels[start:start + batch]).sum())
    return correct / max(len(images), 1)


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                     val_y: torch.Tensor, *, classes: int,
                     config: ClassifierConfig = ClassifierConfig(),
                     progress: Callable[[str, int, int], None] | None = None
                     ) -> tuple[nn.Module, list[float]]:
    """Train on (train_x, train_y); return the model of the best validation epoch and the curve."""
    torch.manual_seed(config.seed)
    model = SmallCNN(train_x.shape[1], classes, config.width)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * ((len(train_x) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    best, best_acc, curve = copy.deepcopy(model.state_dict()), -1.0, []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = F.cross_entropy(model(_scaled(train_x[idx])), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, val_x, val_y)
        curve.append(acc)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
        if progress:
            progress(f"classifier epoch {epoch + 1} (val {acc:.4f})", epoch + 1, config.epochs)
    model.load_state_dict(best)
    return model.eval(), curve
