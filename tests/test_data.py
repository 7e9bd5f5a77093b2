"""Loaders, splits and split files (diffmic.data.sources / splits / records)."""

from __future__ import annotations

import csv
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.data import (
    DataError,
    DatasetIndex,
    DecodedCache,
    Record,
    carve_validation,
    check_dataset,
    convert_pickle_split_to_csv,
    filter_existing,
    load_aptos2019,
    load_csv_manifest,
    load_ham10000,
    load_image_folder,
    load_medmnist,
    load_pickle_split,
    stratified_split,
    stratified_subset,
)

from _helpers import need as _need


@pytest.fixture(scope="module")
def ham_root() -> Path:
    return _need("ham10000")


@pytest.fixture(scope="module")
def ham_authors(ham_root):
    return load_ham10000(ham_root, "authors")


# ---------------------------------------------------------------------------------------------
# HAM10000


def test_ham10000_authors_split(ham_authors):
    tr, te = ham_authors["train"], ham_authors["test"]
    assert (len(tr), len(te)) == (7011, 3004)
    assert tr.class_names == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    counts = dict(zip(te.class_names, te.class_counts().tolist()))
    assert counts == {"NV": 2038, "MEL": 332, "BKL": 329, "BCC": 146, "AKIEC": 88, "VASC": 39, "DF": 32}
    assert tr.class_counts().tolist() == [781, 4667, 368, 239, 770, 83, 103]
    r = te.records[0]
    assert r.path.name == f"{r.id}.jpg" and r.group.startswith("HAM_")
    assert not te.problems and not tr.problems  # split labels agree with metadata dx


def test_ham10000_authors_split_lesion_leak(ham_authors):
    train_lesions = {r.group for r in ham_authors["train"]}
    assert sum(r.group in train_lesions for r in ham_authors["test"]) == 1047
    rep = check_dataset(ham_authors, check_images=False)
    assert rep.ok
    (info,) = [p for p in rep.infos if p.kind == "group_overlap"]
    assert info.message.startswith("1047 of 3004 test images")
    assert "train" in rep.summary() and "NV" in rep.summary()


def test_ham10000_lesion_split(ham_root):
    sp = load_ham10000(ham_root, "lesion", seed=7)
    tr, te = sp["train"], sp["test"]
    assert len(tr) + len(te) == 10015
    assert not ({r.group for r in tr} & {r.group for r in te})
    assert 0.28 < len(te) / 10015 < 0.32
    frac = te.class_counts() / (tr.class_counts() + te.class_counts())
    assert np.all(np.abs(frac - 0.3) < 0.05)
    again = load_ham10000(ham_root, "lesion", seed=7)
    assert again["test"].ids == te.ids
    other = load_ham10000(ham_root, "lesion", seed=8)
    assert other["test"].ids != te.ids


def test_ham10000_random_split(ham_root):
    sp = load_ham10000(ham_root, "random", seed=3)
    tr, te = sp["train"], sp["test"]
    assert len(tr) + len(te) == 10015 and not (set(tr.ids) & set(te.ids))
    frac = te.class_counts() / (tr.class_counts() + te.class_counts())
    assert np.all(np.abs(frac - 0.3) < 0.01)


def test_ham10000_bad_split_name(ham_root):
    with pytest.raises(ValueError):
        load_ham10000(ham_root, "bogus")


# ---------------------------------------------------------------------------------------------
# APTOS 2019


def test_aptos_loader_and_two_real_images(tmp_path):
    root = _need("aptos2019")
    rnd = load_aptos2019(root, "random")
    assert len(rnd["train"]) + len(rnd["test"]) == 3662
    sp = load_aptos2019(root, "authors")
    assert (len(sp["train"]), len(sp["test"])) == (2564, 1098)
    assert sp["train"].class_counts().tolist() == [1250, 274, 685, 141, 214]
    assert sp["test"].class_counts().tolist() == [555, 96, 314, 52, 81]
    # missing images are reported, not dropped
    with pytest.raises(DataError) as ei:
        check_dataset(sp, check_images=False)
    missing = [p for p in ei.value.problems if p.kind == "missing_file"]
    assert len(missing) == 3662 - 2
    assert "diffmic_train.csv:line" in str(ei.value) and "image file not found" in str(ei.value)
    # deliberate partial use
    present, removed = filter_existing(sp)
    assert len(removed) == 3660
    assert sorted(present["train"].ids) == ["000c1434d8d7", "1ae3c58759fb"]
    assert len(present["test"]) == 0
    cache = DecodedCache(tmp_path)
    arr = cache.get(present["train"], 64, 3)
    assert arr.shape == (2, 64, 64, 3) and arr.dtype == np.uint8
    assert arr.reshape(2, -1).std(axis=1).min() > 10  # real content, not blank
    assert {r.id: r.label for r in present["train"]} == {"000c1434d8d7": 2, "1ae3c58759fb": 0}


