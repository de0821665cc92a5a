"""The certificate (issue 3, item 3): real certificates validate against the documented JSON schema
(privsynth/certificate_schema.json), state the privacy unit and its bound, hold no seed; and the
known-answer PRV value: opacus' published number and ours are both within [PLD - 1e-3, PLD + 1%]."""
from __future__ import annotations

import json
import math
import warnings
from importlib import resources

import dp_accounting
import jsonschema
import pytest
from dp_accounting import pld

from privsynth import certificate, run
from privsynth.privacy import epsilon
from privsynth.recipe import resolve

TINY = {"method": "dp-mepf", "data": {"resolution": 16}, "features": {"input_size": 32},
        "dpmepf": {"steps": 2, "batch_per_class": 2, "width": 8}}


def _schema() -> dict:
    return json.loads(resources.files("privsynth").joinpath("certificate_schema.json").read_text())


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Certificates of two real tiny fits: one image per unit, and one person (folder level 2)."""
    from test_privacy_units import PEOPLE, _people

    root = tmp_path_factory.mktemp("certs")
    folder = _people(root / "private", PEOPLE)
    out = {}
    for unit in ("image", "folder:2"):
        recipe = resolve(dict(TINY, privacy={"epsilon": 4.0, "unit": unit}))
        # a dataset's ledger holds one unit: the two fits are recorded under two names
        result = run.fit(folder, None, recipe, root / unit.replace(":", "-"),
                         dataset=f"people-{unit.replace(':', '')}")
        out[unit] = json.loads((result.run / "certificate.json").read_text())
    return out


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(_schema())


@pytest.mark.parametrize("unit", ["image", "folder:2"])
def test_real_certificates_validate_against_the_schema(certs, unit):
    cert = certs[unit]
    jsonschema.validate(cert, _schema(), cls=jsonschema.Draft202012Validator)
    assert certificate.check(cert) == []


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(noise_seed=1234),  # a seed would let anyone subtract the noise
    lambda c: c["implementation"]["noise_rng"].update(seed_recorded=True),
    lambda c: c.update(accountant="gdp"),
    lambda c: c["mechanisms"][0].pop("sensitivity"),
    lambda c: c["mechanisms"][0].update(file_sha256="ab" * 32),
    lambda c: c.pop("unprotected"),
], ids=["seed", "seed_recorded", "gdp", "no_sensitivity", "file_hash", "no_unprotected"])
def test_the_schema_rejects_what_a_certificate_must_not_be(certs, mutate):
    cert = json.loads(json.dumps(certs["image"]))
    mutate(cert)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cert, _schema(), cls=jsonschema.Draft202012Validator)


def test_certificate_states_the_unit_its_bound_and_delta_from_units(certs):
    per_image, per_person = certs["image"], certs["folder:2"]
    assert per_image["privacy_unit"] == "one image file" and per_image["unit"]["kind"] == "image"
    assert per_person["unit"] == {"kind": "folder", "key": 2, "bound": per_person["unit"]["bound"]}
    assert "folder level 2" in per_person["privacy_unit"]
    assert "1/m" in per_person["unit"]["bound"]
    n_units, n_files = 4, 12  # PEOPLE: 4 people, 12 images
    assert per_person["delta"] == pytest.approx(1 / (n_units * math.log(n_units)))
    assert per_image["delta"] == pytest.approx(1 / (n_files * math.log(n_files)))
    assert any("privacy units N" in u for u in per_person["unprotected"])
    assert "Per-unit bound" in certificate.render(per_person)


def _n_items(unprotected: list[str]) -> list[str]:
    return [u for u in unprotected if "files N" in u or "units N" in u]


def test_a_judged_fit_with_a_given_delta_names_n_unprotected(tmp_path):
    """Issue 25: the judge's sample rate is judge_batch / N and every sigma is calibrated with it,
    so even with a user-given delta the certificate names N, once, and states what replace-one
    neighbours get."""
    from conftest import make_folder

    folder = make_folder(tmp_path / "private", per_class=4)
    judged = dict(TINY["dpmepf"], judge=True, judge_batch=2, judge_epochs=1.0)
    recipe = resolve(dict(TINY, dpmepf=judged, privacy={"epsilon": 4.0, "delta": 1e-5}))
    result = run.fit(folder, None, recipe, tmp_path / "run", dataset="judged")
    cert = json.loads((result.run / "certificate.json").read_text())
    jsonschema.validate(cert, _schema(), cls=jsonschema.Draft202012Validator)
    assert cert["delta_rule"].startswith("user-given")
    [named] = _n_items(cert["unprotected"])
    assert "dpmepf.judge (judge_batch / N)" in named and "every release" in named
    assert "used only to set delta" not in named
    eps2, delta2 = 2 * cert["epsilon"]["spent"], (1 + math.exp(cert["epsilon"]["spent"])) * 1e-5
    assert any(f"({eps2:.4g}, {delta2:.3g})" in n and "replace-one" in n for n in cert["notes"])


def test_n_is_named_once_for_all_its_uses():
    """The default delta and the judges' sample rates share one sentence; without either, N is
    not named (and no replace-one note is asked for)."""
    from privsynth.generators import dpmepf

    default = "1 / (N ln N) with N = 12 private image files"
    both = run._statement(dpmepf.privacy_statement(dpmepf.Config(judge=True, scatter_judge=True)),
                          resolve(TINY), default, False)
    [named] = _n_items(both["unprotected"])
    assert named.startswith("the number of private image files N, which sets delta and the DP-SGD")
    assert "scatter_batch / N" in named and both["n_public"] and "uses_n" not in both
    only_delta = run._statement(dpmepf.privacy_statement(dpmepf.Config()), resolve(TINY), default,
                                False)
    assert _n_items(only_delta["unprotected"]) == ["the number of private image files N, used "
                                                   "only to set delta"]
    given = run._statement(dpmepf.privacy_statement(dpmepf.Config()), resolve(TINY),
                           "user-given delta = 1e-05", False)
    assert _n_items(given["unprotected"]) == [] and not given["n_public"]


def test_replace_one_is_two_add_remove_steps():
    """Group privacy over a removal and an addition: (2 eps, (1 + e^eps) delta), delta <= 1."""
    assert certificate.replace_one(1.0, 1e-5) == (2.0, pytest.approx((1 + math.e) * 1e-5))
    assert certificate.replace_one(2000.0, 1e-9) == (4000.0, 1.0)


# ---------------------------------------------------------------------------------------------
# the known-answer PRV value (docs/RELIABILITY.md B: sigma=1.5, q=0.04, T=2250, delta=1e-5)

OPACUS_PUBLISHED = 6.7774  # opacus' published PRV value for this history
OURS_PINNED = 6.7911  # ours: opacus' PRV with eps_error = 0.3% of RDP (0.022 here)


@pytest.fixture(scope="module")
def pld_golden() -> float:
    acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                            value_discretization_interval=1e-4)
    event = dp_accounting.PoissonSampledDpEvent(0.04, dp_accounting.GaussianDpEvent(1.5))
    acc.compose(dp_accounting.SelfComposedDpEvent(event, 2250))
    return float(acc.get_epsilon(1e-5))


def test_published_opacus_value_and_ours_are_both_tight_upper_bounds(pld_golden):
    """Both are PRV upper bounds (true epsilon + at most eps_error); they differ only in the
    eps_error each run allows. Both must be >= PLD - 1e-3 and within +1% of it."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(1.5, 0.04, 2250)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opacus_default = acc.get_epsilon(delta=1e-5)  # opacus 1.6 defaults (eps_error=0.01)
    ours = epsilon([(1.5, 0.04, 2250)], 1e-5)
    assert ours == pytest.approx(OURS_PINNED, abs=5e-3)
    for value in (OPACUS_PUBLISHED, opacus_default, ours):
        assert pld_golden - 1e-3 <= value <= pld_golden * 1.01, value
    assert ours >= opacus_default - 1e-3  # a looser eps_error never reports less
