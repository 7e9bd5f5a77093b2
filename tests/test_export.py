"""`diffmic export`: a model folder that loads without Lightning and predicts exactly like the
checkpoint; model card; refusal to overwrite; calibration pass-through; ONNX agreement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.cli import main
from diffmic.inference import Predictor
from diffmic.inference.export import ExportError, export_model, load_model_folder
from diffmic.nn.encoders import create_encoder

from _helpers import ONE_THREAD_ENV, TINY_MODEL, npz_fit_args, one_thread  # noqa: F401
from conftest import write_synthetic_npz

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).parents[1] / "src"


def flat_images(folder: Path, n: int = 4) -> list[Path]:
    """``n`` uniform 40x36 grey PNGs, alternately dark (60) and bright (190): inputs to predict on."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        val = 60 if i % 2 == 0 else 190
        p = folder / f"img{i}.png"
        Image.fromarray(np.full((40, 36), val, dtype=np.uint8)).save(p)
        out.append(p)
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export")
    # two easy classes of 28x28 grey images, dark (0) or bright (1), alternating
    splits = {"train": 48, "val": 8, "test": 16}
    npz = write_synthetic_npz(tmp / "synth.npz", splits, order="cycle", region="all", background=60.0, contrast=130.0)
    # start the backbones from a local "pretrained" file, then delete it: loading must not need it
    weights = tmp / "resnet10_tiny.pth"
    torch.save(create_encoder("resnet10_tiny").state_dict(), weights)
    run = tmp / "run"
    rc = main(npz_fit_args(npz, run, tmp / "cache", f"model.pretrained={weights}"))
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    weights.unlink()
    return run


