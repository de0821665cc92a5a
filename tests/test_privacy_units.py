"""User-level privacy (issue 3, item 5): a privacy unit names all the images of one person; every
release moves by at most its sensitivity when one WHOLE unit is added or removed, whatever its
number of images and however they spread over classes; the certificate states the unit."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from privsynth.data import scan
from privsynth.errors import BudgetError, DataError, UsageError
from privsynth.generators import dpmepf
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.privacy.dpsgd import clipped_sum, unit_passes
from privsynth.privacy.units import assign, describe, parse


class ZeroNoise(NoiseSource):
    """No noise: a release is exactly the clipped, weighted sum."""

    def __init__(self) -> None:
        pass

    def normal(self, shape, std):
        return np.zeros(shape)


def _sum(rows, slots, units, sizes, c=1.0):
    budget = Budget(epsilon=1e3, delta=1e-5, accountant="rdp")
    charge = Charge("stat", 2.0, 1.0, 1, c, "sums")
    budget.charge([charge])
    mech = GaussianSum(budget, charge, 3, rows.shape[1], ZeroNoise(),
                       unit_sizes=None if sizes is None else sizes)
    if len(rows):
        mech.add(rows, slots, None if sizes is None else units)
    return mech.release()


def _dataset(gen: torch.Generator, n_units: int, dim: int):
    """Units with 1-6 rows each, of wildly different norms, spread over 3 slots (classes)."""
    rows, slots, units = [], [], []
    for u in range(n_units):
        m = int(torch.randint(1, 7, (1,), generator=gen))
        scale = 10.0 ** float(torch.randint(-2, 6, (1,), generator=gen))
        rows.append(torch.randn(m, dim, generator=gen, dtype=torch.float64) * scale)
        slots.append(torch.randint(0, 3, (m,), generator=gen))
        units += [u] * m
    return torch.cat(rows), torch.cat(slots), torch.tensor(units)


def _without(rows, slots, units, u):
    keep = units != u
    left = units[keep]
    remap = torch.unique(left, return_inverse=True)[1]  # re-index the remaining units
    return rows[keep], slots[keep], remap


def test_removing_one_whole_unit_moves_the_sum_by_at_most_the_sensitivity():
    gen = torch.Generator().manual_seed(0)
    c, violations, worst, pairs = 1.3, 0, 0.0, 0
    for trial in range(60):
        rows, slots, units = _dataset(gen, int(torch.randint(1, 8, (1,), generator=gen)), 5)
        # adversarial unit: 12 max-norm duplicates of one direction in one class, plus an all-zero
        # image and a copy of another unit's row in another class
        bad = torch.randn(5, generator=gen, dtype=torch.float64) * 1e9
        adv_rows = torch.cat([bad.expand(12, 5), torch.zeros(1, 5, dtype=torch.float64), rows[:1]])
        adv_slots = torch.tensor([0] * 12 + [1, 2])
        big_rows = torch.cat([rows, adv_rows])
        big_slots = torch.cat([slots, adv_slots])
        big_units = torch.cat([units, torch.full((14,), int(units.max()) + 1)])
        full = _sum(big_rows, big_slots, big_units, torch.bincount(big_units).tolist(), c)
        for u in torch.unique(big_units).tolist():  # every unit, the adversarial one included
            r, s, k = _without(big_rows, big_slots, big_units, u)
            sizes = torch.bincount(k).tolist() if len(k) else []
            change = float((_sum(r, s, k, sizes, c) - full).norm())  # Frobenius over all classes
            violations += change > c * (1 + 1e-9)
            worst, pairs = max(worst, change), pairs + 1
    assert pairs > 200 and violations == 0
    assert worst == pytest.approx(c, rel=1e-9)  # the 12 duplicates together reach the bound


def test_without_units_one_person_with_many_images_moves_the_sum_many_times():
    """Why the unit matters: per-image accounting lets 5 images of one person move it by 5C."""
    rows = torch.full((5, 2), 1e6, dtype=torch.float64)
    slots = torch.zeros(5, dtype=torch.long)
    per_image = float(_sum(rows, slots, None, None).norm())
    per_unit = float(_sum(rows, slots, torch.zeros(5, dtype=torch.long), [5]).norm())
    assert per_image == pytest.approx(5.0) and per_unit == pytest.approx(1.0)


def test_a_unit_cannot_add_more_rows_than_its_size_or_skip_naming_units():
    budget = Budget(epsilon=1e3, delta=1e-5, accountant="rdp")
    charges = [Charge(f"s{i}", 2.0, 1.0, 1, 1.0, "sums") for i in range(2)]
    budget.charge(charges)
    mech = GaussianSum(budget, charges[0], 2, 2, ZeroNoise(), unit_sizes=[2, 1])
    mech.add(torch.ones(2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 0]))
    with pytest.raises(BudgetError, match="more rows than its declared size"):
        mech.add(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(BudgetError, match="name their units"):
        mech.add(torch.ones(1, 2), torch.zeros(1, dtype=torch.long))
    plain = GaussianSum(budget, charges[1], 2, 2, ZeroNoise())
    with pytest.raises(BudgetError, match="name their units"):
        plain.add(torch.ones(1, 2), torch.zeros(1, dtype=torch.long), torch.tensor([0]))


# ---------------------------------------------------------------------------------------------
# units from the listing (no pixel read)


def _people(root: Path, people: dict[str, dict[str, int]], metadata: bool = False) -> Path:
    """class/person/i.png files (or a flat folder + metadata.jsonl with a person column)."""
    rng = np.random.default_rng(0)
    rows = []
    for person, per_class in people.items():
        for cls, n in per_class.items():
            for i in range(n):
                rel = f"{cls}/{person}/{i}.png" if not metadata else f"{person}_{cls}_{i}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                img = rng.integers(0, 255, (12, 12), dtype=np.uint8)
                Image.fromarray(img, "L").save(root / rel)
                rows.append({"file_name": rel, "label": cls, "person": person})
    if metadata:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


PEOPLE = {"ann": {"cat": 5, "dog": 1}, "bob": {"cat": 1}, "cy": {"dog": 3}, "di": {"dog": 2}}


def test_units_from_a_folder_level_and_from_a_metadata_column(tmp_path):
    listing = scan(_people(tmp_path / "f", PEOPLE))
    units = assign(listing.root, listing.files, "folder:2")
    assert units.count == 4 and sorted(units.sizes) == [1, 2, 3, 6]
    listing = scan(_people(tmp_path / "m", PEOPLE, metadata=True))
    by_col = assign(listing.root, listing.files, "column:person")
    assert sorted(by_col.sizes) == [1, 2, 3, 6]
    assert assign(listing.root, listing.files, "image").sizes == (1,) * 12
    with pytest.raises(DataError, match="gives no 'patient'"):
        assign(listing.root, listing.files, "column:patient")
    with pytest.raises(DataError, match="folder"):
        assign(listing.root, listing.files, "folder:1")  # flat files: no folder level 1


@pytest.mark.parametrize("bad", ["person", "column:", "folder:0", "folder:x", "images"])
def test_bad_unit_specs_are_usage_errors(bad):
    with pytest.raises(UsageError, match="privacy.unit"):
        parse(bad)


# ---------------------------------------------------------------------------------------------
# dp-mepf's real release path with units


class MaxNormEncoder(torch.nn.Module):
    """A stand-in encoder whose every feature row has the largest allowed norm (1)."""

    dim = 144

    def forward(self, x):
        rows = x.flatten(1) + 1e-3
        return rows / rows.norm(dim=1, keepdim=True)


def _release_sums(monkeypatch, listing) -> dict[str, torch.Tensor]:
    """The pre-noise sums that dp-mepf's release() builds for `listing` (through the real code)."""
    seen = {}

    class Capture(GaussianSum):
        def release(self):
            seen[self.charge.name] = self._sum.clone()
            return super().release()

    monkeypatch.setattr(dpmepf, "GaussianSum", Capture)
    monkeypatch.setattr(dpmepf, "NoiseSource", ZeroNoise)
    gen = dpmepf.Generator(dpmepf.Config(), MaxNormEncoder(), resolution=12, channels=1)
    budget = Budget(epsilon=1e3, delta=1e-5, accountant="rdp")
    charges = gen.plan(budget)
    gen.release(listing, budget, charges)
    return seen


