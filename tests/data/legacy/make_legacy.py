"""Writes the legacy fixtures of ``tests/test_legacy_models.py`` (run once, with diffmic at commit
b36baef, before the encoders were built by ``timm.create_model``; kept to show how they were made).

A full DiffMIC (DCG at output stride 16, three ResNet-10 backbones of width 2 built by the old
hand-written ResNet, hidden_dim 16) fitted for a few seconds on generated images, tested (which
stores the calibration in the checkpoint) and exported; ``expected.json`` holds what the Predictor
gave on ``legacy_images()`` from both. The optimiser state is dropped from the checkpoint to keep it
small (predictions do not read it).

    OMP_NUM_THREADS=1 python tests/data/legacy/make_legacy.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).parent
ENCODER = "legacy_resnet10_w2"


def register() -> None:
    """The backbone of the fixtures: diffmic's small ResNet-10 at width 2 (out_dim 16)."""
    from diffmic.nn.encoders import available_encoders, register_encoder, small_resnet

    if ENCODER not in available_encoders():
        register_encoder(ENCODER)(lambda in_chans, spatial: small_resnet(in_chans, spatial, width=2))


def legacy_images(folder: Path, n: int = 6, size: int = 40) -> list[Path]:
    """``n`` RGB PNGs (dark and bright noise) that the expected predictions were computed on."""
    rng = np.random.default_rng(20261205)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        a = np.clip(rng.normal(60 + 120 * (i % 2), 30, (size, size, 3)), 0, 255).astype(np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    return paths


def predictions(predictor, images: list[Path]) -> list[dict]:
    out = []
    for r in predictor.predict(images):
        row = r.as_row()
        row["id"] = Path(row["id"]).name
        row["prior_probs"] = r.prior_probs
        row["saliency"] = r.saliency.astype(float).round(7).tolist() if r.saliency is not None else None
        row["roi_attention"] = r.roi_attention
        out.append(row)
    return out


def main() -> None:
    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE.parents[1]))
    register()
    # tests/_synthetic.py exists at the commit this script is meant to run at (see the docstring);
    # since 2026-12-05 the tests' generator is conftest.write_synthetic_folder
    from _synthetic import image_folder  # type: ignore[import-not-found]

    import diffmic
    from diffmic.inference.export import export_model
    from diffmic.inference.predictor import Predictor

    tmp = Path(tempfile.mkdtemp())
    data = image_folder(tmp / "data", per_class=16, size=32)
    over = {
        "data.dataset": "folder",
        "data.root": str(data),
        "data.split": "random",
        "data.image_size": 32,
        "data.batch_size": 8,
        "data.cache_dir": str(tmp / "cache"),
        "model.pretrained": False,
        "model.freeze_stride": 0,
        "model.variant": "full",
        "model.encoder": ENCODER,
        "model.dcg_global": ENCODER,
        "model.dcg_local": ENCODER,
        "model.dcg_output_stride": 16,
        "model.hidden_dim": 16,
        "train.dcg_warmup_steps": None,
        "train.joint_steps": None,
        "train.epochs": 2,
        "train.dcg_warmup_epochs": 1,
        "train.lr_warmup_epochs": 0,
        "train.progress_bar": False,
        "eval.steps": 5,
        "eval.val_steps": 5,
        "eval.num_samples": 4,
        "run.dir": str(tmp / "run"),
        "run.seed": 3,
    }
    run, _ = diffmic.fit("cpu_v1", over)
    diffmic.test(run)
    ckpt = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    for k in ("optimizer_states", "lr_schedulers"):
        ckpt.pop(k, None)
    torch.save(ckpt, HERE / "model.ckpt")
    shutil.rmtree(HERE / "model", ignore_errors=True)
    export_model(ckpt=HERE / "model.ckpt", out=HERE / "model")
    images = legacy_images(tmp / "images")
    expected = {
        "written_by": f"diffmic {diffmic.__version__} (tests/data/legacy/make_legacy.py)",
        "checkpoint": predictions(Predictor.load(HERE / "model.ckpt", device="cpu"), images),
        "folder": predictions(Predictor.load(HERE / "model", device="cpu"), images),
    }
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
