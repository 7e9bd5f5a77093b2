"""Determinism: the same seed gives the same run, and a prediction for an image does not depend on
the batch it is in, its position, or whether image features are cached."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from diffmic.cli import main
from diffmic.diffusion.reverse import per_image_noise, reverse_sample
from diffmic.diffusion.samplers import num_noise_draws
from diffmic.diffusion.schedule import NoiseSchedule
from diffmic.nn.diffmic import DiffMIC
from diffmic.training.checkpoint import read_checkpoint

from _helpers import TINY_MODEL, one_thread  # noqa: F401

FAST = [
    "data.dataset=medmnist",
    "data.subset=32",
    "data.image_size=32",
    "data.batch_size=16",
    *TINY_MODEL,
    "train.epochs=1",
    "train.dcg_warmup_epochs=1",
]
pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- same seed, same run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, synth_npz):
    """The same config and seed, trained twice: once in this process, once in a fresh one (on the
    generated .npz of conftest.py)."""
    tmp = tmp_path_factory.mktemp("det")
    cache = tmp / "cache"
    runs = [tmp / "a", tmp / "b"]
    args = [
        ["fit", "--config", "cpu_v1", *FAST, f"data.root={synth_npz}", f"data.cache_dir={cache}", f"run.dir={r}"]
        for r in runs
    ]
    assert main(args[0]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "diffmic.cli", *args[1]], capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stderr[-3000:]
    for r in runs:
        assert main(["test", "--run", str(r)]) == 0
    return runs


def test_same_seed_gives_identical_weights_and_test_metrics(two_runs):
    a, b = two_runs
    for name in ("last.ckpt", "best.ckpt"):
        sa = read_checkpoint(a / "checkpoints" / name)["state_dict"]
        sb = read_checkpoint(b / "checkpoints" / name)["state_dict"]
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    ma, mb = (json.loads((r / "test_metrics.json").read_text()) for r in (a, b))
    for m in (ma, mb):  # where the run lives and how long the test took differ; nothing else may
        m.pop("checkpoint"), m.pop("provenance")
    assert ma == mb
    assert (a / "predictions.csv").read_text() == (b / "predictions.csv").read_text()


# ------------------------------------------------------------- per-image sampling, batch-independent
T = 100


# 128 px with 32 px ROI cells: the 4x4 saliency map of the stride-32 backbone is the ROI grid itself
# (as at 224 px in the paper). At 32 px the map is 1x1, and ROI selection on it is decided by
# float round-off (see test_roi_selection_on_a_constant_map_is_not_decided_by_round_off).
SIZE, CROP = 128, 32


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiffMIC(
        3,
        variant="full",
        encoder="resnet10_tiny",
        hidden_dim=32,
        num_layers=2,
        num_timesteps=T,
        dcg_global="resnet10_tiny",
        dcg_local="resnet10_tiny",
        num_rois=3,
        crop_size=CROP,
    )
    with torch.no_grad():  # non-trivial BN statistics, then freeze them
        m.train()
        for _ in range(2):
            m.guide(torch.randn(8, 3, SIZE, SIZE))
            m.encode(torch.randn(8, 3, SIZE, SIZE))
    return m.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 3, SIZE, SIZE, generator=g), [f"patient{i:02d}.png" for i in range(7)]


SCHED = NoiseSchedule.build("linear", T)
SAMPLERS = [("ddim", 5, 0.0), ("ddim", 5, 1.0), ("truncated", 10, 0.0), ("ddpm", None, 0.0)]
# Convolutions on a CPU may round differently for different batch sizes (a different kernel
# blocking), so rows agree to float32 round-off, not bit for bit; the noise itself is identical.
TOL = dict(rtol=1e-4, atol=1e-5)


def _run(model, x, ids=None, **kw):
    return reverse_sample(model, SCHED, x, num_samples=2, seed=7, ids=ids, **kw).y0


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_prediction_independent_of_batch_size_and_order(model, images, sampler, steps, eta):
    x, ids = images
    kw = dict(sampler=sampler, steps=steps, eta=eta)
    full = _run(model, x, ids, **kw)  # [7, 2, 3]
    assert torch.isfinite(full).all()
    for bs in (1, 3):
        parts = torch.cat([_run(model, x[i : i + bs], ids[i : i + bs], **kw) for i in range(0, len(ids), bs)])
        torch.testing.assert_close(parts, full, **TOL)
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(3))
    shuffled = _run(model, x[perm], [ids[i] for i in perm], **kw)
    torch.testing.assert_close(shuffled, full[perm], **TOL)
    assert torch.equal(shuffled.argmax(-1), full[perm].argmax(-1))


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_same_per_row_noise_gives_same_rows_without_ids(model, images, sampler, steps, eta):
    """Without ids, a caller-supplied noise tensor decides the result: each row of the output
    depends only on its image and its rows of noise."""
    x, ids = images
    K, C = 2, 3
    draws = num_noise_draws(sampler, T, steps, eta)
    noise = torch.randn(draws, len(ids) * K, C, generator=torch.Generator().manual_seed(5))
    kw = dict(sampler=sampler, steps=steps, eta=eta)
    full = _run(model, x, noise=noise, **kw)
    perm = torch.tensor([4, 0, 6, 2])
    rows = (perm[:, None] * K + torch.arange(K)).reshape(-1)
    part = _run(model, x[perm], noise=noise[:, rows], **kw)
    torch.testing.assert_close(part, full[perm], **TOL)
    # and the ids path is exactly this with the per-image noise
    per_id = per_image_noise(ids, 7, draws, K, C, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(_run(model, x, noise=per_id, **kw), _run(model, x, ids, **kw), rtol=0, atol=0)


def test_shared_generator_would_depend_on_the_batch(model, images):
    """The control: with one generator for the batch (no ids), an image's noise depends on the
    batch it is in, so the batch-size test above is not trivially satisfied."""
    x, ids = images
    full = _run(model, x, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=5, eta=1.0)
    tail = _run(model, x[3:], generator=torch.Generator().manual_seed(0), sampler="ddim", steps=5, eta=1.0)
    assert not torch.allclose(tail, full[3:], **TOL)


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS[:3])
@pytest.mark.parametrize("K", [1, 3])
def test_cached_features_equal_reencoding(model, images, sampler, steps, eta, K):
    """The fast path (image features once per image) and the released algorithm (encoder at every
    reverse step) give the same samples for the same noise."""
    x, ids = images
    kw = dict(sampler=sampler, steps=steps, eta=eta, num_samples=K, ids=ids, seed=11)
    fast = reverse_sample(model, SCHED, x, **kw)
    slow = reverse_sample(model, SCHED, x, reencode=True, **kw)
    torch.testing.assert_close(fast.y0, slow.y0, **TOL)
    assert torch.equal(fast.y0.mean(1).argmax(-1), slow.y0.mean(1).argmax(-1))
    torch.testing.assert_close(fast.prior, slow.prior, rtol=0, atol=0)


def test_predictor_output_does_not_depend_on_batch_size(tmp_path):
    """Through the real Predictor on image files: batch size 1, 2 or 5 and the order of the files
    give the same results (K = 3 stochastic DDIM samples per image)."""
    from PIL import Image

    from diffmic.config import load_config
    from diffmic.inference.predictor import Predictor
    from diffmic.training.module import DiffMICModule

    cfg = load_config(
        "cpu_v1",
        [
            f"data.image_size={SIZE}",
            f"model.crop_size={CROP}",
            "model.num_rois=3",
            "model.encoder=resnet10_tiny",
            "model.dcg_global=resnet10_tiny",
            "model.dcg_local=resnet10_tiny",
            "model.hidden_dim=32",
            "diffusion.num_timesteps=100",
            "eval.sampler=ddim",
            "eval.steps=4",
            "eval.eta=1.0",
            "eval.num_samples=3",
        ],
    )
    torch.manual_seed(0)
    pred = Predictor(DiffMICModule(cfg.to_dict(), 2, ["benign", "malignant"]).eval(), device="cpu")
    g = torch.Generator().manual_seed(2)
    paths = []
    for i in range(5):
        p = tmp_path / f"scan{i}.png"
        Image.fromarray(torch.randint(0, 256, (48 + 8 * i, 64, 3), generator=g, dtype=torch.uint8).numpy()).save(p)
        paths.append(p)
    ref = {r.id: r for r in pred.predict(paths, batch_size=5)}
    for bs in (1, 2):
        for r in pred.predict(paths[::-1], batch_size=bs):
            assert r.label == ref[r.id].label
            assert r.probs == pytest.approx(ref[r.id].probs, abs=1e-5)
            assert r.agreement == ref[r.id].agreement and r.roi_boxes == ref[r.id].roi_boxes


def test_roi_selection_on_a_constant_map_is_not_decided_by_round_off():
    from diffmic.nn.guidance import select_rois

    for v in (0.3, 3.7, 41.2, -123.4):
        r = select_rois(torch.full((1, 3, 1, 1), v), (4, 4), 3)
        assert r.selection_map.abs().max() == 0, v  # "a constant channel gives zeros"
