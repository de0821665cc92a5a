"""Evaluation: known-answer Fréchet distances, KID, report.json end to end, caching, missing weights.

Image sets here use the Hugging Face imagefolder layout (metadata.jsonl), the one `privsynth sample`
publishes. Most tests swap the EfficientNet for a tiny block-mean feature map; one test runs the
real offline encoder end to end.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F

import cleanfid
import cleanfid.fid
import cleanfid.inception_torchscript  # noqa: F401 - imported before any write is audited
import cleanfid.resize  # noqa: F401
from conftest import make_folder
from privsynth import evaluate as ev
from privsynth import fidelity
from privsynth.features import EFFICIENTNET_LITE0_SHA256
from privsynth.downstream import ClassifierConfig
from privsynth.errors import MissingResourceError, UsageError

# --- helpers -------------------------------------------------------------------------------------


def image_set(root: Path, per_class: int = 12, seed: int = 0, labelled: bool = True) -> Path:
    """Grey 28x28 shapes (conftest.make_folder) with a metadata.jsonl naming every file."""
    make_folder(root, per_class=per_class, seed=seed)
    rows = [{"file_name": p.relative_to(root).as_posix(), **({"label": p.parent.name} if labelled else {})}
            for p in sorted(root.rglob("*.png"))]
    if not labelled:  # flat: move files to the root so no folder names a class
        for row in rows:
            src = root / row["file_name"]
            row["file_name"] = row["file_name"].replace("/", "-")
            src.rename(root / row["file_name"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def stripes(root: Path, per_class: int, seed: int = 0) -> Path:
    """Grey 28x28 noisy stripes, classes 'across' (horizontal) and 'down' (vertical), with a
    metadata.jsonl: a task a small CNN learns in a few epochs."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for name in ("across", "down"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            period, phase = rng.integers(4, 8), rng.integers(0, 8)
            wave = (np.arange(28) + phase) % period < period // 2
            img = np.where(wave[:, None] if name == "across" else wave[None, :], 180, 30)
            img = (img + rng.integers(0, 60, size=(28, 28))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img, "L").save(root / name / f"{i:03d}.png")
            rows.append({"file_name": f"{name}/{i:03d}.png", "label": name})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def tiny_space(*_: object, **__: object) -> ev.FeatureSpace:
    """A cheap stand-in feature network: means of 4x4 blocks of an 8x8 resize (12 features)."""
    return ev.FeatureSpace("tiny", "4x4 block means", 8, "0" * 64,
                           lambda x: F.avg_pool2d(x, 4).flatten(1) / 255.0)


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ev, "load_feature_space", tiny_space)


@pytest.fixture
def sets(tmp_path: Path) -> tuple[Path, Path]:
    return image_set(tmp_path / "synthetic", seed=0), image_set(tmp_path / "real", seed=1)


_WRITES: list[list[str]] = []  # the audit hook records into the innermost active list


def _audit(event: str, args: tuple) -> None:
    if not _WRITES:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        write = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        if args[2] & write:
            _WRITES[-1].append(os.path.abspath(os.fsdecode(args[0])))
    elif event in ("os.mkdir", "os.rename", "os.replace"):
        _WRITES[-1].append(os.path.abspath(os.fsdecode(args[1] if event != "os.mkdir" else args[0])))


sys.addaudithook(_audit)  # permanent, but inert unless a test pushes a list


def listing(folder: Path) -> set[str]:
    """Every path under `folder` (compiled bytecode aside: it holds no data)."""
    return {str(p) for p in folder.rglob("*") if "__pycache__" not in p.parts}


# --- Fréchet distance and KID --------------------------------------------------------------------


def test_frechet_distance_of_identical_sets_is_zero() -> None:
    feats = np.random.default_rng(0).standard_normal((500, 16))
    assert fidelity.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_a_mean_shift_costs_its_squared_norm() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))  # correlated features
    delta = rng.standard_normal(16)
    assert fidelity.fid_from_features(feats, feats + delta) == pytest.approx(delta @ delta, rel=1e-9)


