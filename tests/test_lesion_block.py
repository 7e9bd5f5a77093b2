"""Explanations as numbers per run (issue 25 §4): test_metrics.json's `lesions` block, the same
measures as the report's lesion panel, from hand-made masks and boxes and on a tiny HAM10000-like
run with lesion masks."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffmic.cli import main
from diffmic.trust.lesions import (
    _mean_window_share,
    image_hits,
    lesion_mask_dir,
    mask_file,
    read_mask,
    summarise_hits,
)

from _helpers import TINY_MODEL, one_thread  # noqa: F401


@pytest.mark.parametrize("bh, bw", [(1, 1), (2, 3), (5, 5), (7, 2), (12, 12)])
def test_random_region_share_equals_the_mean_over_every_position(bh, bw):
    m = torch.as_tensor(np.random.default_rng(bh * 10 + bw).random((12, 12)) > 0.6, dtype=torch.float32)
    want = float(F.avg_pool2d(m[None, None].double(), (bh, bw), stride=1).mean())
    assert _mean_window_share(m, bh, bw) == pytest.approx(want, rel=1e-12)


def test_image_hits_maps_the_network_outputs_onto_a_hand_made_mask():
    # 12 x 10 image (W x H): the network sees columns 1..10 at 5 px, one input pixel = 2 x 2 original
    # pixels; the lesion is the left half of that square (original columns 1..5)
    mask = np.zeros((10, 12), dtype=bool)
    mask[:, 1:6] = True
    boxes = [[0, 0, 1, 1], [2, 3, 3, 4]]  # input px -> original (0, 1, 2, 3) on, (4, 7, 6, 9) off
    sal = np.zeros((5, 5))
    sal[1, 1] = 1.0  # peak -> crop pixel (2, 2) -> original column 3: on the lesion
    r = image_hits(mask, sal, boxes, image_size=5, tolerance=1)
    assert r["lesion_share"] == pytest.approx(0.5)
    assert r["roi_overlap"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert r["roi_overlap_random"] == pytest.approx(0.5)  # a 2x2 box over the 9 x positions: 4.5 / 9
    assert r["roi_center_hit"] == pytest.approx(0.5)
    assert r["roi_center_hit_random"] == pytest.approx(5 / 9)
    assert r["peak_hit"] == 1.0 and r["pointing_hit"] == 1.0
    sal2 = np.zeros((5, 5))
    sal2[1, 4] = 1.0  # peak at crop column 8..9: off the lesion, 3 columns from its edge
    r2 = image_hits(mask, sal2, boxes, image_size=5, tolerance=1)
    assert r2["peak_hit"] == 0.0 and r2["pointing_hit"] == 0.0
    assert r2["pointing_hit_random"] == pytest.approx(0.6)  # the dilated lesion: crop columns 0..5


def test_the_summary_is_the_mean_per_measure():
    rows = [
        {"lesion_share": 0.2, "peak_hit": 1.0, "energy_on_lesion": float("nan")},
        {"lesion_share": 0.4, "peak_hit": 0.0, "energy_on_lesion": 0.5},
    ]
    s = summarise_hits(rows)
    assert s == {
        "num_images": 2,
        "saliency_class": "true class",
        "lesion_share": pytest.approx(0.3),
        "peak_hit": 0.5,
        "energy_on_lesion": 0.5,  # an image with no saliency mass has no share: left out
    }
    assert summarise_hits([]) is None


def test_masks_are_found_for_ham10000_only_and_a_bad_one_is_named(tmp_path):
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / "ISIC_1_segmentation.png").write_bytes(b"not a png")
    d = lesion_mask_dir("ham10000", tmp_path)
    assert d == tmp_path / "masks" and lesion_mask_dir("folder", tmp_path) is None
    assert mask_file(d, "ISIC_2") is None
    with pytest.raises(ValueError, match=r"lesion mask '.*ISIC_1_segmentation.png' cannot be read"):
        read_mask(mask_file(d, "ISIC_1"))


# ------------------------------------------------------------------------- a tiny HAM10000-like run

DX = ("mel", "nv", "bcc", "akiec", "bkl", "df", "vasc")


def fake_ham(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    """HAM10000's layout: images/ISIC_*.jpg (48 x 40, a coloured disc per class on noise), the
    metadata CSV, and masks/ISIC_*_segmentation.png (the disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:48]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    n = 0
    for c, dx in enumerate(DX):
        for _ in range(per_class):
            n += 1
            image_id = f"ISIC_{n:07d}"
            img = rng.integers(0, 80, (40, 48, 3)).astype(np.uint8)
            cy, cx, rad = rng.integers(12, 28), rng.integers(14, 34), rng.integers(5, 10)
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 < rad**2
            img[disc] = (30 * c + 40, 200 - 20 * c, 120)
            Image.fromarray(img).save(root / "images" / f"{image_id}.jpg", quality=95)
            Image.fromarray((disc * 255).astype(np.uint8)).save(root / "masks" / f"{image_id}_segmentation.png")
            rows.append({"lesion_id": f"HAM_{n:07d}", "image_id": image_id, "dx": dx})
    with open(root / "HAM10000_metadata.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["lesion_id", "image_id", "dx"])
        w.writeheader()
        w.writerows(rows)
    return root


@pytest.mark.slow
def test_test_writes_the_lesion_block_the_report_shows(tmp_path, one_thread):  # noqa: F811
    from diffmic.config import load_config
    from diffmic.inference.explain import lesion_check
    from diffmic.training.checkpoint import load_module
    from diffmic.training.run import build_datamodule

    root = fake_ham(tmp_path / "ham")
    run = tmp_path / "run"
    args = [
        "fit",
        "--config",
        "cpu_v1",
        "data.dataset=ham10000",
        f"data.root={root}",
        "data.split=random",
        "data.image_size=32",
        "data.batch_size=16",
        f"data.cache_dir={tmp_path / 'cache'}",
        *TINY_MODEL,
        "train.epochs=1",
        "train.dcg_warmup_epochs=1",
        "eval.bootstrap_resamples=20",
        f"run.dir={run}",
    ]
    assert main(args) == 0
    gone = sorted(json.loads((run / "split.json").read_text())["splits"]["test"])[:2]
    for image_id in gone:  # two test images without a mask
        (root / "masks" / f"{image_id}_segmentation.png").unlink()
    assert main(["test", "--run", str(run)]) == 0
    m = json.loads((run / "test_metrics.json").read_text())
    block = m["lesions"]
    with open(run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert not any(k.startswith("_") for k in rows[0])  # the per-image hits stay out of the CSV
    with_mask = [r["id"] for r in rows if (root / "masks" / f"{r['id']}_segmentation.png").is_file()]
    assert block["num_images"] == len(with_mask) == len(rows) - len(gone)
    assert block["saliency_class"] == "true class" and block["masks"] == str(root / "masks")
    # the report's own computation over the same images gives the same numbers
    cfg = load_config(run / "config.yaml")
    module = load_module(run / "checkpoints" / "best.ckpt").eval()
    dm = build_datamodule(cfg)
    dm.setup("test")
    ds = dm.get_dataset("test")
    # (in batches of the test loader's size: a near-tie of a saliency peak of this barely trained model
    # can flip with the batch's float reductions)
    report = lesion_check(module, ds, list(range(len(ds))), cfg, batch_size=16)
    assert set(report) == set(block) - {"masks"}
    for k, v in report.items():
        assert block[k] == (v if isinstance(v, str) else pytest.approx(v, rel=1e-6, abs=1e-9)), k


def test_the_experiment_table_reads_the_lesion_block(tmp_path):
    """Two seeds with a `lesions` block: the table's columns are their mean ± sd; a grid without
    masks gets no lesion columns."""
    from diffmic.experiment import Cell, Grid, summarise

    cells = []
    for seed, roi, peak, point in ((1, 0.6, 0.5, 0.7), (2, 0.8, 0.7, 0.9)):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "predictions.csv").write_text("id,label,p_a,p_b\nx1,0,0.9,0.1\nx2,1,0.2,0.8\nx3,1,0.6,0.4\n")
        block = {"num_images": 3, "roi_overlap": roi, "peak_hit": peak, "pointing_hit": point}
        (run / "test_metrics.json").write_text(json.dumps({"lesions": block}))
        cells.append(Cell("ham", "full", seed, run, None, []))
    summarise(Grid(tmp_path / "out", None, cells, ["full"], ["ham"]), n_boot=10)
    row = next(csv.DictReader(open(tmp_path / "out" / "summary.csv")))
    sd = float(np.std([0.6, 0.8], ddof=1))
    assert row["roi_on_lesion"] == f"0.700 ± {sd:.3f}"
    assert row["peak_on_lesion"] == f"0.600 ± {sd:.3f}" and row["pointing"] == f"0.800 ± {sd:.3f}"
    cells_csv = list(csv.DictReader(open(tmp_path / "out" / "cells.csv")))
    assert [float(r["roi_on_lesion"]) for r in cells_csv] == [0.6, 0.8]
    for c in cells:
        (c.run_dir / "test_metrics.json").write_text("{}")
    summarise(Grid(tmp_path / "out2", None, cells, ["full"], ["ham"]), n_boot=10)
    assert "roi_on_lesion" not in next(csv.DictReader(open(tmp_path / "out2" / "summary.csv")))
