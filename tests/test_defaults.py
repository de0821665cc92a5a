"""The defaults layer (privsynth.defaults): the best known configuration, sized from public facts,
under the recipe file and --set; recorded in recipe.json ('chosen') and in fit's output."""
from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from privsynth import defaults, recipe as recipes
from privsynth.cli import app
from privsynth.data import scan

MNIST = defaults.Facts(size=(28, 28), grey=True, classes=10, public_classes=200)

# The two MNIST recipes the benchmark rows were measured with (recipes/mnist-dpmepf.toml and
# recipes/mnist-privimage.toml at 94d0be0, comments dropped): the defaults must resolve to them.
MNIST_DPMEPF = """
method = "dp-mepf"
[data]
resolution = 28
channels = "1"
[privacy]
accountant = "prv"
[features]
encoder = "efficientnet-lite0"
input_size = 32
pixels = 0.5
grid = 2
[dpmepf]
split_bits = 3
split_noise = 0.15
batch_per_class = 16
unbiased = true
lr = 0.003
moving_average = 0.2
judge = true
scatter_judge = true
steps = 3600
"""
MNIST_PRIVIMAGE = """
method = "privimage"
[data]
resolution = 28
channels = "1"
[privacy]
accountant = "prv"
[features]
encoder = "efficientnet-lite0"
input_size = 32
pixels = 0.5
grid = 2
[privimage]
query_topk = 1
query_sigma = 20.0
query_epochs = 5
select_per_class = 2
width = 32
pretrain_steps = 100
draft_images = 20000
draft_steps = 1500
strength = 0.1
sample_steps = 2
dp_steps = 60
dp_batch = 512
physical_batch = 128
[privimage.dpmepf]
split_bits = 3
split_noise = 0.15
batch_per_class = 16
unbiased = true
lr = 0.003
moving_average = 0.2
judge = true
scatter_judge = true
steps = 2500
"""
TINY_STEPS = ["--set", "dpmepf.steps=2", "--set", "dpmepf.width=8", "--set",
              "dpmepf.judge_epochs=1", "--set", "dpmepf.scatter_epochs=1"]


def _plain(method: str, epsilon: float) -> dict:
    return {"method": method, "privacy": {"epsilon": epsilon}}


@pytest.mark.parametrize("epsilon", [10.0, 1.0])
@pytest.mark.parametrize("method, measured", [("dp-mepf", MNIST_DPMEPF),
                                              ("privimage", MNIST_PRIVIMAGE)])
def test_mnist_defaults_are_the_measured_recipes(method: str, measured: str, epsilon: float) -> None:
    raw = tomllib.loads(measured)
    raw["privacy"]["epsilon"] = epsilon
    got, chosen = defaults.complete(_plain(method, epsilon), MNIST)
    assert got == recipes.resolve(raw)
    assert chosen["data.resolution"]["value"] == 28 and chosen["data.channels"]["value"] == "1"


def test_the_bench_gives_the_facts_a_fit_reads_from_headers(tmp_path: Path) -> None:
    from bench import mnist
    from conftest import make_folder

    private = make_folder(tmp_path / "p", per_class=2, classes=tuple("0123456789"))
    public = make_folder(tmp_path / "pub", per_class=1, classes=tuple(f"c{i}" for i in range(200)),
                         size=8)
    assert defaults.facts_of(scan(private), public) == mnist.FACTS["mnist"]


def test_a_partial_recipe_gets_the_rest_and_set_beats_recipe_beats_defaults(tmp_path: Path) -> None:
    file = tmp_path / "partial.toml"
    file.write_text('method = "dp-mepf"\n[dpmepf]\nsteps = 500\nlr = 0.01\n[features]\ngrid = 4\n')
    raw = recipes.apply_overrides(recipes.read(file), ["dpmepf.lr=0.02", "privacy.epsilon=3"])
    got, chosen = defaults.complete(raw, MNIST)
    g = got.generator
    assert (g.steps, g.lr, got.features.grid) == (500, 0.02, 4)  # recipe; --set over the recipe
    assert (g.split_bits, g.judge, g.scatter_judge, g.batch_per_class) == (3, True, True, 16)
    assert not {"dpmepf.steps", "dpmepf.lr", "features.grid"} & set(chosen)
    assert chosen["dpmepf.split_bits"]["value"] == 3 and "MNIST" in chosen["dpmepf.split_bits"]["why"]
    # plain resolve keeps the class defaults
    plain = recipes.resolve(raw)
    assert (plain.generator.split_bits, plain.generator.judge, plain.data.resolution) == (0, False, 32)


@pytest.mark.parametrize("size, side, scatter", [((28, 28), 28, True), ((30, 31), 28, True),
                                                 ((640, 480), 32, True), ((14, 14), 14, False),
                                                 ((10, 12), 10, False), ((3, 3), 4, False)])
