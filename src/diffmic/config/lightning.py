"""Checks of the Lightning strings (``train.precision``, ``accelerator``, ``strategy``) against
Lightning's own registries. Lightning is needed to train, not to load an exported model: without it
these strings are not checked here (``fit`` checks them when it builds the Trainer)."""

from __future__ import annotations

import typing
from typing import Any, Optional

from diffmic.config.checks import Config


def lightning_missing() -> bool:
    """True when Lightning cannot be imported (an exported model's environment)."""
    try:
        import lightning.pytorch  # noqa: F401
    except ImportError:
        return True
    return False


def precision(v: Any, cfg: Config) -> Optional[str]:
    if v == "32-true" or lightning_missing():
        return None
    from lightning.fabric.connector import _PRECISION_INPUT_STR, _PRECISION_INPUT_STR_ALIAS

    valid = (*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS))
    return None if v in valid else f"is not a Lightning precision: use one of {', '.join(valid)}"


def accelerator(v: Any, cfg: Config) -> Optional[str]:
    if v == "auto" or lightning_missing():
        return None
    from lightning.pytorch.accelerators import AcceleratorRegistry

    valid = ["auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())]
    return None if v in valid else f"is not a Lightning accelerator: use one of {', '.join(valid)}"


def strategy(v: Any, cfg: Config) -> Optional[str]:
    if v == "auto" or lightning_missing():
        return None
    from lightning.pytorch.strategies import StrategyRegistry

    valid = ["auto", *StrategyRegistry.available_strategies()]
    return None if v in valid else f"is not a Lightning strategy: use one of {', '.join(valid)}"
