"""PrivImage (Li et al., arXiv 2311.12850): semantic query -> selected public pretraining -> DP-SGD.

1. A classifier over the public classes (trained on public images only) gives each private image
   its top-k public labels; the per-private-class histogram of those labels is released once with
   Gaussian noise (L2 sensitivity sqrt(k) per privacy unit: a unit's rows are weighted 1/m).
2. From the noisy histogram alone, each private class picks its own disjoint public classes; their
   images, relabelled with that private class, pretrain a class-conditional diffusion UNet.
3. The UNet is fine-tuned on the private images with DP-SGD over privacy units (finetune.py).
Both charges are calibrated together before any private pixel is read: the query's sigma is set in
the recipe, and DP-SGD's sigma is the smallest that fits what is left of the budget.

Resumable: with a `WorkState`, the noisy histogram and the selection are saved right after the
release (a resumed fit never releases it again: that would be a second, uncharged release), the
pretrained UNet after pretraining (periodically during it too), and DP-SGD is checkpointed.

Data-parallel under torchrun (privsynth.distributed): every rank runs `fit`; the histogram rows
and the DP-SGD clipped sums are computed on each rank's share of the private images (units) and
summed over the ranks before the one noise draw (by rank 0), and pretraining is torch DDP over
shares of each batch. Every rank builds the same query classifier (a row has norm sqrt(k)
whatever it outputs). Only rank 0 gets a `WorkState`: it alone keeps checkpoints.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from privsynth import distributed
from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet, Listing, load, scan
from privsynth.errors import DataError, UsageError
from privsynth.generators import draw_chunks, draw_labels, finetune, pretrain, semantic, unet
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.privacy.dpsgd import GRAD_SAMPLE_MODES

Progress = Callable[[str, int, int], None]
USES_PUBLIC = True  # run.fit passes the --public folder to Generator.fit
USES_ENCODER = False  # no perceptual encoder: the [features] section is not used
RESUMABLE = True  # fit() accepts a WorkState and continues from it
USER_LEVEL = True  # both mechanisms bound a whole privacy unit (privacy.unit), not one image
DATA_PARALLEL = True  # under torchrun, every rank trains on its share (see the module doc)


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
    attention_levels: int = 2  # self-attention at this many of the lowest levels (0, 1 or 2;
    # the middle block, at the lowest level, always has it)
    label_dropout: float = 0.1  # share of labels replaced by "no label" (classifier-free guidance)
    pretrain_steps: int = 300  # public pretraining updates (no privacy cost)
    pretrain_batch: int = 64
    pretrain_lr: float = 1e-3  # Adam
    dp_steps: int = 100  # DP-SGD steps T (each one Poisson batch)
    dp_batch: int = 64  # expected Poisson batch size in privacy units; q = dp_batch / N units
    physical_batch: int = 32  # examples per per-sample-gradient pass (memory, not privacy)
    clip: float = 1.0  # per-unit gradient L2 bound C
    dp_lr: float = 5e-4  # Adam on the noisy gradient
    noise_draws: int = 1  # (timestep, noise) draws averaged per example before clipping
    unit_images: int = 8  # user-level: images of one unit per DP-SGD step, at most (compute only)
    ema: float = 0.99  # EMA decay of the fine-tuned weights that are published
    grad_sample_mode: str = "vmap"  # torch.func vmap, or "functorch" (opacus; exact, slower)
    sample_steps: int = 25  # DDIM steps when sampling
    guidance: float = 2.0  # classifier-free guidance scale (1 = plain conditional)

    def __post_init__(self) -> None:
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise UsageError(f"privimage.grad_sample_mode must be one of "
                             f"{', '.join(GRAD_SAMPLE_MODES)}, got {self.grad_sample_mode!r}")
        if min(self.query_topk, self.select_per_class, self.noise_draws, self.unit_images) < 1:
            raise UsageError("privimage.query_topk, select_per_class, noise_draws and unit_images "
                             "must be >= 1")
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

    def plan(self, scale: float, n: int) -> list[Charge]:
        """The query (fixed sigma) and DP-SGD (sigma = scale) for N = `n` privacy units."""
        k = self.query_topk
        return [Charge("privimage.query", self.query_sigma, 1.0, 1, math.sqrt(k),
                       f"per-private-class histogram of each image's top-{k} public labels"),
                Charge("privimage.dpsgd", scale, min(self.dp_batch / n, 1.0), self.dp_steps,
                       self.clip, "UNet weights fine-tuned by DP-SGD (one clipped gradient per "
                       "sampled privacy unit + Gaussian noise, Poisson sampling of units)")]


def privacy_statement(config: Config, unit: str = "image") -> dict:
    """What the certificate says about this method beyond its charges (`unit`: privacy.unit)."""
    k, c, m, per_image = config.query_topk, config.clip, config.noise_draws, unit == "image"
    who = "private image file" if per_image else "privacy unit"
    hist = (f"Each private image adds one row with exactly {k} ones to its class's histogram row "
            "(L2 sensitivity sqrt(k))." if per_image else
            f"Histogram: a unit with m listed images adds each image's row (k = {k} ones) with "
            "weight 1/m, so the whole unit moves the histogram by at most sqrt(k).")
    grad = (f"clips each image's gradient (averaged over its {m} noise draws)" if per_image else
            f"averages the per-image gradients of at most {config.unit_images} of a kept unit's "
            f"images (drawn at random each step; each over its {m} noise draws) and clips that")
    notes = [hist, f"DP-SGD: each step keeps every {who} with probability q (Poisson), {grad} to "
                   f"L2 norm {c:g} as one row, and adds Gaussian noise once per step, empty "
                   "batches included. The batch, the noise and the per-example draws (timesteps, "
                   "noise images, label dropout) all come from OS entropy.",
             "Files that cannot be decoded are skipped independently of other files"
             + ("." if per_image else " (a unit's weight 1/m counts its listed files).")]
    stmt = {"privacy_unit": "one image file",
            "post_processing": "public-class selection from the noisy histogram, pretraining on "
                               "public images, sampling from the DP-SGD model; class proportions "
                               "from the noisy histogram",
            "notes": notes,
            "unprotected": [f"the number of {who}s N, which sets the DP-SGD sample rate "
                            "q = dp_batch / N"]}
    if per_image:
        return stmt
    return dict(stmt, unit_bound=f"histogram: a unit's m image rows are weighted 1/m, so the unit "
                                 f"adds at most sqrt(k) = {math.sqrt(k):.4g}; DP-SGD: a unit's "
                                 f"images' gradients are averaged into one row clipped to "
                                 f"C = {c:g}, and sampling is per unit")


class Generator:
    """Fits PrivImage: `Generator(config, None, ...).fit(private, budget, public=...)`."""

    def __init__(self, config: Config, encoder: object = None, *, resolution: int, channels: int,
                 device: str = "cpu") -> None:
        self.config, self.resolution, self.channels, self.device = config, resolution, channels, device
        attention = (False, config.attention_levels >= 2, config.attention_levels >= 1)
        self.unet = unet.UNetConfig(0, channels, resolution, (config.width, 2 * config.width,
                                    2 * config.width), attention, groups=min(8, config.width))
        if resolution % 4:
            raise UsageError(f"privimage needs data.resolution divisible by 4, got {resolution}")
        self.rejects: list[tuple[str, str]] = []

    def plan(self, budget: Budget, n: int) -> list[Charge]:
        """Calibrate both stages for `n` privacy units and charge them (before any pixel is read).

        A resumed fit finds its charges already recorded (written ahead before the interrupted
        attempt drew noise) and reuses them, after checking they are this recipe's for `n` units.
        """
        pending = budget.unclaimed()
        if not pending:
            charges = budget.calibrate(lambda s: self.config.plan(s, n))
            budget.charge(charges)
            return charges
        if sorted(c.name for c in pending) != ["privimage.dpsgd", "privimage.query"]:
            raise UsageError(f"the recorded charges {sorted(c.name for c in pending)} do not "
                             "match this recipe's releases")
        by_name = {c.name: c for c in pending}
        sigma = by_name["privimage.dpsgd"].noise_multiplier
        if self.config.plan(sigma, n) != [by_name["privimage.query"], by_name["privimage.dpsgd"]]:
            raise DataError(f"the recorded charges were planned for another number of privacy "
                            f"units than the {n} the private folder has now: it changed since the "
                            "fit began")
        return [by_name["privimage.query"], by_name["privimage.dpsgd"]]

    def fit(self, private: Listing, budget: Budget, *, public: Path | None = None, seed: int = 0,
            progress: Progress | None = None, state: WorkState | None = None) -> "Sampler":
        """Charge both stages, query, select, pretrain on public images, fine-tune with DP-SGD.

        With `state`, each stage's result is saved as soon as it exists; a later call with the
        same state continues from there and never releases the histogram again.
        """
        pub = self._public_listing(public, len(private.classes))
        units = len(set(private.units)) if private.units else None
        query_charge, dpsgd_charge = self.plan(budget, units or len(private.files))
        cfg = self.config
        public_set = functools.cache(lambda: load(pub, resolution=self.resolution,
                                                  channels=self.channels))
        priv = None
        saved = state.load("query") if state else None
        if saved is None:
            if cfg.query == "imagenet":
                query = semantic.ImageNetQuery(pub.classes, cfg.query_input).to(self.device)
            else:
                if progress:
                    progress("training the public query classifier", 0, 1)
                query = semantic.train_query(public_set().images, public_set().labels,
                                             len(pub.classes), epochs=cfg.query_epochs, seed=seed,
                                             device=self.device)
            priv = load(private, resolution=self.resolution, channels=self.channels)
            self.rejects = list(priv.rejects)
            hist = self.release_histogram(query, priv, budget, query_charge, len(pub.classes),
                                          private.units)
            chosen = (semantic.select(hist, cfg.select_per_class) if cfg.selection == "semantic"
                      else semantic.random_selection(len(private.classes), len(pub.classes),
                                                     cfg.select_per_class, seed))
            if state:  # before anything derived from it is kept: a kill before this line
                # loses an in-memory release nobody saw, and the resumed fit draws it afresh
                state.save("query", {"histogram": hist, "selection": chosen,
                                     "rejects": [list(r) for r in self.rejects]})
        else:
            hist, chosen = saved["histogram"], saved["selection"]
            self.rejects = [tuple(r) for r in saved["rejects"]]
        model = pretrain.pretrain(self._unet(len(private.classes)), public_set, chosen, cfg,
                                  seed=seed, device=self.device, progress=progress, state=state)
        priv = priv or load(private, resolution=self.resolution, channels=self.channels)
        ema = finetune.finetune(model, priv, budget, dpsgd_charge, cfg, units=units,
                                device=self.device, progress=progress, state=state)
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

    def release_histogram(self, query: torch.nn.Module, priv: ImageSet, budget: Budget,
                          charge: Charge, n_public: int, units: tuple[int, ...] = ()) -> torch.Tensor:
        """Noisy (private classes x public classes) histogram of top-k public labels.

        With `units` (the listing's unit of each file), a unit's rows are weighted 1/m (m = its
        listed files): the whole unit moves the histogram by at most sqrt(k).
        """
        sizes = torch.bincount(torch.tensor(units)).tolist() if units else None
        mech = GaussianSum(budget, charge, len(priv.classes), n_public, NoiseSource(),
                           unit_sizes=sizes, sharded=True)
        mine = distributed.shard(torch.arange(len(priv)))  # this rank's images
        rows = semantic.topk_rows(query, priv.images[mine], self.config.query_topk,
                                  device=self.device)
        mech.add(rows, priv.labels[mine], priv.units[mine] if units else None)
        return mech.release()


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
    def sample(self, n: int, *, seed: int = 0, balanced: bool = False, batch: int = 250,
               part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """n images (uint8, N x C x H x W) and labels; classes from the noisy histogram.
        `part=(i, k)`: only the i-th of k shares, in chunks of `batch` (generators.draw_chunks)."""
        gen = torch.Generator().manual_seed(seed)
        labels = draw_labels(n, self.class_weights, balanced=balanced, generator=gen)
        side = self.cfg.resolution
        empty = torch.zeros(0, self.cfg.channels, side, side, dtype=torch.uint8)
        return draw_chunks(labels, seed, batch, part, self._draw, empty)

    def _draw(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        x = unet.ddim_sample(self.model, labels, self.cfg, steps=self.steps,
                             guidance=self.guidance, generator=gen)
        return ((x.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

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
