"""train.select_ties: which checkpoint a tie of the monitored validation score keeps.

Lightning's ModelCheckpoint (like the released code's ``if acc > best``) keeps the first of equal
scores; ``last`` keeps the later one, whose denoiser trained longer (on BreastMNIST's 78 validation
images, seed 2 of ``full`` kept the first joint epoch: 18 denoiser steps; docs/results.md)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from diffmic.config import ConfigError, load_config
from diffmic.training.callbacks import StageAwareCheckpoint

TRAINER = SimpleNamespace(strategy=SimpleNamespace(reduce_boolean_decision=lambda decision: decision))


def _select(scores: list[float], ties: str) -> int:
    """Feed the validation scores of epochs 0, 1, ... to the checkpoint's decision, keeping its
    bookkeeping as Lightning does for save_top_k=1; return the epoch of the kept checkpoint."""
    ck = StageAwareCheckpoint(monitor="val/acc", mode="max", save_top_k=1, ties=ties)
    kept = -1
    for epoch, s in enumerate(scores):
        if ck.check_monitor_top_k(TRAINER, torch.tensor(s)):
            ck.best_k_models = {"best.ckpt": torch.tensor(s)}
            ck.kth_best_model_path = "best.ckpt"
            kept = epoch
    return kept


@pytest.mark.parametrize(
    "scores, first, last",
    [
        ([0.90, 0.93, 0.93, 0.91, 0.93, 0.92], 1, 4),  # ties: first keeps epoch 1, last epoch 4
        ([0.90, 0.91, 0.92], 2, 2),  # strictly improving: the same
        ([0.95, 0.90, 0.94], 0, 0),  # a later lower score never replaces the best
        ([0.5], 0, 0),
    ],
)
def test_ties_keep_the_first_or_the_last_equal_score(scores, first, last):
    assert _select(scores, "first") == first
    assert _select(scores, "last") == last


def test_the_default_is_the_released_rule_and_the_key_is_checked():
    assert load_config("cpu").train.select_ties == "first"
    assert load_config("cpu", ["train.select_ties=last"]).train.select_ties == "last"
    with pytest.raises(ConfigError, match="select_ties"):
        load_config("cpu", ["train.select_ties=middle"])
    with pytest.raises(ValueError, match="ties"):
        StageAwareCheckpoint(monitor="val/acc", ties="middle")


def test_fit_passes_the_setting_to_the_checkpoint_that_selects(tmp_path):
    from diffmic.training.run import _fit_callbacks

    for ties in ("first", "last"):
        best, callbacks = _fit_callbacks(load_config("cpu", [f"train.select_ties={ties}"]), tmp_path)
        assert best.ties == ties and best in callbacks and best.monitor == "val/acc"
