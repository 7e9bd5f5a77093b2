"""Reading a diffmic checkpoint and rebuilding its network without Lightning (issue 27.2).

Serving (:class:`~diffmic.inference.predictor.Predictor`, ``diffmic predict``) needs the network of a
checkpoint, not its LightningModule: :func:`load_network` reads the file with
``torch.load(weights_only=True)`` (:func:`read_checkpoint`), rebuilds :class:`~diffmic.nn.diffmic.DiffMIC`
from the recorded hyper-parameters (:func:`build_model`, the one the LightningModule uses too) and loads
its weights strictly, the EMA weights where the run evaluates with them, with the checks and messages of
:func:`diffmic.training.checkpoint.load_module`. Importing this module imports torch only (the config
and network layers are imported when a checkpoint is loaded), so ``diffmic predict`` and
``from diffmic.inference import Predictor`` do not pay for Lightning or torchmetrics.

:mod:`diffmic.training.checkpoint` re-exports everything here; import from there in training code.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from diffmic.config import Config
    from diffmic.nn.diffmic import DiffMIC


class CheckpointError(ValueError):
    """The file is not a usable diffmic checkpoint for this purpose."""


#: leading bytes of files that are often passed where a checkpoint or weights file belongs, and what they are
FILE_MAGIC = {
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
    what = next((name for magic, name in FILE_MAGIC.items() if head.startswith(magic)), None)
    if what is None:
        text = all(32 <= c < 127 or c in (9, 10, 13) for c in head)
        what = "a text file" if text else "not a PyTorch file"
    raise CheckpointError(
        f"'{p}' is not a checkpoint: it is {what}. Pass the .ckpt file written by "
        f"`diffmic fit` (e.g. <run>/checkpoints/best.ckpt)."
    )


#: a checkpoint's config may describe at most this many bytes of weights beyond what the file holds
_SIZE_SLACK_BYTES = 16 * 2**20

#: where ``diffmic calibrate`` stores the fitted trust parameters in a checkpoint
CALIBRATION_KEY = "diffmic_calibration"

#: state of the LightningModule that is not the network (not needed to predict): the fold DCGs of
#: ``train.prior_folds`` and the persistent "encoder initialised" flag
TRAINING_ONLY_STATE = ("fold_dcgs.", "encoder_from_dcg_done")


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


def resolve_checkpoint(run_dir: Path, ckpt: Optional[str]) -> Path:
    """``ckpt`` when given, else the run folder's ``checkpoints/best.ckpt`` (or ``last.ckpt``)."""
    if ckpt:
        return Path(ckpt)
    for name in ("best.ckpt", "last.ckpt"):
        p = run_dir / "checkpoints" / name
        if p.exists():
            return p
    raise CheckpointError(f"no checkpoint in '{run_dir / 'checkpoints'}'. Train first with `diffmic fit`.")


def checkpoint_config(path: str | Path, hp: dict, overrides: Optional[dict] = None) -> dict:
    """The checkpoint's training config with ``overrides`` (``{"eval": {...}}``; eval.*, data.* and run.*
    only) applied and validated; initial-weight files are never re-read (every weight comes from the
    checkpoint; the files may be gone, or the machine offline)."""
    from diffmic.config import config_from_dict

    config = dict(hp["config"])
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
    return config


def check_classes(path: str | Path, num_classes: Any, class_names: list) -> None:
    if not 1 <= int(num_classes) <= 100_000 or len(class_names) != int(num_classes):
        raise CheckpointError(
            f"checkpoint '{path}' declares {num_classes} classes with "
            f"{len(class_names)} names; not a usable diffmic checkpoint."
        )


def check_size(path: str | Path, model: torch.nn.Module) -> None:
    """Refuse when ``model`` (built on the ``meta`` device) needs far more bytes than the file holds."""
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    size = Path(path).stat().st_size
    if need > size + _SIZE_SLACK_BYTES:
        raise CheckpointError(
            f"checkpoint '{path}' ({size / 2**20:.1f} MiB) describes a model of {need / 2**30:.2f} GiB that "
            f"it cannot hold: the config in it was edited or the file is not trustworthy; nothing was "
            f"allocated or loaded."
        )


