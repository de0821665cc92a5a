"""DP-MEPF: each release moves by at most its declared sensitivity between neighbouring datasets
(add/remove one image), the charges are calibrated to the target, and a sampler round-trips."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_folder
from privsynth.data import load, scan
from privsynth.features import load_encoder
from privsynth import generators
from privsynth.generators import dpmepf
from privsynth.privacy import Budget


class _NoNoise:
    """Stands in for NoiseSource so the pre-noise sums can be compared exactly."""

    description = {}

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        return np.zeros(shape)


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("efficientnet-lite0", input_size=32)


def _sums(folder: Path, encoder, monkeypatch: pytest.MonkeyPatch, classes=("circle", "square")):
    monkeypatch.setattr(dpmepf, "NoiseSource", _NoNoise)
    listing = scan(folder)
    assert listing.classes == classes
    cfg = dpmepf.Config(steps=1)
    gen = dpmepf.Generator(cfg, encoder, resolution=28, channels=1)
    budget = Budget(epsilon=4.0, delta=1e-5, accountant="rdp")
    charges = gen.plan(budget)
    rel = gen.release(listing, budget, charges)
    counts = rel.counts.double()
    return {"phi1": rel.phi1.double() * counts[:, None], "phi2": rel.phi2.double() * counts[:, None],
            "counts": counts}, {c.name: c.sensitivity for c in charges}


ADVERSARIAL = {"black": np.zeros((28, 28)), "white": np.full((28, 28), 255),
               "noise": np.random.default_rng(0).integers(0, 256, (28, 28)),
               "checker": (np.indices((28, 28)).sum(0) % 2) * 255}


def _neighbours(tmp_path: Path, kind: str, *, per_class: int, into: str) -> tuple[Path, Path]:
    """Two folders that differ by one image in class `into`: an ADVERSARIAL one or a duplicate."""
    base = make_folder(tmp_path / "d", per_class=per_class)
    plus = make_folder(tmp_path / "d_plus", per_class=per_class)
    target = plus / into / "extra.png"
    if kind == "duplicate":
        target.write_bytes((plus / into / "000.png").read_bytes())
    else:
        Image.fromarray(ADVERSARIAL[kind].astype(np.uint8), "L").save(target)
    return base, plus


@pytest.mark.parametrize("kind", sorted(ADVERSARIAL) + ["duplicate"])
def test_each_release_moves_at_most_its_sensitivity(kind, tmp_path, encoder, monkeypatch) -> None:
    base, plus = _neighbours(tmp_path, kind, per_class=4, into="square")
    a, sens = _sums(base, encoder, monkeypatch)
    b, _ = _sums(plus, encoder, monkeypatch)
    assert sens == {"dpmepf.phi1": 1.0, "dpmepf.phi2": 0.1, "dpmepf.counts": 1.0}
    for name in ("phi1", "phi2", "counts"):
        moved = float((b[name] - a[name]).norm())
        assert moved <= sens[f"dpmepf.{name}"] * (1 + 1e-6), (name, moved)
    assert float((b["counts"] - a["counts"]).norm()) == pytest.approx(1.0)


@pytest.mark.parametrize("pixels", [0.0, 0.5, 0.9])
def test_encoder_rows_have_norm_at_most_one(pixels: float) -> None:
    enc = load_encoder("efficientnet-lite0", input_size=32, pixels=pixels)
    x = torch.cat([torch.zeros(1, 1, 28, 28), torch.ones(1, 1, 28, 28), torch.rand(6, 1, 28, 28)])
    rows = enc(x)
    assert rows.shape[1] == enc.dim
    assert bool((rows.norm(dim=1) <= 1 + 1e-5).all())
    rgb = enc(torch.rand(2, 3, 28, 28))
    assert bool((rgb.norm(dim=1) <= 1 + 1e-5).all())


def test_lite0_encoder_is_the_packages_network() -> None:
    """Folded BatchNorm, padding inside the convolutions and channels-last layout are speed-ups
    only: the rows and their input gradients equal the package's own NCHW network with its
    BatchNorm layers and padding modules."""
    import copy

    from privsynth.features import EfficientNetLite0, lite0_imagenet

    enc = EfficientNetLite0(input_size=32, grid=2)
    ref = copy.deepcopy(enc)  # same forward, the package's unfolded network, plain NCHW layout
    ref.net, ref.memory_format = lite0_imagenet(), torch.contiguous_format
    assert enc.net._conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    pads = [type(m.static_padding).__name__ for m in enc.net.modules() if hasattr(m, "static_padding")]
    assert pads.count("Identity") > pads.count("ZeroPad2d") > 0  # stride-1 inlined, stride-2 kept
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(6, enc.dim, generator=torch.Generator().manual_seed(1))
    rows, want = enc(x), ref(x)
    assert torch.allclose(rows, want, atol=1e-5, rtol=1e-4)
    g, = torch.autograd.grad((rows * w).sum(), x)
    g_ref, = torch.autograd.grad((want * w).sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-5, rtol=1e-3), float((g - g_ref).abs().max())


def test_plan_hits_the_target_and_shares_noise() -> None:
    budget = Budget(epsilon=2.0, delta=1e-6)
    charges = budget.calibrate(dpmepf.Config().plan)
    assert 2.0 * (1 - 2e-3) <= budget.spent(charges) <= 2.0
    sigma = {c.name: c.noise_multiplier for c in charges}
    # shares of 1/sigma^2 are 0.75 / 0.15 / 0.10
    inv = {k: 1 / v ** 2 for k, v in sigma.items()}
    total = sum(inv.values())
    assert inv["dpmepf.phi1"] / total == pytest.approx(0.75)
    assert inv["dpmepf.counts"] / total == pytest.approx(0.10)


def test_release_before_charge_is_refused(tmp_path, encoder) -> None:
    listing = scan(make_folder(tmp_path / "d", per_class=2))
    gen = dpmepf.Generator(dpmepf.Config(steps=1), encoder, resolution=28, channels=1)
    other = Budget(epsilon=1.0, delta=1e-5)
    charges = dpmepf.Config().plan(3.0)
    with pytest.raises(Exception, match="not charged"):
        gen.release(listing, other, charges)


def test_sampler_round_trip_and_class_quota(tmp_path, encoder) -> None:
    listing = scan(make_folder(tmp_path / "d", per_class=3))
    cfg = dpmepf.Config(steps=2, batch_per_class=2, width=16)
    gen = dpmepf.Generator(cfg, encoder, resolution=16, channels=1)
    sampler = gen.fit(listing, Budget(epsilon=5.0, delta=1e-5))
    sampler.save(tmp_path / "model")
    again = dpmepf.Sampler.load(tmp_path / "model")
    x1, y1 = sampler.sample(10, seed=3, balanced=True)
    x2, y2 = again.sample(10, seed=3, balanced=True)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.uint8 and x1.shape == (10, 1, 16, 16)
    assert torch.bincount(y1, minlength=2).tolist() == [5, 5]
    assert not list((tmp_path / "model").glob("*.pt")) and not list((tmp_path / "model").glob("*.pkl"))
    assert math.isclose(sum(again.class_weights), 1.0, rel_tol=1e-6)


class _Killed(Exception):
    pass


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_interrupted_training_resumes_to_the_same_weights(tmp_path, encoder, ema) -> None:
    from privsynth.checkpoint import WorkState

    cfg = dpmepf.Config(steps=12, batch_per_class=2, width=8, latent_dim=8, ema=ema)
    gen = dpmepf.Generator(cfg, encoder, resolution=28, channels=1)
    gen_rng = torch.Generator().manual_seed(0)
    rel = dpmepf.Releases(torch.rand(2, encoder.dim, generator=gen_rng) * 0.05,
                          torch.rand(2, encoder.dim, generator=gen_rng) * 0.01, torch.tensor([5., 7.]))
    whole = gen.train(rel, ("a", "b"), seed=3)

    state = WorkState(tmp_path, every=0.0)

    def kill_at_11(what: str, done: int, total: int) -> None:  # progress runs at 1, 11, 12
        if done == 11:
            raise _Killed

    with pytest.raises(_Killed):
        gen.train(rel, ("a", "b"), seed=3, state=state, progress=kill_at_11)
    saved = state.load("generator")
    assert saved is not None and 0 < saved["step"] < 12
    torch.manual_seed(12345)  # a resumed process starts from an unrelated random state
    resumed = gen.train(rel, ("a", "b"), seed=3, state=state)
    for key, value in whole.net.state_dict().items():
        assert torch.equal(value, resumed.net.state_dict()[key]), key


def test_a_resumed_fit_reuses_the_written_ahead_charges(tmp_path, encoder) -> None:
    folder = make_folder(tmp_path / "d", per_class=3)
    cfg = dpmepf.Config(steps=2, batch_per_class=1, width=8, latent_dim=8)
    gen = dpmepf.Generator(cfg, encoder, resolution=28, channels=1)
    first = Budget(epsilon=2.0, delta=1e-5)
    charges = gen.plan(first)
    # the process dies after the write-ahead record, before the releases were saved
    again = Budget(epsilon=2.0, delta=1e-5, charges=charges)
    assert gen.plan(again) == charges and len(again.charges) == len(charges)
    gen.fit(scan(folder), again)
    assert again.unclaimed() == [] and again.spent() == pytest.approx(first.spent())
    mismatched = Budget(epsilon=2.0, delta=1e-5, charges=charges[:1])
    with pytest.raises(Exception, match="do not match"):
        gen.plan(mismatched)


RESNET20 = Path(__file__).resolve().parents[2] / "shared" / "data" / "resnet_cifar10" / "resnet20-12fca82f.th"
FOOLBOX = RESNET20.parents[1] / "foolbox_samples.zip"


@pytest.mark.slow  # a real checkpoint and real images, from ../shared/data when present
@pytest.mark.skipif(not RESNET20.is_file(), reason="needs ../shared/data/resnet_cifar10")
def test_cifar_resnet_encoder_loads_the_real_network() -> None:
    """Our ResNet-20 with the checkpoint's own linear head classifies CIFAR-10 test images as the
    published network does (91.8% on clean CIFAR-10), so every weight landed in the right layer;
    feature rows have norm <= 1."""
    import io
    import zipfile

    enc = load_encoder("resnet20-cifar10", weights=str(RESNET20), input_size=32, grid=2)
    state = torch.load(RESNET20, map_location="cpu", weights_only=True)["state_dict"]
    with zipfile.ZipFile(FOOLBOX) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("cifar10_"))
        x = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(zf.read(n))).convert("RGB")))
                         for n in names]).permute(0, 3, 1, 2).float() / 255
    labels = torch.tensor([int(Path(n).stem.split("_")[-1]) for n in names])
    with torch.no_grad():
        pooled = enc.stages(x)[-1].mean(dim=(2, 3))
        logits = pooled @ state["module.linear.weight"].T + state["module.linear.bias"]
        rows = enc(torch.rand(4, 1, 28, 28))
    assert len(names) == 20 and (logits.argmax(1) == labels).sum() >= 17
    assert rows.shape[1] == enc.dim and bool((rows.norm(dim=1) <= 1 + 1e-5).all())


# ---------------------------------------------------------------------------------------------
# split_bits: per-cell releases placed by a first release of class centres


def _captured(folder: Path, encoder, monkeypatch, cfg: dpmepf.Config, centre=None) -> dict:
    """The pre-noise sums of every release for `folder`; with `centre`, the centre release
    returns those sums instead (the second stage conditioned on one released centre)."""
    from privsynth.privacy.mechanisms import GaussianSum

    seen = {}

    class Capture(GaussianSum):
        def release(self):
            seen[self.charge.name] = self._sum.clone()
            out = super().release()
            return centre.clone() if centre is not None and self.charge.name == "dpmepf.centre" else out

    monkeypatch.setattr(dpmepf, "GaussianSum", Capture)
    monkeypatch.setattr(dpmepf, "NoiseSource", _NoNoise)
    gen = dpmepf.Generator(cfg, encoder, resolution=28, channels=1)
    budget = Budget(epsilon=4.0, delta=1e-5, accountant="rdp")
    rel = gen.release(scan(folder), budget, gen.plan(budget))
    seen["cells"] = rel.cells
    return seen


@pytest.mark.parametrize("kind", ["white", "noise", "duplicate"])
def test_split_releases_move_at_most_their_sensitivity(kind, tmp_path, encoder, monkeypatch) -> None:
    cfg = dpmepf.Config(steps=1, split_bits=2)
    base, plus = _neighbours(tmp_path, kind, per_class=6, into="circle")
    a = _captured(base, encoder, monkeypatch, cfg)
    assert a["cells"] == 4 and a["dpmepf.phi1"].shape[0] == 8
    assert float((a["dpmepf.counts"].view(2, 4).sum(1) - 6).abs().max()) == 0  # every image counted
    b_free = _captured(plus, encoder, monkeypatch, cfg)
    sens = {c.name: c.sensitivity for c in cfg.plan(1.0)}
    assert set(sens) == {"dpmepf.centre", "dpmepf.phi1", "dpmepf.phi2", "dpmepf.counts"}
    assert float((b_free["dpmepf.centre"] - a["dpmepf.centre"]).norm()) <= 1 + 1e-6
    # given the same released centre, the cell releases move by one row only
    b = _captured(plus, encoder, monkeypatch, cfg, centre=a["dpmepf.centre"])
    for name in ("dpmepf.phi1", "dpmepf.phi2", "dpmepf.counts"):
        moved = float((b[name] - a[name]).norm())
        assert moved <= sens[name] * (1 + 1e-6), (name, moved)
    assert float((b["dpmepf.counts"] - a["dpmepf.counts"]).norm()) == pytest.approx(1.0)


def test_split_releases_encode_each_private_image_once(tmp_path, encoder, monkeypatch) -> None:
    seen = []
    forward = type(encoder).forward

    def counting(self, x):
        seen.append(len(x))
        return forward(self, x)

    monkeypatch.setattr(type(encoder), "forward", counting)
    cfg = dpmepf.Config(steps=1, split_bits=2, judge=True)
    gen = dpmepf.Generator(cfg, encoder, resolution=28, channels=1)
    budget = Budget(epsilon=4.0, delta=1e-5, accountant="rdp")
    listing = scan(make_folder(tmp_path / "d", per_class=5))
    rel, rows = gen.release_and_rows(listing, budget, gen.plan(budget, 10))
    assert sum(seen) == 10 and rel.cells == 4  # stage 2 reads the rows stage 1 encoded
    assert rows.shape == (10, encoder.dim)  # and the judge gets them too
    monkeypatch.undo()
    with torch.no_grad():
        direct = encoder(load(listing, resolution=28, channels=1).images.float() / 255.0)
    torch.testing.assert_close(rows, direct)


def test_a_rows_cell_depends_on_that_row_alone(encoder) -> None:
    gen = dpmepf.Generator(dpmepf.Config(split_bits=3), encoder, resolution=28, channels=1)
    feats = torch.rand(20, 7, dtype=torch.float64)
    labels = torch.tensor([0, 1] * 10)
    centre = torch.rand(2, 7, dtype=torch.float64)
    together = gen.cell_of(feats, labels, centre, 3)
    alone = torch.cat([gen.cell_of(feats[i:i + 1], labels[i:i + 1], centre, 3) for i in range(20)])
    assert torch.equal(together, alone) and int(together.max()) < 8
    assert len(set(together.tolist())) > 2  # the projections really cut the cloud
    # fewer bits: the same first projections, so each coarse cell is a union of fine ones
    assert torch.equal(gen.cell_of(feats, labels, centre, 2), together % 4)


def test_split_noise_uses_fewer_bits_when_cells_would_be_noisy() -> None:
    cfg = dpmepf.Config(split_bits=4, split_noise=0.1)
    counts = torch.tensor([5000.0, 6000.0])
    assert cfg.bits_for(counts, noise_norm=30.0) == 4  # 30 * 16 / 5000 = 0.096
    assert cfg.bits_for(counts, noise_norm=300.0) == 0  # 300 * 2 / 5000 = 0.12
    assert cfg.bits_for(counts, noise_norm=100.0) == 2  # 0.08 at 4 cells, 0.16 at 8
    assert cfg.bits_for(torch.tensor([-5.0, 10.0]), noise_norm=1.0) == 0  # clamped at one image
    assert dpmepf.Config(split_bits=4).bits_for(counts, noise_norm=1e6) == 4  # no rule: all bits


def test_split_plan_charges_the_centre_and_still_hits_the_target() -> None:
    cfg = dpmepf.Config(split_bits=2, share_centre=0.05)
    budget = Budget(epsilon=2.0, delta=1e-6)
    charges = budget.calibrate(cfg.plan)
    assert [c.name for c in charges] == ["dpmepf.centre", "dpmepf.phi1", "dpmepf.phi2",
                                         "dpmepf.counts"]
    assert 2.0 * (1 - 2e-3) <= budget.spent(charges) <= 2.0
    inv = {c.name: 1 / c.noise_multiplier ** 2 for c in charges}
    assert inv["dpmepf.centre"] / sum(inv.values()) == pytest.approx(0.05 / 1.05)
    with pytest.raises(Exception, match="split_bits"):
        dpmepf.Config(split_bits=7)


def test_a_split_sampler_labels_images_by_class(tmp_path, encoder) -> None:
    listing = scan(make_folder(tmp_path / "d", per_class=4))
    cfg = dpmepf.Config(steps=2, batch_per_class=1, width=8, latent_dim=8, split_bits=1)
    gen = dpmepf.Generator(cfg, encoder, resolution=16, channels=1)
    sampler = gen.fit(listing, Budget(epsilon=5.0, delta=1e-5))
    assert sampler.cells == 2 and len(sampler.weights) == 4
    assert sampler.net.cfg.num_classes == 4  # one generator label per cell
    sampler.save(tmp_path / "model")
    again = dpmepf.Sampler.load(tmp_path / "model")
    x1, y1 = sampler.sample(40, seed=3, balanced=True)
    x2, y2 = again.sample(40, seed=3, balanced=True)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.bincount(y1, minlength=2).tolist() == [20, 20]
    assert math.isclose(sum(again.class_weights), 1.0, rel_tol=1e-6)
    assert len(again.class_weights) == 2


def test_the_variance_term_is_the_expected_excess_of_the_batch_mean_loss() -> None:
    # |m - t|^2 over batches of B rows averages |mu - t|^2 + tr(Cov) / B; the term estimates the
    # excess without bias, so the corrected loss averages |mu - t|^2 (what `unbiased` trains on).
    gen = torch.Generator().manual_seed(0)
    slots, per_slot, dim, trials = 3, 2, 5, 20000
    mu = torch.tensor([[0.0] * dim, [1.0] * dim, [-2.0] * dim], dtype=torch.float64)
    scale = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    target = torch.zeros(slots, dim, dtype=torch.float64)
    labels = torch.arange(slots).repeat_interleave(per_slot)
    plain, corrected = 0.0, 0.0
    for _ in range(trials):
        x = mu[labels] + scale[labels, None] * torch.randn(len(labels), dim, generator=gen,
                                                           dtype=torch.float64)
        m = dpmepf._class_means(x, labels, slots)
        loss = float((m - target).pow(2).sum())
        plain += loss / trials
        corrected += (loss - float(dpmepf._variance_term(x, m, labels, per_slot))) / trials
    exact = float((mu - target).pow(2).sum())
    excess = float((scale ** 2).sum() * dim / per_slot)  # 13.125
    assert plain == pytest.approx(exact + excess, rel=0.02)
    assert corrected == pytest.approx(exact, abs=0.02 * excess)


def test_unbiased_training_corrects_both_losses_at_every_step(tmp_path, encoder,
                                                             monkeypatch) -> None:
    with pytest.raises(Exception, match="unbiased"):
        dpmepf.Config(unbiased=True, split_bits=3, batch_per_class=8)
    calls = []
    real = dpmepf._variance_term

    def spy(x, means, labels, per_slot):
        calls.append((x.shape[1], per_slot, float(real(x, means, labels, per_slot))))
        return real(x, means, labels, per_slot)

    monkeypatch.setattr(dpmepf, "_variance_term", spy)
    listing = scan(make_folder(tmp_path / "d", per_class=4))
    for unbiased in (False, True):
        cfg = dpmepf.Config(steps=3, batch_per_class=4, width=8, latent_dim=8, split_bits=1,
                            unbiased=unbiased)
        sampler = dpmepf.Generator(cfg, encoder, resolution=16, channels=1).fit(
            listing, Budget(epsilon=5.0, delta=1e-5))
        assert sampler.sample(8, seed=0)[0].shape == (8, 1, 16, 16)
        assert len(calls) == (6 if unbiased else 0)  # phi1 and phi2, 3 steps
    assert {c[1] for c in calls} == {2}  # 2 cells per class, 4 images per class
    assert all(v > 0 for *_, v in calls)


def test_folding_batchnorm_keeps_the_pretrained_network_s_function() -> None:
    from privsynth.features import EfficientNetLite0, lite0_imagenet

    folded = EfficientNetLite0(input_size=32).net
    plain = lite0_imagenet()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = folded(x), plain(x)
    assert torch.allclose(a, b, atol=1e-3 * float(b.abs().max()))
    assert torch.equal(a.argmax(1), b.argmax(1))


def _matches_reference(layer: torch.nn.Conv2d, x: torch.Tensor, reference, *,
                       weight_atol: float = 1e-5) -> torch.Tensor:
    """Outputs and gradients (input, weight, bias) of `layer` against `reference(x, w, b)`."""
    x = x.requires_grad_()
    y = layer(x)
    xr = x.detach().clone().requires_grad_()
    w, b = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()
    yr = reference(xr, w, b)
    assert y.shape == yr.shape
    torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, w.grad, atol=weight_atol, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, b.grad, atol=1e-5, rtol=1e-5)
    return y


@pytest.mark.parametrize("out", [1, 3])
def test_the_tap_convolution_is_the_3x3_convolution_it_replaces(out: int) -> None:
    from privsynth.generators.convgen import TapConv2d

    torch.manual_seed(0)
    y = _matches_reference(TapConv2d(8, out), torch.randn(4, 8, 7, 9),
                           lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1))
    assert y.shape == (4, out, 7, 9)


def test_the_upsampling_convolution_is_upsample_then_3x3_convolution() -> None:
    from privsynth.generators.convgen import UpConv2d

    def reference(x, w, b):
        up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return torch.nn.functional.conv2d(up, w, b, padding=1)

    torch.manual_seed(0)
    # (its weight gradient sums 4 taps per kernel entry, in another order: rounding ~1e-5)
    y = _matches_reference(UpConv2d(6, 5), torch.randn(3, 6, 5, 7), reference, weight_atol=1e-4)
    assert y.shape == (3, 5, 10, 14)


def test_generator_weights_keep_their_names() -> None:
    from privsynth.generators.convgen import ConvGenConfig, ConvGenerator

    # the names written by every earlier version (runs saved before UpConv2d must still load)
    names = ["embed.weight", "fc.weight", "fc.bias", "body.0.weight", "body.0.bias",
             "body.3.weight", "body.3.bias", "body.4.weight", "body.4.bias", "body.7.weight",
             "body.7.bias", "body.8.weight", "body.8.bias", "body.10.weight", "body.10.bias"]
    assert list(ConvGenerator(ConvGenConfig(20, 1, 28)).state_dict()) == names


def test_residual_blocks_deepen_the_generator_below_full_resolution(tmp_path) -> None:
    from privsynth.generators.convgen import ConvGenConfig, ConvGenerator, Residual

    plain = ConvGenerator(ConvGenConfig(3, 3, 32, 8, 8))
    deep = ConvGenerator(ConvGenConfig(3, 3, 32, 8, 8, blocks=2))
    # 32 px: 8 -> 16 -> 32; two blocks at the 8 px seed and after the 16 px stage, none at 32
    found = [(i, m.conv.in_channels) for i, m in enumerate(deep.body) if isinstance(m, Residual)]
    assert [c for _, c in found] == [16, 16, 8, 8]
    x = deep.body[:found[-1][0] + 1](deep.fc(torch.randn(2, 16)).view(-1, deep.top, 8, 8))
    assert x.shape[-1] == 16  # the last block runs at 16 px, below the output's 32
    z, y = torch.randn(5, 8), torch.tensor([0, 1, 2, 0, 1])
    out = deep(z, y)
    assert out.shape == (5, 3, 32, 32) and plain(z, y).shape == out.shape
    extra = sum(p.numel() for p in deep.parameters()) - sum(p.numel() for p in plain.parameters())
    assert extra == 2 * (16 * 16 * 9 + 16 + 2 * 16) + 2 * (8 * 8 * 9 + 8 + 2 * 8)
    # the depth is part of the saved config: a sampler rebuilt from it has the same function
    sampler = dpmepf.Sampler(deep.eval(), ("a", "b", "c"), [1.0, 1.0, 1.0])
    sampler.save(tmp_path / "m")
    again = dpmepf.Sampler.load(tmp_path / "m")
    assert again.net.cfg.blocks == 2
    torch.testing.assert_close(again.net(z, y), deep(z, y))
    with pytest.raises(dpmepf.UsageError):
        dpmepf.Config(blocks=-1)


def test_the_weight_average_follows_the_generator_at_its_decay(encoder, monkeypatch) -> None:
    from privsynth.generators.convgen import ConvGenConfig, ConvGenerator

    torch.manual_seed(0)
    net = ConvGenerator(ConvGenConfig(2, 1, 28, 8, 8))
    average = ConvGenerator(ConvGenConfig(2, 1, 28, 8, 8))
    before = [p.detach().clone() for p in average.parameters()]
    generators.ema_update(average, net, 0.75)
    for a, b, p in zip(average.parameters(), before, net.parameters()):
        torch.testing.assert_close(a, 0.75 * b + 0.25 * p)
    with pytest.raises(dpmepf.UsageError):
        dpmepf.Config(ema=1.0)
    # trained with an average, the sampler holds the average (updated after every step at the
    # warmed-up decay), not the last weights
    rel = dpmepf.Releases(torch.rand(2, encoder.dim) * 0.05, None, torch.tensor([5., 7.]))
    cfg = dpmepf.Config(steps=5, batch_per_class=2, width=8, latent_dim=8)
    plain = dpmepf.Generator(cfg, encoder, resolution=28, channels=1).train(rel, ("a", "b"), seed=1)
    calls = []
    real = generators.ema_update

    def spy(average, net, decay):
        calls.append((average, decay))
        real(average, net, decay)

    monkeypatch.setattr(generators, "ema_update", spy)
    averaged = dpmepf.Generator(dataclasses.replace(cfg, ema=0.99), encoder, resolution=28,
                                channels=1).train(rel, ("a", "b"), seed=1)
    assert [d for _, d in calls] == [min(0.99, (1 + t) / (10 + t)) for t in range(5)]
    assert all(a is averaged.net for a, _ in calls)
    differs = [not torch.equal(v, averaged.net.state_dict()[k]) for k, v in plain.net.state_dict().items()]
    assert any(differs)


def test_the_judges_closed_form_gradients_are_a_per_example_loop() -> None:
    from privsynth.generators import judge

    torch.manual_seed(0)
    net = judge.Judge(7, 3)
    torch.nn.init.normal_(net.linear.weight)
    feats = torch.nn.functional.normalize(torch.randn(5, 7), dim=1)
    labels = torch.tensor([0, 2, 1, 1, 0])
    rows = judge.per_example(net, feats, labels)
    params = [net.linear.weight, net.linear.bias]
    for i in range(len(feats)):
        loss = torch.nn.functional.cross_entropy(net(feats[i:i + 1]), labels[i:i + 1])
        for row, g in zip(rows, torch.autograd.grad(loss, params)):
            torch.testing.assert_close(row[i], g)


def test_the_judges_clipped_gradient_is_the_clipped_per_example_sum() -> None:
    from privsynth.generators import judge
    from privsynth.privacy.dpsgd import clipped_sum

    torch.manual_seed(0)
    net = judge.Judge(6, 4)
    torch.nn.init.normal_(net.linear.weight, std=3.0)
    feats = torch.randn(9, 6) * torch.tensor([0.1, 1, 5, 0.3, 2, 0.05, 1, 4, 0.2])[:, None]
    labels = torch.randint(0, 4, (9,))
    rows = judge.per_example(net, feats, labels)
    norms = torch.stack([r.flatten(1).pow(2).sum(1) for r in rows]).sum(0).sqrt()
    assert (norms > 0.5).any() and (norms < 0.5).any()  # some rows are clipped, some are not
    for owners in (None, torch.arange(9), torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])):
        fast = judge.clipped_gradient(net, feats, labels, 0.5, owners=owners)
        for a, b in zip(fast, clipped_sum(rows, 0.5, owners=owners)):
            torch.testing.assert_close(a, b)
    empty = judge.clipped_gradient(net, feats[:0], labels[:0], 0.5)
    assert [tuple(e.shape) for e in empty] == [(4, 6), (4,)] and not any(e.any() for e in empty)


def test_a_judged_fit_charges_the_judges_and_publishes_them(tmp_path, encoder) -> None:
    listing = scan(make_folder(tmp_path / "d", per_class=3))
    cfg = dpmepf.Config(steps=2, batch_per_class=2, width=16, judge=True, judge_batch=2,
                        judge_epochs=2.0, judge_rounds=3, scatter_judge=True, scatter_batch=3,
                        scatter_epochs=1.0)
    gen = dpmepf.Generator(cfg, encoder, resolution=16, channels=1)
    budget = Budget(epsilon=5.0, delta=1e-5)
    sampler = gen.fit(listing, budget)
    by_name = {c.name: c for c in budget.charges}
    j, sj = by_name["dpmepf.judge"], by_name["dpmepf.scatter_judge"]
    assert (j.sample_rate, j.steps, j.sensitivity) == (pytest.approx(2 / 6), 6, 1.0)
    assert (sj.sample_rate, sj.steps, sj.sensitivity) == (pytest.approx(3 / 6), 2, 1.0)
    scale = by_name["dpmepf.phi1"].noise_multiplier * math.sqrt(0.75 / 1.0)
    assert j.noise_multiplier == pytest.approx(1.6 * scale)
    assert sj.noise_multiplier == pytest.approx(3.7 * scale)
    assert budget.unclaimed() == [] and 5.0 * (1 - 2e-3) <= budget.spent() <= 5.0
    assert "judge" in dpmepf.privacy_statement(cfg)["post_processing"]
    assert any("scatter_judge" in n for n in dpmepf.privacy_statement(cfg)["notes"])
    sampler.save(tmp_path / "model")
    assert (tmp_path / "model" / "judge.safetensors").is_file()
    assert (tmp_path / "model" / "scatter_judge.safetensors").is_file()
    assert dpmepf.Sampler.needs_encoder(tmp_path / "model")
    again = dpmepf.Sampler.load(tmp_path / "model")  # rebuilds the encoder it recorded
    assert sorted(again.filters.judges) == ["dpmepf.judge", "dpmepf.scatter_judge"]
    assert again.filters.rounds == 3
    for name, net in sampler.filters.judges.items():
        assert torch.equal(net.linear.weight, again.filters.judges[name].linear.weight)
    x1, y1 = sampler.sample(12, seed=4)
    x2, y2 = again.sample(12, seed=4)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert again.filters.rejected == sampler.filters.rejected
    given = dpmepf.Sampler.load(tmp_path / "model", encoder=encoder)  # the caller's, if given
    assert given.filters.views["dpmepf.judge"] is encoder
    # a model saved without the encoder's table, outside a run folder: sampling says what is missing
    meta = json.loads((tmp_path / "model" / "config.json").read_text())
    assert meta["judge"]["features"]["input_size"] == 32
    del meta["judge"]["features"]
    (tmp_path / "model" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(Exception, match="needs the feature encoder"):
        dpmepf.Sampler.load(tmp_path / "model").sample(2)
    # ... while in a run folder written before the table was recorded, the run's recipe names it
    (tmp_path / "recipe.json").write_text(json.dumps({"features": encoder.spec}))
    old = dpmepf.Sampler.load(tmp_path / "model")
    assert old.filters.views["dpmepf.judge"].name == encoder.name
    assert torch.equal(old.sample(12, seed=4)[0], x1)


def test_the_judge_divides_by_the_charged_units_not_the_decoded_ones(tmp_path, encoder,
                                                                     monkeypatch) -> None:
    """With one undecodable file the judge still divides its noisy sums by q x N, N the charged
    (listed) units: how many files decoded is private."""
    from privsynth.generators import judge

    folder = make_folder(tmp_path / "d", per_class=3)
    (folder / "circle" / "broken.png").write_bytes(b"this is not an image\n")
    listing = scan(folder)
    seen = []

    class Recording(judge.DPSGD):
        def __init__(self, *args, expected_batch: float, **kwargs) -> None:
            seen.append(expected_batch)
            super().__init__(*args, expected_batch=expected_batch, **kwargs)

    monkeypatch.setattr(judge, "DPSGD", Recording)
    cfg = dpmepf.Config(steps=1, batch_per_class=2, width=8, judge=True, judge_batch=2,
                        judge_epochs=1.0)
    gen = dpmepf.Generator(cfg, encoder, resolution=16, channels=1)
    gen.fit(listing, Budget(epsilon=5.0, delta=1e-5))
    assert len(listing.files) == 7 and len(gen.rejects) == 1
    assert seen == [pytest.approx(2.0)]  # q x N = (2 / 7) x 7, not (2 / 7) x 6 decoded


def test_the_filter_redraws_what_the_judge_rejects() -> None:
    from privsynth.generators import judge

    gen = torch.Generator().manual_seed(0)

    def draw(labels: torch.Tensor) -> torch.Tensor:  # a uniformly random grey level per image
        level = torch.randint(0, 256, (len(labels), 1, 1, 1), generator=gen, dtype=torch.uint8)
        return level.expand(-1, 1, 4, 4).clone()

    def bright(images: torch.Tensor) -> torch.Tensor:  # a stand-in judge: class 1 if bright
        return (images.float().mean((1, 2, 3)) > 127.5).long()

    def accept(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return bright(images) == classes

    labels = torch.tensor([0, 1] * 50)
    images, rejected = judge.filtered(draw, accept, labels, labels, rounds=20)
    assert rejected > 0 and torch.equal(bright(images), labels)
    first, none = judge.filtered(draw, accept, labels, labels, rounds=0)
    assert none == 0 and not torch.equal(bright(first), labels)


def test_the_filter_judges_only_the_redrawn_images() -> None:
    """Each round judges only what the round before redrew, and the images are those of a filter
    that judges every image each round (the same draws in the same order)."""
    from privsynth.generators import judge

    def draws(seed: int):
        gen = torch.Generator().manual_seed(seed)
        return lambda labels: torch.randint(0, 256, (len(labels), 1, 2, 2), generator=gen,
                                            dtype=torch.uint8)

    judged, refused = [], []

    def accept(images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        ok = (images.float().mean((1, 2, 3)) > 160).long() == classes  # class 1 is the rarer
        judged.append(len(images))
        refused.append(int((~ok).sum()))
        return ok

    labels = torch.tensor([0, 1] * 200)
    images, rejected = judge.filtered(draws(3), accept, labels, labels, rounds=4)
    assert judged[0] == 400 and judged[1:] == refused[:-1] and rejected == sum(refused)
    new = len(judged)

    def every_image(draw, rounds):  # the filter as it was
        out, count = draw(labels), 0
        for _ in range(rounds):
            bad = (~accept(out, labels)).nonzero()[:, 0]
            if not len(bad):
                break
            count += len(bad)
            out[bad] = draw(labels[bad])
        return out, count

    before, counted = every_image(draws(3), rounds=4)
    assert torch.equal(images, before) and counted == rejected
    assert judged[new:] == [400] * 4 and sum(judged[:new]) < 0.6 * 4 * 400  # 865 of 1600 here
