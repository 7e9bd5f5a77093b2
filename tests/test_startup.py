"""Serving starts without the training stack (issue 27.2).

``from diffmic.inference import Predictor``, ``Predictor.load`` of an exported model folder or of a
checkpoint, a prediction, and ``diffmic predict`` run in a fresh Python process must not import
Lightning, torchmetrics or matplotlib (seconds of start-up that serving does not use); scipy only as
``scipy.special``, for the CARD t-test of the K samples when a prediction needs it. Checked on the
committed legacy fixtures (tests/data/legacy), whose recorded predictions the light path must give.

The checkpoint path rebuilds the network without the LightningModule
(:func:`diffmic.training.loading.load_network`); it must load the same weights as
:func:`diffmic.training.checkpoint.load_module` (the EMA weights included) and refuse what it refuses.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy"
TRAINING_STACK = ("lightning", "pytorch_lightning", "lightning_fabric", "torchmetrics", "matplotlib")
# what `from scipy.special import stdtr` (trust.uncertainty.t_sf_two_sided) loads, and nothing else of scipy
SCIPY_SPECIAL = {"scipy", "scipy.special", "scipy.version", "scipy.__config__"}

_PRELUDE = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(LEGACY)!r})

def heavy():
    tops = sorted({{m.split('.')[0] for m in sys.modules if m.split('.')[0] in {TRAINING_STACK!r}}})
    scipy = sorted({{'.'.join(m.split('.')[:2]) for m in sys.modules if m.split('.')[0] == 'scipy'}})
    return {{"training": tops, "scipy": [m for m in scipy if m not in {sorted(SCIPY_SPECIAL)!r}
                                         and not m.startswith('scipy._')], "any_scipy": bool(scipy)}}
"""


def _run(code: str, tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-c", _PRELUDE + code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _expected_first(source: str) -> dict:
    return json.loads((LEGACY / "expected.json").read_text())[source][0]


def test_importing_the_predictor_imports_no_training_stack(tmp_path):
    got = _run(
        "from diffmic.inference import Predictor\n"
        "from diffmic.inference.predictor import Prediction\n"
        "print(json.dumps(heavy()))\n",
        tmp_path,
    )
    assert got == {"training": [], "scipy": [], "any_scipy": False}


@pytest.mark.parametrize("source", ["folder", "checkpoint"])
def test_loading_a_model_and_predicting_imports_no_training_stack(source, tmp_path):
    path = LEGACY / ("model" if source == "folder" else "model.ckpt")
    got = _run(
        f"""
from make_legacy import legacy_images, register
from diffmic.inference import Predictor
register()
steps = {{"import": heavy()}}
p = Predictor.load({str(path)!r}, device="cpu")
steps["load"] = heavy()
r = p.predict(legacy_images(Path("images"), n=1))[0]
steps["predict"] = heavy()
steps["result"] = [r.label, r.confidence, r.uncertain]
print(json.dumps(steps))
""",
        tmp_path,
    )
    for step in ("import", "load", "predict"):
        assert got[step]["training"] == [], (step, got[step])
        assert got[step]["scipy"] == [], (step, got[step])
    assert not got["load"]["any_scipy"]  # scipy.special comes with the t-test of the first prediction only
    want = _expected_first(source)  # recorded by the Lightning path when the fixture was written
    label, confidence, uncertain = got["result"]
    assert label == want["label"]
    assert math.isclose(confidence, want["confidence"], rel_tol=1e-5, abs_tol=1e-6)
    assert int(uncertain) == want["uncertain"]


def test_diffmic_predict_imports_no_training_stack(tmp_path):
    got = _run(
        f"""
import contextlib, io
from make_legacy import legacy_images, register
from diffmic.cli import main
register()
img = str(legacy_images(Path("images"), n=1)[0])
out = {{}}
for flag, model in (("--model", {str(LEGACY / "model")!r}), ("--ckpt", {str(LEGACY / "model.ckpt")!r})):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["predict", img, flag, model])
    out[flag] = [rc, buf.getvalue()]
out["after"] = heavy()
print(json.dumps(out))
""",
        tmp_path,
    )
    assert got["after"]["training"] == [] and got["after"]["scipy"] == [], got["after"]
    for flag, source in (("--model", "folder"), ("--ckpt", "checkpoint")):
        rc, text = got[flag]
        assert rc == 0, text
        fields = text.strip().splitlines()[0].split("\t")
        want = _expected_first(source)
        assert fields[1] == want["label"] and fields[2] == f"p={want['confidence']:.3f}", text


# ----------------------------------------------------------------------------------------------
# load_network (no Lightning) against load_module (the LightningModule)


@pytest.fixture(scope="module")
def legacy_encoder():
    sys.path.insert(0, str(LEGACY))
    from make_legacy import register

    register()


def test_load_network_loads_the_weights_load_module_loads(legacy_encoder, one_thread):
    from diffmic.training.checkpoint import load_module, read_checkpoint
    from diffmic.training.loading import load_network

    path = LEGACY / "model.ckpt"
    net = load_network(path)
    module = load_module(path)
    want = module.model.state_dict()
    got = net.model.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert net.class_names == module.class_names and net.calibration == module.calibration
    assert not net.model.training
    # the run evaluates with its EMA: the EMA weights, not the raw ones, are the network's
    raw = read_checkpoint(path)
    assert net.cfg.train.use_ema and "diffmic_ema" in raw
    moved = [k for k in got if not torch.equal(got[k], raw["state_dict"][f"model.{k}"])]
    assert moved and not any(k.startswith("dcg.") for k in moved)  # the DCG has no EMA
    plain = load_network(path, use_ema=False).model.state_dict()
    assert all(torch.equal(plain[k], raw["state_dict"][f"model.{k}"]) for k in plain)


def test_load_network_refuses_what_load_module_refuses(legacy_encoder, tmp_path, one_thread):
    from diffmic.training.checkpoint import CheckpointError, load_module, read_checkpoint
    from diffmic.training.loading import load_network

    good = read_checkpoint(LEGACY / "model.ckpt")
    key = next(k for k in good["state_dict"] if k.startswith("model.") and good["state_dict"][k].ndim == 2)

    reshaped = dict(good, state_dict=dict(good["state_dict"]))
    reshaped["state_dict"][key] = torch.zeros(3, 3)
    stranger = dict(good, state_dict=dict(good["state_dict"]))
    stranger["state_dict"]["extra.weight"] = torch.zeros(1)
    missing = dict(good, state_dict={k: v for k, v in good["state_dict"].items() if k != key})
    for name, ckpt, needle in (
        ("reshaped", reshaped, key),
        ("stranger", stranger, "extra.weight"),
        ("missing", missing, key),
    ):
        path = tmp_path / f"{name}.ckpt"
        torch.save(ckpt, path)
        for loader in (load_network, load_module):
            with pytest.raises(CheckpointError, match="nothing was loaded") as exc:
                loader(path)
            assert needle in str(exc.value) and str(path) in str(exc.value), (name, loader.__name__)

    with pytest.raises(CheckpointError, match="these change the network"):
        load_network(LEGACY / "model.ckpt", overrides={"model": {"hidden_dim": 8}})
