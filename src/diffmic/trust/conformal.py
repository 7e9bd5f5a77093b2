"""Split-conformal prediction sets with Adaptive Prediction Sets scores (APS, Romano et al. 2020).

The score of class y is the total probability of the classes ranked above y plus ``u`` times its
own, with ``u`` uniform on (0, 1) per image (randomised APS; ``u = 1`` gives the conservative
non-randomised version, which over-covers when many classes are unlikely). With ``n`` exchangeable
calibration images and q = the ceil((n+1) level)-th smallest true-class score, the set
{y : score(x, y) <= q} (plus the top class, so never empty) covers the true class with
probability >= level. For reproducible sets ``u`` is derived from the image id
(:func:`image_uniforms`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor


def image_uniforms(ids: Sequence[str], seed: int = 0) -> Tensor:
    """A uniform (0, 1) number per image id, the same on every run and machine."""
    return torch.tensor([(zlib.crc32(f"{seed}:{i}".encode()) + 0.5) / 2**32 for i in ids], dtype=torch.float64)


def aps_scores(probs: Tensor, u: Tensor | None = None) -> Tensor:
    """``[N,C]``: score of every class = probability ranked above it + ``u`` x its own (u = 1: at or above)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    scores = torch.empty_like(cum).scatter_(-1, order, cum)
    if u is not None:
        scores = scores - (1 - torch.as_tensor(u, dtype=torch.float64)[:, None]) * p
    return scores


def fit_aps(probs: Tensor, labels: Tensor, level: float = 0.9, u: Tensor | None = None) -> float:
    """The conformal quantile q of the true-class scores on the calibration split."""
    if not 0 < level < 1:
        raise ValueError(f"conformal level must be in (0, 1), got {level}")
    s = aps_scores(probs, u).gather(1, torch.as_tensor(labels).long()[:, None]).flatten()
    n = s.numel()
    k = math.ceil((n + 1) * level)
    if k > n:  # too few calibration images for this level: every set is the full label set
        return float("inf")
    return float(torch.sort(s).values[k - 1])


def aps_sets(probs: Tensor, qhat: float, u: Tensor | None = None) -> Tensor:
    """Boolean ``[N,C]`` membership of the prediction sets (the top class always included)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    member = aps_scores(p, u) <= qhat + 1e-12
    member[torch.arange(p.shape[0]), p.argmax(-1)] = True
    return member


def set_summary(sets: Tensor, labels: Tensor, class_names: list[str], level: float) -> dict:
    """Empirical coverage and mean set size, overall and per true class."""
    y = torch.as_tensor(labels).long()
    covered = sets[torch.arange(y.numel()), y].double()
    size = sets.sum(-1).double()
    per = {}
    for c, name in enumerate(class_names):
        m = y == c
        if m.any():
            per[name] = {
                "n": int(m.sum()),
                "coverage": float(covered[m].mean()),
                "mean_set_size": float(size[m].mean()),
            }
    return {"level": level, "coverage": float(covered.mean()), "mean_set_size": float(size.mean()), "per_class": per}
