"""A run directory: orchestrates fit and sample over folders. No math, no noise.

`fit` writes RUN/recipe.json, RUN/certificate.json, RUN/CERTIFICATE.md, RUN/rejects.jsonl (owner-side:
the private files it could not use, with reasons; never published) and RUN/model/ into a
temporary sibling folder and renames it into place, so a run folder is complete or absent.
"""
from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from privsynth import certificate, data, publish
from privsynth.errors import DataError, UsageError
from privsynth.features import load_encoder
from privsynth.generators import method_module
from privsynth.privacy import Budget, NoiseSource
from privsynth.privacy import ledger as ledgers
from privsynth.privacy import units as privacy_units
from privsynth.recipe import Recipe, from_dict

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class FitResult:
    """Where a fit wrote its run, and what it spent."""

    run: Path
    certificate: dict
    recipe: Recipe
    rejects: list[tuple[str, str]]


def default_delta(n: int) -> float:
    """1 / (N ln N): below 1/N, as a meaningful delta must be."""
    if n < 2:
        raise DataError(f"need at least 2 private images, found {n}")
    return 1.0 / (n * math.log(n))


def resolve_for(recipe: Recipe, private: data.Listing) -> tuple[Recipe, str]:
    """Fill in what depends on the private folder's listing: delta and grey/colour."""
    rule = f"user-given delta = {recipe.privacy.delta:g}"
    if recipe.privacy.delta == 0:  # N counts privacy units: delta must be well below 1/N units
        n = len(set(private.units)) if private.units else len(private.files)
        recipe = replace(recipe, privacy=replace(recipe.privacy, delta=default_delta(n)))
        rule = (f"1 / (N ln N) with N = {n} privacy units ({recipe.privacy.unit})" if private.units
                else f"1 / (N ln N) with N = {n} private image files")
    if recipe.privacy.epsilon <= 0:
        raise UsageError("epsilon must be > 0: pass --epsilon or set privacy.epsilon")
    if recipe.data.channels == "auto":
        grey = data.grey_only(private)
        recipe = replace(recipe, data=replace(recipe.data, channels="1" if grey else "3"))
    return recipe, rule


def fit(private_dir: Path, public: Path | None, recipe: Recipe, out: Path, *,
        progress: Progress | None = None, dataset: str | None = None,
        ledger_dir: Path | None = None, strict: bool = False) -> FitResult:
    """Spend the budget once on `private_dir` and write a run directory at `out`.

    The dataset's ledger (`dataset` name, else the id file in `private_dir`; kept under
    `ledger_dir`, see privacy.ledger) records the charges before any pixel is read, and refuses
    a fit that would take the dataset past the owner's limit.
    """
    if public is not None and not Path(public).exists():
        raise DataError(f"public source {public} does not exist")
    listing = data.scan(private_dir)
    if strict:  # decodes every file once more, but before any budget is charged or recorded
        data.require_clean(listing)
    module = method_module(recipe.method)
    listing = _with_units(listing, recipe.privacy.unit, module)
    ledger = ledgers.Ledger(ledgers.location(ledger_dir), ledgers.dataset_key(private_dir, dataset))
    ledger.check((), delta=None, unit=recipe.privacy.unit)  # nothing left: refuse before any file
    auto_channels = recipe.data.channels == "auto"
    recipe, delta_rule = resolve_for(recipe, listing)
    encoder = None
    if getattr(module, "USES_ENCODER", True):
        encoder = load_encoder(recipe.features.encoder, weights=recipe.features.weights or None,
                               input_size=recipe.features.input_size, pixels=recipe.features.pixels)
    entries: list[str] = []

    def write_ahead(charges: list) -> None:  # runs inside Budget.charge: before any noise/pixel
        entries.append(ledger.record(charges, delta=recipe.privacy.delta, unit=recipe.privacy.unit,
                                     run=str(Path(out).resolve()), method=recipe.method))

    budget = Budget(epsilon=recipe.privacy.epsilon, delta=recipe.privacy.delta,
                    accountant=recipe.privacy.accountant, on_charge=write_ahead)
    gen = module.Generator(recipe.generator, encoder, resolution=recipe.data.resolution,
                           channels=int(recipe.data.channels), device=recipe.run.device)
    with _settle(ledger, entries), publish.atomic_folder(out) as tmp:
        extra = {"public": public} if getattr(module, "USES_PUBLIC", False) else {}
        sampler = gen.fit(listing, budget, seed=recipe.run.seed, progress=progress, **extra)
        sampler.save(tmp / "model")
        cert = certificate.issue(budget, method=recipe.method, delta_rule=delta_rule,
                                 noise_rng=NoiseSource.description,
                                 **_statement(module.privacy_statement(recipe.generator), recipe,
                                              delta_rule, auto_channels))
        _write_json(tmp / "recipe.json", dict(recipe.to_dict(), public=_public_record(public, module)))
        _write_json(tmp / "certificate.json", cert)
        (tmp / "CERTIFICATE.md").write_text(certificate.render(cert), encoding="utf-8")
        data.write_rejects(tmp / "rejects.jsonl", gen.rejects)  # owner-side; never published
    return FitResult(Path(out), cert, recipe, list(gen.rejects))


