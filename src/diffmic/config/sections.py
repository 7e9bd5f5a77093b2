"""The config's sections: nested dataclasses whose fields each declare, in one place, their type,
default, choices (a library constant) and check.

``option(default, choices=SAMPLERS, check=...)`` is the one declaration of a key: :data:`CHOICES`
and :data:`RULES` are derived from the fields, coercion reads the annotated type, and a value
outside ``choices`` is refused naming the key and listing them. Comments say what a key means and
which default the paper or the released code uses (see ``docs/method.md``), never the list of
choices (the constant named in ``choices=`` is that list).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from diffmic.config import checks as ck
from diffmic.config import lightning as lt
from diffmic.config.checks import LOGGERS, SEED_MAX, Check, between, one_of
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
from diffmic.trust.ood import OOD_SCORES

__all__ = [
    "CHOICES",
    "DCG_WARMUP_SCHEDULES",
    "LOGGERS",
    "PRIOR_SOURCES",
    "RULES",
    "SELECT_ON",
    "SELECT_TIES",
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "option",
]

DCG_WARMUP_SCHEDULES: tuple[str, ...] = ("constant", "cosine")  # training.schedules.warmup_dcg_lr
SELECT_ON: tuple[str, ...] = ("val", "test")
#: train.select_ties: which checkpoint a tie of val/<monitor> keeps (first = released, strict ">")
SELECT_TIES: tuple[str, ...] = ("first", "last")
#: where the test-time prior of a cross-fitted model comes from (``eval.prior_source``)
PRIOR_SOURCES: tuple[str, ...] = ("full", "folds")


def option(
    default: Any = dataclasses.MISSING,
    *,
    choices: Optional[Sequence[Any]] = None,
    check: Union[Check, tuple[Check, ...]] = (),
    factory: Any = dataclasses.MISSING,
) -> Any:
    """A config field: its ``default`` (or ``factory``), the allowed ``choices`` (the library's own
    constant, checked when the key is set) and the ``check`` (or checks) run once the whole config
    is read (:data:`RULES`)."""
    meta: dict[str, Any] = {"checks": check if isinstance(check, tuple) else (check,)}
    if choices is not None:
        meta["choices"] = choices
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


#: fractions strictly inside (0, 1) and closed [0, 1]
_OPEN01, _UNIT = between(0, 1, lo_open=True, hi_open=True), between(0, 1)


@dataclass
class RunConfig:
    dir: str = option("runs/default", check=ck.path)  # run folder: config, checkpoints, logs, metrics, predictions
    seed: int = option(1234, check=between(0, SEED_MAX))  # global seed (released code: 1234)
    deterministic: bool = False  # torch deterministic algorithms (slower)


@dataclass
class DataConfig:
    dataset: str = option("ham10000", choices=DATASETS)  # data.sources.REGISTRY: one entry per data set
    root: str = option("../shared/data/ham10000", check=ck.path)  # data folder (csv: the manifest; medmnist: the .npz)
    split: str = option("authors", choices=SPLITS, check=ck.lesion_split)  # lesion: data sets with lesion ids
    test_fraction: float = option(0.3, check=_OPEN01)  # for split=random/lesion (paper: 7:3; ultrasound 8:2)
    path_col: str = "path"  # csv manifests
    label_col: str = "label"
    split_col: Optional[str] = None
    group_col: Optional[str] = None  # csv manifests: lesion / patient id; a group never spans two splits or folds
    image_size: int = option(224, check=between(8, 8192))
    in_chans: int = option(3, check=one_of(1, 3))
    batch_size: int = option(64, check=between(1, 1_000_000))  # released: 64 (HAM10000), 32 (APTOS)
    eval_batch_size: Optional[int] = option(None, check=between(1, 1_000_000, optional=True))
    num_workers: int = option(0, check=between(0, 1024))
    val_fraction: float = option(
        0.1, check=between(0, 1, hi_open=True)
    )  # carved from train (lesion-grouped for HAM10000)
    vflip: bool = False  # released code: on for APTOS only
    rotation: float = option(30.0, check=between(0, 180))
    cache_dir: Optional[str] = option(None, check=ck.path)
    skip_bad: bool = False  # skip and list unreadable images instead of stopping
    subset: Optional[int] = option(None, check=between(1, optional=True))  # stratified subset (tests/demos)
    check_images: bool = True
    class_balance: float = option(0.0, check=_UNIT)  # ours: train images weighted n_c^-p (0 = uniform, released)
    # ours: k-fold cross-validation over all labelled images (the source's splits pooled; grouped by
    # lesion / patient where the data have groups): 0 = off; k >= 2 folds, fold i (0-based) is the test split
    folds: int = option(0, check=ck.folds)
    fold: int = option(0, check=ck.fold)


@dataclass
class ModelConfig:
    variant: str = option("full", choices=ALL_VARIANTS)  # nn.diffmic.VARIANT_PARTS (paper Table 2 and ours)
    encoder: str = option("resnet18", check=ck.backbone)  # image encoder rho(x) (paper: ResNet-18, random init)
    hidden_dim: int = option(6144, check=between(1, 1_000_000))
    num_layers: int = option(3, check=between(1, 1000))
    dcg_global: str = option("resnet18", check=ck.backbone)  # released code: ResNet-50 (ImageNet); ours: ResNet-18
    dcg_local: str = option("resnet18", check=ck.backbone)
    num_rois: int = option(6, check=between(1, 100_000))
    crop_size: Optional[int] = option(None, check=ck.crop_fits)  # None: round(32 * image_size / 224)
    roi_channels: str = option("rgb", choices=ROI_CHANNELS)  # released code crops the red channel only (first)
    # released code: softmax_mean_logits; the paper: mean_probs (Eq. 1) or sum_probs (Eq. 2)
    prior: str = option("softmax_mean_logits", choices=PRIOR_KINDS)
    encoder_weights: Optional[str] = option(None, check=ck.path)  # local state-dict file, never downloaded
    dcg_weights: Optional[str] = option(None, check=ck.path)
    # released: [y_t, y_hat] (2C); paper: Eq. 3 [y_t, y_hat_g, y_hat_l] (3C)
    denoiser_input: str = option("released", choices=DENOISER_INPUTS)
    # ImageNet weights for rho(x)'s encoder and both DCG streams: false | true (torchvision/timm download,
    # cached) | a .pth/.safetensors state dict or a folder of them; encoder_weights/dcg_weights win
    pretrained: Union[bool, str] = option(False, check=ck.path)
    # sum (released: all classes' min-max saliency); top_class (ours: the predicted class's channel)
    roi_select: str = option("sum", choices=ROI_SELECT)
    # ours: DCG global-stream output stride, 32 as released (16 or 8 in the CPU presets)
    dcg_output_stride: int = option(32, check=one_of(*OUTPUT_STRIDES))
    # ours: freeze every backbone's layers up to this output stride (0: none), for pretrained
    # weights: no gradient through the high-resolution early layers (less time per step)
    freeze_stride: int = option(0, check=one_of(0, 2, 4, 8, 16))
    # ours: extra timm.create_model arguments for a timm:<name> encoder, e.g. {patch_size: 8} (ViT) or
    # {window_size: 4} (Swin); img_size defaults to data.image_size for fixed-input-size models (ViT, Swin)
    encoder_kwargs: dict = option(factory=dict, check=ck.encoder_kwargs)


@dataclass
class DiffusionConfig:
    schedule: str = option("linear", choices=BETA_SCHEDULES)
    num_timesteps: int = option(1000, check=between(1, 1_000_000))
    beta_start: float = option(1e-4, check=_OPEN01)
    beta_end: float = option(0.02, check=_OPEN01)


@dataclass
class LossConfig:
    mmd_weight: float = option(0.5, check=between(0, 1e6))  # lambda of Eq. 6
    # None: released C^2; list: multi-bandwidth
    mmd_bandwidth: Optional[Union[float, list]] = option(None, check=ck.bandwidth)
    dcg_ce: str = option("fused", choices=GUIDANCE_CE_MODES)  # fused (released code); all: + global + local


@dataclass
class TrainConfig:
    epochs: int = option(1000, check=between(0, 10_000_000))  # diffusion epochs after the DCG warm-up
    dcg_warmup_epochs: int = option(15, check=between(0, 10_000_000))  # released code 15, paper 10
    # ours: budget the joint stage / the DCG warm-up in optimiser steps (sets epochs / dcg_warmup_epochs at fit)
    joint_steps: Optional[int] = option(None, check=between(0, 10**9, optional=True))
    dcg_warmup_steps: Optional[int] = option(None, check=between(0, 10**9, optional=True))
    # ours: variants without a DCG (basic, C1) also train for the warm-up's length, so every variant of a
    # preset gets the same optimiser steps; false: they train train.epochs / joint_steps only (diffmic <= 0.1)
    equal_budget: bool = True
    lr: float = option(1e-3, check=between(0, 10, lo_open=True))
    lr_warmup_epochs: float = option(40.0, check=between(0))
    min_lr: float = option(0.0, check=ck.min_lr)
    # DCG Adam lr in the joint phase (and the warm-up unless dcg_warmup_lr is set)
    dcg_lr: float = option(2e-4, check=between(0, 10, lo_open=True))
    # ours: DCG lr at the start of the warm-up (None: dcg_lr)
    dcg_warmup_lr: Optional[float] = option(None, check=between(0, 10, lo_open=True, optional=True))
    # constant (released); cosine: dcg_warmup_lr -> dcg_lr over the warm-up
    dcg_warmup_schedule: str = option("constant", choices=DCG_WARMUP_SCHEDULES)
    dcg_amsgrad: bool = True
    joint_dcg: bool = True  # keep training the DCG with CE after the warm-up (released code)
    grad_clip: float = option(1.0, check=between(0))
    # ours: sum the gradients of this many batches before each optimiser step (one update from N
    # batches: batch_size x N images); manual optimisation does it itself (training.module)
    accumulate_grad_batches: int = option(1, check=ck.accumulate)
    # ours: stop fitting when val/<monitor> has not improved by more than early_stop_min_delta for this
    # many validations in a row (the joint stage only; the DCG warm-up's validations do not count); null = off
    early_stop_patience: Optional[int] = option(None, check=between(1, 1_000_000, optional=True))
    early_stop_min_delta: float = option(0.0, check=_UNIT)
    fused_adam: bool = True  # ours: fused Adam kernels (same update rule; off under *-mixed precision)
    ema_decay: float = option(0.9999, check=_UNIT)
    use_ema: bool = True  # evaluate with the EMA of the denoiser (released code keeps it unused)
    encoder_lr_scale: float = option(1.0, check=between(0, 1000))  # ours: lr multiplier for rho(x)'s backbone
    # ours: R (t, eps) draws per image per step (released: 1)
    noise_samples_per_image: int = option(1, check=between(1, 100_000))
    # ours: share of training draws given another batch image's priors (0 = released)
    prior_swap: float = option(0.0, check=between(0, 1, hi_open=True))
    # ours (issue 23): out-of-fold priors. K >= 2: K extra DCGs, DCG k trained on the images outside
    # fold k, give the denoiser each image's prior (training.crossfit); 0 or 1 = off (released)
    prior_folds: int = option(0, check=ck.prior_folds)
    # ours: a share of the training images trains the DCG only, the rest the denoiser only (0 = off)
    prior_split: float = option(0.0, check=ck.prior_split)
    init_encoder_from_dcg: bool = False  # ours: start rho(x) from the warmed-up DCG backbone (CPU presets)
    # ours: start rho(x) from an earlier run's encoder (folder or .ckpt)
    init_encoder_from: Optional[str] = option(None, check=(ck.path, ck.init_encoder_from))
    exact_dcg_priors: bool = True  # priors from a separate eval-mode DCG pass (released); False reuses the train pass
    precision: str = option("32-true", check=lt.precision)  # Lightning's precision names
    accelerator: str = option("auto", check=lt.accelerator)
    devices: Union[int, str] = option("auto", check=ck.devices)
    strategy: str = option("auto", check=lt.strategy)
    num_nodes: int = option(1, check=between(1))
    check_val_every_n_epoch: int = option(1, check=between(1))
    select_on: str = option("val", choices=SELECT_ON)  # test: the released code's protocol (optimistic)
    monitor: str = option("acc", choices=SCALAR_METRICS)
    # ours: on a tie of val/<monitor> keep the first best checkpoint (released: strict ">") or the
    # last one (its denoiser trained longer; on 78 validation images ties are common, docs/results.md)
    select_ties: str = option("first", choices=SELECT_TIES)
    checkpoint_every_n_steps: Optional[int] = option(None, check=between(1, optional=True))  # mid-epoch, for resume
    limit_train_batches: Optional[Union[int, float]] = option(None, check=ck.limit_batches)
    limit_val_batches: Optional[Union[int, float]] = option(None, check=ck.limit_batches)
    log_every_n_steps: int = option(10, check=between(1))
    progress_bar: bool = True
    # experiment trackers (checks.LOGGERS), comma-separated (several at once), through Lightning's
    # loggers; mlflow and wandb need the [trackers] extra (docs/deployment.md)
    logger: str = option("csv,tensorboard", check=ck.logger)
    tracking_uri: Optional[str] = None  # MLflow: null = a file store in <run>/logs/mlruns (offline)
    tracker_project: str = "diffmic"  # MLflow experiment / W&B project
    tracker_offline: bool = True  # W&B offline mode (nothing is sent; `wandb sync` later); false = online


@dataclass
class EvalConfig:
    sampler: str = option("truncated", choices=SAMPLERS)  # truncated = the released `test_timesteps`
    steps: Optional[int] = option(250, check=ck.steps)  # released: 250 HAM10000, 60 APTOS
    eta: float = option(0.0, check=_UNIT)
    start: str = option("noise", choices=DDIM_STARTS)  # where a ddim chain starts
    # ddim/dpmpp2m first timestep (None: T-1); n-1 = the truncated chain's window
    t_start: Optional[int] = option(None, check=ck.t_start)
    num_samples: int = option(1, check=between(1, 1_000_000))  # K reverse samples per image (released: 1)
    # ours: > 0 = the prediction is the deterministic DDIM read-out from the prior mean over the
    # sampler's window in this many calls (the K samples still give agreement / spread / t-test);
    # 0 = the mean of the K samples (released)
    point_steps: int = option(0, check=between(0, 100_000))
    # with train.prior_folds: the test-time prior from the model's DCG fitted on all training images
    # (full) or the mean of the K fold DCGs' logits (folds)
    prior_source: str = option("full", choices=PRIOR_SOURCES, check=ck.prior_source)
    aggregate: str = option("mean", choices=AGGREGATES)
    temperature: float = option(0.2, check=between(0, 1e6, lo_open=True))  # softmax(mean y0 / temperature)
    val_sampler: str = option("ddim", choices=SAMPLERS)
    val_steps: Optional[int] = option(10, check=ck.steps)
    sample_seed: int = option(0, check=between(0, SEED_MAX))  # per-image sampling seeds derive from it and the id
    refer_threshold: float = option(0.5, check=_UNIT)  # refer to a clinician when confidence is below this
    # fitted on the validation split by `diffmic calibrate` (or the first `diffmic test`), see docs/uncertainty.md
    refer_max_fraction: float = option(0.2, check=_UNIT)  # referral goal: refer at most this fraction
    # or: the fewest referrals reaching this accuracy on kept images
    refer_target_accuracy: Optional[float] = option(None, check=between(0, 1, lo_open=True, optional=True))
    conformal_level: float = option(0.9, check=_OPEN01)  # coverage of the conformal prediction sets
    # aps / raps: one quantile (the level on average over images); mondrian_*: one quantile per class
    # (each class reaches the level on its own; larger sets), docs/uncertainty.md
    conformal_method: str = option("mondrian_aps", choices=CONFORMAL_METHODS)
    raps_lambda: float = option(0.1, check=between(0, 100))  # RAPS: penalty per rank beyond raps_k_reg
    raps_k_reg: int = option(1, check=between(0, 100_000))
    # trust.calibration.CALIBRATORS, docs/uncertainty.md: vector, matrix and dirichlet may change the
    # arg-max (the change in accuracy is reported); auto chooses by repeated 5-fold CV on validation
    calibrator: str = option("temperature", choices=CALIBRATORS)
    bootstrap_resamples: int = option(500, check=between(0, 1_000_000))  # for the 95 % intervals of test metrics
    # ours: out-of-distribution flag ("this image does not look like the training data"; flagged
    # images are referred whatever their confidence), trust.ood, docs/uncertainty.md: auto = the best
    # measured score this model has; threshold fitted on validation
    ood_score: str = option("auto", choices=OOD_SCORES, check=ck.ood_score)
    ood_false_flag_rate: float = option(0.05, check=_OPEN01)  # share of validation images the flag may refer

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


def section_types(cls: type) -> dict[str, Any]:
    """The annotated type of each field of dataclass ``cls`` (a section, or :class:`Config`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _declared() -> list[tuple[str, dataclasses.Field]]:
    return [
        (f"{sec}.{f.name}", f) for sec, sec_type in section_types(Config).items() for f in dataclasses.fields(sec_type)
    ]


#: the allowed values of every choice key: the library's own constants (defined once, where used)
CHOICES: dict[str, Sequence[Any]] = {key: f.metadata["choices"] for key, f in _declared() if "choices" in f.metadata}
#: every (key, check) the fields declare, in the order of the sections: applied once the whole
#: config is read (a check may read the keys before it); the first broken one is the error
RULES: list[tuple[str, Check]] = [(key, c) for key, f in _declared() for c in f.metadata.get("checks", ())]
