"""Library entry points behind the CLI: fit, validate, test and predict a run folder.

A run folder holds ``config.yaml`` (the resolved config), ``checkpoints/`` (``best.ckpt`` selected
on the validation split, ``last.ckpt`` for resuming), TensorBoard and CSV logs, and after testing
``test_metrics.json`` and ``predictions.csv``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from diffmic.config import Config, ConfigError, load_config, save_config
from diffmic.training.callbacks import DenoiserEMA, StageAwareCheckpoint
from diffmic.training.checkpoint import TMP_MARK, AtomicCheckpointIO, CheckpointError, load_module
from diffmic.training.module import DiffMICModule


class RunFolderError(OSError):
    """The run folder cannot be created or written to."""


def build_datamodule(cfg: Config):
    from diffmic.data.datamodule import DiffMICDataModule

    d = cfg.data
    dm = DiffMICDataModule(
        dataset=d.dataset,
        root=d.root,
        split=d.split,
        test_fraction=d.test_fraction,
        path_col=d.path_col,
        label_col=d.label_col,
        split_col=d.split_col,
        image_size=d.image_size,
        in_chans=d.in_chans,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        val_fraction=d.val_fraction,
        seed=cfg.run.seed,
        vflip=d.vflip,
        rotation=d.rotation,
        cache_dir=d.cache_dir,
        skip_bad=d.skip_bad,
        subset=d.subset,
        check_images=d.check_images,
        class_balance=d.class_balance,
        # The released code's protocol: model selection on the test set (optimistic; labelled in
        # every output). Validation then runs on the test split.
        val_split="test" if cfg.train.select_on == "test" else "val",
    )
    return dm


def _trainer(cfg: Config, run_dir: Path, callbacks: list, for_fit: bool) -> pl.Trainer:
    t = cfg.train
    loggers = []
    if for_fit:
        loggers = [
            TensorBoardLogger(str(run_dir), name="logs", version=""),
            CSVLogger(str(run_dir), name="logs", version=""),
        ]
    cbs = list(callbacks)
    if t.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)))
    total_epochs = t.epochs + (t.dcg_warmup_epochs if cfg.model.variant in ("C2", "full", "dcg") else 0)
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_epochs=total_epochs,
        logger=loggers if loggers else False,
        callbacks=cbs,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=t.log_every_n_steps,
        deterministic=cfg.run.deterministic,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=for_fit,
        num_sanity_val_steps=0,
    )


def fit(cfg: Config, resume: bool = False) -> Path:
    """Train (and select the best checkpoint on validation). Returns the run folder."""
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if not resume and last.exists():
        raise ConfigError(
            f"run folder '{run_dir}' already holds a training run ({last}). Resume it with --resume, "
            f"or choose another run.dir; nothing was overwritten."
        )
    if resume and not last.exists():
        raise CheckpointError(f"--resume: no {last} to resume from.")
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after the first epoch
        save_config(cfg, run_dir / "config.yaml")
        for partial in ckpt_dir.glob(f"*.ckpt{TMP_MARK}*"):  # left by a run killed while saving
            partial.unlink()
        log = run_dir / "logs" / "metrics.csv"
        if resume and log.is_file() and rank_zero_only.rank == 0:
            # Lightning's CSVLogger deletes an existing metrics.csv: keep the log of the epochs
            # before the interruption as metrics.part1.csv, metrics.part2.csv, ...
            n = 1
            while (log.parent / f"metrics.part{n}.csv").exists():
                n += 1
            os.replace(log, log.parent / f"metrics.part{n}.csv")
    except OSError as exc:
        raise RunFolderError(f"cannot write to run folder '{run_dir}': {exc}. Choose a writable run.dir.") from exc
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    dm = build_datamodule(cfg)
    dm.setup("fit")
    from diffmic.training.budget import apply_step_budget

    if apply_step_budget(cfg, len(dm.get_dataset("train"))):  # step budget -> epochs for this data set
        save_config(cfg, run_dir / "config.yaml")
    module = DiffMICModule(cfg.to_dict(), dm.num_classes, list(dm.class_names))
    monitor = f"val/{cfg.train.monitor}"
    best = StageAwareCheckpoint(
        dirpath=str(ckpt_dir), filename="best", monitor=monitor, mode="max", save_top_k=1,
        save_last=True, enable_version_counter=False,
    )
    callbacks: list = [best, LearningRateMonitor(logging_interval="epoch")]
    if cfg.train.checkpoint_every_n_steps:
        callbacks.append(
            StageAwareCheckpoint(
                dirpath=str(ckpt_dir), filename="step", every_n_train_steps=cfg.train.checkpoint_every_n_steps,
                save_top_k=1, monitor=None, save_last=True, enable_version_counter=False,
            )
        )
    if cfg.train.use_ema and cfg.model.variant not in ("basic", "dcg"):
        callbacks.append(DenoiserEMA(cfg.train.ema_decay))
    trainer = _trainer(cfg, run_dir, callbacks, for_fit=True)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    # The final state, always: ModelCheckpoint may skip the last epoch's `last.ckpt` (for
    # example when it saved at that global step already), and resume/export rely on it.
    trainer.save_checkpoint(str(last), weights_only=False)  # full state (optimisers, EMA) for --resume
    summary = {
        "best_checkpoint": best.best_model_path or None,
        "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        "monitor": monitor,
        "selected_on": cfg.train.select_on,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
    }
    if trainer.is_global_zero:
        (run_dir / "fit_summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def resolve_checkpoint(run_dir: Path, ckpt: Optional[str]) -> Path:
    if ckpt:
        return Path(ckpt)
    for name in ("best.ckpt", "last.ckpt"):
        p = run_dir / "checkpoints" / name
        if p.exists():
            return p
    raise CheckpointError(f"no checkpoint in '{run_dir / 'checkpoints'}'. Train first with `diffmic fit`.")


def evaluate(
    run_dir: str | Path, stage: str = "test", ckpt: Optional[str] = None, overrides: Optional[list[str]] = None,
    config_path: Optional[str] = None,
) -> dict:
    """Test (or validate) a trained run; writes ``test_metrics.json`` and ``predictions.csv``."""
    run_dir = Path(run_dir)
    cfg_file = Path(config_path) if config_path else run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"'{cfg_file}' not found: pass --run with a trained run folder or --config.")
    cfg = load_config(cfg_file, overrides)
    ckpt_path = resolve_checkpoint(run_dir, ckpt)
    dm = build_datamodule(cfg)
    dm.setup("test" if stage == "test" else "validate")
    eval_over = {"eval": {k: v for k, v in cfg.to_dict()["eval"].items()}}
    module = load_module(ckpt_path, expected_class_names=list(dm.class_names), overrides=eval_over)
    module.output_dir = run_dir if stage == "test" else None
    trainer = _trainer(cfg, run_dir, [], for_fit=False)
    pl.seed_everything(cfg.run.seed, verbose=False)
    if stage == "test":
        trainer.test(module, datamodule=dm, verbose=False)
        result = getattr(module, "test_result", {})
        result["checkpoint"] = str(ckpt_path)
        result["selected_on"] = cfg.train.select_on
        if trainer.is_global_zero:
            (run_dir / "test_metrics.json").write_text(json.dumps(result, indent=2))
        return result
    out = trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in (out[0] if out else {}).items()}
