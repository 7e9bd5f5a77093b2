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

from _safety_data import fit_args, make_folder
from diffmic.cli import main
from diffmic.data.checks import check_dataset
from diffmic.data.records import DataError
from diffmic.data.sources import load_csv_manifest


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
            "cpu",
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
        make_folder(root / split, n=4, seed={"train": 0, "test": 1}[split])
    # a copy of a training image under another name, and one re-encoded as BMP (same pixels)
    (root / "test" / "benign" / "copy.png").write_bytes((root / "train" / "benign" / "img0.png").read_bytes())
    Image.open(root / "train" / "malignant" / "img1.png").save(root / "test" / "malignant" / "other.bmp")
    rc = main(["data", "check", "--config", "cpu", "data.dataset=folder", f"data.root={root}", "data.image_size=16"])
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
    root = make_folder(tmp_path / "data", classes=("benign",), n=8)
    rc = main(
        [
            "data",
            "check",
            "--config",
            "cpu",
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
