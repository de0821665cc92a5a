"""PrivImage and DP-SGD: per-sample gradients on the real (tiny) UNet with attention against a
one-example loop, clipping, empty Poisson batches, noise scale, budget composition with the
semantic query, histogram sensitivity, deterministic selection, and a CLI fit -> sample."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from privsynth import certificate
from privsynth.cli import app
from privsynth.errors import BudgetError, UsageError
from privsynth.generators import privimage
from privsynth.generators.privimage import semantic, unet
from privsynth.privacy import Budget, Charge, NoiseSource
from privsynth.privacy.dpsgd import DPSGD, PerSampleGradients, clipped_sum

TINY_UNET = unet.UNetConfig(classes=3, channels=1, resolution=8, widths=(8, 16),
                            attention=(False, True), groups=4)


def _batch(b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 8, 8, generator=g) * 2 - 1
    t = torch.randint(0, unet.TRAIN_TIMESTEPS, (b,), generator=g)
    y = torch.tensor([0, 3, 1, 2, 0, 3][:b])  # 3 = the "no label" class
    return x, t, y, torch.randn(b, 1, 8, 8, generator=g)


def _loss(alpha_bar):
    return lambda net, x, t, y, e: unet.denoising_loss(net, x, t, y, e, alpha_bar)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return unet.build(TINY_UNET)


@pytest.fixture(scope="module")
def reference():
    """Per-example gradients by a plain loop over one-example batches."""
    model, alpha_bar = _model(), unet.schedule()
    x, t, y, e = _batch()
    out = []
    for i in range(len(x)):
        model.zero_grad()
        _loss(alpha_bar)(model, x[i:i + 1], t[i:i + 1], y[i:i + 1], e[i:i + 1]).sum().backward()
        out.append([p.grad.clone() for p in model.parameters()])
    return [torch.stack([r[k] for r in out]) for k in range(len(out[0]))]


@pytest.mark.parametrize("mode", ["functorch", "vmap"])
def test_per_sample_gradients_match_a_loop_on_the_unet_with_attention(mode, reference) -> None:
    model = _model()
    assert any("attentions" in n for n, _ in model.named_parameters())
    grads = PerSampleGradients(model, mode)(_loss(unet.schedule()), *_batch())
    assert len(grads) == len(reference)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_hooks_mode_and_batchnorm_are_refused() -> None:
    with pytest.raises(UsageError, match="hooks"):
        PerSampleGradients(_model(), "hooks")
    with pytest.raises(UsageError, match="DP-SGD"):
        PerSampleGradients(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)))


def test_noise_draws_are_averaged_per_example(reference) -> None:
    """group=2 with each row duplicated gives back the per-example gradient."""
    x, t, y, e = (v.repeat_interleave(2, 0) for v in _batch())
    grads = PerSampleGradients(_model(), "vmap")(_loss(unet.schedule()), x, t, y, e, group=2)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_clipping_bounds_every_example(reference) -> None:
    bound = 0.5 * float(torch.stack([g.flatten(1).norm(dim=1) for g in reference]).norm(dim=0).min())
    for i in range(reference[0].shape[0]):  # each example's contribution alone
        one = clipped_sum([g[i:i + 1] for g in reference], bound)
        assert math.sqrt(sum(float(s.pow(2).sum()) for s in one)) <= bound * (1 + 1e-6)
    inside = clipped_sum(reference, 1e9)  # far inside the bound: plain sum
    for got, g in zip(inside, reference):
        torch.testing.assert_close(got, g.sum(0))


def test_no_noise_and_no_clipping_is_plain_training(reference) -> None:
    """sigma=0, C=inf: the DP-SGD update equals the plain gradient of the summed loss / batch."""
    charge = Charge("privimage.dpsgd", 0.0, 0.5, 1, 1e9, "test")
    budget = Budget(epsilon=1.0, delta=1e-5, accountant="rdp", charges=[charge])
    mech = DPSGD(budget, charge, expected_batch=3.0, noise=NoiseSource())
    got = mech.noisy_gradient(clipped_sum(reference, 1e9))
    model = _model()
    _loss(unet.schedule())(model, *_batch()).sum().div(3.0).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)


def _mech(sigma: float = 2.0, q: float = 0.25, steps: int = 3, clip: float = 1.0):
    charge = Charge("privimage.dpsgd", sigma, q, steps, clip, "test")
    budget = Budget(epsilon=1e6, delta=1e-5, accountant="rdp", charges=[charge])
    return DPSGD(budget, charge, expected_batch=4.0, noise=NoiseSource()), charge


def test_empty_batch_adds_noise_and_counts_a_step() -> None:
    mech, _ = _mech()
    zeros = clipped_sum([torch.zeros(0, 50, 40)], 1.0)
    g = mech.noisy_gradient(zeros)[0]
    assert mech.steps_done == 1
    # noise std = sigma * C / expected batch = 0.5
    assert 0.5 * 0.85 < float(g.std()) < 0.5 * 1.15
    mech.noisy_gradient(zeros), mech.noisy_gradient(zeros)
    with pytest.raises(BudgetError, match="spent"):
        mech.noisy_gradient(zeros)


def test_poisson_batches_use_the_charged_rate_and_count() -> None:
    mech, charge = _mech(q=0.1, steps=400)
    # 10 examples at q=0.1: P(empty) = 0.9^10 = 0.35 per step, so 400 steps without an empty
    # batch has probability ~1e-75 (with 50 examples it was 13%: a flaky test). The mean's std is
    # 0.047, so +-0.25 is > 5 sigma.
    sizes = [len(b) for b in mech.batches(10)]
    assert len(sizes) == charge.steps
    assert abs(np.mean(sizes) - 1.0) < 0.25 and min(sizes) == 0  # empty batches occur, are yielded


def test_per_example_draws_inside_dpsgd_are_hidden_not_seeded(monkeypatch) -> None:
    """Timesteps, noise images, label dropout and a unit's images inside a DP-SGD step come from OS
    entropy (a known seed whose stream the secret batch shifts would not give the per-unit bound)."""
    from privsynth.privacy import dpsgd

    draws = [torch.rand(4, generator=dpsgd.hidden_generator()).tolist() for _ in range(2)]
    assert draws[0] != draws[1]
    monkeypatch.setattr(dpsgd.os, "urandom", lambda n: b"\x07" * n)  # the seed is OS entropy
    assert torch.rand(4, generator=dpsgd.hidden_generator()).tolist() == \
        torch.rand(4, generator=dpsgd.hidden_generator()).tolist()


def test_dpsgd_needs_its_own_recorded_charge() -> None:
    charge = Charge("privimage.dpsgd", 1.0, 0.1, 10, 1.0, "test")
    with pytest.raises(BudgetError):
        DPSGD(Budget(epsilon=10, delta=1e-5, accountant="rdp"), charge, expected_batch=4, noise=NoiseSource())


def test_dpsgd_sigma_is_calibrated_for_what_the_query_leaves() -> None:
    cfg = privimage.Config(query_sigma=5.0, dp_steps=200, dp_batch=50, **PLAIN)
    budget = Budget(epsilon=2.0, delta=1e-5, accountant="rdp")  # fast; PRV in the CLI test
    query, dpsgd = budget.calibrate(lambda s: cfg.plan(s, 1000))
    assert query.noise_multiplier == 5.0 and query.sensitivity == 1.0
    assert dpsgd.sample_rate == 0.05 and dpsgd.steps == 200
    assert 2.0 * (1 - 2e-3) <= budget.spent([query, dpsgd]) <= 2.0
    alone = Budget(epsilon=2.0, delta=1e-5, accountant="rdp").calibrate(lambda s: cfg.plan(s, 1000)[1:])[0]
    assert alone.noise_multiplier < dpsgd.noise_multiplier  # the query's cost is accounted
    with pytest.raises(BudgetError):  # a query that alone exceeds the budget
        Budget(epsilon=0.05, delta=1e-5, accountant="rdp").calibrate(
            lambda s: privimage.Config(query_sigma=1.0, **PLAIN).plan(s, 1000))


def test_histogram_rows_have_the_declared_sensitivity() -> None:
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 7))
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    images[0] = 0  # an all-black image
    images[1] = images[2]  # a duplicate
    for k in (1, 3):
        rows = semantic.topk_rows(model, images, k)
        norms = rows.norm(dim=1)  # one image's whole contribution: add/remove moves the sum by this
        assert torch.allclose(norms, torch.full_like(norms, math.sqrt(k)))
        charge = privimage.Config(query_topk=k, **PLAIN).plan(1.0, 100)[0]
        assert charge.sensitivity == pytest.approx(float(norms.max()))


def test_selection_is_disjoint_and_deterministic() -> None:
    hist = torch.tensor([[9.0, 8.0, 1.0, 0.0, 3.0], [9.5, 2.0, 7.0, 0.0, 6.0]])
    assert semantic.select(hist, 2) == [[1, 4], [0, 2]]
    assert semantic.select(hist.clone(), 2) == semantic.select(hist, 2)
    chosen = semantic.select(torch.randn(4, 12), 3)
    assert sorted(j for js in chosen for j in js) == sorted(set(j for js in chosen for j in js))
    with pytest.raises(ValueError):
        semantic.select(hist, 3)
    rand = semantic.random_selection(4, 12, 3, seed=1)
    assert rand == semantic.random_selection(4, 12, 3, seed=1)
    assert len({j for js in rand for j in js}) == 12


# RDP keeps the calibration fast at these tiny sizes (PRV is the default and tested elsewhere).
# PrivImage as published (no dp-mepf drafts): the drafts have their own tests below.
PLAIN = dict(draft="none", strength=1.0)
TINY = ["--set", "privimage.draft=none", "--set", "privimage.strength=1.0",
        "--set", "privacy.accountant=rdp", "--set", "privimage.width=8", "--set", "data.resolution=8", "--set",
        "privimage.pretrain_steps=2", "--set", "privimage.dp_steps=3", "--set",
        "privimage.dp_batch=8", "--set", "privimage.physical_batch=4", "--set",
        "privimage.query_epochs=1", "--set", "privimage.sample_steps=2", "--set",
        "privimage.pretrain_batch=8", "--set", "privimage.noise_draws=2"]


def test_cli_fit_sample_verify(tmp_path: Path) -> None:
    from conftest import make_folder

    private = make_folder(tmp_path / "private", per_class=10, size=8)
    public = make_folder(tmp_path / "public", per_class=4, classes=tuple("abcde"), size=12, seed=3)
    runner = CliRunner()
    res = runner.invoke(app, ["fit", str(private), "--public", str(public), "--method", "privimage",
                              "--epsilon", "4", "--out", str(tmp_path / "run"), "--json", *TINY])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    cert = json.loads((run / "certificate.json").read_text())
    assert [m["name"] for m in cert["mechanisms"]] == ["privimage.query", "privimage.dpsgd"]
    assert cert["mechanisms"][1]["sample_rate"] == pytest.approx(8 / 20)
    assert 4 * (1 - 2e-3) <= cert["epsilon"]["spent"] <= 4.0
    assert certificate.check(cert) == []
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "unet.safetensors"]
    selection = json.loads((run / "model" / "config.json").read_text())["selection"]
    assert sorted(j for js in selection.values() for j in js) == sorted(
        set(j for js in selection.values() for j in js))
    res = runner.invoke(app, ["sample", str(run), "-n", "6", "--out", str(tmp_path / "syn")])
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "syn").rglob("*.png"))) == 6
    assert runner.invoke(app, ["verify", str(tmp_path / "syn")]).exit_code == 0
    res = runner.invoke(app, ["fit", str(private), "--method", "privimage", "--epsilon", "4",
                              "--out", str(tmp_path / "run2"), *TINY])
    assert res.exit_code == 2 and "--public" in res.output


@pytest.mark.parametrize("name", ["demo-privimage", "mnist-privimage-gpu"])
def test_recipes_resolve(name: str) -> None:
    from privsynth import recipe as recipes

    root = Path(__file__).resolve().parents[1]
    resolved = recipes.resolve(recipes.read(root / "recipes" / f"{name}.toml"))
    assert resolved.method == "privimage" and resolved.data.resolution % 4 == 0
    if name.startswith("demo"):  # 10 private digits x select_per_class <= 10 public demo classes
        public = [p for p in (root / "assets" / "demo" / "public").iterdir() if p.is_dir()]
        assert 10 * resolved.generator.select_per_class <= len(public)


TINY_IMAGENET = Path(__file__).resolve().parents[2] / "shared" / "data" / "tiny_imagenet_200_subset.zip"


def test_imagenet_query_refuses_non_imagenet_public_classes() -> None:
    from privsynth.errors import UsageError

    with pytest.raises(UsageError, match="WordNet ids.*circle"):
        semantic.ImageNetQuery(("n01443537", "circle"))


@pytest.mark.slow  # real public images, from ../shared/data when present
@pytest.mark.skipif(not TINY_IMAGENET.is_file(), reason="needs ../shared/data (Tiny-ImageNet)")
def test_imagenet_query_recognises_real_public_images() -> None:
    """The pretrained head restricted to 20 Tiny-ImageNet classes labels their validation images
    far above chance (5%), so the WordNet-id -> ImageNet-index mapping is the right one."""
    import io
    import zipfile

    from PIL import Image

    with zipfile.ZipFile(TINY_IMAGENET) as zf:
        wnids = zf.read("wnids.txt").decode().split()
        classes = tuple(sorted(wnids)[::10])  # 20 classes
        rows = [line.split("\t")[:2] for line in zf.read("val/val_annotations.txt").decode().splitlines()]
        picked = [(f, w) for f, w in rows if w in classes][:200]
        x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(zf.read(f"val/images/{f}")))
                                                   .convert("RGB"))) for f, _ in picked])
    labels = torch.tensor([classes.index(w) for _, w in picked])
    query = semantic.ImageNetQuery(classes, input_size=96)
    hot = semantic.topk_rows(query, x.permute(0, 3, 1, 2).contiguous(), 1)
    assert hot.shape == (len(picked), len(classes)) and bool((hot.sum(1) == 1).all())
    assert float((hot.argmax(1) == labels).float().mean()) > 0.5  # measured 0.70; off by one: 0.17


@pytest.mark.parametrize("levels, expected", [(0, (False, False, False)),
                                              (1, (False, False, True)),
                                              (2, (False, True, True))])
def test_attention_levels_put_attention_at_the_lowest_levels(levels, expected) -> None:
    gen = privimage.Generator(privimage.Config(attention_levels=levels, **PLAIN), resolution=8,
                               channels=1)
    assert gen.unet.attention == expected
    model = unet.build(gen._unet(2))
    with_attention = [any("attentions" in n for n, _ in block.named_parameters())
                      for block in model.down_blocks]
    assert tuple(with_attention) == expected  # (the mid block always has attention)


def test_attention_levels_outside_0_to_2_are_refused() -> None:
    with pytest.raises(UsageError, match="attention_levels"):
        privimage.Config(attention_levels=3)


# The drafts: a tiny dp-mepf inside privimage (no judges: they have their own tests).
DRAFTED = ["--set", "privacy.accountant=rdp", "--set", "privimage.width=8", "--set",
           "data.resolution=8", "--set", "privimage.pretrain_steps=2", "--set",
           "privimage.pretrain_batch=8", "--set", "privimage.draft_images=12", "--set",
           "privimage.draft_steps=2", "--set", "privimage.dp_steps=2", "--set",
           "privimage.dp_batch=8", "--set", "privimage.physical_batch=8", "--set",
           "privimage.query_epochs=1", "--set", "privimage.sample_steps=2", "--set",
           "privimage.strength=0.2", "--set", "privimage.dpmepf.steps=3", "--set",
           "privimage.dpmepf.split_bits=0", "--set", "privimage.dpmepf.judge=false", "--set",
           "privimage.dpmepf.scatter_judge=false", "--set", "privimage.dpmepf.unbiased=false",
           # the Config class values this was written for, not the defaults (test_defaults)
           "--set", "privimage.dpmepf.batch_per_class=10", "--set", "privimage.dpmepf.lr=0.001",
           "--set", "features.grid=1"]


def test_drafts_are_charged_with_the_other_stages_and_sampling_starts_from_them(
        tmp_path: Path) -> None:
    from conftest import make_folder

    private = make_folder(tmp_path / "private", per_class=10, size=8)
    public = make_folder(tmp_path / "public", per_class=4, classes=tuple("abcde"), size=12, seed=3)
    runner = CliRunner()
    res = runner.invoke(app, ["fit", str(private), "--public", str(public), "--method", "privimage",
                              "--epsilon", "4", "--out", str(tmp_path / "run"), *DRAFTED])
    assert res.exit_code == 0, res.output
    run = tmp_path / "run"
    cert = json.loads((run / "certificate.json").read_text())
    names = [m["name"] for m in cert["mechanisms"]]
    assert names == ["dpmepf.phi1", "dpmepf.phi2", "dpmepf.counts", "privimage.query",
                     "privimage.dpsgd"]
    assert certificate.check(cert) == []  # every stage recomputes to the spent epsilon
    assert 4 * (1 - 2e-3) <= cert["epsilon"]["spent"] <= 4.0
    by = {m["name"]: m for m in cert["mechanisms"]}
    from privsynth.generators import dpmepf

    drafts = dpmepf.Config(split_bits=0, judge=False, scatter_judge=False)
    sigma = by["privimage.dpsgd"]["noise_multiplier"]  # drafts at draft_noise x DP-SGD's scale
    expected = drafts.plan(sigma * privimage.Config().draft_noise)
    assert [by[c.name]["noise_multiplier"] for c in expected] == pytest.approx(
        [c.noise_multiplier for c in expected])
    assert any("Drafts (dp-mepf" in note for note in cert["notes"])
    assert any("N, which sets" in u and "dp_batch / N" in u for u in cert["unprotected"])
    assert sorted(p.name for p in (run / "model").iterdir()) == ["config.json", "draft",
                                                                  "unet.safetensors"]
    res = runner.invoke(app, ["sample", str(run), "-n", "6", "--out", str(tmp_path / "syn")])
    assert res.exit_code == 0, res.output
    assert runner.invoke(app, ["verify", str(tmp_path / "syn")]).exit_code == 0
    card = (tmp_path / "syn" / "README.md").read_text()
    assert "dp-mepf draft" in card


def test_plan_composes_the_draft_releases_at_draft_noise_times_dpsgd_sigma() -> None:
    cfg = privimage.Config(draft_noise=0.25, dp_steps=10, dp_batch=50)
    charges = cfg.plan(2.0, 1000)
    drafts = cfg.dpmepf.plan(0.5, 1000)  # 0.25 x 2.0
    assert charges[:len(drafts)] == drafts
    assert [c.name for c in charges[len(drafts):]] == ["privimage.query", "privimage.dpsgd"]
    assert charges[-1].noise_multiplier == 2.0
    assert privimage.Config(dp_steps=0).plan(1.0, 100)[-1].name == "privimage.query"


def test_strength_below_one_needs_drafts_and_samples_stay_near_them() -> None:
    with pytest.raises(UsageError, match="strength"):
        privimage.Config(draft="none", strength=0.5)
    with pytest.raises(UsageError, match="dp_steps"):
        privimage.Config(draft="none", strength=1.0, dp_steps=0)
    torch.manual_seed(0)
    model = unet.build(TINY_UNET).eval()
    start = torch.rand(4, 1, 8, 8) * 2 - 1
    labels = torch.tensor([0, 1, 2, 0])
    near = unet.ddim_sample(model, labels, TINY_UNET, steps=2, guidance=1.0,
                            generator=torch.Generator().manual_seed(1), start=start, t_start=5)
    far = unet.ddim_sample(model, labels, TINY_UNET, steps=2, guidance=1.0,
                           generator=torch.Generator().manual_seed(1))
    assert (near - start).abs().mean() < 0.1 < (far - start).abs().mean()


def test_every_charge_of_a_drafted_fit_is_used_once_by_its_mechanism(tmp_path: Path) -> None:
    """Each read of the private images is a charged mechanism: after the fit no recorded charge
    is left unclaimed (Budget.claim refuses a mechanism without one, or a second use of one)."""
    from conftest import make_folder

    from privsynth.data import scan
    from privsynth.features import load_encoder
    from privsynth.generators import dpmepf

    private = scan(make_folder(tmp_path / "private", per_class=6, size=8))
    public = make_folder(tmp_path / "public", per_class=3, classes=tuple("abcd"), size=8, seed=3)
    drafts = dpmepf.Config(steps=2, split_bits=0, judge=True, judge_epochs=1.0, judge_batch=4)
    cfg = privimage.Config(width=8, pretrain_steps=1, pretrain_batch=4, draft_images=4,
                           draft_steps=1, dp_steps=2, dp_batch=4, physical_batch=4,
                           query_epochs=1, sample_steps=1, strength=0.1, dpmepf=drafts)
    budget = Budget(epsilon=4.0, delta=1e-4, accountant="rdp")
    gen = privimage.Generator(cfg, load_encoder("efficientnet-lite0", input_size=32),
                              resolution=8, channels=1)
    sampler = gen.fit(private, budget, public=public)
    assert [c.name for c in budget.charges] == ["dpmepf.phi1", "dpmepf.phi2", "dpmepf.counts",
                                                "dpmepf.judge", "privimage.query",
                                                "privimage.dpsgd"]
    assert budget.unclaimed() == []
    images, labels = sampler.sample(5, seed=1)
    assert images.shape == (5, 1, 8, 8) and images.dtype == torch.uint8
    assert torch.equal(sampler.sample(5, seed=1)[0], images)  # seeded: post-processing only