def test_the_shape_sizes_the_resolution_and_rules_out_the_scattering_judge(size, side, scatter) -> None:
    facts = dataclasses.replace(MNIST, size=size)
    got, chosen = defaults.complete(_plain("dp-mepf", 10.0), facts)
    assert got.data.resolution == side and got.generator.scatter_judge is scatter
    assert f"{size[0]}x{size[1]}" in chosen["data.resolution"]["why"]
    if not scatter:
        why = chosen["dpmepf.scatter_judge"]["why"]
        assert why.startswith("off:") and "multiple of 2^2" in why and str(side) in why
    # privimage's UNet needs sides divisible by 4
    pi, _ = defaults.complete(_plain("privimage", 10.0), facts)
    assert pi.data.resolution % 4 == 0 and pi.data.resolution <= max(8, min(size))


def test_a_given_value_that_rules_out_a_default_turns_it_off_with_a_reason() -> None:
    raw = dict(_plain("dp-mepf", 10.0), dpmepf={"batch_per_class": 4})
    got, chosen = defaults.complete(raw, MNIST)
    assert got.generator.unbiased is False and got.generator.split_bits == 3
    assert "batch_per_class 4" in chosen["dpmepf.unbiased"]["why"]
    raw = dict(_plain("dp-mepf", 10.0), dpmepf={"split_bits": 0})
    got, chosen = defaults.complete(raw, MNIST)
    assert "dpmepf.split_noise" not in chosen and got.generator.split_noise == 0.0


def test_privimage_defaults_follow_drafts_and_public_classes() -> None:
    facts = dataclasses.replace(MNIST, public_classes=10)  # the demo: 10 public classes
    got, chosen = defaults.complete(_plain("privimage", 10.0), facts)
    assert got.generator.select_per_class == 1 and "10 public classes" in \
        chosen["privimage.select_per_class"]["why"]
    raw = dict(_plain("privimage", 10.0), privimage={"draft": "none", "strength": 1.0})
    got, chosen = defaults.complete(raw, MNIST)  # no draft settings forced on a drafts-off run
    assert got.generator.sample_steps == 3 and not any("dpmepf" in k for k in chosen)
    assert got.generator.dp_steps == 60


def test_defaults_never_read_n(tmp_path: Path) -> None:
    from conftest import make_folder

    assert "n" not in {f.name for f in dataclasses.fields(defaults.Facts)}
    small = make_folder(tmp_path / "small", per_class=3)
    large = make_folder(tmp_path / "large", per_class=30, seed=4)
    assert defaults.facts_of(scan(small)) == defaults.facts_of(scan(large))


def test_plain_fit_records_what_the_defaults_chose(tmp_path: Path) -> None:
    from conftest import make_folder

    private = make_folder(tmp_path / "private", size=20)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["fit", str(private), "--method", "dp-mepf", "--epsilon",
                                      "5", "--out", str(out), *TINY_STEPS])
    assert result.exit_code == 0, result.output
    assert "defaults: " in result.stdout and "resolution 20" in result.stdout
    recipe = json.loads((out / "recipe.json").read_text())
    chosen = recipe["chosen"]
    assert "dpmepf.steps" not in chosen and recipe["dpmepf"]["steps"] == 2  # --set wins
    for key, entry in chosen.items():
        section, _, name = key.partition(".")
        assert recipe[section][name] == entry["value"] and entry["why"]
    assert recipe["dpmepf"]["split_bits"] == 3 and recipe["features"]["grid"] == 2
    assert recipe["dpmepf"]["judge"] and recipe["dpmepf"]["scatter_judge"]  # 20 = 5 x 4
    assert recipe["data"] == {"resolution": 20, "channels": "1"}
    cert = json.loads((out / "certificate.json").read_text())
    assert any("20x20" in line and "data.resolution" in line for line in cert["unprotected"])
    assert any("greyscale" in line for line in cert["unprotected"])
    # recipe.json is complete: a fit from it gets nothing more from the defaults
    raw = {k: v for k, v in recipe.items() if k not in ("public", "chosen")}
    assert defaults.choose("dp-mepf", defaults.facts_of(scan(private)), raw) == {}


def test_privimage_without_public_still_refused(tmp_path: Path) -> None:
    from conftest import make_folder

    private = make_folder(tmp_path / "private")
    result = CliRunner().invoke(app, ["fit", str(private), "--method", "privimage", "--epsilon",
                                      "5", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "privimage needs --public" in result.output
    assert not (tmp_path / "run").exists()


def test_the_current_mnist_rows_are_made_with_the_defaults() -> None:
    """The newest MNIST rows at epsilon 10 (made with the former recipes/mnist-*.toml files) are
    what `bench run` makes now with the defaults: the chart does not mark them stale."""
    import subprocess

    from bench import chart

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode:
        pytest.skip("needs the git history the rows' commits name")
    rows = [json.loads(line) for line in (root / "benchmarks" / "results.jsonl").read_text()
            .splitlines() if line.strip()]
    for method in ("dp-mepf", "privimage"):
        row = [r for r in rows if r["dataset"] == "mnist" and r["method"] == method
               and r["epsilon_target"] == 10 and not r.get("overrides")][-1]
        assert not chart._stale(row), row["commit"]
    older = next(r for r in rows if r["commit"] == "f1a0aee")  # 2500 steps, no label filters
    assert chart._stale(older)
