"""PrivImage (Li et al., arXiv 2311.12850): semantic query -> selected public pretraining -> DP-SGD.

1. A classifier over the public classes (trained on public images only) gives each private image
   its top-k public labels; the per-private-class histogram of those labels is released once with
   Gaussian noise (L2 sensitivity sqrt(k)).
2. From the noisy histogram alone, each private class picks its own disjoint public classes; their
   images, relabelled with that private class, pretrain a class-conditional diffusion UNet.
3. The UNet is fine-tuned on the private images with DP-SGD (privsynth.privacy.dpsgd).
Both charges are calibrated together before any private pixel is read: the query's sigma is set in
the recipe, and DP-SGD's sigma is the smallest that fits what is left of the budget.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from privsynth.data import Listing, load, scan
from privsynth.errors import DataError, UsageError
from privsynth.generators import draw_labels, semantic, unet
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.privacy.dpsgd import DPSGD, GRAD_SAMPLE_MODES, PerSampleGradients, clipped_sum

Progress = Callable[[str, int, int], None]
USES_PUBLIC = True  # run.fit passes the --public folder to Generator.fit
USES_ENCODER = False  # no perceptual encoder: the [features] section is not used


@dataclass(frozen=True)
class Config:
    """PrivImage settings; defaults are a CPU-sized run (tiny UNet, 28-32 px)."""

    query_topk: int = 1  # public labels per private image (histogram sensitivity sqrt(k))
    query_sigma: float = 20.0  # noise multiplier of the histogram (std = sigma * sqrt(k))
    query_epochs: int = 5  # epochs of the public query classifier
    query: str = "train"  # "train": a small CNN trained on the public images; "imagenet": the
    # pretrained EfficientNet-Lite0 ImageNet head restricted to the public classes (WordNet ids)
    query_input: int = 96  # image side fed to the ImageNet query classifier
    select_per_class: int = 2  # public classes chosen per private class (disjoint)
    selection: str = "semantic"  # "semantic" (noisy histogram) or "random" (ablation baseline)
    width: int = 32  # UNet channels at full resolution (then 2x, 2x at the lower levels)
    attention: bool = True  # self-attention at the two lower levels
    label_dropout: float = 0.1  # share of labels replaced by "no label" (classifier-free guidance)
    pretrain_steps: int = 300  # public pretraining updates (no privacy cost)
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3  # Adam
    dp_steps: int = 100  # DP-SGD steps T (each one Poisson batch)
    dp_batch: int = 64  # expected Poisson batch size; sample rate q = dp_batch / N
    physical_batch: int = 32  # examples per per-sample-gradient pass (memory, not privacy)
    clip: float = 1.0  # per-sample gradient L2 bound C
    dp_lr: float = 5e-4  # Adam on the noisy gradient
    noise_draws: int = 1  # (timestep, noise) draws averaged per example before clipping
    ema: float = 0.99  # EMA decay of the fine-tuned weights that are published
    grad_sample_mode: str = "vmap"  # torch.func vmap, or "functorch" (opacus; exact, slower)
    sample_steps: int = 25  # DDIM steps when sampling
    guidance: float = 2.0  # classifier-free guidance scale (1 = plain conditional)

    def __post_init__(self) -> None:
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise UsageError(f"privimage.grad_sample_mode must be one of "
                             f"{', '.join(GRAD_SAMPLE_MODES)}, got {self.grad_sample_mode!r}")
        if self.query_topk < 1 or self.select_per_class < 1 or self.noise_draws < 1:
            raise UsageError("privimage.query_topk, select_per_class and noise_draws must be >= 1")
        if not (self.query_sigma > 0 and self.clip > 0 and 0 <= self.ema < 1):
            raise UsageError("privimage: query_sigma and clip must be > 0, ema in [0, 1)")
        if self.query not in ("train", "imagenet"):
            raise UsageError(f"privimage.query must be 'train' or 'imagenet', got {self.query!r}")
        if self.selection not in ("semantic", "random"):
            raise UsageError(f"privimage.selection must be 'semantic' or 'random', "
                             f"got {self.selection!r}")
        if not 0 <= self.label_dropout < 1:
            raise UsageError("privimage.label_dropout must be in [0, 1)")

    def plan(self, scale: float, n: int) -> list[Charge]:
        """The query (fixed sigma) and DP-SGD (sigma = scale) for N = `n` private files."""
        k = self.query_topk
        return [Charge("privimage.query", self.query_sigma, 1.0, 1, math.sqrt(k),
                       f"per-private-class histogram of each image's top-{k} public labels"),
                Charge("privimage.dpsgd", scale, min(self.dp_batch / n, 1.0), self.dp_steps,
                       self.clip, "UNet weights fine-tuned by DP-SGD (clipped per-sample "
                       "gradients + Gaussian noise, Poisson sampling)")]


def privacy_statement(config: Config) -> dict:
    """What the certificate says about this method beyond its charges."""
    return {"privacy_unit": "one image file",
            "post_processing": "public-class selection from the noisy histogram, pretraining on "
                               "public images, sampling from the DP-SGD model; class proportions "
                               "from the noisy histogram",
            "notes": [f"Each private image adds one row with exactly {config.query_topk} ones to "
                      "its class's histogram row (L2 sensitivity sqrt(k)).",
                      "DP-SGD: each step keeps every private image with probability q (Poisson, "
                      "from OS entropy), clips each image's gradient (averaged over its "
                      f"{config.noise_draws} noise draws) to L2 norm {config.clip:g}, and adds "
                      "Gaussian noise once per step, empty batches included.",
                      "Files that cannot be decoded are skipped independently of other files."],
            "unprotected": ["the number of private image files N, which sets the DP-SGD sample "
                            "rate q = dp_batch / N"]}


class Generator:
    """Fits PrivImage: `Generator(config, None, ...).fit(private, budget, public=...)`."""

    def __init__(self, config: Config, encoder: object = None, *, resolution: int, channels: int,
                 device: str = "cpu") -> None:
        self.config, self.resolution, self.channels, self.device = config, resolution, channels, device
        self.unet = unet.UNetConfig(0, channels, resolution, (config.width, 2 * config.width,
                                    2 * config.width), (False, config.attention, config.attention),
                                    groups=min(8, config.width))
        if resolution % 4:
            raise UsageError(f"privimage needs data.resolution divisible by 4, got {resolution}")
        self.rejects: list[tuple[str, str]] = []

    def fit(self, private: Listing, budget: Budget, *, public: Path | None = None, seed: int = 0,
            progress: Progress | None = None) -> "Sampler":
        """Charge both stages, query, select, pretrain on public images, fine-tune with DP-SGD."""
        pub = self._public_listing(public, len(private.classes))
        charges = budget.calibrate(lambda s: self.config.plan(s, len(private.files)))
        budget.charge(charges)  # before any private pixel is read
        cfg = self.config
        pub_set = load(pub, resolution=self.resolution, channels=self.channels)
        if cfg.query == "imagenet":
            query = semantic.ImageNetQuery(pub.classes, cfg.query_input).to(self.device)
        else:
            _report(progress, "training the public query classifier", 0, 1)
            query = semantic.train_query(pub_set.images, pub_set.labels, len(pub.classes),
                                         epochs=cfg.query_epochs, seed=seed, device=self.device)
        priv = load(private, resolution=self.resolution, channels=self.channels)
        self.rejects = list(priv.rejects)
        hist = self.release_histogram(query, priv, budget, charges[0], len(pub.classes))
        chosen = (semantic.select(hist, cfg.select_per_class) if cfg.selection == "semantic" else
                  semantic.random_selection(len(private.classes), len(pub.classes),
                                            cfg.select_per_class, seed))
        model = self.pretrain(pub_set, chosen, len(private.classes), seed, progress)
        ema = self.finetune(model, priv, budget, charges[1], seed, progress)
        weights = (hist.sum(1) / cfg.query_topk).clamp(min=1.0)
        selection = {private.classes[i]: [pub.classes[j] for j in js] for i, js in enumerate(chosen)}
        return Sampler(ema.cpu().eval(), self._unet(len(private.classes)), private.classes,
                       (weights / weights.sum()).tolist(), cfg.sample_steps, cfg.guidance, selection)

    def _unet(self, classes: int) -> unet.UNetConfig:
        return replace(self.unet, classes=classes)

    def _public_listing(self, public: Path | None, n_private_classes: int) -> Listing:
        if public is None:
            raise UsageError("privimage needs --public: a labelled public image folder")
        pub = scan(public)
        if not pub.labelled:
            raise DataError(f"public folder {public} has no class labels (ImageFolder needed)")
        if n_private_classes * self.config.select_per_class > len(pub.classes):
            raise UsageError(f"{n_private_classes} private classes x privimage.select_per_class="
                             f"{self.config.select_per_class} exceeds the {len(pub.classes)} "
                             "public classes")
        return pub

    def release_histogram(self, query: torch.nn.Module, priv, budget: Budget, charge: Charge,
                          n_public: int) -> torch.Tensor:
        """Noisy (private classes x public classes) histogram of top-k public labels."""
        mech = GaussianSum(budget, charge, len(priv.classes), n_public, NoiseSource())
        rows = semantic.topk_rows(query, priv.images, self.config.query_topk, device=self.device)
        mech.add(rows, priv.labels)
        return mech.release()

    def pretrain(self, pub_set, chosen: list[list[int]], classes: int, seed: int,
                 progress: Progress | None) -> torch.nn.Module:
        """Class-conditional denoiser on the selected public images, relabelled (no privacy cost)."""
        cfg = self.config
        relabel = torch.full((len(pub_set.classes),), -1, dtype=torch.long)
        for i, js in enumerate(chosen):
            relabel[js] = i
        y_all = relabel[pub_set.labels]
        keep = y_all >= 0
        x_all, y_all = semantic.scaled(pub_set.images[keep]), y_all[keep]
        torch.manual_seed(seed)
        model = unet.build(self._unet(classes)).to(self.device)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.pretrain_lr)
        alpha_bar = unet.schedule(self.device)
        gen = torch.Generator().manual_seed(seed)
        for step in range(cfg.pretrain_steps):
            idx = torch.randint(len(x_all), (cfg.pretrain_batch,), generator=gen)
            x, y = x_all[idx].to(self.device), self._drop(y_all[idx], classes, gen)
            t, eps = self._noise_for(x, gen)
            loss = unet.denoising_loss(model, x, t, y.to(self.device), eps, alpha_bar).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _report(progress, f"pretraining on public images (loss {loss.item():.3f})", step + 1,
                    cfg.pretrain_steps)
        return model

    def finetune(self, model: torch.nn.Module, priv, budget: Budget, charge: Charge, seed: int,
                 progress: Progress | None) -> torch.nn.Module:
        """DP-SGD on the private images; returns the EMA of the fine-tuned weights."""
        cfg, classes, m = self.config, len(priv.classes), self.config.noise_draws
        ema = copy.deepcopy(model).requires_grad_(False)
        grads = PerSampleGradients(model, cfg.grad_sample_mode)
        mech = DPSGD(budget, charge, expected_batch=cfg.dp_batch, noise=NoiseSource())
        opt = torch.optim.Adam(grads.params, lr=cfg.dp_lr)
        alpha_bar = unet.schedule(self.device)
        loss = lambda net, x, t, y, e: unet.denoising_loss(net, x, t, y, e, alpha_bar)  # noqa: E731
        gen = torch.Generator().manual_seed(seed + 1)
        for step, batch in enumerate(mech.batches(len(priv))):
            sums = [torch.zeros_like(p) for p in grads.params]
            for start in range(0, len(batch), cfg.physical_batch):
                idx = torch.from_numpy(batch[start:start + cfg.physical_batch])
                x = semantic.scaled(priv.images[idx]).repeat_interleave(m, 0).to(self.device)
                y = self._drop(priv.labels[idx].repeat_interleave(m, 0), classes, gen)
                t, eps = self._noise_for(x, gen)
                rows = grads(loss, x, t, y.to(self.device), eps, group=m)
                sums = [s + c for s, c in zip(sums, clipped_sum(rows, cfg.clip))]
            for p, g in zip(grads.params, mech.noisy_gradient(sums)):
                p.grad = g
            opt.step()
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(p, 1 - cfg.ema)
            _report(progress, f"DP-SGD fine-tuning (batch {len(batch)})", step + 1, charge.steps)
        grads.close()
        return ema

    def _drop(self, y: torch.Tensor, classes: int, gen: torch.Generator) -> torch.Tensor:
        """Replace a `label_dropout` share of labels by the "no label" class."""
        drop = torch.rand(len(y), generator=gen) < self.config.label_dropout
        return torch.where(drop, torch.full_like(y, classes), y)

    def _noise_for(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.randint(unet.TRAIN_TIMESTEPS, (len(x),), generator=gen).to(self.device)
        return t, torch.randn(x.shape, generator=gen).to(self.device)


def _report(progress: Progress | None, what: str, done: int, total: int) -> None:
    if progress and (done % 10 == 0 or done == total):
        progress(what, done, total)


class Sampler:
    """A fitted PrivImage denoiser (EMA of the DP-SGD weights): safe to publish."""

    method = "privimage"

    def __init__(self, model: torch.nn.Module, cfg: unet.UNetConfig, classes: tuple[str, ...],
                 class_weights: list[float], steps: int, guidance: float,
                 selection: dict[str, list[str]]) -> None:
        self.model, self.cfg, self.classes = model, cfg, tuple(classes)
        self.class_weights, self.steps, self.guidance = list(class_weights), steps, guidance
        self.selection = selection

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, balanced: bool = False,
               batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
        """n images (uint8, N x C x H x W) and labels; classes from the noisy histogram."""
        gen = torch.Generator().manual_seed(seed)
        labels = draw_labels(n, self.class_weights, balanced=balanced, generator=gen)
        out = []
        for start in range(0, n, batch):
            x = unet.ddim_sample(self.model, labels[start:start + batch], self.cfg,
                                 steps=self.steps, guidance=self.guidance, generator=gen)
            out.append(((x.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        return torch.cat(out), labels

    def to(self, device: str) -> "Sampler":
        """Move the denoiser to `device` (e.g. 'cuda'); starting noise is still drawn on the CPU."""
        self.model.to(device)
        return self

    def save(self, folder: Path) -> None:
        """Write `unet.safetensors` and `config.json` (no pickles)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  str(folder / "unet.safetensors"))
        meta = {"method": self.method, "unet": self.cfg.to_dict(), "classes": list(self.classes),
                "class_weights": self.class_weights, "sample_steps": self.steps,
                "guidance": self.guidance, "selection": self.selection}
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Sampler":
        """Read a sampler written by `save`."""
        meta = json.loads((folder / "config.json").read_text())
        cfg = unet.UNetConfig.from_dict(meta["unet"])
        model = unet.build(cfg)
        model.load_state_dict(load_file(str(folder / "unet.safetensors")))
        return cls(model.eval(), cfg, tuple(meta["classes"]), meta["class_weights"],
                   meta["sample_steps"], meta["guidance"], meta["selection"])
