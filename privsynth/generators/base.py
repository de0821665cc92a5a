"""The generator contract: what run.py may rely on, and nothing else.

A method is one module that defines `METHOD = Method(...)` (its description: config class,
generator and sampler classes, what it uses) plus the line naming that module in
`generators.REGISTRY`. run.py reads a method only through `Method`; tests/test_generator_contract.py
checks every registered method against the two protocols below, signatures included.

- `Generator(config, encoder, *, resolution, channels, device)` has one
  `fit(private, budget, *, public, seed, progress, state)`: it charges `budget` (before any
  private pixel is read), trains, and returns a `Sampler`; `rejects` lists the private files it
  could not decode (owner-side). Because `fit` returns a new object, nothing is ever "unfitted".
- A `Sampler` is exactly what is safe to publish: `save(folder)` writes it, and
  `Sampler.load(folder)` reads it back with nothing else (it rebuilds any encoder it needs from
  what `save` recorded).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

from privsynth.progress import Progress

if TYPE_CHECKING:  # torch and the data/privacy layers load with the method, not with the registry
    import torch

    from privsynth.checkpoint import WorkState
    from privsynth.data import Listing
    from privsynth.features import Encoder
    from privsynth.privacy import Budget


@runtime_checkable
class Sampler(Protocol):
    """A fitted model: draws labelled images at no privacy cost."""

    classes: tuple[str, ...]

    def sample(self, n: int, *, seed: int = 0, balanced: bool = False, batch: int = 500,
               part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        """`n` uint8 images (N, C, H, W) and their labels; `part=(i, k)`: the i-th of k shares
        (generators.draw_chunks), so k processes together draw the one-process sample."""

    def card(self, *, counted: bool = True) -> dict:
        """What the dataset card records of this sampling beyond method, epsilon and delta
        (`counted`: include statistics of this process alone, e.g. rejected draws)."""

    def to(self, device: str) -> Sampler:
        """Move the model to `device`; returns self."""

    def save(self, folder: Path) -> None:
        """Write the model to `folder` (safetensors + JSON, no pickles)."""

    @classmethod
    def load(cls, folder: Path) -> Sampler:
        """Read a sampler that `save` wrote, needing nothing but `folder`."""

    @staticmethod
    def needs_encoder(folder: Path) -> bool:
        """Whether `load(folder)` builds a feature encoder (seconds, and its weights)."""


@runtime_checkable
class Generator(Protocol):
    """Fits a method on a private listing, spending one budget."""

    rejects: list[tuple[str, str]]

    def __init__(self, config: Any, encoder: Encoder | None, *, resolution: int, channels: int,
                 device: str = "cpu") -> None:
        """`config`: the method's Config; `encoder`: the [features] encoder (None unless
        `Method.uses_encoder`)."""

    def fit(self, private: Listing, budget: Budget, *, public: Path | None = None, seed: int = 0,
            progress: Progress | None = None, state: WorkState | None = None) -> Sampler:
        """Charge `budget`, read `private` (and `public`, if the method uses it) and return the
        fitted sampler. With `state` (resumable methods), continue from what it holds."""


@dataclass(frozen=True, kw_only=True)
class Method:
    """What the orchestrator knows about a method: every flag is stated, none has a default."""

    name: str  # as in recipes and --method, e.g. "dp-mepf"
    config: type  # the recipe section's dataclass ([dpmepf] -> dpmepf.Config)
    generator: type  # implements `Generator`
    sampler: type  # implements `Sampler`
    privacy_statement: Callable[[Any, str], dict]  # (config, privacy.unit) -> certificate words
    uses_public: bool  # fit reads the --public folder (refused without one)
    public_use: str  # recipe.json's public.used: what the public side is to this method
    uses_encoder: bool  # the generator takes the [features] encoder
    resumable: bool  # fit continues from a WorkState after an interruption
    user_level: bool  # every mechanism bounds a whole privacy unit, not only one image
    parallel: Callable[[Any], bool] | None  # (config) -> trains on every torchrun rank

    def data_parallel(self, config: Any) -> bool:
        """Whether every torchrun rank trains on its share under `config`."""
        return bool(self.parallel(config)) if self.parallel is not None else False
