"""A class-conditional diffusers `UNet2DModel`, its DDPM loss and DDIM sampling with guidance.

Label `classes` (one past the last class) is the "no label" used for classifier-free guidance.
GroupNorm only (no BatchNorm), so the model can be trained with DP-SGD.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

TRAIN_TIMESTEPS = 1000  # DDPM schedule length (linear betas, as in DDPM)


@dataclass(frozen=True)
class UNetConfig:
    """Shape of the denoiser."""

    classes: int  # private classes; label `classes` means "unconditional"
    channels: int  # image channels (1 or 3)
    resolution: int  # image side; must be divisible by 2 ** (len(widths) - 1)
    widths: tuple[int, ...] = (32, 64, 64)  # channels per resolution level
    attention: tuple[bool, ...] = (False, True, True)  # self-attention at each level
    layers_per_block: int = 1  # ResNet blocks per level
    groups: int = 8  # GroupNorm groups (must divide every width)

    def to_dict(self) -> dict:
        """JSON-able form (for config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        """Inverse of `to_dict`."""
        return cls(**{**d, "widths": tuple(d["widths"]), "attention": tuple(d["attention"])})


def build(cfg: UNetConfig) -> nn.Module:
    """The diffusers UNet2DModel for `cfg`."""
    from diffusers import UNet2DModel

    if len(cfg.widths) != len(cfg.attention):
        raise ValueError("widths and attention must have the same length")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention))
    return UNet2DModel(sample_size=cfg.resolution, in_channels=cfg.channels,
                       out_channels=cfg.channels, block_out_channels=cfg.widths,
                       layers_per_block=cfg.layers_per_block, down_block_types=down,
                       up_block_types=up, norm_num_groups=cfg.groups,
                       num_class_embeds=cfg.classes + 1, attention_head_dim=min(cfg.widths))


def schedule(device: str | torch.device = "cpu") -> torch.Tensor:
    """sqrt of cumulative alpha-bar for the linear DDPM betas, per timestep."""
    betas = torch.linspace(1e-4, 0.02, TRAIN_TIMESTEPS, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float().to(device)


def denoising_loss(net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                   eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-row epsilon-prediction MSE at timesteps `t` (x in [-1, 1])."""
    a = alpha_bar[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x + (1 - a).sqrt() * eps
    pred = net(noisy, t, class_labels=y).sample
    return (pred - eps).pow(2).flatten(1).mean(1)


def drop_labels(y: torch.Tensor, classes: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """Replace a `share` of labels by the "no label" class `classes` (classifier-free guidance)."""
    drop = torch.rand(len(y), generator=gen) < share
    return torch.where(drop, torch.full_like(y, classes), y)


def timesteps_below(strength: float) -> int:
    """How many timesteps (0 .. n - 1) a `strength` share of the schedule spans (at least 1)."""
    return max(1, round(strength * TRAIN_TIMESTEPS))


def loss_draws(x: torch.Tensor, gen: torch.Generator,
               t_max: int = TRAIN_TIMESTEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """A random timestep below `t_max` and a noise image per row of `x`: the DDPM loss's inputs
    (on x's device)."""
    t = torch.randint(t_max, (len(x),), generator=gen).to(x.device)
    return t, torch.randn(x.shape, generator=gen).to(x.device)


@torch.no_grad()
def ddim_sample(model: nn.Module, labels: torch.Tensor, cfg: UNetConfig, *, steps: int,
                guidance: float, generator: torch.Generator, start: torch.Tensor | None = None,
                t_start: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """Images in [-1, 1] for `labels` by deterministic DDIM (eta 0, x0 clipped to [-1, 1]) with
    classifier-free guidance (`guidance` 1: the conditional model alone, one pass per step).

    From pure noise by default; with `start` (images in [-1, 1]) and `t_start` < T, each image is
    first noised to timestep t_start - 1 and denoised from there (SDEdit): `steps` DDIM steps
    spread evenly over t_start - 1 .. 0. All draws come from `generator` (on the CPU)."""
    device = next(model.parameters()).device
    alpha_bar = schedule(device)
    times = torch.linspace(t_start - 1, 0, steps).round().long().tolist()
    shape = (len(labels), cfg.channels, cfg.resolution, cfg.resolution)
    noise = torch.randn(shape, generator=generator).to(device)
    if start is None:
        x = noise
    else:
        a = alpha_bar[times[0]]
        x = a.sqrt() * start.to(device) + (1 - a).sqrt() * noise
    labels = labels.to(device)
    null = torch.full_like(labels, cfg.classes)
    for i, t in enumerate(times):
        tt = torch.full((len(labels),), t, device=device, dtype=torch.long)
        if guidance == 1.0:
            eps = model(x, tt, class_labels=labels).sample
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]),
                         class_labels=torch.cat([labels, null])).sample
            cond, uncond = both.chunk(2)
            eps = uncond + guidance * (cond - uncond)
        a = alpha_bar[t]
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        if i + 1 == len(times):
            return x0
        a_next = alpha_bar[times[i + 1]]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x.clamp(-1, 1)
