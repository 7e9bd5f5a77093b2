"""Typed configuration: nested dataclasses, safe YAML, dotted overrides, strict key checks.

A config file is YAML with the sections below. Unknown or ill-typed keys are errors that name the
key and list the valid ones; the file is read with ``yaml.safe_load`` only.

Every field documents its default and, where the paper and the released code differ, which one
the default follows (see ``docs/method.md``).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or has an invalid value."""


@dataclass
class RunConfig:
    dir: str = "runs/default"  # run folder: config, checkpoints, logs, metrics, predictions
    seed: int = 1234  # global seed (released code: 1234)
    deterministic: bool = False  # torch deterministic algorithms (slower)


@dataclass
class DataConfig:
    dataset: str = "ham10000"  # ham10000 | aptos2019 | csv | folder | medmnist
    root: str = "../shared/data/ham10000"  # data folder (csv: the manifest file; medmnist: the .npz)
    split: str = "authors"  # authors | lesion (HAM10000 only) | random
    test_fraction: float = 0.3  # for split=random/lesion (paper: 7:3; ultrasound task 8:2)
    path_col: str = "path"  # csv manifests
    label_col: str = "label"
    split_col: Optional[str] = None
    image_size: int = 224
    in_chans: int = 3
    batch_size: int = 64  # released: 64 (HAM10000), 32 (APTOS)
    eval_batch_size: Optional[int] = None
    num_workers: int = 0
    val_fraction: float = 0.1  # validation carved from train (grouped by lesion for HAM10000)
    vflip: bool = False  # released code: on for APTOS only
    rotation: float = 30.0
    cache_dir: Optional[str] = None
    skip_bad: bool = False  # skip and list unreadable images instead of stopping
    subset: Optional[int] = None  # stratified subset (tests/demos)
    check_images: bool = True
    class_balance: float = 0.0  # ours: sample train images with weight n_c^-p (0 = uniform, released)


@dataclass
class ModelConfig:
    variant: str = "full"  # basic | C1 | C2 | full (paper Table 2)
    encoder: str = "resnet18"  # image encoder rho(x) (paper: ResNet-18, random init in released code)
    hidden_dim: int = 6144
    num_layers: int = 3
    dcg_global: str = "resnet18"  # released code: ResNet-50 (ImageNet); ours: ResNet-18
    dcg_local: str = "resnet18"
    num_rois: int = 6
    crop_size: Optional[int] = None  # None: round(32 * image_size / 224)
    roi_channels: str = "rgb"  # rgb | first (released code crops the red channel only)
    prior: str = "softmax_mean_logits"  # softmax_mean_logits (code) | mean_probs (Eq.1) | sum_probs (Eq.2) | zero
    encoder_weights: Optional[str] = None  # local state-dict file, never downloaded
    dcg_weights: Optional[str] = None
    roi_select: str = "sum"  # sum (released: all classes' min-max saliency) | top_class (ours: predicted class's channel)
    dcg_output_stride: int = 32  # ours: DCG global-stream output stride 32 (released) | 16 | 8 (CPU presets)


@dataclass
class DiffusionConfig:
    schedule: str = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass
class LossConfig:
    mmd_weight: float = 0.5  # lambda of Eq. 6
    mmd_bandwidth: Optional[Union[float, list]] = None  # None: released C^2; list: multi-bandwidth
    dcg_ce: str = "fused"  # fused (released code) | all (fused + global + local)


