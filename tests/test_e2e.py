"""End to end through the real `diffmic` command (CPU, tiny networks).

The core layer trains on data the tests generate (``conftest.py``: a MedMNIST-style .npz and class
folders with a learnable signal), so it runs on a fresh clone; every number in ``test_metrics.json``
is recomputed from ``predictions.csv`` with scikit-learn, and the split sizes come from the .npz.
The real-data layer (BreastMNIST, HAM10000 under ``../shared/data``) is skipped where the data are
absent, except in CI (``CI=true``), where a missing data set fails (``_helpers.need``).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from diffmic.cli import main

from _helpers import TINY_MODEL, need

# A shrunken CPU config: 32 px, tiny backbones, a narrow denoiser and a short schedule of epochs.
TINY = ["data.image_size=32", "data.batch_size=8", *TINY_MODEL]

METRIC_KEYS = {
    "acc",
    "balanced_acc",
    "f1",
    "kappa",
    "auroc",
    "precision_per_class",
    "recall_per_class",
    "f1_per_class",
    "confusion_matrix",
    "num_images",
    "class_names",
    "checkpoint",
}


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def check_metrics_against_sklearn(run: Path, num_classes: int) -> dict:
    """Recompute every metric of ``test_metrics.json`` from ``predictions.csv`` (scikit-learn for
    the classification metrics, NumPy for the referral block); returns the metrics."""
    m = json.loads((run / "test_metrics.json").read_text())
    rows = _rows(run / "predictions.csv")
    names = m["class_names"]
    y = np.array([int(r["label"]) for r in rows])
    pred = np.array([int(r["pred"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows])
    assert len(rows) == m["num_images"] and probs.shape == (len(rows), num_classes)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert (pred == probs.argmax(1)).all()
    labels = list(range(num_classes))
    assert m["acc"] == pytest.approx(accuracy_score(y, pred), abs=1e-6)
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-6)
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro", labels=labels, zero_division=0), abs=1e-6)
    assert m["kappa"] == pytest.approx(cohen_kappa_score(y, pred, labels=labels, weights="quadratic"), abs=1e-5)
    # macro one-vs-rest, per class on that class's column (for 2 classes this is not always the
    # binary AUROC of p_1: saturated float32 probabilities tie differently in p_0 and p_1)
    # (the headline metrics are of the unscaled scores; a calibrated run keeps them as unscaled_p_*)
    raw = probs
    if f"unscaled_p_{names[0]}" in rows[0]:
        raw = np.array([[float(r[f"unscaled_p_{c}"]) for c in names] for r in rows])
    auroc = np.mean([roc_auc_score(y == c, raw[:, c]) for c in labels])
    assert m["auroc"] == pytest.approx(auroc, abs=1e-5)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    for key, fn in (
        ("precision_per_class", precision_score),
        ("recall_per_class", recall_score),
        ("f1_per_class", f1_score),
    ):
        want = fn(y, pred, average=None, labels=labels, zero_division=0)
        assert list(m[key]) == names, key
        np.testing.assert_allclose([m[key][c] for c in names], want, atol=1e-6, err_msg=key)
    # referral: the rule applied to each row by hand, and the selective-prediction block
    ref = m["referral"]
    conf = np.array([float(r["confidence"]) for r in rows])
    agree = np.array([float(r["agreement"]) for r in rows])
    if "threshold" in ref:  # calibrated run: the referral threshold fitted on validation
        assert ref["goal"] == "refer at most 20%"
        refer = conf < ref["threshold"]
    else:  # uncalibrated: confidence < eval.refer_threshold or the samples disagree
        refer = (conf < 0.5) | (agree < 1.0)
    if rows[0].get("ood", "") != "":  # an image unlike the training data is referred whatever its confidence
        refer = refer | (np.array([int(r["ood"]) for r in rows]) == 1)
    assert [int(r["refer"]) for r in rows] == refer.astype(int).tolist()
    correct = y == pred
    assert ref["referred_fraction"] == pytest.approx(refer.mean())
    assert ref["accuracy_kept"] == (pytest.approx(correct[~refer].mean()) if (~refer).any() else None)
    assert ref["accuracy_referred"] == (pytest.approx(correct[refer].mean()) if refer.any() else None)
    order = np.argsort(-conf, kind="stable")
    acc_k = np.cumsum(correct[order]) / np.arange(1, len(rows) + 1)
    for cov, value in ref["accuracy_at_coverage"].items():
        assert value == pytest.approx(acc_k[max(round(float(cov) * len(rows)), 1) - 1]), cov
    assert ref["aurc"] == pytest.approx(np.mean(1 - acc_k))
    return m


@pytest.fixture(scope="module")
def synth_run(tmp_path_factory, synth_npz) -> Path:
    """Train once on the generated .npz (3 DCG warm-up + 3 joint epochs) and share the run."""
    tmp = tmp_path_factory.mktemp("synth")
    run = tmp / "run"
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            *TINY,
            "data.dataset=medmnist",
            f"data.root={synth_npz}",
            f"data.cache_dir={tmp / 'cache'}",
            f"run.dir={run}",
            "train.epochs=3",
            "train.dcg_warmup_epochs=3",
        ]
    )
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    return run


def test_fit_writes_run_folder(synth_run):
    for name in ("config.yaml", "fit_summary.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (synth_run / name).exists(), name
    summary = json.loads((synth_run / "fit_summary.json").read_text())
    assert summary["selected_on"] == "val" and summary["monitor"] == "val/acc"
    assert (synth_run / "logs" / "metrics.csv").exists()
    # provenance: the machine and the time the fit took (the records behind the docs' numbers)
    assert summary["wall_time_s"] > 0 and summary["cpu_time_s"] > 0 and summary["resumed"] is False
    assert summary["machine"]["logical_cpus"] == os.cpu_count()
    assert summary["machine"]["torch"] == torch.__version__
    test = json.loads((synth_run / "test_metrics.json").read_text())["provenance"]
    assert test["wall_time_s"] > 0 and set(test["load_average"]) == {"start", "end"}


def test_test_metrics_equal_sklearn_and_beat_the_majority_baseline(synth_run, synth_npz):
    m = check_metrics_against_sklearn(synth_run, 2)
    assert METRIC_KEYS <= set(m)
    test_labels = np.load(synth_npz)["test_labels"].reshape(-1)
    # split sizes from the split source (the .npz's own test split), per class too
    assert m["num_images"] == len(test_labels)
    assert np.array(m["confusion_matrix"]).sum(1).tolist() == np.bincount(test_labels, minlength=2).tolist()
    majority = np.bincount(test_labels).max() / len(test_labels)  # 0.69 here
    assert m["acc"] > majority + 0.1, m  # learned the signal, not the class prior
    assert m["auroc"] > 0.9, m
    assert (synth_run / "risk_coverage.png").stat().st_size > 1000


def test_ddim_with_samples_from_one_checkpoint(synth_run):
    assert main(["test", "--run", str(synth_run), "eval.sampler=ddim", "eval.steps=3", "eval.num_samples=4"]) == 0
    m = check_metrics_against_sklearn(synth_run, 2)
    assert (m["sampler"], m["steps"], m["num_samples"]) == ("ddim", 3, 4)
    rows = _rows(synth_run / "predictions.csv")
    # K = 4 samples: agreement is a multiple of 1/4
    assert {float(r["agreement"]) * 4 % 1 for r in rows} == {0.0}


def test_validate_verb_reports_validation_metrics(synth_run, capsys):
    before = (synth_run / "test_metrics.json").read_text()
    assert main(["validate", "--run", str(synth_run)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{") :])
    result = result[0] if isinstance(result, list) else result
    # the best checkpoint was chosen on this very validation score: validate repeats it
    summary = json.loads((synth_run / "fit_summary.json").read_text())
    assert result["val/acc"] == pytest.approx(summary["best_score"], abs=1e-6)
    assert (synth_run / "test_metrics.json").read_text() == before  # validate writes no test files


def _save_test_pngs(npz: Path, folder: Path, n: int) -> tuple[list[str], np.ndarray]:
    z = np.load(npz)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, a in enumerate(z["test_images"][:n]):
        p = folder / f"img{i}.png"
        Image.fromarray(a).save(p)
        paths.append(str(p))
    return paths, z["test_labels"].reshape(-1)[:n]


def test_predict_cli_on_images(synth_run, synth_npz, tmp_path):
    paths, labels = _save_test_pngs(synth_npz, tmp_path / "in", 32)
    out = tmp_path / "preds.csv"
    rc = main(
        [
            "predict",
            "--run",
            str(synth_run),
            *paths,
            "--output",
            str(out),
            "--explain",
            str(tmp_path / "explain"),
            "eval.num_samples=3",
        ]
    )
    assert rc == 0
    rows = _rows(out)
    assert [Path(r["id"]).name for r in rows] == [f"img{i}.png" for i in range(32)]
    assert all(r["refer"] in ("0", "1") for r in rows)
    # the model learned the signal: clearly above calling every image the majority class
    majority = np.bincount(labels).max() / len(labels)  # 0.69 on this split
    assert np.mean([int(r["pred"]) == int(lab) for r, lab in zip(rows, labels)]) > majority + 0.1
    assert len(list((tmp_path / "explain").glob("*.png"))) == 32


def test_predict_errors_are_clear(synth_run, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("L", (28, 28), 120).save(img)
    cases = [
        (["predict", "--run", str(synth_run), str(tmp_path / "missing.png")], "missing.png' does not exist"),
        (["predict", "--run", str(synth_run), str(tmp_path / "empty")], "holds no images"),
        (["predict", str(img)], "predict needs --run DIR or --ckpt FILE"),
        (
            ["predict", "--run", str(synth_run), str(img), "data.image_size=64"],
            "predict accepts eval.* overrides only, got 'data.image_size'",
        ),
        (["predict", "--run", str(synth_run), str(img), "eval.stpes=3"], "eval.stpes"),
        (["test", "--run", str(tmp_path / "nope")], "not found"),
        (["fit", "--config", "cpu_v1", "data.rooot=/x"], "Did you mean 'data.root'"),
        (["fit", "--config", "cpu_v1", "train.epochs=many"], "train.epochs"),
    ]
    (tmp_path / "empty").mkdir()
    for argv, expected in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err, (argv, err)


def test_explain_image_of_grey_input_is_the_grey_input(tmp_path):
    """--explain shows the model input un-normalised with the statistics it was normalised with:
    for a grey model (data.in_chans=1) a flat grey PNG of value 200 is shown as 200/255 (with the
    RGB red-channel statistics it was 0.843 -> 0.86)."""
    from diffmic.config import load_config
    from diffmic.inference.predictor import Predictor
    from diffmic.training.module import DiffMICModule

    for in_chans in (1, 3):
        cfg = load_config("cpu_v1", [*TINY, f"data.in_chans={in_chans}", "model.hidden_dim=16"])
        torch.manual_seed(0)
        pred = Predictor(DiffMICModule(cfg.to_dict(), 2, ["a", "b"]).eval(), device="cpu")
        p = tmp_path / f"flat{in_chans}.png"
        Image.new("L", (40, 40), 200).save(p)
        img = pred.display_image(p)
        assert img.shape == (32, 32, in_chans)
        np.testing.assert_allclose(img, 200 / 255, atol=1e-5)
        r = pred.predict([p])[0]
        out = pred.save_explanation(p, r, tmp_path / f"explain{in_chans}.png")
        assert out.stat().st_size > 1000


def test_unseen_class_folder_trains_with_cpu_preset(tmp_path, synth_folder):
    """A folder of class sub-folders never seen before: classes inferred, no code change."""
    run = tmp_path / "run"
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            *TINY,
            "data.dataset=folder",
            f"data.root={synth_folder}",
            "data.split=random",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={run}",
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            "train.limit_train_batches=2",
        ]
    )
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    m = check_metrics_against_sklearn(run, 2)
    assert m["class_names"] == ["benign", "malignant"]
    # split counts from the split file the run recorded, or the seeded 7:3 split of the folder
    n_images = sum(1 for _ in synth_folder.rglob("*.png"))
    assert m["num_images"] == round(0.3 * n_images)


def test_console_script_installed():
    exe = Path(sys.executable).parent / "diffmic"
    if not exe.exists():
        pytest.skip("package not installed as a console script")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "fit" in out.stdout and "predict" in out.stdout


# ------------------------------------------------------------------- real data (extra layer)
@pytest.fixture(scope="module")
def breast_run(tmp_path_factory) -> Path:
    """Train once on BreastMNIST (real ultrasound, 2 classes) and share the run folder."""
    npz = need("breastmnist/breastmnist.npz")
    tmp = tmp_path_factory.mktemp("breast")
    run = tmp / "run"
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            *TINY,
            "data.batch_size=32",
            "data.dataset=medmnist",
            f"data.root={npz}",
            f"data.cache_dir={tmp / 'cache'}",
            f"run.dir={run}",
            "train.epochs=4",
            "train.dcg_warmup_epochs=2",
        ]
    )
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    return run


def test_breastmnist_metrics_equal_sklearn_and_beat_chance(breast_run):
    npz = need("breastmnist/breastmnist.npz")
    m = check_metrics_against_sklearn(breast_run, 2)
    labels = np.load(npz)["test_labels"].reshape(-1)
    assert m["num_images"] == len(labels)  # the official BreastMNIST test split (156)
    assert np.array(m["confusion_matrix"]).sum(1).tolist() == np.bincount(labels).tolist()
    # ranking better than chance (accuracy at this budget is near the 0.73 majority baseline)
    assert m["auroc"] > 0.6, m


def test_ham10000_subset_fit_test_predict(tmp_path):
    root = need("ham10000")
    run = tmp_path / "ham"
    rc = main(
        [
            "fit",
            "--config",
            "demo_cpu",
            *TINY,
            f"data.root={root}",
            "data.subset=160",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={run}",
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
        ]
    )
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    m = check_metrics_against_sklearn(run, 7)
    assert m["class_names"] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    img = root / "images" / "ISIC_0024306.jpg"
    assert main(["predict", "--run", str(run), str(img)]) == 0