def _with_units(listing: data.Listing, spec: str, module: object) -> data.Listing:
    """The listing with each file's privacy unit (from names and metadata only, no pixel)."""
    units = privacy_units.assign(listing.root, listing.files, spec)
    if units.per_image:
        return listing
    if not getattr(module, "USER_LEVEL", False):
        raise UsageError(f"privacy.unit={spec}: this method bounds only one image per unit; "
                         "use privacy.unit=image or a method with user-level privacy (dp-mepf)")
    return replace(listing, units=units.index)


@contextlib.contextmanager
def _settle(ledger: ledgers.Ledger, entries: list[str]):
    """Mark this fit's ledger entries completed, or failed (their charges count either way)."""
    try:
        yield
    except BaseException:
        for entry in entries:
            ledger.finish(entry, "failed")
        raise
    for entry in entries:
        ledger.finish(entry, "completed")


def _statement(stmt: dict, recipe: Recipe, delta_rule: str, auto_channels: bool) -> dict:
    """The method's own privacy statement plus what every fit leaves unprotected."""
    unprotected = ["the class names of the private folder (folder names or label values) and "
                   "how many classes there are"]
    words, unit = privacy_units.describe(recipe.privacy.unit)
    stmt = dict(stmt, unit=unit)
    if unit["kind"] != "image":
        stmt["privacy_unit"] = words
        stmt["notes"] = [*stmt.get("notes", []), f"User-level privacy: {unit['bound']}. Counts "
                         "are then per-class sums of unit weights (units, not images)."]
    if delta_rule.startswith("1 / (N ln N)"):
        what = "privacy units" if unit["kind"] != "image" else "private image files"
        unprotected.append(f"the number of {what} N, used only to set delta")
    if auto_channels:
        unprotected.append("whether every private file is greyscale (data.channels=auto, read "
                           "from file headers), which sets the channels of the output")
    unprotected.append("the recipe and the pretrained public weights (public by assumption)")
    return dict(stmt, unprotected=unprotected + stmt.get("unprotected", []))


def _public_record(public: Path | None, module: object) -> dict:
    used = ("semantic query, selection and pretraining" if getattr(module, "USES_PUBLIC", False)
            else "not by dp-mepf: its public side is the pretrained encoder")
    return {"path": str(public) if public else None, "used": used}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def sample(run: Path, n: int, out: Path, *, seed: int = 0, balanced: bool = False) -> Path:
    """Write `n` synthetic images from a run as a dataset folder (no privacy cost)."""
    run = Path(run)
    if not (run / "model" / "config.json").is_file():
        raise UsageError(f"{run} is not a privsynth run folder (no model/config.json)")
    if n < 1:
        raise UsageError(f"-n must be >= 1, got {n}")
    cert = certificate.load(run)
    recipe = from_dict({k: v for k, v in json.loads((run / "recipe.json").read_text()).items()
                        if k != "public"})
    sampler = method_module(recipe.method).Sampler.load(run / "model")
    with torch.inference_mode():
        images, labels = sampler.sample(n, seed=seed, balanced=balanced)
    card = {"method": recipe.method, "epsilon": cert["epsilon"]["spent"], "delta": cert["delta"],
            "run": run.name, "seed": seed, "images": n}
    return publish.write_dataset(Path(out), images, labels, sampler.classes,
                                 certificate=cert, card=card)
