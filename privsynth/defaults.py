"""The best configuration we know per method, sized from public facts about the data.

A fit from the CLI (or `bench run`) layers: these defaults < the recipe file < `--set`. So a plain
`privsynth fit DIR --method dp-mepf --epsilon 10` and a partial recipe both get the measured
configuration for every key they leave out; `recipe.json` records each value applied here with
its reason (`chosen`). `recipe.resolve` alone keeps the `Config` class defaults (tests, library).

The tables below are recipe-shaped (the keys of recipes/*.toml); each value carries one line
saying which dataset and measurement chose it (benchmarks/RESULTS.md, SWEEPS.md). They were all
measured on MNIST (28x28 grey, 10 classes, 55k images, 2 CPU cores); none yet on colour images.

Sizing reads public facts only (`Facts`): the image size and greyness from file headers and the
class count, which the certificate lists as unprotected, and the public folder's class count.
The number of private images N is not read: no rule here needs it, so the defaults are the same
for any N (the certificate names N only where delta or a sample rate uses it).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from privsynth import data
from privsynth import recipe as recipes
from privsynth.errors import DataError

MAX_SIDE = 32  # measured at 28 and 32 px; larger images are downscaled (set data.resolution)
SCATTER_J = 2  # dpmepf.scatter_scales as measured


@dataclass(frozen=True)
class Facts:
    """What the defaults may read about the data: public or declared unprotected, never N."""

    size: tuple[int, int]  # the most common (width, height) in the private files' headers
    grey: bool  # every private file's header is single-channel (data.channels = auto's rule)
    classes: int  # private classes (the certificate lists them)
    public_classes: int | None = None  # classes of the --public folder (public data)


def facts_of(listing: data.Listing, public: Path | None = None) -> Facts:
    """The facts of a private listing (headers only, no pixel decoded) and its public folder."""
    sizes: Counter[tuple[int, int]] = Counter()
    for path in listing.files:
        try:
            with data.open_image(path) as img:
                sizes[img.size] += 1
        except Exception:  # noqa: BLE001 - unreadable files are rejected later, with a reason
            continue
    if not sizes:
        raise DataError(f"{data.display(listing.root)}: none of {len(listing.files)} files "
                        "could be read")
    size = min(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[0]  # most common; ties: smallest
    public_classes = len(data.scan(public).classes) if public is not None else None
    return Facts(size=size, grey=data.grey_only(listing), classes=len(listing.classes),
                 public_classes=public_classes)


_MNIST = "MNIST 28x28 grey, 55k images, 2 CPU cores"
_FEATURES = {
    "encoder": ("efficientnet-lite0", "the offline ImageNet encoder every measured run used"),
    "input_size": (32, "encoder input side of every measured run"),
    "pixels": (0.5, f"pooled-pixel block in each feature row: 81 % against 31 % without ({_MNIST})"),
    "grid": (2, "2x2 cells of each stage map, not global means: bench.probe at 1000 steps 89.3 % "
                f"against 88.1 % ({_MNIST})"),
}
_DPMEPF = {
    "split_bits": (3, "8 cells per class, each released: bench.probe 1000 steps val 91.2 % against "
                      f"90.2 % per class; full run 93.61 % against 91.46 % ({_MNIST}, eps 10)"),
    "split_noise": (0.15, "fewer cells when cell means would be noisy (eps 1 on MNIST: 2 cells, "
                          "92.09 %)"),
    "batch_per_class": (16, "generated images per class per step, 2 per cell at 8 cells "
                            f"(the 93.61 % run, {_MNIST})"),
    "unbiased": (True, "batch-variance-corrected matching loss: 94.4 % against 93.4 % "
                       "(bench.sweep, 2850 steps, MNIST)"),
    "lr": (0.003, "bench.probe 1000 steps, 8 cells: val 91.9 % at 3e-3 against 91.2 % at 1e-3 "
                  "(MNIST)"),
    "moving_average": (0.2, "0.1 scored 93.35 % against 94.49 % (one full eps-10 MNIST run each)"),
    "judge": (True, "DP-SGD label filter on the feature rows: eps 10 94.64 % against 94.49 %, "
                    "eps 1 93.50 % against 92.24 % (full MNIST runs)"),
    "scatter_judge": (True, "second label filter on the wavelet scattering of the pixels: 94.98 % "
                            "against 94.64 % (full 2500-step MNIST runs; judge 97.3 % on test "
                            "digits)"),
    "steps": (3600, f"95.62 % at eps 10, fit 1737 s: sized to 30 minutes ({_MNIST})"),
}
_PRIVIMAGE = {
    "query_topk": (1, "each private image votes for one public class (sensitivity 1)"),
    "query_sigma": (20.0, "histogram noise, tiny next to ~5.5k MNIST images per class"),
    "query_epochs": (5, "query classifier on 20k Tiny-ImageNet images (the 95.25 % MNIST run)"),
    "select_per_class": (2, "public classes pretraining the UNet per private class (20 of 200 "
                            "Tiny-ImageNet classes in the 95.25 % MNIST run)"),
    "width": (32, "UNet channels 32/64/64 (1.1M parameters), sized for 2 CPU cores"),
    "pretrain_steps": (100, "public pretraining steps of the 95.25 % MNIST run"),
    "draft": ("dp-mepf", "dp-mepf drafts: 95.25 % on MNIST at eps 10; an earlier recipe without "
                          "them scored 27.09 %"),
    "draft_images": (20000, "drafts the UNet pretrains on (the 95.25 % MNIST run)"),
    "draft_steps": (1500, "UNet updates on the drafts (the 95.25 % MNIST run)"),
    "strength": (0.1, "a draft noised to t = 100 of 1000, then denoised: 95.25 % against 95.18 % "
                      "for the drafts alone (MNIST, eps 10)"),
    "sample_steps": (2, "DDIM steps over those 100 timesteps (the 95.25 % MNIST run)"),
    "dp_steps": (60, "DP-SGD steps of the 95.25 % MNIST run (fit 3122 s on 2 cores)"),
    "dp_batch": (512, "expected Poisson batch of the 95.25 % MNIST run"),
    "physical_batch": (128, "per-sample-gradient pass size on 2 CPU cores (memory, not privacy)"),
}
# the drafts: dp-mepf's configuration with fewer generator steps, to fit the privimage run's time
_DRAFTS = dict(_DPMEPF, steps=(2500, "drafts' generator steps of the 95.25 % MNIST run "
                                     "(3600 would take the fit past an hour on 2 cores)"))
BEST: dict[str, dict[str, Any]] = {
    "dp-mepf": {"features": _FEATURES, "dpmepf": _DPMEPF},
    "privimage": {"features": _FEATURES, "privimage": dict(_PRIVIMAGE, dpmepf=_DRAFTS)},
}


def choose(method: str, facts: Facts, given: dict) -> dict[str, tuple[Any, str]]:
    """{dotted recipe key: (value, why)} for every key `given` (the user's raw table) leaves out."""
    out = {"data.resolution": _resolution(method, facts),
           "data.channels": ("1", "every private file's header is greyscale") if facts.grey else
           ("3", "some private file's header is in colour")}
    out.update(_flatten(BEST[method]))
    out = {k: v for k, v in out.items() if _get(given, k) is None}
    side = _get(given, "data.resolution") or out["data.resolution"][0]
    if method == "dp-mepf":
        _adapt_dpmepf(out, given, "dpmepf", side)
    else:
        _adapt_privimage(out, given, facts, side)
    return out


def complete(raw: dict, facts: Facts) -> tuple[recipes.Recipe, dict]:
    """`raw` (a recipe file with --set applied) over the defaults for `facts`: the resolved
    recipe and the `chosen` block ({key: {"value", "why"}} for each default applied)."""
    recipes.resolve(raw)  # the user's own table must be valid by itself: its errors come first
    picked = choose(raw["method"], facts, raw)
    table: dict = {}
    for key, (value, _) in picked.items():
        _put(table, key, value)
    return (recipes.resolve(_merge(table, raw)),
            {key: {"value": value, "why": why} for key, (value, why) in picked.items()})


def summary(chosen: dict) -> str:
    """One line naming what the defaults chose (for `fit`'s output)."""
    if not chosen:
        return "defaults: none applied (the recipe sets every tuned key)"
    shape = [f"{k.split('.')[-1]} {chosen[k]['value']}" for k in ("data.resolution",
                                                                   "data.channels") if k in chosen]
    off = [k for k, v in chosen.items() if v["value"] is False]
    return (f"defaults: {len(chosen)} values from the best known configuration"
            + (f" ({', '.join(shape)} from file headers)" if shape else "")
            + (f"; off: {', '.join(off)}" if off else "") + "; reasons in recipe.json 'chosen'")


def _resolution(method: str, facts: Facts) -> tuple[int, str]:
    """The generator side for the headers' most common size: the largest side <= min(w, h) and
    <= MAX_SIDE that the generators build (4..8 times a power of two; privimage: a multiple of 4)."""
    w, h = facts.size
    fits = [s for s in _SIDES if s <= min(w, h, MAX_SIDE)
            and (method != "privimage" or s % 4 == 0)]
    side = max(fits) if fits else (8 if method == "privimage" else 4)
    why = f"{w}x{h} is the most common size in the private files' headers"
    if side != min(w, h):
        why += (f"; {side} is the largest side <= {min(w, h, MAX_SIDE)} the generators build"
                + (" and privimage's UNet halves twice (a multiple of 4)" if method == "privimage"
                   else "")
                + (" (measured at 28 and 32 px; larger costs CPU time)" if min(w, h) > MAX_SIDE
                   else ""))
    return side, why


# sides the convolutional generator reaches from a 4..8 pixel seed by doublings
_SIDES = sorted({b * 2 ** k for b in range(4, 9) for k in range(9) if b * 2 ** k <= 1024})


def _adapt_dpmepf(out: dict, given: dict, section: str, side: int) -> None:
    """Turn off or adapt the dp-mepf defaults that the shape or the user's values rule out."""
    def value(name: str) -> Any:  # the user's value, else the default's (None: the class's)
        given_value = _get(given, f"{section}.{name}")
        return given_value if given_value is not None else out.get(f"{section}.{name}", (None,))[0]

    key = f"{section}.scatter_judge"
    j = _get(given, f"{section}.scatter_scales") or SCATTER_J
    if key in out and out[key][0] and not _scatter_fits(side, j):
        out[key] = (False, f"off: the scattering judge needs image sides a multiple of 2^{j} = "
                           f"{2 ** j} and >= {2 ** (j + 1)}, and data.resolution is {side}")
    if value("split_bits") == 0:  # no cells: the cell-count rule has nothing to act on
        out.pop(f"{section}.split_noise", None)
    key = f"{section}.unbiased"
    bits, batch = value("split_bits"), value("batch_per_class")
    if key in out and out[key][0] and batch is not None and batch < 2 * 2 ** (bits or 0):
        out[key] = (False, f"off: the unbiased loss needs >= 2 generated images per cell, and "
                           f"batch_per_class {batch} < 2 x {2 ** (bits or 0)} cells")


def _adapt_privimage(out: dict, given: dict, facts: Facts, side: int) -> None:
    """privimage: no draft settings when the user turns drafts off; as many public classes per
    private class as the public folder holds."""
    if _get(given, "privimage.draft") == "none":  # the drafts' settings (and their encoder's)
        for key in [k for k in out if k.startswith(("privimage.dpmepf.", "features."))] + [
                "privimage.draft_images", "privimage.draft_steps", "privimage.strength",
                "privimage.sample_steps"]:  # strength < 1 and 2 DDIM steps need drafts
            out.pop(key, None)
        return
    _adapt_dpmepf(out, given, "privimage.dpmepf", side)
    key, per = "privimage.select_per_class", out.get("privimage.select_per_class", (None,))[0]
    if per and facts.public_classes is not None and facts.classes * per > facts.public_classes:
        fewer = max(1, facts.public_classes // max(facts.classes, 1))
        out[key] = (fewer, f"{facts.classes} private classes x {per} > the {facts.public_classes} "
                           f"public classes: {fewer} each (the selections are disjoint)")


def _scatter_fits(side: int, j: int) -> bool:
    """Whether privsynth.scattering builds a J-scale transform of side x side images."""
    from privsynth.scattering import Scattering

    try:
        Scattering((side, side), j)
    except ValueError:
        return False
    return True


def _flatten(table: dict, prefix: str = "") -> dict[str, tuple[Any, str]]:
    out = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _get(table: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(table, dict) or part not in table:
            return None
        table = table[part]
    return table


def _put(table: dict, dotted: str, value: Any) -> None:
    *parts, last = dotted.split(".")
    for part in parts:
        table = table.setdefault(part, {})
    table[last] = value


def _merge(base: dict, top: dict) -> dict:
    """`top` over `base`, sub-table by sub-table (new dicts; neither input changes)."""
    out = dict(base)
    for key, value in top.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out
