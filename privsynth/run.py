"""A run directory: orchestrates fit and sample over folders. No math, no noise.

`fit` writes the publishable RUN/model/, RUN/recipe.json, RUN/certificate.json, RUN/CERTIFICATE.md
and RUN/MANIFEST.sha256 (their sha256, privsynth.manifest), and the owner-only
RUN/owner/rejects.jsonl (the private files it could not use, by name, with reasons; never
published), into a temporary sibling folder and renames it into place, so a run folder is
complete or absent.

Under torchrun (privsynth.distributed) every process calls `fit` and `sample`; rank 0 alone checks
the request, records the spend, writes and returns the result, and the other ranks return None.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from privsynth import certificate, data, defaults, distributed, manifest, publish
from privsynth.checkpoint import WorkState
from privsynth.errors import DataError, UsageError
from privsynth.features import encoder_from
from privsynth.generators import method
from privsynth.generators.base import Method
from privsynth.privacy import Budget, Charge, NoiseSource
from privsynth.privacy import ledger as ledgers
from privsynth.privacy import mechanisms
from privsynth.privacy import units as privacy_units
from privsynth.progress import Progress
from privsynth.recipe import Recipe, from_dict, resolve

FIT_STATE = "fit-state.json"  # in the work folder: resolved inputs and written-ahead charges
FIT_STATE_SCHEMA = "privsynth.fit-state/1"
_NO_EPSILON = ("privacy.epsilon must be set (> 0): pass --epsilon or set privacy.epsilon in the "
               "recipe")


@dataclass(frozen=True)
class FitResult:
    """Where a fit wrote its run, and what it spent."""

    run: Path
    certificate: dict
    recipe: Recipe
    rejects: list[tuple[str, str]]
    chosen: dict | None = None  # the defaults applied ({key: {"value", "why"}}); None: no layer


def default_delta(n: int) -> float:
    """1 / (N ln N): below 1/N, as a meaningful delta must be."""
    if n < 2:
        raise DataError(f"need at least 2 private images, found {n}")
    return 1.0 / (n * math.log(n))


def resolve_for(recipe: Recipe, private: data.Listing) -> tuple[Recipe, str]:
    """Fill in what depends on the private folder's listing: delta and grey/colour."""
    rule = f"user-given delta = {recipe.privacy.delta:g}"
    if recipe.privacy.delta == 0:  # N counts privacy units: delta must be well below 1/N units
        n = private.unit_count
        recipe = replace(recipe, privacy=replace(recipe.privacy, delta=default_delta(n)))
        rule = (f"1 / (N ln N) with N = {n} privacy units ({recipe.privacy.unit})" if private.units
                else f"1 / (N ln N) with N = {n} private image files")
    if not recipe.privacy.epsilon > 0:
        raise UsageError(_NO_EPSILON)
    if recipe.data.channels == "auto":
        grey = data.grey_only(private)
        recipe = replace(recipe, data=replace(recipe.data, channels="1" if grey else "3"))
    return recipe, rule


