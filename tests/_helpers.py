"""Shared test helpers: where the real data live, the tiny CPU model and the ``diffmic fit`` arguments
used by CLI tests (the generated data sets: conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parents[1].parent / "shared" / "data"
NPZ = DATA / "breastmnist" / "breastmnist.npz"

# Tiny backbones, a narrow denoiser and short samplers: a CPU fit in seconds.
TINY_MODEL = [
    # random weights and epoch counts whatever the preset says (the `cpu` preset: pretrained
    # EfficientNet-Lite0, step budgets); tests set train.epochs / train.dcg_warmup_epochs themselves
    "model.pretrained=false",
    "model.freeze_stride=0",
    "train.dcg_warmup_steps=null",
    "train.joint_steps=null",
    "model.encoder=resnet10_tiny",
    "model.dcg_global=resnet10_tiny",
    "model.dcg_local=resnet10_tiny",
    "model.hidden_dim=64",
    "train.lr=0.003",
    "train.dcg_lr=0.003",
    "train.dcg_warmup_lr=0.003",
    "train.lr_warmup_epochs=0",
    "train.progress_bar=false",
    "eval.steps=5",
    "eval.val_steps=5",
]

ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli_output(*args: str, timeout: float = 600) -> str:
    """``python -m diffmic.cli ARGS`` in a one-thread subprocess; asserts exit 0 and returns what it
    printed (stdout, then stderr)."""
    out = subprocess.run(
        [sys.executable, "-m", "diffmic.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ONE_THREAD_ENV,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def need(sub: str) -> Path:
    """The real data file or folder ``../shared/data/<sub>``.

    Where it is absent the test is skipped on a developer's machine, but FAILS when the environment
    variable ``CI`` is ``true`` (CI sets it): there a missing data set must not turn the suite green.
    """
    p = DATA / sub
    if not p.exists():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"real data not available in CI: {p} (CI=true: a missing data set is a failure)")
        pytest.skip(f"real data not available: {p}")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: results compared across processes use the same float reductions,
    and jobs sharing the 2 cores do not oversubscribe them (2 spinning OpenMP threads on a busy
    machine made a 1 s fit take 30-100 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _folder_fit_args(
    data: Path, run: Path, cache: Path, batch_size: int, *middle: str, epochs: int, warmup: int
) -> list[str]:
    """``diffmic fit`` arguments of a tiny ``cpu_v1`` run on an image folder at 32 px (``middle``: the
    caller's settings between the data and the budget)."""
    return [
        "fit",
        "--config",
        "cpu_v1",
        "data.dataset=folder",
        f"data.root={data}",
        "data.split=random",
        "data.image_size=32",
        f"data.batch_size={batch_size}",
        *middle,
        f"data.cache_dir={cache}",
        *TINY_MODEL,
        f"train.epochs={epochs}",
        f"train.dcg_warmup_epochs={warmup}",
        f"run.dir={run}",
    ]


def npz_fit_args(npz: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    """``diffmic fit`` arguments of a tiny ``cpu_v1`` run on a MedMNIST-style ``.npz`` (conftest's
    ``write_synthetic_npz``) at 32 px in batches of 8: 1 DCG warm-up and 1 joint epoch (``extra``:
    further settings, e.g. ``model.dcg_output_stride=8``)."""
    return [
        "fit",
        "--config",
        "cpu_v1",
        *TINY_MODEL,
        "data.dataset=medmnist",
        f"data.root={npz}",
        "data.image_size=32",
        "data.batch_size=8",
        f"data.cache_dir={cache}",
        *extra,
        f"run.dir={run}",
        "train.epochs=2",
        "train.dcg_warmup_epochs=1",
    ]


def tiny_fit_args(data: Path, run: Path, cache: Path, epochs: int = 1, warmup: int = 1) -> list[str]:
    """``diffmic fit`` arguments for a seconds-long CPU fit on an image folder (conftest's
    ``write_synthetic_folder``), batches of 16."""
    return _folder_fit_args(data, run, cache, 16, epochs=epochs, warmup=warmup)


def fit_args(data: Path, run: Path, *extra: str, warmup: int = 1, epochs: int = 2) -> list[str]:
    """``diffmic fit`` arguments for the safety tests: a small image folder in batches of 4, a quarter
    held out for testing and a fifth for validation, two reverse samples, logs at every step."""
    args = _folder_fit_args(
        data,
        run,
        run.parent / "cache",
        4,
        "data.test_fraction=0.25",
        "data.val_fraction=0.2",
        epochs=epochs,
        warmup=warmup,
    )
    return [*args[:-1], "eval.num_samples=2", "train.log_every_n_steps=1", args[-1], *extra]
