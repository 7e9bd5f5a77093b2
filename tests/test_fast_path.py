"""The fast path (``Predictor.load(..., fast=True)``, ``diffmic predict|serve --fast``, issue 27.5):
no reverse samples are drawn, and everything that does not need them is the full path's: the class,
the calibrated probabilities, the prediction set, the fitted referral and the out-of-distribution
flag. The sample agreement, spread and t-test are left out, the denoiser runs only the point
read-out's calls, and a model that needs the samples for its prediction or its flag is refused."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from diffmic.cli import main
from diffmic.diffusion.reverse import reverse_sample
from diffmic.inference import Predictor
from diffmic.inference.predictor import FastPathError

from _helpers import npz_fit_args, one_thread  # noqa: F401
from conftest import write_synthetic_npz

POINT_STEPS = 3
NUM_SAMPLES = 4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny 2-class `full` run, calibrated on its validation split (the temperature, the conformal
    sets, the referral threshold and an out-of-distribution flag)."""
    tmp = tmp_path_factory.mktemp("fast")
    splits = {"train": 32, "val": 16, "test": 8}
    npz = write_synthetic_npz(tmp / "synth.npz", splits, order="cycle", region="all", background=60.0, contrast=130.0)
    run = tmp / "run"
    extra = ("model.dcg_output_stride=8", f"eval.point_steps={POINT_STEPS}", f"eval.num_samples={NUM_SAMPLES}")
    assert main(npz_fit_args(npz, run, tmp / "cache", *extra, "eval.ood_score=energy")) == 0
    assert main(["calibrate", "--run", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def images(run, tmp_path_factory) -> list[Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("fast_imgs")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(5):
        arr = (torch.rand(28, 28, 3, generator=g) * 255 * (0.3 + 0.15 * i)).clamp(0, 255).to(torch.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(arr.numpy()).save(p)
        paths.append(p)
    return paths


def test_fast_keeps_every_output_that_does_not_need_the_samples(run, images):
    full = Predictor.load(run, device="cpu")
    fast = Predictor.load(run, device="cpu", fast=True)
    assert full.module.calibration is not None and full.module.calibration["ood"]["score"] == "energy"
    a, b = full.predict(images, batch_size=2), fast.predict(images, batch_size=2)
    for x, y in zip(a, b):
        assert x.label == y.label and x.refer == y.refer and x.prediction_set == y.prediction_set
        for key in x.probs:
            assert y.probs[key] == pytest.approx(x.probs[key], abs=1e-6)
        assert y.confidence == pytest.approx(x.confidence, abs=1e-6)
        assert y.confidence_unscaled == pytest.approx(x.confidence_unscaled, abs=1e-6)
        assert x.ood == y.ood and y.ood_score == pytest.approx(x.ood_score, abs=1e-5)
        assert y.entropy == pytest.approx(x.entropy, abs=1e-6)
        # what needs the samples: present on the full path, absent on the fast one
        assert x.agreement is not None and x.spread is not None and x.ttest_p is not None
        assert y.agreement is None and y.spread is None and y.ttest_p is None and y.uncertain is None
    # the calibrated rule decides alone, so both paths state (and apply) the same one
    assert fast.referral_rule == full.referral_rule


def test_fast_runs_only_the_point_readouts_denoiser_calls(run, images):
    p = Predictor.load(run, device="cpu", fast=True)
    model = p.module.model
    calls: list[int] = []
    eps = model.eps

    def counting(feat, y_t, t, guide):
        calls.append(y_t.shape[0])
        return eps(feat, y_t, t, guide)

    model.eps = counting
    x, ids = p._load_images(images[:3])
    out = reverse_sample(model, p.module.schedule, x, **p.cfg.eval.reverse_kwargs(), ids=ids, draw_samples=False)
    assert calls == [3] * POINT_STEPS  # one batch of 3 images per call, no K-sample chains
    assert out.y0.shape == (3, 1, 2) and torch.equal(out.y0[:, 0], out.point)
    calls.clear()
    ref = reverse_sample(model, p.module.schedule, x, **p.cfg.eval.reverse_kwargs(), ids=ids)
    assert len(calls) > POINT_STEPS and NUM_SAMPLES * 3 in calls  # the full path draws the chains
    assert (ref.point - out.point).abs().max() < 1e-6


def test_draw_samples_false_needs_a_point_readout(run):
    p = Predictor.load(run, device="cpu")
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="point_steps"):
        reverse_sample(p.module.model, p.module.schedule, x, sampler="ddim", steps=3, draw_samples=False)


def test_a_model_that_predicts_by_its_samples_is_refused(run, images, capsys):
    with pytest.raises(FastPathError, match="point_steps=0"):
        Predictor.load(run, device="cpu", fast=True, point_steps=0)
    rc = main(["predict", "--run", str(run), "--fast", str(images[0]), "eval.point_steps=0"])
    err = capsys.readouterr().err
    assert rc == 2 and "point_steps=0" in err and "Traceback" not in err


def test_a_flag_that_scores_the_samples_spread_is_refused(run, tmp_path):
    import shutil

    from diffmic.training.checkpoint import store_calibration

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    ckpt = copy / "checkpoints" / "best.ckpt"
    calib = torch.load(ckpt, map_location="cpu", weights_only=False)["diffmic_calibration"]
    calib["ood"] = {**calib["ood"], "score": "spread"}
    store_calibration(ckpt, calib)
    with pytest.raises(FastPathError, match="spread"):
        Predictor.load(copy, device="cpu", fast=True)
    Predictor.load(copy, device="cpu")  # the full path computes the spread: accepted


def test_uncalibrated_fast_rule_is_the_threshold_alone(run):
    p = Predictor.load(run, device="cpu")
    p.module.calibration = None  # as a model that was never calibrated
    p.set_fast(False)
    assert f"its {NUM_SAMPLES} reverse-diffusion samples do not all agree" in p.referral_rule
    p.set_fast(True)
    assert "samples" not in p.referral_rule and "below 0.500" in p.referral_rule


def test_cli_fast_csv_and_page_leave_out_what_was_not_computed(run, images, tmp_path):
    out = tmp_path / "fast.csv"
    assert main(["predict", "--run", str(run), "--fast", "--output", str(out), *map(str, images)]) == 0
    rows = list(csv.DictReader(out.open()))
    full = tmp_path / "full.csv"
    assert main(["predict", "--run", str(run), "--output", str(full), *map(str, images)]) == 0
    ref = list(csv.DictReader(full.open()))
    assert "agreement" not in rows[0] and "spread" not in rows[0] and "ttest_p" not in rows[0]
    assert "agreement" in ref[0] and "ttest_p" in ref[0]
    for r, f in zip(rows, ref):
        assert (r["label"], r["refer"], r["set"]) == (f["label"], f["refer"], f["set"])
    from diffmic.inference.serve import render_result

    result = Predictor.load(run, device="cpu", fast=True).predict(images[:1])[0]
    page = render_result(result, b"png", 0.5)
    assert "no reverse samples drawn" in page and "id='agreement'" not in page