def test_dpmepf_release_bounds_each_whole_unit(monkeypatch, tmp_path):
    listing = scan(_people(tmp_path / "f", PEOPLE))
    units = assign(listing.root, listing.files, "folder:2")
    full = _release_sums(monkeypatch, replace(listing, units=units.index))
    bounds = {c.name: c.sensitivity for c in dpmepf.Config().plan(1.0)}
    for u in range(units.count):
        keep = [i for i, k in enumerate(units.index) if k != u]
        left = [units.index[i] for i in keep]
        order = {k: j for j, k in enumerate(sorted(set(left)))}
        smaller = replace(listing, files=tuple(listing.files[i] for i in keep),
                          labels=tuple(listing.labels[i] for i in keep),
                          units=tuple(order[k] for k in left))
        sums = _release_sums(monkeypatch, smaller)
        for name, bound in bounds.items():
            change = float((full[name] - sums[name]).norm())
            assert change <= bound * (1 + 1e-9), (name, u, change, bound)
    # per image, "ann" (6 max-norm images) would move phi1 by ~6: the unit bound is what holds it
    per_image = _release_sums(monkeypatch, listing)
    assert float(per_image["dpmepf.counts"].sum()) == 12
    assert float(full["dpmepf.counts"].sum()) == pytest.approx(4.0)  # one weight per unit