def test_export_folder_predicts_like_the_checkpoint(tiny_run, tmp_path):
    out = tmp_path / "model"
    assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["class_names"] == ["malignant", "normal, benign"] or len(meta["class_names"]) == 2
    assert meta["preprocessing"]["image_size"] == 32 and meta["preprocessing"]["in_chans"] == 3
    assert meta["sampler"]["sampler"] == meta["config"]["eval"]["sampler"]
    assert meta["config"]["model"]["pretrained"].endswith("resnet10_tiny.pth")  # as trained
    assert meta["architecture"]["pretrained"] is None
    images = flat_images(tmp_path / "imgs")
    ref = Predictor.from_checkpoint(tiny_run / "checkpoints" / "best.ckpt", device="cpu").predict(images)
    got = Predictor.load(out, device="cpu").predict(images)
    for a, b in zip(ref, got):
        assert a.label == b.label and a.refer == b.refer
        assert np.allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-6)
    # the same from a fresh interpreter in which Lightning cannot be imported at all
    code = (
        "import sys, json; sys.modules['lightning'] = None; sys.modules['pytorch_lightning'] = None\n"
        "from diffmic.inference import Predictor\n"
        f"r = Predictor.load({str(out)!r}, device='cpu').predict({[str(p) for p in images]!r})\n"
        "print(json.dumps([[x.label, list(x.probs.values())] for x in r]))\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules\n"
        "               if sys.modules[m] is not None)\n"
    )
    env = {**ONE_THREAD_ENV, "PYTHONPATH": str(SRC)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for a, (label, probs) in zip(ref, rows):
        assert a.label == label and np.allclose(list(a.probs.values()), probs, atol=1e-6)
    # `diffmic predict --run <model folder>` uses it too
    assert main(["predict", "--run", str(out), str(images[0])]) == 0


def test_model_card_reports_data_metrics_and_limits(tiny_run, tmp_path):
    out = export_model(run=tiny_run, out=tmp_path / "m")
    card = (out / "MODEL_CARD.md").read_text()
    metrics = json.loads((tiny_run / "test_metrics.json").read_text())
    assert "medmnist" in card and "split `authors`" in card
    assert f"| acc | {metrics['acc']:.4f} |" in card
    assert f"{metrics['num_images']} images" in card
    assert "Not a medical device" in card and "MICCAI 2023" in card
    assert "local file `resnet10_tiny.pth`" in card


def test_export_refuses_a_non_empty_folder(tiny_run, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", "--run", str(tiny_run), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["export", "--run", str(tiny_run), "--out", str(empty)]) == 0
    assert (empty / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_calibration_is_passed_through_and_tampering_is_caught(tiny_run, tmp_path):
    ckpt = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    ckpt["diffmic_calibration"] = {"method": "temperature", "temperature": 1.7}  # training.checkpoint.CALIBRATION_KEY
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    cal = tmp_path / "run" / "checkpoints" / "best.ckpt"
    torch.save(ckpt, cal)
    out = export_model(ckpt=cal, out=tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["calibration"] == {"method": "temperature", "temperature": 1.7}
    assert load_model_folder(out).calibration["temperature"] == 1.7
    w = out / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="SHA-256"):
        load_model_folder(out)


def _have_onnxruntime() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _have_onnxruntime() and os.environ.get("CI", "").lower() != "true",
    reason="onnx/onnxruntime not installed (pip install 'diffmic[onnx]'); required when CI=true",
)
def test_onnx_agrees_with_pytorch(tiny_run, tmp_path):
    import onnxruntime as ort

    from diffmic.diffusion import samplers
    from diffmic.metrics import readout

    B = 4
    out = export_model(run=tiny_run, out=tmp_path / "m", onnx=True, onnx_batch=B)
    meta = json.loads((out / "config.json").read_text())
    assert meta["onnx"]["encoder_dcg"]["file"] == "encoder_dcg.onnx"
    pm = load_model_folder(out)
    model, cfg = pm.model, pm.cfg
    from diffmic.data.datasets import ImagePathsDataset

    paths = flat_images(tmp_path / "imgs", B)
    ds = ImagePathsDataset(paths, image_size=cfg.data.image_size, in_chans=cfg.data.in_chans)
    x = torch.stack([ds[i]["image"] for i in range(B)])
    enc = ort.InferenceSession(str(out / "encoder_dcg.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(out / "denoiser_step.onnx"), providers=["CPUExecutionProvider"])
    feat_o, prior_o, guide_o = enc.run(["features", "prior", "guidance"], {"image": x.numpy()})
    with torch.no_grad():
        feat_t = model.encode(x)
        pri = model.priors(model.guide(x), B)
        prior_t, guide_t = pri.fused, pri.guidance
    # stated tolerance: 1e-4 absolute on features and priors (float32, different kernels)
    assert np.abs(feat_o - feat_t.numpy()).max() < 1e-4
    assert np.abs(prior_o - prior_t.numpy()).max() < 1e-4
    assert np.abs(guide_o - guide_t.numpy()).max() < 1e-4

    def eps_torch(y_t, t):
        with torch.no_grad():
            return model.eps(feat_t, y_t, t, guide_t)

    def eps_onnx(y_t, t):
        (e,) = step.run(
            None,
            {
                "features": feat_o,
                "y_t": y_t.numpy().astype(np.float32),
                "t": t.numpy().astype(np.int64),
                "guidance": guide_o,
            },
        )
        return torch.from_numpy(e)

    y = torch.randn(B, model.num_classes)
    t = torch.tensor([0, 5, 50, cfg.diffusion.num_timesteps - 1])
    assert (eps_onnx(y, t) - eps_torch(y, t)).abs().max() < 1e-4
    # a whole reverse chain with the same noise: same classes, probabilities within 1e-3
    e = cfg.eval
    runs = []
    for fn, mu in ((eps_torch, prior_t), (eps_onnx, torch.from_numpy(prior_o))):
        g = torch.Generator().manual_seed(0)
        res = samplers.sample(e.sampler, fn, pm.schedule, mu, steps=e.steps, eta=e.eta, start=e.start, generator=g)
        runs.append(readout(res.y0.view(B, 1, -1), e.aggregate, e.temperature))
    assert torch.equal(runs[0].pred, runs[1].pred)
    assert (runs[0].probs - runs[1].probs).abs().max() < 1e-3


@pytest.mark.skipif(
    not _have_onnxruntime() and os.environ.get("CI", "").lower() != "true",
    reason="onnx/onnxruntime not installed (pip install 'diffmic[onnx]'); required when CI=true",
)
@pytest.mark.parametrize(
    "over", [[], ["model.prior=zero"], ["model.denoiser_input=paper"]], ids=["default", "zero-prior", "paper-input"]
)
def test_onnx_graphs_follow_reverse_sample(tmp_path, over):
    """The two graphs, driven by the sampler as docs/deployment.md says (μ = `prior`, the step fed
    `guidance`), give the library's own `reverse_sample` answer: also when the denoiser's guidance
    is not the fused prior (the zero prior, whose guidance is softmax(½(z_g + z_l)), and the paper's
    [ŷ_g, ŷ_l] input of width 2C), where the step graph used to take the prior."""
    import onnxruntime as ort

    from diffmic.config import load_config, model_kwargs
    from diffmic.diffusion import samplers
    from diffmic.diffusion.reverse import reverse_sample
    from diffmic.diffusion.schedule import NoiseSchedule
    from diffmic.inference.export import export_onnx
    from diffmic.nn.diffmic import DiffMIC

    # output stride 8: a 4x4 saliency map (at stride 32 the 1x1 map ties every ROI cell, and torch and ONNX
    # Runtime break the tie differently)
    over = [*TINY_MODEL, "data.image_size=32", "diffusion.num_timesteps=50", "model.dcg_output_stride=8", *over]
    cfg = load_config("cpu_v1", over)
    torch.manual_seed(0)
    model = DiffMIC(num_classes=3, **model_kwargs(cfg)).eval()
    for p in model.parameters():  # a trained-looking network: weights off their init, so guidance matters
        p.data.add_(0.05 * torch.randn_like(p))
    B = 2
    meta = export_onnx(model, cfg, tmp_path, batch=B)
    x = torch.randn(B, 3, 32, 32)
    enc = ort.InferenceSession(str(tmp_path / "encoder_dcg.onnx"), providers=["CPUExecutionProvider"])
    step = ort.InferenceSession(str(tmp_path / "denoiser_step.onnx"), providers=["CPUExecutionProvider"])
    feat, prior, guide = enc.run(["features", "prior", "guidance"], {"image": x.numpy()})
    assert guide.shape[1] == meta["denoiser_step"]["inputs"]["guidance"][1]

    def eps_onnx(y_t, t):
        run = {"features": feat, "y_t": y_t.numpy().astype(np.float32), "t": t.numpy(), "guidance": guide}
        return torch.from_numpy(step.run(None, run)[0])

    schedule = NoiseSchedule.build(num_timesteps=50, beta_start=1e-4, beta_end=0.02)
    noise = torch.randn(1, B, 3)
    ours = samplers.sample("ddim", eps_onnx, schedule, torch.from_numpy(prior), steps=5, noise=noise).y0
    with torch.no_grad():
        ref = reverse_sample(model, schedule, x, sampler="ddim", steps=5, noise=noise).y0[:, 0]
    assert (ours - ref).abs().max() < 1e-4
