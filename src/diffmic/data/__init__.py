"""Data layer: dataset loaders, splits, preprocessing, decoded-image cache, checks, DataModule.

The Lightning DataModule is imported lazily (``from diffmic.data import DiffMICDataModule``
works, but importing :mod:`diffmic.data` alone does not import Lightning).
"""

from __future__ import annotations

from .cache import DecodedCache, decode_records, default_cache_dir
from .checks import DataReport, check_dataset, check_image_file
from .pickle_splits import convert_pickle_split_to_csv, load_pickle_split
from .records import DataError, DatasetIndex, Problem, Record, filter_existing
from .sources import (
    APTOS_CLASSES,
    DATASETS,
    HAM10000_CLASSES,
    REGISTRY,
    DatasetSpec,
    LoadRequest,
    dataset_spec,
    find_dataset,
    load_aptos2019,
    load_csv_manifest,
    load_ham10000,
    load_image_folder,
    load_medmnist,
    split_all,
)
from .splits import carve_validation, stratified_split, stratified_subset
from .transforms import (
    DEFAULT_MAX_PIXELS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PREPROCESS_VERSION,
    Normalize,
    SampleTransform,
    TrainAugment,
    build_transform,
    decode_image,
    norm_stats,
)

__all__ = [
    "Record",
    "DatasetIndex",
    "Problem",
    "DataError",
    "filter_existing",
    "load_ham10000",
    "load_aptos2019",
    "load_csv_manifest",
    "load_image_folder",
    "load_medmnist",
    "load_pickle_split",
    "convert_pickle_split_to_csv",
    "split_all",
    "DATASETS",
    "REGISTRY",
    "DatasetSpec",
    "LoadRequest",
    "dataset_spec",
    "find_dataset",
    "HAM10000_CLASSES",
    "APTOS_CLASSES",
    "stratified_split",
    "carve_validation",
    "stratified_subset",
    "decode_image",
    "build_transform",
    "SampleTransform",
    "Normalize",
    "TrainAugment",
    "norm_stats",
    "DEFAULT_MAX_PIXELS",
    "PREPROCESS_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DecodedCache",
    "decode_records",
    "default_cache_dir",
    "check_dataset",
    "check_image_file",
    "DataReport",
    "DiffMICDataModule",
    "ImagePathsDataset",
    "CachedImageDataset",
]

_LAZY = {
    "DiffMICDataModule": "datamodule",
    "ImagePathsDataset": "datasets",
    "CachedImageDataset": "datasets",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