def test_known_answer_with_a_trace_term() -> None:
    # Diagonal covariances commute: trace term = sum (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.0, 0.5])
    expected = 1 + 4 + 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fidelity.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_gaussian_samples_approach_the_analytic_value() -> None:
    # N(0, I) against N(delta, 4 I) in 4-d: |delta|^2 + 4 * (1 - 2)^2.
    rng = np.random.default_rng(2)
    delta = np.array([0.5, -1.0, 0.0, 2.0])
    x, y = rng.standard_normal((40_000, 4)), 2 * rng.standard_normal((40_000, 4)) + delta
    assert fidelity.fid_from_features(x, y) == pytest.approx(delta @ delta + 4, abs=0.1)


def test_matches_clean_fid_on_non_commuting_covariances() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((200, 20)), rng.standard_normal((200, 20)) @ rng.standard_normal((20, 20))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0) + 0.3, np.cov(y, rowvar=False)
    ours = fidelity.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(cleanfid.fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-8)


@pytest.mark.parametrize("n1,n2,dim", [(10, 12, 50), (30, 40, 40), (200, 150, 20)])
def test_row_and_covariance_routes_agree(n1: int, n2: int, dim: int) -> None:
    # Fewer rows than dims goes through the rows (singular covariances); more through covariances.
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((n1, dim)), rng.standard_normal((n2, dim)) @ rng.standard_normal((dim, dim))
    by_covariance = fidelity.frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                                        y.mean(0), np.cov(y, rowvar=False))
    assert fidelity.fid_from_features(x, y) == pytest.approx(by_covariance, rel=1e-7)
    assert np.isfinite(by_covariance) and by_covariance > 0


def test_kid_is_seeded_and_leaves_the_global_rng_alone() -> None:
    rng = np.random.default_rng(5)
    x, y, z = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)), rng.standard_normal((50, 8)) + 1
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = fidelity.kid_from_features(x, y, subsets=20, subset_size=30)
    assert np.array_equal(np.random.get_state()[1], before)
    assert first == fidelity.kid_from_features(x, y, subsets=20, subset_size=30)
    assert first["std"] > 0 and first["subset_size"] == 30
    assert abs(first["mean"]) < fidelity.kid_from_features(x, z, subsets=20, subset_size=30)["mean"]


# --- evaluate() end to end -----------------------------------------------------------------------


def test_evaluate_end_to_end_offline_writes_only_its_report(
        sets: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox = tmp_path / "systemp"
    sandbox.mkdir()
    monkeypatch.setenv("TMPDIR", str(sandbox))
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox))
    package = Path(cleanfid.__file__).parent
    package_before = listing(package)
    out = tmp_path / "report"
    calls: list[tuple[str, int, int]] = []
    _WRITES.append([])
    try:
        report = ev.evaluate(*sets, out, batch_size=10, progress=lambda *a: calls.append(a))
    finally:
        writes = _WRITES.pop()
    assert json.loads((out / "report.json").read_text()) == report
    assert report["schema"] == "privsynth.report/2"
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    space = report["feature_space"]
    assert space["name"] == "efficientnet-lite0" and space["is_inception"] is False
    assert "not comparable with Inception FID" in space["note"]
    assert space["weights_sha256"] == EFFICIENTNET_LITE0_SHA256 and space["input_size"] == 224
    run = report["runs"][0]
    assert run["synthetic"]["images"] == report["real"]["images"] == 24
    assert report["real"]["classes"] == {"circle": 12, "square": 12}
    assert run["fid"] > 0 and set(run["kid"]) >= {"mean", "std"}
    assert set(run["per_class_fid"]) == {"circle", "square"}
    assert 0 <= run["precision"] <= 1 and 0 <= run["recall"] <= 1 and run["k"] == 3
    assert {"runs[0].fid", "runs[0].kid", "runs[0].per_class_fid", "real"} <= set(
        report["not_covered_by_dp"])
    assert "owner only" in report["privacy_note"]
    assert report["versions"]["clean-fid"] == "0.1.35"
    assert report["throughput_images_per_s"] > 0 and report["wall_time_s"] > 0
    assert ("features of real images", 24, 24) in calls
    # Nothing outside `out` (the feature cache is out/cache): no statistics in clean-fid's
    # folder or the temp folder.
    assert str(out / "report.json.partial") in writes  # the audit hook sees writes
    assert len(list((out / "cache").glob("*.safetensors"))) == 2
    outside = [w for w in writes if not w.startswith(str(out)) and "__pycache__" not in w]
    assert outside == []
    assert listing(package) == package_before
    assert list(sandbox.iterdir()) == []


