"""Map-style datasets: decoded-image caches (training/evaluation) and image files (prediction).

Items are dicts ``{"image": float32 [C, H, W], "label": int, "index": int, "id": str}``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .transforms import DEFAULT_MAX_PIXELS, build_transform, decode_image

__all__ = ["CachedImageDataset", "ImagePathsDataset"]


class CachedImageDataset(Dataset):
    """Rows ``rows`` of a decoded ``uint8 [N,S,S,C]`` array (usually a memory-mapped cache file)
    with their labels and ids; ``transform`` maps one ``uint8 [S,S,C]`` array to the model input
    (default: the raw ``uint8 [C,S,S]`` tensor).

    A memory-mapped array is reopened by file name in each DataLoader worker instead of being
    pickled (which would copy it)."""

    def __init__(
        self,
        images: np.ndarray,
        rows: Sequence[int] | np.ndarray,
        labels: Sequence[int] | np.ndarray,
        ids: Sequence[str],
        transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    ) -> None:
        rows = np.asarray(rows, dtype=np.int64)
        if not (len(rows) == len(labels) == len(ids)):
            raise ValueError("rows, labels and ids must have the same length")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(images)):
            raise ValueError("row index out of range of the image array")
        self.images = images
        self.rows = rows
        self.labels = np.asarray(labels, dtype=np.int64)
        self.ids = list(ids)
        self.transform = transform
        self._mmap_path = getattr(images, "filename", None) if isinstance(images, np.memmap) else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if self._mmap_path:
            state["images"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def _array(self) -> np.ndarray:
        if self.images is None:
            self.images = np.load(self._mmap_path, mmap_mode="r")
        return self.images

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``key`` is an index, or ``(index, seed)`` from :class:`EpochSeededSampler`: then the
        random augmentation of this sample is drawn from its own seed, independent of the global
        RNG (so a resumed run augments exactly like an uninterrupted one)."""
        seed = None
        if isinstance(key, tuple):
            i, seed = int(key[0]), int(key[1])
        else:
            i = int(key)
        arr = np.asarray(self._array()[self.rows[i]])  # HWC uint8 (read-only view)
        if self.transform is not None and seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self.transform(arr)
        elif self.transform is not None:
            x = self.transform(arr)
        else:
            x = torch.from_numpy(np.array(arr, copy=True)).permute(2, 0, 1).contiguous()
        return {"image": x, "label": int(self.labels[i]), "index": int(i), "id": self.ids[i]}


class ImagePathsDataset(Dataset):
    """Arbitrary image files for prediction (no labels: ``label`` is -1), preprocessed exactly
    like the training data (square crop, resize, ImageNet normalisation). A bad file raises
    :class:`DataError` naming it."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        image_size: int = 224,
        in_chans: int = 3,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.image_size = int(image_size)
        self.in_chans = int(in_chans)
        self.max_pixels = max_pixels
        self.transform = build_transform(train=False, in_chans=in_chans)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        arr = decode_image(self.paths[i], self.image_size, self.in_chans, self.max_pixels)
        x = self.transform(arr)
        return {"image": x, "label": -1, "index": int(i), "id": str(self.paths[i])}
