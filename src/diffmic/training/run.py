"""Library entry points behind the CLI: fit, validate, test and predict a run folder.

A run folder holds ``config.yaml`` (the resolved config), ``checkpoints/`` (``best.ckpt`` selected
on the validation split, ``last.ckpt`` for resuming), TensorBoard and CSV logs, and after testing
``test_metrics.json`` and ``predictions.csv``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_only

from diffmic.config import Config, ConfigError, datamodule_kwargs, load_config, save_config, trainer_kwargs
from diffmic.devices import default_device
from diffmic.nn.diffmic import variant_parts
from diffmic.training.callbacks import DenoiserEMA, StageAwareCheckpoint
from diffmic.training.checkpoint import TMP_MARK, AtomicCheckpointIO, CheckpointError, load_module, read_checkpoint
from diffmic.training.console import model_summary
from diffmic.training.ddp import BroadcastBuffers
from diffmic.training.loading import resolve_checkpoint  # here and re-exported (predict uses it without Lightning)
from diffmic.training.module import DiffMICModule

if TYPE_CHECKING:
    from diffmic.data.datamodule import DiffMICDataModule


def _lead() -> bool:
    """Whether this process is global rank 0 (Lightning sets ``rank_zero_only.rank`` from the
    launcher's environment; the attribute is not declared on the function)."""
    return int(getattr(rank_zero_only, "rank", 0)) == 0


class RunFolderError(OSError):
    """The run folder cannot be created or written to."""


def build_datamodule(cfg: Config) -> DiffMICDataModule:
    """The data module of ``cfg`` (its arguments from :func:`diffmic.config.datamodule_kwargs`)."""
    from diffmic.data.datamodule import DiffMICDataModule

    return DiffMICDataModule(**datamodule_kwargs(cfg))


def _trainer(cfg: Config, run_dir: Path, callbacks: list, for_fit: bool) -> pl.Trainer:
    from diffmic.training.trackers import build_loggers

    t = cfg.train
    # train.logger: CSV / TensorBoard / MLflow / W&B (training.trackers); MLflow and W&B continue the
    # runs a resumed fit recorded in logs/trackers.json
    loggers = build_loggers(cfg, run_dir, lead=_lead()) if for_fit else []
    cbs = list(callbacks)
    if for_fit:
        cbs.append(BroadcastBuffers())  # DDP: every rank starts each epoch with rank 0's BN statistics
    if t.progress_bar:
        cbs.append(TQDMProgressBar(refresh_rate=max(1, t.log_every_n_steps)))
    trainer = pl.Trainer(
        **trainer_kwargs(cfg),
        logger=loggers if loggers else False,
        callbacks=cbs,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=str(run_dir),
        enable_model_summary=model_summary(for_fit),
        num_sanity_val_steps=0,
    )
    _ddp_allow_unused(trainer)
    return trainer


def _ddp_allow_unused(trainer: pl.Trainer) -> None:
    """Under DDP (``train.strategy=ddp``, ``ddp_spawn``, or ``auto`` on several devices) let
    parameters go unused in a backward pass: the DCG warm-up trains the DCG alone, and each joint
    step has two backward passes (diffusion, then DCG) that each leave the other part unused.
    Same as ``strategy="ddp_find_unused_parameters_true"``, for every DDP flavour."""
    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._ddp_kwargs["find_unused_parameters"] = True


#: config keys that define the network (a resumed run must keep them)
ARCHITECTURE_SECTIONS = ("model", "diffusion")
ARCHITECTURE_KEYS = ("data.image_size", "data.in_chans")
_INIT_ONLY = {"model.encoder_weights", "model.dcg_weights"}  # read at initialisation only


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_incompatibilities(cfg: Config, last: Path) -> list[str]:
    """``key: checkpoint value -> new value`` for every network-defining key that differs between
    the checkpoint to resume and ``cfg``."""
    old = _flat(read_checkpoint(last)["hyper_parameters"]["config"])
    new = _flat(cfg.to_dict())
    keys = sorted(
        k
        for k in set(old) | set(new)
        if (k.split(".", 1)[0] in ARCHITECTURE_SECTIONS or k in ARCHITECTURE_KEYS) and k not in _INIT_ONLY
    )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _refuse_non_empty(run_dir: Path, overwrite: bool) -> None:
    """A fresh fit never writes into a non-empty run folder, unless ``overwrite``: then the
    entries the folder's manifest says a run of ours wrote are removed first, nothing else, and
    nothing at all when the folder has no manifest or a file that is not ours carries a name a
    run writes (see :func:`diffmic.outputs.remove_run_outputs`)."""
    from diffmic.outputs import MANIFEST, RUN_LOCK, OutputError, remove_run_outputs

    if not run_dir.is_dir():
        return
    entries = sorted(p.name for p in run_dir.iterdir() if p.name not in (MANIFEST, RUN_LOCK))
    if not entries:
        return
    if not overwrite:
        last = run_dir / "checkpoints" / "last.ckpt"
        what = f"a training run ({last})" if last.exists() else "files of an earlier run or other files"
        shown = ", ".join(entries[:6]) + (f", ... ({len(entries)} entries)" if len(entries) > 6 else "")
        raise ConfigError(
            f"run folder '{run_dir}' already holds {what}: {shown}. Resume it with --resume, replace the "
            f"run with --overwrite, or choose another run.dir; nothing was overwritten."
        )
    try:
        remove_run_outputs(run_dir)
    except OutputError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise RunFolderError(f"--overwrite: cannot remove the old run's files in '{run_dir}': {exc}") from exc


def _prepare_run_folder(cfg: Config, run_dir: Path, ckpt_dir: Path, resume: bool) -> None:
    from diffmic.outputs import FIT_OUTPUTS, claim_outputs

    try:
        # the manifest first: what this fit writes is recorded before it exists. A resumed fit
        # rewrites config.yaml and fit_summary.json, writes into checkpoints/ and logs/ and has
        # checked split.json (a run folder from before the manifest gets one listing them)
        rewritten = ("checkpoints", "logs", "config.yaml", "fit_summary.json", "split.json") if resume else ()
        claim_outputs(run_dir, FIT_OUTPUTS, force=rewritten, create=True)
        ckpt_dir.mkdir(parents=True, exist_ok=True)  # fail now, not after the first epoch
        save_config(cfg, run_dir / "config.yaml")
        for partial in ckpt_dir.glob(f"*.ckpt{TMP_MARK}*"):  # left by a run killed while saving
            partial.unlink()
        log = run_dir / "logs" / "metrics.csv"
        if resume and log.is_file() and _lead():
            # Lightning's CSVLogger deletes an existing metrics.csv: keep the log of the epochs
            # before the interruption as metrics.part1.csv, metrics.part2.csv, ...
            n = 1
            while (log.parent / f"metrics.part{n}.csv").exists():
                n += 1
            os.replace(log, log.parent / f"metrics.part{n}.csv")
    except OSError as exc:
        raise RunFolderError(f"cannot write to run folder '{run_dir}': {exc}. Choose a writable run.dir.") from exc


def _read_encoder_init(cfg: Config) -> dict:
    """The encoder weights named by ``train.init_encoder_from``, checked against ρ(x)'s backbone
    (built on the meta device: shapes only). A resumed run does not read them: its ρ(x) is in
    ``last.ckpt`` (or, resumed within the DCG warm-up, is read at the start of the joint phase)."""
    from diffmic.nn.encoders import create_encoder, timm_encoder_kwargs
    from diffmic.training.checkpoint import encoder_init_state

    m = cfg.model
    with torch.device("meta"):  # the same encoder build_model makes (timm kwargs and img_size included)
        target = create_encoder(
            m.encoder,
            in_chans=cfg.data.in_chans,
            kwargs=timm_encoder_kwargs(m.encoder, m.encoder_kwargs, cfg.data.image_size),
        )
    assert cfg.train.init_encoder_from is not None
    return encoder_init_state(cfg.train.init_encoder_from, target, cfg.model.encoder)


def fit(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Train (and select the best checkpoint on validation). Returns the run folder.

    A run folder may not hold or lie inside the data; one fit (fresh or resumed) holds it at a
    time (the run lock, ``<run>/.diffmic-run.lock``). A fresh fit refuses a non-empty run folder
    unless ``overwrite`` (which removes only what the folder's manifest says a run of ours
    wrote); ``resume`` first checks that the network keys match the checkpoint and that the data
    split is the recorded one, and changes nothing in the folder when they do not."""
    from diffmic.training.run_folder import RunLock, check_run_outside_data
    from diffmic.training.trackers import check_available

    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    check_run_outside_data(cfg.run.dir, cfg.data.root)
    check_available(cfg)  # an MLflow / W&B logger without its package: say so before the folder is touched
    if not _lead():  # DDP: rank 0 holds the lock for all ranks
        return _fit_locked(cfg, resume, overwrite)
    with RunLock(Path(cfg.run.dir), RunFolderError):
        return _settled(Path(cfg.run.dir), lambda: _fit_locked(cfg, resume, overwrite))


def _settled(run_dir: Path, step):
    """``step()``, then the run folder's manifest keeps only the outputs that were written
    (:func:`diffmic.outputs.settle_outputs`). When ``step`` fails its error is the one reported:
    a manifest that cannot be settled then keeps a name too many, as before the step."""
    import contextlib

    from diffmic.outputs import OutputError, settle_outputs

    try:
        result = step()
    except BaseException:
        with contextlib.suppress(OSError, OutputError):
            settle_outputs(run_dir)
        raise
    settle_outputs(run_dir)
    return result


def _fit_locked(cfg: Config, resume: bool, overwrite: bool) -> Path:
    """``fit`` under the run lock: check and prepare the folder, the data and the module, train,
    then write the final state and ``fit_summary.json``."""
    from diffmic.provenance import Stopwatch

    watch = Stopwatch()
    run_dir = Path(cfg.run.dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    encoder_init = _check_fit_start(cfg, run_dir, resume, overwrite)
    pl.seed_everything(cfg.run.seed, workers=True, verbose=False)
    dm = _fit_data(cfg, run_dir, resume)
    module = _fit_module(cfg, dm, resume, encoder_init)
    best, callbacks = _fit_callbacks(cfg, run_dir / "checkpoints")
    trainer = _trainer(cfg, run_dir, callbacks, for_fit=True)
    trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    from diffmic.training.trackers import finish

    finish(trainer.loggers)
    # The final state, always: ModelCheckpoint may skip the last epoch's `last.ckpt` (for
    # example when it saved at that global step already), and resume/export rely on it.
    trainer.save_checkpoint(str(last), weights_only=False)  # full state (optimisers, EMA) for --resume
    from diffmic.training.stopping import summary as stopping_summary

    summary = {
        "best_checkpoint": best.best_model_path or None,
        "best_score": float(best.best_model_score) if best.best_model_score is not None else None,
        "monitor": best.monitor,
        "selected_on": cfg.train.select_on,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "resumed": bool(resume),  # a resumed fit's times cover this process only
        "early_stopping": stopping_summary(callbacks),
        **watch.record(),
    }
    if trainer.is_global_zero:
        (run_dir / "fit_summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir


def _check_fit_start(cfg: Config, run_dir: Path, resume: bool, overwrite: bool) -> Optional[dict]:
    """Everything a fit checks before it changes the run folder: a fresh fit's folder is empty (or
    ``overwrite`` clears our outputs), a resumed one has ``last.ckpt`` with the same network keys;
    ``train.init_encoder_from``'s weights are read and checked (returned; None otherwise). A fresh
    fit's folder is then prepared (a resumed one after its data split is checked, in
    :func:`_fit_data`). DDP: global rank 0 checks and prepares the folder; under `ddp` the other
    ranks re-run this command after rank 0 has written it, and under torchrun/srun they start at
    the same time."""
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    lead = _lead()
    if not resume and lead:
        _refuse_non_empty(run_dir, overwrite)
    if resume and not last.exists():
        raise CheckpointError(f"--resume: no {last} to resume from.")
    encoder_init = None
    if cfg.train.init_encoder_from and not resume:  # read and check it before writing anything
        encoder_init = _read_encoder_init(cfg)
    if resume:
        diffs = resume_incompatibilities(cfg, last)
        if diffs:
            raise ConfigError(
                f"cannot resume '{run_dir}': these keys differ from the checkpoint ({last.name}) and change "
                f"the network: {'; '.join(diffs)}. Remove the overrides, or start a new run in another "
                f"run.dir; nothing in the run folder was changed."
            )
    elif lead:
        _prepare_run_folder(cfg, run_dir, ckpt_dir, resume)
    return encoder_init


def _fit_data(cfg: Config, run_dir: Path, resume: bool) -> DiffMICDataModule:
    """The data module, set up for fit: a resumed fit's split must be the recorded one (then its
    folder is prepared); the split is recorded and skipped images reported; a step budget
    (``train.joint_steps`` / ``dcg_warmup_steps``) becomes epochs of this data set."""
    from diffmic.training.budget import apply_step_budget
    from diffmic.training.run_folder import check_split, report_skipped, split_record, write_split

    lead = _lead()
    dm = build_datamodule(cfg)
    dm.setup("fit")
    if resume:
        check_split(run_dir, dm, "fit --resume")
        if lead:
            _prepare_run_folder(cfg, run_dir, run_dir / "checkpoints", resume)
    if lead:
        if not (run_dir / "split.json").exists():
            write_split(run_dir, split_record(dm))
        report_skipped(run_dir, dm)
    if apply_step_budget(cfg, len(dm.get_dataset("train"))) and lead:
        save_config(cfg, run_dir / "config.yaml")
    return dm


def _fit_module(cfg: Config, dm: DiffMICDataModule, resume: bool, encoder_init: Optional[dict]) -> DiffMICModule:
    """The LightningModule to train: a resumed fit reads no initial-weights file (every weight comes
    from ``last.ckpt``); ``train.init_encoder_from``'s weights wait for the joint phase."""
    module_cfg = cfg.to_dict()
    if resume:
        module_cfg["model"] = {**module_cfg["model"], "encoder_weights": None, "dcg_weights": None}
    module = DiffMICModule(module_cfg, dm.num_classes, list(dm.class_names))
    if cfg.train.init_encoder_from and module.model.uses_diffusion:
        # fresh fit: the weights read and checked before; resume: read when the joint phase starts
        # (only if the checkpoint was saved before rho(x) was initialised)
        module.prepare_encoder_init(encoder_init, loader=lambda: _read_encoder_init(cfg))
    return module


