"""DP-MEPF (Harder et al., arXiv 2205.12900): noisy mean embeddings, then a generator that matches them.

Private data is touched once: per-class sums of unit-norm perceptual features (phi1), of their
element-wise squares (phi2) and per-class counts, each released by a Gaussian mechanism charged to
the one budget. Means are noisy sums over noisy counts (counts are *not* treated as public).
Training the generator reads only those releases, so it is post-processing at no privacy cost.

With `split_bits = b > 0` (our extension, not in the paper) each class is cut into 2^b cells and
the three releases are per cell: a first, cheap release of per-class centres (`dpmepf.centre`)
places the cut, and an image's cell is the sign pattern of b fixed random projections (public
randomness, `split_seed`) of its feature row minus its class centre. Matching the mean and second
moment of every cell constrains the generator far more than one mean per class does (it must
reproduce each style of a digit, not only the average one), at no extra sensitivity: an image
still adds one row to one slot. The centre release and the cell releases compose adaptively in
the one accountant; given the released centres, the cut is a fixed function of each image alone.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet, Listing, load
from privsynth.errors import UsageError
from privsynth.features import Encoder
from privsynth import generators
from privsynth.generators import draw_chunks, draw_labels, judge, judges
from privsynth.generators.base import Method
from privsynth.generators.convgen import ConvGenConfig, ConvGenerator
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.progress import Progress


@dataclass(frozen=True)
class Config:
    """DP-MEPF settings: how the budget is shared between releases, and generator training."""

    share_phi1: float = 0.75  # share of the noise budget (of sum 1/sigma^2) for feature means
    share_phi2: float = 0.15  # ... for feature second moments (0 disables phi2 matching)
    share_counts: float = 0.10  # ... for per-class counts
    phi2_bound: float = 0.1  # L2 clip for a squared-feature row (rows have norm <= 0.36 anyway)
    feature_batch: int = 256  # private images encoded per forward pass
    latent_dim: int = 64  # generator latent size
    width: int = 64  # generator channels at full resolution
    blocks: int = 0  # generator residual conv blocks at its seed size and after each upsampling
    # below full size (privsynth.generators.convgen)
    steps: int = 2000  # generator updates
    batch_per_class: int = 10  # generated images per class per update (split evenly over its
    # cells, at least one per cell)
    lr: float = 1e-3  # Adam learning rate (cosine-decayed to 0)
    moving_average: float = 0.2  # weight of the current batch in the running generated mean
    balance_phi2: bool = False  # scale the phi2 loss up to the phi1 loss (hurt on MNIST: 13% vs 31%)
    class_loss: float = 0.0  # weight of a per-image cross-entropy under the nearest-noisy-mean
    class_temperature: float = 0.02  # classifier (logits -|f - phi1_c|^2 / temperature)
    split_bits: int = 0  # > 0: release per cell, 2**split_bits cells per class (module docstring)
    share_centre: float = 0.05  # ... share of the noise budget for the per-class centres
    split_seed: int = 0  # public seed of the random projection directions that cut the cells
    split_noise: float = 0.0  # > 0: use fewer bits when cell means would be noisier than this
    unbiased: bool = False  # subtract the batch-mean variance from the matching losses (needs
    # >= 2 generated images per slot): the plain loss rewards low diversity (_variance_term)
    ema: float = 0.0  # > 0: sample from an exponential moving average of the generator's
    # weights with this decay (warmed up as min(ema, (1 + t) / (10 + t)))
    judge: bool = False  # also train a DP-SGD linear classifier of the private feature rows and
    # redraw generated images it assigns to another class (privsynth.generators.judge)
    judge_sigma: float = 1.6  # its noise multiplier, as a multiple of the releases' noise scale
    # (calibrated together, so it follows epsilon: 0.87 at epsilon 10 on 55k MNIST images)
    judge_batch: int = 256  # expected Poisson batch (sample rate = judge_batch / privacy units)
    judge_epochs: float = 10.0  # expected passes over the private data (steps = epochs / rate)
    judge_lr: float = 0.1  # Adam, cosine-decayed to 0 (MNIST at epsilon 10, test accuracy of
    # the judge: lr 0.01 96.0 %, 0.03 96.8 %, 0.1 96.9 %)
    judge_clip: float = 1.0  # L2 bound of a privacy unit's gradient
    judge_rounds: int = 10  # at sampling, redraws of a rejected image before it is kept anyway
    scatter_judge: bool = False  # a second DP-SGD linear judge, on the wavelet scattering
    # transform of the pixels (privsynth.scattering); an image is kept when every judge agrees
    scatter_sigma: float = 3.7  # its noise multiplier, as a multiple of the releases' noise scale
    scatter_batch: int = 2048  # expected Poisson batch
    scatter_epochs: float = 20.0  # expected passes over the private data
    scatter_lr: float = 0.1  # Adam, cosine-decayed to 0
    scatter_scales: int = 2  # J: wavelet scales (image sides must be multiples of 2^J)
    scatter_groups: int = 27  # per-image group normalisation of the scattering maps

    def __post_init__(self) -> None:
        shares = (self.share_phi1, self.share_phi2, self.share_counts, self.share_centre)
        if min(shares) < 0 or self.share_phi1 <= 0 or self.share_counts <= 0:
            raise UsageError("dpmepf shares must be >= 0, with share_phi1 and share_counts > 0")
        if not 0 < self.moving_average <= 1:
            raise UsageError("dpmepf.moving_average must be in (0, 1]")
        if self.blocks < 0:
            raise UsageError(f"dpmepf.blocks must be >= 0, got {self.blocks}")
        if not 0 <= self.ema < 1:
            raise UsageError(f"dpmepf.ema must be in [0, 1), got {self.ema}")
        if not 0 <= self.split_bits <= 6:
            raise UsageError(f"dpmepf.split_bits must be in 0..6, got {self.split_bits}")
        if self.split_bits and self.share_centre <= 0:
            raise UsageError("dpmepf.share_centre must be > 0 when split_bits > 0")
        if self.split_noise < 0:
            raise UsageError(f"dpmepf.split_noise must be >= 0, got {self.split_noise}")
        judges.check(self)
        if self.unbiased and self.batch_per_class < 2 * 2 ** self.split_bits:
            raise UsageError(f"dpmepf.unbiased needs >= 2 generated images per cell: "
                             f"batch_per_class >= {2 * 2 ** self.split_bits} at split_bits "
                             f"{self.split_bits}, got {self.batch_per_class}")

    def bits_for(self, counts: torch.Tensor, noise_norm: float) -> int:
        """How many of the `split_bits` to use, from released values only (post-processing).

        `counts`: the noisy class counts of the centre release; `noise_norm`: the expected L2
        norm of the phi1 noise on one slot (sigma * sqrt(dim)). With `split_noise` = 0, all of
        them; otherwise the most bits b for which that noise over the smallest class's count
        divided by 2^b (the average cell there) stays <= `split_noise` (a feature row has norm
        <= 1, so this bounds the noise on a cell mean relative to the largest possible mean).
        """
        if not self.split_noise:
            return self.split_bits
        smallest = float(counts.min().clamp(min=1.0))
        bits = 0
        while bits < self.split_bits and noise_norm * 2 ** (bits + 1) / smallest <= self.split_noise:
            bits += 1
        return bits

    def plan(self, scale: float, n: int = 0) -> list[Charge]:
        """The releases for overall noise scale `scale` (sigma of the composed mechanism), and
        with `judge` the DP-SGD label filter at sigma = judge_sigma * scale over `n` units (and
        with `scatter_judge` the second one at scatter_sigma * scale)."""
        slot = "cell" if self.split_bits else "class"
        specs = [("dpmepf.centre", self.share_centre if self.split_bits else 0.0, 1.0,
                  "per-class sums of [feature, 1] / sqrt(2): the centres that place the cells"),
                 ("dpmepf.phi1", self.share_phi1, 1.0, f"per-{slot} sums of unit-norm features"),
                 ("dpmepf.phi2", self.share_phi2, self.phi2_bound,
                  f"per-{slot} sums of squared features"),
                 ("dpmepf.counts", self.share_counts, 1.0, f"per-{slot} image counts")]
        total = sum(share for _, share, _, _ in specs)
        charges = [Charge(name, scale / math.sqrt(share / total), 1.0, 1, bound, what)
                   for name, share, bound, what in specs if share > 0]
        return charges + judges.charges(self, scale, n)

    @property
    def filters(self) -> tuple[str, ...]:
        """The charge names of the label filters this recipe trains."""
        return judges.enabled(self)


def privacy_statement(config: Config, unit: str = "image") -> dict:
    """What the certificate says about this method beyond its charges (any `unit`: the bound
    of privacy.units applies to every release as it is)."""
    notes = ["Per-class counts are released with Gaussian noise (dpmepf.counts), not treated as "
             "public; means are noisy sums divided by noisy counts clamped at 1.",
             "Each private image contributes one encoder feature row of L2 norm <= 1 to phi1 and "
             f"its element-wise square, clipped to L2 norm {config.phi2_bound:g}, to phi2.",
             "Files that cannot be decoded are skipped; each file is handled independently, so "
             "this does not change the sensitivity."]
    if config.split_bits:
        chosen = ("" if not config.split_noise else
                  f" (fewer when the noisy class counts of dpmepf.centre say cell means would be "
                  f"noisier than {config.split_noise:g}: post-processing of that release)")
        notes.append(
            f"Each class is cut into up to {2 ** config.split_bits} cells{chosen} by the signs of "
            f"random projections (public seed {config.split_seed}) of (feature row - the class "
            "centre released by dpmepf.centre); phi1, phi2 and counts are released per cell. "
            "Given the released centres an image's cell depends on that image alone, so it still "
            "adds one row to one slot; the two stages compose adaptively in the accountant.")
    notes += judges.notes(config)
    post = ("a generator trained only on the noisy releases (it never reads private data); "
            "sampling uses class proportions from the noisy counts")
    stmt = {"privacy_unit": "one image file", "post_processing": post, "notes": notes,
            "unprotected": []}
    if config.filters:  # their sample rates are batch / N: N is then declared (run._statement)
        stmt["post_processing"] += " and redraws images a DP-SGD judge assigns to another class"
        stmt["uses_n"] = (judges.rates(config) + ", and through it the sigma of every release "
                          "(all charges are calibrated together)")
    return stmt


@dataclass
class Releases:
    """The noisy statistics: everything the generator may learn from."""

    phi1: torch.Tensor  # (K * cells, D) noisy mean features, slot = class * cells + cell
    phi2: torch.Tensor | None  # (K * cells, D) noisy mean squared features
    counts: torch.Tensor  # (K * cells,) noisy counts, clamped to >= 1
    cells: int = 1  # slots per class (Config.split_bits)


class Generator:
    """Fits DP-MEPF: `Generator(config, encoder).fit(private, budget)` returns a `Sampler`."""

    def __init__(self, config: Config, encoder: Encoder, *, resolution: int, channels: int,
                 device: str = "cpu") -> None:
        self.config, self.encoder = config, encoder.to(device)
        self.resolution, self.channels, self.device = resolution, channels, device
        self.rejects: list[tuple[str, str]] = []  # private files that could not be decoded

    def plan(self, budget: Budget, n: int = 0) -> list[Charge]:
        """Calibrate every release (and the judge, over `n` privacy units) to the budget and
        charge it, before any pixel is read.

        A resumed fit finds its charges already recorded (written ahead before the interrupted
        attempt drew noise) and reuses them: that attempt's draws were never released.
        """
        pending = budget.unclaimed()
        if pending:
            names = sorted(c.name for c in pending)
            if names != sorted(c.name for c in self.config.plan(1.0, max(n, 1))):
                raise UsageError(f"the recorded charges {names} do not match this recipe's releases")
            return pending
        charges = budget.calibrate(lambda s: self.config.plan(s, n))
        budget.charge(charges)
        return charges

    def fit(self, private: Listing, budget: Budget, *, public: Path | None = None, seed: int = 0,
            progress: Progress | None = None, state: WorkState | None = None) -> "Sampler":
        """Charge, release the noisy embeddings once, then train the generator on them (`public`
        is not used: dp-mepf's public side is the pretrained encoder).

        With `state`, the releases are saved as soon as they exist and training is checkpointed;
        a later call with the same state continues from there without touching private data.
        """
        return self.fit_charged(private, budget, None, seed=seed, progress=progress, state=state)

    def fit_charged(self, private: Listing, budget: Budget, charges: list[Charge] | None, *,
                    seed: int = 0, progress: Progress | None = None,
                    state: WorkState | None = None) -> "Sampler":
        """`fit`, on `charges`: this recipe's charges, already calibrated and recorded by a caller
        that composes them with its own (privimage's drafts); planned here when None."""
        n = private.unit_count
        saved = state.load("releases") if state else None
        images, rows = None, None
        if saved is not None:
            self.rejects = [tuple(r) for r in saved.pop("rejects")]
            releases = Releases(**saved)
            charges = [c for c in budget.unclaimed() if c.name in judge.VIEWS]
        else:
            charges = self.plan(budget, n) if charges is None else charges
            images = load(private, resolution=self.resolution, channels=self.channels)
            releases, rows = self.release_and_rows(private, budget, charges, progress,
                                                   images=images)
            if state:
                state.save("releases", dict(releases.__dict__, rejects=self.rejects))

        def decoded() -> ImageSet:
            nonlocal images
            if images is None:
                images = load(private, resolution=self.resolution, channels=self.channels)
            return images

        filters = judges.train(self.config, decoded, budget, charges, n, encoder=self.encoder,
                               shape=(self.resolution, self.channels), rows=rows,
                               device=self.device, progress=progress, state=state)
        del images, rows
        return self.train(releases, private.classes, seed=seed, progress=progress, state=state,
                          filters=filters)

    def release(self, private: Listing, budget: Budget, charges: list[Charge],
                progress: Progress | None = None, *, images: ImageSet | None = None) -> Releases:
        """Read the private images (or take `images`, the decoded `private`), accumulate clipped
        statistics, and release them with noise (the judges' charges, if any, are left alone)."""
        return self.release_and_rows(private, budget, charges, progress, images=images)[0]

    @torch.no_grad()
    def release_and_rows(self, private: Listing, budget: Budget, charges: list[Charge],
                         progress: Progress | None = None, *, images: ImageSet | None = None
                         ) -> tuple[Releases, torch.Tensor | None]:
        """`release`, and the private encoder rows it read when the feature judge is on (the
        judge trains on the same rows; None otherwise, so they are not all kept in memory)."""
        if images is None:
            images = load(private, resolution=self.resolution, channels=self.channels)
        self.rejects = list(images.rejects)
        k, dim, noise = len(private.classes), self.encoder.dim, NoiseSource()
        by_name = {c.name: c for c in charges if c.name not in judge.VIEWS}
        # User-level privacy: a unit's rows are weighted 1/(its listed files) inside the mechanism.
        sizes = private.unit_sizes
        centre, bits, encoded = None, 0, None
        size = self.config.feature_batch
        if "dpmepf.centre" in by_name:  # stage 1: where each class is cut
            first = GaussianSum(budget, by_name.pop("dpmepf.centre"), k, dim + 1, noise,
                                unit_sizes=sizes)
            encoded = []  # each batch's rows, read again by stage 2 instead of encoding twice
            for x, y, u in images.batches(size, self.device, progress=progress,
                                          what="encoding private images (centres)"):
                encoded.append((self.encoder(x).float().cpu(), y, u))
                feats = encoded[-1][0].double()
                ones = torch.ones(len(y), 1, dtype=torch.float64)
                first.add(torch.cat([feats, ones], 1) / math.sqrt(2), y, u)
            sums = first.release()
            centre = sums[:, :dim] / sums[:, dim:].clamp(min=1 / math.sqrt(2))  # both were / sqrt 2
            counts = sums[:, dim] * math.sqrt(2)
            means = by_name["dpmepf.phi1"]
            bits = self.config.bits_for(counts, means.noise_multiplier * means.sensitivity * math.sqrt(dim))
        cells = 2 ** bits
        mech = {name: GaussianSum(budget, c, k * cells, 1 if name.endswith("counts") else dim, noise,
                                  unit_sizes=sizes)
                for name, c in by_name.items()}
        kept = [] if self.config.judge else None  # the rows, for the judge (same bound)
        batches = encoded if encoded is not None else (
            (self.encoder(x).float().cpu(), y, u)
            for x, y, u in images.batches(size, self.device, progress=progress,
                                          what="encoding private images"))
        for rows, y, u in batches:
            feats = rows.double()
            if kept is not None:
                kept.append(rows)
            slots = y * cells + (self.cell_of(feats, y, centre, bits) if bits else 0)
            mech["dpmepf.phi1"].add(feats, slots, u)
            if "dpmepf.phi2" in mech:
                mech["dpmepf.phi2"].add(feats ** 2, slots, u)
            mech["dpmepf.counts"].add(torch.ones(len(y), 1, dtype=torch.float64), slots, u)
        counts = mech["dpmepf.counts"].release()[:, 0].clamp(min=1.0)
        phi1 = mech["dpmepf.phi1"].release() / counts[:, None]
        phi2 = mech["dpmepf.phi2"].release() / counts[:, None] if "dpmepf.phi2" in mech else None
        releases = Releases(phi1.float(), None if phi2 is None else phi2.float(), counts.float(),
                            cells)
        return releases, None if kept is None else torch.cat(kept)

    def cell_of(self, feats: torch.Tensor, labels: torch.Tensor, centre: torch.Tensor,
                bits: int) -> torch.Tensor:
        """Each row's cell within its class: the signs of the first `bits` of `split_bits` fixed
        random projections of (row - its class centre), read as a binary number. Depends on
        the row alone."""
        gen = torch.Generator().manual_seed(self.config.split_seed)
        directions = torch.randn(feats.shape[1], self.config.split_bits, generator=gen,
                                 dtype=torch.float64)[:, :bits]
        signs = ((feats.double() - centre.double()[labels]) @ directions > 0).long()
        return (signs * (2 ** torch.arange(bits))).sum(1)

    def train(self, rel: Releases, classes: tuple[str, ...], *, seed: int = 0,
              progress: Progress | None = None, state: WorkState | None = None,
              filters: judges.Filters | None = None) -> "Sampler":
        """Train the generator to match the released embeddings (post-processing only); the
        sampler keeps the label `filters`, if any.

        With `state`, the whole training state (weights, optimiser, running means, random
        generator) is saved every `state.every` seconds and restored first: a resumed training
        ends with the same weights as an uninterrupted one."""
        cfg, k = self.config, len(classes) * rel.cells  # one generator label per slot
        torch.manual_seed(seed)
        gcfg = ConvGenConfig(k, self.channels, self.resolution, cfg.latent_dim, cfg.width,
                             cfg.blocks)
        net = ConvGenerator(gcfg).to(self.device)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, betas=(0.5, 0.999))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.steps, 1))
        average = copy.deepcopy(net).requires_grad_(False) if cfg.ema > 0 else None
        target1, target2 = rel.phi1.to(self.device), rel.phi2
        per_slot = max(1, cfg.batch_per_class // rel.cells)
        labels = torch.arange(k, device=self.device).repeat_interleave(per_slot)
        avg1 = avg2 = None
        w2 = 1.0
        if target2 is not None and cfg.balance_phi2:  # from the releases only: post-processing
            w2 = float(target1.pow(2).sum() / target2.pow(2).sum().clamp(min=1e-12))
        first = 0
        saved = state.load("generator") if state else None
        if saved is not None:
            net.load_state_dict(saved["net"])
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
            avg1, avg2, first = saved["avg1"], saved["avg2"], int(saved["step"])
            if average is not None:
                average.load_state_dict(saved["ema"])
            torch.set_rng_state(saved["rng"])
            if saved.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(saved["cuda_rng"], device=self.device)
        unbiased = cfg.unbiased and per_slot > 1
        for step in range(first, cfg.steps):
            if state and step > first and state.due():
                state.save("generator", {
                    "net": net.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                    "avg1": avg1.detach(), "avg2": None if avg2 is None else avg2.detach(),
                    "step": step, "rng": torch.get_rng_state(),
                    "ema": None if average is None else average.state_dict(),
                    "cuda_rng": (torch.cuda.get_rng_state(self.device)
                                 if str(self.device).startswith("cuda") else None)})
            z = torch.randn(len(labels), cfg.latent_dim, device=self.device)
            feats = self.encoder(net(z, labels))
            m1 = _class_means(feats, labels, k)
            weight = 1.0 if avg1 is None else cfg.moving_average  # of this batch in the average
            avg1 = m1 if avg1 is None else (1 - cfg.moving_average) * avg1.detach() + cfg.moving_average * m1
            loss = (avg1 - target1).pow(2).sum()
            if unbiased:
                loss = loss - weight ** 2 * _variance_term(feats, m1, labels, per_slot)
            if cfg.class_loss > 0:  # each image, not just the class mean, should look like its class
                logits = -torch.cdist(feats, target1).pow(2) / cfg.class_temperature
                loss = loss + cfg.class_loss * F.cross_entropy(logits, labels)
            if target2 is not None:
                m2 = _class_means(feats ** 2, labels, k)
                avg2 = m2 if avg2 is None else (1 - cfg.moving_average) * avg2.detach() + cfg.moving_average * m2
                loss = loss + w2 * (avg2 - target2.to(self.device)).pow(2).sum()
                if unbiased:
                    loss = loss - w2 * weight ** 2 * _variance_term(feats ** 2, m2, labels, per_slot)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if average is not None:
                generators.ema_update(average, net, min(cfg.ema, (1 + step) / (10 + step)))
            if progress and (step % 10 == 0 or step == cfg.steps - 1):
                progress(f"training generator (loss {loss.item():.3g})", step + 1, cfg.steps)
        weights = (rel.counts / rel.counts.sum()).tolist()
        return Sampler((net if average is None else average).cpu().eval(), classes, weights,
                       filters=filters)


def _variance_term(x: torch.Tensor, means: torch.Tensor, labels: torch.Tensor,
                   per_slot: int) -> torch.Tensor:
    """Unbiased estimate of sum over slots of tr(Cov) / per_slot: the expected excess of
    |batch mean - target|^2 over |true mean - target|^2. Subtracting it makes the loss an unbiased
    estimate of the distance of the generator's *expected* features from the target, so the
    gradient no longer pays the generator to shrink its spread (every slot has `per_slot` rows)."""
    return (x - means[labels]).pow(2).sum() / (per_slot * (per_slot - 1))


def _class_means(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, x.shape[1], device=x.device, dtype=x.dtype).index_add(0, labels, x)
    counts = torch.bincount(labels, minlength=k).clamp(min=1).to(x.dtype)
    return sums / counts[:, None]


class Sampler:
    """A fitted DP-MEPF generator: safe to publish (it saw only noisy releases).

    `weights` holds one weight per generator slot: per class, or per cell (class * cells + cell)
    when the releases were per cell; images are labelled with their slot's class. With `filters`
    (judges.Filters: dpmepf.judge, dpmepf.scatter_judge), an image that any judge assigns to
    another class is redrawn."""

    method = "dp-mepf"

    def __init__(self, net: ConvGenerator, classes: tuple[str, ...], weights: list[float], *,
                 filters: judges.Filters | None = None) -> None:
        self.net, self.classes, self.weights = net, tuple(classes), list(weights)
        self.filters = filters
        if len(self.weights) % len(self.classes):
            raise ValueError(f"{len(self.weights)} slot weights for {len(self.classes)} classes")
        self.cells = len(self.weights) // len(self.classes)

    @property
    def class_weights(self) -> list[float]:
        """Per-class sampling weights (the slots of a class summed)."""
        return torch.tensor(self.weights).view(len(self.classes), self.cells).sum(1).tolist()

    @torch.no_grad()
    def sample(self, n: int, *, seed: int = 0, balanced: bool = False, batch: int = 500,
               part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """n images (uint8, N x C x H x W) and labels; classes drawn from the noisy counts.
        `part=(i, k)`: only the i-th of k shares, in chunks of `batch` (generators.draw_chunks)."""
        gen = torch.Generator().manual_seed(seed)
        w = torch.tensor(self.weights, dtype=torch.float64).view(len(self.classes), self.cells)
        if balanced:  # equal classes, cells in their noisy proportions within a class
            w = w / w.sum(1, keepdim=True) / len(self.classes)
        slots = draw_labels(n, w.flatten().tolist(), balanced=False, generator=gen)
        cfg = self.net.cfg
        empty = torch.zeros(0, cfg.channels, cfg.resolution, cfg.resolution, dtype=torch.uint8)
        images, slots = draw_chunks(slots, seed, batch, part, self._draw, empty)
        return images, slots // self.cells

    def draw_for(self, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """uint8 images of the given `classes` (a cell of each class drawn in its noisy share),
        judged like `sample`'s; every draw comes from `gen`."""
        slots = classes * self.cells
        if self.cells > 1:
            w = torch.tensor(self.weights, dtype=torch.float64).view(len(self.classes), self.cells)
            slots = slots + torch.multinomial(w[classes], 1, generator=gen).squeeze(1)
        return self._draw(slots, gen)

    def card(self, *, counted: bool = True) -> dict:
        """What the dataset card records of this sampling: the label filters, if any
        (`counted`: include how many draws they rejected in this process)."""
        return {} if self.filters is None else self.filters.card(counted=counted)

    @staticmethod
    def needs_encoder(folder: Path) -> bool:
        """Whether `load(folder)` builds the run's encoder (a feature label filter reads it)."""
        return judges.needs_encoder(json.loads((folder / "config.json").read_text()))

    def _draw(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.filters is None:
            return self._images(labels, gen)
        return self.filters.draw(lambda slots: self._images(slots, gen), labels,
                                 labels // self.cells, self.device)

    def _images(self, labels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        z = torch.randn(len(labels), self.net.cfg.latent_dim, generator=gen)
        x = self.net(z.to(self.device), labels.to(self.device)).cpu()
        return (x * 255.0).round().clamp(0, 255).to(torch.uint8)

    @property
    def device(self) -> torch.device:
        """Where the generator runs (latents are drawn on the CPU, so samples do not depend on it
        beyond floating-point rounding)."""
        return next(self.net.parameters()).device

    def to(self, device: str) -> "Sampler":
        """Move the generator (and the judges and what they read) to `device` (e.g. 'cuda')."""
        self.net.to(device)
        if self.filters is not None:
            self.filters.to(device)
        return self

    def save(self, folder: Path) -> None:
        """Write `generator.safetensors` and `config.json` (no pickles), and each judge's
        weights (`judge.safetensors`, `scatter_judge.safetensors`)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), str(folder / "generator.safetensors"))
        meta = {"method": self.method, "generator": self.net.cfg.to_dict(),
                "classes": list(self.classes), "class_weights": self.class_weights}
        if self.cells > 1:
            meta["slot_weights"] = self.weights
        if self.filters is not None:
            meta.update(self.filters.save(folder))
        (folder / "config.json").write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path, *, encoder: Encoder | None = None) -> "Sampler":
        """Read a sampler written by `save`. A feature label filter's encoder is rebuilt from
        what `save` recorded, unless `encoder` (the run's) is given."""
        meta = json.loads((folder / "config.json").read_text())
        gcfg = ConvGenConfig(**meta["generator"])
        net = ConvGenerator(gcfg)
        net.load_state_dict(load_file(str(folder / "generator.safetensors")))
        filters = judges.Filters.load(folder, meta, (gcfg.resolution, gcfg.channels), encoder)
        return cls(net.eval(), tuple(meta["classes"]), meta.get("slot_weights", meta["class_weights"]),
                   filters=filters)


METHOD = Method(name="dp-mepf", config=Config, generator=Generator, sampler=Sampler,
                privacy_statement=privacy_statement, uses_public=False,
                public_use="not by dp-mepf: its public side is the pretrained encoder",
                uses_encoder=True, resumable=True,
                user_level=True,  # every release bounds a whole privacy unit (see release())
                parallel=None)
