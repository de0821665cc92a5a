"""Recipes: a TOML file plus `--set key=value` overrides -> one frozen, fully resolved `Recipe`.

Keys are strict: an unknown key is an error that names the closest known key ("did you mean").
The resolved recipe is written to the run directory as `recipe.json`, so a run can be repeated.

Sections: top-level `method`; `[data]`, `[privacy]`, `[features]`, `[run]`; and one section per
method (`[dpmepf]`, ...) whose keys are that generator's `Config` fields.
"""
from __future__ import annotations

import difflib
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from privsynth.errors import UsageError
from privsynth import generators
from privsynth.privacy.units import parse as parse_unit


@dataclass(frozen=True)
class DataConfig:
    """How private images are converted (see `privsynth.data` for the rules)."""

    resolution: int = 32  # square side in pixels after resize + centre crop
    channels: str = "auto"  # "auto" (grey if every private file is grey), "1" or "3"

    def __post_init__(self) -> None:
        if not 4 <= self.resolution <= 1024:
            raise UsageError(f"data.resolution must be in 4..1024, got {self.resolution}")
        if self.channels not in ("auto", "1", "3"):
            raise UsageError(f"data.channels must be 'auto', '1' or '3', got {self.channels!r}")


@dataclass(frozen=True)
class PrivacyConfig:
    """The target guarantee. delta 0 means the default 1 / (N ln N) for N private images."""

    epsilon: float = 0.0
    delta: float = 0.0
    accountant: str = "prv"
    unit: str = "image"  # privacy unit: "image", "column:NAME" (metadata.jsonl) or "folder:K"

    def __post_init__(self) -> None:
        parse_unit(self.unit)  # UsageError naming the accepted forms
        if self.accountant not in ("prv", "rdp"):
            raise UsageError(f"privacy.accountant must be 'prv' or 'rdp', got {self.accountant!r}"
                             + (" (GDP under-reports epsilon)" if self.accountant == "gdp" else ""))
        if self.delta < 0 or self.delta >= 1:
            raise UsageError(f"privacy.delta must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class FeaturesConfig:
    """The pretrained perceptual encoder (public; never trained on private data)."""

    encoder: str = "efficientnet-lite0"  # or "open_clip:<model name>"
    weights: str = ""  # local weights file (or open_clip pretrained tag); "" = the default
    input_size: int = 32  # images are resized to this before the encoder
    pixels: float = 0.5  # weight of the pooled-pixel block in each feature row (0 = none)
    pixel_size: int = 14  # the pixel block is the image average-pooled to this side
    grid: int = 1  # efficientnet-lite0: keep a grid x grid layout of each stage (1 = global means)

    def __post_init__(self) -> None:
        if not 0.0 <= self.pixels < 1.0:
            raise UsageError(f"features.pixels must be in [0, 1), got {self.pixels}")
        if self.pixel_size < 1 or self.grid < 1:
            raise UsageError("features.pixel_size and features.grid must be >= 1")


@dataclass(frozen=True)
class RunConfig:
    """Public-side randomness and hardware. The seed never drives privacy noise."""

    seed: int = 0
    device: str = "cpu"
    checkpoint_every: float = 60.0  # seconds between saved training states (for --resume)

    def __post_init__(self) -> None:
        if not self.checkpoint_every >= 0:
            raise UsageError(f"run.checkpoint_every must be >= 0 seconds, got {self.checkpoint_every}")


@dataclass(frozen=True)
class Recipe:
    """Everything a fit needs besides the folders."""

    method: str
    data: DataConfig = field(default_factory=DataConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    run: RunConfig = field(default_factory=RunConfig)
    generator: Any = None  # the method's own Config

    @property
    def section(self) -> str:
        """Name of the method's section, e.g. 'dpmepf'."""
        return section_name(self.method)

    def to_dict(self) -> dict:
        """The fully resolved recipe as JSON-able data."""
        out = {"method": self.method}
        for name in ("data", "privacy", "features", "run"):
            out[name] = asdict(getattr(self, name))
        out[self.section] = asdict(self.generator)
        return out


_SECTIONS = {"data": DataConfig, "privacy": PrivacyConfig, "features": FeaturesConfig,
             "run": RunConfig}


def section_name(method: str) -> str:
    """The recipe section of a method: its name without dashes ('dp-mepf' -> 'dpmepf')."""
    return method.replace("-", "")


def read(path: Path | None) -> dict:
    """The raw TOML table of a recipe file ({} for none)."""
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"recipe file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe {path} is not valid TOML: {exc}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `section.key=value` strings; values are TOML literals, bare words are strings."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set expects key=value (e.g. dpmepf.steps=500), got {item!r}")
        parts = key.strip().split(".")
        value = _literal(text.strip())
        table = out
        for depth, part in enumerate(parts[:-1]):  # section, then sub-tables
            inner = table.get(part, {})
            if not isinstance(inner, dict):
                raise UsageError(f"--set {key}: {'.'.join(parts[:depth + 1])!r} is not a section")
            table[part] = dict(inner)  # a copy: the caller's table stays as it was
            table = table[part]
        table[parts[-1]] = value
    return out


def _literal(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def resolve(raw: dict) -> Recipe:
    """Validate a raw recipe table (strict keys, typed values) into a `Recipe`."""
    method = raw.get("method")
    if method not in generators.REGISTRY:
        names = ", ".join(generators.REGISTRY)
        raise UsageError(f"method must be one of {names} (got {method!r}); "
                         "pass --method or set `method` in the recipe")
    own = section_name(method)
    known = ["method", *_SECTIONS, own]
    for key in raw:
        if key not in known:
            raise UsageError(f"unknown recipe section {key!r}{_hint(key, known)}")
    parts = {name: _build(cls, raw.get(name, {}), name) for name, cls in _SECTIONS.items()}
    generator = _build(generators.method(method).config, raw.get(own, {}), own)
    return Recipe(method=method, generator=generator, **parts)


def _hint(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"


def _build(cls: type, values: Any, section: str) -> Any:
    """`cls(**values)` with unknown keys named and values checked against the field types."""
    if not isinstance(values, dict):
        raise UsageError(f"recipe section [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise UsageError(f"unknown key {section}.{key}{_hint(key, names)}")
        kwargs[key] = _coerce(value, hints[key], f"{section}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise UsageError(f"[{section}]: {exc}") from None


def _coerce(value: Any, kind: Any, where: str) -> Any:
    if is_dataclass(kind):  # a sub-table, e.g. [privimage.dpmepf]
        return _build(kind, value, where)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(kind, type) and isinstance(value, kind) and not (
            kind is int and isinstance(value, bool)):
        return value
    name = getattr(kind, "__name__", str(kind))
    raise UsageError(f"{where} must be {name}, got {value!r}")


def with_privacy(recipe: Recipe, **values: Any) -> Recipe:
    """A copy with privacy fields replaced (values of None are left alone)."""
    given = {k: v for k, v in values.items() if v is not None}
    return replace(recipe, privacy=replace(recipe.privacy, **given)) if given else recipe


def from_dict(data: dict) -> Recipe:
    """Read back a `recipe.json` written by `Recipe.to_dict`."""
    return resolve(data)

