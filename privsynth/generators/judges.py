"""dp-mepf's label filters as a set: which judges a recipe turns on, their charges and certificate
words, their training on a fit, and saving / loading them with the sampler.

Two judges exist (one judge's model, DP-SGD training and redraw rule: `judge.py`): `dpmepf.judge`
reads the run's encoder rows, `dpmepf.scatter_judge` the wavelet scattering transform of the
pixels. Their settings stay flat in `dpmepf.Config` (`judge_*`, `scatter_*`: the recipe keys);
`settings` cuts each judge's slice out of it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from privsynth.checkpoint import WorkState
from privsynth.data import ImageSet
from privsynth.errors import UsageError
from privsynth.features import Encoder, encoder_from
from privsynth.generators import judge
from privsynth.privacy import Budget, Charge
from privsynth.privacy.dpsgd import unit_members
from privsynth.progress import Progress
from privsynth.scattering import ScatterView

FEATURES, SCATTER = "dpmepf.judge", "dpmepf.scatter_judge"  # the keys of judge.VIEWS


@dataclass(frozen=True)
class Settings:
    """One judge's slice of dpmepf.Config."""

    sigma: float  # noise multiplier, as a multiple of the releases' noise scale
    batch: int  # expected Poisson batch
    epochs: float  # expected passes over the private data
    lr: float  # Adam, cosine-decayed to 0
    clip: float  # L2 bound of a privacy unit's gradient (shared)


def enabled(config: Any) -> tuple[str, ...]:
    """The charge names of the judges `config` (a dpmepf.Config) turns on, in charge order."""
    return tuple(name for name, on in ((FEATURES, config.judge), (SCATTER, config.scatter_judge))
                 if on)


def check(config: Any) -> None:
    """UsageError unless the enabled judges' settings in `config` are usable."""
    if config.judge and (config.judge_sigma <= 0 or config.judge_batch < 1
                         or config.judge_epochs <= 0 or config.judge_clip <= 0
                         or config.judge_rounds < 0):
        raise UsageError("dpmepf.judge needs judge_sigma, judge_batch, judge_epochs and "
                         "judge_clip > 0 and judge_rounds >= 0")
    if config.scatter_judge and (config.scatter_sigma <= 0 or config.scatter_batch < 1
                                 or config.scatter_epochs <= 0 or config.scatter_scales < 1
                                 or config.scatter_groups < 1 or config.judge_clip <= 0
                                 or config.judge_rounds < 0):
        raise UsageError("dpmepf.scatter_judge needs scatter_sigma, scatter_batch, "
                         "scatter_epochs, judge_clip > 0, scatter_scales and scatter_groups "
                         ">= 1 and judge_rounds >= 0")


def settings(config: Any, name: str) -> Settings:
    """Judge `name`'s settings in `config`."""
    if name == FEATURES:
        return Settings(config.judge_sigma, config.judge_batch, config.judge_epochs,
                        config.judge_lr, config.judge_clip)
    return Settings(config.scatter_sigma, config.scatter_batch, config.scatter_epochs,
                    config.scatter_lr, config.judge_clip)


def charges(config: Any, scale: float, n: int) -> list[Charge]:
    """The DP-SGD charges of the enabled judges over `n` privacy units, each at its sigma times
    the releases' noise `scale` (calibrated together with them)."""
    out = []
    for name in enabled(config):
        if n < 1:
            raise UsageError(f"{name}: the plan needs the number of privacy units")
        s = settings(config, name)
        out.append(judge.charge(s.sigma * scale, s.batch, s.epochs, s.clip, n, name=name))
    return out


def notes(config: Any) -> list[str]:
    """The certificate's notes on the enabled judges."""
    out = []
    if config.judge:
        out.append(
            "dpmepf.judge is DP-SGD: a linear classifier of the same feature rows (norm <= 1) "
            "trained with Poisson "
            "sampling of privacy units (rate judge_batch / N, N the number of units the private "
            "folder lists, as for privimage's DP-SGD), each unit's gradient clipped to "
            f"{config.judge_clip:g} and Gaussian noise added once per step, empty batches "
            "included. Its weights are published with the generator; sampling redraws (up to "
            f"{config.judge_rounds} times) generated images it assigns to another class, which "
            "reads no private data.")
    if config.scatter_judge:
        out.append(
            "dpmepf.scatter_judge is DP-SGD on the same terms (Poisson sampling of privacy units at "
            "rate scatter_batch / N, each unit's gradient clipped to "
            f"{config.judge_clip:g}, Gaussian noise once per step, empty batches included): a "
            "linear classifier of the wavelet scattering transform of each private image "
            f"(J={config.scatter_scales}, L=8, {config.scatter_groups} normalisation groups; a "
            "fixed function of that image alone). Its weights are published; sampling keeps an "
            "image only when every judge agrees with its label.")
    return out


