"""Recipes: strict keys with suggestions, typed values, overrides, round trip through recipe.json."""
from __future__ import annotations

from pathlib import Path

import pytest

from privsynth import recipe as recipes
from privsynth.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


def _resolve(overrides: list[str], base: dict | None = None):
    return recipes.resolve(recipes.apply_overrides(base or {"method": "dp-mepf"}, overrides))


@pytest.mark.parametrize("bad, message", [
    ("dpmepf.stepz=3", "did you mean 'steps'"),
    ("privcy.epsilon=1", "did you mean 'privacy'"),
    ("data.resolutoin=32", "did you mean 'resolution'"),
    ("dpmepf.lr=fast", "dpmepf.lr must be float"),
    ("data.resolution=2.5", "data.resolution must be int"),
    ("data.resolution=2", "4..1024"),
    ("privacy.accountant=gdp", "GDP"),
    ("data.channels=2", "channels"),
    ("dpmepf.moving_average=0", "moving_average"),
    ("dpmepf=3", "must be a table"),
])
def test_bad_keys_and_values_are_one_clear_line(bad: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        _resolve([bad])


def test_unknown_method() -> None:
    with pytest.raises(UsageError, match="method must be one of"):
        _resolve([], {"method": "gan"})


def test_overrides_are_typed_and_round_trip() -> None:
    r = _resolve(["dpmepf.steps=7", "privacy.epsilon=3", "features.input_size=64",
                  "data.channels=1", "features.encoder=open_clip:ViT-B-32"])
    assert r.generator.steps == 7 and r.privacy.epsilon == 3.0 and r.data.channels == "1"
    assert r.features.encoder == "open_clip:ViT-B-32"
    assert recipes.from_dict(r.to_dict()) == r


def test_set_needs_key_value() -> None:
    with pytest.raises(UsageError, match="key=value"):
        _resolve(["dpmepf.steps"])


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_resolve(path: Path) -> None:
    r = recipes.resolve(recipes.read(path))
    assert r.method in ("dp-mepf", "privimage")


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        recipes.read(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("method = ")
    with pytest.raises(UsageError, match="not valid TOML"):
        recipes.read(tmp_path / "bad.toml")
