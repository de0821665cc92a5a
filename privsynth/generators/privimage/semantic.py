"""PrivImage's semantic query: a classifier over the public classes, top-k labels, selection.

The query classifier is trained on public images only (no privacy cost), or, when the public
classes are ImageNet classes (folders named by WordNet id, as Tiny-ImageNet's are), it is the
pretrained EfficientNet-Lite0 ImageNet classifier restricted to those classes (`imagenet_query`). Each private image then
gives a multi-hot row of its top-k public labels (L2 norm sqrt(k)); the per-private-class sums of
those rows are released once with Gaussian noise (privsynth.privacy.GaussianSum), and the public
classes are chosen from that noisy histogram alone.
"""
from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from privsynth.classifier import SmallCNN, train_epochs
from privsynth.data import scaled
from privsynth.errors import UsageError


def train_query(images: torch.Tensor, labels: torch.Tensor, classes: int, *, epochs: int,
                batch: int = 128, lr: float = 1e-3, seed: int = 0,
                device: str = "cpu") -> nn.Module:
    """A small CNN classifying public images (uint8, already in the private format) by class."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallCNN(images.shape[1], classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train_epochs(model, lambda idx: scaled(images[idx]).to(device), labels, epochs=epochs,
                 batch=batch, opt=opt, order=lambda: torch.randperm(len(images), generator=gen))
    return model.eval()


@torch.no_grad()
def topk_rows(model: nn.Module, images: torch.Tensor, k: int, *, batch: int = 512,
              device: str = "cpu") -> torch.Tensor:
    """Multi-hot float64 rows (N, public classes) marking each image's top-k public labels."""
    rows = []
    for start in range(0, len(images), batch):
        logits = model(scaled(images[start:start + batch]).to(device)).cpu()
        hot = torch.zeros(logits.shape, dtype=torch.float64)
        rows.append(hot.scatter_(1, logits.topk(k, dim=1).indices, 1.0))
    return torch.cat(rows)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (sorted, as every ImageNet model)."""
    return resources.files("privsynth").joinpath("imagenet_wnids.txt").read_text().split()


class ImageNetQuery(nn.Module):
    """Pretrained ImageNet classifier logits for `public_classes` (WordNet ids) only.

    Input: images scaled to [-1, 1] (as `scaled` gives), grey or RGB, any size; they are resized
    to `input_size` and rescaled to EfficientNet-Lite0's (x*255 - 127) / 128 convention.
    """

    def __init__(self, public_classes: tuple[str, ...], input_size: int = 96,
                 weights: str | None = None) -> None:
        super().__init__()
        from privsynth.features import lite0_imagenet

        index = {w: i for i, w in enumerate(imagenet_wnids())}
        unknown = [c for c in public_classes if c not in index]
        if unknown:
            raise UsageError(f"privimage.query='imagenet' needs public class folders named by "
                             f"ImageNet-1k WordNet ids (e.g. n01443537); not ImageNet: "
                             f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
        self.register_buffer("keep", torch.tensor([index[c] for c in public_classes]))
        self.net, self.input_size = lite0_imagenet(weights).requires_grad_(False), int(input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate((x + 1) / 2, size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False, antialias=x.shape[-1] > self.input_size)
        return self.net(x * (255.0 / 128.0) - (127.0 / 128.0))[:, self.keep]


def select(histogram: torch.Tensor, per_class: int) -> list[list[int]]:
    """Disjoint public classes per private class: the largest noisy cells first, greedily.

    Deterministic given the histogram (ties broken by private, then public index).
    """
    n_priv, n_pub = histogram.shape
    if n_priv * per_class > n_pub:
        raise ValueError(f"{n_priv} private classes x {per_class} cannot be disjoint among "
                         f"{n_pub} public classes")
    cells = sorted(((-float(histogram[i, j]), i, j) for i in range(n_priv) for j in range(n_pub)))
    chosen: list[list[int]] = [[] for _ in range(n_priv)]
    taken: set[int] = set()
    for _, i, j in cells:
        if j not in taken and len(chosen[i]) < per_class:
            chosen[i].append(j)
            taken.add(j)
    return chosen


def random_selection(n_private: int, n_public: int, per_class: int, seed: int) -> list[list[int]]:
    """Disjoint public classes drawn at random (the ablation that ignores the histogram)."""
    if n_private * per_class > n_public:
        raise ValueError(f"{n_private} private classes x {per_class} cannot be disjoint among "
                         f"{n_public} public classes")
    order = torch.randperm(n_public, generator=torch.Generator().manual_seed(seed)).tolist()
    return [sorted(order[i * per_class:(i + 1) * per_class]) for i in range(n_private)]
