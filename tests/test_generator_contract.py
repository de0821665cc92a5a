"""The generator contract (privsynth.generators.base): every registered method satisfies it,
signatures included; run.py knows methods only through it; and a third generator, defined here and
registered with one line, goes through `run.fit` and `run.sample` end to end."""
from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_folder
from privsynth import generators, run
from privsynth.data import Listing, load
from privsynth.generators import base
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.recipe import resolve

ROOT = Path(__file__).resolve().parents[1]


def _params(fn) -> list[tuple[str, inspect._ParameterKind, object]]:
    """(name, kind, default) of each parameter after self / cls."""
    found = list(inspect.signature(fn).parameters.values())
    if found and found[0].name in ("self", "cls"):
        found = found[1:]
    return [(p.name, p.kind, p.default) for p in found]


def _same_call(impl, proto, *, exact: bool) -> None:
    """`impl` accepts every call `proto` describes: the same parameters in the same kinds (and
    with `exact`, the same defaults and nothing more; otherwise extra ones must be optional
    keywords)."""
    got, want = _params(impl), _params(proto)
    if exact:
        assert got == want, f"{impl.__qualname__}{inspect.signature(impl)}"
        return
    names = {name for name, _, _ in want}
    assert [(n, k) for n, k, _ in got if n in names] == [(n, k) for n, k, _ in want], impl
    extra = [(n, k, d) for n, k, d in got if n not in names]
    assert all(k is inspect.Parameter.KEYWORD_ONLY and d is not inspect.Parameter.empty
               for _, k, d in extra), f"{impl.__qualname__}: extra required parameters {extra}"


def _check_method(found: base.Method) -> None:
    assert dataclasses.is_dataclass(found.config)
    config = found.config()
    assert isinstance(found.data_parallel(config), bool)
    stmt = found.privacy_statement(config, "image")
    assert {"privacy_unit", "post_processing", "notes", "unprotected"} <= set(stmt)
    assert isinstance(found.public_use, str) and found.public_use
    gen, kind = found.generator, found.sampler
    _same_call(gen.__init__, base.Generator.__init__, exact=False)
    _same_call(gen.fit, base.Generator.fit, exact=True)  # ONE fit signature
    for name in ("sample", "card", "to", "save", "load", "needs_encoder"):
        _same_call(getattr(kind, name), getattr(base.Sampler, name), exact=False)
    assert isinstance(inspect.getattr_static(kind, "load"), classmethod)
    assert isinstance(inspect.getattr_static(kind, "needs_encoder"), staticmethod)


@pytest.mark.parametrize("name", ["dp-mepf", "privimage"])
def test_each_registered_method_keeps_the_contract(name: str) -> None:
    found = generators.method(name)
    assert found.name == name and name in generators.REGISTRY
    _check_method(found)
    assert resolve({"method": name}).generator == found.config()  # the recipe section's class


def test_the_check_catches_a_second_fit_signature() -> None:
    class Drifted(FakeGenerator):
        def fit(self, private, budget, *, seed=0, progress=None, state=None, charges=None):
            raise AssertionError("never called")

    with pytest.raises(AssertionError):
        _check_method(dataclasses.replace(METHOD, generator=Drifted))


def test_run_reads_no_module_flags_and_knows_no_method() -> None:
    source = (ROOT / "privsynth" / "run.py").read_text()
    assert "getattr(" not in source
    for word in ("dp-mepf", "dpmepf", "privimage", "judge"):
        assert word not in source.lower(), word


def test_an_unknown_method_names_the_registered_ones() -> None:
    with pytest.raises(Exception, match="dp-mepf, privimage"):
        generators.method("dpmepf")


def test_the_fit_path_imports_no_evaluation_code() -> None:
    code = ("import sys\nimport privsynth.cli, privsynth.run\nfrom privsynth import generators\n"
            "for name in generators.REGISTRY:\n    generators.method(name)\n"
            "bad = sorted(m for m in sys.modules if m in ('privsynth.downstream', "
            "'privsynth.evaluate', 'privsynth.fidelity'))\nprint(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# A third generator: noisy per-class mean images, plus the pixel noise it samples with. It lives
# in this module; registering it is the one line `monkeypatch.setitem(REGISTRY, ...)` below.

@dataclass(frozen=True)
class FakeConfig:
    """Settings of the fake method ([fakemean] in a recipe)."""

    spread: float = 0.1  # std of the pixel noise added when sampling (post-processing)


class FakeSampler:
    """Per-class mean images (noisy, so publishable) and class weights."""

    method = "fake-mean"

    def __init__(self, means: torch.Tensor, weights: torch.Tensor, classes: tuple[str, ...],
                 spread: float) -> None:
        self.means, self.weights, self.classes, self.spread = means, weights, tuple(classes), spread

    def sample(self, n: int, *, seed: int = 0, balanced: bool = False, batch: int = 100,
               part: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        labels = generators.draw_labels(n, self.weights.tolist(), balanced=balanced,
                                        generator=gen)

        def draw(rows: torch.Tensor, stream: torch.Generator) -> torch.Tensor:
            x = self.means[rows] + self.spread * torch.randn(
                (len(rows), *self.means.shape[1:]), generator=stream)
            return (x.clamp(0, 1) * 255).round().to(torch.uint8)

        empty = torch.zeros((0, *self.means.shape[1:]), dtype=torch.uint8)
        return generators.draw_chunks(labels, seed, batch, part, draw, empty)

    def card(self, *, counted: bool = True) -> dict:
        return {"fake": f"class means plus pixel noise of std {self.spread:g}"}

    def to(self, device: str) -> FakeSampler:
        return self

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"means": self.means.contiguous(), "weights": self.weights},
                  str(folder / "means.safetensors"))
        (folder / "config.json").write_text(json.dumps(
            {"method": self.method, "classes": list(self.classes), "spread": self.spread}))

    @classmethod
    def load(cls, folder: Path) -> FakeSampler:
        meta = json.loads((folder / "config.json").read_text())
        saved = load_file(str(folder / "means.safetensors"))
        return cls(saved["means"], saved["weights"], tuple(meta["classes"]), meta["spread"])

    @staticmethod
    def needs_encoder(folder: Path) -> bool:
        return False


