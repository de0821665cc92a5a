"""Downstream classifiers: the ResNet, its recipe and its augmentation. Tiny images and widths:
seconds on one CPU thread."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from privsynth import downstream
from privsynth.downstream import ClassifierConfig, accuracy, augment, preset, train_classifier


def _quadrants(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey uint8 images of 4 classes: a bright square in the class's quadrant, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (torch.rand(n, 1, size, size, generator=g) * 60).to(torch.uint8)
    half = size // 2
    for i, label in enumerate(y.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * half + 2:r * half + half - 2, c * half + 2:c * half + half - 2] = 255
    return x, y


def test_the_resnet_learns_a_tiny_task_well_above_chance() -> None:
    config = replace(preset("resnet", 1), epochs=4, width=4, batch_size=32)
    (x, y), (vx, vy), (tx, ty) = (_quadrants(n, seed) for n, seed in ((384, 0), (64, 1), (128, 2)))
    model, curve = train_classifier(x, y, vx, vy, classes=4, config=config)
    assert isinstance(model, downstream.ResNet) and len(curve) == 4
    assert accuracy(model, tx, ty) > 0.6  # chance is 0.25


def test_the_resnet_preset_flips_colour_only_and_crops_both() -> None:
    grey, colour = preset("resnet", 1), preset("resnet", 3)
    assert (grey.crop_pad, grey.flip, colour.crop_pad, colour.flip) == (2, False, 4, True)
    assert preset("smallcnn", 3) == ClassifierConfig()  # the SmallCNN keeps its recipe
    with pytest.raises(ValueError, match="unknown classifier"):
        preset("vgg", 1)
    out = downstream.build(colour, 3, 10)(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_augment_moves_each_image_within_its_padding_and_flips_when_asked() -> None:
    x = torch.zeros(64, 1, 12, 12, dtype=torch.uint8)
    x[:, :, 5:7, 3:5] = 200  # a 2x2 block left of centre, 3 px from the border
    torch.manual_seed(0)
    out = augment(x, ClassifierConfig(crop_pad=2))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # moved, never cut off
    rows, cols = (torch.nonzero(out[:, 0] == 200)[:, k].view(64, 4).min(1).values for k in (1, 2))
    assert rows.min() >= 3 and rows.max() <= 7 and cols.min() >= 1 and cols.max() <= 5
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # shifts vary from image to image
    flipped = augment(x, ClassifierConfig(flip=True))
    mirrored = (flipped[:, 0, 5, 7:9] == 200).all(1)  # the block moved to columns 7-8
    assert torch.equal(flipped[mirrored], x[mirrored].flip(3)) and 10 < int(mirrored.sum()) < 54
    assert torch.equal(flipped[~mirrored], x[~mirrored])
