"""End to end through the real `diffmic` command on small real data (CPU, tiny networks)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.cli import main

from _helpers import DATA, TINY_MODEL, need as _need  # noqa: E402

# A shrunken CPU config: 32 px, tiny backbones, a narrow denoiser and a short schedule of epochs.
TINY = ["data.image_size=32", "data.batch_size=32", *TINY_MODEL]

METRIC_KEYS = {
    "acc", "balanced_acc", "f1", "kappa", "auroc", "precision_per_class", "recall_per_class",
    "f1_per_class", "confusion_matrix", "num_images", "class_names", "checkpoint",
}



@pytest.fixture(scope="module")
def breast_run(tmp_path_factory) -> Path:
    """Train once on BreastMNIST (real ultrasound, 2 classes) and share the run folder."""
    npz = _need("breastmnist/breastmnist.npz")
    tmp = tmp_path_factory.mktemp("breast")
    run = tmp / "run"
    rc = main([
        "fit", "--config", "cpu", *TINY,
        "data.dataset=medmnist", f"data.root={npz}", f"data.cache_dir={tmp / 'cache'}",
        f"run.dir={run}", "train.epochs=4", "train.dcg_warmup_epochs=2",
    ])
    assert rc == 0
    return run


def test_fit_writes_run_folder(breast_run):
    for name in ("config.yaml", "fit_summary.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (breast_run / name).exists(), name
    summary = json.loads((breast_run / "fit_summary.json").read_text())
    assert summary["selected_on"] == "val" and summary["monitor"] == "val/acc"
    assert (breast_run / "logs" / "metrics.csv").exists()


def test_test_metrics_complete_and_beat_chance(breast_run):
    assert main(["test", "--run", str(breast_run)]) == 0
    m = json.loads((breast_run / "test_metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["num_images"] == 156  # the official BreastMNIST test split
    cm = np.array(m["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == 156
    assert abs(m["acc"] - np.trace(cm) / cm.sum()) < 1e-6  # dataset-level accuracy
    # Beats chance: ranking better than random, and above the uniform-guess accuracy.
    assert m["auroc"] > 0.6, m
    assert m["acc"] > 0.5, m
    with open(breast_run / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 156
    for r in rows[:10]:
        p = [float(r[k]) for k in r if k.startswith("p_")]
        assert len(p) == 2 and abs(sum(p) - 1) < 1e-4
        assert int(r["pred"]) == int(np.argmax(p))
    # the referral summary agrees with the per-image rows
    ref = m["referral"]
    refer = np.array([int(r["refer"]) for r in rows])
    correct = np.array([r["label"] == r["pred"] for r in rows])
    assert abs(ref["referred_fraction"] - refer.mean()) < 1e-9
    if refer.any() and (~refer.astype(bool)).any():
        assert abs(ref["accuracy_kept"] - correct[refer == 0].mean()) < 1e-9
        assert abs(ref["accuracy_referred"] - correct[refer == 1].mean()) < 1e-9
    assert abs(ref["accuracy_at_coverage"]["1"] - m["acc"]) < 1e-6
    assert 0.0 <= ref["aurc"] <= 1.0
    assert (breast_run / "risk_coverage.png").stat().st_size > 1000


def test_ddim_and_truncated_samplers_from_one_checkpoint(breast_run, tmp_path):
    for over in (["eval.sampler=truncated", "eval.steps=20"], ["eval.sampler=ddim", "eval.steps=3", "eval.num_samples=4"]):
        assert main(["test", "--run", str(breast_run), *over]) == 0
        m = json.loads((breast_run / "test_metrics.json").read_text())
        assert m["sampler"] == over[0].split("=")[1]
        assert 0.0 <= m["acc"] <= 1.0


def test_predict_cli_on_images(breast_run, tmp_path, capsys):
    arr = np.load(DATA / "breastmnist" / "breastmnist.npz")["test_images"][:3]
    paths = []
    for i, a in enumerate(arr):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    out = tmp_path / "preds.csv"
    rc = main(["predict", "--run", str(breast_run), *paths, "--output", str(out),
               "--explain", str(tmp_path / "explain"), "eval.num_samples=3"])
    assert rc == 0
    rows = list(csv.DictReader(open(out)))
    assert [Path(r["id"]).name for r in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(r["refer"] in ("0", "1") for r in rows)
    assert len(list((tmp_path / "explain").glob("*.png"))) == 3


def test_ham10000_subset_fit_test_predict(tmp_path):
    root = _need("ham10000")
    run = tmp_path / "ham"
    rc = main([
        "fit", "--config", "demo_cpu", *TINY, f"data.root={root}", "data.subset=160",
        f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}", "train.epochs=1", "train.dcg_warmup_epochs=1",
    ])
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    m = json.loads((run / "test_metrics.json").read_text())
    assert METRIC_KEYS <= set(m)
    assert m["class_names"] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    assert len(m["confusion_matrix"]) == 7
    img = root / "images" / "ISIC_0024306.jpg"
    assert main(["predict", "--run", str(run), str(img)]) == 0


def test_unseen_class_folder_trains_with_cpu_preset(tmp_path):
    """A folder of class sub-folders never seen before: classes inferred, no code change."""
    npz = _need("breastmnist/breastmnist.npz")
    d = np.load(npz)
    root = tmp_path / "my_images"
    imgs, labels = d["train_images"], np.asarray(d["train_labels"]).reshape(-1)
    names = {0: "malignant", 1: "benign_or_normal"}
    for i in range(160):
        p = root / names[int(labels[i])] / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(p)
    run = tmp_path / "run"
    rc = main(["fit", "--config", "cpu", *TINY, "data.dataset=folder", f"data.root={root}", "data.split=random",
               f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}", "train.epochs=1", "train.dcg_warmup_epochs=1"])
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    m = json.loads((run / "test_metrics.json").read_text())
    assert m["class_names"] == ["benign_or_normal", "malignant"]
    assert len(m["confusion_matrix"]) == 2


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["fit", "--config", "cpu", "data.rooot=/x"]) == 2
    err = capsys.readouterr().err
    assert "data.rooot" in err and "data.root" in err
    assert main(["fit", "--config", "cpu", "train.epochs=many"]) == 2
    assert "train.epochs" in capsys.readouterr().err
    assert main(["test", "--run", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err


def test_console_script_installed():
    exe = Path(sys.executable).parent / "diffmic"
    if not exe.exists():
        pytest.skip("package not installed as a console script")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout and "predict" in out.stdout
