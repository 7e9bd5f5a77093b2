"""Typed configuration: nested dataclasses, safe YAML, dotted overrides, strict key checks.

A config file is YAML with the sections below. Unknown or ill-typed keys are errors that name the
key and list the valid ones; the file is read with ``yaml.safe_load`` only.

Every field documents its default and, where the paper and the released code differ, which one
the default follows (see ``docs/method.md``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from diffmic.data.sources import DATASETS, SPLITS  # no Lightning: exported models load without it
from diffmic.diffusion.process import PRIOR_KINDS
from diffmic.diffusion.samplers import DDIM_STARTS, SAMPLERS
from diffmic.diffusion.schedule import BETA_SCHEDULES
from diffmic.losses import GUIDANCE_CE_MODES
from diffmic.metrics import AGGREGATES, SCALAR_METRICS
from diffmic.nn.diffmic import ALL_VARIANTS, DENOISER_INPUTS
from diffmic.nn.guidance import OUTPUT_STRIDES, ROI_CHANNELS, ROI_SELECT
from diffmic.trust.calibration import CALIBRATORS
from diffmic.trust.conformal import CONFORMAL_METHODS
from diffmic.trust.ood import OOD_SCORES, score_problem


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
    group_col: Optional[str] = None  # csv manifests: lesion / patient id; a group never spans two splits or folds
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
    # ours: k-fold cross-validation over all labelled images (the source's splits pooled; grouped by
    # lesion / patient where the data have groups): 0 = off; k >= 2 folds, fold i (0-based) is the test split
    folds: int = 0
    fold: int = 0


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
    denoiser_input: str = "released"  # released: [y_t, y_hat] (2C) | paper: Eq. 3 [y_t, y_hat_g, y_hat_l] (3C)
    # ImageNet weights for rho(x)'s encoder and both DCG streams: false | true (torchvision/timm download,
    # cached) | a .pth/.safetensors state dict or a folder of them; encoder_weights/dcg_weights win
    pretrained: Union[bool, str] = False
    roi_select: str = (
        "sum"  # sum (released: all classes' min-max saliency) | top_class (ours: predicted class's channel)
    )
    dcg_output_stride: int = 32  # ours: DCG global-stream output stride 32 (released) | 16 | 8 (CPU presets)
    # ours: freeze every backbone's layers up to this output stride (0: none | 2 | 4 | 8 | 16), for
    # pretrained weights: no gradient through the high-resolution early layers (less time per step)
    freeze_stride: int = 0
    # ours: extra timm.create_model arguments for a timm:<name> encoder, e.g. {patch_size: 8} (ViT) or
    # {window_size: 4} (Swin); img_size defaults to data.image_size for fixed-input-size models (ViT, Swin)
    encoder_kwargs: dict = field(default_factory=dict)


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
    # ours: variants without a DCG (basic, C1) also train for the warm-up's length, so every variant of a
    # preset gets the same optimiser steps; false: they train train.epochs / joint_steps only (diffmic <= 0.1)
    equal_budget: bool = True
    lr: float = 1e-3
    lr_warmup_epochs: float = 40.0
    min_lr: float = 0.0
    dcg_lr: float = 2e-4  # DCG Adam lr in the joint phase (and the warm-up unless dcg_warmup_lr is set)
    dcg_warmup_lr: Optional[float] = None  # ours: DCG lr at the start of the warm-up (None: dcg_lr)
    dcg_warmup_schedule: str = "constant"  # constant (released) | cosine: dcg_warmup_lr -> dcg_lr over the warm-up
    dcg_amsgrad: bool = True
    joint_dcg: bool = True  # keep training the DCG with CE after the warm-up (released code)
    grad_clip: float = 1.0
    # ours: sum the gradients of this many batches before each optimiser step (one update from N
    # batches: batch_size x N images); manual optimisation does it itself (training.module)
    accumulate_grad_batches: int = 1
    # ours: stop fitting when val/<monitor> has not improved by more than early_stop_min_delta for this
    # many validations in a row (the joint stage only; the DCG warm-up's validations do not count); null = off
    early_stop_patience: Optional[int] = None
    early_stop_min_delta: float = 0.0
    fused_adam: bool = True  # ours: fused Adam kernels (same update rule; off under *-mixed precision)
    ema_decay: float = 0.9999
    use_ema: bool = True  # evaluate with the EMA of the denoiser (released code keeps it unused)
    encoder_lr_scale: float = 1.0  # ours: lr multiplier for rho(x)'s backbone (released: 1)
    noise_samples_per_image: int = 1  # ours: R (t, eps) draws per image per step (released: 1)
    prior_swap: float = 0.0  # ours: share of training draws given another batch image's priors (0 = released)
    # ours (issue 23): out-of-fold priors. K >= 2: K extra DCGs, DCG k trained on the images outside
    # fold k, give the denoiser each image's prior (training.crossfit); 0 or 1 = off (released)
    prior_folds: int = 0
    # ours: a share of the training images trains the DCG only, the rest the denoiser only (0 = off)
    prior_split: float = 0.0
    init_encoder_from_dcg: bool = False  # ours: start rho(x) from the warmed-up DCG backbone (CPU presets)
    init_encoder_from: Optional[str] = None  # ours: start rho(x) from an earlier run's encoder (folder or .ckpt)
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
    # experiment trackers, comma-separated (several at once): csv | tensorboard | mlflow | wandb, through
    # Lightning's loggers; mlflow and wandb need the [trackers] extra (docs/deployment.md)
    logger: str = "csv,tensorboard"
    tracking_uri: Optional[str] = None  # MLflow: null = a file store in <run>/logs/mlruns (offline)
    tracker_project: str = "diffmic"  # MLflow experiment / W&B project
    tracker_offline: bool = True  # W&B offline mode (nothing is sent; `wandb sync` later); false = online


@dataclass
class EvalConfig:
    sampler: str = "truncated"  # ddpm | truncated (released `test_timesteps`) | ddim
    steps: Optional[int] = 250  # released: 250 HAM10000, 60 APTOS
    eta: float = 0.0
    start: str = "noise"  # ddim start: noise | mean
    t_start: Optional[int] = None  # ddim/dpmpp2m first timestep (None: T-1); n-1 = the truncated chain's window
    num_samples: int = 1  # K reverse samples per image (released: 1)
    # ours: > 0 = the prediction is the deterministic DDIM read-out from the prior mean over the
    # sampler's window in this many calls (the K samples still give agreement / spread / t-test);
    # 0 = the mean of the K samples (released)
    point_steps: int = 0
    # with train.prior_folds: the test-time prior from the model's DCG fitted on all training images
    # (full) or the mean of the K fold DCGs' logits (folds)
    prior_source: str = "full"
    aggregate: str = "mean"  # mean | vote
    temperature: float = 0.2  # probabilities = softmax(mean y0 / temperature)
    val_sampler: str = "ddim"
    val_steps: Optional[int] = 10
    sample_seed: int = 0  # per-image sampling seeds derive from this and the image id
    refer_threshold: float = 0.5  # refer to a clinician when confidence is below this
    # fitted on the validation split by `diffmic calibrate` (or the first `diffmic test`), see docs/uncertainty.md
    refer_max_fraction: float = 0.2  # referral goal: refer at most this fraction of the images
    refer_target_accuracy: Optional[float] = None  # or: the fewest referrals reaching this accuracy on kept images
    conformal_level: float = 0.9  # coverage of the conformal prediction sets
    # aps | raps (one quantile: the level on average over images) | mondrian_aps | mondrian_raps (one
    # quantile per class: each class reaches the level on its own; larger sets), docs/uncertainty.md
    conformal_method: str = "mondrian_aps"
    raps_lambda: float = 0.1  # RAPS: penalty per rank beyond raps_k_reg (Angelopoulos et al. 2021)
    raps_k_reg: int = 1
    # temperature | temperature+isotonic (then a top-label isotonic map, fitted on the same split) |
    # vector | matrix | dirichlet (may change the arg-max; the change in accuracy is reported) |
    # auto (temperature or temperature+isotonic, chosen by repeated 5-fold CV on validation)
    calibrator: str = "temperature"
    bootstrap_resamples: int = 500  # bootstrap resamples for the 95 % intervals of test metrics
    # ours: out-of-distribution flag ("this image does not look like the training data"; flagged
    # images are referred whatever their confidence), docs/uncertainty.md: auto (the best measured
    # score this model has) | none | energy | max_logit | msp (DCG logits) | mahalanobis (rho(x),
    # statistics from the training split) | spread (K samples); threshold fitted on validation
    ood_score: str = "auto"
    ood_false_flag_rate: float = 0.05  # share of in-distribution (validation) images the flag may refer

    def reverse_kwargs(self, stage: str = "test") -> dict[str, Any]:
        """The keyword arguments of ``diffusion.reverse.reverse_sample`` that these settings give, for
        ``stage`` "test" (``sampler`` / ``steps``) or "val" (``val_sampler`` / ``val_steps``). The one
        place the eval section becomes sampler arguments: training, the Predictor and the report use it."""
        val = stage == "val"
        return {
            "sampler": self.val_sampler if val else self.sampler,
            "steps": self.val_steps if val else self.steps,
            "eta": self.eta,
            "start": self.start,
            "t_start": self.t_start,
            "num_samples": self.num_samples,
            "seed": self.sample_seed,
            "point_steps": self.point_steps,
        }


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


DCG_WARMUP_SCHEDULES: tuple[str, ...] = ("constant", "cosine")  # training.schedules.warmup_dcg_lr
#: ``train.logger`` names (training.trackers builds them)
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "mlflow", "wandb")
SELECT_ON: tuple[str, ...] = ("val", "test")

# Every choice set is the library's own constant (defined once, where it is used).
CHOICES: dict[str, tuple] = {
    "data.dataset": DATASETS,
    "data.split": SPLITS,
    "model.variant": ALL_VARIANTS,
    "model.roi_channels": ROI_CHANNELS,
    "model.roi_select": ROI_SELECT,
    "model.prior": PRIOR_KINDS,
    "model.denoiser_input": DENOISER_INPUTS,
    "diffusion.schedule": BETA_SCHEDULES,
    "loss.dcg_ce": GUIDANCE_CE_MODES,
    "train.select_on": SELECT_ON,
    "train.dcg_warmup_schedule": DCG_WARMUP_SCHEDULES,
    "train.monitor": SCALAR_METRICS,
    "eval.sampler": SAMPLERS,
    "eval.val_sampler": SAMPLERS,
    "eval.start": DDIM_STARTS,
    "eval.aggregate": AGGREGATES,
    "eval.calibrator": CALIBRATORS,
    "eval.conformal_method": CONFORMAL_METHODS,
    "eval.ood_score": OOD_SCORES,
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        # the arm of the value's own type first (typing may reorder Union[int, float])
        args = tuple(sorted(typing.get_args(tp), key=lambda a: a is not type(value)))
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
        specific = [e for e in errors if "finite" in e]  # the value had the right type, a bad number
        if specific:
            raise ConfigError(specific[0])
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
        number = None
        if isinstance(value, (int, float)):
            try:
                number = float(value)
            except OverflowError:  # an int beyond the float range
                raise ConfigError(f"{key}: expected a finite number, got {_shown(value)}") from None
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is dict or origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}") from exc
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping such as {{name: value}}, got {value!r}")
        bad = [k for k in value if not isinstance(k, str) or not k.isidentifier()]
        if bad:
            raise ConfigError(f"{key}: keys must be argument names, got {bad[0]!r}")
        return copy.deepcopy(dict(value))
    if tp is list or origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, (list, tuple)):
            return [_coerce(v, float, f"{key}[{i}]") for i, v in enumerate(value)]
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


# ------------------------------------------------------------------------------ validation rules
# One table: (key, check(value, cfg) -> error text or None). Every key a user can get wrong has a
# rule; a rule's text says what is allowed, and the error names the key and the value given.

Check = Callable[[Any, "Config"], Optional[str]]


def _num(v: float | None) -> str:
    return "" if v is None else str(int(v)) if float(v).is_integer() else f"{v:g}"


def _range(
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    optional: bool = False,
) -> Check:
    """``lo <= v <= hi`` (``<`` where open); ``None`` allowed when ``optional``."""

    def check(v: Any, cfg: Config) -> Optional[str]:
        if v is None and optional:
            return None
        ok = (lo is None or (v > lo if lo_open else v >= lo)) and (hi is None or (v < hi if hi_open else v <= hi))
        if ok:
            return None
        if hi is None:
            return f"must be {'>' if lo_open else '>='} {_num(lo)}"
        if lo is None:
            return f"must be {'<' if hi_open else '<='} {_num(hi)}"
        return f"must be in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}{')' if hi_open else ']'}"

    return check


def _steps(v: Any, cfg: Config) -> Optional[str]:
    T = cfg.diffusion.num_timesteps
    return None if v is None or 1 <= v <= T else f"must be in [1, diffusion.num_timesteps={T}]"


def _t_start(v: Any, cfg: Config) -> Optional[str]:
    if v is None:
        return None
    T = cfg.diffusion.num_timesteps
    if not 0 <= v <= T - 1:
        return f"must be in [0, diffusion.num_timesteps-1={T - 1}]"
    for key, steps in (("eval.steps", cfg.eval.steps), ("eval.val_steps", cfg.eval.val_steps)):
        if steps is not None and steps > v + 1:
            return f"must be >= {key}-1={steps - 1} (a chain of {steps} steps needs {steps} timesteps)"
    return None


def _ood_score(v: Any, cfg: Config) -> Optional[str]:
    problem = score_problem(v, cfg.model.variant, cfg.eval.num_samples)
    return f"cannot be used: {problem}" if problem else None


def _one_of(*values: Any) -> Check:
    return lambda v, cfg: None if v in values else f"must be one of {', '.join(map(str, values))}"


def _backbone(v: Any, cfg: Config) -> Optional[str]:
    from diffmic.nn.encoders import available_encoders

    known = available_encoders()
    if v in known:
        return None
    if isinstance(v, str) and v.startswith("tv:"):
        import torchvision

        if v[3:] in torchvision.models.list_models():
            return None
        return f"is not a torchvision model ({v[3:]!r} is not in torchvision.models.list_models())"
    if isinstance(v, str) and v.startswith("timm:"):
        import timm

        if timm.is_model(v[5:]):
            return None
        return f"is not a timm model ({v[5:]!r} is not in timm.list_models())"
    close = difflib.get_close_matches(str(v), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"is not a known backbone{hint}: use one of {', '.join(known)}, tv:<torchvision name> or timm:<timm name>"


def _encoder_kwargs(v: Any, cfg: Config) -> Optional[str]:
    if not v:
        return None
    from diffmic.nn.encoders import RESERVED_TIMM_KWARGS

    if not cfg.model.encoder.startswith("timm:"):
        return f"only applies to timm encoders (model.encoder=timm:<name>), not model.encoder={cfg.model.encoder}"
    reserved = sorted(set(v) & RESERVED_TIMM_KWARGS)
    if reserved:
        return f"may not set {', '.join(reserved)} (diffmic sets them; use model.pretrained / data.in_chans)"
    return None


def _lightning_missing() -> bool:
    """Lightning is needed to train, not to load an exported model: without it the Lightning
    strings cannot be checked here (fit checks them when it builds the Trainer)."""
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        return True
    return False


def _precision(v: Any, cfg: Config) -> Optional[str]:
    if v == "32-true" or _lightning_missing():
        return None
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    valid = (*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    return None if v in valid else f"is not a Lightning precision: use one of {', '.join(valid)}"


def _accelerator(v: Any, cfg: Config) -> Optional[str]:
    if v == "auto" or _lightning_missing():
        return None
    from lightning.pytorch.accelerators import AcceleratorRegistry

    valid = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    return None if v in valid else f"is not a Lightning accelerator: use one of {', '.join(valid)}"


def _strategy(v: Any, cfg: Config) -> Optional[str]:
    if v == "auto" or _lightning_missing():
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    valid = ["auto", *StrategyRegistry.available_strategies()]
    return None if v in valid else f"is not a Lightning strategy: use one of {', '.join(valid)}"


def _devices(v: Any, cfg: Config) -> Optional[str]:
    if isinstance(v, int):
        return None if v >= 1 or v == -1 else "must be a count >= 1, -1 (all), 'auto' or a list of ids like '0,1'"
    text = str(v).strip()
    if text in ("auto", "-1"):
        return None
    ids = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
    if ids and all(p.isdigit() for p in ids):
        return None
    return "must be a count >= 1, -1 (all), 'auto' or a list of ids like '0,1'"


def _limit_batches(v: Any, cfg: Config) -> Optional[str]:
    if v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1):
        return None
    return "must be a number of batches >= 1 or a fraction in (0, 1]"


def _bandwidth(v: Any, cfg: Config) -> Optional[str]:
    values = v if isinstance(v, list) else [v]
    if v is None or (values and all(b > 0 for b in values)):
        return None
    return "must be null (C^2), a number > 0 or a non-empty list of numbers > 0"


def _crop_fits(v: Any, cfg: Config) -> Optional[str]:
    crop = cfg.crop_size()
    if crop < 1 or crop > cfg.data.image_size:
        return f"must be in [1, data.image_size={cfg.data.image_size}] (one ROI cell fits in the image)"
    return None


def logger_names(v: str) -> list[str]:
    """The tracker names of ``train.logger`` ("csv,mlflow" -> ["csv", "mlflow"])."""
    return [p.strip().lower() for p in str(v).replace("+", ",").split(",") if p.strip()]


def _logger(v: Any, cfg: Config) -> Optional[str]:
    names = logger_names(v)
    bad = [n for n in names if n not in LOGGERS]
    if bad or not names:
        return f"must name one or more of {', '.join(LOGGERS)}, separated by commas"
    if len(set(names)) != len(names):
        return "names a logger twice"
    return None


def _folds(v: Any, cfg: Config) -> Optional[str]:
    if v == 0 or 2 <= v <= 100:
        return None
    return "must be 0 (no cross-validation) or a number of folds in [2, 100]"


def _fold(v: Any, cfg: Config) -> Optional[str]:
    k = cfg.data.folds
    if k >= 2 and not 0 <= v < k:
        return f"must be in [0, data.folds-1={k - 1}] (the fold tested, 0-based)"
    if k < 2 and v != 0:
        return "needs data.folds >= 2 (k-fold cross-validation); without it leave data.fold at 0"
    return None


def _lesion_split(v: Any, cfg: Config) -> Optional[str]:
    if v == "lesion" and cfg.data.dataset != "ham10000":
        return "needs lesion ids: only data.dataset=ham10000 has them (use authors or random)"
    return None


#: where the test-time prior of a cross-fitted model comes from (``eval.prior_source``)
PRIOR_SOURCES: tuple[str, ...] = ("full", "folds")


def _prior_folds(v: Any, cfg: Config) -> Optional[str]:
    if not 0 <= v <= 20:
        return "must be 0 or 1 (off: one DCG fitted on every image) or a number of folds in [2, 20]"
    if v >= 2 and cfg.model.variant not in ("C2", "full"):
        return f"needs a variant whose denoiser takes DCG priors (C2, full), not model.variant={cfg.model.variant}"
    return None


def _prior_split(v: Any, cfg: Config) -> Optional[str]:
    if not 0 <= v < 1:
        return "must be in [0, 1): the share of training images that train the DCG only"
    if v and cfg.train.prior_folds >= 2:
        return "and train.prior_folds exclude each other: set one of them to 0"
    if v and cfg.model.variant not in ("C2", "full"):
        return f"needs a variant whose denoiser takes DCG priors (C2, full), not model.variant={cfg.model.variant}"
    return None


def _prior_source(v: Any, cfg: Config) -> Optional[str]:
    if v not in PRIOR_SOURCES:
        return f"must be one of {', '.join(PRIOR_SOURCES)}"
    if v == "folds" and cfg.train.prior_folds < 2:
        return "folds needs a model trained with train.prior_folds >= 2"
    return None


def _init_encoder_from(v: Any, cfg: Config) -> Optional[str]:
    if v is None:
        return None
    if not str(v).strip():
        return "must be null or the path of a run folder or a .ckpt file"
    if cfg.train.init_encoder_from_dcg:
        return "and train.init_encoder_from_dcg exclude each other (both set rho(x)): set train.init_encoder_from_dcg=false"
    if cfg.model.variant not in ("C1", "C2", "full"):
        return f"needs a diffusion variant with an image encoder rho(x) (C1, C2, full), not model.variant={cfg.model.variant}"
    return None


#: the longest file or folder name (one path component) and path file systems accept, in bytes
NAME_MAX, PATH_MAX = 255, 4095


def _path(v: Any, cfg: Config) -> Optional[str]:
    """A path the operating system can open: no component over NAME_MAX bytes, at most PATH_MAX."""
    if not isinstance(v, str):
        return None
    raw = os.fsencode(v)
    if len(raw) > PATH_MAX:
        return f"is a path of {len(raw)} bytes; paths are limited to {PATH_MAX} bytes"
    seps = [os.sep.encode()] + ([os.altsep.encode()] if os.altsep else [])
    for sep in seps[1:]:
        raw = raw.replace(sep, seps[0])
    longest = max(len(c) for c in raw.split(seps[0]))
    if longest > NAME_MAX:
        return f"has a file or folder name of {longest} bytes; names are limited to {NAME_MAX} bytes"
    return None


def _accumulate(v: Any, cfg: Config) -> Optional[str]:
    if not 1 <= v <= 10_000:
        return "must be in [1, 10000]"
    return None  # a step budget counts optimiser steps, ceil(batches / v) per epoch (training.budget)


def _min_lr(v: Any, cfg: Config) -> Optional[str]:
    return None if 0 <= v <= cfg.train.lr else f"must be in [0, train.lr={cfg.train.lr:g}]"


SEED_MAX = 2**32 - 1  # numpy's seed range
RULES: list[tuple[str, Check]] = [
    ("run.seed", _range(0, SEED_MAX)),
    ("run.dir", _path),
    ("data.root", _path),
    ("data.cache_dir", _path),
    ("model.encoder_weights", _path),
    ("model.dcg_weights", _path),
    ("model.pretrained", _path),
    ("train.init_encoder_from", _path),
    ("data.split", _lesion_split),
    ("data.test_fraction", _range(0, 1, lo_open=True, hi_open=True)),
    ("data.image_size", _range(8, 8192)),
    ("data.in_chans", _one_of(1, 3)),
    ("data.batch_size", _range(1, 1_000_000)),
    ("data.eval_batch_size", _range(1, 1_000_000, optional=True)),
    ("data.num_workers", _range(0, 1024)),
    ("data.val_fraction", _range(0, 1, hi_open=True)),
    ("data.rotation", _range(0, 180)),
    ("data.subset", _range(1, optional=True)),
    ("data.class_balance", _range(0, 1)),
    ("data.folds", _folds),
    ("data.fold", _fold),
    ("model.encoder", _backbone),
    ("model.dcg_global", _backbone),
    ("model.dcg_local", _backbone),
    ("model.encoder_kwargs", _encoder_kwargs),
    ("model.hidden_dim", _range(1, 1_000_000)),
    ("model.num_layers", _range(1, 1000)),
    ("model.num_rois", _range(1, 100_000)),
    ("model.crop_size", _crop_fits),
    ("model.dcg_output_stride", _one_of(*OUTPUT_STRIDES)),
    ("model.freeze_stride", _one_of(0, 2, 4, 8, 16)),
    ("diffusion.num_timesteps", _range(1, 1_000_000)),
    ("diffusion.beta_start", _range(0, 1, lo_open=True, hi_open=True)),
    ("diffusion.beta_end", _range(0, 1, lo_open=True, hi_open=True)),
    ("loss.mmd_weight", _range(0, 1e6)),
    ("loss.mmd_bandwidth", _bandwidth),
    ("train.epochs", _range(0, 10_000_000)),
    ("train.dcg_warmup_epochs", _range(0, 10_000_000)),
    ("train.joint_steps", _range(0, 10**9, optional=True)),
    ("train.dcg_warmup_steps", _range(0, 10**9, optional=True)),
    ("train.lr", _range(0, 10, lo_open=True)),
    ("train.lr_warmup_epochs", _range(0)),
    ("train.min_lr", _min_lr),
    ("train.dcg_lr", _range(0, 10, lo_open=True)),
    ("train.dcg_warmup_lr", _range(0, 10, lo_open=True, optional=True)),
    ("train.grad_clip", _range(0)),
    ("train.accumulate_grad_batches", _accumulate),
    ("train.early_stop_patience", _range(1, 1_000_000, optional=True)),
    ("train.early_stop_min_delta", _range(0, 1)),
    ("train.ema_decay", _range(0, 1)),
    ("train.encoder_lr_scale", _range(0, 1000)),
    ("train.init_encoder_from", _init_encoder_from),
    ("train.noise_samples_per_image", _range(1, 100_000)),
    ("train.prior_swap", _range(0, 1, hi_open=True)),
    ("train.prior_folds", _prior_folds),
    ("train.prior_split", _prior_split),
    ("eval.prior_source", _prior_source),
    ("train.precision", _precision),
    ("train.accelerator", _accelerator),
    ("train.devices", _devices),
    ("train.strategy", _strategy),
    ("train.num_nodes", _range(1)),
    ("train.check_val_every_n_epoch", _range(1)),
    ("train.checkpoint_every_n_steps", _range(1, optional=True)),
    ("train.limit_train_batches", _limit_batches),
    ("train.limit_val_batches", _limit_batches),
    ("train.log_every_n_steps", _range(1)),
    ("train.logger", _logger),
    ("eval.steps", _steps),
    ("eval.val_steps", _steps),
    ("eval.eta", _range(0, 1)),
    ("eval.num_samples", _range(1, 1_000_000)),
    ("eval.point_steps", _range(0, 100_000)),
    ("eval.temperature", _range(0, 1e6, lo_open=True)),
    ("eval.sample_seed", _range(0, SEED_MAX)),
    ("eval.refer_threshold", _range(0, 1)),
    ("eval.t_start", _t_start),
    ("eval.refer_max_fraction", _range(0, 1)),
    ("eval.refer_target_accuracy", _range(0, 1, lo_open=True, optional=True)),
    ("eval.conformal_level", _range(0, 1, lo_open=True, hi_open=True)),
    ("eval.raps_lambda", _range(0, 100)),
    ("eval.raps_k_reg", _range(0, 100_000)),
    ("eval.bootstrap_resamples", _range(0, 1_000_000)),
    ("eval.ood_score", _ood_score),
    ("eval.ood_false_flag_rate", _range(0, 1, lo_open=True, hi_open=True)),
]


def _validate(cfg: Config) -> None:
    """Apply :data:`RULES`; the first broken rule raises a ConfigError naming the key."""
    for key, check in RULES:
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        problem = check(value, cfg)
        if problem:
            raise ConfigError(f"{key} {problem}, got {_shown(value)}")


def section_kwargs(fn: Callable, *sections: Any, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``fn`` from the fields of config ``sections`` whose names are
    parameters of ``fn`` (later sections and ``extra`` win): no field copied by hand."""
    params = inspect.signature(fn).parameters
    out: dict[str, Any] = {}
    for sec in sections:
        out.update({f.name: getattr(sec, f.name) for f in dataclasses.fields(sec) if f.name in params})
    out.update(extra)
    return out


