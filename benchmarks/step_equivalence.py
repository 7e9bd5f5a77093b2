"""Is a refactoring of the training step behaviour-preserving? Tiny fits, two source trees, one hash each.

    python benchmarks/step_equivalence.py OLD_TREE NEW_TREE

Runs the same eight tiny ``diffmic fit`` runs (generated 28 px images, ResNet-10-tiny backbones, one
thread) with ``PYTHONPATH=<tree>/src`` for each tree: the full method, ``train.prior_swap`` with R = 2
noise draws, ``train.exact_dcg_priors=false``, out-of-fold priors (K = 2), ``basic``, ``dcg``, ``C1`` with
gradient accumulation and ``C2`` for two joint epochs. It prints, per case, the optimiser step count
and a SHA-256 of the final weights and EMA of ``last.ckpt``, and exits 1 when the two trees differ.
Hashes compare runs on ONE machine (floating-point results differ between CPUs).

Used for issue 24.1 (2026-12-05): the trees before and after ``training/step.py`` gave identical
hashes in all eight cases.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import write_synthetic_npz  # noqa: E402  (the tests' generator)

TINY = (
    "model.pretrained=false model.freeze_stride=0 train.dcg_warmup_steps=null train.joint_steps=null "
    "model.encoder=resnet10_tiny model.dcg_global=resnet10_tiny model.dcg_local=resnet10_tiny "
    "model.hidden_dim=64 train.lr=0.003 train.dcg_lr=0.003"
).split()
CASES = [
    "",
    "train.prior_swap=0.3 train.noise_samples_per_image=2",
    "train.exact_dcg_priors=false",
    "train.prior_folds=2",
    "model.variant=basic",
    "model.variant=dcg",
    "model.variant=C1 train.accumulate_grad_batches=2",
    "model.variant=C2 train.epochs=2",
]


def _hash(ckpt: Path) -> str:
    ck = torch.load(ckpt, weights_only=True, map_location="cpu")
    h = hashlib.sha256()
    for part in (ck["state_dict"], ck.get("diffmic_ema") or {}):
        for k in sorted(part):
            h.update(k.encode())
            h.update(part[k].float().numpy().tobytes())
    return f"{ck.get('global_step')}:{h.hexdigest()[:16]}"


def run_tree(tree: Path, out: Path) -> list[str]:
    npz = write_synthetic_npz(out / "s.npz")
    env = {**os.environ, "PYTHONPATH": f"{tree}/src", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    fast = (
        "data.dataset=medmnist data.subset=32 data.image_size=32 data.batch_size=16 train.epochs=1 "
        f"train.dcg_warmup_epochs=1 train.progress_bar=false data.cache_dir={out}/cache data.root={npz}"
    ).split()
    hashes = []
    for i, extra in enumerate(CASES):
        run = out / f"r{i}"
        argv = [sys.executable, "-m", "diffmic.cli", "fit", "--config", "cpu_v1", *TINY, *fast, *extra.split()]
        p = subprocess.run([*argv, f"run.dir={run}"], env=env, capture_output=True, text=True)
        hashes.append(f"failed (exit {p.returncode})" if p.returncode else _hash(run / "checkpoints" / "last.ckpt"))
    return hashes


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        a = run_tree(Path(sys.argv[1]).resolve(), Path(tmp) / "a")
        b = run_tree(Path(sys.argv[2]).resolve(), Path(tmp) / "b")
    same = True
    for case, x, y in zip(CASES, a, b):
        same &= x == y and not x.startswith("failed")
        print(f"{'same' if x == y else 'DIFFERENT':9s} {x:28s} {y:28s} {case or '(full)'}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