# ---------------------------------------------------------------------------------------------
# MedMNIST


def test_breastmnist(tmp_path):
    f = _need("breastmnist") / "breastmnist.npz"
    sp = load_medmnist(f)
    assert {k: len(v) for k, v in sp.items()} == {"train": 546, "val": 78, "test": 156}
    assert sp["train"].class_names == ["malignant", "normal, benign"]
    assert sp["train"].images.shape == (546, 28, 28)
    # the official files store labels as (N, 1)
    with np.load(f) as z:
        d = {k: z[k] for k in z.files}
    d2 = {k: (v.reshape(-1, 1) if k.endswith("_labels") else v) for k, v in d.items()}
    np.savez(tmp_path / "breastmnist.npz", **d2)
    sp2 = load_medmnist(tmp_path / "breastmnist.npz")
    for k in sp:
        assert sp2[k].labels.tolist() == sp[k].labels.tolist()
    # the official split holds one image whose pixels also appear in another split, under the
    # other label (train 115 'malignant' = test 76 'normal, benign'): a label conflict (an error
    # by default; the DataModule makes it a warning for an official benchmark split)
    rep = check_dataset(sp2, duplicate_content="warning", label_conflict="warning")
    assert rep.ok and rep.modes["L"] == 780
    conflicts = [p for p in rep.warnings if p.kind == "label_conflict"]
    assert sorted((p.split, p.record_id) for p in conflicts) == [("test", "test_00076"), ("train", "train_00115")]
    with pytest.raises(DataError, match="label_conflict"):
        check_dataset(sp2, duplicate_content="warning")


