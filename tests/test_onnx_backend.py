"""`Predictor.load(folder, backend="onnx")`: an exported model folder served by its ONNX graphs with
ONNX Runtime gives the PyTorch backend's predictions (labels, probabilities, saliency, ROIs) for any
batch size, starts without timm / torchvision / torch._dynamo, and refuses graphs that were changed,
that the folder's config.json does not vouch for, or that read data from outside the folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmic.cli import main
from diffmic.inference import Predictor
from diffmic.inference.export import ExportError, export_model

from _helpers import ONE_THREAD_ENV, TINY_MODEL, npz_fit_args, one_thread  # noqa: F401
from conftest import write_synthetic_npz


def _have_onnxruntime() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(
        not _have_onnxruntime() and os.environ.get("CI", "").lower() != "true",
        reason="onnx/onnxruntime not installed (pip install 'diffmic[onnx]'); required when CI=true",
    ),
]
SRC = Path(__file__).parents[1] / "src"
EXPORT_BATCH = 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A trained tiny `full` model (two classes of 28x28 images) whose DCG saliency map is 4x4: at the
    default output stride the 32 px input gives a 1x1 map, every ROI cell ties, and torch and ONNX
    Runtime break the tie differently."""
    tmp = tmp_path_factory.mktemp("onnx_run")
    splits = {"train": 32, "val": 8, "test": 8}
    npz = write_synthetic_npz(tmp / "synth.npz", splits, order="cycle", region="all", background=60.0, contrast=130.0)
    run = tmp / "run"
    rc = main(npz_fit_args(npz, run, tmp / "cache", "model.dcg_output_stride=8"))
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def onnx_folder(tiny_run, tmp_path_factory) -> Path:
    return export_model(
        run=tiny_run, out=tmp_path_factory.mktemp("onnx_model") / "m", onnx=True, onnx_batch=EXPORT_BATCH
    )


def _images(folder: Path, n: int = 5) -> list[Path]:
    """``n`` images that differ in more than brightness (a gradient and a bright square), so that the
    saliency maps and ROIs differ between images."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, val in enumerate((60, 190)):  # flat dark and bright images, as tests/test_export.py's
        out.append(folder / f"flat{i}.png")
        Image.fromarray(np.full((40, 36), val, dtype=np.uint8)).save(out[-1])
    rng = np.random.default_rng(0)
    for i in range(n - len(out)):
        a = np.tile(np.linspace(30, 220, 36, dtype=np.float64), (40, 1))
        y, x = rng.integers(0, 28), rng.integers(0, 24)
        a[y : y + 12, x : x + 12] = 250 - 40 * i
        p = folder / f"var{i}.png"
        Image.fromarray(a.astype(np.uint8)).save(p)
        out.append(p)
    return out


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _rehash(folder: Path, key: str, name: str) -> None:
    import hashlib

    cfg = folder / "config.json"
    meta = json.loads(cfg.read_text())
    data = (folder / name).read_bytes()
    meta["onnx"][key].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    cfg.write_text(json.dumps(meta, indent=2))


def test_export_records_the_dcg_outputs_hashes_and_batch(onnx_folder):
    import hashlib

    meta = json.loads((onnx_folder / "config.json").read_text())["onnx"]
    enc = meta["encoder_dcg"]
    assert list(enc["outputs"]) == [
        "features",
        "prior",
        "guidance",
        "z_fused",
        "saliency",
        "roi_boxes",
        "roi_attention",
    ]
    assert enc["batch"] == EXPORT_BATCH and enc["inputs"]["image"] == [EXPORT_BATCH, 3, 32, 32]
    assert enc["outputs"]["saliency"][2:] == [4, 4]  # stride 8 on 32 px
    for key, name in (("encoder_dcg", "encoder_dcg.onnx"), ("denoiser_step", "denoiser_step.onnx")):
        data = (onnx_folder / name).read_bytes()
        assert meta[key]["sha256"] == hashlib.sha256(data).hexdigest() and meta[key]["bytes"] == len(data)


def test_onnx_backend_predicts_like_torch(onnx_folder, tmp_path):
    images = _images(tmp_path / "imgs", 5)
    ref = Predictor.load(onnx_folder, device="cpu").predict(images, batch_size=3)
    onnx_p = Predictor.load(onnx_folder, backend="onnx")
    assert type(onnx_p.module.model).__name__ == "OnnxNetwork"
    got = onnx_p.predict(images, batch_size=3)  # 3 = one padded chunk of 2 and one of 1, then one of 2
    assert len(got) == len(ref) == 5
    assert len({tuple(map(tuple, r.roi_boxes)) for r in ref}) > 1  # the images' ROIs differ: a real check
    for a, b in zip(ref, got):
        assert a.id == b.id and a.label == b.label and a.refer == b.refer
        assert np.allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-3)
        assert np.allclose(list(a.prior_probs.values()), list(b.prior_probs.values()), atol=1e-4)
        assert a.roi_boxes == b.roi_boxes
        assert a.saliency.shape == b.saliency.shape == (4, 4)
        assert np.abs(a.saliency - b.saliency).max() < 1e-4
        assert np.allclose(a.roi_attention, b.roi_attention, atol=1e-4)
    # the DCG logits the OOD energy score reads, through the network interface, for 3 images (padded)
    x, _ = onnx_p._load_images(images[:3])
    torch_net = Predictor.load(onnx_folder, device="cpu").module.model
    g_t, g_o = torch_net.guide(x), onnx_p.module.model.guide(x)
    assert (g_t.z_fused - g_o.z_fused).abs().max() < 1e-4
    assert torch.equal(g_t.roi_boxes.long(), g_o.roi_boxes)
    assert (torch_net.encode(x) - onnx_p.module.model.encode(x)).abs().max() < 1e-4
    # the command line: the same labels, exit 0
    out = tmp_path / "pred.csv"
    rc = main(["predict", "--backend", "onnx", "--model", str(onnx_folder), "--output", str(out), *map(str, images)])
    assert rc == 0
    import csv

    rows = list(csv.DictReader(out.open()))
    assert [r["label"] for r in rows] == [a.label for a in ref]


def test_onnx_fast_path_gives_the_torch_fast_path(onnx_folder, tmp_path):
    """``--fast`` through the ONNX graphs: the point read-out alone, the torch backend's answer."""
    images = _images(tmp_path / "imgs", 3)
    ref = Predictor.load(onnx_folder, device="cpu", fast=True).predict(images)
    got = Predictor.load(onnx_folder, backend="onnx", fast=True).predict(images)
    full = Predictor.load(onnx_folder, backend="onnx").predict(images)
    for a, b, c in zip(ref, got, full):
        assert a.label == b.label == c.label and b.agreement is None and c.agreement is not None
        assert np.allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-3)
        assert np.allclose(list(c.probs.values()), list(b.probs.values()), atol=1e-5)