def _fit_callbacks(cfg: Config, ckpt_dir: Path) -> tuple[StageAwareCheckpoint, list[pl.Callback]]:
    """The checkpoint that selects ``best.ckpt`` on val/<train.monitor>, and every callback of a fit:
    learning-rate logging, mid-epoch checkpoints, the denoiser's EMA, early stopping."""
    t = cfg.train
    monitor = f"val/{t.monitor}"
    best = StageAwareCheckpoint(
        dirpath=str(ckpt_dir),
        filename="best",
        monitor=monitor,
        mode="max",
        save_top_k=1,
        save_last=True,
        enable_version_counter=False,
        ties=t.select_ties,
    )
    callbacks: list[pl.Callback] = [best, LearningRateMonitor(logging_interval="epoch")]
    if t.checkpoint_every_n_steps:
        callbacks.append(
            StageAwareCheckpoint(
                dirpath=str(ckpt_dir),
                filename="step",
                every_n_train_steps=t.checkpoint_every_n_steps,
                save_top_k=1,
                monitor=None,
                save_last=True,
                enable_version_counter=False,
            )
        )
    if t.use_ema and variant_parts(cfg.model.variant).diffusion:
        callbacks.append(DenoiserEMA(t.ema_decay))
    if t.early_stop_patience is not None:  # on val/<monitor>, joint stage (training.stopping)
        from diffmic.training.stopping import early_stopping

        callbacks.append(early_stopping(monitor, t.early_stop_patience, t.early_stop_min_delta))
    return best, callbacks