def test_certificate_words_for_each_unit():
    words, unit = describe("column:patient_id")
    assert "patient_id" in words and unit["kind"] == "column" and "1/m" in unit["bound"]
    assert describe("image")[0] == "one image file"


# ---------------------------------------------------------------------------------------------
# privimage: the semantic histogram and DP-SGD bound a whole unit


def _without_unit(listing, units, u):
    """The listing with every file of unit `u` removed (units re-indexed)."""
    keep = [i for i, k in enumerate(units.index) if k != u]
    left = [units.index[i] for i in keep]
    order = {k: j for j, k in enumerate(sorted(set(left)))}
    return replace(listing, files=tuple(listing.files[i] for i in keep),
                   labels=tuple(listing.labels[i] for i in keep),
                   units=tuple(order[k] for k in left))


def _histogram(monkeypatch, listing, k: int = 2) -> torch.Tensor:
    """privimage's noise-free histogram of `listing` (through release_histogram)."""
    from privsynth.data import load
    from privsynth.generators import privimage

    monkeypatch.setattr(privimage, "NoiseSource", ZeroNoise)
    cfg = privimage.Config(query_topk=k, draft="none", strength=1.0)
    budget = Budget(epsilon=1e3, delta=1e-5, accountant="rdp")
    charge = cfg.plan(1.0, 10)[0]
    budget.charge([charge])
    torch.manual_seed(0)
    query = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(144, 7))
    gen = privimage.Generator(cfg, resolution=12, channels=1)
    priv = load(listing, resolution=12, channels=1)
    return gen.release_histogram(query, priv, budget, charge, 7, listing.units)


def test_privimage_histogram_bounds_each_whole_unit(monkeypatch, tmp_path):
    listing = scan(_people(tmp_path / "f", PEOPLE))
    units = assign(listing.root, listing.files, "folder:2")
    full = _histogram(monkeypatch, replace(listing, units=units.index))
    changes = [float((full - _histogram(monkeypatch, _without_unit(listing, units, u))).norm())
               for u in range(units.count)]
    assert max(changes) <= np.sqrt(2) * (1 + 1e-9)
    assert float(full.sum()) == pytest.approx(2 * 4)  # k ones per unit, not per image
    assert float(_histogram(monkeypatch, listing).sum()) == 2 * 12  # per image: k ones each


