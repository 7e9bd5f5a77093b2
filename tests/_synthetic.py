"""Small generated image folders for end-to-end tests that need no real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from _helpers import TINY_MODEL

CLASSES = ("dark", "bright")


def image_folder(root: Path, per_class: int = 24, size: int = 40, seed: int = 0) -> Path:
    """``root/<class>/<class><i>.png``: noisy RGB images, class 0 dark (mean 60), class 1 bright
    (mean 180): separable by brightness, so a tiny model learns them in a few epochs."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(rng.normal(60 + 120 * c, 25, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(d / f"{name}{i}.png")
    return root


def tiny_fit_args(data: Path, run: Path, cache: Path, epochs: int = 1, warmup: int = 1) -> list[str]:
    """``diffmic fit`` arguments for a seconds-long CPU fit on :func:`image_folder` data."""
    return [
        "fit",
        "--config",
        "cpu_v1",
        "data.dataset=folder",
        f"data.root={data}",
        "data.split=random",
        "data.image_size=32",
        "data.batch_size=16",
        f"data.cache_dir={cache}",
        *TINY_MODEL,
        f"train.epochs={epochs}",
        f"train.dcg_warmup_epochs={warmup}",
        f"run.dir={run}",
    ]
