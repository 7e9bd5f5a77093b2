"""Small generated data sets for the safety tests (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from _helpers import TINY_MODEL


def make_folder(root: Path, classes=("benign", "malignant"), n: int = 10, size: int = 32, seed: int = 0) -> Path:
    """root/<class>/img<i>.png: distinct random images, class-dependent brightness."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            arr = rng.integers(0, 120, (size, size, 3), dtype=np.uint8) + np.uint8(100 * c)
            Image.fromarray(arr).save(d / f"img{i}.png")
    return root


def fit_args(data: Path, run: Path, *extra: str, warmup: int = 1, epochs: int = 2) -> list[str]:
    return [
        "fit",
        "--config",
        "cpu_v1",
        "data.dataset=folder",
        f"data.root={data}",
        "data.split=random",
        "data.image_size=32",
        "data.batch_size=4",
        "data.test_fraction=0.25",
        "data.val_fraction=0.2",
        f"data.cache_dir={run.parent / 'cache'}",
        *TINY_MODEL,
        "eval.num_samples=2",
        f"train.epochs={epochs}",
        f"train.dcg_warmup_epochs={warmup}",
        "train.log_every_n_steps=1",
        f"run.dir={run}",
        *extra,
    ]