def rates(config: Any) -> str:
    """The enabled judges' use of N, in words: their DP-SGD sample rates are batch / N."""
    rate = {FEATURES: "judge_batch / N", SCATTER: "scatter_batch / N"}
    return "the DP-SGD sample rate of " + " and ".join(
        f"{name} ({rate[name]})" for name in enabled(config))


def view(name: str, config: Any, encoder: Encoder, shape: tuple[int, int]) -> nn.Module:
    """What judge `name` reads: the run's `encoder`, or the scattering transform of images of
    `shape` = (resolution, channels)."""
    if name == FEATURES:
        return encoder
    resolution, channels = shape
    return ScatterView((resolution, resolution), channels, config.scatter_scales,
                       groups=config.scatter_groups)


def train(config: Any, images: Callable[[], ImageSet], budget: Budget, found: list[Charge],
          n: int, *, encoder: Encoder, shape: tuple[int, int], rows: torch.Tensor | None,
          device: str, progress: Progress | None, state: WorkState | None) -> Filters | None:
    """The enabled judges, trained on their recorded charges among `found` over `n` privacy units
    (the N they were charged for), or restored from `state`; None when none is enabled.

    `images()` decodes the private images (called only if a judge is left to train); `rows`: the
    encoder rows the releases read, when still in memory (the feature judge encodes the images
    again when a resumed fit has only the saved releases). An interrupted judge restarts: its
    draws were never released."""
    names = enabled(config)
    if not names:
        return None
    views = {name: view(name, config, encoder, shape) for name in names}
    trained = {}
    for name in names:
        saved = state.load(judge.key(name)) if state else None
        if saved is None:
            given = rows if name == FEATURES else None
            trained[name] = _train_one(name, config, views[name], images(), budget, found, n,
                                       given, device, progress, config.feature_batch)
            if state:
                state.save(judge.key(name), trained[name].state_dict())
        else:
            trained[name] = _restored(saved, saved["linear.weight"].shape[1],
                                      saved["linear.weight"].shape[0])
    return Filters({name: net.cpu() for name, net in trained.items()}, views, config.judge_rounds)


def _train_one(name: str, config: Any, reads: nn.Module, images: ImageSet, budget: Budget,
               found: list[Charge], n: int, rows: torch.Tensor | None, device: str,
               progress: Progress | None, batch: int) -> judge.Judge:
    """Judge `name` by DP-SGD on what `reads` gives of the private `images` (or on `rows`)."""
    mine = [c for c in found if c.name == name]
    if not mine:
        raise UsageError(f"{name} is on but no {name} charge was recorded for this fit (was it "
                         "started with it off?)")
    if rows is None:
        reads = reads.to(device)
        with torch.no_grad():
            rows = torch.cat([reads(x).float().cpu() for x, _, _ in images.batches(
                batch, device, progress=progress, what=f"reading private images ({name})")])
    units = None if images.units is None else int(images.units.max()) + 1
    return judge.train(rows.to(device), images.labels, len(images.classes), budget, mine[0],
                       lr=settings(config, name).lr,
                       groups=unit_members(images.units, len(images), units), units=n,
                       progress=progress)


def _restored(weights: dict, dim: int, classes: int) -> judge.Judge:
    net = judge.Judge(dim, classes)
    net.load_state_dict(weights)
    return net.eval().requires_grad_(False)