def test_refuses_to_overwrite_a_report(sets: tuple[Path, Path], tmp_path: Path, tiny: None) -> None:
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.json").write_text("{}")
    with pytest.raises(UsageError, match="already exists"):
        ev.evaluate(*sets, out)
    assert ev.evaluate(*sets, out, overwrite=True)["feature_space"]["name"] == "tiny"


def test_cache_reuses_features_keyed_by_content(sets: tuple[Path, Path], tmp_path: Path,
                                                tiny: None) -> None:
    cache = tmp_path / "cache"
    first = ev.evaluate(*sets, tmp_path / "a", cache_dir=cache)
    assert len(list(cache.iterdir())) == 2 and first["throughput_images_per_s"] > 0
    again = ev.evaluate(*sets, tmp_path / "b", cache_dir=cache)
    assert again["runs"][0]["fid"] == first["runs"][0]["fid"]
    assert again["throughput_images_per_s"] is None
    assert "every set read from the cache" in (tmp_path / "b" / "report.html").read_text()
    synthetic = sets[0]
    png = sorted(synthetic.rglob("*.png"))[0]
    make_folder(tmp_path / "other", per_class=1, seed=9)  # a different image, same file name
    png.write_bytes(sorted((tmp_path / "other").rglob("*.png"))[0].read_bytes())
    changed = ev.evaluate(*sets, tmp_path / "c", cache_dir=cache)
    assert len(list(cache.iterdir())) == 3 and changed["runs"][0]["fid"] != first["runs"][0]["fid"]


def test_unlabelled_sets_get_no_per_class_fid(tmp_path: Path, tiny: None) -> None:
    synthetic = image_set(tmp_path / "s", labelled=False)
    real = image_set(tmp_path / "r", seed=1)
    report = ev.evaluate(synthetic, real, tmp_path / "out")
    assert "per_class_fid" not in report["runs"][0]
    assert "runs[0].per_class_fid" not in report["not_covered_by_dp"]
    assert report["runs"][0]["synthetic"]["classes"] == {"all": 24}


def test_unknown_feature_space_is_a_usage_error(sets: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="efficientnet-lite0"):
        ev.evaluate(*sets, tmp_path / "out", feature_space="vgg")


# --- Inception weights ---------------------------------------------------------------------------


def _says_how_to_get_inception(message: str) -> None:
    assert ev.INCEPTION_FILE in message and ev.INCEPTION_URL in message
    assert "--inception-weights" in message


