"""The privacy unit: which private files belong to one protected unit (a person, a patient ...).

A person often has many images (the DP-FedEmb paper's point): protecting one image then protects
nobody. `privacy.unit` in a recipe names the unit:
- "image" (default): every file is its own unit.
- "column:NAME": the metadata.jsonl column NAME names the unit (e.g. "column:patient_id").
- "folder:K": the K-th folder level of a file's path names the unit (1 = the top folder; in an
  ImageFolder `class/person/x.png` the person is level 2).

Neighbouring datasets differ by all the images of one unit. Each mechanism bounds a unit's total
contribution: a unit with m listed files adds each of its (clipped) rows with weight 1/m, so its
rows together move any release by at most the sensitivity, however many images it has and however
they spread over classes (see `mechanisms.GaussianSum`). Found from the listing alone: no pixel.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from privsynth.errors import DataError, UsageError

BOUND = ("each unit's rows are weighted 1/m (m = the unit's listed files) after clipping, so one "
         "unit's total contribution to every release is at most the release's sensitivity")


@dataclass(frozen=True)
class Units:
    """The unit of each listed file (an index into `names`) and how many files each unit has."""

    spec: str
    index: tuple[int, ...]  # one entry per listed file
    sizes: tuple[int, ...]  # files per unit

    @property
    def count(self) -> int:
        """Number of units."""
        return len(self.sizes)

    @property
    def per_image(self) -> bool:
        """Whether every file is its own unit."""
        return self.spec == "image"


def parse(spec: str) -> tuple[str, str | int | None]:
    """("image", None), ("column", NAME) or ("folder", K) from a `privacy.unit` string."""
    kind, _, key = spec.partition(":")
    if spec == "image":
        return "image", None
    if kind == "column" and key:
        return "column", key
    if kind == "folder" and key.isdigit() and int(key) >= 1:
        return "folder", int(key)
    raise UsageError(f"privacy.unit must be 'image', 'column:NAME' or 'folder:K' (K >= 1), "
                     f"got {spec!r}")


def assign(root: Path, files: tuple[Path, ...], spec: str) -> Units:
    """The units of `files` (all under `root`) by `spec`; DataError if a file has no unit."""
    kind, key = parse(spec)
    if kind == "image":
        return Units(spec, tuple(range(len(files))), (1,) * len(files))
    if kind == "column":
        names = _column(Path(root), files, str(key))
    else:
        names = []
        for f in files:
            parts = f.relative_to(root).parts
            if len(parts) <= int(key):
                raise DataError(f"privacy.unit={spec}: {'/'.join(parts)} is not {key} folder(s) deep")
            names.append(parts[int(key) - 1])
    order = {name: i for i, name in enumerate(sorted(set(names)))}
    index = tuple(order[n] for n in names)
    sizes = [0] * len(order)
    for i in index:
        sizes[i] += 1
    return Units(spec, index, tuple(sizes))


def _column(root: Path, files: tuple[Path, ...], column: str) -> list[str]:
    path = root / "metadata.jsonl"
    if not path.is_file():
        raise DataError(f"privacy.unit=column:{column} needs {path}")
    by_file = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if isinstance(row, dict) and "file_name" in row:
                by_file[Path(row["file_name"]).as_posix()] = row.get(column)
    names = []
    for f in files:
        value = by_file.get(f.relative_to(root).as_posix())
        if value is None or value == "":
            raise DataError(f"privacy.unit=column:{column}: metadata.jsonl gives no {column!r} "
                            f"for {f.relative_to(root).as_posix()}")
        names.append(json.dumps(value) if not isinstance(value, str) else value)
    return names


def describe(spec: str) -> tuple[str, dict]:
    """The certificate's words for the unit, and its `unit` object."""
    kind, key = parse(spec)
    if kind == "image":
        return "one image file", {"kind": "image", "key": None,
                                  "bound": "each image adds one clipped row: its contribution "
                                           "is at most the release's sensitivity"}
    words = (f"one unit named by the metadata.jsonl column {key!r} (all of its images)"
             if kind == "column" else
             f"one unit named by folder level {key} of each file's path (all of its images)")
    return words, {"kind": kind, "key": key, "bound": BOUND}
