"""Early stopping on the monitored validation metric (``train.early_stop_patience``).

Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping` on ``val/<train.monitor>`` (higher is
better), checked after every validation of the joint stage. The DCG warm-up's validations measure
the DCG alone (``val/dcg_*``) and do not count, as they do not count for checkpoint selection
(:class:`~diffmic.training.callbacks.StageAwareCheckpoint`). Its state (best score, validations
without improvement) is saved in ``last.ckpt``, so ``--resume`` continues the count.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping

__all__ = ["StageAwareEarlyStopping", "early_stopping", "summary"]


class StageAwareEarlyStopping(EarlyStopping):
    """EarlyStopping that ignores the validations of the DCG warm-up."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "in_dcg_warmup", False):
            return
        super().on_validation_end(trainer, pl_module)


def early_stopping(monitor: str, patience: int, min_delta: float = 0.0) -> StageAwareEarlyStopping:
    """Stop after ``patience`` validations in a row whose ``monitor`` did not exceed the best so far
    by more than ``min_delta``."""
    return StageAwareEarlyStopping(
        monitor=monitor,
        mode="max",
        patience=int(patience),
        min_delta=float(min_delta),
        check_on_train_epoch_end=False,  # after each validation (train.check_val_every_n_epoch)
        strict=True,  # a monitor that is never logged is an error, not a silent no-op
    )


def summary(callbacks: list) -> dict | None:
    """``fit_summary.json``'s ``early_stopping`` block: None without early stopping; else whether it
    stopped the fit, at which epoch (0-based), and the patience."""
    for cb in callbacks:
        if isinstance(cb, StageAwareEarlyStopping):
            best = float(cb.best_score)
            return {
                "monitor": cb.monitor,
                "patience": cb.patience,
                "min_delta": abs(float(cb.min_delta)),
                "stopped": cb.stopped_epoch > 0,
                "stopped_epoch": cb.stopped_epoch if cb.stopped_epoch > 0 else None,
                "best_score": best if math.isfinite(best) else None,  # -inf before any joint validation
            }
    return None