@dataclass
class TrainConfig:
    epochs: int = 1000  # diffusion epochs after the DCG warm-up
    dcg_warmup_epochs: int = 15  # released code 15, paper 10
    joint_steps: Optional[int] = None  # ours: budget the joint stage in optimiser steps (sets epochs at fit)
    dcg_warmup_steps: Optional[int] = None  # ours: budget the DCG warm-up in steps (sets dcg_warmup_epochs)
    lr: float = 1e-3
    lr_warmup_epochs: float = 40.0
    min_lr: float = 0.0
    dcg_lr: float = 2e-4  # DCG Adam lr in the joint phase (and the warm-up unless dcg_warmup_lr is set)
    dcg_warmup_lr: Optional[float] = None  # ours: DCG lr at the start of the warm-up (None: dcg_lr)
    dcg_warmup_schedule: str = "constant"  # constant (released) | cosine: dcg_warmup_lr -> dcg_lr over the warm-up
    dcg_amsgrad: bool = True
    joint_dcg: bool = True  # keep training the DCG with CE after the warm-up (released code)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    use_ema: bool = True  # evaluate with the EMA of the denoiser (released code keeps it unused)
    encoder_lr_scale: float = 1.0  # ours: lr multiplier for rho(x)'s backbone (released: 1)
    noise_samples_per_image: int = 1  # ours: R (t, eps) draws per image per step (released: 1)
    init_encoder_from_dcg: bool = False  # ours: start rho(x) from the warmed-up DCG backbone (CPU presets)
    exact_dcg_priors: bool = True  # priors from a separate eval-mode DCG pass (released); False reuses the train pass
    precision: str = "32-true"
    accelerator: str = "auto"
    devices: Union[int, str] = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    check_val_every_n_epoch: int = 1
    select_on: str = "val"  # val | test (released code selects on the test set: optimistic)
    monitor: str = "acc"
    checkpoint_every_n_steps: Optional[int] = None  # mid-epoch checkpoints for resume
    limit_train_batches: Optional[Union[int, float]] = None
    limit_val_batches: Optional[Union[int, float]] = None
    log_every_n_steps: int = 10
    progress_bar: bool = True


@dataclass
class EvalConfig:
    sampler: str = "truncated"  # ddpm | truncated (released `test_timesteps`) | ddim
    steps: Optional[int] = 250  # released: 250 HAM10000, 60 APTOS
    eta: float = 0.0
    start: str = "noise"  # ddim start: noise | mean
    num_samples: int = 1  # K reverse samples per image (released: 1)
    aggregate: str = "mean"  # mean | vote
    temperature: float = 0.2  # probabilities = softmax(mean y0 / temperature)
    val_sampler: str = "ddim"
    val_steps: Optional[int] = 10
    sample_seed: int = 0  # per-image sampling seeds derive from this and the image id
    refer_threshold: float = 0.5  # refer to a clinician when confidence is below this


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def crop_size(self) -> int:
        if self.model.crop_size is not None:
            return self.model.crop_size
        return max(1, round(32 * self.data.image_size / 224))


CHOICES: dict[str, tuple] = {
    "data.dataset": ("ham10000", "aptos2019", "csv", "folder", "medmnist"),
    "data.split": ("authors", "lesion", "random"),
    "model.variant": ("basic", "C1", "C2", "full", "dcg"),
    "model.dcg_output_stride": ("8", "16", "32"),
    "model.roi_select": ("sum", "top_class"),
    "model.roi_channels": ("rgb", "first"),
    "model.prior": ("softmax_mean_logits", "mean_probs", "sum_probs", "zero"),
    "diffusion.schedule": ("linear", "quadratic", "cosine", "sigmoid"),
    "loss.dcg_ce": ("fused", "all"),
    "train.select_on": ("val", "test"),
    "train.dcg_warmup_schedule": ("constant", "cosine"),
    "train.monitor": ("acc", "f1", "balanced_acc", "kappa", "auroc"),
    "eval.sampler": ("ddpm", "truncated", "ddim"),
    "eval.val_sampler": ("ddpm", "truncated", "ddim"),
    "eval.start": ("noise", "mean"),
    "eval.aggregate": ("mean", "vote"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (list, tuple)):
            return [float(v) for v in value]
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _section_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(key: str, valid: list[str]) -> ConfigError:
    # compare the last component with the last components of the valid keys ("rooot" ~ "root")
    leaves = {v.split(".")[-1]: v for v in valid}
    close = difflib.get_close_matches(key.split(".")[-1], list(leaves), n=1)
    hint = f" Did you mean '{leaves[close[0]]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}")


