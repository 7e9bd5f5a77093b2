"""Seeded percentile bootstrap over test images."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def bootstrap_ci(
    stat: Callable[[torch.Tensor], float], n: int, num_resamples: int = 500, seed: int = 0, level: float = 0.95
) -> list[float]:
    """``[low, high]`` percentile interval of ``stat(idx)`` over resamples ``idx`` of ``range(n)``
    drawn with replacement from ``torch.Generator().manual_seed(seed)``. NaN resamples (e.g. a
    class absent from the resample) are dropped."""
    g = torch.Generator().manual_seed(int(seed))
    vals = []
    for _ in range(num_resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        v = float(stat(idx))
        if not math.isnan(v):
            vals.append(v)
    if not vals:
        return [float("nan"), float("nan")]
    t = torch.tensor(vals, dtype=torch.float64)
    a = (1 - level) / 2
    return [float(torch.quantile(t, a)), float(torch.quantile(t, 1 - a))]