C = 1.5


def _step_sum(rows, members, sampled, cap=16, seed=0):
    """What one DP-SGD step adds for the sampled units, through privimage's real layout."""
    total = [torch.zeros(r.shape[1:], dtype=r.dtype) for r in rows]
    for idx, owners in unit_passes(members, np.asarray(sampled, dtype=int), cap=cap, per_pass=5,
                                   generator=torch.Generator().manual_seed(seed)):
        part = clipped_sum([r[torch.from_numpy(idx)] for r in rows], C, owners=owners)
        total = [a + b for a, b in zip(total, part)]
    return torch.cat([t.flatten() for t in total])


def test_dpsgd_step_bounds_each_whole_unit_however_many_images_it_has():
    gen = torch.Generator().manual_seed(1)
    violations, pairs, worst_many, worst_one = 0, 0, 0.0, 0.0
    for _ in range(30):
        sizes = torch.randint(1, 8, (int(torch.randint(2, 7, (1,), generator=gen)),),
                              generator=gen).tolist() + [12, 1]  # plus: many images, and one
        n = sum(sizes)
        scale = 10.0 ** torch.randint(-2, 7, (n, 1), generator=gen).double()
        rows = [torch.randn(n, 3, 4, generator=gen, dtype=torch.float64) * scale.view(n, 1, 1),
                torch.randn(n, 5, generator=gen, dtype=torch.float64) * scale]
        start = n - 13  # the 12-image unit: one max-norm gradient repeated (duplicates)
        for r in rows:
            r[start:start + 12] = r[start] / r[start].norm() * 1e9
            r[n - 1] = r[n - 1] / r[n - 1].norm() * 1e9
        bounds = np.cumsum([0] + sizes)
        members = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        full = _step_sum(rows, members, range(len(members)))
        for u in range(len(members)):
            others = [m for i, m in enumerate(members) if i != u]
            change = float((full - _step_sum(rows, others, range(len(others)))).norm())
            violations += change > C * (1 + 1e-6)
            pairs += 1
            if u == len(members) - 2:
                worst_many = max(worst_many, change)
            if u == len(members) - 1:
                worst_one = max(worst_one, change)
    assert pairs > 100 and violations == 0
    assert worst_many == pytest.approx(C, rel=1e-6) == worst_one  # 12 images bound like one
    per_image = clipped_sum([r[start:start + 12] for r in rows], C)  # no owners: 12 rows
    assert float(torch.cat([t.flatten() for t in per_image]).norm()) == pytest.approx(12 * C)


def test_unit_passes_keep_units_whole_and_cap_their_images():
    members = [np.arange(0, 1), np.arange(1, 6), np.arange(6, 18), np.arange(0), np.arange(18, 21)]
    owner_of = {int(i): u for u, m in enumerate(members) for i in m}
    picks = set()
    for seed in range(20):
        groups = []
        for idx, owners in unit_passes(members, np.arange(5), cap=4, per_pass=6,
                                       generator=torch.Generator().manual_seed(seed)):
            assert len(idx) <= 6 and owners.tolist() == sorted(owners.tolist())
            assert set(owners.tolist()) == set(range(int(owners[-1]) + 1))  # 0, 1, ... per pass
            groups += [idx[owners.numpy() == o].tolist() for o in range(int(owners[-1]) + 1)]
        assert all(len({owner_of[i] for i in g}) == 1 for g in groups)  # one unit per group
        assert [owner_of[g[0]] for g in groups] == [0, 1, 2, 4]  # each unit once, whole
        assert [len(g) for g in groups] == [1, 4, 4, 3]  # at most cap=4 images of a unit
        picks.add(tuple(groups[2]))
    assert len(picks) > 1  # the capped unit's images vary from step to step