class FakeGenerator:
    """One Gaussian release of per-class pixel sums (rows clipped to norm 1) and counts."""

    def __init__(self, config: FakeConfig, encoder=None, *, resolution: int, channels: int,
                 device: str = "cpu") -> None:
        self.config, self.resolution, self.channels = config, resolution, channels
        self.rejects: list[tuple[str, str]] = []

    def fit(self, private: Listing, budget: Budget, *, public: Path | None = None, seed: int = 0,
            progress=None, state=None) -> FakeSampler:
        def plan(scale: float) -> list[Charge]:
            return [Charge("fake.sums", scale, 1.0, 1, 1.0, "per-class pixel sums"),
                    Charge("fake.counts", scale, 1.0, 1, 1.0, "per-class counts")]

        charges = budget.calibrate(plan)
        budget.charge(charges)
        images = load(private, resolution=self.resolution, channels=self.channels)
        self.rejects = list(images.rejects)
        k, shape = len(private.classes), images.images.shape[1:]
        rows = images.images.flatten(1).double() / 255.0
        sums = GaussianSum(budget, charges[0], k, rows.shape[1], NoiseSource())
        counts = GaussianSum(budget, charges[1], k, 1, NoiseSource())
        sums.add(rows / rows.norm(dim=1, keepdim=True).clamp(min=1.0), images.labels)
        counts.add(torch.ones(len(rows), 1, dtype=torch.float64), images.labels)
        n = counts.release()[:, 0].clamp(min=1.0)
        means = (sums.release() / n[:, None]).float().view(k, *shape)
        if progress:
            progress("fake release", 1, 1)
        return FakeSampler(means, (n / n.sum()).float(), private.classes, self.config.spread)


def _fake_statement(config: FakeConfig, unit: str = "image") -> dict:
    return {"privacy_unit": "one image file", "post_processing": "pixel noise when sampling",
            "notes": ["Rows are clipped to norm 1."], "unprotected": []}


METHOD = base.Method(name="fake-mean", config=FakeConfig, generator=FakeGenerator,
                     sampler=FakeSampler, privacy_statement=_fake_statement, uses_public=False,
                     public_use="not by fake-mean", uses_encoder=False, resumable=False,
                     user_level=False, parallel=None)


def test_a_third_generator_needs_its_module_and_one_registry_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(generators.REGISTRY, "fake-mean", __name__)  # the one line
    _check_method(generators.method("fake-mean"))
    private = make_folder(tmp_path / "private", per_class=4, size=8)
    recipe = resolve({"method": "fake-mean", "data": {"resolution": 8, "channels": "1"},
                      "privacy": {"epsilon": 2.0}, "fakemean": {"spread": 0.05}})
    seen = []
    result = run.fit(private, None, recipe, tmp_path / "run", dataset="fake",
                     progress=lambda what, done, total: seen.append(what))
    assert seen == ["fake release"]
    cert = result.certificate
    assert cert["implementation"]["method"] == "fake-mean"
    assert sorted(c["name"] for c in cert["mechanisms"]) == ["fake.counts", "fake.sums"]
    assert cert["epsilon"]["spent"] <= 2.0
    written = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert written["fakemean"] == {"spread": 0.05}
    assert written["public"] == {"path": None, "used": "not by fake-mean"}
    out = run.sample(tmp_path / "run", 6, tmp_path / "synthetic", seed=1)
    assert len(list(Path(out).rglob("*.png"))) == 6
    assert "class means plus pixel noise" in (Path(out) / "README.md").read_text()
    with pytest.raises(Exception, match="bounds only one image per unit"):  # user_level=False
        run.fit(private, None, dataclasses.replace(recipe, privacy=dataclasses.replace(
            recipe.privacy, unit="folder:1")), tmp_path / "people", dataset="fake-people")