def evaluate(
    run_dir: str | Path,
    stage: str = "test",
    ckpt: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    config_path: Optional[str] = None,
) -> dict:
    """Test (or validate) a trained run; writes ``test_metrics.json`` and ``predictions.csv``."""
    from diffmic.provenance import Stopwatch

    watch = Stopwatch()
    run_dir = Path(run_dir)
    cfg, ckpt_path = _evaluation_inputs(run_dir, stage, ckpt, overrides, config_path)
    dm = build_datamodule(cfg)
    dm.setup("test" if stage == "test" else "validate")
    eval_over = {"eval": {k: v for k, v in cfg.to_dict()["eval"].items()}}
    module = load_module(ckpt_path, expected_class_names=list(dm.class_names), overrides=eval_over)
    from diffmic.training.run_folder import check_split

    check_split(
        run_dir, dm, stage, overrides=list(overrides or []) + ([f"--config {config_path}"] if config_path else [])
    )
    module.output_dir = run_dir if stage == "test" else None
    if stage == "test":
        ensure_calibration(module, cfg, ckpt_path, run_dir)
    trainer = _trainer(cfg, run_dir, [], for_fit=False)
    pl.seed_everything(cfg.run.seed, verbose=False)
    if stage == "test":
        return _test(trainer, module, dm, cfg, run_dir, ckpt_path, watch)
    out = trainer.validate(module, datamodule=dm, verbose=False)
    return {k: float(v) for k, v in (out[0] if out else {}).items()}


