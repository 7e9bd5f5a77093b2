"""Checkpoint loading that never unpickles arbitrary objects and never loads partially.

A diffmic checkpoint is a Lightning checkpoint whose ``hyper_parameters`` hold the full resolved
config (plain types), the number of classes and the class names, so the model is rebuilt from the
file alone. It is read with ``torch.load(weights_only=True)``: a file carrying a pickled object
(code) is refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from diffmic.config import config_from_dict
from diffmic.training.module import DiffMICModule


class CheckpointError(ValueError):
    """The file is not a usable diffmic checkpoint for this purpose."""


_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"BM": "a BMP image",
    b"II*\x00": "a TIFF image",
    b"MM\x00*": "a TIFF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x93NUMPY": "a NumPy .npy file",
}


def _check_file_kind(p: Path) -> None:
    """A torch checkpoint is a zip archive (or, from old PyTorch, a pickle starting with 0x80);
    anything else gets a message that says what the file is instead."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise CheckpointError(f"checkpoint '{p}' cannot be read: {exc}") from exc
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return
    if not head:
        raise CheckpointError(
            f"checkpoint '{p}' could not be read (truncated or not a torch file): the file is empty (0 bytes)."
        )
    what = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if what is None:
        text = all(32 <= c < 127 or c in (9, 10, 13) for c in head)
        what = "a text file" if text else "not a PyTorch file"
    raise CheckpointError(
        f"'{p}' is not a checkpoint: it is {what}. Pass the .ckpt file written by "
        f"`diffmic fit` (e.g. <run>/checkpoints/best.ckpt)."
    )


#: a checkpoint's config may describe at most this many bytes of weights beyond what the file holds
_SIZE_SLACK_BYTES = 16 * 2**20


def check_sizes_before_building(path, config: dict, num_classes: int, class_names: list) -> None:
    """Refuse a checkpoint whose config asks for a model much larger than the weights the file
    holds (a small file could otherwise make us allocate hundreds of GB): the model is first built
    on the ``meta`` device (no memory) and its size compared with the file's tensors."""
    if not 1 <= int(num_classes) <= 100_000 or len(class_names) != int(num_classes):
        raise CheckpointError(
            f"checkpoint '{path}' declares {num_classes} classes with "
            f"{len(class_names)} names; not a usable diffmic checkpoint."
        )
    try:
        with torch.device("meta"):
            meta = DiffMICModule(config, int(num_classes), list(class_names))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint '{path}': its config does not describe a buildable model "
            f"({type(exc).__name__}: {str(exc)[:300]}); nothing was loaded."
        ) from exc
    need = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
    size = Path(path).stat().st_size
    if need > size + _SIZE_SLACK_BYTES:
        raise CheckpointError(
            f"checkpoint '{path}' ({size / 2**20:.1f} MiB) describes a model of {need / 2**30:.2f} GiB that "
            f"it cannot hold: the config in it was edited or the file is not trustworthy; nothing was "
            f"allocated or loaded."
        )


def read_checkpoint(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' does not exist. Train first (diffmic fit) or pass --ckpt PATH.")
    _check_file_kind(p)
    try:
        # mmap: tensor storages stay in the file (nothing allocated for sizes the file declares)
        ckpt = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"checkpoint '{p}' was refused: it contains pickled objects other than tensors and plain "
            f"containers, which could run code when loaded. Only load checkpoints you trust; diffmic "
            f"never unpickles arbitrary objects. ({str(exc).splitlines()[0]})"
        ) from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"checkpoint '{p}' could not be read (truncated or not a torch file): {exc}") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise CheckpointError(f"'{p}' is not a diffmic checkpoint (no state_dict/hyper_parameters).")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict) or not {"config", "num_classes", "class_names"} <= set(hp):
        raise CheckpointError(f"'{p}' is a Lightning checkpoint of another model, not of diffmic.")
    return ckpt


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
    config = dict(hp["config"])
    # every weight comes from the checkpoint: never re-read initial weights (files may be gone; offline)
    config["model"] = {**config.get("model", {}), "encoder_weights": None, "dcg_weights": None, "pretrained": False}
    if overrides:
        bad = set(overrides) - {"eval", "data", "run"}
        if bad:
            raise CheckpointError(
                f"cannot override {sorted(bad)} when loading '{path}': these change the network. "
                f"Only eval.*, data.* and run.* may differ from training."
            )
        for sec, body in overrides.items():
            merged = dict(config.get(sec, {}))
            merged.update(body)
            config[sec] = merged
    config_from_dict(config)  # validates
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
        raise CheckpointError(
            f"checkpoint '{path}' does not match the model its config describes (different architecture "
            f"or a file edited by hand); nothing was loaded. Details: {str(exc)[:800]}"
        ) from exc
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


CALIBRATION_KEY = "diffmic_calibration"


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
        tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
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
