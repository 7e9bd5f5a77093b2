"""The released code's ``.pkl`` split files: a restricted reader and a converter to CSV.

The released repositories ship their train/test splits as pickles. :func:`load_pickle_split`
reads them with an unpickler that refuses every global, so a malicious file cannot run code;
:func:`convert_pickle_split_to_csv` turns one into the CSV manifest the loaders read.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffmic.atomic import atomic_path

from .records import DataError

__all__ = ["load_pickle_split", "convert_pickle_split_to_csv"]

_MAX_PICKLE_BYTES = 64 * 1024 * 1024


class _RestrictedUnpickler(pickle.Unpickler):
    """Refuses every global (classes, functions, modules): only built-in containers and
    scalars (list, dict, tuple, str, int, float, bytes, bool, None) can be rebuilt, so loading
    cannot run code."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: split files may only contain lists, dicts, strings and integers"
        )

    def persistent_load(self, pid: Any) -> Any:  # noqa: D102
        raise pickle.UnpicklingError("refused persistent id in split file")


def load_pickle_split(path: str | os.PathLike) -> list[dict[str, int | str]]:
    """Read one of the released DiffMIC split files (``dataset/{aptos,isic2018}/*.pkl``): a list
    of ``{'img_root': str, 'label': int}``.

    Uses a restricted unpickler that refuses every global, so a malicious pickle raises
    :class:`DataError` instead of executing code; the result is then validated to be a
    ``list[dict[str, int | str]]`` with those two keys.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split file not found: {path}")
    size = path.stat().st_size
    if size > _MAX_PICKLE_BYTES:
        raise DataError(f"{path}: {size} bytes is too large for a split file")
    data = path.read_bytes()
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{path}: unsafe or invalid pickle ({e})") from e
    except Exception as e:
        raise DataError(f"{path}: not a valid pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of dicts, got {type(obj).__name__}")
    problems = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            problems.append(f"item {i}: {type(item).__name__}, not a dict")
            continue
        for k, v in item.items():
            if not isinstance(k, str):
                problems.append(f"item {i}: key {k!r} is not a string")
            elif isinstance(v, bool) or not isinstance(v, (int, str)):
                problems.append(f"item {i}: value of {k!r} is {type(v).__name__}, not int/str")
        if not isinstance(item.get("img_root"), str):
            problems.append(f"item {i}: missing or non-string 'img_root'")
        lab = item.get("label")
        if isinstance(lab, bool) or not isinstance(lab, int) or lab < 0:
            problems.append(f"item {i}: missing or invalid 'label' {lab!r}")
        if len(problems) >= 50:
            break
    if problems:
        raise DataError(f"{path}: invalid split file:\n  " + "\n  ".join(problems))
    return obj


def convert_pickle_split_to_csv(
    pkl_path: str | os.PathLike, csv_path: str | os.PathLike, class_names: Sequence[str] | None = None
) -> int:
    """Convert a released ``.pkl`` split to a CSV with columns ``id,path,label[,class]``
    (``id`` = file stem of ``img_root``). Returns the number of rows written (atomic write)."""
    entries = load_pickle_split(pkl_path)
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(csv_path) as tmp, open(tmp, "x", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "path", "label"] + (["class"] if class_names else []))
        for e in entries:
            root = str(e["img_root"])
            lab = int(e["label"])
            row = [Path(root.replace("\\", "/")).stem, root, lab]
            if class_names:
                row.append(class_names[lab] if 0 <= lab < len(class_names) else "")
            w.writerow(row)
    return len(entries)
