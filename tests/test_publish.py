"""publish.write_dataset: torchvision reads it back pixel-exact, the manifest catches tampering,
nothing is ever overwritten or left half-written, and the PNGs carry no metadata."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from privsynth import data, publish
from privsynth.errors import UsageError
from privsynth.files import sha256_of

CARD = {"method": "dp-mepf", "epsilon": 1.0, "delta": 1e-5, "seed": 3}
CERT = {"epsilon": {"spent": 1.0}, "delta": 1e-5}


def _images(n: int, channels: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, size=(n, channels, size, size), dtype=np.uint8))


def _write(out: Path, images: torch.Tensor, labels: torch.Tensor, classes=("cat", "dog", "eel")) -> Path:
    return publish.write_dataset(out, images, labels, classes, certificate=CERT, card=CARD)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name]


@pytest.fixture
def grey(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    images, labels = _images(10, 1), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2])
    return _write(tmp_path / "synth", images, labels), images, labels


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_reads_it_back_pixel_exact(tmp_path: Path, channels: int) -> None:
    images, labels = _images(9, channels), torch.tensor([2, 0, 1, 2, 0, 1, 1, 1, 0])
    out = _write(tmp_path / "synth", images, labels, classes=("zebra", "ant", "moth"))
    folder = ImageFolder(str(out))  # metadata.jsonl, README.md etc. at the root must not bother it
    assert folder.classes == ["ant", "moth", "zebra"] and len(folder) == 9
    classes = ("zebra", "ant", "moth")
    for path, target in folder.samples:
        index = int(Path(path).stem)
        assert folder.classes[target] == classes[labels[index]]
        with Image.open(path) as img:
            assert img.mode == ("L" if channels == 1 else "RGB")
            got = np.asarray(img)
        want = images[index].numpy()
        assert np.array_equal(got, want[0] if channels == 1 else want.transpose(1, 2, 0))


def test_privsynth_own_loader_reads_it_back(grey) -> None:
    out, images, labels = grey
    listing = data.scan(out)
    assert listing.layout == "imagefolder-metadata" and listing.classes == ("cat", "dog", "eel")
    loaded = data.load(listing, resolution=8, channels=1)
    assert torch.equal(loaded.images, images) and torch.equal(loaded.labels, labels)


def test_metadata_rows_match_files(grey) -> None:
    out, _, labels = grey
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    pngs = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert sorted(r["file_name"] for r in rows) == pngs
    for i, row in enumerate(rows):
        assert row == {"file_name": f"{row['label']}/{i:06d}.png", "label": "cat dog eel".split()[labels[i]]}


def test_layout_card_and_certificate(grey) -> None:
    out, _, _ = grey
    top = sorted(p.name for p in out.iterdir())
    assert top == ["MANIFEST.sha256", "README.md", "cat", "certificate.json", "classes.json", "dog", "eel",
                   "metadata.jsonl"]
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog", "eel"]
    assert json.loads((out / "certificate.json").read_text()) == CERT
    card = (out / "README.md").read_text()
    assert "synthetic" in card and "dp-mepf" in card and "epsilon: 1" in card and "delta: 1e-05" in card
    assert "images: 10" in card and "| cat | 4 |" in card and "| eel | 3 |" in card and "seed: 3" in card
    assert f"privsynth {publish.__version__}" in card


def test_manifest_verifies_and_catches_tampering(grey) -> None:
    out, _, _ = grey
    lines = (out / "MANIFEST.sha256").read_text().splitlines()
    paths = [line.split("  ", 1)[1] for line in lines]
    assert paths == sorted(paths) and "MANIFEST.sha256" not in paths and len(paths) == 10 + 4
    assert publish.verify_manifest(out) == []
    png = out / paths[0]
    raw = bytearray(png.read_bytes())
    raw[-20] ^= 1
    png.write_bytes(bytes(raw))
    (out / "dog" / "000001.png").unlink()
    (out / "eel" / "extra.png").write_bytes(b"x")
    assert publish.verify_manifest(out) == [
        f"changed: {paths[0]}", "missing: dog/000001.png", "not in manifest: eel/extra.png"]


def test_manifest_missing_or_malformed(tmp_path: Path, grey) -> None:
    out, _, _ = grey
    with open(out / "MANIFEST.sha256", "a") as handle:
        handle.write("nonsense\n" + "0" * 64 + "  ../outside\n")
    assert publish.verify_manifest(out) == [
        "MANIFEST.sha256 line 15: not '<sha256>  <relative path>'",
        "MANIFEST.sha256 line 16: not '<sha256>  <relative path>'"]
    (out / "MANIFEST.sha256").unlink()
    assert publish.verify_manifest(out) == ["MANIFEST.sha256 is missing"]


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    path = tmp_path / "blob"
    path.write_bytes(b"abc")
    assert sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum binary")
def test_sha256sum_check_passes(grey) -> None:
    out, _, _ = grey
    result = subprocess.run(["sha256sum", "--strict", "-c", "MANIFEST.sha256"], cwd=out,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_png_files_carry_no_metadata(grey) -> None:
    out, _, _ = grey
    for png in out.rglob("*.png"):
        with Image.open(png) as img:
            assert img.info == {}, png
        assert _chunk_types(png.read_bytes()) == ["IHDR", "IDAT", "IEND"]


def _chunk_types(raw: bytes) -> list[str]:
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    types, at = [], 8
    while at < len(raw):
        length, kind = struct.unpack(">I4s", raw[at:at + 8])
        types.append(kind.decode("ascii"))
        at += 12 + length
    return types


def test_refuses_existing_folder_or_file(grey, tmp_path: Path) -> None:
    out, images, labels = grey
    before = sha256_of(out / "MANIFEST.sha256")
    with pytest.raises(UsageError, match="not empty"):
        _write(out, images, labels)
    assert sha256_of(out / "MANIFEST.sha256") == before
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(UsageError, match="not a folder"):
        _write(tmp_path / "file", images, labels)
    assert (tmp_path / "file").read_text() == "keep me" and _leftovers(tmp_path) == []


def test_empty_existing_folder_is_used_and_parents_made(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert publish.verify_manifest(_write(tmp_path / "empty", _images(3, 1), torch.tensor([0, 1, 2]))) == []
    assert publish.verify_manifest(_write(tmp_path / "a" / "b", _images(3, 1), torch.tensor([0, 1, 2]))) == []


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a\\b", ".hidden", "tab\there", "README.md", "x" * 256])
def test_rejects_class_names_that_are_not_folder_names(tmp_path: Path, bad: str) -> None:
    with pytest.raises(UsageError, match="class name"):
        _write(tmp_path / "synth", _images(2, 1), torch.tensor([0, 1]), classes=("ok", bad))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_rejects_names_equal_but_for_case(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="differ only in case"):
        _write(tmp_path / "synth", _images(2, 1), torch.tensor([0, 1]), classes=("Cat", "cat"))


def test_no_partial_folder_left_after_a_failure_mid_write(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def failing(path: Path, data: bytes) -> str:
        calls.append(path)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        path.write_bytes(data)
        return "0" * 64

    monkeypatch.setattr(publish, "_write_bytes", failing)
    with pytest.raises(OSError, match="No space"):
        _write(tmp_path / "synth", _images(10, 3), torch.zeros(10, dtype=torch.long))
    assert list(tmp_path.iterdir()) == []


def test_unserialisable_certificate_fails_before_any_pixel_is_written(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        publish.write_dataset(tmp_path / "synth", _images(2, 1), torch.tensor([0, 0]), ["a"],
                              certificate={"epsilon": float("nan")}, card=CARD)
    assert list(tmp_path.iterdir()) == []


def _card_header(out: Path) -> dict:
    import yaml  # PyYAML: a dependency of `datasets`, in the [test] extra
    text = (out / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _class_label_names(features: list[dict]) -> list[str]:
    assert [f["name"] for f in features] == ["image", "label"] and features[0]["dtype"] == "image"
    names = features[1]["dtype"]["class_label"]["names"]
    assert sorted(names, key=int) == [str(i) for i in range(len(names))]  # '0', '1', ... every index
    return [names[str(i)] for i in range(len(names))]


def test_classes_without_images_keep_their_index_in_classes_json_and_the_card(tmp_path: Path) -> None:
    classes = ("zebra", "ant", "moth")  # not sorted: ImageFolder would renumber them
    out = _write(tmp_path / "synth", _images(3, 1), torch.tensor([0, 0, 2]), classes=classes)
    assert not (out / "ant").exists() and "| ant | 0 |" in (out / "README.md").read_text()
    folder = ImageFolder(str(out))
    assert len(folder) == 3 and folder.classes == ["moth", "zebra"]  # the index shift classes.json fixes
    assert json.loads((out / "classes.json").read_text()) == list(classes)
    header = _card_header(out)
    assert _class_label_names(header["dataset_info"]["features"]) == list(classes)
    config = header["configs"][0]
    assert config["config_name"] == "default" and _class_label_names(config["features"]) == list(classes)
    assert publish.verify_manifest(out) == []  # classes.json is in the manifest
    assert "classes.json" in (out / "MANIFEST.sha256").read_text()


def test_card_header_license_default_and_given(tmp_path: Path) -> None:
    out = _write(tmp_path / "synth", _images(2, 1), torch.tensor([0, 1]))
    header = _card_header(out)
    assert header["license"] == "other" and "image-classification" in header["task_categories"]
    assert "set the header's `license:` before publishing" in (out / "README.md").read_text()
    given = publish.write_dataset(tmp_path / "cc", _images(2, 1), torch.tensor([0, 1]), ["a", "b"],
                                  certificate=CERT, card=dict(CARD, license="cc-by-4.0"))
    assert _card_header(given)["license"] == "cc-by-4.0"
    assert "- license:" not in (given / "README.md").read_text()  # in the header, not repeated


def test_class_names_that_need_yaml_quoting_survive_the_header(tmp_path: Path) -> None:
    classes = ("yes", "null", '"quoted" #x', "2: b", "é")
    out = _write(tmp_path / "synth", _images(5, 1), torch.arange(5), classes=classes)
    assert _class_label_names(_card_header(out)["dataset_info"]["features"]) == list(classes)
    assert json.loads((out / "classes.json").read_text(encoding="utf-8")) == list(classes)


@pytest.mark.parametrize("images, labels", [
    (torch.zeros(2, 2, 4, 4, dtype=torch.uint8), torch.tensor([0, 1])),  # 2 channels
    (torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])),  # float
    (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0])),  # length mismatch
    (torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3])),  # label out of range
])
def test_rejects_malformed_arrays(tmp_path: Path, images: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        _write(tmp_path / "synth", images, labels)
    assert list(tmp_path.iterdir()) == []


def test_zero_images_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="0 images"):
        _write(tmp_path / "synth", torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


def test_card_needs_method_epsilon_delta(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="card needs delta"):
        publish.write_dataset(tmp_path / "synth", _images(1, 1), torch.tensor([0]), ["a"],
                              certificate=CERT, card={"method": "m", "epsilon": 1.0})
    assert list(tmp_path.iterdir()) == []


def test_hugging_face_datasets_reads_it_with_the_card_class_labels(tmp_path: Path, monkeypatch) -> None:
    """`datasets` is in the [test] extra, so this runs: offline (no socket may connect), with its
    cache inside tmp_path."""
    import socket

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # if imported before the env was set

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access from the Hugging Face test: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    classes = ("zebra", "ant", "moth")  # "ant" gets no image: no folder, but keeps index 1
    images, labels = _images(4, 1), torch.tensor([2, 0, 2, 0])
    out = _write(tmp_path / "synth", images, labels, classes=classes)
    cache = str(tmp_path / "hf-cache")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=cache)  # reads the card's header
    assert ds.features["label"].names == list(classes)
    assert ds["label"] == labels.tolist()  # indices as the model's, not re-numbered from folders
    assert [np.asarray(img)[0, 0] for img in ds["image"]] == images[:, 0, 0, 0].tolist()
    plain = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=cache)
    assert plain["label"] == [classes[i] for i in labels]  # metadata.jsonl's names, file by file