def parse_value(key: str, text: str) -> Any:
    """Parse the value of a ``key=value`` override as YAML (``yaml.safe_load``: no Python tags)."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: the value {_shown(text)!r} is not valid YAML ({reason})") from exc
    except ValueError as exc:  # an integer over Python's int-string limit (4300 digits)
        raise ConfigError(f"{key}: the value {_shown(text)!r} is not a usable number ({_int_limit(exc)})") from None


def _int_limit(exc: ValueError) -> str:
    """Python's int-string limit error, without its advice to change the interpreter."""
    return str(exc).split(";")[0]


def _shown(value: Any, limit: int = 120) -> str:
    """``value`` as text for a message, shortened when long (a 5000-digit number, a huge path)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}... ({len(text)} characters)"


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


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for sec, body in over.items():
        if isinstance(body, dict) and isinstance(out.get(sec), dict):
            out[sec].update(body)
        else:
            out[sec] = body
    return out


def read_preset(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict | None:
    """The raw mapping of a preset, with its ``base:`` chain applied: a preset may say
    ``base: cpu`` (a shipped preset name, or a path relative to the file) and hold only what
    differs from it."""
    p = resolve_preset(path, relative_to=_seen[-1].parent if _seen else None)
    if p.resolve() in _seen:
        chain = " -> ".join(str(q) for q in (*_seen, p.resolve()))
        raise ConfigError(f"{p}: 'base' presets form a cycle ({chain})")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    except ValueError as exc:  # an integer over Python's int-string limit (4300 digits)
        raise ConfigError(f"{p}: a value is not a usable number ({_int_limit(exc)})") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the config file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(raw, dict) or "base" not in raw:
        return raw
    base_name = raw.pop("base")
    if not isinstance(base_name, str) or not base_name:
        raise ConfigError(f"{p}: 'base' must name a preset or a YAML file, got {base_name!r}")
    base = read_preset(base_name, (*_seen, p.resolve())) or {}
    return _merge(base, raw)


def load_config(path: str | Path | Mapping | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML preset (a path, or the name of a shipped preset; ``base:`` chains applied), or
    take a mapping of sections laid out like one (``base:`` too), and apply overrides."""
    raw: dict | None = None
    source = "defaults"
    if isinstance(path, Mapping):  # diffmic.fit({...}): the same checks as a YAML file
        raw = copy.deepcopy(dict(path))
        if "base" in raw:
            base_name = raw.pop("base")
            if not isinstance(base_name, str) or not base_name:
                raise ConfigError(f"config mapping: 'base' must name a preset or a YAML file, got {base_name!r}")
            raw = _merge(read_preset(base_name) or {}, raw)
        return config_from_dict(raw, overrides, source="config mapping")
    if path is not None:
        source = str(resolve_preset(path))
        raw = read_preset(path)
    return config_from_dict(raw, overrides, source=source)


def preset_dir() -> Path:
    return Path(__file__).parent / "configs"


def resolve_preset(path: str | Path, relative_to: Path | None = None) -> Path:
    """A YAML file: ``path`` itself (next to ``relative_to`` first, for a ``base:`` reference),
    else the shipped preset of that name."""
    p = Path(path)
    near = [relative_to / p] if relative_to is not None and not p.is_absolute() else []
    cands = (*near, p, preset_dir() / str(path), preset_dir() / f"{path}.yaml")
    for cand in cands:
        if cand.is_file():
            return cand
    if any(c.is_dir() for c in cands):
        raise ConfigError(f"config file '{path}' is a folder; give a YAML file or a preset name")
    names = ", ".join(sorted(q.stem for q in preset_dir().glob("*.yaml")))
    raise ConfigError(f"config file '{path}' not found (shipped presets: {names})")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