def fit(private_dir: Path, public: Path | None, recipe: Recipe | dict, out: Path, *,
        progress: Progress | None = None, dataset: str | None = None,
        ledger_dir: Path | None = None, strict: bool = False) -> FitResult | None:
    """Spend the budget once on `private_dir` and write a run directory at `out`.

    `recipe`: a resolved `Recipe`, used as it is; or a raw recipe table (a recipe file with
    `--set` and the flags applied, as the CLI passes it) that the best known configuration for
    this data completes (privsynth.defaults: defaults < table) once the folder is listed; what
    the defaults chose is recorded in recipe.json (`chosen`) and in the result.

    The dataset's ledger (`dataset` name, else the id file in `private_dir`; kept under
    `ledger_dir`, see privacy.ledger) records the charges before any pixel is read, and refuses
    a fit that would take the dataset past the owner's limit. The fit works in `.OUT.work`; if it
    is interrupted after charging, that folder stays so that `resume(out)` can finish the run.

    Under torchrun, a method whose `data_parallel(config)` is true trains on every rank (each reads the private
    folder at the path rank 0 resolved, and must list the same files there); other methods fit
    on rank 0 alone. Only rank 0 touches the ledger and `out`; the other ranks return None.
    """
    request, raw = recipe, (recipe if isinstance(recipe, dict) else None)
    if raw is not None:  # checked now; the defaults complete it in _begin (the generator
        recipe = resolve(raw)  # setting that decides data_parallel keeps its class default there)
    module = method(recipe.method)
    if not module.data_parallel(recipe.generator) and distributed.world() > 1:
        return _alone(lambda: fit(private_dir, public, request, out, progress=progress,
                                  dataset=dataset, ledger_dir=ledger_dir, strict=strict))
    listing, ledger, recipe, doc = distributed.on_main(
        _begin, private_dir, public, recipe, out, module, dataset, ledger_dir, strict, raw,
        send=lambda begun: (None, None, None, begun[3]))
    if listing is None:  # not rank 0: the folder and recipe exactly as rank 0 resolved them
        recipe = from_dict(doc["recipe"])
        listing = _with_units(data.scan(doc["private_dir"]), recipe.privacy.unit, module)
    distributed.check_same(_fingerprint(listing), DataError(
        f"the processes list different files in {doc['private_dir']}: every node needs the same "
        "private folder at that path"))
    return _fit(listing, recipe, out, module, ledger, doc, progress)


def _alone(call: Callable[[], FitResult]) -> FitResult | None:
    """`call()` on rank 0 as if in one process; the other ranks have nothing to do."""
    if distributed.world() == 1:
        return call()
    if not distributed.is_main():
        return None
    with distributed.solo():
        return call()


