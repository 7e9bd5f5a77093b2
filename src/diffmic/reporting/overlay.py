"""An explanation drawn on the original image at its full resolution: the DCG's ROI boxes and the
saliency map of a class, mapped back through the centre-square crop and resize of the loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmic.outputs import EXPLAIN_TAG
from diffmic.trust.lesions import boxes_to_original, saliency_to_original


def draw_explanation(
    original: np.ndarray,
    saliency: np.ndarray | None,
    roi_boxes,
    roi_attention,
    image_size: int,
    title: str,
    path: str | Path,
    mask: np.ndarray | None = None,
) -> Path:
    """Two panels at the original's pixel size: image + ROI boxes, image + saliency (inside the
    square the network sees, outlined); ``mask`` (optional) outlines the lesion on both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    img = np.asarray(original)
    H, W = img.shape[:2]
    # one figure pixel per image pixel (at least 240 px per panel, so a thumbnail stays readable)
    k = max(1.0, 240 / W)
    dpi = 100
    fig, axes = plt.subplots(1, 2, figsize=(2 * W * k / dpi, H * k / dpi + 0.35), dpi=dpi)
    cmap = "gray" if img.ndim == 2 or img.shape[-1] == 1 else None
    try:
        for ax in axes:
            ax.imshow(img.squeeze(), cmap=cmap, interpolation="nearest")
            ax.set_xlim(-0.5, W - 0.5)
            ax.set_ylim(H - 0.5, -0.5)
            ax.axis("off")
            if mask is not None:
                ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors="lime", linewidths=0.8)
        if roi_boxes:
            boxes = boxes_to_original(roi_boxes, W, H, image_size)
            for box, a in zip(boxes, roi_attention or [None] * len(boxes)):
                y0, x0, y1, x1 = box
                axes[0].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, color="yellow", lw=1.2))
                if a is not None:
                    axes[0].text(x0, y0, f"{a:.2f}", color="yellow", fontsize=6, va="bottom")
        if saliency is not None:
            sal, (left, top, s) = saliency_to_original(saliency, W, H)
            axes[1].imshow(
                sal,
                cmap="jet",
                alpha=0.45,
                extent=(left - 0.5, left + s - 0.5, top + s - 0.5, top - 0.5),
                interpolation="bilinear",
            )
            axes[1].add_patch(Rectangle((left - 0.5, top - 0.5), s, s, fill=False, color="white", lw=0.8, ls="--"))
        axes[0].set_title(title, fontsize=7)
        axes[1].set_title("DCG saliency" if saliency is not None else "no saliency (no DCG)", fontsize=7)
        fig.subplots_adjust(left=0, right=1, bottom=0, top=1 - 0.3 / (H * k / dpi + 0.35), wspace=0.02)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        # tagged so that `diffmic predict --explain` recognises its own earlier outputs (diffmic.outputs)
        fig.savefig(tmp, dpi=dpi, metadata={EXPLAIN_TAG[0]: EXPLAIN_TAG[1]})
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
