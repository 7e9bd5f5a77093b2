"""The built wheel installs into a clean virtual environment and works from there: `diffmic --help`,
`diffmic --version`, and a tiny fit with a preset the wheel ships.

The clean venv has no pip and no packages of its own; it sees the third-party packages (torch,
Lightning, ...) of the interpreter running the tests through one `.pth` line, so nothing is downloaded
and torch is not installed twice. That line adds a plain folder to sys.path: the `.pth` files in it (an
editable install of diffmic) are NOT processed, so `import diffmic` can only find the installed wheel,
which the test checks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from diffmic import __version__

from _helpers import TINY_MODEL
from conftest import write_synthetic_npz

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _run(cmd: list[str], env: dict, timeout: int = 120) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd}\n{res.stdout[-1500:]}\n{res.stderr[-3000:]}"
    return res


def test_wheel_installs_and_runs_in_a_clean_venv(tmp_path):
    pytest.importorskip("setuptools")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # build from a copy of the sources so the checkout gets no build/ or egg-info folders
    srcdir = tmp_path / "src_copy"
    srcdir.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, srcdir / name)
    shutil.copytree(ROOT / "src", srcdir / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path / "dist"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(srcdir),
        ],
        env,
    )
    (wheel,) = dist.glob("diffmic-*.whl")
    assert wheel.name.startswith(f"diffmic-{__version__}-")
    names = set(zipfile.ZipFile(wheel).namelist())
    for preset in ("ham10000", "aptos2019", "ultrasound", "cpu", "cpu_v1", "demo_cpu", "breastmnist"):
        assert f"diffmic/configs/{preset}.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)
    assert "diffmic/data/download.py" in names and "diffmic/inference/export.py" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env)
    vpy = venv / "bin" / "python"
    purelib = Path(
        _run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], env).stdout.strip()
    )
    (purelib / "_host_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run(
        [sys.executable, "-m", "pip", "--python", str(vpy), "install", "--no-deps", "--no-index", "-q", str(wheel)], env
    )

    where = _run([str(vpy), "-c", "import diffmic; print(diffmic.__file__)"], env).stdout.strip()
    assert where.startswith(str(venv)), f"diffmic imported from {where}, not from the installed wheel"
    exe = str(venv / "bin" / "diffmic")
    assert "fit" in _run([exe, "--help"], env).stdout
    assert _run([exe, "--version"], env).stdout.strip() == f"diffmic {__version__}"

    # dark (0) and bright (1) 28x28 grey images, alternating
    splits = {"train": 16, "val": 4, "test": 8}
    kw = {"order": "cycle", "region": "all", "background": 60.0, "spread": 20.0, "contrast": 130.0}
    write_synthetic_npz(tmp_path / "tiny.npz", splits, **kw)
    run = tmp_path / "run"
    # `--config cpu` resolves the preset shipped inside the installed wheel
    _run(
        [
            exe,
            "fit",
            "--config",
            "cpu_v1",
            *TINY_MODEL,
            "data.dataset=medmnist",
            f"data.root={tmp_path / 'tiny.npz'}",
            "data.image_size=32",
            "data.batch_size=8",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={run}",
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            "eval.num_samples=1",
        ],
        env,
        timeout=180,
    )
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "fit_summary.json").is_file()
