"""Out-of-fold DCG priors (issue 23): the denoiser trains on priors from DCGs that did not see the image.

After joint training the DCG's prior is right on nearly every training image, so a denoiser trained
on those priors learns to copy them (docs/results.md, knob study). Two ways to give it priors that
were not fitted to its own training images:

* **cross-fitting** (``train.prior_folds = K >= 2``): every training image belongs to one of K folds
  (:func:`fold_of`, a hash of its id: the same image is in the same fold in every epoch and on
  every rank). K extra DCGs train beside the model's own DCG, DCG k on the images outside fold k
  (warm-up and joint stage alike). In the joint stage the denoiser's priors and guidance vectors for
  an image of fold k come from DCG k (eval mode, no gradient): a DCG that never trained on it. At
  test time the prior comes from the model's own DCG, fitted on all the training images
  (``eval.prior_source = full``), or from the average of the K fold DCGs' logits (``folds``).
  Cost: about K more DCG passes per step in both stages.
* **a split** (``train.prior_split = f``): a share f of the training images (:func:`dcg_part`, by the
  same hash) trains the DCG only, the rest trains the denoiser only, with priors from that DCG. No
  extra network; each of the two sees part of the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from diffmic.config import PRIOR_SOURCES
from diffmic.nn.guidance import GuidanceOutput

__all__ = ["fold_of", "dcg_part", "out_of_fold_guidance", "FoldAverage", "PRIOR_SOURCES"]


def _unit(image_id: str, seed: int, salt: str) -> float:
    """A number in [0, 1) fixed by the image id and the seed (the same on every machine and rank)."""
    h = hashlib.sha256(f"{salt}:{seed}:{image_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def fold_of(ids: Sequence[str], k: int, seed: int) -> Tensor:
    """Fold ``0..k-1`` of each image id (long ``[B]``), by hash: stable across epochs, batches and ranks."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return torch.tensor([min(int(_unit(str(i), seed, "fold") * k), k - 1) for i in ids], dtype=torch.long)


def dcg_part(ids: Sequence[str], fraction: float, seed: int) -> Tensor:
    """``True`` for the images that train the DCG under ``train.prior_split = fraction`` (bool ``[B]``)."""
    return torch.tensor([_unit(str(i), seed, "split") < fraction for i in ids], dtype=torch.bool)


@torch.no_grad()
def out_of_fold_guidance(dcgs: nn.ModuleList, x: Tensor, folds: Tensor) -> GuidanceOutput:
    """DCG outputs for ``x`` where image i's come from ``dcgs[folds[i]]`` (eval mode, no gradient).

    Each fold DCG runs once, on its own fold's images; its train/eval mode is restored afterwards.
    """
    parts: dict[int, GuidanceOutput] = {}
    for k in torch.unique(folds).tolist():
        dcg = dcgs[k]
        was = dcg.training
        dcg.eval()
        try:
            parts[k] = dcg(x[folds == k])
        finally:
            dcg.train(was)
    first = next(iter(parts.values()))
    fields = []
    for j, ref in enumerate(first):
        out = ref.new_empty((x.shape[0], *ref.shape[1:]))
        for k, g in parts.items():
            out[folds.to(out.device) == k] = g[j]
        fields.append(out)
    return GuidanceOutput(*fields)


class FoldAverage(nn.Module):
    """The K fold DCGs as one guide (``eval.prior_source = folds``): the mean of their logits; the
    saliency map, ROIs and attention of the first (they only serve explanations)."""

    def __init__(self, dcgs: nn.ModuleList) -> None:
        super().__init__()
        self.dcgs = dcgs

    def forward(self, x: Tensor) -> GuidanceOutput:
        outs = [d(x) for d in self.dcgs]
        zg = torch.stack([o.z_global for o in outs]).mean(0)
        zl = torch.stack([o.z_local for o in outs]).mean(0)
        first = outs[0]
        return GuidanceOutput(zg, zl, 0.5 * (zg + zl), first.saliency, first.roi_boxes, first.roi_attention)