@dataclass
class Filters:
    """A sampler's label filters: `judges` (charge name -> linear judge), each reading its view in
    `views` (the run's encoder, the scattering transform). A generated image that any judge puts
    in another class than its label is redrawn, up to `rounds` times; `rejected` counts the draws
    rejected in this process (a statistic for the dataset card)."""

    judges: dict[str, judge.Judge]
    views: dict[str, nn.Module]
    rounds: int
    rejected: int = field(default=0)

    def draw(self, images: Callable[[torch.Tensor], torch.Tensor], slots: torch.Tensor,
             classes: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`images(slots)`, each redrawn while a judge rejects its class (judge.filtered); the
        judges run on `device`."""
        missing = sorted(set(self.judges) - set(self.views))
        if missing:
            raise UsageError(f"this run's label filter ({', '.join(missing)}) needs the feature "
                             "encoder it reads: the model folder does not record it; pass the "
                             "run's encoder to Sampler.load(folder, encoder=...)")
        drawn, rejected = judge.filtered(images, lambda x, c: self.accepts(x, c, device), slots,
                                         classes, self.rounds)
        self.rejected += rejected
        return drawn

    def accepts(self, images: torch.Tensor, classes: torch.Tensor,
                device: torch.device) -> torch.Tensor:
        """True for each uint8 image that every judge puts in `classes`."""
        x = images.to(device, torch.float32) / 255.0
        ok = torch.ones(len(images), dtype=torch.bool)
        for name, net in self.judges.items():
            ok &= net(self.views[name](x)).argmax(1).cpu() == classes
        return ok

    def card(self, *, counted: bool = True) -> dict:
        """The dataset card's line on the filters (`counted`: with this process's rejections)."""
        names = " and ".join(sorted(self.judges))
        tally = f" ({self.rejected} draws rejected)" if counted else ""
        return {"label filter": f"images that a DP-SGD classifier of the run ({names}) assigns "
                                f"to another class were redrawn, up to {self.rounds} "
                                f"times{tally}"}

    def to(self, device: str) -> Filters:
        """Move the judges and what they read to `device`."""
        for part in (*self.judges.values(), *self.views.values()):
            part.to(device)
        return self

    def save(self, folder: Path) -> dict:
        """Write each judge's weights (`judge.safetensors`, `scatter_judge.safetensors`); returns
        the model config's entries for them (with the feature encoder's [features] table, so that
        `load` rebuilds it)."""
        meta = {}
        for name, net in self.judges.items():
            key, reads = judge.key(name), self.views[name]
            save_file(net.state_dict(), str(folder / f"{key}.safetensors"))
            meta[key] = {"rounds": self.rounds, "dim": net.linear.in_features}
            if name == FEATURES:
                meta[key].update(network="linear on the run's encoder rows", encoder=reads.name)
                if reads.spec is not None:
                    meta[key]["features"] = reads.spec
            else:
                meta[key].update(network=f"linear on {reads.name}", scales=reads.scattering.j,
                                 angles=reads.scattering.l, groups=reads.groups)
        return meta

    @classmethod
    def load(cls, folder: Path, meta: dict, shape: tuple[int, int],
             encoder: Encoder | None = None) -> Filters | None:
        """The filters `save` wrote into `folder` (`meta`: the model config; `shape` =
        (resolution, channels)); None without any. The feature judge's encoder is `encoder` if
        given, else rebuilt from the [features] table recorded with it (or, for a model saved
        before that was recorded, from its run's recipe.json)."""
        judges, views, rounds = {}, {}, 0
        for name in judge.VIEWS:
            key = judge.key(name)
            if key not in meta:
                continue
            spec = meta[key]
            if name == FEATURES:
                reads = encoder if encoder is not None else _recorded_encoder(folder, spec)
                if reads is not None and (reads.name, reads.dim) != (spec["encoder"], spec["dim"]):
                    raise UsageError(f"the label filter reads {spec['encoder']} rows of "
                                     f"{spec['dim']} values; the encoder given is {reads.name} "
                                     f"({reads.dim})")
                if reads is not None:
                    views[name] = reads
            else:
                resolution, channels = shape
                views[name] = ScatterView((resolution, resolution), channels,
                                          int(spec["scales"]), int(spec["angles"]),
                                          groups=int(spec["groups"]))
                if views[name].dim != int(spec["dim"]):
                    raise UsageError(f"{key}: the scattering view gives {views[name].dim} values, "
                                     f"the saved judge reads {spec['dim']}")
            judges[name] = _restored(load_file(str(folder / f"{key}.safetensors")),
                                     int(spec["dim"]), len(meta["classes"]))
            rounds = int(spec["rounds"])
        return cls(judges, views, rounds) if judges else None


def needs_encoder(meta: dict) -> bool:
    """Whether a model config `meta` holds a feature judge (which reads the run's encoder)."""
    return judge.key(FEATURES) in meta


def _recorded_encoder(folder: Path, spec: dict) -> Encoder | None:
    """The feature judge's encoder from its recorded [features] table; for a model saved before
    it was recorded, from the recipe.json of the run folder that holds `folder` (RUN/model or
    RUN/model/draft); None when neither exists."""
    if "features" in spec:
        return encoder_from(spec["features"])
    for run in (folder.parent, folder.parent.parent):
        recipe = run / "recipe.json"
        if recipe.is_file():
            return encoder_from(json.loads(recipe.read_text())["features"])
    return None
