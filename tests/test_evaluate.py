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
    assert ev.fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_a_mean_shift_costs_its_squared_norm() -> None:
    rng = np.random.default_rng(1)
    feats = rng.standard_normal((300, 16)) @ rng.standard_normal((16, 16))  # correlated features
    delta = rng.standard_normal(16)
    assert ev.fid_from_features(feats, feats + delta) == pytest.approx(delta @ delta, rel=1e-9)


def test_known_answer_with_a_trace_term() -> None:
    # Diagonal covariances commute: trace term = sum (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 9.0, 0.25]), np.array([4.0, 1.0, 9.0, 1.0])
    mu1, mu2 = np.zeros(4), np.array([1.0, -2.0, 0.0, 0.5])
    expected = 1 + 4 + 0.25 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_gaussian_samples_approach_the_analytic_value() -> None:
    # N(0, I) against N(delta, 4 I) in 4-d: |delta|^2 + 4 * (1 - 2)^2.
    rng = np.random.default_rng(2)
    delta = np.array([0.5, -1.0, 0.0, 2.0])
    x, y = rng.standard_normal((40_000, 4)), 2 * rng.standard_normal((40_000, 4)) + delta
    assert ev.fid_from_features(x, y) == pytest.approx(delta @ delta + 4, abs=0.1)


def test_matches_clean_fid_on_non_commuting_covariances() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((200, 20)), rng.standard_normal((200, 20)) @ rng.standard_normal((20, 20))
    mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0) + 0.3, np.cov(y, rowvar=False)
    ours = ev.frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(cleanfid.fid.frechet_distance(mu1, s1, mu2, s2), rel=1e-8)


@pytest.mark.parametrize("n1,n2,dim", [(10, 12, 50), (30, 40, 40), (200, 150, 20)])
def test_row_and_covariance_routes_agree(n1: int, n2: int, dim: int) -> None:
    # Fewer rows than dims goes through the rows (singular covariances); more through covariances.
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((n1, dim)), rng.standard_normal((n2, dim)) @ rng.standard_normal((dim, dim))
    by_covariance = ev.frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                                        y.mean(0), np.cov(y, rowvar=False))
    assert ev.fid_from_features(x, y) == pytest.approx(by_covariance, rel=1e-7)
    assert np.isfinite(by_covariance) and by_covariance > 0


def test_kid_is_seeded_and_leaves_the_global_rng_alone() -> None:
    rng = np.random.default_rng(5)
    x, y, z = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)), rng.standard_normal((50, 8)) + 1
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = ev.kid_from_features(x, y, subsets=20, subset_size=30)
    assert np.array_equal(np.random.get_state()[1], before)
    assert first == ev.kid_from_features(x, y, subsets=20, subset_size=30)
    assert first["std"] > 0 and first["subset_size"] == 30
    assert abs(first["mean"]) < ev.kid_from_features(x, z, subsets=20, subset_size=30)["mean"]


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
    assert report["schema"] == "privsynth.report/1"
    space = report["feature_space"]
    assert space["name"] == "efficientnet-lite0" and space["is_inception"] is False
    assert "not comparable with Inception FID" in space["note"]
    assert space["weights_sha256"] == ev.EFFICIENTNET_LITE0_SHA256 and space["input_size"] == 224
    assert report["synthetic"]["images"] == report["real"]["images"] == 24
    assert report["real"]["classes"] == {"circle": 12, "square": 12}
    assert report["fid"] > 0 and set(report["kid"]) >= {"mean", "std"}
    assert set(report["per_class_fid"]) == {"circle", "square"}
    assert {"fid", "kid", "per_class_fid"} <= set(report["not_covered_by_dp"])
    assert "owner only" in report["privacy_note"]
    assert report["versions"]["clean-fid"] == "0.1.35"
    assert report["throughput_images_per_s"] > 0 and report["wall_time_s"] > 0
    assert calls[-1] == ("features of real images", 24, 24)
    # Nothing outside `out`: no cache, no statistics in clean-fid's folder or the temp folder.
    assert str(out / "report.json.partial") in writes  # the audit hook sees writes
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
    assert again["fid"] == first["fid"] and again["throughput_images_per_s"] is None
    synthetic = sets[0]
    png = sorted(synthetic.rglob("*.png"))[0]
    make_folder(tmp_path / "other", per_class=1, seed=9)  # a different image, same file name
    png.write_bytes(sorted((tmp_path / "other").rglob("*.png"))[0].read_bytes())
    changed = ev.evaluate(*sets, tmp_path / "c", cache_dir=cache)
    assert len(list(cache.iterdir())) == 3 and changed["fid"] != first["fid"]


def test_unlabelled_sets_get_no_per_class_fid(tmp_path: Path, tiny: None) -> None:
    synthetic = image_set(tmp_path / "s", labelled=False)
    real = image_set(tmp_path / "r", seed=1)
    report = ev.evaluate(synthetic, real, tmp_path / "out")
    assert "per_class_fid" not in report and "per_class_fid" not in report["not_covered_by_dp"]
    assert report["synthetic"]["classes"] == {"all": 24}


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
