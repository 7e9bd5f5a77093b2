"""Issue 9 (predict side): outputs never collide and never overwrite inputs or foreign files,
every bad image is named (or skipped with --skip-bad), EXIF orientation is applied, the noise is
seeded from the pixels (not the path), and a non-checkpoint --ckpt gets a correct message.

One tiny model is trained once (synthetic 2-class folder, 32 px, a few seconds on one thread)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.cli import main

from _helpers import fit_args, one_thread  # noqa: F401
from conftest import NUMBERED, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pred")
    data = write_synthetic_folder(tmp / "data", (8, 8), **NUMBERED)
    run = tmp / "run"
    assert main(fit_args(data, run, epochs=1)) == 0
    return run


def _inputs(tmp: Path) -> Path:
    """in/a/scan.png, in/b/scan.png (same stem, different folders), in/scan.jpg."""
    rng = np.random.default_rng(1)
    for sub in ("a", "b"):
        (tmp / "in" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp / "in" / sub / "scan.png")
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp / "in" / "scan.jpg")
    return tmp / "in"


def _files(folder: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_explanations_keep_relative_paths_and_never_collide(trained, tmp_path, capsys):
    src = _inputs(tmp_path)
    out = tmp_path / "explain"
    rc = main(["predict", "--run", str(trained), str(src), "--explain", str(out), "--output", str(tmp_path / "p.csv")])
    assert rc == 0, capsys.readouterr().err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    # 3 inputs -> 3 distinct files (before: a/scan.png and b/scan.png both wrote explain/scan.png)
    assert written == ["in/a/scan.png", "in/b/scan.png", "in/scan.png"]
    with open(tmp_path / "p.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 3
    # running again replaces our own earlier outputs (recognised by their tag / header)
    assert (
        main(["predict", "--run", str(trained), str(src), "--explain", str(out), "--output", str(tmp_path / "p.csv")])
        == 0
    )


def test_predict_never_overwrites_inputs_or_foreign_files(trained, tmp_path, capsys):
    src = _inputs(tmp_path)
    before = _files(src)
    img = src / "a" / "scan.png"
    # --output pointing at an input image
    rc = main(["predict", "--run", str(trained), str(src), "--output", str(img)])
    err = capsys.readouterr().err
    assert rc == 2 and str(img) in err and "input" in err and "Traceback" not in err
    # --explain at the input folder
    rc = main(["predict", "--run", str(trained), str(src), "--explain", str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and "inside the input folder" in err
    assert _files(src) == before
    # an existing file that is not ours: named, exit 2, untouched
    foreign = tmp_path / "notes.csv"
    foreign.write_text("patient,comment\n1,keep me\n")
    rc = main(["predict", "--run", str(trained), str(img), "--output", str(foreign)])
    err = capsys.readouterr().err
    assert rc == 2 and str(foreign) in err and foreign.read_text() == "patient,comment\n1,keep me\n"
    ex = tmp_path / "ex"
    (ex / "a").mkdir(parents=True)
    Image.new("RGB", (5, 5)).save(ex / "a" / "scan.png")  # a user's PNG where our output would go
    theirs = (ex / "a" / "scan.png").read_bytes()
    rc = main(["predict", "--run", str(trained), str(src / "a"), "--explain", str(ex)])
    err = capsys.readouterr().err
    assert rc == 2 and "ex/a/scan.png" in err and (ex / "a" / "scan.png").read_bytes() == theirs


def test_predict_names_every_bad_file_and_skip_bad(trained, tmp_path, capsys):
    src = _inputs(tmp_path)
    (src / "broken1.png").write_bytes(b"not an image")
    (src / "b" / "broken2.jpg").write_bytes(b"\xff\xd8\xff garbage")
    rc = main(["predict", "--run", str(trained), str(src)])
    err = capsys.readouterr().err
    assert rc == 2 and "broken1.png" in err and "broken2.jpg" in err and "--skip-bad" in err
    rc = main(["predict", "--run", str(trained), str(src), "--skip-bad", "--output", str(tmp_path / "p.csv")])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "broken1.png" in cap.err and "broken2.jpg" in cap.err
    with open(tmp_path / "p.csv", newline="") as fh:
        assert sorted(Path(r["id"]).name for r in csv.DictReader(fh)) == ["scan.jpg", "scan.png", "scan.png"]


def test_same_pixels_same_answer_whatever_the_path(trained, tmp_path, monkeypatch):
    from diffmic.inference.predictor import Predictor

    p = Predictor.from_checkpoint(trained / "checkpoints" / "best.ckpt", device="cpu")
    rng = np.random.default_rng(5)
    img = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(img)
    copy = tmp_path / "some" / "other_name.png"
    copy.parent.mkdir()
    copy.write_bytes(img.read_bytes())
    monkeypatch.chdir(tmp_path)
    rel, absolute = p.predict(["x.png"])[0], p.predict([str(img.resolve())])[0]
    renamed = p.predict([str(copy)])[0]
    # bit-identical noise: the same probabilities (before: seeded by the path string)
    assert rel.probs == absolute.probs == renamed.probs
    # and the noise does depend on the pixels (a different image gets other noise keys)
    from diffmic.inference.predictor import pixel_key

    a = torch.zeros(3, 4, 4)
    assert pixel_key(a) != pixel_key(a + 1e-3) and pixel_key(a) == pixel_key(a.clone())


def test_exif_orientation_is_applied(tmp_path):
    """A portrait photo stored landscape with EXIF orientation 6 (rotate 90° clockwise to view)
    decodes exactly like the upright image saved without EXIF."""
    from diffmic.data.transforms import PREPROCESS_VERSION, decode_image

    rng = np.random.default_rng(0)
    upright = rng.integers(0, 255, (48, 32, 3), dtype=np.uint8)  # H=48, W=32 as seen
    stored = np.rot90(upright, k=1)  # rotated 90° counter-clockwise in the file (32x48)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "cam.png", exif=exif)
    Image.fromarray(upright).save(tmp_path / "up.png")
    a = decode_image(tmp_path / "cam.png", 32)
    b = decode_image(tmp_path / "up.png", 32)
    np.testing.assert_array_equal(a, b)
    assert PREPROCESS_VERSION >= 2  # caches of EXIF-ignoring decodes are not reused


def test_exif_orientation_in_the_cache_key(tmp_path):
    from diffmic.data import transforms
    from diffmic.data.cache import DecodedCache
    from diffmic.data.records import DatasetIndex, Record

    ix = DatasetIndex([Record(id="a", label=0, path=tmp_path / "a.png")], ["x"])
    k2 = DecodedCache.key(ix, 32)
    old = transforms.PREPROCESS_VERSION
    try:
        import diffmic.data.cache as cache_mod

        cache_mod.PREPROCESS_VERSION = 1
        assert DecodedCache.key(ix, 32) != k2
    finally:
        cache_mod.PREPROCESS_VERSION = old


def test_non_checkpoint_file_as_ckpt_gets_a_correct_message(trained, tmp_path, capsys):
    png = tmp_path / "scan.png"
    Image.new("RGB", (8, 8)).save(png)
    rc = main(["predict", "--ckpt", str(png), str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and "is not a checkpoint: it is a PNG image" in err and "pickled" not in err
    rc = main(["test", "--run", str(trained), "--ckpt", str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and "PNG image" in err


def test_config_path_that_is_a_folder(tmp_path, capsys):
    for argv in (["fit", "--config", str(tmp_path)], ["data", "check", "--config", str(tmp_path)]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "is a folder" in err and "Traceback" not in err, err
