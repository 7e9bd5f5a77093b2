"""From config sections to constructor arguments: one function per constructor, used by every
caller (no field copied by hand). ``EvalConfig.reverse_kwargs`` gives the sampler's arguments."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

from diffmic.config.sections import Config
from diffmic.nn.diffmic import variant_parts


def section_kwargs(fn: Callable, *sections: Any, **extra: Any) -> dict[str, Any]:
    """Keyword arguments for ``fn`` from the fields of config ``sections`` whose names are
    parameters of ``fn`` (later sections and ``extra`` win): no field copied by hand."""
    params = inspect.signature(fn).parameters
    out: dict[str, Any] = {}
    for sec in sections:
        out.update({f.name: getattr(sec, f.name) for f in dataclasses.fields(sec) if f.name in params})
    out.update(extra)
    return out


def model_kwargs(cfg: Config) -> dict[str, Any]:
    """The arguments of :class:`~diffmic.nn.diffmic.DiffMIC` but ``num_classes``: every ``model.*``
    field that names one of its parameters, plus T, the ROI crop size, the input channels and the
    encoder's timm kwargs (``img_size=data.image_size`` added for a fixed-input-size timm encoder,
    see :func:`~diffmic.nn.encoders.timm_encoder_kwargs`)."""
    from diffmic.nn.diffmic import DiffMIC
    from diffmic.nn.encoders import timm_encoder_kwargs

    m = cfg.model
    return section_kwargs(
        DiffMIC,
        m,
        num_timesteps=cfg.diffusion.num_timesteps,
        crop_size=cfg.crop_size(),
        in_chans=cfg.data.in_chans,
        encoder_kwargs=timm_encoder_kwargs(m.encoder, m.encoder_kwargs, cfg.data.image_size),
    )


def datamodule_kwargs(cfg: Config) -> dict[str, Any]:
    """The arguments of :class:`~diffmic.data.datamodule.DiffMICDataModule`: every ``data.*`` field
    (each is a parameter of the same name; a new field the data module does not take is a
    TypeError there, not silently dropped), the run's seed, and the split that validation runs on."""
    return {
        **dataclasses.asdict(cfg.data),
        "seed": cfg.run.seed,
        # The released code's protocol: model selection on the test set (optimistic; labelled in
        # every output). Validation then runs on the test split.
        "val_split": "test" if cfg.train.select_on == "test" else "val",
    }


def total_epochs(cfg: Config) -> int:
    """Epochs of a fit: the joint stage's, after the DCG warm-up of a variant with a DCG."""
    t = cfg.train
    return t.epochs + (t.dcg_warmup_epochs if variant_parts(cfg.model.variant).dcg else 0)


def trainer_kwargs(cfg: Config) -> dict[str, Any]:
    """The arguments of Lightning's ``Trainer`` that the config sets (``training.run`` adds the run
    folder, loggers, callbacks and plugins). ``train.accumulate_grad_batches`` is not among them:
    manual optimisation accumulates itself (``training.module``)."""
    t = cfg.train
    return {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "strategy": t.strategy,
        "num_nodes": t.num_nodes,
        "precision": t.precision,
        "max_epochs": total_epochs(cfg),
        "check_val_every_n_epoch": t.check_val_every_n_epoch,
        "limit_train_batches": t.limit_train_batches,
        "limit_val_batches": t.limit_val_batches,
        "log_every_n_steps": t.log_every_n_steps,
        "deterministic": cfg.run.deterministic,
        "enable_progress_bar": t.progress_bar,
    }
