"""Resumable fits: named state files in a run's work folder, each replaced atomically.

A fit keeps its work folder when it is killed or fails after spending budget, so that
`privsynth fit --resume RUN` can continue from the last state file instead of spending again.
State holds only what the fit may keep: noisy releases, model and optimiser state, random
generator state (never private pixels or per-image statistics). Files are written next to their
final name and renamed over it, so a kill at any moment leaves the previous state or the new one.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch

STATE_SUFFIX = ".state.pt"


class WorkState:
    """State files of one fit in `folder`; `every` seconds between periodic training saves."""

    def __init__(self, folder: Path, every: float = 60.0) -> None:
        self.folder = Path(folder)
        self.every = float(every)
        self._last = time.monotonic()

    def path(self, name: str) -> Path:
        """Where state `name` lives."""
        return self.folder / f"{name}{STATE_SUFFIX}"

    def save(self, name: str, state: dict[str, Any]) -> None:
        """Write `state` (tensors, numbers, strings, lists, dicts) atomically under `name`."""
        final = self.path(name)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        self._last = time.monotonic()

    def load(self, name: str) -> dict[str, Any] | None:
        """State `name`, or None when it was never saved (loaded without unpickling code)."""
        path = self.path(name)
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def due(self) -> bool:
        """Whether `every` seconds passed since the last save."""
        return time.monotonic() - self._last >= self.every

    def save_json(self, name: str, obj: dict) -> None:
        """A small JSON file (e.g. the fit's resolved inputs), written atomically."""
        final = self.folder / name
        tmp = final.with_name(f".{final.name}.tmp")
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, final)

    def load_json(self, name: str) -> dict | None:
        """A JSON file written by `save_json`, or None."""
        path = self.folder / name
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None

    def clear(self) -> None:
        """Remove every state file (the finished run keeps none)."""
        for path in self.folder.glob(f"*{STATE_SUFFIX}"):
            path.unlink()
