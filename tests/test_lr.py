"""Learning-rate schedules of the training module (closed forms)."""

from __future__ import annotations

import math

import pytest

from diffmic.training.schedules import lr_factor, warmup_dcg_lr


def test_lr_factor_warmup_then_cosine():
    # linear warm-up over 2 of 10 epochs, then half-cosine from 1 to min_ratio
    assert lr_factor(0.0, 2, 10) == 0.0
    assert lr_factor(1.0, 2, 10) == pytest.approx(0.5)
    assert lr_factor(2.0, 2, 10) == pytest.approx(1.0)
    assert lr_factor(6.0, 2, 10) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10.0, 2, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(12.0, 2, 10) == pytest.approx(0.0, abs=1e-12)  # clamped after the end
    assert lr_factor(10.0, 2, 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(4.0, 0, 8) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_warmup_dcg_lr():
    assert warmup_dcg_lr(0.7, 1e-3, 2e-4, "constant") == 1e-3
    assert warmup_dcg_lr(0.0, 1e-3, 2e-4, "cosine") == pytest.approx(1e-3)
    assert warmup_dcg_lr(0.5, 1e-3, 2e-4, "cosine") == pytest.approx(6e-4)
    assert warmup_dcg_lr(1.0, 1e-3, 2e-4, "cosine") == pytest.approx(2e-4)
    assert warmup_dcg_lr(3.0, 1e-3, 2e-4, "cosine") == pytest.approx(2e-4)
    vals = [warmup_dcg_lr(p / 10, 1e-3, 2e-4, "cosine") for p in range(11)]
    assert all(a > b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError):
        warmup_dcg_lr(0.5, 1e-3, 2e-4, "step")
