"""Do the DCG's ROIs and saliency peak land on the lesion? (HAM10000 lesion masks)

For a trained run with a DCG (variants C2 / full / dcg) and the HAM10000 masks, on one split
(default: the validation split, lesion-grouped, carved from train):

* ``roi_hit``: fraction of the K selected ROI cells that touch the lesion (any mask pixel in the
  cell), against ``random_hit``: the same for K cells drawn uniformly at random from the same grid
  (its exact expectation: the fraction of grid cells that touch the lesion, per image);
* ``peak_on_lesion``: fraction of images whose saliency peak (argmax of the predicted class's
  saliency channel, bilinearly resized to the input size as the ROI selection resizes it) is a lesion
  pixel, against ``lesion_area``: the mean fraction of the image the lesion covers (what a peak
  at a random pixel would score);
* ``roi_hit_pred_channel``: ``roi_hit`` when the K cells are chosen from the predicted class's
  saliency channel only (a diagnostic, not what the model does);
* ``saliency_hw``: the size of the saliency map.

The masks go through the same centre square crop and resize as the images (``preprocess_pil``),
then ``> 127``.

    python benchmarks/saliency_vs_masks.py --run RUN [--split val] [--limit N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def lesion_mask(mask_dir: Path, image_id: str, image_size: int) -> np.ndarray:
    """Binary ``[S, S]`` lesion mask of ``image_id`` as the model sees the image."""
    from diffmic.data.transforms import preprocess_pil

    path = mask_dir / f"{image_id}_segmentation.png"
    with Image.open(path) as img:
        arr = preprocess_pil(img.convert("L"), image_size, in_chans=1)[:, :, 0]
    return arr > 127


def roi_lesion_stats(
    boxes: torch.Tensor, saliency_up: torch.Tensor, masks: torch.Tensor, crop: int, grid_hw: tuple[int, int]
) -> dict[str, np.ndarray]:
    """Per-image statistics.

    Args:
        boxes: ``[B, K, 4]`` ROI boxes ``(y0, x0, y1, x1)``.
        saliency_up: ``[B, H, W]`` saliency map (one channel) at the input size.
        masks: ``[B, H, W]`` bool lesion masks.
        crop, grid_hw: ROI cell size and grid.

    Returns:
        per-image arrays ``roi_hit`` (fraction of ROIs touching the lesion), ``random_hit`` (fraction of
        all grid cells touching it), ``peak_on_lesion`` (0/1) and ``lesion_area``.
    """
    b, k = boxes.shape[:2]
    gh, gw = grid_hw
    cells = masks[:, : gh * crop, : gw * crop].reshape(b, gh, crop, gw, crop).any(dim=4).any(dim=2)  # [B, gh, gw]
    rows = torch.div(boxes[..., 0], crop, rounding_mode="floor")
    cols = torch.div(boxes[..., 1], crop, rounding_mode="floor")
    hit = cells[torch.arange(b)[:, None], rows, cols].float()  # [B, K]
    flat = saliency_up.flatten(1).argmax(1)
    peak = masks.flatten(1)[torch.arange(b), flat].float()
    return {
        "roi_hit": hit.mean(1).numpy(),
        "random_hit": cells.float().flatten(1).mean(1).numpy(),
        "peak_on_lesion": peak.numpy(),
        "lesion_area": masks.float().flatten(1).mean(1).numpy(),
    }


@torch.no_grad()
def evaluate_run(
    run: Path, split: str = "val", limit: int | None = None, mask_dir: Path | None = None, batch_size: int = 64
) -> dict:
    from diffmic.config import load_config
    from diffmic.data.sources import find_dataset
    from diffmic.nn.guidance import crop_rois, grid_shape, select_rois
    from diffmic.training.checkpoint import load_module
    from diffmic.training.run import build_datamodule, resolve_checkpoint

    cfg = load_config(run / "config.yaml")
    spec = find_dataset(cfg.data.dataset)
    if spec is None or spec.mask_folder is None:
        raise SystemExit(
            f"{run}: needs a run on a data set with lesion masks (HAM10000), got data.dataset={cfg.data.dataset}"
        )
    mask_dir = mask_dir or Path(cfg.data.root) / spec.mask_folder
    dm = build_datamodule(cfg)
    dm.setup("fit" if split == "val" else "test")
    ds = dm.get_dataset(split)
    module = load_module(resolve_checkpoint(run, None))
    dcg = module.model.dcg
    if dcg is None:
        raise SystemExit(f"{run}: variant {module.model.variant} has no DCG")
    dcg.eval()
    n = len(ds) if limit is None else min(limit, len(ds))
    stats: dict[str, list] = {}
    hw: tuple[int, ...] | None = None  # the saliency map's size (None: no image read)
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        x = torch.stack([it["image"] for it in items])
        ids = [it["id"] for it in items]
        g = dcg(x)
        hw = tuple(g.saliency.shape[-2:])
        pred = g.z_fused.argmax(1)
        sal = g.saliency[torch.arange(x.shape[0]), pred][:, None]
        up = F.interpolate(sal, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        masks = torch.as_tensor(np.stack([lesion_mask(mask_dir, i, x.shape[-1]) for i in ids]))
        grid = grid_shape(x.shape[-2], x.shape[-1], dcg.crop_size)
        for key, val in roi_lesion_stats(g.roi_boxes, up, masks, dcg.crop_size, grid).items():
            stats.setdefault(key, []).extend(val.tolist())
        # the same K cells chosen from the predicted class's channel alone (instead of the sum of
        # every class's min-max normalised channel, the released rule)
        alt = select_rois(sal, grid, dcg.num_rois)
        _, alt_boxes = crop_rois(x, alt.cell_idx, dcg.crop_size, grid)
        alt_stats = roi_lesion_stats(alt_boxes, up, masks, dcg.crop_size, grid)
        stats.setdefault("roi_hit_pred_channel", []).extend(alt_stats["roi_hit"].tolist())
    out: dict[str, Any] = {k: round(float(np.mean(v)), 4) for k, v in stats.items()}
    out.update(
        run=str(run),
        split=split,
        images=n,
        saliency_hw=list(hw) if hw is not None else None,
        image_size=cfg.data.image_size,
        crop_size=dcg.crop_size,
        num_rois=dcg.num_rois,
        dcg_output_stride=getattr(cfg.model, "dcg_output_stride", 32),
        dcg_global=cfg.model.dcg_global,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--limit", type=int)
    p.add_argument("--masks", type=Path, help="mask folder (default: <data.root>/masks)")
    p.add_argument("--json", type=Path, help="also write the result here")
    a = p.parse_args(argv)
    res = evaluate_run(a.run, a.split, a.limit, a.masks)
    line = json.dumps(res)
    print(line)
    if a.json:
        a.json.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
