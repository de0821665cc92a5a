"""PrivImage (Li et al., arXiv 2311.12850): semantic query -> selected public pretraining -> DP-SGD,
warm-started from dp-mepf drafts (our extension; `draft = "none"` is PrivImage as published).

1. A classifier over the public classes (trained on public images only) gives each private image
   its top-k public labels; the per-private-class histogram of those labels is released once with
   Gaussian noise (L2 sensitivity sqrt(k) per privacy unit: a unit's rows are weighted 1/m).
2. From the noisy histogram alone, each private class picks its own disjoint public classes; their
   images, relabelled with that private class, pretrain a class-conditional diffusion UNet.
3. Drafts (config.py): dp-mepf's releases (privsynth.generators.dpmepf, on the same budget) train
   its generator; its images (post-processing) pretrain the UNet further.
4. The UNet is fine-tuned on the private images with DP-SGD over privacy units (finetune.py).
5. Sampling denoises drafts noised to `strength` of the schedule (or pure noise at strength 1).
Every charge is calibrated together before any private pixel is read: the query's sigma is set in
the recipe, DP-SGD's sigma is the smallest that fits, and the drafts' releases get draft_noise
times it.

Resumable: with a `WorkState`, the noisy histogram and the selection are saved right after the
release (a resumed fit never releases it again: that would be a second, uncharged release), the
drafts' releases and generator as dp-mepf saves them, each pretrained UNet after its stage
(periodically during it too), and DP-SGD is checkpointed.

Data-parallel under torchrun (privsynth.distributed): every rank runs `fit`; the histogram rows
and the DP-SGD clipped sums are computed on each rank's share of the private images (units) and
summed over the ranks before the one noise draw (by rank 0), and pretraining is torch DDP over
shares of each batch. Every rank builds the same query classifier (a row has norm sqrt(k)
whatever it outputs). Only rank 0 gets a `WorkState`: it alone keeps checkpoints. The drafts'
dp-mepf stage is not data-parallel: with drafts on, the fit runs in one process.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from privsynth import distributed
from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet, Listing, load, scaled, scan, unit_sizes
from privsynth.errors import DataError, UsageError
from privsynth.features import Encoder
from privsynth.generators import dpmepf, draw_chunks, draw_labels, judges
from privsynth.generators.base import Method
from privsynth.generators.privimage import finetune, pretrain, semantic, unet
from privsynth.generators.privimage.config import Config
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.progress import Progress


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
    notes = [hist]
    if config.dp_steps:
        notes.append(f"DP-SGD: each step keeps every {who} with probability q (Poisson), {grad} "
                     f"to L2 norm {c:g} as one row, and adds Gaussian noise once per step, empty "
                     "batches included. The batch, the noise and the per-example draws "
                     "(timesteps, noise images, label dropout) all come from OS entropy.")
    notes.append("Files that cannot be decoded are skipped independently of other files"
                 + ("." if per_image else " (a unit's weight 1/m counts its listed files)."))
    post = ("public-class selection from the noisy histogram, pretraining on public images, "
            "sampling from the " + ("DP-SGD model" if config.dp_steps else "pretrained model"))
    uses_n = ["the DP-SGD sample rate of privimage.dpsgd (q = dp_batch / N)"] if config.dp_steps else []
    if config.draft == "dp-mepf":
        drafts = dpmepf.privacy_statement(config.dpmepf, unit)
        notes += [f"Drafts (dp-mepf, charges dpmepf.*): {note}" for note in drafts["notes"]]
        notes.append(f"The dp-mepf releases are calibrated with the other charges at "
                     f"{config.draft_noise:g} times DP-SGD's noise scale.")
        post += (" and the draft generator: it is trained on the dp-mepf releases alone, its "
                 "images pretrain the UNet and each sample starts from one (noised to "
                 f"{config.strength:g} of the diffusion schedule); " + drafts["post_processing"])
        if config.dpmepf.filters:
            uses_n.append(judges.rates(config.dpmepf))
    stmt = {"privacy_unit": "one image file",
            "post_processing": post + "; class proportions from the noisy " +
                               ("counts" if config.draft == "dp-mepf" else "histogram"),
            "notes": notes, "unprotected": []}
    if uses_n:
        stmt["uses_n"] = (" and ".join(uses_n) + ", and through them the sigma of every release "
                          "(all charges are calibrated together)")
    if per_image:
        return stmt
    return dict(stmt, unit_bound=f"histogram: a unit's m image rows are weighted 1/m, so the unit "
                                 f"adds at most sqrt(k) = {math.sqrt(k):.4g}; DP-SGD: a unit's "
                                 f"images' gradients are averaged into one row clipped to "
                                 f"C = {c:g}, and sampling is per unit; dp-mepf releases: a "
                                 "unit's rows are weighted 1/m")


class Generator:
    """Fits PrivImage: `Generator(config, encoder, ...).fit(private, budget, public=...)`."""

    def __init__(self, config: Config, encoder: Encoder | None = None, *, resolution: int,
                 channels: int, device: str = "cpu") -> None:
        self.config, self.resolution, self.channels, self.device = config, resolution, channels, device
        self.encoder = encoder
        attention = (False, config.attention_levels >= 2, config.attention_levels >= 1)
        self.unet = unet.UNetConfig(0, channels, resolution, (config.width, 2 * config.width,
                                    2 * config.width), attention, groups=min(8, config.width))
        if resolution % 4:
            raise UsageError(f"privimage needs data.resolution divisible by 4, got {resolution}")
        if config.draft == "dp-mepf" and encoder is None:
            raise UsageError("privimage.draft = 'dp-mepf' needs the [features] encoder")
        self.rejects: list[tuple[str, str]] = []

    def plan(self, budget: Budget, n: int) -> list[Charge]:
        """Calibrate every stage for `n` privacy units and charge it (before any pixel is read).

        A resumed fit finds its charges already recorded (written ahead before the interrupted
        attempt drew noise) and reuses them, after checking they are this recipe's for `n` units.
        """
        pending = budget.unclaimed()
        if not pending:
            charges = budget.calibrate(lambda s: self.config.plan(s, n))
            budget.charge(charges)
            return charges
        names = [c.name for c in self.config.plan(1.0, n)]
        if sorted(c.name for c in pending) != sorted(names):
            raise UsageError(f"the recorded charges {sorted(c.name for c in pending)} do not "
                             "match this recipe's releases")
        by_name = {c.name: c for c in pending}
        if "privimage.dpsgd" in by_name:
            sigma = by_name["privimage.dpsgd"].noise_multiplier
            if self.config.plan(sigma, n) != [by_name[name] for name in names]:
                raise DataError(f"the recorded charges were planned for another number of "
                                f"privacy units than the {n} the private folder has now: it "
                                "changed since the fit began")
        return [by_name[name] for name in names]

    def fit(self, private: Listing, budget: Budget, *, public: Path | None = None, seed: int = 0,
            progress: Progress | None = None, state: WorkState | None = None) -> "Sampler":
        """Charge every stage; query, select, make drafts, pretrain on public images and drafts,
        fine-tune with DP-SGD.

        With `state`, each stage's result is saved as soon as it exists; a later call with the
        same state continues from there and never releases anything again.
        """
        pub = self._public_listing(public, len(private.classes))
        units = private.unit_count if private.units else None  # None: one image per unit
        charges = self.plan(budget, private.unit_count)
        by_name = {c.name: c for c in charges}
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
            hist = self.release_histogram(query, priv, budget, by_name["privimage.query"],
                                          len(pub.classes), private.units)
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
        draft = None
        if cfg.draft == "dp-mepf":
            maker = dpmepf.Generator(cfg.dpmepf, self.encoder, resolution=self.resolution,
                                     channels=self.channels, device=self.device)
            draft = maker.fit_charged(private, budget,
                                      [c for c in charges if c.name.startswith("dpmepf.")],
                                      seed=seed, progress=progress, state=state)
            draft.to("cpu")
        model = pretrain.pretrain(self._unet(len(private.classes)), public_set, chosen, cfg,
                                  seed=seed, device=self.device, progress=progress, state=state)
        if draft is not None:
            model = pretrain.on_drafts(model, lambda: self._drafts(draft, seed, progress), cfg,
                                       seed=seed, device=self.device, progress=progress,
                                       state=state)
        if cfg.dp_steps:
            priv = priv or load(private, resolution=self.resolution, channels=self.channels)
            model = finetune.finetune(model, priv, budget, by_name["privimage.dpsgd"], cfg,
                                      units=units, device=self.device, progress=progress,
                                      state=state)
        del priv
        if draft is not None:
            weights = draft.class_weights
        else:
            weights = (hist.sum(1) / cfg.query_topk).clamp(min=1.0)
            weights = (weights / weights.sum()).tolist()
        selection = {private.classes[i]: [pub.classes[j] for j in js] for i, js in enumerate(chosen)}
        return Sampler(model.cpu().eval(), self._unet(len(private.classes)), private.classes,
                       weights, cfg.sample_steps, cfg.guidance, selection, draft=draft,
                       strength=cfg.strength)

    def _drafts(self, draft: dpmepf.Sampler, seed: int,
                progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`draft_images` labelled drafts in [-1, 1] (post-processing of the dp-mepf releases)."""
        if progress:
            progress("drawing drafts", 0, 1)
        images, labels = draft.sample(self.config.draft_images, seed=seed + 7, balanced=True)
        if progress:
            progress("drawing drafts", 1, 1)
        return scaled(images), labels

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
        sizes = unit_sizes(units)
        mech = GaussianSum(budget, charge, len(priv.classes), n_public, NoiseSource(),
                           unit_sizes=sizes, sharded=True)
        mine = distributed.shard(torch.arange(len(priv)))  # this rank's images
        rows = semantic.topk_rows(query, priv.images[mine], self.config.query_topk,
                                  device=self.device)
        mech.add(rows, priv.labels[mine], priv.units[mine] if units else None)
        return mech.release()