def _evaluation_inputs(
    run_dir: Path, stage: str, ckpt: Optional[str], overrides: Optional[list[str]], config_path: Optional[str]
) -> tuple[Config, Path]:
    """The run's configuration and checkpoint, and for a test every check that can fail before the
    data are read: a bad --ckpt, a missing tracker package, a run folder inside the data, a folder
    that cannot be written, a user's file under a test output's name."""
    cfg_file = Path(config_path) if config_path else run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"'{cfg_file}' not found: pass --run with a trained run folder or --config.")
    cfg = load_config(cfg_file, overrides)
    ckpt_path = resolve_checkpoint(run_dir, ckpt)
    read_checkpoint(ckpt_path)  # a bad --ckpt is reported before the data are read
    if stage == "test":
        from diffmic.training.run_folder import check_run_outside_data, probe_writable
        from diffmic.training.trackers import check_available

        check_available(cfg)  # MLflow / W&B get the test metrics: their packages are needed
        check_run_outside_data(run_dir, cfg.data.root)
        probe_writable(run_dir, RunFolderError)  # a read-only folder or a full disk: say so before evaluating
        _claim_test_outputs(run_dir, claim=False)  # a file of the user's under an output name: say so now
    return cfg, ckpt_path


def _test(trainer: pl.Trainer, module, dm, cfg: Config, run_dir: Path, ckpt_path: Path, watch) -> dict:
    """Run the test pass; rank 0 records the outputs in the manifest first and writes
    ``test_metrics.json`` (with the machine and the test's wall / CPU time) and the trackers' copies."""
    lead = _lead()  # DDP: rank 0 writes the results, and keeps the manifest

    def test() -> dict:
        if lead:
            _claim_test_outputs(run_dir, claim=True)
        trainer.test(module, datamodule=dm, verbose=False)
        result = getattr(module, "test_result", {})
        result["checkpoint"] = str(ckpt_path)
        result["selected_on"] = cfg.train.select_on
        result["provenance"] = watch.record()  # the machine, and the test's wall / CPU time
        if trainer.is_global_zero:
            (run_dir / "test_metrics.json").write_text(json.dumps(result, indent=2))
            from diffmic.training.trackers import log_test

            log_test(cfg, run_dir, result)  # train.logger's MLflow / W&B runs get the test metrics and figures
        return result

    return _settled(run_dir, test) if lead else test()


