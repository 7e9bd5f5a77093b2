"""Decoding, preprocessing, augmentation, the decoded-image cache and the data checks."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.data import (
    DataError,
    DatasetIndex,
    DecodedCache,
    Normalize,
    Record,
    TrainAugment,
    build_transform,
    check_dataset,
    decode_image,
    default_cache_dir,
    load_image_folder,
)
from diffmic.data.checks import check_image_file
from diffmic.data.transforms import center_square_crop_box


def _save(img: Image.Image, path: Path, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    return path


# ---------------------------------------------------------------------------------------------
# preprocessing


def test_center_crop_box_matches_released_rounding():
    assert center_square_crop_box(600, 450) == (75, 0, 525, 450)
    assert center_square_crop_box(5, 2) == (round(1.5), 0, round(1.5) + 2, 2)  # banker's: 2
    assert center_square_crop_box(200, 150) == (25, 0, 175, 150)
    assert center_square_crop_box(10, 13) == (0, 2, 10, 12)


def test_crop_then_resize_keeps_centre(tmp_path):
    a = np.zeros((150, 200, 3), np.uint8)
    a[:, :25] = 255  # left margin is cropped away
    a[:, 175:] = 255  # right margin too
    a[:, 25:175] = (0, 128, 0)
    out = decode_image(_save(Image.fromarray(a), tmp_path / "x.png"), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.all(out[..., 0] == 0) and np.all(out[..., 1] == 128)


def test_modes_decode_to_expected_values(tmp_path):
    S = 8
    # grey -> replicated RGB, or kept grey
    g = _save(Image.new("L", (10, 10), 77), tmp_path / "g.png")
    assert np.all(decode_image(g, S) == 77) and decode_image(g, S).shape == (S, S, 3)
    assert decode_image(g, S, in_chans=1).shape == (S, S, 1)
    # 16-bit grey: 0..65535 scaled to 0..255
    a16 = np.full((10, 10), 65535, np.uint16)
    a16[:, 5:] = 32896  # 128 * 257
    p16 = _save(Image.fromarray(a16), tmp_path / "g16.png")
    assert Image.open(p16).mode.startswith("I")
    out = decode_image(p16, 10, in_chans=1)[..., 0]
    assert out[:, :4].min() == 255 and out[:, 6:].max() == 128
    # 32-bit 'I' holding 16-bit data
    out = decode_image(Image.fromarray(a16.astype(np.int32)), 10, in_chans=1)[..., 0]
    assert out[0, 0] == 255 and out[0, 9] == 128
    # palette, with and without transparency
    p = Image.new("P", (10, 10), 1)
    p.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    assert np.all(decode_image(_save(p, tmp_path / "p.png"), S) == (200, 10, 20))
    pt = _save(p, tmp_path / "pt.png", transparency=1)
    assert np.all(decode_image(pt, S) == 0)  # fully transparent -> black
    # RGBA composited on black
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., :3] = (100, 200, 250)
    rgba[:, :5, 3] = 255
    rgba[:, 5:, 3] = 0
    out = decode_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"), 10)
    assert np.all(out[:, :4] == (100, 200, 250)) and np.all(out[:, 6:] == 0)
    half = np.dstack([np.full((4, 4, 3), 200, np.uint8), np.full((4, 4), 128, np.uint8)])
    assert np.all(decode_image(Image.fromarray(half, "RGBA"), 4) == 100)
    # LA, CMYK, bilevel, RGB -> grey
    la = Image.fromarray(np.dstack([np.full((4, 4), 90, np.uint8), np.full((4, 4), 255, np.uint8)]), "LA")
    assert np.all(decode_image(la, 4, in_chans=1) == 90)
    cmyk = _save(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), tmp_path / "c.jpg", quality=100)
    out = decode_image(cmyk, 4)
    assert out[..., 0].min() > 200 and out[..., 1:].max() < 60
    assert np.all(decode_image(Image.new("1", (4, 4), 1), 4) == 255)
    assert np.all(decode_image(Image.new("RGB", (4, 4), (255, 255, 255)), 4, in_chans=1) == 255)
    # arrays (MedMNIST)
    assert decode_image(np.full((28, 28), 9, np.uint8), 56).shape == (56, 56, 3)
    assert np.all(decode_image(np.full((28, 28, 3), 9, np.uint8), 14, in_chans=1) == 9)


def test_bomb_guard(tmp_path):
    p = _save(Image.new("RGB", (300, 300)), tmp_path / "big.png")
    with pytest.raises(DataError, match="MP limit"):
        decode_image(p, 32, max_pixels=50_000)
    assert decode_image(p, 32, max_pixels=None).shape == (32, 32, 3)
    info, kind, _ = check_image_file(p, max_pixels=50_000)
    assert info is None and kind == "too_large"


def test_normalize_and_augment():
    x = torch.full((3, 16, 16), 255, dtype=torch.uint8)
    y = Normalize(3)(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y[:, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225]))
    g = Normalize(1)(torch.zeros(1, 4, 4, dtype=torch.uint8))
    assert torch.allclose(g, torch.tensor(-(0.485 + 0.456 + 0.406) / (0.229 + 0.224 + 0.225)))
    torch.manual_seed(0)
    aug = TrainAugment(hflip=True, vflip=True, rotation=30.0)
    img = torch.full((3, 32, 32), 200, dtype=torch.uint8)
    outs = [aug(img) for _ in range(20)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.uint8 for o in outs)
    assert any(o[:, 0, 0].sum() == 0 for o in outs)  # rotated: black corners
    assert all(o[:, 16, 16].tolist() == [200, 200, 200] for o in outs)
    flip = TrainAugment(hflip=True, rotation=0)
    ramp = torch.arange(8, dtype=torch.uint8).repeat(1, 8, 1)
    seen = {tuple(flip(ramp)[0, 0].tolist()) for _ in range(30)}
    assert seen == {tuple(range(8)), tuple(range(7, -1, -1))}
    t = build_transform(train=True, in_chans=1)
    assert t(torch.zeros(1, 8, 8, dtype=torch.uint8)).shape == (1, 8, 8)
    # the Dataset path: uint8 HWC array -> normalised float CHW, same values as Normalize
    arr = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    ev = build_transform(train=False)(arr)
    ref = Normalize(3)(torch.from_numpy(arr).permute(2, 0, 1))
    assert ev.dtype == torch.float32 and torch.allclose(ev, ref, atol=1e-5)
    tr = build_transform(train=True, rotation=30.0)
    torch.manual_seed(1)
    black = Normalize(3)(torch.zeros(3, 1, 1, dtype=torch.uint8))[:, 0, 0]
    outs = [tr(np.full((32, 32, 3), 200, np.uint8)) for _ in range(10)]
    assert all(o.shape == (3, 32, 32) for o in outs)
    assert any(torch.allclose(o[:, 0, 0], black) for o in outs)  # PIL rotation, black corners
    torch.manual_seed(1)
    assert torch.equal(tr(np.full((32, 32, 3), 200, np.uint8)), outs[0])  # torch RNG drives it


# ---------------------------------------------------------------------------------------------
# cache


def _folder(tmp_path: Path, n=6) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for i in range(n):
        a = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        _save(Image.fromarray(a), root / ("a" if i % 2 else "b") / f"{i}.png")
    return root


def test_cache_hit_miss_and_invalidation(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    ix = load_image_folder(root)["all"]
    cache = DecodedCache(tmp_path / "cache", workers=2)
    a = cache.get(ix, 16, 3)
    assert (cache.hits, cache.misses) == (0, 1) and a.shape == (6, 16, 16, 3)
    expect = np.stack([decode_image(r.path, 16) for r in ix.records])
    assert np.array_equal(a, expect)
    b = cache.get(ix, 16, 3)
    assert (cache.hits, cache.misses) == (1, 1) and isinstance(b, np.memmap)
    assert np.array_equal(a, b)
    cache.get(ix, 24, 3)  # image size change -> miss
    assert cache.misses == 2
    cache.get(ix, 16, 1)  # channels change -> miss
    assert cache.misses == 3
    # a changed file -> miss, and the new pixels
    p = ix.records[0].path
    Image.new("RGB", (40, 40), (1, 2, 3)).save(p)
    st = os.stat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    c = cache.get(ix, 16, 3)
    assert cache.misses == 4 and np.all(c[0] == (1, 2, 3))
    cache.get(ix, 16, 3)
    assert cache.hits == 2
    # a different record set -> miss
    cache.get(ix.subset([0, 1]), 16, 3)
    assert cache.misses == 5
    assert not list((tmp_path / "cache").glob("*.tmp"))  # atomic writes leave nothing behind
    assert cache.clear() == 5
    monkeypatch.setenv("DIFFMIC_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    assert DecodedCache().cache_dir == tmp_path / "envcache"


def test_cache_failure_lists_all_and_leaves_no_file(tmp_path):
    root = _folder(tmp_path)
    (root / "a" / "bad1.png").write_bytes(b"garbage")
    (root / "b" / "bad2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    ix = load_image_folder(root)["all"]
    cache = DecodedCache(tmp_path / "cache")
    with pytest.raises(DataError) as ei:
        cache.get(ix, 8)
    assert "bad1.png" in str(ei.value) and "bad2.png" in str(ei.value)
    assert not list((tmp_path / "cache").iterdir())


def test_cache_in_memory_arrays(tmp_path):
    imgs = np.arange(4 * 28 * 28, dtype=np.int64).reshape(4, 28, 28).astype(np.uint8)
    ix = DatasetIndex([Record(f"t{i}", 0, array_index=i) for i in range(4)], ["x"], images=imgs)
    cache = DecodedCache(tmp_path)
    a = cache.get(ix, 28, 1)
    assert np.array_equal(a[..., 0], imgs)
    imgs2 = imgs.copy()
    imgs2[0, 0, 0] += 1
    cache.get(DatasetIndex(ix.records, ["x"], images=imgs2), 28, 1)
    assert cache.misses == 2


# ---------------------------------------------------------------------------------------------
# checks


@pytest.fixture()
def bad_dataset(tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    good = []
    for i in range(4):
        good.append(_save(Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)), root / f"good{i}.png"))
    jpg = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpg, "JPEG")
    (root / "truncated.jpg").write_bytes(jpg.getvalue()[: len(jpg.getvalue()) // 2])
    (root / "corrupt.png").write_bytes(b"not an image at all")
    (root / "empty.png").write_bytes(b"")
    _save(Image.new("RGBA", (8, 8)), root / "rgba.png")
    _save(Image.new("RGB", (8, 8)), root / "other.png")
    recs = [Record(f"good{i}", i % 2, good[i], source=f"list.csv:line {i + 2}") for i in range(4)]
    return root, recs


@pytest.mark.parametrize(
    "case,needle",
    [
        ("corrupt", "corrupt.png"),
        ("empty", "empty.png"),
        ("truncated", "truncated.jpg"),
        ("missing", "nowhere.png"),
        ("duplicate", "duplicate_id"),
        ("label", "label 7 is outside"),
        ("empty_class", "no images of class 2"),
    ],
)
def test_each_problem_raises_naming_the_item(bad_dataset, case, needle):
    root, recs = bad_dataset
    names = ["a", "b"]
    extra = {
        "corrupt": Record("c", 0, root / "corrupt.png", source="list.csv:line 9"),
        "empty": Record("e", 0, root / "empty.png", source="list.csv:line 9"),
        "truncated": Record("t", 0, root / "truncated.jpg", source="list.csv:line 9"),
        "missing": Record("m", 0, root / "nowhere.png", source="list.csv:line 9"),
        "duplicate": Record("good0", 1, recs[1].path, source="list.csv:line 9"),
        "label": Record("l", 7, recs[2].path, source="list.csv:line 9"),
    }
    if case == "empty_class":
        names = ["a", "b", "c"]
        ix = DatasetIndex(recs, names)
    else:
        ix = DatasetIndex(recs + [extra[case]], names)
    with pytest.raises(DataError) as ei:
        check_dataset({"train": ix})
    msg = str(ei.value)
    assert needle in msg
    assert ("list.csv:line 9" in msg) or case == "empty_class"
    assert "->" in msg  # each problem says what to do
    kinds = {p.kind for p in ei.value.problems if p.severity == "error"}
    assert (
        kinds
        == {
            "corrupt": {"corrupt_image"},
            "empty": {"empty_file"},
            "truncated": {"truncated_image"},
            "missing": {"missing_file"},
            "duplicate": {"duplicate_id", "duplicate_file"},
            "label": {"label_out_of_range", "duplicate_file"},
            "empty_class": {"empty_class"},
        }[case]
    )
    assert ei.value.report is not None and not ei.value.report.ok


def test_skip_bad_removes_and_lists(bad_dataset):
    root, recs = bad_dataset
    bad = [
        Record("c", 0, root / "corrupt.png"),
        Record("e", 1, root / "empty.png"),
        Record("t", 0, root / "truncated.jpg"),
        Record("m", 1, root / "nowhere.png"),
        Record("good0", 0, root / "good0.png"),
        Record("l", -3, root / "other.png"),
        Record("r", 1, root / "rgba.png"),
    ]
    ix = DatasetIndex(recs + bad, ["a", "b"])
    test = DatasetIndex([Record("good3", 1, recs[3].path), Record("x", 0, root / "good2.png")], ["a", "b"])
    rep = check_dataset({"train": ix, "test": test}, skip_bad=True)
    assert rep.ok
    removed = {p.record_id for p in rep.removed}
    assert {"c", "e", "t", "m", "good0", "l", "good3", "good2"} <= removed
    assert rep.splits["train"].ids == ["good0", "good1", "r"]
    assert rep.splits["test"].ids == ["good3", "x"]  # leakage: the test copy is kept
    assert any(p.kind == "unusual_mode" and "RGBA" in p.message for p in rep.infos)
    s = rep.summary()
    assert "Removed" in s and "truncated.jpg" in s and "RGBA" in s
    with pytest.raises(DataError, match="split_overlap|test-set leakage"):
        check_dataset({"train": ix.subset([0, 1, 2, 3]), "test": test})


def test_report_summary_counts(tmp_path):
    root = _folder(tmp_path)
    rep = check_dataset(load_image_folder(root))
    s = rep.summary()
    assert "a" in s and "width 30-30" in s and "height 20-25" in s and s.endswith("OK")
    assert rep.image_sizes["all"].shape == (6, 2)


# ---------------------------------------------------------------------------------------------
# fuzz


def _valid_bytes(fmt: str, rng) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def test_fuzz_random_bytes_only_raise_data_error(tmp_path):
    rng = np.random.default_rng(12345)
    seeds = {"png": _valid_bytes("PNG", rng), "jpg": _valid_bytes("JPEG", rng)}
    decoded = failed = 0
    for i in range(200):
        ext = "png" if i % 2 else "jpg"
        kind = i % 4
        if kind < 2:  # pure random bytes, sometimes behind a valid signature
            data = rng.integers(0, 256, int(rng.integers(0, 3000)), dtype=np.uint8).tobytes()
            if kind == 1:
                data = seeds[ext][:16] + data
        else:  # a valid image with random bytes flipped / cut
            b = bytearray(seeds[ext])
            for pos in rng.integers(0, len(b), int(rng.integers(1, 20))):
                b[pos] = int(rng.integers(0, 256))
            data = bytes(b[: int(rng.integers(len(b) // 2, len(b) + 1))]) if kind == 3 else bytes(b)
        p = tmp_path / f"f{i:03d}.{ext}"
        p.write_bytes(data)
        try:
            out = decode_image(p, 16)
            assert out.shape == (16, 16, 3) and out.dtype == np.uint8
            decoded += 1
        except DataError as e:
            assert str(p) in str(e)
            failed += 1
        info, kind_, reason = check_image_file(p)  # never raises
        assert (info is None) == (kind_ is not None)
    assert failed > 100 and decoded > 0  # both paths exercised (no wall-clock assertion: see benchmarks/)
    # the checker copes with the whole folder at once
    recs = [Record(p.name, 0, p) for p in sorted(tmp_path.glob("f*"))]
    rep = check_dataset(DatasetIndex(recs, ["x"]), skip_bad=True)
    assert len(rep.index) + len(rep.removed) == 200
