"""Shared fixtures: small data sets the tests generate themselves, so every training test runs on a
fresh clone without ``../shared/data`` (the real-data tests are an extra layer, see ``_helpers.need``).

* ``synth_npz``: a MedMNIST-style ``.npz`` (28x28 grey, 2 classes, train/val/test = 64/16/32, 70:30
  class ratio) with a learnable signal: class 1 has a bright square in the centre.
* ``synth_folder``: class sub-folders of RGB PNGs (``benign``/``malignant``) with the same signal.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # `from _helpers import ...` in every test module

from _helpers import one_thread  # noqa: E402,F401  (re-exported as a fixture)

SPLITS = {"train": 64, "val": 16, "test": 32}
MINORITY = 0.3  # share of class 1 in every split: the majority-class baseline accuracy is 0.7


def synthetic_images(n: int, size: int = 28, seed: int = 0, rgb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images and labels (class 1 in about 30 %, rounded, first of each split sorted
    at random): grey noise around 90, class 1 with a bright centre square (+110)."""
    rng = np.random.default_rng(seed)
    n1 = round(n * MINORITY)
    labels = np.array([1] * n1 + [0] * (n - n1), dtype=np.int64)
    rng.shuffle(labels)
    img = rng.normal(90, 25, size=(n, size, size)).clip(0, 255)
    lo, hi = size // 4, size - size // 4
    img[labels == 1, lo:hi, lo:hi] += 110
    img = img.clip(0, 255).astype(np.uint8)
    if rgb:
        img = np.stack([img, (img * 0.8).astype(np.uint8), (img * 0.6).astype(np.uint8)], -1)
    return img, labels


def write_synthetic_npz(path: Path, splits: dict[str, int] = SPLITS, size: int = 28) -> Path:
    arrays = {}
    for i, (name, n) in enumerate(splits.items()):
        imgs, labels = synthetic_images(n, size, seed=100 + i)
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = imgs, labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_synthetic_folder(
    root: Path, n: int = 80, size: int = 32, names: tuple[str, str] = ("benign", "malignant")
) -> Path:
    imgs, labels = synthetic_images(n, size, seed=7, rgb=True)
    for i, (a, y) in enumerate(zip(imgs, labels)):
        p = root / names[int(y)] / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
    return root


@pytest.fixture(scope="session")
def synth_npz(tmp_path_factory) -> Path:
    """The generated MedMNIST-style file (read-only by convention: tests must not modify it)."""
    return write_synthetic_npz(tmp_path_factory.mktemp("synth") / "synthmnist.npz")


@pytest.fixture(scope="session")
def synth_folder(tmp_path_factory) -> Path:
    return write_synthetic_folder(tmp_path_factory.mktemp("synthfolder") / "images")


# Tests that train a model through the CLI (directly or through a shared run fixture) are `slow`:
# `pytest -m "not slow"` is the quick loop; CI runs everything.
_TRAINING_FIXTURES = {"synth_run", "breast_run", "full_run", "killed_run", "two_runs"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
