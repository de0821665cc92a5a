"""Downstream utility: train a classifier on one image set, pick the epoch on a validation set.

Two classifiers, one training loop (`classifier.train_epochs`): the SmallCNN (Adam, no
augmentation; cheap, and the figure every benchmark row has carried) and a small pre-activation
ResNet trained with random crops (and flips for colour), SGD with Nesterov momentum and weight
decay, linear warm-up then cosine decay: the kind of network DPImageBench trains (ResNet / WRN) for
its published accuracies, sized for the CPU. The test set is only ever scored with the epoch the
validation set chose (DPImageBench shows that picking on the test set overstates utility).
`utility` chooses on real images held out from the private training data when given, else on a
split of the synthetic set it does not train on.
"""
from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from privsynth.classifier import SmallCNN, train_epochs
from privsynth.data import Listing, grey_only, load, scaled
from privsynth.progress import Progress

VAL_FRACTION = 0.1  # synthetic images kept out of training to choose the epoch when no --val
CLASSIFIERS = ("smallcnn", "resnet")
RESNET_EPOCHS = 8  # ~1.6 s of one core per 1k 28x28 images and epoch: ~13 min of CPU on 60k


@dataclass(frozen=True)
class ClassifierConfig:
    """The recorded training recipe of the downstream classifier (defaults: the SmallCNN's)."""

    model: str = "smallcnn"  # "smallcnn" or "resnet" (`preset` gives the ResNet's recipe)
    epochs: int = 10  # passes over the training set
    batch_size: int = 128
    lr: float = 1e-3  # peak learning rate, cosine-decayed per step
    width: int = 32  # SmallCNN: the first conv's channels (the second has twice as many);
    #                  ResNet: the first stage's channels (doubled at each of the 3 later stages)
    optimizer: str = "adam"  # "adam", or "sgd" (Nesterov momentum 0.9)
    weight_decay: float = 0.0  # L2 on every weight (coupled, as SGD's weight_decay)
    warmup: float = 0.0  # share of the steps over which the lr rises linearly from lr / 25
    crop_pad: int = 0  # random crops of the image zero-padded by this many pixels a side (0: none)
    flip: bool = False  # random horizontal flips (colour only: digits are not mirror-symmetric)
    seed: int = 0

    def to_dict(self) -> dict:
        """JSON form."""
        return asdict(self)


def preset(name: str, channels: int) -> ClassifierConfig:
    """The benchmark recipe of classifier `name` ("smallcnn" or "resnet") for `channels`-channel
    images. The ResNet's crops move grey images by up to 2 pixels (MNIST-like digits sit centred
    with a 4-pixel margin), colour ones by up to 4 with flips (the usual CIFAR-10 recipe)."""
    if name == "smallcnn":
        return ClassifierConfig()
    if name != "resnet":
        raise ValueError(f"unknown classifier {name!r} (known: {', '.join(CLASSIFIERS)})")
    return ClassifierConfig(model="resnet", epochs=RESNET_EPOCHS, lr=0.1, width=16,
                            optimizer="sgd", weight_decay=5e-4, warmup=0.1,
                            crop_pad=2 if channels == 1 else 4, flip=channels == 3)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3 twice, plus the input (through a 1x1 conv where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        return self.conv2(F.relu(self.bn2(self.conv1(out)))) + skip


class ResNet(nn.Module):
    """Pre-activation ResNet-10: conv3x3 stem, one block per stage at widths w, 2w, 4w, 8w (each
    stage after the first halves the resolution: 28 -> 14 -> 7 -> 4), BN-ReLU, global average
    pool, fc. Runs channels-last, which makes its convolutions faster on the CPU."""

    def __init__(self, channels: int, classes: int, width: int = 16) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(4)]
        self.stem = nn.Conv2d(channels, width, 3, padding=1, bias=False)
        self.stages = nn.Sequential(*(PreActBlock(cin, cout, 1 if i == 0 else 2) for i, (cin, cout)
                                      in enumerate(zip([width] + widths[:-1], widths))))
        self.bn, self.fc = nn.BatchNorm2d(widths[-1]), nn.Linear(widths[-1], classes)
        self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = self.stages(self.stem(x.contiguous(memory_format=torch.channels_last)))
        return self.fc(F.relu(self.bn(x)).mean((2, 3)))


def build(config: ClassifierConfig, channels: int, classes: int) -> nn.Module:
    """The untrained network `config.model` names."""
    if config.model not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {config.model!r} (known: {', '.join(CLASSIFIERS)})")
    return (ResNet if config.model == "resnet" else SmallCNN)(channels, classes, config.width)


