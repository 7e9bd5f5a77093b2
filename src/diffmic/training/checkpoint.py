"""Checkpoint loading that never unpickles arbitrary objects and never loads partially.

A diffmic checkpoint is a Lightning checkpoint whose ``hyper_parameters`` hold the full resolved
config (plain types), the number of classes and the class names, so the model is rebuilt from the
file alone. It is read with ``torch.load(weights_only=True)``: a file carrying a pickled object
(code) is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from diffmic.atomic import atomic_path
from diffmic.training.loading import (  # noqa: F401  (re-exported: the checkpoint API lives here)
    _SIZE_SLACK_BYTES,
    CALIBRATION_KEY,
    TRAINING_ONLY_STATE,
    CheckpointError,
    LoadedNetwork,
    _check_file_kind,
    check_classes,
    check_size,
    checkpoint_config,
    load_network,
    mismatch,
    read_checkpoint,
    resolve_checkpoint,
    unbuildable,
)
from diffmic.training.module import DiffMICModule


def check_sizes_before_building(path, config: dict, num_classes: int, class_names: list) -> None:
    """Refuse a checkpoint whose config asks for a model much larger than the weights the file
    holds (a small file could otherwise make us allocate hundreds of GB): the model is first built
    on the ``meta`` device (no memory) and its size compared with the file's tensors."""
    check_classes(path, num_classes, class_names)
    try:
        with torch.device("meta"):
            meta = DiffMICModule(config, int(num_classes), list(class_names))
    except CheckpointError:
        raise
    except Exception as exc:
        raise unbuildable(path, exc) from exc
    check_size(path, meta)


