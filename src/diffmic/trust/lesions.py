"""Do the DCG's regions and saliency peak fall on the lesion? Geometry from the network input back
to the original image, and hit rates against random regions of the same size.

The network sees the centred square crop of side ``s = min(W, H)`` resized to ``S x S``
(``data.transforms.preprocess_pil``): input pixel (u, v) covers original pixels
``left + u s/S .. left + (u+1) s/S``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffmic.data.sources import find_dataset


def crop_box(w: int, h: int) -> tuple[int, int, int]:
    """(left, top, side) of the centred square the network sees (same rounding as the loader)."""
    s = min(w, h)
    return round((w - s) / 2), round((h - s) / 2), s


def boxes_to_original(boxes, w: int, h: int, image_size: int) -> list[list[float]]:
    """ROI boxes (y0, x0, y1, x1) in input pixels -> the same region in original pixels."""
    left, top, s = crop_box(w, h)
    k = s / image_size
    return [[top + y0 * k, left + x0 * k, top + y1 * k, left + x1 * k] for y0, x0, y1, x1 in boxes]


def saliency_to_original(saliency: np.ndarray, w: int, h: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Saliency ``[h', w']`` bilinearly upsampled to the crop's side ``s`` (original pixels);
    returns the ``[s, s]`` map and the crop (left, top, s) it sits at."""
    left, top, s = crop_box(w, h)
    sal = F.interpolate(
        torch.as_tensor(np.asarray(saliency, dtype=np.float32))[None, None],
        size=(s, s),
        mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    return sal, (left, top, s)


def lesion_hits(
    mask: np.ndarray,
    boxes_orig: list[list[float]],
    saliency_crop: np.ndarray,
    crop: tuple[int, int, int],
    tolerance: int = 5,
) -> dict:
    """Hit rates of one image against its binary lesion ``mask [H, W]`` (original pixels).

    ``roi_overlap``: mean fraction of each region's pixels on the lesion; ``roi_overlap_random``:
    the same for a region of the same size at a uniformly random position inside the crop (exact
    mean over all positions). ``roi_center_hit`` / ``_random``: the region's centre on the lesion.
    ``peak_hit``: the saliency maximum on the lesion; ``peak_hit_random``: the lesion's share of
    the crop (a random point). ``pointing_hit``: the maximum within ``tolerance`` pixels of the
    lesion (pointing game, Zhang et al. 2018). ``energy_on_lesion``: share of the (non-negative)
    saliency mass on the lesion, against the lesion's share of the crop.
    """
    left, top, s = crop
    m = torch.as_tensor(np.asarray(mask, dtype=np.float32)[top : top + s, left : left + s])
    if m.shape != (s, s):
        raise ValueError(f"mask of shape {mask.shape} does not contain the crop {crop}")
    share = float(m.mean())
    out = {"lesion_share": share}
    ov, ovr, ch, chr_ = [], [], [], []
    for y0, x0, y1, x1 in boxes_orig:
        a, b, c, d = (round(float(v)) for v in (y0 - top, x0 - left, y1 - top, x1 - left))
        a, b = max(a, 0), max(b, 0)
        c, d = min(max(c, a + 1), s), min(max(d, b + 1), s)
        bh, bw = c - a, d - b
        ov.append(float(m[a:c, b:d].mean()))
        ovr.append(_mean_window_share(m, bh, bw))
        ch.append(float(m[(a + c - 1) // 2, (b + d - 1) // 2]))
        centres = m[(bh - 1) // 2 : s - bh + 1 + (bh - 1) // 2, (bw - 1) // 2 : s - bw + 1 + (bw - 1) // 2]
        chr_.append(float(centres.mean()))
    if ov:
        out.update(
            roi_overlap=float(np.mean(ov)),
            roi_overlap_random=float(np.mean(ovr)),
            roi_center_hit=float(np.mean(ch)),
            roi_center_hit_random=float(np.mean(chr_)),
        )
    sal = torch.as_tensor(np.asarray(saliency_crop, dtype=np.float32))
    iy, ix = divmod(int(sal.argmax()), s)
    out["peak_hit"] = float(m[iy, ix])
    out["peak_hit_random"] = share
    dil = F.max_pool2d(m[None, None], 2 * tolerance + 1, stride=1, padding=tolerance)[0, 0]
    out["pointing_hit"] = float(dil[iy, ix])
    out["pointing_hit_random"] = float(dil.mean())
    pos = sal.clamp_min(0)
    out["energy_on_lesion"] = float((pos * m).sum() / pos.sum()) if float(pos.sum()) > 0 else float("nan")
    return out


def _window_counts(s: int, k: int) -> torch.Tensor:
    """For each of ``s`` positions, how many of the ``s - k + 1`` windows of length ``k`` cover it."""
    i = torch.arange(s, dtype=torch.float64)
    return (torch.minimum(i, torch.tensor(float(s - k))) - torch.clamp(i - k + 1, min=0) + 1).clamp_min(0)


def _mean_window_share(m: torch.Tensor, bh: int, bw: int) -> float:
    """Mean lesion share of a ``bh x bw`` window over every position inside the square mask ``m``
    (= the mean of ``avg_pool2d(m, (bh, bw), stride=1)``), in O(s^2): each pixel counted as often
    as windows cover it."""
    s = m.shape[0]
    cy, cx = _window_counts(s, bh), _window_counts(s, bw)
    n = (s - bh + 1) * (s - bw + 1) * bh * bw
    return float(cy @ m.double() @ cx / n)


# ------------------------------------------------------------------------- per run (diffmic test)

#: HAM10000's lesion masks: ``<data.root>/masks/<image id>_segmentation.png``
MASK_SUFFIX = "_segmentation.png"


def lesion_mask_dir(dataset: str, root: str | os.PathLike | None) -> Path | None:
    """The folder of lesion masks of a data set, where it has one: its entry's ``mask_folder`` in
    :data:`diffmic.data.sources.REGISTRY` under ``root`` (HAM10000: ``root/masks``)."""
    spec = find_dataset(dataset)
    if spec is None or spec.mask_folder is None or root is None:
        return None
    p = Path(root) / spec.mask_folder
    return p if p.is_dir() else None


def mask_file(mask_dir: Path | None, image_id: str) -> Path | None:
    if mask_dir is None:
        return None
    p = mask_dir / f"{Path(str(image_id)).name}{MASK_SUFFIX}"
    return p if p.is_file() else None


def read_mask(path: Path) -> np.ndarray:
    """A binary lesion mask (grey > 127); a file that is not a readable image raises ValueError
    naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("L")) > 127
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(
            f"lesion mask '{path}' cannot be read ({exc}); replace it or move the masks folder away"
        ) from exc


def image_hits(mask: np.ndarray, saliency: np.ndarray, boxes, image_size: int, tolerance: int = 5) -> dict:
    """:func:`lesion_hits` of one image from the network's outputs: ``saliency [h', w']`` (one
    class) and ``boxes`` (y0, x0, y1, x1) in input pixels, mapped onto the original image (the
    mask's size)."""
    H, W = mask.shape
    boxes_orig = boxes_to_original(boxes, W, H, image_size)
    sal, crop = saliency_to_original(saliency, W, H)
    return lesion_hits(mask, boxes_orig, sal, crop, tolerance)


def summarise_hits(rows: list[dict], saliency_class: str = "true class") -> dict | None:
    """The mean of each per-image measure over the images with a mask (``None`` without any):
    the block of ``lesion_hits.json`` / ``test_metrics.json``'s ``lesions``."""
    if not rows:
        return None
    keys = list(rows[0].keys())
    return {
        "num_images": len(rows),
        "saliency_class": saliency_class,
        **{k: float(np.nanmean([r[k] for r in rows if k in r])) for k in keys},
    }
