"""Membership scores of the canaries, from what a fit released (higher = more likely included).

- dp-mepf's releases (dp-mepf, and privimage's drafts): each `GaussianSum` release of the fit is a
  per-slot sum of clipped rows plus noise. The auditor knows every non-canary private image (the
  owner's own data), so it subtracts their exact contribution; what is left in class y is
  sum over included canaries c of row(c) + noise. Each canary's score is its coefficient in the
  least-squares fit of that residual on the canaries' own rows (all releases stacked, each
  divided by its noise std): 1 or 0 without noise, that plus Gaussian noise with it.
- privimage's UNet: minus its denoising loss on the canary (a trained-on image has lower loss),
  averaged over fixed (timestep, noise) draws below the schedule share it was trained on.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import torch

from privsynth.data import ImageSet
from privsynth.privacy.budget import Charge
from privsynth.privacy.mechanisms import clip_rows

# What one image adds to each dp-mepf release, from its encoder row f (before clipping to the
# release's sensitivity): privsynth.generators.dpmepf.Generator.release.
ROWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "dpmepf.centre": lambda f: torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], 1) / math.sqrt(2),
    "dpmepf.phi1": lambda f: f,
    "dpmepf.phi2": lambda f: f ** 2,
    "dpmepf.counts": lambda f: torch.ones(len(f), 1, dtype=f.dtype),
}


@torch.no_grad()
def encode(encoder: torch.nn.Module, images: ImageSet, batch: int, device: str) -> torch.Tensor:
    """Encoder rows (float64) of uint8 images, as dp-mepf computes them (x / 255, float32)."""
    encoder = encoder.to(device)
    rows = [encoder(images.images[i:i + batch].to(device, torch.float32) / 255.0).float().cpu()
            for i in range(0, len(images), batch)]
    dim = getattr(encoder, "dim", 0)
    return torch.cat(rows).double() if rows else torch.zeros(0, dim, dtype=torch.float64)


def release_scores(releases: list[tuple[Charge, torch.Tensor]], classes: int,
                   known: tuple[torch.Tensor, torch.Tensor],
                   canaries: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor | None:
    """Scores from the captured dp-mepf releases (None when the fit made none).

    `known`: (encoder rows, labels) of the non-canary private images; `canaries`: the same of
    every canary, included or not. Cells (dpmepf.split_bits) are summed back into their class,
    so where the fit cut a class does not matter."""
    used = [(c, total) for c, total in releases if c.name in ROWS]
    if not used:
        return None
    known_rows, known_labels = known
    rows, labels = canaries
    blocks, targets = [], []
    for charge, total in used:
        cells = total.shape[0] // classes
        released = total.double().view(classes, cells, -1).sum(1)
        clip = lambda f: clip_rows(ROWS[charge.name](f), charge.sensitivity)  # noqa: E731
        residual = released.index_add(0, known_labels, -clip(known_rows))
        std = max(charge.noise_multiplier * charge.sensitivity, 1e-12)
        blocks.append(clip(rows) / std)
        targets.append(residual / std)
    scores = torch.zeros(len(rows), dtype=torch.float64)
    for y in range(classes):
        mine = (labels == y).nonzero().flatten()
        if len(mine) == 0:
            continue
        a = torch.cat([b[mine].T for b in blocks])  # (stacked dims) x (canaries of class y)
        b = torch.cat([t[y] for t in targets])[:, None]
        scores[mine] = torch.linalg.lstsq(a, b, driver="gelsd").solution[:, 0]
    return scores


@torch.no_grad()
def unet_scores(model: Path, images: torch.Tensor, labels: torch.Tensor, *, draws: int = 16,
                batch: int = 256, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """Minus the mean denoising loss of privimage's published UNet (`model`: the run's model
    folder, read from its files) on each canary (uint8 images), over `draws` (timestep, noise)
    pairs from a fixed public seed, the same pairs for every canary, below the share of the
    schedule the UNet was trained on."""
    from safetensors.torch import load_file

    from privsynth.generators.privimage import unet

    meta = json.loads((model / "config.json").read_text())
    net = unet.build(unet.UNetConfig.from_dict(meta["unet"]))
    net.load_state_dict(load_file(str(model / "unet.safetensors")))
    net = net.to(device).eval()
    alpha_bar = unet.schedule(device)
    t_max = unet.timesteps_below(float(meta.get("strength", 1.0)))
    gen = torch.Generator().manual_seed(seed)
    shape = images.shape[1:]
    pairs = [(torch.randint(t_max, (1,), generator=gen), torch.randn(shape, generator=gen))
             for _ in range(draws)]
    loss = torch.zeros(len(images), dtype=torch.float64)
    for start in range(0, len(images), batch):
        x = (images[start:start + batch].float() / 127.5 - 1.0).to(device)  # as the UNet trains
        y = labels[start:start + batch].to(device)
        for t, noise in pairs:
            e = noise.expand(len(x), *shape).to(device)
            part = unet.denoising_loss(net, x, t.expand(len(x)).to(device), y, e, alpha_bar)
            loss[start:start + len(x)] += part.double().cpu()
    return -loss / draws
