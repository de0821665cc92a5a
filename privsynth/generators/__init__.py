"""Generators: one module per method, each exposing `Config`, `Generator` and `Sampler`."""
from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from privsynth.errors import UsageError

METHODS = ("dp-mepf", "privimage")


def method_module(name: str) -> ModuleType:
    """The module implementing method `name`."""
    if name == "dp-mepf":
        from privsynth.generators import dpmepf

        return dpmepf
    if name == "privimage":
        from privsynth.generators import privimage

        return privimage
    raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")


def draw_labels(n: int, class_weights: Sequence[float], *, balanced: bool, generator):
    """n labels in random order: exactly round(n * p) per class (largest-remainder rounding),
    p the fitted class weights (noisy, so publishable) or uniform when `balanced`."""
    import torch

    k = len(class_weights)
    probs = torch.full((k,), 1.0 / k) if balanced else torch.tensor(list(class_weights))
    raw = probs / probs.sum() * n
    counts = raw.floor().long()
    for i in torch.argsort(raw - counts, descending=True)[: n - int(counts.sum())]:
        counts[i] += 1
    labels = torch.repeat_interleave(torch.arange(k), counts)
    return labels[torch.randperm(n, generator=generator)]