def _set(cfg: Config, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    sections = _section_types(Config)
    if len(parts) != 2:
        if len(parts) == 1 and parts[0] not in sections:
            raise _unknown(dotted, list(sections))
        raise ConfigError(f"config key '{dotted}' must look like section.key (e.g. data.root)")
    sec, name = parts
    if sec not in sections:
        raise _unknown(sec, list(sections))
    section_obj = getattr(cfg, sec)
    types_ = _section_types(type(section_obj))
    if name not in types_:
        raise _unknown(dotted, [f"{sec}.{k}" for k in types_])
    val = _coerce(value, types_[name], dotted)
    if dotted in CHOICES and str(val) not in CHOICES[dotted]:
        raise ConfigError(f"{dotted}: {val!r} is not one of {', '.join(CHOICES[dotted])}")
    setattr(section_obj, name, val)


def _validate(cfg: Config) -> None:
    positive = {
        "data.image_size": cfg.data.image_size,
        "data.batch_size": cfg.data.batch_size,
        "model.hidden_dim": cfg.model.hidden_dim,
        "model.num_layers": cfg.model.num_layers,
        "model.num_rois": cfg.model.num_rois,
        "diffusion.num_timesteps": cfg.diffusion.num_timesteps,
        "eval.num_samples": cfg.eval.num_samples,
        "train.noise_samples_per_image": cfg.train.noise_samples_per_image,
    }
    for key, val in positive.items():
        if val < 1:
            raise ConfigError(f"{key} must be >= 1, got {val}")
    if cfg.data.in_chans not in (1, 3):
        raise ConfigError(f"data.in_chans must be 1 or 3, got {cfg.data.in_chans}")
    if not 0 <= cfg.data.class_balance <= 1:
        raise ConfigError(f"data.class_balance must be in [0, 1] (0 uniform, 1 balanced classes), got {cfg.data.class_balance}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0 < cfg.data.test_fraction < 1:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {cfg.data.test_fraction}")
    for key, lr in (("train.lr", cfg.train.lr), ("train.dcg_lr", cfg.train.dcg_lr),
                    ("train.dcg_warmup_lr", cfg.train.dcg_warmup_lr)):
        if lr is not None and not lr > 0:
            raise ConfigError(f"{key} must be > 0, got {lr}")
    if cfg.train.epochs < 0 or cfg.train.dcg_warmup_epochs < 0:
        raise ConfigError("train.epochs and train.dcg_warmup_epochs must be >= 0")
    T = cfg.diffusion.num_timesteps
    for key, steps in (("eval.steps", cfg.eval.steps), ("eval.val_steps", cfg.eval.val_steps)):
        if steps is not None and not 1 <= steps <= T:
            raise ConfigError(f"{key} must be in [1, diffusion.num_timesteps={T}], got {steps}")
    if not 0.0 <= cfg.eval.eta <= 1.0:
        raise ConfigError(f"eval.eta must be in [0, 1], got {cfg.eval.eta}")
    if cfg.data.split == "lesion" and cfg.data.dataset != "ham10000":
        raise ConfigError("data.split=lesion needs lesion ids: only data.dataset=ham10000 has them")


def parse_value(key: str, text: str) -> Any:
    """Parse the value of a ``key=value`` override as YAML (``yaml.safe_load``: no Python tags)."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: the value {text!r} is not valid YAML ({reason})") from exc


def config_from_dict(raw: dict | None, overrides: list[str] | None = None, source: str = "config") -> Config:
    """Build a :class:`Config` from a nested dict and ``key=value`` overrides (strict)."""
    cfg = Config()
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    sections = _section_types(Config)
    for sec, body in raw.items():
        if sec not in sections:
            raise _unknown(str(sec), list(sections))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{sec}' must be a mapping, got {body!r}")
        for name, value in body.items():
            _set(cfg, f"{sec}.{name}", value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. data.root=/data)")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), parse_value(key.strip(), value))
    _validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (a path, or the name of a shipped preset) and apply overrides."""
    raw: dict | None = None
    source = "defaults"
    if path is not None:
        p = resolve_preset(path)
        source = str(p)
        try:
            raw = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    return config_from_dict(raw, overrides, source=source)


def preset_dir() -> Path:
    return Path(__file__).parent / "configs"


def resolve_preset(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    for cand in (preset_dir() / str(path), preset_dir() / f"{path}.yaml"):
        if cand.exists():
            return cand
    names = ", ".join(sorted(q.stem for q in preset_dir().glob("*.yaml")))
    raise ConfigError(f"config file '{path}' not found (shipped presets: {names})")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