class Sampler:
    """A fitted PrivImage denoiser (the DP-SGD weights' EMA) and, with drafts, the dp-mepf draft
    generator whose images it refines: safe to publish."""

    method = "privimage"

    def __init__(self, model: torch.nn.Module, cfg: unet.UNetConfig, classes: tuple[str, ...],
                 class_weights: list[float], steps: int, guidance: float,
                 selection: dict[str, list[str]], *, draft: dpmepf.Sampler | None = None,
                 strength: float = 1.0) -> None:
        self.model, self.cfg, self.classes = model, cfg, tuple(classes)
        self.class_weights, self.steps, self.guidance = list(class_weights), steps, guidance
        self.selection, self.draft, self.strength = selection, draft, strength
        if strength < 1 and draft is None:
            raise ValueError("sampling from strength < 1 needs the draft generator")

    @property
    def t_start(self) -> int:
        """The timestep sampling starts from."""
        return unet.timesteps_below(self.strength)

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, balanced: bool = False, batch: int = 250,
               part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """n images (uint8, N x C x H x W) and labels; classes from the noisy counts.
        `part=(i, k)`: only the i-th of k shares, in chunks of `batch` (generators.draw_chunks)."""
        gen = torch.Generator().manual_seed(seed)
        labels = draw_labels(n, self.class_weights, balanced=balanced, generator=gen)
        side = self.cfg.resolution
        empty = torch.zeros(0, self.cfg.channels, side, side, dtype=torch.uint8)
        return draw_chunks(labels, seed, batch, part, self._draw, empty)

    def _draw(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        start = None
        if self.strength < 1:
            start = scaled(self.draft.draw_for(labels, gen))
        x = unet.ddim_sample(self.model, labels, self.cfg, steps=self.steps,
                             guidance=self.guidance, generator=gen, start=start,
                             t_start=self.t_start)
        return ((x.cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def card(self, *, counted: bool = True) -> dict:
        """What the dataset card records of this sampling: where samples start, and the
        drafts' label filters (`counted`: with this process's count of rejected draws)."""
        if self.strength >= 1:
            return {}
        return {"drafts": f"each image is a dp-mepf draft of the run noised to "
                          f"{self.strength:g} of the diffusion schedule, then denoised in "
                          f"{self.steps} DDIM steps", **self.draft.card(counted=counted)}

    def to(self, device: str) -> "Sampler":
        """Move the denoiser (and the draft generator) to `device`; starting noise is still
        drawn on the CPU."""
        self.model.to(device)
        if self.draft is not None:
            self.draft.to(device)
        return self

    def save(self, folder: Path) -> None:
        """Write `unet.safetensors` and `config.json` (no pickles), and the draft generator in
        `draft/` (dp-mepf's files)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()},
                  str(folder / "unet.safetensors"))
        meta = {"method": self.method, "unet": self.cfg.to_dict(), "classes": list(self.classes),
                "class_weights": self.class_weights, "sample_steps": self.steps,
                "guidance": self.guidance, "selection": self.selection,
                "strength": self.strength, "draft": None if self.draft is None else "draft"}
        if self.draft is not None:
            self.draft.save(folder / "draft")
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @staticmethod
    def needs_encoder(folder: Path) -> bool:
        """Whether `load(folder)` builds the run's encoder (the drafts' feature label filter)."""
        meta = json.loads((folder / "config.json").read_text())
        return bool(meta.get("draft")) and dpmepf.Sampler.needs_encoder(folder / meta["draft"])

    @classmethod
    def load(cls, folder: Path, *, encoder: Encoder | None = None) -> "Sampler":
        """Read a sampler written by `save`; the drafts' encoder as dpmepf.Sampler.load has it."""
        meta = json.loads((folder / "config.json").read_text())
        cfg = unet.UNetConfig.from_dict(meta["unet"])
        model = unet.build(cfg)
        model.load_state_dict(load_file(str(folder / "unet.safetensors")))
        draft = (dpmepf.Sampler.load(folder / meta["draft"], encoder=encoder)
                 if meta.get("draft") else None)
        return cls(model.eval(), cfg, tuple(meta["classes"]), meta["class_weights"],
                   meta["sample_steps"], meta["guidance"], meta["selection"], draft=draft,
                   strength=meta.get("strength", 1.0))


def data_parallel(config: Config) -> bool:
    """Whether every torchrun rank trains on its share (see the module doc): not with drafts."""
    return config.draft == "none"


METHOD = Method(name="privimage", config=Config, generator=Generator, sampler=Sampler,
                privacy_statement=privacy_statement, uses_public=True,
                public_use="semantic query, selection and pretraining",
                uses_encoder=True,  # the drafts' dp-mepf reads it (unused with draft = "none")
                resumable=True,
                user_level=True,  # every mechanism bounds a whole privacy unit, not one image
                parallel=data_parallel)
