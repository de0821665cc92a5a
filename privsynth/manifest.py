"""sha256 manifests of output folders, and which part of a run folder may be published.

A manifest is `MANIFEST.sha256` in `sha256sum -c` format (`<sha256>  <relative path>`, sorted by
path). Two folders carry one:

- a dataset folder (publish.write_dataset): every other file in the folder;
- a run folder (written by `fit` once the model is saved): the publishable part, i.e. `model/**`,
  `recipe.json`, `certificate.json` and `CERTIFICATE.md`. `owner/` (the private files `fit` could
  not use, by name) is owner-only: it is neither listed nor checked, and must not be published.

`check(folder)` is what `privsynth verify` runs. In a run folder a file under `model/` that the
manifest does not list is a problem (a sampler could load it); other extra files (an owner's
evaluation report, say) are not. Runs written before the manifest existed have none: `check`
reports nothing for them and `state` says so.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from privsynth.files import sha256_of

MANIFEST = "MANIFEST.sha256"
MODEL = "model"
OWNER = "owner"  # RUN/owner/: owner-only, never published, not in the manifest
REJECTS = "rejects.jsonl"
RUN_FILES = ("recipe.json", "certificate.json", "CERTIFICATE.md")  # besides model/**
PUBLISHABLE = f"{MODEL}/, {', '.join(RUN_FILES)}"


def is_run(folder: Path) -> bool:
    """Whether `folder` is a run folder (it holds model/config.json)."""
    return (Path(folder) / MODEL / "config.json").is_file()


def rejects_path(run: Path) -> Path:
    """Where a run keeps its rejects list: RUN/owner/rejects.jsonl, or RUN/rejects.jsonl in a run
    written before owner-only files had their own folder."""
    run = Path(run)
    old = run / REJECTS
    return old if old.is_file() and not (run / OWNER / REJECTS).is_file() else run / OWNER / REJECTS


def write(folder: Path, digests: Mapping[str, str]) -> None:
    """Write `folder`/MANIFEST.sha256 from {relative path: hex sha256}, sorted by path."""
    lines = [f"{digests[rel]}  {rel}\n" for rel in sorted(digests)]
    (Path(folder) / MANIFEST).write_text("".join(lines), encoding="utf-8")


def write_run(run: Path) -> None:
    """Write the manifest of a run folder's publishable files (model/** and RUN_FILES)."""
    run = Path(run)
    write(run, {rel: sha256_of(run / rel) for rel in _run_files(run)})


def _run_files(run: Path) -> list[str]:
    model = [p.relative_to(run).as_posix() for p in (run / MODEL).rglob("*") if p.is_file()]
    return sorted(model + [name for name in RUN_FILES if (run / name).is_file()])


def check(folder: Path) -> list[str]:
    """Problems found checking `folder` (a dataset or run folder) against its manifest; empty when
    all is well, or for a run written before runs had a manifest."""
    folder = Path(folder)
    if is_run(folder):
        if not (folder / MANIFEST).is_file():
            return []
        present = (p for p in (folder / MODEL).rglob("*") if p.is_file())
    else:
        present = (p for p in folder.rglob("*") if p.is_file())
    return verify(folder, present)


def verify(folder: Path, present: Iterable[Path]) -> list[str]:
    """Each listed file must exist with its sha256; each of `present` (files under `folder`) must
    be listed. The list of problems, empty when all is well."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return [f"{MANIFEST} is missing"]
    problems, listed = [], set()
    for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64 or not rel or rel.startswith("/") or ".." in rel.split("/"):
            problems.append(f"{MANIFEST} line {n}: not '<sha256>  <relative path>'")
            continue
        listed.add(rel)
        path = folder / rel
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif sha256_of(path) != digest.lower():
            problems.append(f"changed: {rel}")
    extra = {p.relative_to(folder).as_posix() for p in present} - listed - {MANIFEST}
    return problems + [f"not in manifest: {rel}" for rel in sorted(extra)]


def state(folder: Path) -> str:
    """What `verify` checked in `folder`, in a few words (for its OK line)."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        return ("no manifest (a run written before runs had one): weights not checked"
                if is_run(folder) else "no manifest here")
    if is_run(folder):
        return (f"manifest matches (publishable: {PUBLISHABLE}; {OWNER}/ is owner-only, "
                "do not publish it)")
    return "manifest matches"
