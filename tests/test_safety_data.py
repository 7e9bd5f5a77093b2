"""Issue 9 (data side): bad CSV labels are one error per row naming file and line (never a new
class), integer labels 0..C-1 without gaps, exact names with "did you mean"; the same pixels in
two splits are reported (leakage under another name); a single-class training set is refused
before training. All data are generated in tmp_path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.cli import main
from diffmic.data.checks import check_dataset
from diffmic.data.records import DataError
from diffmic.data.sources import load_csv_manifest

from _helpers import fit_args
from conftest import NUMBERED, write_synthetic_folder


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)


def _manifest(tmp: Path, labels: list[str]) -> Path:
    lines = ["path,label"]
    for i, lab in enumerate(labels):
        _png(tmp / "img" / f"{i}.png", i)
        lines.append(f"img/{i}.png,{lab}")
    (tmp / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp / "m.csv"


GOOD = ["benign"] * 6 + ["malignant"] * 6  # lines 2..13


def test_bad_label_rows_are_errors_naming_file_and_line_never_classes(tmp_path, capsys):
    bad = ["NaN", "1.5", "99", "bengin", "Benign", "MALIGNANT "]  # lines 14..19
    f = _manifest(tmp_path, GOOD + bad)
    ix = load_csv_manifest(f)["all"]
    assert ix.class_names == ["benign", "malignant"]  # before: 8 classes incl. 'NaN', '1.5', '99'
    lines = sorted(int(re.search(r"m\.csv:line (\d+)", p.message).group(1)) for p in ix.problems)
    assert lines == [14, 15, 16, 17, 18, 19]  # one problem per bad row, each naming its line
    msgs = {int(re.search(r"line (\d+)", p.message).group(1)): p.message for p in ix.problems}
    assert "did you mean 'benign'" in msgs[17] and "did you mean 'benign'" in msgs[18]
    assert "did you mean 'malignant'" in msgs[19]
    assert ix.labels.tolist()[12:] == [-1] * 6

    rc = main(
        [
            "data",
            "check",
            "--config",
            "cpu_v1",
            "data.dataset=csv",
            f"data.root={f}",
            "data.split=random",
            "data.image_size=16",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    for line in range(14, 20):
        assert f"m.csv:line {line}" in out
    assert "empty_class" not in out  # no phantom classes

    from diffmic.data.datamodule import DiffMICDataModule

    dm = DiffMICDataModule(
        dataset="csv",
        root=f,
        image_size=16,
        skip_bad=True,
        split="random",
        test_fraction=0.25,
        val_fraction=0.0,
        cache_dir=tmp_path / "cache",
    )
    dm.setup("fit")
    assert dm.class_names == ["benign", "malignant"]  # before: a class 'NaN' was trained
    assert len(dm.report.removed) == 6


def test_integer_labels_must_be_0_to_c_minus_1_without_gaps(tmp_path):
    f = _manifest(tmp_path, ["0"] * 5 + ["2"] * 5)
    ix = load_csv_manifest(f)["all"]
    assert ix.class_names == ["0"] and len(ix.problems) == 5
    assert all("0..C-1 with no gap" in p.message for p in ix.problems)
    ix = load_csv_manifest(f, class_names=["a", "b", "c"])["all"]  # given names: 2 is class 'c'
    assert ix.labels.tolist() == [0] * 5 + [2] * 5 and not ix.problems
    f = _manifest(tmp_path / "ok", ["1", "0", "1", "0"])
    ix = load_csv_manifest(f)["all"]
    assert ix.class_names == ["0", "1"] and ix.labels.tolist() == [1, 0, 1, 0] and not ix.problems


def test_given_class_names_are_matched_exactly(tmp_path):
    f = _manifest(tmp_path, ["benign", "Malignant", "malignant", "benig"])
    ix = load_csv_manifest(f, class_names=["benign", "malignant"])["all"]
    assert ix.labels.tolist() == [0, -1, 1, -1]
    assert [p.message.split(":")[1] for p in ix.problems] == ["line 3", "line 5"]
    assert "did you mean 'malignant'" in ix.problems[0].message
    assert "did you mean 'benign'" in ix.problems[1].message


def test_same_pixels_in_two_splits_are_reported(tmp_path, capsys):
    root = tmp_path / "data"
    for split in ("train", "test"):
        write_synthetic_folder(root / split, (4, 4), seed={"train": 0, "test": 1}[split], **NUMBERED)
    # a copy of a training image under another name, and one re-encoded as BMP (same pixels)
    (root / "test" / "benign" / "copy.png").write_bytes((root / "train" / "benign" / "img0.png").read_bytes())
    Image.open(root / "train" / "malignant" / "img1.png").save(root / "test" / "malignant" / "other.bmp")
    rc = main(["data", "check", "--config", "cpu_v1", "data.dataset=folder", f"data.root={root}", "data.image_size=16"])
    out = capsys.readouterr().out
    assert rc == 1
    found = [ln for ln in out.splitlines() if "duplicate_content" in ln]
    assert len(found) == 2, out
    assert any("copy.png" in ln and "img0.png" in ln for ln in found)
    assert any("other.bmp" in ln and "img1.png" in ln for ln in found)
    # ... and fit stops before training
    run = tmp_path / "run"
    rc = main(fit_args(root, run))
    err = capsys.readouterr().err
    assert rc == 2 and "duplicate_content" in err and not (run / "checkpoints" / "last.ckpt").exists()


def test_single_class_data_is_refused_before_training(tmp_path, capsys):
    root = write_synthetic_folder(tmp_path / "data", (8,), names=("benign",), **NUMBERED)
    rc = main(
        [
            "data",
            "check",
            "--config",
            "cpu_v1",
            "data.dataset=folder",
            f"data.root={root}",
            "data.image_size=16",
            "data.split=random",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and "single_class" in out and "at least 2 classes" in out
    run = tmp_path / "run"
    rc = main(fit_args(root, run))
    err = capsys.readouterr().err
    assert rc == 2 and "at least 2 classes" in err and "Traceback" not in err
    assert not (run / "checkpoints" / "last.ckpt").exists()


def test_check_dataset_duplicate_policy(tmp_path):
    """The policy switch: off / warning / error (the default)."""
    from diffmic.data.records import DatasetIndex, Record

    _png(tmp_path / "a.png", 0)
    _png(tmp_path / "b.png", 1)
    _png(tmp_path / "c.png", 2)
    (tmp_path / "a2.png").write_bytes((tmp_path / "a.png").read_bytes())
    names = ["x", "y"]
    splits = {
        "train": DatasetIndex(
            [
                Record("a", 0, tmp_path / "a.png"),
                Record("b", 1, tmp_path / "b.png"),
                Record("c", 1, tmp_path / "c.png"),
            ],
            names,
        ),
        "test": DatasetIndex([Record("a2", 0, tmp_path / "a2.png"), Record("b2", 1, tmp_path / "b.png")], names),
    }
    with pytest.raises(DataError, match="duplicate_content"):
        check_dataset(splits)
    rep = check_dataset(splits, duplicate_content="warning", skip_bad=True)
    assert [p.kind for p in rep.warnings if p.kind == "duplicate_content"] == ["duplicate_content"]
    kinds = {p.kind for p in check_dataset(splits, duplicate_content="off", skip_bad=True).problems}
    assert "duplicate_content" not in kinds and "split_overlap" in kinds  # the same file: as before


# ------------------------------------------ issue 21.11: the same image under two labels
def _conflict_splits(tmp: Path, where: str):
    """benign a.png and a byte-identical malignant copy, in one split or in two."""
    from diffmic.data.records import DatasetIndex, Record

    for i, name in enumerate(("a", "b", "c", "d", "e", "f")):
        _png(tmp / f"{name}.png", i)
    (tmp / "copy.png").write_bytes((tmp / "a.png").read_bytes())
    names = ["benign", "malignant"]
    train = [Record("a", 0, tmp / "a.png"), Record("b", 1, tmp / "b.png"), Record("c", 0, tmp / "c.png")]
    test = [Record("d", 0, tmp / "d.png"), Record("e", 1, tmp / "e.png"), Record("f", 1, tmp / "f.png")]
    (train if where == "one split" else test).append(Record("copy", 1, tmp / "copy.png"))
    return {"train": DatasetIndex(train, names), "test": DatasetIndex(test, names)}


@pytest.mark.parametrize("where", ["one split", "two splits"])
def test_same_pixels_under_two_labels_is_a_label_conflict(tmp_path, where):
    splits = _conflict_splits(tmp_path, where)
    with pytest.raises(DataError, match="label_conflict") as exc:
        check_dataset(splits)
    msg = str(exc.value)
    conflict = [ln for ln in msg.splitlines() if "ERROR label_conflict" in ln]
    assert conflict and all("a.png" in ln and "copy.png" in ln for ln in conflict), msg
    assert "'benign'" in conflict[0] and "'malignant'" in conflict[0]
    assert "duplicate_content" not in msg and "leakage" not in msg  # not a leakage: a conflict
    rep = check_dataset(splits, skip_bad=True)  # both dropped, no label picked
    assert sorted(p.record_id for p in rep.removed) == ["a", "copy"]
    assert all(p.kind == "label_conflict" for p in rep.removed)
    left = {r.id for ix in rep.splits.values() for r in ix.records}
    assert "a" not in left and "copy" not in left and len(left) == 5
    # a public benchmark keeps its published split: a warning, nothing dropped
    rep = check_dataset(splits, label_conflict="warning", duplicate_content="warning", skip_bad=True)
    assert not rep.removed and [p.kind for p in rep.warnings].count("label_conflict") == 2


def test_same_pixels_same_label_in_two_splits_stays_a_leakage(tmp_path):
    splits = _conflict_splits(tmp_path, "two splits")
    splits["test"].records[-1] = splits["test"].records[-1].__class__("copy", 0, tmp_path / "copy.png")
    with pytest.raises(DataError, match="duplicate_content"):
        check_dataset(splits)
    rep = check_dataset(splits, skip_bad=True)
    assert [p.record_id for p in rep.removed] == ["a"]  # the test copy is kept, as before


def test_label_conflict_in_a_folder_is_named_and_skip_bad_drops_both(tmp_path, capsys):
    import csv

    root = write_synthetic_folder(tmp_path / "data", (10, 10), **NUMBERED)  # 21 images, 19 left: no batch of 1
    (root / "malignant" / "same.png").write_bytes((root / "benign" / "img3.png").read_bytes())
    rc = main(["data", "check", "--config", "cpu_v1", "data.dataset=folder", f"data.root={root}", "data.image_size=16"])
    out = capsys.readouterr().out
    found = [ln for ln in out.splitlines() if "label_conflict:" in ln and "ERROR" in ln]
    assert rc == 1 and len(found) == 2 and all("img3.png" in ln and "same.png" in ln for ln in found), out
    run = tmp_path / "run"
    rc = main(fit_args(root, run, epochs=1))  # split at random: wherever the two copies land
    err = capsys.readouterr().err
    assert rc == 2 and "label_conflict" in err and "img3.png" in err and "same.png" in err, err
    assert main(fit_args(root, run, "data.skip_bad=true", "--overwrite", epochs=1)) == 0
    with open(run / "skipped.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(Path(r["path"]).name for r in rows) == ["img3.png", "same.png"]
    assert {r["problem"] for r in rows} == {"label_conflict"}
    split = json_load(run / "split.json")["splits"]
    ids = {i for v in split.values() for i in v}
    assert not any("img3" in i and "benign" in i for i in ids) and not any("same" in i for i in ids)


def json_load(path: Path):
    import json

    return json.loads(path.read_text())
