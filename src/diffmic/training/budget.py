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

__all__ = ["steps_per_epoch", "epochs_for_steps", "apply_step_budget"]


def steps_per_epoch(num_train: int, batch_size: int) -> int:
    """Optimisation steps in one epoch (the train loader keeps the last partial batch unless it would
    hold one image: :func:`diffmic.data.sampling.train_batches_per_epoch`)."""
    if num_train < 1 or batch_size < 1:
        raise ConfigError(f"cannot budget steps: {num_train} training images at batch size {batch_size}")
    return train_batches_per_epoch(num_train, batch_size)


def epochs_for_steps(steps: int, num_train: int, batch_size: int, min_epochs: int = 1) -> int:
    """Smallest whole number of epochs (>= ``min_epochs``) holding at least ``steps`` steps (0 -> 0)."""
    if steps < 0:
        raise ConfigError(f"a step budget must be >= 0, got {steps}")
    if steps == 0:
        return 0
    return max(int(min_epochs), math.ceil(steps / steps_per_epoch(num_train, batch_size)))


def apply_step_budget(cfg: Config, num_train: int) -> dict:
    """Set ``train.epochs`` / ``train.dcg_warmup_epochs`` from the step keys when they are set.

    Returns a summary ``{"num_train", "steps_per_epoch", "epochs", "dcg_warmup_epochs"}`` (empty
    when no step key is set). ``cfg`` is changed in place.
    """
    t = cfg.train
    if t.joint_steps is None and t.dcg_warmup_steps is None:
        return {}
    spe = steps_per_epoch(num_train, cfg.data.batch_size)
    if t.joint_steps is not None:
        t.epochs = epochs_for_steps(t.joint_steps, num_train, cfg.data.batch_size)
    if t.dcg_warmup_steps is not None:
        t.dcg_warmup_epochs = epochs_for_steps(t.dcg_warmup_steps, num_train, cfg.data.batch_size)
    return {
        "num_train": int(num_train),
        "steps_per_epoch": spe,
        "epochs": t.epochs,
        "dcg_warmup_epochs": t.dcg_warmup_epochs,
    }
