"""Learning-rate schedules of the two optimisers (closed forms, no state)."""

from __future__ import annotations

import math


def lr_factor(epoch: float, warmup: float, total: float, min_ratio: float = 0.0) -> float:
    """Released schedule: linear warm-up from 0 over ``warmup`` epochs, then half-cosine to min."""
    if warmup > 0 and epoch < warmup:
        return epoch / warmup
    span = max(total - warmup, 1e-8)
    progress = min(max((epoch - warmup) / span, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_dcg_lr(progress: float, start: float, end: float, schedule: str) -> float:
    """DCG lr at ``progress`` in [0, 1] of the warm-up: ``start`` (constant) or a half-cosine from
    ``start`` at 0 to ``end`` at 1 (``train.dcg_warmup_schedule=cosine``)."""
    if schedule == "constant":
        return start
    if schedule != "cosine":
        raise ValueError(f"unknown DCG warm-up schedule {schedule!r}")
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))
