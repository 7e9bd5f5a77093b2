"""`diffmic calibrate / test / predict / report` on a tiny synthetic run: the trust blocks in
test_metrics.json, the calibration stored in the checkpoint, and the HTML report rendered in
headless Chromium (skipped without Chromium unless CI=true)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.cli import main
from diffmic.trust.calibration import ece

from _helpers import TINY_MODEL, one_thread  # noqa: F401
from conftest import DISCS, write_synthetic_folder

PANELS = [
    "metrics",
    "confusion",
    "per_class",
    "reliability",
    "coverage_curve",
    "calibrators",
    "conformal",
    "ood",
    "tsne",
    "lesions",
    "gallery",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread) -> Path:  # noqa: F811
    """Three classes of synthetic 48x40 images (a coloured disc on noise), a one-epoch tiny model."""
    tmp = tmp_path_factory.mktemp("trust")
    root = tmp / "imgs"
    names = ("red", "green", "blue")
    write_synthetic_folder(root, (40, 40, 40), (40, 48), names, stem="{name}_{i:03d}", seed=0, **DISCS)
    run = tmp / "run"
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            "data.image_size=32",
            "data.batch_size=16",
            *TINY_MODEL,
            "data.dataset=folder",
            f"data.root={root}",
            "data.split=random",
            "data.test_fraction=0.3",
            "data.val_fraction=0.3",
            f"data.cache_dir={tmp / 'cache'}",
            f"run.dir={run}",
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            "eval.num_samples=4",
            "eval.bootstrap_resamples=50",
        ]
    )
    assert rc == 0
    return run


def test_test_writes_trust_blocks_and_stores_calibration(tiny_run):
    assert main(["test", "--run", str(tiny_run)]) == 0
    m = json.loads((tiny_run / "test_metrics.json").read_text())
    for block, keys in {
        "calibration": {"temperature", "ece", "ece_unscaled", "nll", "brier"},
        "uncertainty": {"pavpu"},
        "conformal": {"level", "coverage", "mean_set_size"},
        "referral": {"referred_fraction", "accuracy_kept"},
    }.items():
        assert keys <= set(m[block]), block
    with open(tiny_run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == m["num_images"]
    names = m["class_names"]
    labels = torch.tensor([int(r["label"]) for r in rows])
    # the blocks agree with the per-image rows
    covered = np.mean([names[int(r["label"])] in r["set"].split("|") for r in rows])
    assert m["conformal"]["coverage"] == pytest.approx(covered)
    assert m["conformal"]["mean_set_size"] == pytest.approx(np.mean([int(r["set_size"]) for r in rows]))
    assert m["referral"]["referred_fraction"] == pytest.approx(np.mean([int(r["refer"]) for r in rows]))
    correct = np.array([r["label"] == r["pred"] for r in rows])
    unc = np.array([int(r["uncertain"]) for r in rows]).astype(bool)
    assert m["uncertainty"]["pavpu"] == pytest.approx(((correct & ~unc).sum() + (~correct & unc).sum()) / len(rows))
    # calibrated probabilities are softmax(log p_unscaled / T), then (the cpu preset's `auto` may
    # choose it) the top-label isotonic map: top value = the knots' linear interpolation (numpy) unless
    # held up to keep the arg-max, other classes in their temperature-scaled ratios; arg-max unchanged
    T = m["calibration"]["temperature"]
    raw = torch.tensor([[float(r[f"unscaled_p_{n}"]) for n in names] for r in rows], dtype=torch.float64)
    cal = torch.tensor([[float(r[f"p_{n}"]) for n in names] for r in rows], dtype=torch.float64)
    scaled = torch.softmax(raw.clamp_min(1e-12).log() / T, -1)
    ck = torch.load(tiny_run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    knots = ck["diffmic_calibration"].get("isotonic")
    assert m["calibration"]["calibrator"] == ("temperature+isotonic" if knots else "temperature")
    assert torch.equal(cal.argmax(-1), raw.argmax(-1))
    if not knots:
        assert torch.allclose(scaled, cal, atol=1e-6)
    else:
        conf_s, top = scaled.max(-1)
        want = np.interp(conf_s.numpy(), knots["x"], knots["y"])
        got = cal.gather(1, top[:, None]).flatten().numpy()
        assert (got >= want * (1 - 1e-6) - 1e-6).all()  # never below the map
        others = scaled.clone().scatter_(1, top[:, None], 0)
        rest = cal.clone().scatter_(1, top[:, None], 0)
        share = others / others.sum(-1, keepdim=True)
        assert torch.allclose(rest, share * (1 - cal.gather(1, top[:, None])), atol=1e-6)
    nll = float(torch.nn.functional.nll_loss(cal.clamp_min(1e-12).log(), labels))
    assert m["calibration"]["nll"] == pytest.approx(nll, rel=1e-6)
    assert {"acc", "ece", "nll", "brier", "pavpu", "conformal_coverage", "accuracy_kept"} <= set(m["ci"])
    # the intervals are the percentile bootstrap of these rows' statistics, at the stated level,
    # resample count and seed (redrawn here; the intervals' coverage: test_bootstrap_coverage.py)
    seed = int(re.search(r"50 resamples, seed (\d+), 95 %", m["ci_method"]).group(1))
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randint(0, len(rows), (len(rows),), generator=g) for _ in range(50)]
    right = torch.from_numpy(correct).double()
    for key, stat in {
        "acc": lambda i: float(right[i].mean()),
        "ece_unscaled": lambda i: ece(raw[i], labels[i]),  # the ECE itself: test_trust.py
        "nll": lambda i: float(torch.nn.functional.nll_loss(cal[i].clamp_min(1e-12).log(), labels[i])),
    }.items():
        values = torch.tensor([stat(i) for i in draws], dtype=torch.float64)
        want = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        assert m["ci"][key] == pytest.approx(want, rel=1e-5, abs=1e-15), key
    assert m["ci"]["ece_unscaled"][0] < m["ci"]["ece_unscaled"][1]  # a spread to check on this run
    assert (tiny_run / "reliability.png").is_file()
    # stored in the checkpoint, read back by the Predictor
    assert ck["diffmic_calibration"]["temperature"] == pytest.approx(T)
    assert ck["diffmic_calibration"]["fitted_on"] == "val"


def test_predict_gives_sets_flags_and_full_resolution_explanations(tiny_run, tmp_path):
    cfg_root = Path(
        next(
            line.split(":", 1)[1].strip()
            for line in (tiny_run / "config.yaml").read_text().splitlines()
            if line.strip().startswith("root:")
        )
    )
    img = min((cfg_root / "red").glob("*.png"))
    out = tmp_path / "p.csv"
    assert (
        main(["predict", "--run", str(tiny_run), str(img), "--output", str(out), "--explain", str(tmp_path / "ex")])
        == 0
    )
    with open(out, newline="") as fh:
        row = next(csv.DictReader(fh))
    assert row["set"] and row["uncertain"] in ("0", "1") and row["confidence_unscaled"]
    png = Image.open(tmp_path / "ex" / f"{img.stem}.png")
    assert png.size[0] >= 2 * 48 and png.size[1] >= 40  # drawn at the original 48x40, two panels


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    drv = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        exe = None
    if exe is None or drv is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                "CI=true but chromium, chromedriver or selenium is missing (apt-get install chromium chromium-driver; pip install selenium)"
            )
        pytest.skip("headless Chromium (chromium, chromedriver, selenium) not installed")
    return exe, drv


def test_report_has_every_panel_and_renders_in_chromium(tiny_run, tmp_path):
    pytest.importorskip("sklearn")
    if (
        not (tiny_run / "test_metrics.json").exists()
        or "calibration" not in (tiny_run / "test_metrics.json").read_text()
    ):
        assert main(["test", "--run", str(tiny_run)]) == 0
    out = tmp_path / "report.html"
    assert main(["report", str(tiny_run), "--output", str(out), "--max-images", "60", "--gallery", "2"]) == 0
    html = out.read_text()
    for pid in PANELS:
        assert f"id='{pid}'" in html, pid
    assert "http://" not in html and "https://" not in html  # self-contained
    assert html.count("data:image/png;base64,") >= 8

    exe, drv = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1280,900",
    ):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(drv), options=opts)
    try:
        driver.get(out.resolve().as_uri())
        info = driver.execute_script("""
            const out = {};
            const W = document.documentElement.clientWidth;
            for (const p of document.querySelectorAll('div.panel')) {
              const r = p.getBoundingClientRect();
              const imgs = [...p.querySelectorAll('img')];
              out[p.id] = {height: r.height, width: r.width, left: r.left, right: r.right, W: W,
                           imgs: imgs.length,
                           broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
                           clipped: imgs.filter(i => i.getBoundingClientRect().right > W + 1
                                                    || i.getBoundingClientRect().left < -1).length};
            }
            out.__scrollW = document.documentElement.scrollWidth;
            return out;""")
        h = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1280, min(int(h) + 100, 16000))
        shot = Path(os.environ.get("DIFFMIC_REPORT_SCREENSHOT", tmp_path / "report.png"))
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    for pid in PANELS:
        p = info[pid]
        assert p["height"] > 20 and p["broken"] == 0 and p["clipped"] == 0, (pid, p)
        assert p["right"] <= p["W"] + 1, (pid, p)
    for pid in ("confusion", "reliability", "coverage_curve", "conformal", "tsne"):
        assert info[pid]["imgs"] >= 1, pid
    assert info["gallery"]["imgs"] >= 2
    assert info["__scrollW"] <= 1280 + 1  # nothing spills out sideways
    assert Image.open(shot).size[1] > 900
