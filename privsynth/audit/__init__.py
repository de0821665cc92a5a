"""`privsynth audit`: an empirical lower bound on epsilon from one real fit (docs/audit.md).

One-run auditing (Steinke, Nasr and Jagielski, NeurIPS 2023; privsynth.audit.bound): K canary
images (random high-contrast block patterns at the fit's resolution and channels, assigned to the
private classes in turn) are each included with probability 1/2, by a fair coin from OS entropy
(`secrets`; independent coins, as the theorem needs). `run.fit` runs exactly as `privsynth fit`
would, on a temporary folder of links to PRIVATE's files plus the included canaries (nothing is
written into PRIVATE, and the spend goes to a throw-away ledger: the audit run is deleted and
never published). Every canary is then scored from what the fit released (privsynth.audit.scores),
and the guesses turn into a lower bound at 95 % confidence for the certificate's delta.

`control="no-noise"` is the positive control: the same fit with every noise draw zero
(privsynth.privacy.mechanisms.noise_off, refused by any fit outside an audit). Its bound must be
far above a small certified epsilon, or the audit cannot see a broken mechanism at that scale.
"""
from __future__ import annotations

import contextlib
import math
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from privsynth import data, defaults, run
from privsynth.audit import bound, scores
from privsynth.audit.report import write_report
from privsynth.errors import UsageError
from privsynth.privacy import mechanisms
from privsynth.recipe import Recipe, with_privacy

Progress = Callable[[str, int, int], None]
CONTROLS = ("none", "no-noise")
CONFIDENCE = 0.95
CANARY_PREFIX = "zz-privsynth-canary-"  # a name no listed file has (checked)


def audit(private_dir: Path, recipe: dict | Recipe, *, public: Path | None = None,
          canaries: int = 64, control: str = "none", out: Path | None = None,
          progress: Progress | None = None) -> dict:
    """Insert `canaries`, fit as `fit` would, score every canary, bound epsilon; the result as a
    JSON-able dict (written with a report and a plot to `out` when given).

    `recipe`: what run.fit takes: the raw table `privsynth fit` passes (a recipe file with --set
    and the flags applied; the defaults for PRIVATE complete it inside the fit), or a resolved
    `Recipe`, used as it is."""
    if control not in CONTROLS:
        raise UsageError(f"--control must be one of {', '.join(CONTROLS)}, got {control!r}")
    if canaries < 2 * bound.SMALLEST_K:
        raise UsageError(f"--canaries must be >= {2 * bound.SMALLEST_K}, got {canaries}")
    if out is not None:
        from privsynth import publish

        publish.check_new(out)
    started = time.monotonic()
    listing = data.scan(private_dir)
    if listing.layout not in ("imagefolder", "flat"):
        raise UsageError(f"audit reads ImageFolder or flat folders; {private_dir} is "
                         f"{listing.layout}")
    facts = defaults.facts_of(listing, public)
    raw = recipe if isinstance(recipe, dict) else None
    preview, _ = run.resolve_for(defaults.complete(raw, facts)[0] if raw else recipe, listing)
    if preview.privacy.unit != "image":
        raise UsageError("audit inserts canaries as single images: use privacy.unit=image")
    # PRIVATE's delta (1 / (N ln N) of PRIVATE unless given), not that of PRIVATE + canaries
    request = (dict(raw, privacy={**raw.get("privacy", {}), "delta": preview.privacy.delta})
               if raw else with_privacy(recipe, delta=preview.privacy.delta))
    included = np.array([secrets.randbits(1) == 1 for _ in range(canaries)])
    labels = torch.arange(canaries) % len(listing.classes)
    with tempfile.TemporaryDirectory(prefix="privsynth-audit-") as tmp:
        work = Path(tmp)
        every = _write_canaries(work / "canaries", listing.classes, labels, facts.size,
                                1 if facts.grey else 3, listing.layout)
        mirror = _mirror(listing, work / "private", [p for p, i in zip(every, included) if i])
        released: list = []
        with mechanisms.audit_scope(lambda charge, total: released.append((charge, total))), \
                (mechanisms.noise_off() if control == "no-noise" else contextlib.nullcontext()):
            fit_start = time.monotonic()
            result = run.fit(mirror, public, request, work / "run", progress=progress,
                             dataset=f"audit-{secrets.token_hex(8)}", ledger_dir=work / "ledger")
            fit_seconds = time.monotonic() - fit_start
        recipe = result.recipe  # what the fit resolved: the defaults for the data, then `raw`
        canary_set = data.load(data.Listing(work / "canaries", listing.layout, tuple(every),
                                            tuple(int(y) for y in labels), listing.classes),
                               resolution=recipe.data.resolution,
                               channels=int(recipe.data.channels))
        if len(canary_set) != canaries:
            raise RuntimeError(f"{canaries - len(canary_set)} canaries could not be decoded")
        if progress:
            progress("scoring canaries", 0, 1)
        kinds = _score(recipe, listing, released, canary_set, result.run / "model")
        if progress:
            progress("scoring canaries", 1, 1)
    cert = result.certificate
    report = _result(recipe, cert, kinds, included, control, fit_seconds,
                     time.monotonic() - started)
    if out is not None:
        write_report(Path(out), report)
    return report


