"""Step budgets: translate ``train.joint_steps`` / ``train.dcg_warmup_steps`` into epochs.

The trainer counts epochs; a preset that counts epochs gives a folder of 500 images 8 optimisation
steps per epoch at batch 64 and HAM10000 110. With a step budget the number of epochs follows the
size of the training split: ``epochs = max(min_epochs, ceil(steps / ceil(n_train / batch_size)))``.
The epoch count is rounded up, so a run gets at least the budgeted number of steps (and at most one
epoch more). Only fit uses it; the resolved epochs are written back into the run's ``config.yaml``.
"""

from __future__ import annotations

import math

from diffmic.config import Config, ConfigError
from diffmic.data.sampling import train_batches_per_epoch
from diffmic.nn.diffmic import variant_parts

__all__ = ["steps_per_epoch", "epochs_for_steps", "apply_step_budget"]


def steps_per_epoch(num_train: int, batch_size: int, accumulate: int = 1) -> int:
    """Optimiser steps in one epoch: the batches (the train loader keeps the last partial batch unless
    it would hold one image: :func:`diffmic.data.sampling.train_batches_per_epoch`), one step per
    ``accumulate`` of them (``train.accumulate_grad_batches``; a last, shorter window steps too)."""
    if num_train < 1 or batch_size < 1:
        raise ConfigError(f"cannot budget steps: {num_train} training images at batch size {batch_size}")
    return math.ceil(train_batches_per_epoch(num_train, batch_size) / max(1, int(accumulate)))


def epochs_for_steps(steps: int, num_train: int, batch_size: int, min_epochs: int = 1, accumulate: int = 1) -> int:
    """Smallest whole number of epochs (>= ``min_epochs``) holding at least ``steps`` steps (0 -> 0)."""
    if steps < 0:
        raise ConfigError(f"a step budget must be >= 0, got {steps}")
    if steps == 0:
        return 0
    return max(int(min_epochs), math.ceil(steps / steps_per_epoch(num_train, batch_size, accumulate)))


def apply_step_budget(cfg: Config, num_train: int) -> dict:
    """Resolve the training budget for this data set (``cfg`` is changed in place).

    1. Step keys: ``train.epochs`` / ``train.dcg_warmup_epochs`` from ``train.joint_steps`` /
       ``train.dcg_warmup_steps`` when they are set.
    2. ``train.equal_budget`` (default): a variant without a DCG (``basic``, ``C1``) has no warm-up, so
       it trains for the warm-up's length too (``epochs + dcg_warmup_epochs``, or the two step budgets
       added), and its ``dcg_warmup_epochs`` becomes 0: every variant of a preset gets the same number
       of optimiser steps. Applying it twice changes nothing (a resumed run repeats it).

    Returns a summary ``{"num_train", "steps_per_epoch", "epochs", "dcg_warmup_epochs"}`` (empty
    when nothing changed).
    """
    t = cfg.train
    steps = t.joint_steps is not None or t.dcg_warmup_steps is not None
    merge = t.equal_budget and not variant_parts(cfg.model.variant).dcg
    if not steps and not (merge and t.dcg_warmup_epochs > 0):
        return {}
    acc = t.accumulate_grad_batches
    spe = steps_per_epoch(num_train, cfg.data.batch_size, acc)
    if steps:
        joint = t.joint_steps if t.joint_steps is not None else t.epochs * spe
        warm = t.dcg_warmup_steps if t.dcg_warmup_steps is not None else t.dcg_warmup_epochs * spe
        if merge:
            t.epochs, t.dcg_warmup_epochs = epochs_for_steps(joint + warm, num_train, cfg.data.batch_size, 1, acc), 0
        else:
            t.epochs = epochs_for_steps(joint, num_train, cfg.data.batch_size, 1, acc)
            t.dcg_warmup_epochs = epochs_for_steps(warm, num_train, cfg.data.batch_size, 1, acc)
    else:
        t.epochs, t.dcg_warmup_epochs = t.epochs + t.dcg_warmup_epochs, 0
    return {
        "num_train": int(num_train),
        "steps_per_epoch": spe,
        "epochs": t.epochs,
        "dcg_warmup_epochs": t.dcg_warmup_epochs,
    }
