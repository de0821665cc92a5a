"""Shared fixtures: tiny labelled image folders made on the fly (offline, no real data)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def _ledger_outside_home(tmp_path_factory: pytest.TempPathFactory):
    """Every fit records to a budget ledger: keep the tests' ledgers out of the real home folder
    (subprocesses inherit the variable)."""
    import os

    old = os.environ.get("PRIVSYNTH_LEDGER")
    os.environ["PRIVSYNTH_LEDGER"] = str(tmp_path_factory.mktemp("ledger"))
    yield
    if old is None:
        os.environ.pop("PRIVSYNTH_LEDGER", None)
    else:
        os.environ["PRIVSYNTH_LEDGER"] = old


def make_folder(root: Path, per_class: int = 12, classes: tuple[str, ...] = ("circle", "square"),
                size: int = 28, seed: int = 0) -> Path:
    """An ImageFolder of grey shapes: each class a different bright shape on black, with noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            cy, cx = rng.integers(size // 3, 2 * size // 3, size=2)
            r = rng.integers(size // 6, size // 4)
            if k % 2 == 0:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
            img = np.where(mask, 200, 10) + rng.integers(0, 40, size=(size, size))
            Image.fromarray(img.clip(0, 255).astype(np.uint8), "L").save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    """24 grey 28x28 images in two classes."""
    return make_folder(tmp_path / "private")


@pytest.fixture
def real_dir(tmp_path: Path) -> Path:
    """Another 24 images from the same two classes (held-out 'real' images)."""
    return make_folder(tmp_path / "real", seed=1)
