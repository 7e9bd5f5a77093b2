"""Decoded-image cache: every record of an index decoded once into one ``uint8 [N,S,S,C]``
``.npy`` file, memory-mapped on later loads.

The file name is a hash of everything that changes the pixels: record ids and paths, each
file's size and modification time (or, for in-memory MedMNIST arrays, the array bytes),
``image_size``, ``in_chans`` and :data:`~diffmic.data.transforms.PREPROCESS_VERSION` (for a DICOM
file also :data:`~diffmic.data.dicom.DICOM_READER_VERSION`). Any change
therefore gives a new key (a miss) and stale files are simply never read again.

The cache lives in ``cache_dir``: the argument, else ``$DIFFMIC_CACHE_DIR``, else
``<project>/.cache/diffmic`` for a source checkout, else ``~/.cache/diffmic``; never beside the
(possibly read-only) data. Writes are atomic (temporary file + ``os.replace``), so concurrent
processes and interrupted runs never leave a half-written cache behind.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from diffmic.atomic import atomic_path

from .dicom import DICOM_READER_VERSION, is_dicom
from .records import DataError, DatasetIndex, Problem, Record
from .transforms import DEFAULT_MAX_PIXELS, PREPROCESS_VERSION, decode_image

__all__ = ["DecodedCache", "default_cache_dir", "decode_records"]

_ENV = "DIFFMIC_CACHE_DIR"


def default_cache_dir() -> Path:
    env = os.environ.get(_ENV)
    if env:
        return Path(env).expanduser()
    project = Path(__file__).resolve().parents[3]
    if (project / "pyproject.toml").is_file() and os.access(project, os.W_OK):
        return project / ".cache" / "diffmic"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "diffmic"


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _source(index: DatasetIndex, r: Record):
    if r.array_index is not None and index.images is not None:
        return index.images[r.array_index]
    if r.path is None:
        raise DataError(f"record {r.where()} has neither a file path nor an in-memory image")
    return r.path


def decode_records(
    index: DatasetIndex,
    image_size: int,
    in_chans: int = 3,
    *,
    out: np.ndarray | None = None,
    workers: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode every record into ``out`` (``uint8 [N,S,S,C]``; allocated when ``None``).

    Collects every failure and raises one :class:`DataError` listing them all."""
    n = len(index)
    if out is None:
        out = np.empty((n, image_size, image_size, in_chans), dtype=np.uint8)
    failures: list[Problem] = []

    def work(i: int):
        r = index.records[i]
        try:
            out[i] = decode_image(_source(index, r), image_size, in_chans, max_pixels)
            return None
        except DataError as e:
            return Problem(
                "decode_failed",
                f"{r.where()}: {e}",
                record_id=r.id,
                path=str(r.path) if r.path else None,
                hint="run the data check (check_images=True) and fix or drop it",
            )

    workers = _default_workers() if workers is None else max(1, int(workers))
    if workers == 1 or n < 16:
        results = [work(i) for i in range(n)]
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(work, range(n), chunksize=32))
    failures = [p for p in results if p is not None]
    if failures:
        raise DataError.from_problems(failures, header=f"{len(failures)} image(s) could not be decoded:")
    return out


class DecodedCache:
    """Decode an index once, reuse the result (memory-mapped) on every later run.

    ``get(index, image_size, in_chans)`` returns a read-only ``uint8 [N,S,S,C]`` array whose
    row ``i`` is ``index.records[i]``. ``hits`` / ``misses`` count cache use; ``last_path`` is
    the file used by the last call.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        workers: int | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.workers = workers
        self.max_pixels = max_pixels
        self.hits = 0
        self.misses = 0
        self.last_path: Path | None = None
        self.last_hit: bool | None = None

    # -- keys ----------------------------------------------------------------------------------
    @staticmethod
    def key(index: DatasetIndex, image_size: int, in_chans: int = 3) -> str:
        h = hashlib.sha256()
        h.update(f"diffmic-decoded-v{PREPROCESS_VERSION}|{image_size}|{in_chans}|{len(index)}\n".encode())
        arr_done: set[int] = set()
        for r in index.records:
            if r.array_index is not None and index.images is not None:
                h.update(f"A|{r.id}|{r.array_index}\n".encode())
                arr_done.add(r.array_index)
                continue
            try:
                st = os.stat(r.path) if r.path is not None else None
                size, mtime = (st.st_size, st.st_mtime_ns) if st else (-1, -1)
            except OSError:
                size, mtime = -1, -1
            h.update(f"F|{r.id}|{r.path}|{size}|{mtime}\n".encode())
            if r.path is not None and is_dicom(r.path):  # how DICOM values become 8-bit pixels
                h.update(f"dicom-v{DICOM_READER_VERSION}\n".encode())
        if arr_done:
            imgs = index.images
            assert imgs is not None
            rows = np.fromiter(sorted(arr_done), dtype=np.int64)
            h.update(f"shape={imgs.shape}|dtype={imgs.dtype}\n".encode())
            h.update(np.ascontiguousarray(imgs[rows]).tobytes())
        return h.hexdigest()[:32]

    def path_for(self, index: DatasetIndex, image_size: int, in_chans: int = 3) -> Path:
        return self.cache_dir / f"decoded-{image_size}px-{in_chans}ch-{self.key(index, image_size, in_chans)}.npy"

    def exists(self, index: DatasetIndex, image_size: int, in_chans: int = 3) -> bool:
        return self._open(self.path_for(index, image_size, in_chans), len(index), image_size, in_chans) is not None

    # -- load / build --------------------------------------------------------------------------
    @staticmethod
    def _open(path: Path, n: int, image_size: int, in_chans: int) -> np.ndarray | None:
        if not path.is_file():
            return None
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):
            return None
        if arr.dtype != np.uint8 or arr.shape != (n, image_size, image_size, in_chans):
            return None
        return arr

    def get(self, index: DatasetIndex, image_size: int, in_chans: int = 3) -> np.ndarray:
        path = self.path_for(index, image_size, in_chans)
        self.last_path = path
        shape = (len(index), image_size, image_size, in_chans)
        arr = self._open(path, *shape[:2], in_chans)
        if arr is not None:
            self.hits += 1
            self.last_hit = True
            return arr
        self.misses += 1
        self.last_hit = False
        if len(index) == 0:
            return np.zeros(shape, dtype=np.uint8)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=self.cache_dir)
        os.close(fd)
        # a unique temporary name per writer: concurrent writers of one cache file never share one
        with atomic_path(path, tmp=tmp_name) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            decode_records(index, image_size, in_chans, out=out, workers=self.workers, max_pixels=self.max_pixels)
            out.flush()
            del out
            os.chmod(tmp, 0o644)  # mkstemp creates 0600 files
        arr = self._open(path, *shape[:2], in_chans)
        if arr is None:  # pragma: no cover - the file we just wrote is unreadable
            raise DataError(f"cache file {path} could not be read back")
        return arr

    def clear(self) -> int:
        """Delete every cache file in ``cache_dir``; returns how many were removed."""
        n = 0
        if self.cache_dir.is_dir():
            for p in self.cache_dir.glob("decoded-*.npy"):
                p.unlink(missing_ok=True)
                n += 1
        return n
