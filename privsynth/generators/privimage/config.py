"""PrivImage's settings (`[privimage]` in a recipe) and the charges they plan.

`draft = "dp-mepf"` (our extension; PrivImage as published is `draft = "none"`): part of the budget
pays for dp-mepf's releases (`[privimage.dpmepf]`, privsynth.generators.dpmepf). Its generator's
images ("drafts", post-processing) pretrain the UNet after the public pretraining, and sampling
starts from a draft noised to `strength` of the diffusion schedule instead of from pure noise
(SDEdit), so the UNet is trained and used only on timesteps below strength * T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from privsynth.errors import UsageError
from privsynth.generators import dpmepf
from privsynth.generators.privimage import unet
from privsynth.privacy import Charge
from privsynth.privacy.dpsgd import GRAD_SAMPLE_MODES

DRAFTS = ("dp-mepf", "none")


def draft_default() -> dpmepf.Config:
    """dp-mepf as the drafts use it by default: the best configuration measured for dp-mepf
    itself (benchmarks/RESULTS.md), with fewer generator steps."""
    return dpmepf.Config(split_bits=3, split_noise=0.15, batch_per_class=16, unbiased=True,
                         lr=3e-3, judge=True, scatter_judge=True, steps=2000)


@dataclass(frozen=True)
class Config:
    """PrivImage settings; defaults are a CPU-sized run (small UNet, 28-32 px)."""

    query_topk: int = 1  # public labels per private image (histogram sensitivity sqrt(k))
    query_sigma: float = 20.0  # noise multiplier of the histogram (std = sigma * sqrt(k))
    query_epochs: int = 5  # epochs of the public query classifier
    query: str = "train"  # "train": a small CNN trained on the public images; "imagenet": the
    # pretrained EfficientNet-Lite0 ImageNet head restricted to the public classes (WordNet ids)
    query_input: int = 96  # image side fed to the ImageNet query classifier
    select_per_class: int = 2  # public classes chosen per private class (disjoint)
    selection: str = "semantic"  # "semantic" (noisy histogram) or "random" (ablation baseline)
    width: int = 32  # UNet channels at full resolution (then 2x, 2x at the lower levels)
    attention_levels: int = 1  # self-attention at this many of the lowest levels (0, 1 or 2;
    # the middle block, at the lowest level, always has it)
    label_dropout: float = 0.1  # share of labels replaced by "no label" (classifier-free guidance)
    pretrain_steps: int = 100  # public pretraining updates (no privacy cost)
    pretrain_batch: int = 64
    pretrain_lr: float = 2e-3  # Adam
    draft: str = "dp-mepf"  # warm start and sampling start: "dp-mepf" drafts, or "none"
    draft_noise: float = 0.5  # the draft releases' noise scale as a multiple of DP-SGD's sigma
    # (calibrated together: smaller puts more of epsilon into the drafts)
    draft_images: int = 10000  # drafts drawn (post-processing) to pretrain the UNet on
    draft_steps: int = 600  # UNet updates on the drafts (batch pretrain_batch, no privacy cost)
    strength: float = 0.3  # share of the diffusion schedule trained and sampled: a sample is a
    # draft noised to timestep strength * T, then denoised (1 = from pure noise, no draft)
    dpmepf: dpmepf.Config = field(default_factory=draft_default)  # the drafts' dp-mepf
    dp_steps: int = 40  # DP-SGD steps T (each one Poisson batch; 0: no DP fine-tuning)
    dp_batch: int = 512  # expected Poisson batch size in privacy units; q = dp_batch / N units
    physical_batch: int = 128  # examples per per-sample-gradient pass (memory, not privacy)
    clip: float = 1.0  # per-unit gradient L2 bound C
    dp_lr: float = 5e-4  # Adam on the noisy gradient
    noise_draws: int = 1  # (timestep, noise) draws averaged per example before clipping
    unit_images: int = 8  # user-level: images of one unit per DP-SGD step, at most (compute only)
    ema: float = 0.9  # EMA decay of the fine-tuned weights that are published
    grad_sample_mode: str = "vmap"  # torch.func vmap, or "functorch" (opacus; exact, slower)
    sample_steps: int = 3  # DDIM steps when sampling (over the strength * T timesteps used)
    guidance: float = 1.0  # classifier-free guidance scale (1 = plain conditional, one pass)

    def __post_init__(self) -> None:
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise UsageError(f"privimage.grad_sample_mode must be one of "
                             f"{', '.join(GRAD_SAMPLE_MODES)}, got {self.grad_sample_mode!r}")
        if min(self.query_topk, self.select_per_class, self.noise_draws, self.unit_images,
               self.sample_steps) < 1:
            raise UsageError("privimage.query_topk, select_per_class, noise_draws, unit_images "
                             "and sample_steps must be >= 1")
        if not (self.query_sigma > 0 and self.clip > 0 and 0 <= self.ema < 1):
            raise UsageError("privimage: query_sigma and clip must be > 0, ema in [0, 1)")
        if self.query not in ("train", "imagenet"):
            raise UsageError(f"privimage.query must be 'train' or 'imagenet', got {self.query!r}")
        if self.selection not in ("semantic", "random"):
            raise UsageError(f"privimage.selection must be 'semantic' or 'random', "
                             f"got {self.selection!r}")
        if self.attention_levels not in (0, 1, 2):
            raise UsageError(f"privimage.attention_levels must be 0, 1 or 2, "
                             f"got {self.attention_levels!r}")
        if not 0 <= self.label_dropout < 1:
            raise UsageError("privimage.label_dropout must be in [0, 1)")
        if self.draft not in DRAFTS:
            raise UsageError(f"privimage.draft must be one of {', '.join(DRAFTS)}, "
                             f"got {self.draft!r}")
        if not 0 < self.strength <= 1:
            raise UsageError(f"privimage.strength must be in (0, 1], got {self.strength}")
        if self.draft == "none" and self.strength < 1:
            raise UsageError("privimage.strength < 1 starts sampling from drafts: it needs "
                             "privimage.draft = 'dp-mepf' (or strength = 1)")
        if min(self.dp_steps, self.draft_steps, self.pretrain_steps) < 0:
            raise UsageError("privimage.dp_steps, draft_steps and pretrain_steps must be >= 0")
        if self.draft == "none" and self.dp_steps == 0:
            raise UsageError("privimage with draft = 'none' needs dp_steps >= 1: nothing else "
                             "would learn from the private images")
        if self.draft_noise <= 0 or self.draft_images < 1:
            raise UsageError("privimage.draft_noise must be > 0 and draft_images >= 1")

    @property
    def t_max(self) -> int:
        """Timesteps trained and sampled: 0 .. t_max - 1."""
        return unet.timesteps_below(self.strength)

    def plan(self, scale: float, n: int) -> list[Charge]:
        """Every release for N = `n` privacy units at noise scale `scale`: the drafts' dp-mepf
        releases (at draft_noise * scale), the query (fixed sigma), DP-SGD (sigma = scale)."""
        k = self.query_topk
        charges = self.dpmepf.plan(scale * self.draft_noise, n) if self.draft != "none" else []
        charges.append(Charge("privimage.query", self.query_sigma, 1.0, 1, math.sqrt(k),
                              f"per-private-class histogram of each image's top-{k} public "
                              "labels"))
        if self.dp_steps:
            charges.append(Charge("privimage.dpsgd", scale, min(self.dp_batch / n, 1.0),
                                  self.dp_steps, self.clip, "UNet weights fine-tuned by DP-SGD "
                                  "(one clipped gradient per sampled privacy unit + Gaussian "
                                  "noise, Poisson sampling of units)"))
        return charges