def unbuildable(path: str | Path, exc: Exception) -> CheckpointError:
    return CheckpointError(
        f"checkpoint '{path}': its config does not describe a buildable model "
        f"({type(exc).__name__}: {str(exc)[:300]}); nothing was loaded."
    )


def mismatch(path: str | Path, details: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint '{path}' does not match the model its config describes (different architecture "
        f"or a file edited by hand); nothing was loaded. Details: {details[:800]}"
    )


def build_model(cfg: Config, num_classes: int) -> DiffMIC:
    """The network of ``cfg`` (its arguments from :func:`diffmic.config.model_kwargs`)."""
    from diffmic.config import model_kwargs
    from diffmic.nn.diffmic import DiffMIC

    return DiffMIC(num_classes, **model_kwargs(cfg))


def ema_modules(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The modules covered by the EMA: everything but the DCG (ρ(x), the denoiser / head)."""
    return torch.nn.ModuleList([m for name, m in model.named_children() if name != "dcg" and m is not None])


@dataclass
class LoadedNetwork:
    """What :func:`load_network` rebuilt from a checkpoint."""

    model: DiffMIC  # in eval mode, on the CPU
    cfg: Config
    class_names: list[str]
    calibration: Optional[dict]  # trust parameters fitted on validation (diffmic calibrate), or None
    diffmic_version: str
    loaded_from: str


def load_network(
    path: str | Path, *, overrides: Optional[dict] = None, use_ema: Optional[bool] = None
) -> LoadedNetwork:
    """Rebuild the :class:`~diffmic.nn.diffmic.DiffMIC` of a checkpoint without Lightning, with the
    checks of :func:`~diffmic.training.checkpoint.load_module`: the file read with
    ``torch.load(weights_only=True)``, ``overrides`` limited to eval.*/data.*/run.*, the model built on
    the ``meta`` device first and compared with the file's size, the network's weights loaded strictly
    (the LightningModule's training-only state, :data:`TRAINING_ONLY_STATE`, is skipped), then the EMA
    weights when ``use_ema`` (default: ``train.use_ema``). Raises :class:`CheckpointError` naming the file."""
    from diffmic.config import config_from_dict

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    config = checkpoint_config(path, hp, overrides)
    names = list(hp["class_names"])
    check_classes(path, hp["num_classes"], names)
    cfg = config_from_dict(config)
    num_classes = int(hp["num_classes"])
    try:
        with torch.device("meta"):
            meta = build_model(cfg, num_classes)
    except Exception as exc:
        raise unbuildable(path, exc) from exc
    check_size(path, meta)
    del meta
    model = build_model(cfg, num_classes)
    state = ckpt["state_dict"]
    other = sorted(k for k in state if not k.startswith("model.") and not k.startswith(TRAINING_ONLY_STATE))
    if other:
        shown = ", ".join(f'"{k}"' for k in other[:8]) + (", ..." if len(other) > 8 else "")
        raise mismatch(path, f"Unexpected key(s) in state_dict: {shown}.")
    holder = torch.nn.Module()  # the LightningModule's key names ("model.*") in messages
    holder.model = model
    try:
        holder.load_state_dict({k: v for k, v in state.items() if k.startswith("model.")}, strict=True)
    except RuntimeError as exc:
        raise mismatch(path, str(exc)) from exc
    if use_ema is None:
        use_ema = cfg.train.use_ema
    if use_ema and "diffmic_ema" in ckpt:
        try:
            ema_modules(model).load_state_dict(ckpt["diffmic_ema"], strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"EMA weights in '{path}' do not match the model: {str(exc)[:500]}") from exc
    model.eval()
    calibration = ckpt.get(CALIBRATION_KEY)
    return LoadedNetwork(
        model, cfg, names, calibration, str(ckpt.get("diffmic_version", "unknown")), loaded_from=str(path)
    )
