"""An explanation drawn on the original image: the DCG's ROI boxes and the saliency map of a class,
mapped back through the centre-square crop and resize of the loader.

The figure's size is bounded whatever the image: one figure pixel per image pixel up to
:data:`MAX_PANEL_PX` on a panel's long side, the image (and mask, and saliency) scaled down
beyond that, so that a 4x20000 PNG of a few hundred bytes cannot ask for a figure of gigabytes.
All coordinates stay those of the original image."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmic.outputs import EXPLAIN_TAG
from diffmic.reporting.figures import PLAIN, plain_text, save_figure_atomic
from diffmic.trust.lesions import boxes_to_original, crop_box

#: longest side of one panel of an explanation figure, in pixels
MAX_PANEL_PX = 2048
#: shortest side of one panel (a thinner image is letterboxed inside it)
MIN_PANEL_PX = 64
#: width a small image is enlarged to, so that a thumbnail stays readable
MIN_WIDTH_PX = 240


def panel_scale(w: int, h: int) -> float:
    """Figure pixels per original pixel: at least :data:`MIN_WIDTH_PX` wide where that keeps the
    long side within :data:`MAX_PANEL_PX`, never more than :data:`MAX_PANEL_PX` on the long side."""
    k = max(1.0, MIN_WIDTH_PX / w)
    return min(k, MAX_PANEL_PX / max(w, h))


def _shrink(a: np.ndarray, w: int, h: int, nearest: bool = False) -> np.ndarray:
    """``a`` ([H, W] or [H, W, C], uint8 or bool) resized to ``w x h`` pixels (PIL)."""
    from PIL import Image

    if a.shape[1] == w and a.shape[0] == h:
        return a
    if a.dtype == bool:
        return _shrink(a.astype(np.uint8) * 255, w, h, nearest=True) > 127
    src = a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a
    out = np.asarray(
        Image.fromarray(np.ascontiguousarray(src)).resize(
            (w, h), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR, reducing_gap=3.0
        )
    )
    return out[..., None] if a.ndim == 3 and a.shape[2] == 1 else out


def draw_explanation(
    original: np.ndarray,
    saliency: np.ndarray | None,
    roi_boxes,
    roi_attention,
    image_size: int,
    title: str,
    path: str | Path,
    mask: np.ndarray | None = None,
    original_size: tuple[int, int] | None = None,
) -> Path:
    """Two panels: image + ROI boxes, image + saliency (inside the square the network sees,
    outlined); ``mask`` (optional, the original's size) outlines the lesion on both.

    ``original`` is the image as ``uint8 [H, W(, C)]``; where it was already scaled down for
    display, ``original_size`` = (W, H) of the image the network saw, in whose pixels the boxes
    and the crop are placed. ``title`` is plain text (any ``$`` or ``\\`` is drawn as itself).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = np.asarray(original)
    if img.ndim not in (2, 3) or img.shape[0] < 1 or img.shape[1] < 1:
        raise ValueError(f"expected an image [H, W(, C)], got shape {img.shape}")
    W, H = original_size if original_size is not None else (img.shape[1], img.shape[0])
    k = panel_scale(W, H)
    pw, ph = max(1, round(W * k)), max(1, round(H * k))  # the panel's pixels (image area)
    if pw < img.shape[1] or ph < img.shape[0]:  # never hand matplotlib more pixels than it draws
        img = _shrink(img, min(pw, img.shape[1]), min(ph, img.shape[0]))
    fw, fh = max(pw, MIN_PANEL_PX), max(ph, MIN_PANEL_PX)  # a panel too thin is letterboxed
    dpi = 100
    title_in = 0.35
    fig, axes = plt.subplots(1, 2, figsize=(2 * fw / dpi, fh / dpi + title_in), dpi=dpi)
    cmap = "gray" if img.ndim == 2 or img.shape[-1] == 1 else None
    extent = (-0.5, W - 0.5, H - 0.5, -0.5)  # original pixel coordinates, whatever was drawn
    try:
        contour = None
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            mw, mh = min(pw, m.shape[1]), min(ph, m.shape[0])
            m = _shrink(m, mw, mh)
            xs = (np.arange(mw) + 0.5) * (W / mw) - 0.5
            ys = (np.arange(mh) + 0.5) * (H / mh) - 0.5
            contour = (xs, ys, m.astype(float))
        for ax in axes:
            ax.imshow(img.squeeze(), cmap=cmap, interpolation="nearest", extent=extent)
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            ax.axis("off")
            if contour is not None and contour[2].min() < 0.5 < contour[2].max():
                ax.contour(*contour, levels=[0.5], colors="lime", linewidths=0.8)
        if roi_boxes:
            boxes = boxes_to_original(roi_boxes, W, H, image_size)
            for box, a in zip(boxes, roi_attention or [None] * len(boxes)):
                y0, x0, y1, x1 = box
                axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.2))
                if a is not None:
                    axes[0].text(x0, y0, f"{a:.2f}", color="yellow", fontsize=6, va="bottom", **PLAIN)
        if saliency is not None:
            import torch
            import torch.nn.functional as F

            left, top, s = crop_box(W, H)
            n = max(1, min(s, round(s * k)))  # the saliency at the resolution it is drawn at
            sal = F.interpolate(
                torch.as_tensor(np.asarray(saliency, dtype=np.float32))[None, None],
                size=(n, n),
                mode="bilinear",
                align_corners=False,
            )[0, 0].numpy()
            axes[1].imshow(
                sal,
                cmap="jet",
                alpha=0.45,
                extent=(left - 0.5, left + s - 0.5, top + s - 0.5, top - 0.5),
                interpolation="bilinear",
            )
            axes[1].add_patch(Rectangle((left - 0.5, top - 0.5), s, s, fill=False, color="white", lw=0.8, ls="--"))
        axes[0].set_title(plain_text(title), fontsize=7, **PLAIN)
        axes[1].set_title("DCG saliency" if saliency is not None else "no saliency (no DCG)", fontsize=7)
        fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - (title_in - 0.05) / (fh / dpi + title_in), wspace=0.02)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # tagged so that `diffmic predict --explain` recognises its own earlier outputs (diffmic.outputs)
        save_figure_atomic(fig, path, dpi=dpi, metadata={EXPLAIN_TAG[0]: EXPLAIN_TAG[1]})
    finally:
        plt.close(fig)
    return path