@pytest.mark.parametrize(
    "variant,over",
    [("C1", []), ("full", ["model.prior=zero"]), ("full", ["model.denoiser_input=paper"])],
    ids=["C1", "zero-prior", "paper-input"],
)
def test_onnx_network_follows_reverse_sample(tmp_path, variant, over):
    """The stand-in network, driven by the library's own reverse_sample, gives the PyTorch network's
    samples and point read-out: without a DCG (C1: zero prior, no guidance input), and when the
    guidance is not the prior."""
    import onnxruntime as ort

    from diffmic.config import load_config, model_kwargs
    from diffmic.diffusion.reverse import reverse_sample
    from diffmic.diffusion.schedule import NoiseSchedule
    from diffmic.inference.export import export_onnx
    from diffmic.inference.onnx_backend import OnnxNetwork
    from diffmic.nn.diffmic import DiffMIC

    over = [*TINY_MODEL, "data.image_size=32", "model.dcg_output_stride=8", f"model.variant={variant}", *over]
    cfg = load_config("cpu_v1", over)
    torch.manual_seed(0)
    model = DiffMIC(num_classes=3, **model_kwargs(cfg)).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    export_onnx(model, cfg, tmp_path, batch=2)
    net = OnnxNetwork(
        ort.InferenceSession(str(tmp_path / "encoder_dcg.onnx"), providers=["CPUExecutionProvider"]),
        ort.InferenceSession(str(tmp_path / "denoiser_step.onnx"), providers=["CPUExecutionProvider"]),
        variant=variant,
        num_classes=3,
        uses_dcg=model.uses_dcg,
    )
    schedule = NoiseSchedule.build(num_timesteps=50, beta_start=1e-4, beta_end=0.02)
    x = torch.randn(3, 3, 32, 32)  # not a multiple of the export batch
    kw = dict(sampler="ddim", steps=5, num_samples=2, ids=["a", "b", "c"], point_steps=3)
    ours = reverse_sample(net, schedule, x, **kw)
    ref = reverse_sample(model, schedule, x, **kw)
    assert (ours.y0 - ref.y0).abs().max() < 1e-4
    assert (ours.point - ref.point).abs().max() < 1e-4
    assert (ours.prior - ref.prior).abs().max() < 1e-5
    assert (ours.guidance is None) == (ref.guidance is None) == (variant == "C1")


