"""Downstream utility: train a small CNN on one image set, pick the epoch on a validation set.

The test set is only ever scored with the epoch the validation set chose (DPImageBench shows that
picking on the test set overstates utility). `utility` chooses on real images held out from the
private training data when given, else on a split of the synthetic set it does not train on.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privsynth.data import Listing, grey_only, load

VAL_FRACTION = 0.1  # synthetic images kept out of training to choose the epoch when no --val


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
    """Top-1 accuracy of `model` on uint8 images (batches go to the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch):
        pred = model(_scaled(images[start:start + batch].to(device))).argmax(1).cpu()
        correct += int((pred == labels[start:start + batch]).sum())
    return correct / max(len(images), 1)


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                     val_y: torch.Tensor, *, classes: int,
                     config: ClassifierConfig = ClassifierConfig(),
                     progress: Callable[[str, int, int], None] | None = None,
                     device: str = "cpu") -> tuple[nn.Module, list[float]]:
    """Train on (train_x, train_y); return the model of the best validation epoch and the curve.
    The model trains on `device`; the images stay where they are and move one batch at a time."""
    torch.manual_seed(config.seed)
    model = SmallCNN(train_x.shape[1], classes, config.width).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps = config.epochs * ((len(train_x) + config.batch_size - 1) // config.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    best, best_acc, curve = copy.deepcopy(model.state_dict()), -1.0, []
    for epoch in range(config.epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for start in range(0, len(order), config.batch_size):
            idx = order[start:start + config.batch_size]
            loss = F.cross_entropy(model(_scaled(train_x[idx].to(device))), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, val_x, val_y)
        curve.append(acc)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
        if progress:
            progress(f"classifier (epoch {epoch + 1}: validation {acc:.4f})", epoch + 1,
                     config.epochs)
    model.load_state_dict(best)
    return model.eval(), curve


def describe(channels: int, classes: int, width: int) -> str:
    """SmallCNN's architecture in one line, for reports."""
    return (f"SmallCNN: conv3x3({channels}->{width})-ReLU-maxpool2, conv3x3({width}->{2 * width})"
            f"-ReLU-maxpool2, adaptive avgpool 4x4, fc({2 * width * 16}->128)-ReLU-dropout(0.25), "
            f"fc(128->{classes}); inputs x/127.5 - 1")


def _tensors(listing: Listing, classes: tuple[str, ...], resolution: int,
             channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of `listing` with labels indexing `classes` (matched by class name)."""
    found = load(listing, resolution=resolution, channels=channels)
    index = {name: i for i, name in enumerate(classes)}
    return found.images, torch.tensor([index[found.classes[y]] for y in found.labels.tolist()])


def _mismatch(synthetic: Listing, other: Listing, role: str) -> str | None:
    if not other.labelled:
        return f"no utility: the {role} set is unlabelled"
    missing = sorted(set(other.classes) - set(synthetic.classes))
    return f"no utility: {role} classes {missing} are not synthetic classes" if missing else None


def utility(synthetic: Listing, test: Listing, val: Listing | None, *, resolution: int,
            config: ClassifierConfig = ClassifierConfig(),
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Accuracy on `test` of a SmallCNN trained on `synthetic`, its epoch chosen on `val` (real,
    held out from training) or on a synthetic split; {"skipped": why} when labels do not allow it."""
    problems = [_mismatch(synthetic, s, r) for s, r in ((test, "test"), (val, "validation")) if s]
    if not synthetic.labelled or any(problems):
        return {"skipped": next((p for p in problems if p), "no utility: the synthetic set is "
                                                           "unlabelled")}
    channels = 1 if grey_only(synthetic) else 3
    x, y = _tensors(synthetic, synthetic.classes, resolution, channels)
    if val is None:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.seed))
        cut = max(1, round(VAL_FRACTION * len(x)))
        (vx, vy), (x, y) = (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])
        chosen_on = f"a synthetic split ({cut} images, {VAL_FRACTION:.0%}) left out of training"
    else:
        vx, vy = _tensors(val, synthetic.classes, resolution, channels)
        chosen_on = "real images held out from the private training data (--val)"
    model, curve = train_classifier(x, y, vx, vy, classes=len(synthetic.classes), config=config,
                                    progress=progress)
    tx, ty = _tensors(test, synthetic.classes, resolution, channels)
    best = int(np.argmax(curve))  # the first best epoch, the one train_classifier kept
    return {"accuracy": accuracy(model, tx, ty), "selected_epoch": best + 1,
            "selected_on": chosen_on, "validation_accuracy": curve[best], "validation_curve": curve,
            "train_images": len(x), "validation_images": len(vx), "test_images": len(tx),
            "resolution": resolution, "channels": channels,
            "architecture": describe(channels, len(synthetic.classes), config.width),
            "recipe": {**config.to_dict(), "optimizer": "Adam, cosine learning-rate decay per step",
                       "loss": "cross-entropy", "augmentation": "none"}}