def _claim_test_outputs(run_dir: Path, claim: bool) -> None:
    """Refuse when a file in the run folder that no run of ours wrote carries the name of a test
    output (it would be written over); with ``claim``, record the test outputs in the folder's
    manifest (before they are written)."""
    from diffmic.outputs import TEST_OUTPUTS, OutputError, claim_outputs, read_manifest

    try:
        listed = read_manifest(run_dir)
        if listed is not None:
            foreign = [n for n in TEST_OUTPUTS if n not in listed and os.path.lexists(run_dir / n)]
            if foreign:
                raise ConfigError(
                    f"test: {', '.join(repr(n) for n in foreign)} in run folder '{run_dir}' "
                    f"{'is' if len(foreign) == 1 else 'are'} not listed in its record of the files diffmic "
                    "wrote, and the test would write over it; nothing was evaluated. Move it away."
                )
        if claim:
            claim_outputs(run_dir, TEST_OUTPUTS)
    except OutputError as exc:
        raise ConfigError(str(exc)) from exc
    except OSError as exc:
        raise RunFolderError(f"cannot write to run folder '{run_dir}': {exc}. Nothing was evaluated.") from exc


def calibrate(
    run_dir: str | Path,
    ckpt: Optional[str] = None,
    overrides: Optional[list[str]] = None,
    config_path: Optional[str] = None,
    store: bool = True,
) -> dict:
    """Fit the temperature, referral threshold and conformal quantile on the validation split
    (``diffmic calibrate``) and store them in the checkpoint. Returns the fitted parameters."""
    run_dir = Path(run_dir)
    cfg_file = Path(config_path) if config_path else run_dir / "config.yaml"
    if not cfg_file.exists():
        raise ConfigError(f"'{cfg_file}' not found: pass --run with a trained run folder or --config.")
    cfg = load_config(cfg_file, overrides)
    ckpt_path = resolve_checkpoint(run_dir, ckpt)
    eval_over = {"eval": {k: v for k, v in cfg.to_dict()["eval"].items()}}
    module = load_module(ckpt_path, overrides=eval_over)
    return _fit_calibration(module, cfg, ckpt_path, store=store)


