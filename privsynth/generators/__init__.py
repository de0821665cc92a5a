"""Generators: one module per method, each defining `Config`, `Generator`, `Sampler` and `METHOD`
(the contract is in `generators.base`). A new method is its module plus one line in REGISTRY."""
from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from privsynth.errors import UsageError

if TYPE_CHECKING:
    from privsynth.generators.base import Method

# name (recipes, --method) -> the module that defines its METHOD; imported only when used.
REGISTRY: dict[str, str] = {
    "dp-mepf": "privsynth.generators.dpmepf",
    "privimage": "privsynth.generators.privimage",
}
METHODS = tuple(REGISTRY)


def method(name: str) -> Method:
    """The description of method `name` (its module is imported now)."""
    if name not in REGISTRY:
        raise UsageError(f"unknown method {name!r}; choose one of: {', '.join(REGISTRY)}")
    found = importlib.import_module(REGISTRY[name]).METHOD
    if found.name != name:
        raise RuntimeError(f"{REGISTRY[name]}.METHOD is {found.name!r}, registered as {name!r}")
    return found


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


def ema_update(average, net, decay: float) -> None:
    """average <- decay * average + (1 - decay) * net, parameter by parameter (buffers copied):
    the published weight average of privimage's DP-SGD and of dp-mepf's `ema`."""
    import torch

    with torch.no_grad():
        for a, p in zip(average.parameters(), net.parameters()):
            a.lerp_(p, 1.0 - decay)
        for a, b in zip(average.buffers(), net.buffers()):
            a.copy_(b)


def draw_chunks(labels, seed: int, batch: int, part: tuple[int, int],
                draw: Callable, empty):
    """(images, labels) of share `part` = (i, k) of a sample whose rows are `labels`.

    The rows are cut into chunks of `batch`; share i is the i-th of k runs of whole chunks, and
    chunk c is `draw(its labels, generator)` with a generator seeded from (seed, c) alone. So a
    chunk is the same whichever process draws it, and the k shares concatenated in order are the
    sample one process draws (`part=(0, 1)`). `empty` is what a share with no chunk returns.
    """
    import torch

    from privsynth.distributed import stream

    i, k = part
    if not 0 <= i < k:
        raise ValueError(f"part must be (i, k) with 0 <= i < k, got {part}")
    chunks = -(-len(labels) // batch)
    first, stop = chunks * i // k, chunks * (i + 1) // k
    out = []
    for c in range(first, stop):
        out.append(draw(labels[c * batch:(c + 1) * batch], stream(seed, c)))
    return (torch.cat(out) if out else empty), labels[first * batch:stop * batch]
