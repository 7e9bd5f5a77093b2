"""DiffMICDataModule and the datasets it serves."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmic.data import DataError, DiffMICDataModule, ImagePathsDataset

from _helpers import need as _need
from conftest import write_synthetic_folder


def _folder(root: Path, per_class=(12, 9, 6)) -> Path:
    """``root/class<c>/<i>.png``: 20x26 RGB noise, class c brighter by 40 c."""
    names = [f"class{c}" for c in range(len(per_class))]
    kw = {"stem": "{i}", "order": "grouped", "region": "all", "background": 128.0, "spread": 70.0, "contrast": 40.0}
    return write_synthetic_folder(root, per_class, (20, 26), names, seed=0, **kw)


def _check_batch(b, B, C, S):
    assert set(b) == {"image", "label", "index", "id"}
    assert b["image"].shape == (B, C, S, S) and b["image"].dtype == torch.float32
    assert b["label"].dtype == torch.long and b["label"].shape == (B,)
    assert b["index"].dtype == torch.long and isinstance(b["id"], list) and len(b["id"]) == B
    assert torch.isfinite(b["image"]).all()


def test_folder_datamodule_end_to_end(tmp_path):
    root = _folder(tmp_path / "imgs")
    kw = dict(
        dataset="folder", root=root, image_size=16, batch_size=4, val_fraction=0.2, seed=3, cache_dir=tmp_path / "cache"
    )
    dm = DiffMICDataModule(**kw)
    assert dm.num_classes == 3 and dm.class_names == ["class0", "class1", "class2"]
    dm.setup("fit")
    sizes = dm.split_sizes
    assert sum(sizes.values()) == 27 and sizes["test"] == 8 and sizes["val"] >= 3
    ids = {k: set(ix.ids) for k, ix in dm.indexes.items()}
    assert not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert not ids["train"] & ids["val"]
    b = next(iter(dm.train_dataloader()))
    _check_batch(b, 4, 3, 16)
    tb = next(iter(dm.test_dataloader()))
    _check_batch(tb, 4, 3, 16)
    # eval batches are deterministic and un-augmented; predict serves the test split
    pb = next(iter(dm.predict_dataloader()))
    assert torch.equal(pb["image"], tb["image"]) and pb["id"] == tb["id"]
    assert pb["index"].tolist() == [0, 1, 2, 3]
    assert dm.cache.misses == 2
    # a second module reuses the cache (and skips re-opening the images)
    dm2 = DiffMICDataModule(**kw)
    dm2.setup()
    assert dm2.cache.hits == 2 and dm2.cache.misses == 0
    assert not dm2.report.checked_images
    assert [x["id"] for x in dm2.datasets["train"]] == [x["id"] for x in dm.datasets["train"]]
    assert "class2" in dm2.summary()
    # datasets pickle without copying the memory-mapped cache (spawned workers reopen it)
    clone = pickle.loads(pickle.dumps(dm.datasets["test"]))
    assert clone.images is None
    assert torch.equal(clone[0]["image"], dm.datasets["test"][0]["image"])
    # a different image size is a new cache entry
    dm3 = DiffMICDataModule(**{**kw, "image_size": 8})
    dm3.setup()
    assert dm3.cache.misses == 2
    # prediction on arbitrary files
    ds = ImagePathsDataset(sorted(root.rglob("*.png"))[:3], image_size=16)
    x = ds[0]
    assert x["label"] == -1 and x["image"].shape == (3, 16, 16)
    pb = next(iter(dm.paths_dataloader(sorted(root.rglob("*.png"))[:5], batch_size=5)))
    _check_batch(pb, 5, 3, 16)
    assert (pb["label"] == -1).all()


def test_train_loader_is_seeded(tmp_path):
    root = _folder(tmp_path / "imgs")
    kw = dict(
        dataset="folder",
        root=root,
        image_size=8,
        batch_size=32,
        seed=5,
        cache_dir=tmp_path / "cache",
        rotation=0.0,
        hflip=False,
    )
    a = next(iter(DiffMICDataModule(**kw).train_dataloader()))["id"]
    b = next(iter(DiffMICDataModule(**kw).train_dataloader()))["id"]
    assert a == b and len(a) == len(set(a))
    # worker processes see the same data
    dm = DiffMICDataModule(**kw, num_workers=2)
    c = next(iter(dm.train_dataloader()))
    assert c["id"] == a and c["image"].shape == (len(a), 3, 8, 8)


def test_bad_data_raises_at_setup_and_skip_bad(tmp_path):
    root = _folder(tmp_path / "imgs")
    (root / "class1" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    kw = dict(dataset="folder", root=root, image_size=8, cache_dir=tmp_path / "cache")
    with pytest.raises(DataError, match="broken.png"):
        DiffMICDataModule(**kw).setup()
    dm = DiffMICDataModule(**kw, skip_bad=True)
    dm.setup()
    assert [p.record_id for p in dm.report.removed] == ["class1/broken.png"]
    assert sum(dm.split_sizes.values()) == 27
    rep = DiffMICDataModule(**kw).check()  # `diffmic data check`: a report, not an exception
    assert [p.kind for p in rep.errors] == ["corrupt_image"] and "NOT OK" in rep.summary()
    with pytest.raises(DataError):
        DiffMICDataModule(**kw).check(raise_on_error=True)


def test_csv_datamodule_with_split_column(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=(6, 6))
    rows = []
    for i, p in enumerate(sorted(root.rglob("*.png"))):
        rows.append([p.relative_to(root).as_posix(), p.parent.name, ["train", "train", "val", "test"][i % 4]])
    f = tmp_path / "m.csv"
    with open(f, "w", newline="") as fh:
        csv.writer(fh).writerows([["path", "label", "split"], *rows])
    dm = DiffMICDataModule(
        dataset="csv",
        root=root,
        csv_path=f,
        split_col="split",
        image_size=8,
        batch_size=2,
        cache_dir=tmp_path / "cache",
        allow_empty_classes=True,
    )
    dm.setup()
    assert dm.split_sizes == {"train": 6, "val": 3, "test": 3}
    _check_batch(next(iter(dm.val_dataloader())), 2, 3, 8)


def test_ham10000_subset_datamodule(tmp_path):
    root = _need("ham10000")
    dm = DiffMICDataModule(
        dataset="ham10000",
        root=root,
        split="lesion",
        image_size=32,
        batch_size=8,
        subset=60,
        cache_dir=tmp_path / "cache",
        seed=1,
    )
    dm.setup()
    sizes = dm.split_sizes
    assert sizes["train"] + sizes["val"] == 60 and sizes["test"] == 30
    assert (dm.indexes["test"].class_counts() > 0).all()
    g = {k: {r.group for r in ix} for k, ix in dm.indexes.items()}
    assert not g["train"] & g["val"] and not g["train"] & g["test"]
    _check_batch(next(iter(dm.train_dataloader())), 8, 3, 32)
    assert dm.num_classes == 7


def test_breastmnist_datamodule_grey(tmp_path):
    f = _need("breastmnist") / "breastmnist.npz"
    dm = DiffMICDataModule(
        dataset="medmnist", root=f, image_size=28, in_chans=1, batch_size=16, cache_dir=tmp_path / "cache"
    )
    dm.setup()
    assert dm.split_sizes == {"train": 546, "val": 78, "test": 156}
    assert dm.num_classes == 2
    _check_batch(next(iter(dm.train_dataloader())), 16, 1, 28)
    arr = dm.datasets["test"]._array()
    assert arr.shape == (156, 28, 28, 1)


def test_aptos_two_images_datamodule(tmp_path):
    root = _need("aptos2019")
    with pytest.raises(DataError, match="missing_file: 3660"):
        DiffMICDataModule(dataset="aptos2019", root=root, cache_dir=tmp_path / "c").setup()
    dm = DiffMICDataModule(
        dataset="aptos2019",
        root=root,
        image_size=64,
        batch_size=2,
        vflip=True,
        require_images=False,
        allow_empty_classes=True,
        val_fraction=0.0,
        cache_dir=tmp_path / "c",
    )
    dm.setup()
    assert len(dm.missing_dropped) == 3660
    assert dm.split_sizes == {"train": 2, "val": 0, "test": 0}
    b = next(iter(dm.train_dataloader()))
    _check_batch(b, 2, 3, 64)
    assert sorted(b["id"]) == ["000c1434d8d7", "1ae3c58759fb"]


def test_class_balance_weights_closed_form():
    from diffmic.data.sampling import class_balance_weights

    labels = np.array([0] * 64 + [1] * 16 + [2] * 4)
    for power, expected in ((0.0, [64, 16, 4]), (0.5, [8, 4, 2]), (1.0, [1, 1, 1])):
        w = class_balance_weights(labels, power)
        share = np.array([w[labels == c].sum() for c in range(3)])
        np.testing.assert_allclose(share / share.sum(), np.array(expected) / sum(expected))
    with pytest.raises(ValueError, match="power"):
        class_balance_weights(labels, 1.5)


def test_weighted_sampler_frequencies_and_determinism():
    from diffmic.data.sampling import EpochSeededSampler, class_balance_weights

    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    s = EpochSeededSampler(len(labels), seed=7, weights=class_balance_weights(labels, 1.0))
    draws = []
    for epoch in range(20):
        s.set_epoch(epoch)
        pairs = list(s)
        assert len(pairs) == len(labels)
        draws.append([i for i, _ in pairs])
        # augmentation seeds are distinct even where an index repeats
        assert len({seed for _, seed in pairs}) == len(pairs)
    freq = np.bincount(labels[np.concatenate(draws)], minlength=3) / (20 * len(labels))
    np.testing.assert_allclose(freq, [1 / 3] * 3, atol=0.02)  # 20,000 draws: sd about 0.003
    s.set_epoch(3)
    assert [i for i, _ in s] == draws[3]  # a function of (seed, epoch) only (resume-safe)
    assert draws[3] != draws[4]
    zero = EpochSeededSampler(3, seed=0, weights=[1.0, 0.0, 1.0])
    assert 1 not in {i for i, _ in zero}
    with pytest.raises(ValueError, match="weights"):
        EpochSeededSampler(3, seed=0, weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="weights"):
        EpochSeededSampler(3, seed=0, weights=[1.0, 1.0])


def test_balanced_train_loader_and_val_split(tmp_path):
    root = _folder(tmp_path / "imgs", per_class=(40, 8, 4))
    kw = dict(
        dataset="folder",
        root=root,
        image_size=8,
        batch_size=200,
        seed=5,
        val_fraction=0.0,
        cache_dir=tmp_path / "cache",
        rotation=0.0,
        hflip=False,
    )
    plain = DiffMICDataModule(**kw)
    labels = plain.get_dataset("train").labels
    n = np.bincount(labels)
    b = next(iter(plain.train_dataloader()))
    np.testing.assert_array_equal(np.bincount(b["label"].numpy(), minlength=3), n)  # a permutation
    bal = DiffMICDataModule(**kw, class_balance=1.0)
    counts = np.zeros(3)
    loader = bal.train_dataloader()
    for epoch in range(10):
        loader.sampler.set_epoch(epoch)
        counts += np.bincount(next(iter(loader))["label"].numpy(), minlength=3)
    assert counts.sum() == 10 * len(labels)
    # balanced: each class about a third of the draws, against 40/52 for the majority before
    np.testing.assert_allclose(counts / counts.sum(), [1 / 3] * 3, atol=0.06)
    with pytest.raises(ValueError, match="class_balance"):
        DiffMICDataModule(**kw, class_balance=2.0)
    # val_split="test" validates on the test split (select_on=test, the released protocol)
    dm = DiffMICDataModule(**kw, val_split="test")
    assert next(iter(dm.val_dataloader()))["id"] == next(iter(dm.test_dataloader()))["id"]


def test_config_reaches_the_datamodule(tmp_path):
    from diffmic.config import load_config
    from diffmic.training.run import build_datamodule

    root = _folder(tmp_path / "imgs")
    base = [f"data.root={root}", "data.dataset=folder", f"data.cache_dir={tmp_path / 'cache'}"]
    dm = build_datamodule(load_config("cpu_v1", base))
    assert dm.class_balance == 0.5 and dm.val_split == "val"  # the CPU preset balances by sqrt(n_c)
    dm = build_datamodule(load_config("cpu_v1", [*base, "data.class_balance=0", "train.select_on=test"]))
    assert dm.class_balance == 0.0 and dm.val_split == "test"
    assert dm.train_dataloader().sampler.weights is None


@pytest.mark.parametrize("batch_size", [2, 3, 4, 7, 64])  # 15 training images: 2 and 7 leave one
def test_no_training_batch_of_one_image_and_the_budget_counts_the_batches(tmp_path, batch_size):
    """A training split whose size leaves one image in the last batch would crash BatchNorm
    ("Expected more than 1 value per channel"): that batch is dropped, and the step budget counts the
    batches the loader really gives."""
    from diffmic.data.sampling import train_batches_per_epoch
    from diffmic.training.budget import steps_per_epoch

    root = _folder(tmp_path / "imgs")
    dm = DiffMICDataModule(
        dataset="folder", root=root, image_size=8, batch_size=batch_size, val_fraction=0.2, seed=3, cache_dir=tmp_path
    )
    dm.setup("fit")
    n = dm.split_sizes["train"]
    sizes = [len(b["label"]) for b in dm.train_dataloader()]
    assert 1 not in sizes or n == 1
    assert len(sizes) == train_batches_per_epoch(n, batch_size) == steps_per_epoch(n, batch_size)
    # closed form: every image is seen unless the last batch would hold exactly one
    assert sum(sizes) == (n - 1 if n % batch_size == 1 and n > batch_size else n)


def test_train_batches_per_epoch_closed_form():
    from diffmic.data.sampling import train_batches_per_epoch

    assert [train_batches_per_epoch(n, 4) for n in (1, 3, 4, 5, 6, 8, 9)] == [1, 1, 1, 1, 2, 2, 2]
    assert train_batches_per_epoch(7011 - 702, 32) == 198  # HAM10000 authors' split, 6,309 images
    assert train_batches_per_epoch(546, 64) == 9