def _fit_calibration(module, cfg: Config, ckpt_path: Path, store: bool) -> dict:
    from diffmic.trust.evaluate import collect_probs, fit_trust

    if cfg.train.select_on == "test":
        raise ConfigError(
            "calibration is fitted on the validation split, but this run validates on the "
            "test split (train.select_on=test); it cannot be calibrated honestly."
        )
    dm = build_datamodule(cfg)
    dm.setup("validate")
    try:
        loader = dm.val_dataloader()
    except KeyError as exc:
        raise ConfigError(f"no validation split to calibrate on ({exc}); set data.val_fraction > 0") from exc
    device = default_device()
    module.to(device)
    pl.seed_everything(cfg.run.seed, verbose=False)
    ood_parts: list = []
    prior_parts: list = []
    probs, labels, ids = collect_probs(module, loader, ood=ood_parts, prior=prior_parts)
    if labels.numel() == 0:
        raise ConfigError("the validation split is empty: nothing to calibrate on; set data.val_fraction > 0")
    prior = torch.cat(prior_parts) if prior_parts else None
    calib = fit_trust(probs, labels, module.cfg.eval, split="val", ids=ids, prior=prior)
    calib["ood"] = _fit_ood(module, dm, ood_parts)
    calib["checkpoint"] = str(ckpt_path)
    calib["stored"] = bool(store)
    if store:
        from diffmic.training.checkpoint import store_calibration

        store_calibration(ckpt_path, calib)
    module.calibration = calib
    module.cpu()
    return calib


def _fit_ood(module, dm, parts: list) -> dict:
    """The out-of-distribution flag (trust.ood): ``eval.ood_score``'s threshold on the validation
    inputs ``parts``; for ``mahalanobis`` the class means and shared covariance of ρ(x) on the
    training split first (its images without augmentation). A score that cannot be fitted (e.g. no
    training images) leaves the flag off, with the reason stored and printed."""
    import sys

    from diffmic.data.datasets import CachedImageDataset
    from diffmic.data.transforms import build_transform
    from diffmic.trust.ood import OODInputs, collect_features, fit_mahalanobis, fit_ood, resolve_score

    e = module.cfg.eval
    score = resolve_score(e.ood_score, module.model.variant, e.num_samples)
    try:
        maha = None
        if score == "mahalanobis":
            tr = dm.get_dataset("train")
            plain = CachedImageDataset(tr.images, tr.rows, tr.labels, tr.ids, build_transform(False, dm.in_chans))
            loader = torch.utils.data.DataLoader(plain, batch_size=dm.eval_batch_size, num_workers=dm.num_workers)
            maha = {**fit_mahalanobis(*collect_features(module, loader)), "fitted_on": "train"}
        return fit_ood(OODInputs.concat(parts), score, e.ood_false_flag_rate, maha)
    except (ValueError, KeyError) as exc:
        print(f"diffmic: no out-of-distribution flag fitted ({exc})", file=sys.stderr)
        return {"score": None, "reason": f"eval.ood_score={e.ood_score}: {exc}"}


def ensure_calibration(module, cfg: Config, ckpt_path: Path, run_dir: Path) -> None:
    """Before a test: use the checkpoint's calibration when it was fitted for these evaluation
    settings; otherwise fit one on the validation split, stored in the checkpoint only when it has
    none yet and lies in this run folder (a calibration for other settings is used for this test
    only; `diffmic calibrate` replaces a stored one)."""
    from diffmic.trust.evaluate import settings_match

    calib = getattr(module, "calibration", None)
    if calib is not None and settings_match(calib.get("settings"), module.cfg.eval):
        return
    inside = run_dir.resolve() in Path(ckpt_path).resolve().parents
    store = calib is None and inside
    try:
        _fit_calibration(module, cfg, ckpt_path, store=store)
    except ConfigError as exc:  # no honest validation split: test reports uncalibrated scores
        import sys

        module.calibration = None
        print(f"diffmic test: not calibrated ({exc}); the referral uses eval.refer_threshold", file=sys.stderr)
