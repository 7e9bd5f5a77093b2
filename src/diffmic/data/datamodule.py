"""Datasets over decoded-image caches, and the Lightning DataModule.

Batches are dicts::

    {"image": float32 [B, C, H, W] (ImageNet-normalised), "label": int64 [B],
     "index": int64 [B] (position in the split's dataset), "id": list[str]}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .cache import DecodedCache
from .checks import DataReport, check_dataset
from .datasets import CachedImageDataset, ImagePathsDataset
from .records import DataError, DatasetIndex, Record, filter_existing
from .sampling import EpochSeededSampler, class_balance_weights, drops_last_batch
from .sources import LoadRequest, dataset_spec, split_all
from .splits import kfold_split, pool_splits, stratified_split, stratified_subset
from .transforms import DEFAULT_MAX_PIXELS, build_transform

__all__ = [
    "CachedImageDataset",
    "ImagePathsDataset",
    "EpochSeededSampler",
    "class_balance_weights",
    "DiffMICDataModule",
    "DATASETS",
]

from .sources import DATASETS, SPLITS  # noqa: E402  (defined without Lightning, for the config)


class DiffMICDataModule(pl.LightningDataModule):
    """Data for DiffMIC training, validation, testing and prediction.

    dataset: a name in :data:`~diffmic.data.sources.REGISTRY` (``"ham10000"`` | ``"aptos2019"`` |
        ``"csv"`` | ``"folder"`` | ``"medmnist"``) or one of its aliases; its entry says how it is
        read, split and grouped.
    root: dataset folder (HAM10000 / APTOS / class folders), the ``.npz`` file (MedMNIST), or
        the base folder for relative CSV paths (``csv_path`` names the CSV; a ``root`` ending in
        ``.csv`` is taken as the CSV itself).
    split: ``"authors"`` = the released DiffMIC split (HAM10000, APTOS) or the source's own
        train/val/test (CSV split column, split folders, MedMNIST); a source without a test split
        gets a seeded stratified ``test_fraction`` split. ``"lesion"`` (HAM10000 only) =
        lesion-grouped stratified 7:3; ``"random"`` = seeded stratified 7:3 over all records.
    val_fraction: validation carved from train (stratified; grouped by lesion for HAM10000)
        unless the source has a val split. Test data are never used for training or selection.
    class_balance: 0 samples training images uniformly (the released code); ``p`` in (0, 1]
        draws them with replacement with weight ``n_c ** -p`` (1: balanced classes, 0.5:
        square-root balancing), see :func:`class_balance_weights`.
    val_split: ``"val"``, or ``"test"`` to select models on the test split (released protocol).
    subset: use a stratified subset of at most ``subset`` train and ``subset // 2`` val/test
        records (fast tests, demos).
    folds, fold: k-fold cross-validation (``folds >= 2``): every labelled record of the source (all
        of its splits pooled) is split into ``folds`` stratified folds (lesion- / patient-grouped when
        the records have groups: HAM10000 lesion ids, a CSV ``group_col``), seeded by ``seed``;
        fold ``fold`` (0-based) is the test split, validation is carved from the other folds
        (``val_fraction``), and ``split`` / the source's own splits are not used. ``subset``
        applies to the pooled records before the folds are drawn.
    skip_bad: drop bad records (listed in ``report``) instead of raising :class:`DataError`.
    require_images: ``False`` drops records whose image file is missing before the checks
        (for partial copies such as the two-image APTOS folder); the dropped ids are in
        ``missing_dropped``.
    cache_dir: decoded-image cache folder (default ``$DIFFMIC_CACHE_DIR`` or
        ``<project>/.cache/diffmic``).

    ``setup()`` loads the indexes, runs :func:`check_dataset` (raising before any training),
    carves the validation split and decodes every image once into the cache.
    """

    def __init__(
        self,
        *,
        dataset: str = "ham10000",
        root: str | os.PathLike | None = None,
        split: str = "authors",
        csv_path: str | os.PathLike | None = None,
        path_col: str = "path",
        label_col: str = "label",
        split_col: str | None = None,
        group_col: str | None = None,
        class_names: Sequence[str] | None = None,
        image_size: int = 224,
        in_chans: int = 3,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool | None = None,
        val_fraction: float = 0.1,
        test_fraction: float = 0.3,
        seed: int = 1234,
        hflip: bool = True,
        vflip: bool = False,
        rotation: float = 30.0,
        cache_dir: str | os.PathLike | None = None,
        skip_bad: bool = False,
        subset: int | None = None,
        check_images: bool = True,
        require_images: bool = True,
        allow_empty_classes: bool = False,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        decode_workers: int | None = None,
        predict_split: str = "test",
        class_balance: float = 0.0,
        val_split: str = "val",
        folds: int = 0,
        fold: int = 0,
    ) -> None:
        super().__init__()
        spec = dataset_spec(dataset)
        if split not in SPLITS:
            raise ValueError(f"split must be 'authors', 'lesion' or 'random', got {split!r}")
        problem = spec.split_error(split)
        if problem:
            raise ValueError(problem)
        if in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
        if image_size <= 0 or batch_size <= 0:
            raise ValueError("image_size and batch_size must be positive")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if subset is not None and subset <= 0:
            raise ValueError(f"subset must be a positive int or None, got {subset}")
        if predict_split not in ("train", "val", "test"):
            raise ValueError(f"predict_split must be train/val/test, got {predict_split!r}")
        if val_split not in ("val", "test"):
            raise ValueError(f"val_split must be 'val' or 'test', got {val_split!r}")
        if not 0.0 <= class_balance <= 1.0:
            raise ValueError(f"class_balance must be in [0, 1], got {class_balance}")
        if root is None and csv_path is None:
            raise ValueError("root is required")
        if folds < 0 or folds == 1 or (folds >= 2 and not 0 <= fold < folds):
            raise ValueError(f"folds must be 0 (off) or >= 2 and fold in [0, folds-1], got folds={folds} fold={fold}")
        self.spec = spec
        self.dataset = spec.name
        self.root = Path(root) if root is not None else None
        self.split = split
        self.csv_path = Path(csv_path) if csv_path is not None else None
        self.path_col, self.label_col, self.split_col = path_col, label_col, split_col
        self.group_col = group_col
        self._class_names_arg = list(class_names) if class_names is not None else None
        self.image_size, self.in_chans = int(image_size), int(in_chans)
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size) if eval_batch_size else int(batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.val_fraction, self.test_fraction = float(val_fraction), float(test_fraction)
        self.seed = int(seed)
        self.hflip, self.vflip, self.rotation = bool(hflip), bool(vflip), float(rotation)
        self.cache = DecodedCache(cache_dir, workers=decode_workers, max_pixels=max_pixels)
        self.skip_bad, self.subset = bool(skip_bad), subset
        self.check_images, self.require_images = bool(check_images), bool(require_images)
        self.allow_empty_classes = bool(allow_empty_classes)
        self.max_pixels = max_pixels
        self.predict_split = predict_split
        self.class_balance = float(class_balance)
        self.val_split = val_split
        self.folds, self.fold = int(folds), int(fold)
        self._pooled: DatasetIndex | None = None  # k-fold: every record, in source order

        self.report: DataReport | None = None
        self.missing_dropped: list[Record] = []
        self.indexes: dict[str, DatasetIndex] = {}  # final train / val / test
        self.datasets: dict[str, CachedImageDataset] = {}  # built on first use
        self._arrays: dict[str, np.ndarray] = {}
        self._positions: dict[str, tuple[str, np.ndarray]] = {}
        self._checked: dict[str, DatasetIndex] = {}
        self._sources: dict[str, DatasetIndex] | None = None
        self._is_setup = False

    # ---- indexes -----------------------------------------------------------------------------
    def _load_sources(self) -> dict[str, DatasetIndex]:
        if self._sources is not None:
            return self._sources
        names = self._class_names_arg
        request = LoadRequest(
            root=self.root,
            split=self.split,
            seed=self.seed,
            test_fraction=self.test_fraction,
            csv_path=self.csv_path,
            path_col=self.path_col,
            label_col=self.label_col,
            split_col=self.split_col,
            group_col=self.group_col,
            class_names=tuple(names) if names is not None else None,
        )
        self._sources = self._arrange(self.spec.load(request))
        return self._sources

    def _arrange(self, src: dict[str, DatasetIndex]) -> dict[str, DatasetIndex]:
        """train / [val] / test from whatever the loader returned."""
        if self.folds >= 2:  # k-fold: pool every split, test = one fold, the rest trains
            pooled = pool_splits(src)
            if self.subset is not None:
                pooled = stratified_subset(pooled, self.subset, seed=self.seed)
            self._pooled = pooled
            rest, test = kfold_split(pooled, self.folds, self.fold, seed=self.seed)
            return {"train": rest, "test": test}
        if self.split == "random" and self.spec.resplit_random and len(src) > 1:
            # pool the source's splits and re-split
            recs = [r for ix in src.values() for r in ix.records]
            probs = [p for ix in src.values() for p in ix.problems]
            first = next(iter(src.values()))
            src = {"all": DatasetIndex(recs, list(first.class_names), problems=probs)}
        # no lesion / patient in two splits: the data set's own groups, or a CSV's group column
        grouped = self.spec.group_column is not None or self.group_col is not None
        if "all" in src:
            src = split_all(src["all"], self.test_fraction, self.seed, grouped=grouped)
        if "train" not in src:
            raise DataError(f"{self.root}: the data has no train split (found {sorted(src)})")
        if "test" not in src:
            parts = split_all(src["train"], self.test_fraction, self.seed, grouped=grouped)
            src = {**src, **parts}
        return {k: src[k] for k in ("train", "val", "test") if k in src}

    @property
    def duplicate_content_policy(self) -> str:
        """The same pixels in two splits: an error for your own data (folder, CSV); a warning for
        a public benchmark (BreastMNIST's official split holds one such pair), whose published
        protocols keep them."""
        return "warning" if self.spec.public_benchmark else "error"

    @property
    def label_conflict_policy(self) -> str:
        """The same pixels under two labels: an error for your own data (skip_bad drops every
        copy); a warning for a public benchmark, whose published split is kept as it is
        (BreastMNIST's official split holds one such pair: train 115 'malignant' = test 76
        'normal, benign')."""
        return "warning" if self.spec.public_benchmark else "error"

    @property
    def class_names(self) -> list[str]:
        return list(self._load_sources()["train"].class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def split_sizes(self) -> dict[str, int]:
        """Sizes of the final train / val / test splits (after ``setup()``; before it, of the
        source splits)."""
        if self.indexes:
            return {k: len(v) for k, v in self.indexes.items()}
        return {k: len(v) for k, v in self._load_sources().items()}

    def _prepared_sources(self) -> dict[str, DatasetIndex]:
        src = dict(self._load_sources())
        if not self.require_images:
            src, self.missing_dropped = filter_existing(src)
        if self.subset is not None and self.folds < 2:  # k-fold: applied to the pooled records
            src = {
                k: stratified_subset(v, self.subset if k == "train" else max(1, self.subset // 2), seed=self.seed)
                for k, v in src.items()
            }
        return src

    def check(self, check_images: bool | None = None, raise_on_error: bool = False) -> DataReport:
        """Run the data checks (for ``diffmic data check``) without decoding into the cache.

        Returns the :class:`DataReport` even when it has errors (``report.errors``; print
        ``report.summary()``), unless ``raise_on_error``. A source that cannot be read at all
        (missing split file, bad CSV header) still raises :class:`DataError`."""
        src = self._prepared_sources()
        ci = self.check_images if check_images is None else check_images
        try:
            return self._check_sources(src, ci)
        except DataError as e:
            if raise_on_error or e.report is None:
                raise
            return e.report

    def _check_sources(self, src: dict[str, DatasetIndex], check_images: bool) -> DataReport:
        """``check_dataset`` with this data module's policies (size bound, bad images, empty classes,
        duplicates, label conflicts)."""
        return check_dataset(
            src,
            max_pixels=self.max_pixels,
            check_images=check_images,
            skip_bad=self.skip_bad,
            allow_empty_classes=self.allow_empty_classes,
            duplicate_content=self.duplicate_content_policy,
            label_conflict=self.label_conflict_policy,
        )

    # ---- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self._is_setup:
            return
        src = self._prepared_sources()
        # a cache hit proves every image decoded before: skip re-opening them
        cached = [self._pooled] if self._pooled is not None and self.require_images else list(src.values())
        ci = self.check_images and not all(self.cache.exists(ix, self.image_size, self.in_chans) for ix in cached)
        self.report = self._check_sources(src, ci)
        src = self.report.splits

        positions: dict[str, tuple[str, np.ndarray]] = {
            k: (k, np.arange(len(ix), dtype=np.int64)) for k, ix in src.items()
        }
        if "val" not in src:
            train = src["train"]
            if self.val_fraction > 0 and len(train) > 1:
                groups = train.groups if train.has_groups else None
                tr, va = stratified_split(train.labels, test_fraction=self.val_fraction, seed=self.seed, groups=groups)
            else:
                tr, va = np.arange(len(train), dtype=np.int64), np.zeros(0, dtype=np.int64)
            positions["train"] = ("train", tr)
            positions["val"] = ("train", va)
        if self._pooled is not None:
            src, positions = self._fold_base(src, positions)
        self._checked, self._positions = src, positions
        self.indexes = {k: src[base].subset(rows) for k, (base, rows) in positions.items()}
        self.indexes = {k: self.indexes[k] for k in ("train", "val", "test")}
        self.datasets, self._arrays = {}, {}
        self._is_setup = True
        # decode now the splits this stage needs (the rest on first use)
        need = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": (self.predict_split,)}.get(
            stage or "", ("train", "val", "test")
        )
        for k in need:
            self.get_dataset(k)

    def _fold_base(
        self, src: dict[str, DatasetIndex], positions: dict[str, tuple[str, np.ndarray]]
    ) -> tuple[dict[str, DatasetIndex], dict[str, tuple[str, np.ndarray]]]:
        """k-fold: every split as rows of one base index, the checked records in the pooled order,
        so that all folds decode (and cache) the same images once."""
        assert self._pooled is not None
        order = {r.id: i for i, r in enumerate(self._pooled.records)}
        train, test = src["train"], src["test"]
        recs = sorted([*train.records, *test.records], key=lambda r: order.get(r.id, len(order)))
        base = DatasetIndex(
            recs, list(train.class_names), images=train.images, problems=[*train.problems, *test.problems]
        )
        row = {r.id: i for i, r in enumerate(recs)}

        def rows(split: str, local: np.ndarray) -> np.ndarray:
            ix = src[split]
            return np.asarray([row[ix.records[int(i)].id] for i in local], dtype=np.int64)

        moved = {k: ("all", rows(b, r)) for k, (b, r) in positions.items()}
        return {"all": base}, moved

    def get_dataset(self, name: str) -> CachedImageDataset:
        """The ``train`` / ``val`` / ``test`` dataset; its images are decoded (or loaded from
        the cache) on first use."""
        if not self._is_setup:
            self.setup()
        if name not in self.datasets:
            if name not in self._positions:
                raise KeyError(f"no split {name!r}; have {sorted(self._positions)}")
            base, rows = self._positions[name]
            if base not in self._arrays:
                self._arrays[base] = self.cache.get(self._checked[base], self.image_size, self.in_chans)
            ix = self.indexes[name]
            tf = build_transform(
                train=(name == "train"),
                in_chans=self.in_chans,
                hflip=self.hflip,
                vflip=self.vflip,
                rotation=self.rotation,
            )
            self.datasets[name] = CachedImageDataset(self._arrays[base], rows, ix.labels, ix.ids, tf)
        return self.datasets[name]

    def summary(self) -> str:
        """The data-check report plus the final split sizes."""
        if self.report is None:
            self.setup()
        assert self.report is not None
        sizes = ", ".join(f"{k} {v}" for k, v in self.split_sizes.items())
        extra = f"\nFinal splits (validation carved from train where needed): {sizes}"
        if self.missing_dropped:
            extra += (
                f"\nrequire_images=False: {len(self.missing_dropped)} record(s) without an "
                "image file were dropped before the checks"
            )
        return self.report.summary() + extra

    # ---- loaders -----------------------------------------------------------------------------
    def _loader(self, ds: CachedImageDataset, train: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=self._train_sampler(ds) if train else _eval_sampler(ds),
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            drop_last=train and drops_last_batch(len(ds), self.batch_size),
            persistent_workers=self.num_workers > 0,
        )

    def _train_sampler(self, ds: CachedImageDataset) -> EpochSeededSampler:
        weights = None
        if self.class_balance > 0:
            weights = class_balance_weights(ds.labels, self.class_balance)
        return EpochSeededSampler(len(ds), self.seed, weights)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.get_dataset("train"), train=True)

    def val_dataloader(self) -> DataLoader:
        """The validation split; ``val_split="test"`` validates on the test split instead (the
        released code's model selection on the test set, optimistic: ``train.select_on=test``)."""
        return self._loader(self.get_dataset(self.val_split), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.get_dataset("test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        """The ``predict_split`` (default: test) without augmentation."""
        return self._loader(self.get_dataset(self.predict_split), train=False)

    def paths_dataloader(self, paths: Sequence[str | os.PathLike], batch_size: int | None = None) -> DataLoader:
        """Arbitrary image files, preprocessed like this data (label -1)."""
        ds = ImagePathsDataset(paths, self.image_size, self.in_chans, self.max_pixels)
        return DataLoader(
            ds,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )


def _eval_sampler(ds: Dataset):
    """Under DDP, every validation/test image on exactly one rank (Lightning's default sampler
    pads the shards with repeated images, which would be counted twice in the metrics); ``None``
    (a plain sequential loader) otherwise. Uneven shards are safe: evaluation steps use no
    collective calls, and torchmetrics syncs states of any size."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(ds, shuffle=False)
