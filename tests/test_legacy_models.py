"""A checkpoint and an exported model folder written before the encoders were built by
``timm.create_model`` (tests/data/legacy, see make_legacy.py there) still load and give the
predictions recorded when they were written.

The fixtures are a full DiffMIC (DCG at output stride 16, three ResNet-10 backbones of width 2 built
by diffmic's old hand-written ResNet under torchvision's key names, hidden_dim 16) with a stored
calibration and out-of-distribution flag, so every per-image output is compared: class, probabilities,
referral, conformal set, CARD flag, OOD score, DCG prior, saliency map, ROI boxes and attention.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

LEGACY = Path(__file__).parent / "data" / "legacy"
sys.path.insert(0, str(LEGACY))

from make_legacy import legacy_images, predictions, register  # noqa: E402


def _same(got, want, where: str) -> None:
    if isinstance(want, float) or isinstance(got, float):
        assert math.isclose(float(got), float(want), rel_tol=1e-5, abs_tol=1e-6), f"{where}: {got} != {want}"
    elif isinstance(want, dict):
        assert set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            _same(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            _same(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("source", ["checkpoint", "folder"])
def test_a_model_written_before_the_timm_encoders_predicts_as_it_did(source, tmp_path, one_thread):
    from diffmic.inference.predictor import Predictor

    register()
    expected = json.loads((LEGACY / "expected.json").read_text())[source]
    path = LEGACY / ("model.ckpt" if source == "checkpoint" else "model")
    got = predictions(Predictor.load(path, device="cpu"), legacy_images(tmp_path / "images"))
    assert len(expected) == 6 and {r["set"] for r in expected} and any(r["saliency"] for r in expected)
    _same(got, expected, source)