def test_inception_without_its_weights_file(sets: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(MissingResourceError) as info:
        ev.evaluate(*sets, tmp_path / "out", feature_space="inception",
                    inception_weights=tmp_path / "nowhere")
    _says_how_to_get_inception(str(info.value))
    assert not (tmp_path / "out").exists()


def test_inception_weights_must_be_the_torchscript_file(tmp_path: Path) -> None:
    (tmp_path / "other.pt").write_bytes(b"x")
    with pytest.raises(UsageError, match=ev.INCEPTION_FILE):
        ev.load_feature_space("inception", inception_weights=tmp_path / "other.pt")
    (tmp_path / ev.INCEPTION_FILE).write_bytes(b"not torchscript")
    with pytest.raises(MissingResourceError) as info:
        ev.load_feature_space("inception", inception_weights=tmp_path / ev.INCEPTION_FILE)
    _says_how_to_get_inception(str(info.value))


def test_inception_download_failure_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    if Path("/tmp", ev.INCEPTION_FILE).exists():
        pytest.skip("clean-fid's download is already on this machine")

    def offline(*_: object, **__: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(MissingResourceError) as info:
        ev.load_feature_space("inception")
    _says_how_to_get_inception(str(info.value))
    assert not Path("/tmp", ev.INCEPTION_FILE).exists()


# --- precision/recall, memorisation, utility, several runs, the HTML -----------------------------

QUICK = ClassifierConfig(epochs=2, batch_size=16, width=4)  # a 4-channel CNN: seconds on 2 cores


def leaves(obj: object, path: str = "") -> dict[str, object]:
    """Every scalar of a JSON document by dotted path (list items as [i])."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in leaves(val, f"{path}.{key}".strip(".")).items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in leaves(val, f"{path}[{i}]").items()}
    return {path: obj}


def covered_by(path: str, declared: list[str]) -> bool:
    return any(path == d or path.startswith(d + ".") or path.startswith(d + "[") for d in declared)


def test_every_value_that_depends_on_real_images_is_declared_not_covered(
        tmp_path: Path, tiny: None) -> None:
    # Same synthetic set, two different real/test sets: whatever moves was computed from them.
    synthetic = image_set(tmp_path / "s", seed=0)
    (synthetic / "certificate.json").write_text(json.dumps({"epsilon": {"spent": 3.0}, "delta": 1e-5}))
    reports = []
    for seed in (1, 2):
        real, test = image_set(tmp_path / f"r{seed}", seed=seed), image_set(tmp_path / f"t{seed}", seed=seed + 10)
        reports.append(ev.evaluate(synthetic, real, tmp_path / f"out{seed}", test=test, classifier=QUICK))
    a, b = leaves(reports[0]), leaves(reports[1])
    declared = reports[0]["not_covered_by_dp"]
    assert declared == reports[1]["not_covered_by_dp"] == ev.not_covered(reports[0])
    incidental = ("wall_time_s", "throughput_images_per_s", "real.path", "test.path")
    moved = {p for p in a if a[p] != b.get(p) and p not in incidental}
    assert moved and all(covered_by(p, declared) for p in moved), sorted(
        p for p in moved if not covered_by(p, declared))
    # ... and every declared field is in the report, for this one run with every metric.
    run = reports[0]["runs"][0]
    assert set(declared) == {"real", "test"} | {f"runs[0].{k}" for k in ev.RUN_NOT_COVERED}
    assert all(k in run for k in ev.RUN_NOT_COVERED)
    assert run["memorisation"]["label"] == ev.MEMORISATION_LABEL
    assert run["label_agreement"]["classifier"]["held_out_on"].startswith("the --test images")
    assert run["privacy"] == {"epsilon": 3.0, "delta": 1e-5, "accountant": None}
    html_text = (tmp_path / "out1" / "report.html").read_text()
    assert html_text.count(">not DP</span>") >= len(declared) and ev.MEMORISATION_LABEL in html_text


def test_a_copied_private_image_is_found_and_named(tmp_path: Path, tiny: None) -> None:
    synthetic, real = image_set(tmp_path / "s", seed=0), make_folder(tmp_path / "real", seed=1)
    test = make_folder(tmp_path / "test", seed=2)
    leaked = real / "square" / "005.png"
    (synthetic / "square" / "003.png").write_bytes(leaked.read_bytes())
    mem = ev.evaluate(synthetic, real, tmp_path / "out", test=test, classifier=None)["runs"][0]["memorisation"]
    assert mem["exact_copies"] == 1 and mem["suspicious_fraction"] >= 1 / 24
    top = mem["closest"][0]
    assert (top["synthetic_file"], top["private_file"], top["distance"]) == (
        "square/003.png", "square/005.png", 0.0)


def test_utility_never_looks_at_the_test_set_to_choose(tmp_path: Path) -> None:
    from privsynth.data import scan
    from privsynth.downstream import utility

    synthetic = scan(make_folder(tmp_path / "s", per_class=20, seed=0))
    config = ClassifierConfig(epochs=3, batch_size=8, width=4)
    got = [utility(synthetic, scan(make_folder(tmp_path / f"t{i}", seed=i)), None, resolution=28,
                   config=config) for i in (1, 2)]
    assert got[0]["validation_curve"] == got[1]["validation_curve"]
    assert got[0]["selected_epoch"] == got[1]["selected_epoch"]
    assert got[0]["train_images"] == 36 and got[0]["validation_images"] == 4
    assert "synthetic split" in got[0]["selected_on"] and got[0]["channels"] == 1
    assert got[0]["recipe"]["epochs"] == 3 and "SmallCNN" in got[0]["architecture"]
    val = scan(make_folder(tmp_path / "v", per_class=5, seed=7))
    real_val = utility(synthetic, scan(tmp_path / "t1"), val, resolution=28, config=config)
    assert real_val["validation_images"] == 10 and real_val["train_images"] == 40
    assert "--val" in real_val["selected_on"] and 0 <= real_val["accuracy"] <= 1
    other = scan(make_folder(tmp_path / "o", classes=("circle", "star")))
    assert "star" in utility(synthetic, other, None, resolution=28, config=config)["skipped"]


def test_label_agreement_is_high_for_true_labels_and_chance_for_shuffled_ones(
        tmp_path: Path, tiny: None) -> None:
    # Synthetic sets that are copies of the real images: one with their true labels, one where
    # every second image of each class carries the other class's label (a perfect judge: 1/2).
    import shutil

    real = stripes(tmp_path / "real", per_class=50)
    true, shuffled = (shutil.copytree(real, tmp_path / name) for name in ("true", "shuffled"))
    rows = [json.loads(line) for line in (real / "metadata.jsonl").read_text().splitlines()]
    other = {"across": "down", "down": "across"}
    for i, row in enumerate(sorted(rows, key=lambda r: (r["label"], r["file_name"]))):
        row["label"] = other[row["label"]] if i % 2 else row["label"]
    (shuffled / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls: list[tuple] = []
    report = ev.evaluate([true, shuffled], real, tmp_path / "out", k=3,
                         classifier=ClassifierConfig(epochs=8, width=8),
                         progress=lambda *a: calls.append(a))
    good, bad = (r["label_agreement"] for r in report["runs"])
    judge = good["classifier"]
    assert judge == bad["classifier"]  # trained once, on the real images
    epochs = sum(1 for c in calls if c[0].startswith("label-agreement classifier"))
    assert epochs == ev.AGREEMENT_EPOCHS  # its own recipe
    assert judge["train_images"] == 90 and judge["validation_images"] == 10
    assert "split of the --real images" in judge["selected_on"] and judge["recipe"]["epochs"] == epochs
    assert judge["held_out_accuracy"] >= 0.75, judge  # the judge is worth listening to
    assert good["agreement"] >= 0.9 and good["images"] == 100 and good["chance"] == 0.5
    assert set(good["per_class"]) == {"across", "down"}
    assert all(v["agreement"] >= 0.8 and v["images"] == 50 for v in good["per_class"].values())
    assert abs(bad["agreement"] - 0.5) <= 0.15, bad["agreement"]
    assert {"runs[0].label_agreement", "runs[1].label_agreement"} <= set(report["not_covered_by_dp"])
    page = (tmp_path / "out" / "report.html").read_text()
    section = page[page.index("<h3>Label agreement"):]
    assert section.index(">not DP</span>") < section.index("</h3>")
    assert "trained on the --real images" in section and "held-out accuracy" in section
    from privsynth.cli import _evaluation_summary

    assert "label-agreement=" in _evaluation_summary(report, tmp_path / "out").splitlines()[1]


def test_label_agreement_is_omitted_with_a_reason_without_matching_labels(
        tmp_path: Path, tiny: None) -> None:
    real = image_set(tmp_path / "real", seed=1)
    unlabelled = image_set(tmp_path / "flat", labelled=False)
    stars = make_folder(tmp_path / "stars", classes=("circle", "star"))
    report = ev.evaluate([unlabelled, stars], real, tmp_path / "out")
    for i, why in enumerate(("the synthetic set is unlabelled", "['star'] are not --real classes")):
        run = report["runs"][i]
        assert "label_agreement" not in run and f"runs[{i}].label_agreement" not in (
            report["not_covered_by_dp"])
        assert any(n.startswith("no label_agreement") and why in n for n in run["notes"]), run["notes"]
    flat_real = ev.evaluate(image_set(tmp_path / "s", seed=2), unlabelled, tmp_path / "out2")
    assert any("the --real set is unlabelled" in n for n in flat_real["runs"][0]["notes"])
    off = ev.evaluate(image_set(tmp_path / "s2", seed=3), real, tmp_path / "out3", classifier=None)
    assert any("switched off" in n for n in off["runs"][0]["notes"])
    assert "label_agreement" not in off["runs"][0]
    assert "no label_agreement" in (tmp_path / "out3" / "report.html").read_text()


def test_an_epsilon_sweep_is_plotted(tmp_path: Path, tiny: None) -> None:
    real = make_folder(tmp_path / "real", seed=1)
    runs = []
    for eps, seed in ((0.5, 3), (2.0, 4), (8.0, 5)):
        runs.append(image_set(tmp_path / f"eps{eps:g}", seed=seed))
        (runs[-1] / "certificate.json").write_text(json.dumps({"epsilon": {"spent": eps}, "delta": 1e-5}))
    report = ev.evaluate(runs, real, tmp_path / "out", k=5)
    assert [r["privacy"]["epsilon"] for r in report["runs"]] == [0.5, 2.0, 8.0]
    assert [r["name"] for r in report["runs"]] == ["eps0.5", "eps2", "eps8"]
    assert all(r["k"] == 5 and "utility" not in r for r in report["runs"])
    assert any("need --test" in n for n in report["runs"][0]["notes"])
    page = (tmp_path / "out" / "report.html").read_text()
    sweep = page[page.index("Quality against epsilon"):page.index("Image sets")]
    assert sweep.count("<svg") == 3 and "epsilon (log)" in sweep
    assert sweep.count("<circle") == 4 * 3  # FID, precision, recall, label agreement: per run
    from privsynth.cli import _evaluation_summary

    lines = _evaluation_summary(report, tmp_path / "out").splitlines()
    assert len(lines) == 5 and lines[2].startswith("  eps2: epsilon=2 FID=")
    assert "not DP" in lines[0] and lines[-1].endswith("report.html (and report.json)")


def test_the_html_is_self_contained(sets: tuple[Path, Path], tmp_path: Path, tiny: None) -> None:
    import base64
    import io
    from html.parser import HTMLParser

    from PIL import Image

    ev.evaluate(sets[0], sets[1], tmp_path / "out", test=make_folder(tmp_path / "t", seed=4),
                classifier=QUICK)
    page = (tmp_path / "out" / "report.html").read_text()
    tags: list[tuple[str, dict]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list) -> None:
            tags.append((tag, dict(attrs)))

    Collect().feed(page)
    names = {t for t, _ in tags}
    assert not names & {"script", "link", "iframe", "object", "embed"}
    assert not [a for _, a in tags if "href" in a]
    images = [a["src"] for t, a in tags if t == "img"]
    assert len(images) >= 2 * 2 + 8  # grids (2 classes x synthetic/real) + closest pairs
    for src in images:
        assert src.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    assert names >= {"svg", "table", "polyline"}


@pytest.mark.slow
def test_the_html_renders_in_headless_chromium(sets: tuple[Path, Path], tmp_path: Path,
                                               tiny: None) -> None:
    import shutil
    import subprocess

    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium package is not installed")
    ev.evaluate(sets[0], sets[1], tmp_path / "out", test=make_folder(tmp_path / "t", seed=4),
                classifier=QUICK)
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,1600", f"--user-data-dir={tmp_path / 'profile'}",
                    (tmp_path / "out" / "report.html").as_uri()], check=True, timeout=120,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (1600, 1200)
    assert pixels.std() > 20  # text, tables and sample grids, not a blank page
    assert (pixels < 60).mean() > 0.01  # the dark sample grids were drawn


def test_k_too_large_and_repeated_folder_names(tmp_path: Path, tiny: None) -> None:
    real = make_folder(tmp_path / "real", seed=1)
    a, b = image_set(tmp_path / "a" / "synthetic", seed=2), image_set(tmp_path / "b" / "synthetic", seed=3)
    with pytest.raises(UsageError, match="--k 24 needs more than 24"):
        ev.evaluate(a, real, tmp_path / "out", k=24)
    report = ev.evaluate([a, b], real, tmp_path / "out2", k=23)
    assert [r["name"] for r in report["runs"]] == [str(a), str(b)]