def _fingerprint(listing: data.Listing) -> str:
    """sha256 of the listing's relative file names, labels and units (no pixel is read)."""
    h = hashlib.sha256(repr((listing.classes, listing.labels, listing.units)).encode())
    for path in listing.files:
        h.update(path.relative_to(listing.root).as_posix().encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _begin(private_dir: Path, public: Path | None, recipe: Recipe, out: Path, module: Method,
           dataset: str | None, ledger_dir: Path | None, strict: bool,
           raw: dict | None = None) -> tuple[data.Listing, ledgers.Ledger, Recipe, dict]:
    """The checks before a fit (rank 0): inputs, `out`, the ledger; the fit-state document; with
    `raw`, the recipe completed by the defaults for the listed folder (header facts only).
    Nothing is written (not even PRIVATE's ledger id file) before the request is checked."""
    mechanisms.check_noise_on()  # library callers too: refused before anything is charged
    if not recipe.privacy.epsilon > 0:
        raise UsageError(_NO_EPSILON)
    if public is not None and not Path(public).exists():
        raise DataError(f"public source {public} does not exist")
    if public is None and module.uses_public:
        raise UsageError(f"{module.name} needs --public: a labelled public image folder")
    # no CUDA here, or a GPU index under torchrun: refuse before anything is spent
    distributed.device(_device(recipe.run.device, explicit=True))
    publish.check_new(out)
    work = work_folder(out)
    if work.exists():
        prior = WorkState(work).load_json(FIT_STATE) if work.is_dir() else None
        if prior and prior.get("charges"):
            raise UsageError(f"{work} holds an interrupted fit of {out}: continue it with "
                             f"`privsynth resume {out}`, or delete that folder to start over "
                             "(its spend stays recorded in the ledger either way)")
        shutil.rmtree(work)  # an attempt that stopped before spending anything
    listing = data.scan(private_dir)
    if strict:  # decodes every file once more, but before any budget is charged or recorded
        data.require_clean(listing)
    listing = _with_units(listing, recipe.privacy.unit, module)
    ledger = ledgers.Ledger(ledgers.location(ledger_dir), ledgers.dataset_key(private_dir, dataset))
    ledger.check((), delta=None, unit=recipe.privacy.unit)  # nothing left: refuse before any file
    chosen, facts = None, None
    if raw is not None:
        facts = defaults.facts_of(listing, public)
        recipe, chosen = defaults.complete(raw, facts)
    auto_channels = recipe.data.channels == "auto" or "data.channels" in (chosen or {})
    recipe, delta_rule = resolve_for(recipe, listing)
    doc = {"schema": FIT_STATE_SCHEMA, "private_dir": str(Path(private_dir).resolve()),
           "public": None if public is None else str(Path(public).resolve()),
           "ledger_dir": str(ledger.folder), "dataset_key": ledger.key, "classes": list(listing.classes),
           "recipe": recipe.to_dict(), "delta_rule": delta_rule, "auto_channels": auto_channels,
           "chosen": chosen, "header_size": (list(facts.size) if chosen and "data.resolution"
                                             in chosen else None),
           "charges": [], "ledger_entries": []}
    return listing, ledger, recipe, doc


def resume(out: Path, *, progress: Progress | None = None) -> FitResult | None:
    """Finish the fit that was interrupted while writing `out`, from its `.OUT.work` folder.

    The charges it recorded before drawing noise are reused, not charged again: whatever the
    interrupted attempt computed after its last saved state was never released. The resumed
    run's certificate therefore equals the one an uninterrupted fit would have written.
    Under torchrun, rank 0 finishes the fit alone and the other ranks return None.
    """
    return _alone(lambda: _resume(out, progress))


def _resume(out: Path, progress: Progress | None) -> FitResult:
    out = Path(out)
    work = work_folder(out)
    doc = WorkState(work).load_json(FIT_STATE) if work.is_dir() else None
    if doc is None:
        raise UsageError(f"nothing to resume for {out}: no interrupted fit in {work}")
    if doc.get("schema") != FIT_STATE_SCHEMA:
        raise UsageError(f"{work / FIT_STATE} was written by another privsynth version")
    publish.check_new(out)
    recipe = from_dict(doc["recipe"])
    module = method(recipe.method)
    if not module.resumable:
        raise UsageError(f"{recipe.method} fits cannot be resumed yet; delete {work} and fit again "
                         "(the budget it recorded stays spent in the ledger)")
    listing = _with_units(data.scan(doc["private_dir"]), recipe.privacy.unit, module)
    if list(listing.classes) != doc["classes"]:
        raise DataError(f"the classes of {doc['private_dir']} changed since the fit began "
                        f"({doc['classes']} then, {list(listing.classes)} now)")
    ledger = ledgers.Ledger(Path(doc["ledger_dir"]), doc["dataset_key"])
    return _fit(listing, recipe, out, module, ledger, doc, progress)


def work_folder(out: Path) -> Path:
    """The folder a fit of `out` works in (kept after an interruption, for `resume`)."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def _fit(listing: data.Listing, recipe: Recipe, out: Path, module: Method,
         ledger: ledgers.Ledger | None, doc: dict, progress: Progress | None) -> FitResult | None:
    """The fit proper, fresh (`doc` has no charges) or resumed (`doc` holds the recorded ones).

    `ledger` is None on the ranks other than 0: they train their share, write nothing and
    return None; rank 0's ledger write-ahead is the one every rank waits for."""
    out, public = Path(out), (Path(doc["public"]) if doc["public"] else None)
    work, main, state = work_folder(out), ledger is not None, None
    if main:
        work.mkdir(parents=True, exist_ok=bool(doc["charges"]))
        state = WorkState(work, every=recipe.run.checkpoint_every)
        if not doc["charges"]:
            state.save_json(FIT_STATE, doc)
    entries: list[str] = doc["ledger_entries"]
    encoder = encoder_for(recipe) if module.uses_encoder else None

    def write_ahead(charges: list) -> None:  # runs inside Budget.charge: before any noise/pixel
        entries.append(ledger.record(charges, delta=recipe.privacy.delta, unit=recipe.privacy.unit,
                                     run=str(out.resolve()), method=recipe.method))
        doc["charges"] += [c.to_dict() for c in charges]
        state.save_json(FIT_STATE, doc)

    budget = Budget(epsilon=recipe.privacy.epsilon, delta=recipe.privacy.delta,
                    accountant=recipe.privacy.accountant,
                    on_charge=lambda charges: distributed.on_main(write_ahead, charges),
                    charges=[Charge(**c) for c in doc["charges"]])
    gen = module.generator(recipe.generator, encoder, resolution=recipe.data.resolution,
                           channels=int(recipe.data.channels),
                           device=distributed.device(recipe.run.device))
    try:
        with _settle(ledger, entries):
            sampler = gen.fit(listing, budget, public=public, seed=recipe.run.seed,
                              progress=progress,
                              state=state if module.resumable else None)  # None off rank 0
            if not main:
                return None
            statement = _statement(module.privacy_statement(recipe.generator,
                                                            recipe.privacy.unit),
                                   recipe, doc["delta_rule"], doc["auto_channels"],
                                   doc.get("header_size"))
            cert = certificate.issue(budget, method=recipe.method, delta_rule=doc["delta_rule"],
                                     noise_rng=NoiseSource.description, **statement)
            final = work / "run"
            final.mkdir(exist_ok=True)
            sampler.save(final / "model")
            chosen = {} if doc.get("chosen") is None else {"chosen": doc["chosen"]}
            _write_json(final / "recipe.json",
                        dict(recipe.to_dict(), public=_public_record(public, module), **chosen))
            _write_json(final / "certificate.json", cert)
            (final / "CERTIFICATE.md").write_text(certificate.render(cert), encoding="utf-8")
            manifest.write_run(final)  # the publishable files only: not owner/
            (final / manifest.OWNER).mkdir(exist_ok=True)  # owner-only; never published
            data.write_rejects(final / manifest.OWNER / manifest.REJECTS, gen.rejects)
            publish.move_into_place(final, out)
    except BaseException:
        if main and not doc["charges"]:  # nothing spent: nothing worth resuming
            shutil.rmtree(work, ignore_errors=True)
        raise
    shutil.rmtree(work, ignore_errors=True)
    return FitResult(out, cert, recipe, list(gen.rejects), doc.get("chosen"))


def run_recipe(doc: dict) -> Recipe:
    """The recipe of a run's parsed `recipe.json` (without what fit adds beside it: the public
    folder's record and the defaults' `chosen` block)."""
    return from_dict({k: v for k, v in doc.items() if k not in ("public", "chosen")})


def encoder_for(recipe: Recipe):
    """The pretrained encoder that `recipe.features` names."""
    return encoder_from(recipe.to_dict()["features"])


def _with_units(listing: data.Listing, spec: str, module: Method) -> data.Listing:
    """The listing with each file's privacy unit (from names and metadata only, no pixel)."""
    units = privacy_units.assign(listing.root, listing.files, spec)
    if units.per_image:
        return listing
    if not module.user_level:
        raise UsageError(f"privacy.unit={spec}: this method bounds only one image per unit; "
                         "use privacy.unit=image or a method with user-level privacy")
    return replace(listing, units=units.index)


@contextlib.contextmanager
def _settle(ledger: ledgers.Ledger | None, entries: list[str]):
    """Mark this fit's ledger entries completed, or failed (their charges count either way).

    Only rank 0 records entries; on the other ranks `entries` stays empty and `ledger` is None."""
    try:
        yield
    except BaseException:
        for entry in entries:
            ledger.finish(entry, "failed")
        raise
    for entry in entries:
        ledger.finish(entry, "completed")


def _statement(stmt: dict, recipe: Recipe, delta_rule: str, auto_channels: bool,
               header_size: list[int] | None = None) -> dict:
    """The method's own privacy statement plus what every fit leaves unprotected."""
    unprotected = ["the class names of the private folder (folder names or label values) and "
                   "how many classes there are"]
    words, unit = privacy_units.describe(recipe.privacy.unit)
    stmt = dict(stmt)
    if "unit_bound" in stmt:  # the method's own words for how it bounds a unit
        unit = dict(unit, bound=stmt.pop("unit_bound"))
    stmt["unit"] = unit
    if unit["kind"] != "image":
        stmt["privacy_unit"] = words
        stmt["notes"] = [*stmt.get("notes", []), f"User-level privacy: {unit['bound']}. Counts "
                         "are then per-class sums of unit weights (units, not images)."]
    n_public = _n_unprotected(stmt.pop("uses_n", ""), delta_rule, unit["kind"])
    unprotected += [n_public] if n_public else []
    if auto_channels:
        unprotected.append("whether every private file is greyscale (data.channels=auto, read "
                           "from file headers), which sets the channels of the output")
    if header_size:
        unprotected.append(f"the most common image size in the private files' headers "
                           f"({header_size[0]}x{header_size[1]}), from which the defaults set "
                           "data.resolution (privsynth.defaults)")
    unprotected.append("the recipe and the pretrained public weights (public by assumption)")
    return dict(stmt, unprotected=unprotected + stmt.get("unprotected", []),
                n_public=bool(n_public))


def _n_unprotected(uses_n: str, delta_rule: str, kind: str) -> str:
    """The one sentence naming N unprotected ('' when nothing used it): N sets delta by default,
    and whatever the method says it computes from N (`uses_n`, e.g. a DP-SGD sample rate)."""
    what = "privacy units" if kind != "image" else "private image files"
    sets_delta = delta_rule.startswith("1 / (N ln N)")
    if not uses_n:
        return f"the number of {what} N, used only to set delta" if sets_delta else ""
    return f"the number of {what} N, which sets {'delta and ' if sets_delta else ''}{uses_n}"


def _public_record(public: Path | None, module: Method) -> dict:
    return {"path": str(public) if public else None, "used": module.public_use}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def sample(run: Path, n: int, out: Path, *, seed: int = 0, balanced: bool = False,
           device: str | None = None, overwrite: bool = False) -> Path | None:
    """Write `n` synthetic images from a run as a dataset folder (no privacy cost); the model runs
    on `device` (default: the run's `run.device` when it is available, else the CPU).
    `overwrite`: `out` may be a dataset folder written before; it is replaced once the new one
    is complete (any other non-empty folder is refused).

    Under torchrun each rank draws its share of the sample (whole chunks, each from its own
    seeded stream: see the samplers) on its own device and rank 0 writes them in order, so the
    dataset is the one a single process writes for the same seed; the other ranks return None."""
    run = Path(run)
    distributed.on_main(_check_sample, run, n, Path(out), overwrite)
    cert = certificate.load(run)
    recipe = run_recipe(json.loads((run / "recipe.json").read_text()))
    sampler = method(recipe.method).sampler.load(run / "model").to(
        distributed.device(_device(device or recipe.run.device, explicit=device is not None)))
    with torch.inference_mode():
        part = sampler.sample(n, seed=seed, balanced=balanced,
                              part=(distributed.rank(), distributed.world()))
    parts = distributed.gather(part)
    if parts is None:
        return None
    images, labels = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    card = {"method": recipe.method, "epsilon": cert["epsilon"]["spent"], "delta": cert["delta"],
            "run": run.name, "seed": seed, "images": n}
    card.update(sampler.card(counted=distributed.world() == 1))  # e.g. label filters used
    return publish.write_dataset(Path(out), images, labels, sampler.classes,
                                 certificate=cert, card=card, replace=overwrite)


def _device(name: str, *, explicit: bool) -> str:
    """`name`, or "cpu" when a recorded (not user-given) CUDA device is absent on this machine."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        if explicit:
            raise UsageError(f"device {name!r} (--device / run.device): CUDA is not available on "
                             "this machine; use --device cpu")
        return "cpu"
    return name


def _check_sample(run: Path, n: int, out: Path, overwrite: bool = False) -> None:
    """UsageError before any sampling: not a run folder, n < 1, or `out` already used (unless
    `overwrite` and `out` is a dataset folder)."""
    if not (run / "model" / "config.json").is_file():
        raise UsageError(f"{run} is not a privsynth run folder (no model/config.json)")
    if n < 1:
        raise UsageError(f"-n must be >= 1, got {n}")
    publish.check_new(out, replace=overwrite)