def test_onnx_backend_starts_without_timm_torchvision_dynamo(onnx_folder, tmp_path):
    images = [str(p) for p in _images(tmp_path / "imgs", 2)]
    code = (
        "import sys, json\n"
        "from diffmic.inference import Predictor\n"
        f"r = Predictor.load({str(onnx_folder)!r}, backend='onnx').predict({images!r})\n"
        "heavy = sorted(m for m in ('timm', 'torchvision', 'torch._dynamo', 'onnx', 'lightning') if m in sys.modules)\n"
        "print(json.dumps({'labels': [x.label for x in r], 'heavy': heavy,\n"
        "                  'onnxruntime': 'onnxruntime' in sys.modules}))\n"
    )
    env = {**ONE_THREAD_ENV, "PYTHONPATH": str(SRC)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == [] and got["onnxruntime"]
    assert len(got["labels"]) == 2


def test_changed_graph_is_refused(onnx_folder, tmp_path):
    m = _copy(onnx_folder, tmp_path / "m")
    g = m / "denoiser_step.onnx"
    data = bytearray(g.read_bytes())
    data[len(data) // 2] ^= 0xFF
    g.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"denoiser_step\.onnx.*SHA-256"):
        Predictor.load(m, backend="onnx")
    g.write_bytes(bytes(data[:-10]))  # truncated: the size differs
    with pytest.raises(ExportError, match=r"denoiser_step\.onnx.*bytes"):
        Predictor.load(m, backend="onnx")


def test_graph_with_external_data_is_refused(onnx_folder, tmp_path):
    import onnx

    m = _copy(onnx_folder, tmp_path / "m")
    g = m / "encoder_dcg.onnx"
    model = onnx.load(str(g))
    onnx.save_model(model, str(g), save_as_external_data=True, location="outside.bin", size_threshold=0)
    assert (m / "outside.bin").is_file()
    _rehash(m, "encoder_dcg", "encoder_dcg.onnx")  # config.json vouches for it: only the reference is wrong
    with pytest.raises(ExportError, match=r"encoder_dcg\.onnx.*external"):
        Predictor.load(m, backend="onnx")


def test_unchecked_or_missing_graphs_are_refused(onnx_folder, tmp_path, capsys):
    m = _copy(onnx_folder, tmp_path / "m")
    meta = json.loads((m / "config.json").read_text())
    for key in ("encoder_dcg", "denoiser_step"):  # as exported before the hashes were recorded
        del meta["onnx"][key]["sha256"], meta["onnx"][key]["bytes"]
    (m / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="diffmic export --onnx"):
        Predictor.load(m, backend="onnx")
    # a folder without graphs: exit 2 from the command line, with the reason and no traceback
    plain = _copy(onnx_folder, tmp_path / "plain")
    meta = json.loads((plain / "config.json").read_text())
    del meta["onnx"]
    (plain / "config.json").write_text(json.dumps(meta))
    img = _images(tmp_path / "imgs", 1)[0]
    assert main(["predict", "--backend", "onnx", "--run", str(plain), str(img)]) == 2
    err = capsys.readouterr().err
    assert "no ONNX graphs" in err and "diffmic export --onnx" in err and "Traceback" not in err
    with pytest.raises(ExportError, match="runs on the CPU"):
        Predictor.load(onnx_folder, backend="onnx", device="meta")
    with pytest.raises(ExportError, match="unknown backend"):
        Predictor.load(onnx_folder, backend="tensorrt")


def test_plain_classifier_folder_is_refused(onnx_folder, tmp_path):
    """A `basic` / `dcg` variant has no graphs: a clear error, not a network build or an ONNX failure."""
    for variant in ("basic", "dcg"):
        m = _copy(onnx_folder, tmp_path / variant)
        meta = json.loads((m / "config.json").read_text())
        meta["config"]["model"]["variant"] = meta["architecture"]["variant"] = variant
        (m / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ExportError, match=f"variant '{variant}' is a plain classifier.*backend='torch'"):
            Predictor.load(m, backend="onnx")
