"""The configuration's error type and how a value is shown in its messages."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config key is unknown, ill-typed or has an invalid value."""


def shown(value: Any, limit: int = 120) -> str:
    """``value`` as text for a message, shortened when long (a 5000-digit number, a huge path)."""
    text = str(value)
    return text if len(text) <= limit else f"{text[: limit // 2]}... ({len(text)} characters)"


def int_limit(exc: ValueError) -> str:
    """Python's int-string limit error, without its advice to change the interpreter."""
    return str(exc).split(";")[0]