def _write_canaries(root: Path, classes: tuple[str, ...], labels: torch.Tensor,
                    size: tuple[int, int], channels: int, layout: str) -> list[Path]:
    """One PNG per canary at PRIVATE's most common (width, height) and channels, so the defaults
    read the same facts from PRIVATE + canaries: blocks of min(w, h) / 8 pixels, each black or
    white (per channel) at random."""
    rng = np.random.default_rng(secrets.randbits(128))
    width, height = size
    block = max(1, min(size) // 8)
    cells = (math.ceil(height / block), math.ceil(width / block))
    paths = []
    for i, y in enumerate(labels.tolist()):
        folder = root / classes[y] if layout == "imagefolder" else root
        folder.mkdir(parents=True, exist_ok=True)
        bits = rng.integers(0, 2, size=(*cells, channels), dtype=np.uint8) * 255
        pixels = bits.repeat(block, 0).repeat(block, 1)[:height, :width]
        path = folder / f"{CANARY_PREFIX}{i:05d}.png"
        Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels,
                        "L" if channels == 1 else "RGB").save(path)
        paths.append(path)
    return paths


def _mirror(listing: data.Listing, root: Path, canaries: list[Path]) -> Path:
    """A folder of links to every listed file (same relative names) plus the given canaries."""
    for path in listing.files:
        rel = path.relative_to(listing.root)
        if rel.name.startswith(CANARY_PREFIX):
            raise UsageError(f"{path}: a private file named like the audit's canaries")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).symlink_to(path.resolve())
    for path in canaries:
        rel = path.relative_to(path.parents[1] if listing.layout == "imagefolder" else path.parent)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, root / rel)
    return root


def _score(recipe: Recipe, listing: data.Listing, released: list, canary_set: data.ImageSet,
           model: Path) -> dict[str, np.ndarray]:
    """Each score kind the method's releases allow (name -> one score per canary)."""
    kinds = {}
    device = recipe.run.device  # the fit ran there
    if any(charge.name in scores.ROWS for charge, _ in released):
        encoder = run.encoder_for(recipe)
        feature_batch = getattr(recipe.generator, "feature_batch", None) or getattr(
            getattr(recipe.generator, "dpmepf", None), "feature_batch", 256)
        known = data.load(listing, resolution=recipe.data.resolution,
                          channels=int(recipe.data.channels))
        kinds["releases"] = scores.release_scores(
            released, len(listing.classes),
            (scores.encode(encoder, known, feature_batch, device), known.labels),
            (scores.encode(encoder, canary_set, feature_batch, device), canary_set.labels)).numpy()
    if (model / "unet.safetensors").is_file():  # privimage's published denoiser
        kinds["unet_loss"] = scores.unet_scores(model, canary_set.images, canary_set.labels,
                                                device=device).numpy()
    if not kinds:
        raise UsageError(f"audit has no score for {recipe.method}'s releases")
    return kinds


def _result(recipe: Recipe, cert: dict, kinds: dict[str, np.ndarray], included: np.ndarray,
            control: str, fit_seconds: float, seconds: float) -> dict:
    """The audit's result: the best bound over the score kinds (Bonferroni over them too)."""
    delta = float(cert["delta"])
    confidence = 1 - (1 - CONFIDENCE) / len(kinds)
    per_kind = {}
    for name, values in kinds.items():
        best, tried = bound.audit(values, included, delta, confidence=confidence)
        per_kind[name] = {"best": best.to_dict() if best else None,
                          "tried": [g.to_dict() for g in tried],
                          "scores": [float(s) for s in values]}
    name, top = max(((n, k["best"]) for n, k in per_kind.items()),
                    key=lambda item: item[1]["epsilon_lb"] if item[1] else -1.0)
    certified = float(cert["epsilon"]["spent"])
    lower = top["epsilon_lb"] if top else 0.0
    return {"method": recipe.method, "control": control, "certified_epsilon": certified,
            "delta": delta, "confidence": CONFIDENCE, "epsilon_lower_bound": lower,
            "verdict": _verdict(control, lower, certified), "score": name,
            "ceiling": bound.ceiling(len(included), delta, confidence=confidence),
            "guesses": top, "canaries": len(included), "included": int(included.sum()),
            "membership": [bool(i) for i in included], "kinds": per_kind,
            "fit_seconds": round(fit_seconds, 1), "seconds": round(seconds, 1),
            "recipe": recipe.to_dict()}


def _verdict(control: str, lower: float, certified: float) -> str:
    """consistent / VIOLATION (real noise); detected / too weak (the no-noise control)."""
    if control == "none":
        return "consistent" if lower <= certified else "VIOLATION"
    return "detected" if lower > certified else "too weak"