def test_privimage_samples_units_at_q_over_units(tmp_path):
    from privsynth.data import load
    from privsynth.generators import privimage
    from privsynth.privacy.dpsgd import unit_members

    listing = scan(_people(tmp_path / "f", PEOPLE))
    units = assign(listing.root, listing.files, "folder:2")
    priv = load(replace(listing, units=units.index), resolution=12, channels=1)
    groups = unit_members(priv.units, len(priv), units.count)
    assert [len(g) for g in groups] == list(units.sizes)
    assert all((priv.units[torch.from_numpy(g)] == u).all() for u, g in enumerate(groups))
    cfg = privimage.Config(dp_batch=2, draft="none", strength=1.0)
    budget = Budget(epsilon=8.0, delta=1e-5, accountant="rdp")
    query, dpsgd = privimage.Generator(cfg, resolution=12, channels=1).plan(budget, units.count)
    assert dpsgd.sample_rate == 2 / 4 and budget.charges == [query, dpsgd]  # 4 units, 12 images


def test_privimage_fit_per_person_states_the_unit_and_its_bound(tmp_path):
    """End to end: a metadata column names the person; q is over the 4 persons, not 12 images."""
    import jsonschema
    from importlib import resources
    from typer.testing import CliRunner

    from conftest import make_folder
    from privsynth import certificate
    from privsynth.cli import app

    private = _people(tmp_path / "m", PEOPLE, metadata=True)
    public = make_folder(tmp_path / "public", per_class=4, classes=tuple("abcd"), size=12)
    tiny = {"privimage.strength": 0.2, "privimage.draft_images": 8, "privimage.draft_steps": 2,
            "privimage.dpmepf.steps": 2, "privimage.dpmepf.split_bits": 0,
            "privimage.dpmepf.judge": "false", "privimage.dpmepf.scatter_judge": "false",
            "privimage.dpmepf.unbiased": "false", "privimage.dpmepf.batch_per_class": 10,
            "privimage.dpmepf.lr": 0.001, "features.grid": 1, "privacy.accountant": "rdp", "privimage.width": 8, "data.resolution": 8,
            "privimage.pretrain_steps": 2, "privimage.pretrain_batch": 8, "privimage.dp_steps": 3,
            "privimage.dp_batch": 2, "privimage.physical_batch": 4, "privimage.unit_images": 2,
            "privimage.query_epochs": 1, "privimage.sample_steps": 2}
    res = CliRunner().invoke(app, [
        "fit", str(private), "--public", str(public), "--method", "privimage", "--epsilon", "4",
        "--unit", "column:person", "--out", str(tmp_path / "run"), "--dataset", "people",
        *[a for k, v in tiny.items() for a in ("--set", f"{k}={v}")]])
    assert res.exit_code == 0, res.output
    cert = json.loads((tmp_path / "run" / "certificate.json").read_text())
    schema = json.loads(resources.files("privsynth").joinpath("certificate_schema.json").read_text())
    jsonschema.validate(cert, schema, cls=jsonschema.Draft202012Validator)
    assert certificate.check(cert) == []
    assert "'person'" in cert["privacy_unit"] and cert["unit"]["kind"] == "column"
    assert "clipped to C = 1" in cert["unit"]["bound"] and "sqrt(k)" in cert["unit"]["bound"]
    dpsgd = {m["name"]: m for m in cert["mechanisms"]}["privimage.dpsgd"]
    assert dpsgd["sample_rate"] == 2 / 4
    assert "1 / (N ln N) with N = 4 privacy units" in cert["delta_rule"]
    assert any("at most 2 of a kept unit's images" in n for n in cert["notes"])
    assert "Per-unit bound:** histogram" in (tmp_path / "run" / "CERTIFICATE.md").read_text()
    assert "dp-mepf releases: a unit's rows are weighted 1/m" in cert["unit"]["bound"]  # drafts
    assert {"dpmepf.phi1", "dpmepf.counts"} <= {m["name"] for m in cert["mechanisms"]}
