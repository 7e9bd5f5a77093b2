"""Typed configuration: nested dataclasses, safe YAML, dotted overrides, strict key checks.

A config file is YAML with the sections of :class:`Config`. Unknown or ill-typed keys are errors
that name the key and list the valid ones; the file is read with ``yaml.safe_load`` only.

The package, by job:

* :mod:`~diffmic.config.sections`: the dataclasses; each field declares its type, default, choices
  (a library constant) and check once (``option``), and :data:`CHOICES` / :data:`RULES` derive
  from them. Every field documents its default and, where the paper and the released code differ,
  which one the default follows (see ``docs/method.md``).
* :mod:`~diffmic.config.checks` and :mod:`~diffmic.config.lightning`: the checks fields declare (the
  latter probes Lightning's registries, when Lightning is installed).
* :mod:`~diffmic.config.coerce`: values converted to the field types, choices and rules applied.
* :mod:`~diffmic.config.presets`: YAML presets, ``base:`` chains, reading and writing.
* :mod:`~diffmic.config.kwargs`: config sections to constructor arguments (the model, the data
  module, the Trainer).
"""

from diffmic.config.checks import LOGGERS, NAME_MAX, PATH_MAX, SEED_MAX, Check, logger_names
from diffmic.config.coerce import config_from_dict, parse_value
from diffmic.config.errors import ConfigError
from diffmic.config.kwargs import datamodule_kwargs, model_kwargs, section_kwargs, total_epochs, trainer_kwargs
from diffmic.config.presets import _merge, load_config, preset_dir, read_preset, resolve_preset, save_config
from diffmic.config.sections import (
    CHOICES,
    DCG_WARMUP_SCHEDULES,
    PRIOR_SOURCES,
    RULES,
    SELECT_ON,
    Config,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    LossConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "CHOICES",
    "DCG_WARMUP_SCHEDULES",
    "LOGGERS",
    "NAME_MAX",
    "PATH_MAX",
    "PRIOR_SOURCES",
    "RULES",
    "SEED_MAX",
    "SELECT_ON",
    "Check",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "config_from_dict",
    "datamodule_kwargs",
    "load_config",
    "logger_names",
    "model_kwargs",
    "parse_value",
    "preset_dir",
    "read_preset",
    "resolve_preset",
    "save_config",
    "section_kwargs",
    "total_epochs",
    "trainer_kwargs",
    "_merge",
]