def test_medmnist_rgb_and_bad_labels(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (6, 28, 28, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "x.npz",
        train_images=imgs,
        train_labels=np.array([0, 1, 2, 0, 1, 2]),
        test_images=imgs[:3],
        test_labels=np.array([[0], [1], [2]]),
    )
    sp = load_medmnist(tmp_path / "x.npz")
    assert sp["train"].class_names == ["0", "1", "2"] and set(sp) == {"train", "test"}
    np.savez(tmp_path / "y.npz", train_images=imgs, train_labels=np.zeros((6, 3)))
    with pytest.raises(DataError, match="single-label"):
        load_medmnist(tmp_path / "y.npz")


# ---------------------------------------------------------------------------------------------
# folders and CSV


def _png(path: Path, color=(10, 20, 30), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_image_folder_infers_classes(tmp_path):
    for c, n in (("benign", 3), ("malignant", 2), ("atypical", 1)):
        for i in range(n):
            _png(tmp_path / "flat" / c / f"{i}.png")
    (tmp_path / "flat" / "benign" / "notes.txt").write_text("x")
    (tmp_path / "flat" / "benign" / ".hidden.png").write_bytes(b"")
    sp = load_image_folder(tmp_path / "flat")
    assert list(sp) == ["all"]
    ix = sp["all"]
    assert ix.class_names == ["atypical", "benign", "malignant"] and ix.num_classes == 3
    assert ix.class_counts().tolist() == [1, 3, 2]
    assert "benign/0.png" in ix.ids

    for s in ("train", "test"):
        for c in ("a", "b"):
            _png(tmp_path / "split" / s / c / "x.jpg")
    _png(tmp_path / "split" / "val" / "c" / "y.png")
    sp = load_image_folder(tmp_path / "split")
    assert set(sp) == {"train", "val", "test"}
    assert sp["train"].class_names == ["a", "b", "c"]
    assert sp["val"].labels.tolist() == [2]


def _write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_csv_manifest_names_and_ints(tmp_path):
    for i in range(4):
        _png(tmp_path / "img" / f"{i}.png")
    f = _write_csv(
        tmp_path / "m.csv",
        ["path", "label", "split"],
        [
            ["img/0.png", "nevus", "train"],
            ["img/1.png", "melanoma", "train"],
            ["img/2.png", "nevus", "Test"],
            ["img/3.png", "melanoma", "validation"],
        ],
    )
    sp = load_csv_manifest(f, split_col="split")
    assert set(sp) == {"train", "val", "test"}
    assert sp["train"].class_names == ["melanoma", "nevus"]  # sorted
    assert sp["train"].labels.tolist() == [1, 0]
    assert sp["train"].records[0].path == tmp_path / "img" / "0.png"
    sp = load_csv_manifest(f, split_col="split", class_names=["nevus", "melanoma"])
    assert sp["train"].labels.tolist() == [0, 1]
    all_ = load_csv_manifest(f)["all"]
    assert len(all_) == 4

    g = _write_csv(tmp_path / "ints.csv", ["file", "y"], [[str(tmp_path / "img" / "0.png"), "2"], ["img/1.png", "0"]])
    # integer labels must be 0..C-1 with no gap (issue 9): label 2 without a 1 is an error of its row
    ix = load_csv_manifest(g, path_col="file", label_col="y")["all"]
    assert ix.class_names == ["0"] and ix.labels.tolist() == [-1, 0]
    assert [p.kind for p in ix.problems] == ["label_out_of_range"] and "ints.csv:line 2" in ix.problems[0].message
    # ... unless the class names are given
    ix = load_csv_manifest(g, path_col="file", label_col="y", class_names=["a", "b", "c"])["all"]
    assert ix.class_names == ["a", "b", "c"] and ix.labels.tolist() == [2, 0] and not ix.problems
    assert ix.records[0].path.is_absolute()


def test_csv_manifest_unknown_class_and_bad_split(tmp_path):
    _png(tmp_path / "a.png")
    f = _write_csv(tmp_path / "m.csv", ["path", "label"], [["a.png", "nevus"], ["a2.png", "wart"]])
    ix = load_csv_manifest(f, class_names=["nevus", "melanoma"])["all"]
    with pytest.raises(DataError) as ei:
        check_dataset(ix, check_images=False)
    msg = str(ei.value)
    assert "unknown class name 'wart'" in msg and "m.csv:line 3" in msg
    f2 = _write_csv(
        tmp_path / "s.csv", ["path", "label", "split"], [["a.png", "0", "train"], ["a.png", "0", "holdout"]]
    )
    with pytest.raises(DataError, match=r"s.csv:line 3: split 'holdout'"):
        load_csv_manifest(f2, split_col="split")
    with pytest.raises(DataError, match="missing column"):
        load_csv_manifest(f2, label_col="diagnosis")


# ---------------------------------------------------------------------------------------------
# splits


def test_stratified_split_proportions_and_determinism():
    rng = np.random.default_rng(0)
    y = rng.choice(5, size=2000, p=[0.5, 0.2, 0.15, 0.1, 0.05])
    tr, te = stratified_split(y, test_fraction=0.3, seed=11)
    assert len(tr) + len(te) == 2000 and not set(tr) & set(te)
    for c in range(5):
        n = (y == c).sum()
        assert abs((y[te] == c).sum() - 0.3 * n) <= 1
    tr2, te2 = stratified_split(y, 0.3, 11)
    assert np.array_equal(te, te2) and np.array_equal(tr, tr2)
    assert not np.array_equal(te, stratified_split(y, test_fraction=0.3, seed=12)[1])
    parts = stratified_split(y, fractions=(0.6, 0.2, 0.2), seed=1)
    assert sum(len(p) for p in parts) == 2000
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(2000))
    assert [abs(len(p) - f * 2000) <= 5 for p, f in zip(parts, (0.6, 0.2, 0.2))] == [True] * 3
    state = np.random.get_state()[1].copy()
    stratified_split(y, test_fraction=0.5, seed=3)
    assert np.array_equal(state, np.random.get_state()[1])  # global RNG untouched
    with pytest.raises(ValueError):
        stratified_split(y, fractions=(0.5, 0.6), seed=0)


def test_grouped_split_never_straddles():
    rng = np.random.default_rng(1)
    groups = np.repeat(np.arange(400), rng.integers(1, 6, 400))
    y = (rng.random(400) < 0.3).astype(int)[groups]
    y[rng.random(len(y)) < 0.05] = 2  # some mixed groups
    for seed in range(3):
        tr, te = stratified_split(y, test_fraction=0.3, seed=seed, groups=groups.astype(str))
        assert not set(groups[tr]) & set(groups[te])
        assert len(tr) + len(te) == len(y)
        assert abs(len(te) / len(y) - 0.3) < 0.03


def test_carve_validation_and_subset():
    recs = [Record(id=f"r{i}", label=i % 3, group=f"g{i // 2}") for i in range(300)]
    ix = DatasetIndex(recs, ["a", "b", "c"])
    tr, va = carve_validation(ix, 0.1, seed=5)
    assert len(tr) + len(va) == 300 and 20 <= len(va) <= 40
    assert not {r.group for r in tr} & {r.group for r in va}
    tr2, va2 = carve_validation(ix, 0.1, seed=5, grouped=False)
    assert len(va2) == 30 and va2.class_counts().tolist() == [10, 10, 10]
    sub = stratified_subset(ix, 10, seed=0)
    assert len(sub) == 10 and (sub.class_counts() > 0).all()
    assert stratified_subset(ix, 1000, seed=0) is ix
    y = np.array([0] * 100 + [1] * 2)
    small = stratified_subset(DatasetIndex([Record(str(i), int(l)) for i, l in enumerate(y)], ["x", "y"]), 5, seed=0)
    assert len(small) == 5 and small.class_counts().tolist() == [4, 1]


# ---------------------------------------------------------------------------------------------
# the authors' pickle split files


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_unpickler_refuses_code(tmp_path, capfd):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps([{"img_root": "x.png", "label": 0}, _Evil(f"echo pwned; touch {marker}")]))
    with pytest.raises(DataError, match="refused to load global"):
        load_pickle_split(evil)
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out
    # a pickle that tries to build a class instance is refused too
    (tmp_path / "obj.pkl").write_bytes(pickle.dumps([Path("a")]))
    with pytest.raises(DataError):
        load_pickle_split(tmp_path / "obj.pkl")


