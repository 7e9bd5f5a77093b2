"""k-fold cross-validation (issue 26.2): the folds partition the data, stratified; groups (lesions,
patients) never span folds; a fold is an ordinary run folder; the experiment table's pooled
out-of-fold metrics equal a recompute from the out-of-fold CSV (scikit-learn), with a bootstrap CI
that matches the binomial quantiles."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score

from diffmic.cli import main
from diffmic.config import ConfigError, load_config
from diffmic.data.datamodule import DiffMICDataModule
from diffmic.data.records import DataError
from diffmic.data.splits import kfold_split, stratified_kfold
from diffmic.experiment import OOF_FILE, load_grid, read_predictions, summarise
from diffmic.training.run import build_datamodule

from _helpers import TINY_MODEL  # noqa: E402
from conftest import write_synthetic_npz

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------------- splits


def test_folds_partition_the_data_and_are_stratified():
    # 50 / 25 / 10 images of three classes, 5 folds: every class divides evenly, so each fold holds
    # exactly 10 / 5 / 2 of them, and the folds partition 0..84
    y = np.repeat([0, 1, 2], [50, 25, 10])
    np.random.default_rng(0).shuffle(y)
    folds = stratified_kfold(y, 5, seed=7)
    assert len(folds) == 5
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(len(y)))
    for f in folds:
        assert np.array_equal(np.bincount(y[f], minlength=3), [10, 5, 2])
    again = stratified_kfold(y, 5, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again))  # seeded
    other = stratified_kfold(y, 5, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other))


def test_groups_never_span_folds():
    rng = np.random.default_rng(1)
    groups = np.repeat([f"lesion{i}" for i in range(40)], rng.integers(1, 5, 40))  # 1-4 images a lesion
    label_of = {g: int(i % 3 == 0) for i, g in enumerate(dict.fromkeys(groups))}
    y = np.array([label_of[g] for g in groups])
    folds = stratified_kfold(y, 4, seed=3, groups=groups)
    assert np.array_equal(np.sort(np.concatenate(folds)), np.arange(len(y)))
    fold_of: dict[str, int] = {}
    for k, f in enumerate(folds):
        for g in groups[f]:
            assert fold_of.setdefault(g, k) == k, f"{g} is in folds {fold_of[g]} and {k}"
    assert len(fold_of) == 40
    # stratified over groups: each fold holds a share of the class-1 images near a quarter
    ones = (y == 1).sum()
    assert all(abs((y[f] == 1).sum() - ones / 4) <= 5 for f in folds)


def test_too_few_groups_for_the_folds_is_a_clear_error():
    with pytest.raises(ValueError, match=r"5 folds need at least 5 groups .* the data have 3"):
        stratified_kfold([0, 1, 0, 1, 0, 1], 5, groups=["a", "a", "b", "b", "c", "c"])
    from diffmic.data.records import DatasetIndex, Record

    index = DatasetIndex([Record(f"i{i}", i % 2) for i in range(3)], ["a", "b"])
    with pytest.raises(DataError, match=r"data.folds=4: 4 folds need at least 4 images"):
        kfold_split(index, 4, 0)


# ---------------------------------------------------------------------------------------------- data module


def test_datamodule_folds_partition_the_pooled_splits_and_read_the_right_pixels(synth_npz, tmp_path):
    # the .npz has train/val/test arrays of 64/16/32 images: cross-validation pools all 112
    raw = np.load(synth_npz)
    seen: set[str] = set()
    caches = set()
    for fold in range(4):
        cfg = load_config(
            "cpu_v1",
            [
                "data.dataset=medmnist",
                f"data.root={synth_npz}",
                "data.image_size=28",
                "data.in_chans=1",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.folds=4",
                f"data.fold={fold}",
                "data.val_fraction=0.2",
            ],
        )
        dm = build_datamodule(cfg)
        dm.setup("test")
        train, val, test = (set(dm.indexes[k].ids) for k in ("train", "val", "test"))
        assert not (train & val or train & test or val & test)
        assert len(train | val | test) == 112
        assert len(test) == 28 and not (test & seen)  # 112 / 4, each image tested once
        seen |= test
        # 30 % class 1 in every split of the file: 34 of 112, so 8 or 9 in a fold of 28
        assert int(dm.indexes["test"].labels.sum()) in (8, 9)
        # the pooled in-memory arrays: each test id shows its own pixels from the .npz
        ds = dm.get_dataset("test")
        for j, rid in enumerate(dm.indexes["test"].ids):
            split, k = rid.split("_")
            assert np.array_equal(ds.images[ds.rows[j]][..., 0], raw[f"{split}_images"][int(k)])
        caches |= {p.name for p in (tmp_path / "cache").glob("*.npy")}
    assert len(seen) == 112
    assert len(caches) == 1  # every fold decodes (and caches) the same pooled images once


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


def test_csv_group_column_keeps_a_patient_in_one_fold_and_out_of_validation(tmp_path):
    rows = []
    for p in range(15):  # 15 patients with 1-4 images each; a patient's images share its label
        for j in range(1 + p % 4):
            name = f"img/p{p}_{j}.png"
            _png(tmp_path / name, 10 * p + j)
            rows.append({"path": name, "label": ["benign", "malignant"][p % 2], "patient": f"P{p}"})
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label", "patient"])
        w.writeheader()
        w.writerows(rows)
    patient = {r["path"]: r["patient"] for r in rows}
    tested: dict[str, int] = {}
    for fold in range(3):
        cfg = load_config(
            "cpu_v1",
            [
                "data.dataset=csv",
                f"data.root={manifest}",
                "data.group_col=patient",
                "data.image_size=16",
                f"data.cache_dir={tmp_path / 'cache'}",
                "data.folds=3",
                f"data.fold={fold}",
                "data.val_fraction=0.25",
            ],
        )
        dm = build_datamodule(cfg)
        dm.setup("test")
        parts = {k: {patient[i] for i in dm.indexes[k].ids} for k in ("train", "val", "test")}
        assert not (parts["train"] & parts["test"] or parts["val"] & parts["test"] or parts["train"] & parts["val"])
        for p in parts["test"]:
            assert tested.setdefault(p, fold) == fold
    assert len(tested) == 15  # every patient tested in exactly one fold
    with pytest.raises(DataError, match="missing column"):
        DiffMICDataModule(dataset="csv", root=manifest, group_col="subject", folds=3)._load_sources()


def test_ham10000_folds_are_lesion_grouped(tmp_path):
    # a HAM10000 layout with its metadata (lesion_id, image_id, dx): cross-validation keeps each
    # lesion's images in one fold whatever data.split says
    (tmp_path / "images").mkdir()
    lines = ["lesion_id,image_id,dx"]
    for i in range(36):
        lesion, dx = f"HAM_{i // 3:07d}", ["nv", "mel", "bkl"][(i // 3) % 3]
        lines.append(f"{lesion},ISIC_{i:07d},{dx}")
    (tmp_path / "HAM10000_metadata.csv").write_text("\n".join(lines) + "\n")
    lesion = {line.split(",")[1]: line.split(",")[0] for line in lines[1:]}
    owner: dict[str, int] = {}
    for fold in range(3):
        dm = DiffMICDataModule(dataset="ham10000", root=tmp_path, split="random", folds=3, fold=fold, seed=5)
        src = dm._load_sources()
        test = {lesion[i] for i in src["test"].ids}
        assert not test & {lesion[i] for i in src["train"].ids}
        for les in test:
            assert owner.setdefault(les, fold) == fold
    assert len(owner) == 12


def test_fold_keys_are_checked():
    with pytest.raises(ConfigError, match=r"data.fold needs data.folds >= 2"):
        load_config("cpu_v1", ["data.fold=2"])
    with pytest.raises(ConfigError, match=r"data.fold must be in \[0, data.folds-1=2\]"):
        load_config("cpu_v1", ["data.folds=3", "data.fold=-1"])


# ---------------------------------------------------------------------------------------------- the table


def _write_cell(run_dir: Path, ids, labels, probs, split: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "predictions.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "label", "pred", "p_benign", "p_malignant"])
        for i, y, p in zip(ids, labels, probs):
            w.writerow([i, int(y), int(np.argmax(p)), float(p[0]), float(p[1])])
    (run_dir / "test_metrics.json").write_text("{}")
    (run_dir / "split.json").write_text(json.dumps({"format": 1, "splits": split}))


def _fold_grid(tmp_path: Path, npz: Path, folds: int = 3) -> Path:
    doc = {
        "out": str(tmp_path / "exp"),
        "reference": "a",
        "seeds": [1],
        "folds": folds,
        "datasets": {"tiny": {"config": "cpu_v1", "overrides": ["data.dataset=medmnist", f"data.root={npz}"]}},
        "models": {"a": ["model.variant=basic"], "b": ["model.variant=basic"]},
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _ece(p: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return total


def test_pooled_out_of_fold_metrics_equal_a_recompute_from_the_csv(tmp_path, synth_npz):
    grid = load_grid(_fold_grid(tmp_path, synth_npz))
    assert [c.name for c in grid.cells][:3] == ["tiny/a/seed1/fold0", "tiny/b/seed1/fold0", "tiny/a/seed1/fold1"]
    assert "data.folds=3" in grid.cells[0].overrides and "data.fold=0" in grid.cells[0].overrides
    # 60 images, 3 folds of 20; model a is right on exactly 45 (acc 0.75), model b on 51
    rng = np.random.default_rng(0)
    n = 60
    ids = [f"img{i:02d}" for i in range(n)]
    y = rng.integers(0, 2, n)
    fold_of = np.arange(n) % 3
    right = {"a": np.arange(n) < 45, "b": np.arange(n) < 51}
    conf = rng.uniform(0.55, 0.99, n)
    for c in grid.cells:
        pred = np.where(right[c.model], y, 1 - y)
        p1 = np.where(pred == 1, conf, 1 - conf)
        probs = np.stack([1 - p1, p1], 1)
        f = fold_of == c.fold
        split = {"train": [i for i, m in zip(ids, f) if not m], "val": [], "test": [i for i, m in zip(ids, f) if m]}
        _write_cell(c.run_dir, [i for i, m in zip(ids, f) if m], y[f], probs[f], split)
    paths = summarise(grid, n_boot=2000)
    rows = {r["model"]: r for r in csv.DictReader(open(paths["csv"]))}
    for model in ("a", "b"):
        oof_csv = tmp_path / "exp" / "tiny" / model / "seed1" / OOF_FILE
        with open(oof_csv, newline="") as fh:
            got = list(csv.DictReader(fh))
        assert sorted(r["id"] for r in got) == ids  # every image once
        assert all(int(r["fold"]) == fold_of[ids.index(r["id"])] for r in got)
        # independent recompute from the CSV with scikit-learn (and the ECE by hand)
        yy = np.array([int(r["label"]) for r in got])
        pp = np.array([[float(r["p_benign"]), float(r["p_malignant"])] for r in got])
        expect = {
            "acc": accuracy_score(yy, pp.argmax(1)),
            "f1": f1_score(yy, pp.argmax(1), average="macro"),
            "balanced_acc": balanced_accuracy_score(yy, pp.argmax(1)),
            "kappa": cohen_kappa_score(yy, pp.argmax(1), weights="quadratic"),
            "auroc": roc_auc_score(yy, pp[:, 1]),
            "ece": _ece(pp, yy),
        }
        for k, v in expect.items():
            assert float(rows[model][f"oof_{k}"].split(" [")[0]) == pytest.approx(v, abs=1e-3), k
        # mean ± SD over the three folds' own accuracies
        truth = np.where(right[model], y, 1 - y)
        per_fold = [accuracy_score(y[fold_of == k], truth[fold_of == k]) for k in range(3)]
        mean, sd = rows[model]["acc"].split(" ± ")
        assert float(mean) == pytest.approx(np.mean(per_fold), abs=1e-3)
        assert float(sd) == pytest.approx(np.std(per_fold, ddof=1), abs=1e-3)
        assert rows[model]["n"] == "3" and rows[model]["oof_n"] == "60"
    assert float(rows["a"]["oof_acc"].split(" [")[0]) == pytest.approx(0.75)
    # the bootstrap of a pooled accuracy of 45/60 is Binomial(60, 0.75) / 60
    lo, hi = (float(v) for v in rows["a"]["oof_acc"].split(" [")[1].rstrip("]").split(", "))
    q_lo, q_hi = stats.binom.ppf([0.025, 0.975], 60, 0.75) / 60
    assert lo == pytest.approx(q_lo, abs=0.02) and hi == pytest.approx(q_hi, abs=0.02)
    # the paired CI against the reference uses the pooled predictions: b - a = 6/60 = +0.100
    assert rows["b"]["d_acc_vs_a"].startswith("+0.100 [")
    rec = json.loads(paths["record"].read_text())
    assert rec["folds"] == 3 and {(r["model"], r["acc"]) for r in rec["out_of_fold"]} == {("a", 0.75), ("b", 0.85)}
    assert {c["fold"] for c in rec["cells"]} == {0, 1, 2}


def test_overlapping_folds_are_refused(tmp_path, synth_npz):
    grid = load_grid(_fold_grid(tmp_path, synth_npz, folds=2))
    ids = ["x0", "x1", "x2", "x3"]
    for c in grid.cells:
        test = ids[:3] if c.fold == 0 else ids[2:]  # x2 in both folds
        _write_cell(c.run_dir, test, [0, 1, 0][: len(test)], [[0.8, 0.2]] * len(test), {"test": test, "train": []})
    with pytest.raises(ConfigError, match=r"'x2' is a test image of both tiny/a/seed1/fold0 and tiny/a/seed1/fold1"):
        summarise(grid, n_boot=10)


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def cv_grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cv")
    # 28x28 grey noise, a bright centre square for class 1, alternating labels; no validation split
    write_synthetic_npz(tmp / "tiny.npz", {"train": 24, "test": 12}, order="cycle", background=45.0, contrast=150.0)
    doc = {
        "out": str(tmp / "exp"),
        "seeds": [1],
        "folds": 2,
        "common": [
            "data.image_size=32",
            "data.batch_size=16",
            "model.crop_size=8",
            *TINY_MODEL,
            f"data.cache_dir={tmp / 'cache'}",
            "model.dcg_output_stride=8",
        ],
        "datasets": {
            "tiny": {"config": "cpu_v1", "overrides": ["data.dataset=medmnist", f"data.root={tmp / 'tiny.npz'}"]}
        },
        "models": {"basic": ["model.variant=basic", "train.joint_steps=2"]},
    }
    (tmp / "grid.yaml").write_text(yaml.safe_dump(doc))
    assert main(["experiment", str(tmp / "grid.yaml"), "--n-boot", "50"]) == 0
    return tmp


def test_cross_validation_grid_runs_each_fold_as_a_run_folder_and_resumes(cv_grid, capsys):
    exp = cv_grid / "exp" / "tiny" / "basic" / "seed1"
    splits = [json.loads((exp / f"fold{k}" / "split.json").read_text()) for k in range(2)]
    assert [s["cv"] for s in splits] == [{"folds": 2, "fold": 0}, {"folds": 2, "fold": 1}]
    tests = [set(s["splits"]["test"]) for s in splits]
    every = {i for i in splits[0]["splits"].values() for i in i}
    assert not tests[0] & tests[1] and tests[0] | tests[1] == every and len(every) == 36
    oof = read_predictions(exp / OOF_FILE)
    assert set(oof["ids"]) == every
    for k in range(2):  # each pooled row is the prediction of the fold that held the image out
        own = read_predictions(exp / f"fold{k}" / "predictions.csv")
        rows = [oof["ids"].index(i) for i in own["ids"]]
        assert np.allclose(oof["probs"][rows], own["probs"])
    # resumable: a fold interrupted after its fit is only tested, the other is skipped
    (exp / "fold1" / "test_metrics.json").unlink()
    capsys.readouterr()
    assert main(["experiment", str(cv_grid / "grid.yaml"), "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert "tiny/basic/seed1/fold0: skipped (finished)" in out and "tiny/basic/seed1/fold1: tested" in out
    # a fold's run folder refuses to be tested on another fold's split
    assert main(["test", "--run", str(exp / "fold0"), "data.fold=1"]) == 2
    err = capsys.readouterr().err
    assert "data split differs" in err and "data.fold=1" in err