def augment(images: torch.Tensor, config: ClassifierConfig) -> torch.Tensor:
    """A random crop of each uint8 image zero-padded by `config.crop_pad` pixels a side, mirrored
    left-right with probability 1/2 when `config.flip` (draws from torch's global stream)."""
    n, c, h, w = images.shape
    out = images
    if config.crop_pad:
        pad = config.crop_pad
        padded = F.pad(images, (pad, pad, pad, pad))
        dy, dx = (torch.randint(0, 2 * pad + 1, (n, 1)) for _ in range(2))
        rows, cols = dy + torch.arange(h), dx + torch.arange(w)  # (n, h), (n, w)
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    if config.flip:
        mirror = torch.rand(n) < 0.5
        out = torch.where(mirror[:, None, None, None], out.flip(3), out)
    return out


def _optimizer(model: nn.Module, config: ClassifierConfig, steps: int
               ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimizer and its per-step schedule: cosine decay to 0, after `warmup` of the steps."""
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, nesterov=True,
                              weight_decay=config.weight_decay)
    elif config.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r} (known: adam, sgd)")
    warm = round(config.warmup * steps)
    if not warm:  # the SmallCNN's schedule as it always was
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))

    def factor(step: int) -> float:
        if step < warm:
            return 0.04 + 0.96 * step / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(steps - warm, 1)))
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 accuracy of `model` on uint8 images (batches go to the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(images), batch):
        pred = model(scaled(images[start:start + batch].to(device))).argmax(1).cpu()
        correct += int((pred == labels[start:start + batch]).sum())
    return correct / max(len(images), 1)


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor,
                     val_y: torch.Tensor, *, classes: int,
                     config: ClassifierConfig = ClassifierConfig(),
                     progress: Progress | None = None,
                     device: str = "cpu") -> tuple[nn.Module, list[float]]:
    """Train on (train_x, train_y); return the model of the best validation epoch and the curve.
    The model trains on `device`; the images stay where they are and move one batch at a time."""
    torch.manual_seed(config.seed)
    model = build(config, train_x.shape[1], classes).to(device)
    steps = config.epochs * ((len(train_x) + config.batch_size - 1) // config.batch_size)
    opt, sched = _optimizer(model, config, steps)
    best, best_acc, curve = copy.deepcopy(model.state_dict()), -1.0, []

    def validate(epoch: int) -> None:
        nonlocal best, best_acc
        acc = accuracy(model, val_x, val_y)
        curve.append(acc)
        if acc > best_acc:
            best, best_acc = copy.deepcopy(model.state_dict()), acc
        if progress:
            progress(f"classifier (epoch {epoch + 1}: validation {acc:.4f})", epoch + 1,
                     config.epochs)

    def inputs(idx: torch.Tensor) -> torch.Tensor:
        batch = train_x[idx]
        moved = augment(batch, config) if config.crop_pad or config.flip else batch
        return scaled(moved.to(device))

    train_epochs(model, inputs, train_y, epochs=config.epochs,
                 batch=config.batch_size, opt=opt, order=lambda: torch.randperm(len(train_x)),
                 sched=sched, after_epoch=validate)
    model.load_state_dict(best)
    return model.eval(), curve


def describe(channels: int, classes: int, width: int, model: str = "smallcnn") -> str:
    """The classifier's architecture in one line, for reports."""
    if model == "resnet":
        w = [width * 2 ** i for i in range(4)]
        return (f"pre-activation ResNet-10: conv3x3({channels}->{w[0]}), one BN-ReLU-conv3x3 x2 "
                f"block per stage at widths {'/'.join(map(str, w))} (stride 1/2/2/2, 1x1 conv "
                f"shortcuts), BN-ReLU, global avgpool, fc({w[-1]}->{classes}); inputs x/127.5 - 1")
    return (f"SmallCNN: conv3x3({channels}->{width})-ReLU-maxpool2, conv3x3({width}->{2 * width})"
            f"-ReLU-maxpool2, adaptive avgpool 4x4, fc({2 * width * 16}->128)-ReLU-dropout(0.25), "
            f"fc(128->{classes}); inputs x/127.5 - 1")


def training(config: ClassifierConfig) -> dict:
    """The recipe in words (optimizer, loss, augmentation) beside its fields, for reports."""
    moves = [f"random crop after zero-padding {config.crop_pad} px"] if config.crop_pad else []
    moves += ["random horizontal flip"] if config.flip else []
    optimizer = ("SGD, Nesterov momentum 0.9" if config.optimizer == "sgd" else "Adam") + (
        f", weight decay {config.weight_decay:g}" if config.weight_decay else "")
    warm = f"linear warm-up over {config.warmup:.0%} of the steps, then " if config.warmup else ""
    return {**config.to_dict(), "optimizer": f"{optimizer}, {warm}cosine learning-rate decay per "
            "step", "loss": "cross-entropy", "augmentation": ", ".join(moves) or "none"}


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
            progress: Progress | None = None) -> dict:
    """Accuracy on `test` of the classifier `config` names trained on `synthetic`, its epoch
    chosen on `val` (real, held out from training) or on a synthetic split; {"skipped": why} when
    labels do not allow it."""
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
            "architecture": describe(channels, len(synthetic.classes), config.width, config.model),
            "recipe": training(config)}
