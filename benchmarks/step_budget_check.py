"""What schedule do the `cpu` (epochs) and `cpu_steps` (optimiser steps) presets give small and large data?

Builds the training split of BreastMNIST (official split) and of a class-folder set made of a few
hundred HAM10000 images (symlinks, ``--folder-size`` images, at most a third from any class), counts
the training images and prints one JSON line per data set: optimiser steps of the DCG warm-up and of
the joint stage under each preset.

    python benchmarks/step_budget_check.py [--ham ../shared/data/ham10000] [--npz ...breastmnist.npz]
    python benchmarks/step_budget_check.py --make-folder runs/data/ham_folder500 --folder-size 500
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from collections import defaultdict
from pathlib import Path


def make_folder(ham: Path, dest: Path, n: int) -> Path:
    by_class: dict[str, list[str]] = defaultdict(list)
    with open(ham / "HAM10000_metadata.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            by_class[row["dx"]].append(row["image_id"])
    per = max(1, n // len(by_class))
    for dx, ids in sorted(by_class.items()):
        (dest / dx).mkdir(parents=True, exist_ok=True)
        for i in sorted(ids)[: min(per, len(ids), n // 3)]:
            (dest / dx / f"{i}.jpg").symlink_to(ham / "images" / f"{i}.jpg")
    return dest


def schedule(preset: str, overrides: list[str]) -> dict:
    from diffmic.config import load_config
    from diffmic.training.budget import apply_step_budget, steps_per_epoch
    from diffmic.training.run import build_datamodule

    cfg = load_config(preset, overrides)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    n = len(dm.get_dataset("train").labels)
    apply_step_budget(cfg, n)
    spe = steps_per_epoch(n, cfg.data.batch_size)
    t = cfg.train
    return {
        "preset": preset,
        "train_images": n,
        "steps_per_epoch": spe,
        "warmup_epochs": t.dcg_warmup_epochs,
        "joint_epochs": t.epochs,
        "warmup_steps": t.dcg_warmup_epochs * spe,
        "joint_steps": t.epochs * spe,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ham", type=Path, default=Path("../shared/data/ham10000"))
    p.add_argument("--npz", type=Path, default=Path("../shared/data/breastmnist/breastmnist.npz"))
    p.add_argument("--folder-size", type=int, default=350)
    p.add_argument(
        "--make-folder",
        type=Path,
        default=None,
        help="only build the class folder (symlinks) at this path, e.g. for benchmarks/grids/small_folder.yaml",
    )
    a = p.parse_args()
    if a.make_folder is not None:
        if a.make_folder.exists():
            raise SystemExit(f"{a.make_folder} exists; remove it or choose another path")
        make_folder(a.ham.resolve(), a.make_folder, a.folder_size)
        print(f"wrote {a.make_folder}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_folder(a.ham.resolve(), Path(tmp) / "ham_small", a.folder_size)
        sets = {
            "breastmnist": ["data.dataset=medmnist", f"data.root={a.npz}", "data.check_images=false"],
            f"ham10000 class folder ({a.folder_size} images)": [
                "data.dataset=folder",
                f"data.root={folder}",
                "data.split=random",
            ],
            "ham10000 authors split": [f"data.root={a.ham}"],
        }
        for name, over in sets.items():
            for preset in ("cpu", "cpu_steps"):
                print(json.dumps({"data": name, **schedule(preset, over)}), flush=True)


if __name__ == "__main__":
    main()
