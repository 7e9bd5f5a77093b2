"""Image preprocessing (decode -> 8-bit RGB or grey -> centre square crop -> resize, as the
released DiffMIC code does) and per-sample tensor augmentation / normalisation.

Preprocessing produces ``uint8`` arrays ``[S, S, C]`` that :class:`~diffmic.data.cache.DecodedCache`
stores once; augmentation then runs on those tensors in the Dataset.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from .dicom import is_dicom, read_dicom
from .records import DataError

__all__ = [
    "PREPROCESS_VERSION",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT_RATIO",
    "check_image_size",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "open_image",
    "to_mode",
    "center_square_crop_box",
    "preprocess_pil",
    "decode_image",
    "display_image",
    "norm_stats",
    "Normalize",
    "TrainAugment",
    "SampleTransform",
    "build_transform",
]

#: bump whenever the pixels produced by :func:`decode_image` change (invalidates caches)
PREPROCESS_VERSION = 2  # 2: EXIF orientation applied (caches of v1 are not reused)
#: decompression-bomb guard: images with more pixels than this are refused (100 MP)
DEFAULT_MAX_PIXELS = 100_000_000
#: images longer than this many times their width (or wider than their height) are refused: a
#: 4x20000 PNG of a few hundred bytes is no medical image, and drawing it costs gigabytes
MAX_ASPECT_RATIO = 20

# the ImageNet statistics every image is normalised with (one definition, beside the encoders that
# re-normalise for backbones trained otherwise)
from diffmic.nn.encoders import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray]

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_16BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16BS", "I;16LS", "I;16S"}


def _name(src) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if isinstance(src, bytes):
        return "<bytes>"
    return f"<{type(src).__name__}>"


def check_image_size(
    name: str, w: int, h: int, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_aspect: float = MAX_ASPECT_RATIO
) -> None:
    """Refuse an image by its size alone (from the header, before any pixel is decoded): more
    than ``max_pixels`` pixels (``None``: no limit) or a side more than ``max_aspect`` times the
    other. Raises :class:`DataError` naming ``name``."""
    if w <= 0 or h <= 0:
        raise DataError(f"{name}: invalid image size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise DataError(
            f"{name}: {w}x{h} = {w * h / 1e6:.1f} MP exceeds the {max_pixels / 1e6:.0f} MP limit "
            "(possible decompression bomb); raise max_pixels if the image is genuine"
        )
    if max(w, h) > max_aspect * min(w, h):
        raise DataError(
            f"{name}: {w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.0f}:1, more than the "
            f"{max_aspect:g}:1 an image may have; crop it to the region of interest"
        )


def open_image(
    src: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS, max_aspect: float = MAX_ASPECT_RATIO
) -> Image.Image:
    """Open an image lazily (header only) and refuse decompression bombs.

    Raises :class:`DataError` for a missing / empty / unreadable file, one with more than
    ``max_pixels`` pixels (``None`` disables the guard) or one whose long side is more than
    ``max_aspect`` times its short side (:func:`check_image_size`), all from the header, before
    any pixel is decoded. Pillow's own global ``Image.MAX_IMAGE_PIXELS`` guard is not changed;
    when it fires it is reported the same way.

    A DICOM file or DICOM bytes (:func:`~diffmic.data.dicom.is_dicom`) are checked the same way
    from the DICOM header, then decoded and windowed at once by
    :func:`~diffmic.data.dicom.read_dicom`: the returned image is its 8-bit grey or RGB rendering.
    """
    name = _name(src)
    fp: Path | io.BytesIO
    if isinstance(src, (str, os.PathLike)):
        p = Path(src)
        if not p.is_file():
            raise DataError(f"{name}: file not found")
        if p.stat().st_size == 0:
            raise DataError(f"{name}: file is empty (0 bytes)")
        fp = p
    else:
        if len(src) == 0:
            raise DataError(f"{name}: empty image data (0 bytes)")
        fp = io.BytesIO(src)
    if is_dicom(src):
        arr = read_dicom(src, name, lambda w, h: check_image_size(name, w, h, max_pixels, max_aspect))
        return Image.fromarray(arr)
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: refused as a possible decompression bomb ({e})") from e
    except Exception as e:  # PIL raises many types on garbage input
        raise DataError(f"{name}: not a readable image ({type(e).__name__}: {e})") from e
    w, h = img.size
    try:
        check_image_size(name, w, h, max_pixels, max_aspect)
    except DataError:
        img.close()
        raise
    return img


def _scale_to_uint8(arr: np.ndarray, bits16: bool) -> np.ndarray:
    """Integer/float grey array -> uint8. 16-bit data maps 0..65535 -> 0..255 (x/257);
    other ranges are min-max scaled."""
    a = arr.astype(np.float64)
    if bits16 or (
        np.issubdtype(arr.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 65535 and a.max() > 255
    ):
        out = a / 257.0
    elif np.issubdtype(arr.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 255:
        out = a
    elif np.issubdtype(arr.dtype, np.floating) and a.size and np.nanmin(a) >= 0 and np.nanmax(a) <= 1:
        out = a * 255.0
    else:
        a = np.nan_to_num(a)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        out = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_mode(img: Image.Image, in_chans: int = 3) -> Image.Image:
    """Convert any Pillow mode to 8-bit ``RGB`` (``in_chans=3``) or ``L`` (``in_chans=1``).

    * grey ``L`` / bilevel ``1``: replicated to RGB (kept grey for ``in_chans=1``);
    * 16-bit ``I;16*``: scaled 0..65535 -> 0..255; 32-bit ``I``: treated as 16-bit when it fits
      0..65535, else min-max scaled; float ``F``: 0..1 -> 0..255, else min-max;
    * palette ``P`` (with or without transparency) and alpha modes (``RGBA``, ``LA``, ``PA``):
      composited on black;
    * ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's conversion to RGB.
    """
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    mode = img.mode
    if mode in _16BIT_MODES or mode in ("I", "F"):
        arr = np.asarray(img)
        if arr.ndim != 2:
            arr = arr.reshape(img.size[1], img.size[0])
        img = Image.fromarray(_scale_to_uint8(arr, bits16=mode in _16BIT_MODES), mode="L")
        mode = "L"
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in _ALPHA_MODES:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        rgb = (rgba[..., :3] * rgba[..., 3:4] + 127) // 255  # composite on black, rounded
        img = Image.fromarray(rgb.astype(np.uint8), mode="RGB")
        mode = "RGB"
    if mode == "1":
        img = img.convert("L")
        mode = "L"
    target = "RGB" if in_chans == 3 else "L"
    if mode != target:
        if mode not in ("L", "RGB"):
            img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, ...
        if img.mode != target:
            img = img.convert(target)
    return img


def center_square_crop_box(w: int, h: int) -> tuple[int, int, int, int]:
    """Centred square of side ``min(w, h)``; offsets ``round((w - s) / 2)``, ``round((h - s) / 2)``
    (Python rounding, as the released ``CropCenterSquare``)."""
    s = min(w, h)
    left, top = round((w - s) / 2), round((h - s) / 2)
    return left, top, left + s, top + s


def exif_upright(img: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: the EXIF orientation tag (camera rotation) applied,
    as every viewer does (``PIL.ImageOps.exif_transpose``)."""
    from PIL import ImageOps

    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a damaged EXIF block: keep the pixels as stored
        return img
    if orientation in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def preprocess_pil(img: Image.Image, image_size: int, in_chans: int = 3) -> np.ndarray:
    """EXIF orientation -> mode conversion -> centre square crop -> bilinear (antialiased) resize
    -> ``uint8 [S, S, C]``."""
    img = exif_upright(img)
    img = to_mode(img, in_chans)
    box = center_square_crop_box(*img.size)
    if box != (0, 0, *img.size):
        # crop first: resize(box=...) would let the filter read pixels outside the square
        img = img.crop(box)
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        if a.dtype == np.uint8:
            return Image.fromarray(a, mode="L")
        return Image.fromarray(_scale_to_uint8(a, bits16=a.dtype == np.uint16), mode="L")
    if a.ndim == 3 and a.shape[2] in (3, 4):
        if a.dtype != np.uint8:
            a = _scale_to_uint8(a, bits16=a.dtype == np.uint16)
        return Image.fromarray(a, mode="RGB" if a.shape[2] == 3 else "RGBA")
    raise DataError(f"in-memory image has unsupported shape {a.shape}; expected HxW or HxWx{{1,3,4}}")


