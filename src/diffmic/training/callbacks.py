"""Callbacks: an EMA of the diffusion modules, and stage-aware checkpoint selection."""

from __future__ import annotations

from typing import Any, Optional, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor
from torch.optim.swa_utils import AveragedModel


def ema_avg_fn(decay: float):
    """EMA update with the usual warm-up: the effective decay is min(decay, (1+n)/(10+n)), so a
    short run is not dominated by its initial weights (0.9999 over 400 steps would keep 96% of
    them)."""

    def avg(averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        return averaged + (current - averaged) * (1.0 - d)

    return avg


@runtime_checkable
class EMAHost(Protocol):
    """What :class:`DenoiserEMA` needs of the LightningModule (``training.module.DiffMICModule``)."""

    def diffusion_modules(self) -> torch.nn.ModuleList: ...


def _covered(pl_module: object) -> torch.nn.ModuleList:
    """The modules the EMA averages: ``pl_module.diffusion_modules()``."""
    if not isinstance(pl_module, EMAHost):
        raise TypeError(f"DenoiserEMA needs a module with diffusion_modules(), got {type(pl_module).__name__}")
    return pl_module.diffusion_modules()


class DenoiserEMA(pl.Callback):
    """Exponential moving average of ρ(x) and the denoiser (not the DCG), used for evaluation.

    Built on :class:`torch.optim.swa_utils.AveragedModel` (parameters and BN buffers). Updated after
    every joint-stage training step; swapped in for validation, stored in every checkpoint under
    ``"diffmic_ema"`` and applied by :func:`diffmic.training.checkpoint.load_module` for test and
    predict. The released code keeps an EMA (0.9999) but never uses it.
    """

    def __init__(self, decay: float = 0.9999) -> None:
        self.decay = decay
        self.ema: Optional[AveragedModel] = None
        self._swapped = False
        self._pending_state: Optional[dict] = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self.ema is None:
            self.ema = AveragedModel(_covered(pl_module), avg_fn=ema_avg_fn(self.decay), use_buffers=True)
            if self._pending_state is not None:
                self.ema.load_state_dict(self._pending_state)
                self._pending_state = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # with train.accumulate_grad_batches, only after the batches on which the optimisers stepped
        if self.ema is not None and not pl_module.in_dcg_warmup and getattr(pl_module, "optimizer_stepped", True):
            self.ema.update_parameters(_covered(pl_module))

    def _swap(self, pl_module: pl.LightningModule) -> None:
        if self.ema is None or self.ema.n_averaged.item() == 0:
            return
        live = _covered(pl_module)
        with torch.no_grad():
            for a, b in zip(
                list(self.ema.module.parameters()) + list(self.ema.module.buffers()),
                list(live.parameters()) + list(live.buffers()),
            ):
                tmp = a.detach().clone()
                a.copy_(b)
                b.copy_(tmp)
        self._swapped = not self._swapped

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._swap(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self._swapped:
            self._swap(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and self.ema.n_averaged.item() > 0:
            state = self.ema.module.state_dict()
            if self._swapped:  # saving during validation: the live weights are the EMA ones
                state = _covered(pl_module).state_dict()
            checkpoint["diffmic_ema"] = {k: v.detach().clone() for k, v in state.items()}
            checkpoint["diffmic_ema_n"] = int(self.ema.n_averaged.item())

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if "diffmic_ema" not in checkpoint:
            return
        state = {f"module.{k}": v for k, v in checkpoint["diffmic_ema"].items()}
        state["n_averaged"] = torch.tensor(checkpoint.get("diffmic_ema_n", 1))
        if self.ema is not None:
            self.ema.load_state_dict(state)
        else:
            self._pending_state = state


class StageAwareCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that does not select (top-k) during the DCG warm-up, whose validation
    measures the DCG only; ``last.ckpt`` is still written for resuming.

    ``ties="last"`` (``train.select_ties``): with ``save_top_k=1``, a later validation that equals the
    best score replaces it (Lightning, like the released code, keeps the first: strict improvement)."""

    def __init__(self, *args: Any, ties: str = "first", **kwargs: Any) -> None:
        if ties not in ("first", "last"):
            raise ValueError(f"ties must be 'first' or 'last', got {ties!r}")
        super().__init__(*args, **kwargs)
        self.ties = ties

    def check_monitor_top_k(self, trainer: pl.Trainer, current: Optional[Tensor] = None) -> bool:
        if (
            self.ties == "last"
            and current is not None
            and self.save_top_k == 1
            and self.kth_best_model_path in self.best_k_models
            and bool(torch.eq(current, self.best_k_models[self.kth_best_model_path]))
        ):
            return trainer.strategy.reduce_boolean_decision(True)
        return super().check_monitor_top_k(trainer, current)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if getattr(pl_module, "in_dcg_warmup", False):
            if self.save_last and not self._should_skip_saving_checkpoint(trainer):
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """``last.ckpt`` after EVERY epoch. Lightning's ModelCheckpoint rewrites ``last.ckpt`` only
        when it saved a top-k checkpoint at that step, so after an epoch that did not improve the
        monitored metric (or had no validation) a kill would lose it. Written atomically by
        :class:`~diffmic.training.checkpoint.AtomicCheckpointIO`."""
        super().on_train_epoch_end(trainer, pl_module)
        if (
            self.save_last
            and self.monitor is not None
            and not getattr(trainer, "fast_dev_run", False)  # set by the Trainer, not declared
            and not trainer.sanity_checking
            and self._last_global_step_saved != trainer.global_step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._last_global_step_saved = trainer.global_step