def test_pickle_split_accepts_list_of_dicts_and_converts(tmp_path):
    entries = [
        {"img_root": "./dataset/isic2018/images/ISIC_0000001.jpg", "label": 1},
        {"img_root": "./dataset/isic2018/images/ISIC_0000002.jpg", "label": 0},
    ]
    f = tmp_path / "train.pkl"
    f.write_bytes(pickle.dumps(entries, protocol=4))
    assert load_pickle_split(f) == entries
    n = convert_pickle_split_to_csv(f, tmp_path / "out" / "train.csv", class_names=["MEL", "NV"])
    assert n == 2
    rows = list(csv.DictReader(open(tmp_path / "out" / "train.csv")))
    assert rows[0] == {"id": "ISIC_0000001", "path": entries[0]["img_root"], "label": "1", "class": "NV"}
    ix = load_csv_manifest(tmp_path / "out" / "train.csv", id_col="id")["all"]
    assert ix.ids == ["ISIC_0000001", "ISIC_0000002"] and ix.labels.tolist() == [1, 0]
    for bad in (
        {"a": 1},
        [{"img_root": 3, "label": 0}],
        [{"img_root": "x", "label": 1.5}],
        [{"img_root": "x", "label": True}],
        [["x", 0]],
    ):
        (tmp_path / "bad.pkl").write_bytes(pickle.dumps(bad))
        with pytest.raises(DataError):
            load_pickle_split(tmp_path / "bad.pkl")
    (tmp_path / "junk.pkl").write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(DataError):
        load_pickle_split(tmp_path / "junk.pkl")


@pytest.mark.parametrize("dataset", ["ham10000", "aptos2019"])
def test_authors_split_rows_name_a_bad_label_and_a_disagreement(tmp_path, dataset):
    """The published split files (splits/diffmic_{train,test}.csv): a label that is not an integer
    is an error of its row (label -1, never guessed); one that disagrees with the data set's own
    label (HAM10000 metadata dx, APTOS train.csv) a warning naming the row, both labels' sources."""
    from diffmic.data.sources import load_aptos2019, load_ham10000

    (tmp_path / "splits").mkdir()
    if dataset == "ham10000":
        (tmp_path / "HAM10000_metadata.csv").write_text(
            "lesion_id,image_id,dx\nL1,ISIC_1,mel\nL2,ISIC_2,nv\nL3,ISIC_3,df\n"
        )
        idc, rows = "image_id", ["ISIC_1,0", "ISIC_2,4", "ISIC_3,x"]  # ISIC_2: nv is 1, not 4 (BKL)
        load = load_ham10000
        want = ["diffmic_train.csv:line 3: label 4 (BKL) of 'ISIC_2' disagrees with metadata dx='nv'"]
    else:
        (tmp_path / "train.csv").write_text("id_code,diagnosis\na1,0\na2,2\na3,4\n")
        idc, rows = "id_code", ["a1,0", "a2,3", "a3,x"]
        load = load_aptos2019
        want = ["diffmic_train.csv:line 3: label 3 (Severe) of 'a2' disagrees with train.csv diagnosis 2"]
    (tmp_path / "splits" / "diffmic_train.csv").write_text(f"{idc},label\n" + "\n".join(rows) + "\n")
    (tmp_path / "splits" / "diffmic_test.csv").write_text(f"{idc},label\n{rows[0]}\n")
    out = load(tmp_path, split="authors")
    train = out["train"]
    assert [r.label for r in train.records] == [0, int(rows[1][-1]), -1]
    warn = [p for p in train.problems if p.severity == "warning"]
    err = [p for p in train.problems if p.severity != "warning"]
    assert [p.message for p in warn] == want and warn[0].split == "train"
    assert len(err) == 1 and "line 4: label 'x'" in err[0].message and "is not an integer" in err[0].message
    assert out["test"].problems == []
