"""DICOM input: a ``.dcm`` file (or DICOM bytes) -> the 8-bit grey or RGB image a viewer shows.

Read with pydicom (``pip install 'diffmic[dicom]'``), which decodes the pixel data with its own
handlers: uncompressed, deflated and RLE always; JPEG baseline and JPEG 2000 through Pillow;
JPEG lossless, 12-bit JPEG and JPEG-LS through pylibjpeg / pylibjpeg-libjpeg (in the extra) or
python-gdcm. A file whose transfer syntax no installed handler decodes is an error naming the file,
the transfer syntax and the handlers pydicom asked for.

From stored values to 8 bits, as DICOM (PS3.3 C.11) and every viewer do it:

1. **Modality LUT**: the rescale slope / intercept (CT Hounsfield units) or the Modality LUT
   Sequence (``pydicom.pixels.apply_modality_lut``); 8/16-bit, signed and float pixels alike.
2. **VOI**: the file's first VOI LUT, else its first window centre / width with its VOI LUT
   function (``pydicom.pixels.apply_voi_lut``), mapped linearly from that function's output range
   to 0..255. A file without either: the image's own minimum..maximum to 0..255.
3. **MONOCHROME1** (white = low values, e.g. radiographs) is inverted so that bright is high.
4. Colour: RGB as stored (YBR converted to RGB by pydicom), 16-bit colour scaled by
   ``BitsStored``; PALETTE COLOR through its palette (``apply_color_lut``).

Bounded cost: ``Rows``, ``Columns`` and ``NumberOfFrames`` are read from the header (the pixel
data are not read) and checked by ``check_size`` first. Multi-frame files (cine loops, volumes) are
refused with a message: diffmic classifies single images.

No patient data leave this module: only the pixels are returned, nothing of the header, and
pydicom's warnings (which may quote element values such as names or dates) are not shown. Records
are named by their file path, never by PatientName / PatientID / dates.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

import numpy as np

from .records import DataError

__all__ = ["DICOM_EXTENSIONS", "DICOM_READER_VERSION", "is_dicom", "read_dicom"]

#: file suffixes read as DICOM (besides any file that carries the DICOM preamble, see :func:`is_dicom`)
DICOM_EXTENSIONS = (".dcm", ".dicom")
#: bump whenever the pixels :func:`read_dicom` produces change: the decoded-image cache key of a
#: DICOM record includes it (``diffmic.data.cache``), so a cache of earlier pixels is not reused
DICOM_READER_VERSION = 1
_MAGIC_AT, _MAGIC = 128, b"DICM"  # PS3.10 7.1: a 128-byte preamble, then "DICM"
_INSTALL = "pip install 'diffmic[dicom]'"
# warnings.catch_warnings changes process-wide state: reads that silence pydicom's warnings take turns
# (the decoded-image cache decodes in threads), so that no thread restores another's filters
_QUIET = threading.Lock()

Source = Union[str, os.PathLike, bytes]


def is_dicom(src: Any) -> bool:
    """Whether ``src`` (a path or bytes) is to be read as DICOM: bytes with the DICOM preamble; a
    path with a DICOM suffix (``.dcm``, ``.dicom``), or a path whose suffix no Pillow plugin claims
    (PACS exports such as ``IM000001``) holding the preamble. Never raises."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return _has_preamble(src)
    if not isinstance(src, (str, os.PathLike)):
        return False
    suffix = Path(src).suffix.lower()
    if suffix in DICOM_EXTENSIONS:
        return True
    from PIL import Image

    Image.preinit()  # the common formats (PNG, JPEG, BMP, GIF, PPM): what Image.open loads first
    if suffix in Image.EXTENSION:  # claimed without importing every plugin (0.2 s; issue 27.2)
        return False
    return suffix not in Image.registered_extensions() and _has_preamble(src)


