"""Shared fixtures: small data sets the tests generate themselves, so every training test runs on a
fresh clone without ``../shared/data`` (the real-data tests are an extra layer, see ``_helpers.need``).

* ``synth_npz``: a MedMNIST-style ``.npz`` (28x28 grey, 2 classes, train/val/test = 64/16/32, 70:30
  class ratio) with a learnable signal: class 1 has a bright square in the centre.
* ``synth_folder``: class sub-folders of RGB PNGs (``benign``/``malignant``) with the same signal.

Every generated image set of the tests comes from :func:`synthetic_images` (written by
:func:`write_synthetic_npz` / :func:`write_synthetic_folder`); ``DARK_BRIGHT``, ``NUMBERED`` and
``DISCS`` name the option sets several modules share.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # `from _helpers import ...` in every test module

from _helpers import one_thread  # noqa: E402,F401  (re-exported as a fixture)

SPLITS = {"train": 64, "val": 16, "test": 32}
MINORITY = 0.3  # share of class 1 in every split: the majority-class baseline accuracy is 0.7
#: the disc colour of each class (``region="disc"``)
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def synthetic_images(
    n: int | Sequence[int],
    size: int | tuple[int, int] = 28,
    seed: int = 0,
    rgb: bool = False,
    *,
    classes: int = 2,
    order: str = "shuffled",
    region: str = "centre",
    background: float = 90.0,
    spread: float = 25.0,
    contrast: float = 110.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The tests' one generator of labelled images: uint8 ``[N, H, W]`` (``[N, H, W, 3]`` with ``rgb``)
    and int64 labels ``[N]``, from ``numpy.random.default_rng(seed)``.

    Labels: ``n`` an int: ``order="shuffled"`` gives two classes with class 1 in ``MINORITY`` of the
    images (rounded) in random order, ``order="cycle"`` gives ``0, 1, .., classes - 1, 0, ..``;
    ``n`` a sequence: that many images of each class, class by class (``order="grouped"``) or in
    random order (``"shuffled"``).

    Pixels: grey noise N(``background``, ``spread``) (``rgb``: the channels scaled 1, 0.8, 0.6), and a
    learnable signal: ``region="centre"`` adds ``contrast`` x class to the centre square (half the
    side), ``"all"`` to the whole image, ``"disc"`` paints a disc (a fifth of the short side in
    radius, at a random place in the middle) in the class's colour ``COLOURS[c]`` (``rgb`` only).
    """
    if order not in ("shuffled", "cycle", "grouped"):
        raise ValueError(f"order must be shuffled, cycle or grouped, got {order!r}")
    rng = np.random.default_rng(seed)
    if isinstance(n, int) and order == "cycle":
        labels = np.arange(n, dtype=np.int64) % classes
    elif isinstance(n, int):
        if classes != 2:
            raise ValueError("an image count gives two classes; give a count per class for more")
        n1 = round(n * MINORITY)
        labels = np.array([1] * n1 + [0] * (n - n1), dtype=np.int64)
    else:
        labels = np.repeat(np.arange(len(n), dtype=np.int64), n)
    if order == "shuffled":
        rng.shuffle(labels)
    h, w = (size, size) if isinstance(size, int) else size
    img = rng.normal(background, spread, size=(len(labels), h, w)).clip(0, 255)
    if region == "centre":
        img[:, h // 4 : h - h // 4, w // 4 : w - w // 4] += contrast * labels[:, None, None]
    elif region == "all":
        img += contrast * labels[:, None, None]
    elif region != "disc":
        raise ValueError(f"region must be centre, all or disc, got {region!r}")
    img = img.clip(0, 255).astype(np.uint8)
    if rgb:
        img = np.stack([img, (img * 0.8).astype(np.uint8), (img * 0.6).astype(np.uint8)], -1)
    if region == "disc":
        if not rgb:
            raise ValueError("region='disc' draws coloured discs: rgb=True")
        yy, xx = np.mgrid[0:h, 0:w]
        r = min(h, w) / 5
        for k, c in enumerate(labels):
            cy, cx = rng.integers(round(0.3 * h), round(0.7 * h)), rng.integers(round(0.3 * w), round(0.7 * w))
            img[k][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = COLOURS[c]
    return img, labels


#: :func:`write_synthetic_folder` options: classes ``dark`` (noise around 60) and ``bright`` (around
#: 180), files ``dark0.png``, ``dark1.png``, ..: separable by brightness, learnt by a tiny model in a
#: few epochs
DARK_BRIGHT: dict[str, Any] = {
    "names": ("dark", "bright"),
    "stem": "{name}{i}",
    "order": "grouped",
    "region": "all",
    "background": 60.0,
    "contrast": 120.0,
}


#: :func:`write_synthetic_folder` options: files ``img0.png``, ``img1.png``, .. in each class folder,
#: noise around 60, class c brighter by 100 c
NUMBERED: dict[str, Any] = {
    "stem": "img{i}",
    "order": "grouped",
    "region": "all",
    "background": 60.0,
    "spread": 35.0,
    "contrast": 100.0,
}


#: :func:`synthetic_images` / :func:`write_synthetic_folder` options: a disc in the class's colour
#: (red, green, blue) on dark noise, at a random place
DISCS: dict[str, Any] = {"order": "grouped", "region": "disc", "background": 45.0, "spread": 26.0}


def write_synthetic_npz(path: Path, splits: dict[str, int] = SPLITS, size: int = 28, **kw: Any) -> Path:
    """A MedMNIST-style ``.npz`` (``<split>_images``, ``<split>_labels`` as ``[N, 1]``), split ``i``
    drawn by :func:`synthetic_images` with seed ``100 + i`` and the options ``kw``."""
    arrays: dict[str, Any] = {}
    for i, (name, n) in enumerate(splits.items()):
        imgs, labels = synthetic_images(n, size, seed=100 + i, **kw)
        arrays[f"{name}_images"], arrays[f"{name}_labels"] = imgs, labels[:, None]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def write_synthetic_folder(
    root: Path,
    n: int | Sequence[int] = 80,
    size: int | tuple[int, int] = 32,
    names: Sequence[str] = ("benign", "malignant"),
    stem: str = "{n:04d}",
    seed: int = 7,
    **kw: Any,
) -> Path:
    """``root/<class name>/<stem>.png``: RGB images of :func:`synthetic_images` (options ``kw``);
    ``stem`` formats ``n`` (the image's index), ``i`` (its index within its class) and ``name``."""
    imgs, labels = synthetic_images(n, size, seed=seed, rgb=True, classes=len(names), **kw)
    within = dict.fromkeys(range(len(names)), 0)
    for k, (a, y) in enumerate(zip(imgs, labels)):
        p = root / names[int(y)] / f"{stem.format(n=k, i=within[int(y)], name=names[int(y)])}.png"
        within[int(y)] += 1
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


@pytest.fixture(scope="session", autouse=True)
def _decoded_cache_in_the_tests_temp(tmp_path_factory):
    """Every decoded-image cache the tests make (in process or in a `diffmic` subprocess) goes under
    the session's temporary folder, never the checkout's ``.cache/diffmic`` or ``~/.cache/diffmic``:
    a run of the suite leaves nothing behind in the user's folders. Tests of the default location
    set or delete ``DIFFMIC_CACHE_DIR`` themselves (``monkeypatch``)."""
    import _helpers

    with pytest.MonkeyPatch.context() as mp:
        cache = str(tmp_path_factory.mktemp("decoded-cache"))
        mp.setenv("DIFFMIC_CACHE_DIR", cache)
        # the environment of the tests' subprocesses (a copy of os.environ made at import)
        mp.setitem(_helpers.ONE_THREAD_ENV, "DIFFMIC_CACHE_DIR", cache)
        yield
