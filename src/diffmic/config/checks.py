"""The checks a config field declares (``option(..., check=...)`` in :mod:`diffmic.config.sections`).

A check is ``check(value, cfg) -> None | text``: the text says what is allowed, and the error built
from it names the key and the value given. Checks that need other keys read them from ``cfg``
(sections are checked in order, so a check may rely on the keys declared before it)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any, Optional

from diffmic.data.sources import REGISTRY, find_dataset
from diffmic.nn.diffmic import DIFFUSION_VARIANTS, GUIDED_VARIANTS
from diffmic.trust.ood import score_problem

#: the whole config a check may read (:class:`diffmic.config.sections.Config`, which declares the
#: checks and so cannot be imported here)
Config = Any
Check = Callable[[Any, Config], Optional[str]]

SEED_MAX = 2**32 - 1  # numpy's seed range
#: the longest file or folder name (one path component) and path file systems accept, in bytes
NAME_MAX, PATH_MAX = 255, 4095
#: ``train.logger`` names (training.trackers builds them)
LOGGERS: tuple[str, ...] = ("csv", "tensorboard", "mlflow", "wandb")


def _num(v: float | None) -> str:
    return "" if v is None else str(int(v)) if float(v).is_integer() else f"{v:g}"


def between(
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


def one_of(*values: Any) -> Check:
    """One of a few numbers (string choices are declared with ``option(choices=...)``)."""
    return lambda v, cfg: None if v in values else f"must be one of {', '.join(map(str, values))}"


def path(v: Any, cfg: Config) -> Optional[str]:
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


# ------------------------------------------------------------------------------------------ data
def lesion_split(v: Any, cfg: Config) -> Optional[str]:
    """``lesion`` only for a data set whose entry in ``data.sources.REGISTRY`` has lesion ids."""
    spec = find_dataset(cfg.data.dataset)
    if v != "lesion" or spec is None or "lesion" in spec.splits:
        return None
    have = [f"data.dataset={s.name}" for s in REGISTRY.values() if "lesion" in s.splits]
    verb = "has" if len(have) == 1 else "have"
    return f"needs lesion ids: only {' or '.join(have)} {verb} them (use {' or '.join(spec.splits)})"


def folds(v: Any, cfg: Config) -> Optional[str]:
    if v == 0 or 2 <= v <= 100:
        return None
    return "must be 0 (no cross-validation) or a number of folds in [2, 100]"


def fold(v: Any, cfg: Config) -> Optional[str]:
    k = cfg.data.folds
    if k >= 2 and not 0 <= v < k:
        return f"must be in [0, data.folds-1={k - 1}] (the fold tested, 0-based)"
    if k < 2 and v != 0:
        return "needs data.folds >= 2 (k-fold cross-validation); without it leave data.fold at 0"
    return None


# ----------------------------------------------------------------------------------------- model
def backbone(v: Any, cfg: Config) -> Optional[str]:
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


def encoder_kwargs(v: Any, cfg: Config) -> Optional[str]:
    if not v:
        return None
    from diffmic.nn.encoders import RESERVED_TIMM_KWARGS

    if not cfg.model.encoder.startswith("timm:"):
        return f"only applies to timm encoders (model.encoder=timm:<name>), not model.encoder={cfg.model.encoder}"
    reserved = sorted(set(v) & RESERVED_TIMM_KWARGS)
    if reserved:
        return f"may not set {', '.join(reserved)} (diffmic sets them; use model.pretrained / data.in_chans)"
    return None


def crop_fits(v: Any, cfg: Config) -> Optional[str]:
    crop = cfg.crop_size()
    if crop < 1 or crop > cfg.data.image_size:
        return f"must be in [1, data.image_size={cfg.data.image_size}] (one ROI cell fits in the image)"
    return None


def bandwidth(v: Any, cfg: Config) -> Optional[str]:
    values = v if isinstance(v, list) else [v]
    if v is None or (values and all(b > 0 for b in values)):
        return None
    return "must be null (C^2), a number > 0 or a non-empty list of numbers > 0"


# ----------------------------------------------------------------------------------------- train
def min_lr(v: Any, cfg: Config) -> Optional[str]:
    return None if 0 <= v <= cfg.train.lr else f"must be in [0, train.lr={cfg.train.lr:g}]"


def accumulate(v: Any, cfg: Config) -> Optional[str]:
    if not 1 <= v <= 10_000:
        return "must be in [1, 10000]"
    return None  # a step budget counts optimiser steps, ceil(batches / v) per epoch (training.budget)


def _needs_guided(cfg: Config) -> Optional[str]:
    if cfg.model.variant in GUIDED_VARIANTS:
        return None
    return (
        f"needs a variant whose denoiser takes DCG priors ({', '.join(GUIDED_VARIANTS)}), "
        f"not model.variant={cfg.model.variant}"
    )


def prior_folds(v: Any, cfg: Config) -> Optional[str]:
    if not 0 <= v <= 20:
        return "must be 0 or 1 (off: one DCG fitted on every image) or a number of folds in [2, 20]"
    return _needs_guided(cfg) if v >= 2 else None


def prior_split(v: Any, cfg: Config) -> Optional[str]:
    if not 0 <= v < 1:
        return "must be in [0, 1): the share of training images that train the DCG only"
    if v and cfg.train.prior_folds >= 2:
        return "and train.prior_folds exclude each other: set one of them to 0"
    return _needs_guided(cfg) if v else None


def init_encoder_from(v: Any, cfg: Config) -> Optional[str]:
    if v is None:
        return None
    if not str(v).strip():
        return "must be null or the path of a run folder or a .ckpt file"
    if cfg.train.init_encoder_from_dcg:
        return "and train.init_encoder_from_dcg exclude each other (both set rho(x)): set train.init_encoder_from_dcg=false"
    if cfg.model.variant not in DIFFUSION_VARIANTS:
        return (
            f"needs a diffusion variant with an image encoder rho(x) ({', '.join(DIFFUSION_VARIANTS)}), "
            f"not model.variant={cfg.model.variant}"
        )
    return None


def devices(v: Any, cfg: Config) -> Optional[str]:
    if isinstance(v, int):
        return None if v >= 1 or v == -1 else "must be a count >= 1, -1 (all), 'auto' or a list of ids like '0,1'"
    text = str(v).strip()
    if text in ("auto", "-1"):
        return None
    ids = [p.strip() for p in text.strip("[]").split(",") if p.strip()]
    if ids and all(p.isdigit() for p in ids):
        return None
    return "must be a count >= 1, -1 (all), 'auto' or a list of ids like '0,1'"


def limit_batches(v: Any, cfg: Config) -> Optional[str]:
    if v is None or (isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v <= 1):
        return None
    return "must be a number of batches >= 1 or a fraction in (0, 1]"


def logger_names(v: str) -> list[str]:
    """The tracker names of ``train.logger`` ("csv,mlflow" -> ["csv", "mlflow"])."""
    return [p.strip().lower() for p in str(v).replace("+", ",").split(",") if p.strip()]


def logger(v: Any, cfg: Config) -> Optional[str]:
    names = logger_names(v)
    bad = [n for n in names if n not in LOGGERS]
    if bad or not names:
        return f"must name one or more of {', '.join(LOGGERS)}, separated by commas"
    if len(set(names)) != len(names):
        return "names a logger twice"
    return None


# ------------------------------------------------------------------------------------------ eval
def steps(v: Any, cfg: Config) -> Optional[str]:
    T = cfg.diffusion.num_timesteps
    return None if v is None or 1 <= v <= T else f"must be in [1, diffusion.num_timesteps={T}]"


def t_start(v: Any, cfg: Config) -> Optional[str]:
    if v is None:
        return None
    T = cfg.diffusion.num_timesteps
    if not 0 <= v <= T - 1:
        return f"must be in [0, diffusion.num_timesteps-1={T - 1}]"
    for key, n in (("eval.steps", cfg.eval.steps), ("eval.val_steps", cfg.eval.val_steps)):
        if n is not None and v + 1 < n <= T:  # a chain longer than T is its own key's error (checks.steps)
            return f"must be >= {key}-1={n - 1} (a chain of {n} steps needs {n} timesteps)"
    return None


def prior_source(v: Any, cfg: Config) -> Optional[str]:
    if v == "folds" and cfg.train.prior_folds < 2:
        return "folds needs a model trained with train.prior_folds >= 2"
    return None


def ood_score(v: Any, cfg: Config) -> Optional[str]:
    problem = score_problem(v, cfg.model.variant, cfg.eval.num_samples)
    return f"cannot be used: {problem}" if problem else None