def _has_preamble(src: Any) -> bool:
    """The 128-byte preamble and ``DICM`` of a DICOM file (PS3.10 7.1); never raises."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src[_MAGIC_AT : _MAGIC_AT + 4]) == _MAGIC
    try:
        with open(src, "rb") as fh:
            head = fh.read(_MAGIC_AT + 4)
    except OSError:
        return False
    return head[_MAGIC_AT:] == _MAGIC


def _pydicom(name: str):
    try:
        import pydicom
        import pydicom.pixels
    except ImportError as exc:
        raise DataError(f"{name}: a DICOM file; reading it needs pydicom: {_INSTALL}") from exc
    return pydicom


def _int(ds, keyword: str, default: int | None, name: str) -> int | None:
    value = ds.get(keyword, None)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise DataError(f"{name}: the DICOM header's {keyword} ({value!r}) is not a number") from None


def _scaled(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``lo..hi`` -> 0..255 (rounded, clipped); a flat range gives 0."""
    if not hi > lo:
        return np.zeros(a.shape, dtype=np.uint8)
    out = (np.asarray(a, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _grey(arr: np.ndarray, ds, name: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence) > 0
    window = "WindowCenter" in ds and "WindowWidth" in ds
    if lut or window:
        try:
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            if lut:
                bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
                lo, hi = 0.0, float(2**bits - 1)
            else:  # the window function's own output range: its values far below and far above the window
                with np.errstate(all="ignore"):
                    lo, hi = (float(v) for v in apply_voi_lut(np.array([-1e300, 1e300]), ds, index=0))
        except (ValueError, TypeError, IndexError, AttributeError) as exc:
            raise DataError(f"{name}: the DICOM file's VOI LUT / window cannot be applied ({exc})") from exc
        grey = _scaled(out, lo, hi)
    else:
        finite = values[np.isfinite(values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        grey = _scaled(np.nan_to_num(values, nan=lo), lo, hi)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey


def _colour(arr: np.ndarray, ds, photometric: str, name: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        try:
            rgb = apply_color_lut(arr, ds)
            bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            raise DataError(f"{name}: the DICOM palette cannot be applied ({exc})") from exc
        return _scaled(rgb, 0.0, float(2 ** (16 if bits > 8 else 8) - 1))
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    bits = _int(ds, "BitsStored", None, name) or 8 * arr.dtype.itemsize
    return _scaled(arr, 0.0, float(2**bits - 1))


def read_dicom(
    src: Source, name: str | None = None, check_size: Callable[[int, int], None] | None = None
) -> np.ndarray:
    """The image of a single-frame DICOM file (a path or the file's bytes) as ``uint8 [H, W]``
    (grey) or ``[H, W, 3]`` (colour), windowed as described in the module docstring.

    ``check_size(width, height)`` runs on the header's ``Columns`` x ``Rows`` before the pixel data
    are read (raise :class:`DataError` to refuse). Every failure is a :class:`DataError` naming
    ``name`` (default: the path): not DICOM, no image in it, several frames, a transfer syntax no
    installed handler decodes (with what to install), a broken VOI LUT or palette."""
    if name is None:
        name = "<bytes>" if isinstance(src, bytes) else str(src)
    pydicom = _pydicom(name)

    def source():
        return io.BytesIO(src) if isinstance(src, bytes) else os.fspath(src)

    # pydicom's warnings may quote element values (names, dates): none is shown
    with _QUIET, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        preamble = _has_preamble(src)  # without it (a bare data set), pydicom is asked to try anyway
        try:
            head = pydicom.dcmread(source(), stop_before_pixels=True, force=not preamble)
        except Exception as exc:  # untrusted bytes: pydicom raises many types
            raise DataError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        rows, cols = _int(head, "Rows", None, name), _int(head, "Columns", None, name)
        if (rows is None or cols is None) and not preamble:
            raise DataError(f"{name}: not a readable DICOM file (no DICOM preamble, and no image header)")
        if rows is None or cols is None:
            what = str(head.get("Modality", "") or "").strip()
            raise DataError(
                f"{name}: a DICOM file without an image (no Rows / Columns"
                + (f"; modality {what}" if what else "")
                + "): give image files only"
            )
        if check_size is not None:
            check_size(cols, rows)
        frames = _int(head, "NumberOfFrames", 1, name) or 1
        if frames > 1:
            raise DataError(
                f"{name}: a multi-frame DICOM file ({frames} frames: a cine loop or a volume); diffmic "
                "classifies single images: save the frame to classify as a file of its own "
                "(pydicom.pixels.pixel_array(path, index=i) reads frame i)"
            )
        try:
            ds = pydicom.dcmread(source(), force=not preamble)
        except Exception as exc:  # untrusted bytes
            raise DataError(f"{name}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise DataError(f"{name}: the DICOM file holds no pixel data")
        meta = getattr(ds, "file_meta", None)
        uid = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
        if uid is None and meta is not None and ds.original_encoding[0] is not None:
            # a bare data set (no file meta): its pixels are native, encoded as the data set was read
            from pydicom import uid as uids

            implicit, little = ds.original_encoding
            uid = uids.ImplicitVRLittleEndian if implicit else uids.ExplicitVRLittleEndian
            meta.TransferSyntaxUID = uid if little else uids.ExplicitVRBigEndian
            uid = meta.TransferSyntaxUID
        syntax = f"transfer syntax {uid.name if uid is not None else 'not given'}"
        try:
            arr = ds.pixel_array
        except Exception as exc:  # missing handler, corrupt or truncated data: pydicom raises many types
            text = " ".join(str(exc).split())
            missing = isinstance(exc, NotImplementedError) or "missing" in text or "no pixel data decoders" in text
            hint = f". Install a decoder for it: {_INSTALL} (pylibjpeg), or python-gdcm" if missing else ""
            raise DataError(f"{name}: cannot decode the DICOM pixel data ({syntax}): {text}{hint}") from exc
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        if arr.ndim == 2:
            if photometric == "PALETTE COLOR":
                return _colour(arr, ds, photometric, name)
            return _grey(arr, ds, name)
        if arr.ndim == 3 and arr.shape[-1] == 3:
            return _colour(arr, ds, photometric, name)
    raise DataError(
        f"{name}: DICOM pixel data of shape {tuple(arr.shape)} ({photometric}) is not a single grey or colour image"
    )
