"""Atomic writes: the one place that writes a temporary file beside its target and renames it over.

A reader never sees a half-written file: the caller writes a temporary name in the target's own
folder (so ``os.replace`` is an atomic rename on one filesystem), and only a complete write is
renamed over the target. When the write (or the rename) fails, the temporary file (or folder) is
removed and the exception propagates unchanged; the target keeps its old content.

Standard library only (layer 0 of docs/design.md): every layer may use it.
Whether a target may be replaced at all (diffmic never writes over a file it did not write) is the
caller's check, made before the write.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fresh_temp_name(path: str | os.PathLike) -> Path:
    """A hidden temporary name beside ``path`` that no file has (random, checked); it ends in
    ``path``'s suffix, so that writers which choose the format by suffix (matplotlib) still can."""
    path = Path(path)
    while True:
        tmp = path.with_name(f".{path.name[:60]}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
        if not os.path.lexists(tmp):
            return tmp


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write (a file, or a folder); when
    the block ends normally, rename it over ``path`` with ``os.replace``. When the block (or the
    rename) raises, the temporary file or folder is removed and the exception re-raised.

    ``tmp`` is the temporary name to use (it must be in ``path``'s folder; it may already exist,
    e.g. made by ``tempfile.mkstemp`` / ``mkdtemp``); by default a fresh hidden name
    (:func:`fresh_temp_name`) that no file has, which the caller should create exclusively
    (``open(tmp, "x")``) so that no other file is ever written over.
    """
    path = Path(path)
    tmp = fresh_temp_name(path) if tmp is None else Path(tmp)
    # compared as absolute paths: tempfile.mkstemp / mkdtemp return absolute names
    # even for a relative folder, and a relative target (runs/demo/...) must still be accepted
    if os.path.abspath(tmp.parent) != os.path.abspath(path.parent):
        raise ValueError(f"the temporary name {tmp} is not in the folder of {path} (the rename would not be atomic)")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", newline: str | None = None) -> Path:
    """Write ``text`` to ``path`` atomically (a fresh temporary file, created exclusively)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "x", encoding=encoding, newline=newline) as fh:
        fh.write(text)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a fresh temporary file, created exclusively)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "xb") as fh:
        fh.write(data)
    return path