def decode_image(
    src: ImageSource, image_size: int, in_chans: int = 3, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode a file / bytes / PIL image / array into ``uint8 [image_size, image_size, in_chans]``.
    DICOM files and bytes are read by :func:`open_image` (pydicom, windowed to 8 bits).

    Any failure (missing, empty, corrupt, truncated, too large, unsupported) raises
    :class:`DataError` naming the source; no other exception type escapes for bad input.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    name = _name(src)
    try:
        if isinstance(src, np.ndarray):
            if src.ndim >= 2:
                check_image_size(name, int(src.shape[1]), int(src.shape[0]), max_pixels)
            return preprocess_pil(_array_to_pil(src), image_size, in_chans)
        if isinstance(src, Image.Image):
            check_image_size(name, *src.size, max_pixels)
            return preprocess_pil(src, image_size, in_chans)
        img = open_image(src, max_pixels)
        with img:
            img.load()
            return preprocess_pil(img, image_size, in_chans)
    except DataError:
        raise
    except Exception as e:  # untrusted bytes: Pillow plugins raise many exception types
        kind = "truncated" if "truncat" in str(e).lower() else "corrupt or unsupported"
        raise DataError(f"{name}: {kind} image ({type(e).__name__}: {e})") from e


def display_image(
    src: str | os.PathLike | bytes,
    in_chans: int = 3,
    max_side: int = 2048,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """The image as it is shown in an explanation: EXIF orientation applied, 8-bit RGB / grey,
    scaled down (never up) to at most ``max_side`` pixels on its long side. Returns the
    ``uint8 [h, w(, 1)]`` array and the full upright size ``(W, H)`` the network saw.

    The same header checks as :func:`open_image` (size, aspect ratio) run before any pixel is
    decoded; a JPEG is decoded at a reduced scale where that suffices (``Image.draft``), so the
    memory used is bounded by ``max_side`` rather than by the file's pixel count.
    """
    name = _name(src)
    img = open_image(src, max_pixels)
    try:
        with img:
            w0, h0 = img.size
            try:
                turned = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            except Exception:  # a damaged EXIF block: exif_upright keeps the pixels as stored
                turned = False
            W, H = (h0, w0) if turned else (w0, h0)
            f = min(1.0, max_side / max(w0, h0))
            if f < 1.0 and img.format == "JPEG":
                img.draft(img.mode, (max(1, int(w0 * f)), max(1, int(h0 * f))))
            img.load()
            up = to_mode(exif_upright(img), in_chans)
            if max(up.size) > max_side:
                g = max_side / max(up.size)
                up = up.resize(
                    (max(1, round(up.size[0] * g)), max(1, round(up.size[1] * g))),
                    Image.Resampling.BILINEAR,
                    reducing_gap=3.0,
                )
            arr = np.array(up, dtype=np.uint8)
    except DataError:
        raise
    except Exception as e:  # untrusted bytes: Pillow plugins raise many exception types
        kind = "truncated" if "truncat" in str(e).lower() else "corrupt or unsupported"
        raise DataError(f"{name}: {kind} image ({type(e).__name__}: {e})") from e
    return (arr[:, :, None] if arr.ndim == 2 else arr), (W, H)


# --------------------------------------------------------------------------------------------
# tensors: augmentation + normalisation


def norm_stats(in_chans: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """ImageNet mean/std; for one channel the mean of the three values."""
    if in_chans == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    if in_chans == 1:
        return (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")


class Normalize(torch.nn.Module):
    """``uint8 [C,H,W]`` (or ``[B,C,H,W]``) -> float32 in [0, 1] -> ``(x - mean) / std``."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, in_chans: int = 3) -> None:
        super().__init__()
        mean, std = norm_stats(in_chans)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.to(torch.float32).div_(255.0)
        else:
            x = x.to(torch.float32)
        return (x - self.mean) / self.std


class TrainAugment(torch.nn.Module):
    """The released training augmentation on one image (PIL image, or tensor ``[C,H,W]``):
    random horizontal flip (p=0.5), optional vertical flip (p=0.5, APTOS), random rotation in
    ``[-rotation, +rotation]`` degrees with bilinear interpolation and black fill, image size
    kept (torchvision ``transforms.v2``). On PIL images the rotation is ``PIL.Image.rotate``
    as in the released code. Random numbers come from torch's RNG (seeded per DataLoader
    worker)."""

    def __init__(self, hflip: bool = True, vflip: bool = False, rotation: float = 30.0) -> None:
        super().__init__()
        from torchvision.transforms import v2

        ops: list[torch.nn.Module] = []
        if hflip:
            ops.append(v2.RandomHorizontalFlip(p=0.5))
        if vflip:
            ops.append(v2.RandomVerticalFlip(p=0.5))
        if rotation and rotation > 0:
            ops.append(v2.RandomRotation(degrees=float(rotation), interpolation=v2.InterpolationMode.BILINEAR, fill=0))
        self.ops = v2.Compose(ops) if ops else torch.nn.Identity()

    def forward(self, x):
        return self.ops(x)


class SampleTransform:
    """One decoded sample -> model input: ``uint8 [S,S,C]`` array (or ``uint8 [C,S,S]`` tensor)
    -> (training: :class:`TrainAugment`) -> float32 ``[C,S,S]`` tensor, ImageNet-normalised.

    Augmentation runs on a PIL image and normalisation in NumPy: both single-threaded, so a
    sample costs ~1-2 ms and does not fight over cores with torch's intra-op threads when the
    DataLoader runs in the main process (``num_workers=0``)."""

    def __init__(
        self, train: bool = False, in_chans: int = 3, hflip: bool = True, vflip: bool = False, rotation: float = 30.0
    ) -> None:
        mean, std = norm_stats(in_chans)
        self.in_chans = in_chans
        self.augment = TrainAugment(hflip, vflip, rotation) if train else None
        self.scale = (1.0 / (255.0 * np.asarray(std, dtype=np.float64))).astype(np.float32)
        self.offset = (-np.asarray(mean, dtype=np.float64) / np.asarray(std)).astype(np.float32)

    def __call__(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            x = x.permute(1, 2, 0).cpu().numpy()
        arr = np.asarray(x)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.dtype != np.uint8 or arr.shape[2] != self.in_chans:
            raise ValueError(f"expected uint8 [H,W,{self.in_chans}], got {arr.dtype} {arr.shape}")
        if self.augment is not None:
            img = Image.fromarray(arr[:, :, 0] if self.in_chans == 1 else arr)
            arr = np.asarray(self.augment(img))
            if arr.ndim == 2:
                arr = arr[:, :, None]
        out = arr.astype(np.float32) * self.scale + self.offset
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"SampleTransform(in_chans={self.in_chans}, augment={self.augment})"


def build_transform(
    train: bool, in_chans: int = 3, hflip: bool = True, vflip: bool = False, rotation: float = 30.0
) -> SampleTransform:
    """``uint8 [S,S,C]`` sample -> normalised float ``[C,S,S]`` tensor; augmented when ``train``."""
    return SampleTransform(train, in_chans, hflip, vflip, rotation)