def load_module(
    path: str | Path,
    *,
    expected_class_names: Optional[list[str]] = None,
    overrides: Optional[dict] = None,
    use_ema: Optional[bool] = None,
):
    """Rebuild a :class:`DiffMICModule` from a checkpoint and load its weights strictly.

    ``overrides`` may change evaluation-only settings (``{"eval": {...}}``); anything that changes
    the network is refused. ``expected_class_names`` guards against evaluating on other classes.
    """

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    # every weight comes from the checkpoint: never re-read initial weights (files may be gone; offline)
    config = checkpoint_config(path, hp, overrides)  # validated
    names = list(hp["class_names"])
    if expected_class_names is not None and list(expected_class_names) != names:
        raise CheckpointError(
            f"checkpoint '{path}' was trained on {len(names)} classes {names}, but the data has "
            f"{len(expected_class_names)} classes {list(expected_class_names)}. Use a checkpoint "
            f"trained on this data set or fix data.* in the config."
        )
    # The checkpoint holds every weight: never read initial-weights files (they may be gone).
    config["model"] = {**dict(config.get("model", {})), "encoder_weights": None, "dcg_weights": None}
    check_sizes_before_building(path, config, hp["num_classes"], names)
    module = DiffMICModule(config, int(hp["num_classes"]), names)
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise mismatch(path, str(exc)) from exc
    if use_ema is None:
        use_ema = module.cfg.train.use_ema
    if use_ema and "diffmic_ema" in ckpt:
        try:
            module.diffusion_modules().load_state_dict(ckpt["diffmic_ema"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"EMA weights in '{path}' do not match the model: {str(exc)[:500]}") from exc
    module.eval()
    module.loaded_from = str(path)
    module.diffmic_version = ckpt.get("diffmic_version", "unknown")
    module.calibration = ckpt.get(CALIBRATION_KEY)  # trust parameters fitted on validation, or None
    return module


def store_calibration(path: str | Path, calibration: dict) -> None:
    """Write the fitted trust parameters (plain JSON-like values) into the checkpoint ``path``,
    atomically (the weights are unchanged; an earlier calibration is replaced)."""
    ckpt = read_checkpoint(path)
    ckpt[CALIBRATION_KEY] = calibration
    AtomicCheckpointIO().save_checkpoint(ckpt, path)


TMP_MARK = ".tmp-"  # "<name>.ckpt.tmp-<pid>": a checkpoint being written (removed by fit on start)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file next to it, flushes it to disk and renames it over
    the old one, so that a kill or a full disk at any moment leaves either the previous or the new
    checkpoint, never a partial file.

    Lightning's default stages the file in the system temp folder and moves it; when that folder is
    on another filesystem (common on clusters) the move is a plain copy that a kill can cut short,
    and a killed run also leaves its staged copy in the temp folder.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's path
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # "<name>.ckpt.tmp-<pid>": a run killed while saving leaves it, and fit removes it on start
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
        with atomic_path(path, tmp=tmp), open(tmp, "wb") as fh:
            torch.save(checkpoint, fh)
            fh.flush()
            os.fsync(fh.fileno())
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
        except OSError:  # pragma: no cover - e.g. Windows cannot open folders
            return
        try:
            os.fsync(fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------------
# train.init_encoder_from: rho(x) from an earlier run
# --------------------------------------------------------------------------------------------------

_INIT_HINT = (
    "Give the folder of a finished `diffmic fit` run (its checkpoints/best.ckpt is used) or a .ckpt file; "
    "in an experiment grid, list the source model before the model that uses it."
)


def resolve_encoder_source(source: str | os.PathLike[str]) -> Path:
    """The checkpoint named by ``train.init_encoder_from``: a ``.ckpt`` file, or a run folder's
    ``checkpoints/best.ckpt`` once that run has finished (``fit_summary.json`` written)."""
    p = Path(source)
    key = "train.init_encoder_from"
    if p.is_dir():
        if not (p / "fit_summary.json").is_file():
            raise CheckpointError(
                f"{key}: run folder '{p}' has not finished training (no fit_summary.json), so its best "
                f"checkpoint may still change. Finish that run first. {_INIT_HINT}"
            )
        best = p / "checkpoints" / "best.ckpt"
        if not best.is_file():
            raise CheckpointError(f"{key}: run folder '{p}' has no checkpoints/best.ckpt. {_INIT_HINT}")
        return best
    if not p.exists():
        raise CheckpointError(f"{key}: '{p}' does not exist. {_INIT_HINT}")
    return p


def _source_encoder(module: DiffMICModule) -> tuple[torch.nn.Module, str]:
    """The image encoder of a loaded run and what it is: ρ(x)'s backbone (C1, C2, full), the
    backbone of the ``basic`` classifier, or the DCG global backbone (``dcg``)."""
    m, cfg = module.model, module.cfg.model
    if m.image_embedding is not None:
        return m.image_embedding.encoder, f"the rho(x) encoder ({cfg.encoder}) of a '{m.variant}' run"
    if m.encoder is not None:
        return m.encoder, f"the backbone ({cfg.encoder}) of a 'basic' run"
    assert m.dcg is not None
    return m.dcg.global_encoder, f"the DCG global backbone ({cfg.dcg_global}) of a 'dcg' run"


def encoder_init_state(
    source: str | os.PathLike[str], target: torch.nn.Module, target_name: str
) -> dict[str, torch.Tensor]:
    """The encoder weights of the run ``source`` (``train.init_encoder_from``), checked to fit the
    encoder ``target`` (named ``target_name`` in messages) key by key and shape by shape.

    The source is read like any checkpoint (:func:`load_module`: ``torch.load(weights_only=True)``,
    strict loading, its EMA weights where it evaluates with them), so the encoder is the one whose
    test results the source run reports. Raises :class:`CheckpointError` naming the file."""
    path = resolve_encoder_source(source)
    try:
        module = load_module(path)
    except CheckpointError as exc:
        raise CheckpointError(f"train.init_encoder_from: {exc}") from None
    encoder, what = _source_encoder(module)
    state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    own = target.state_dict()
    problems = [f"missing {k}" for k in sorted(set(own) - set(state))]
    problems += [f"unexpected {k}" for k in sorted(set(state) - set(own))]
    problems += [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} here"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} differences)" if len(problems) > 5 else "")
        raise CheckpointError(
            f"train.init_encoder_from: '{path}' holds {what}, which does not fit this run's rho(x) encoder "
            f"({target_name}): {shown}. Use a source run with the same backbone and data.in_chans, or set "
            f"model.encoder to its backbone."
        )
    return state
