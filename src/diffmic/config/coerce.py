"""Reading values into a :class:`~diffmic.config.sections.Config`: each value is converted to its
field's annotated type, checked against the field's choices, and the whole config against
:data:`~diffmic.config.sections.RULES`. Unknown keys and ill-typed values are errors that name the
key (and the closest valid key)."""

from __future__ import annotations

import copy
import difflib
import math
import types
import typing
from typing import Any, Union

import yaml

from diffmic.config.errors import ConfigError, int_limit, shown
from diffmic.config.sections import CHOICES, RULES, Config, section_types


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def _to_union(value: Any, tp: Any, key: str) -> Any:
    # the arm of the value's own type first (typing may reorder Union[int, float])
    args = tuple(sorted(typing.get_args(tp), key=lambda a: a is not type(value)))
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in (a for a in args if a is not type(None)):
        try:
            return coerce(value, arg, key)
        except ConfigError as exc:
            errors.append(str(exc))
    specific = [e for e in errors if "finite" in e]  # the value had the right type, a bad number
    if specific:
        raise ConfigError(specific[0])
    raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")


def _to_bool(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(f"{key}: expected true/false, got {value!r}")


def _to_int(value: Any, key: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ConfigError(f"{key}: expected an integer, got {value!r}")


def _to_float(value: Any, key: str) -> float:
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int beyond the float range
            raise ConfigError(f"{key}: expected a finite number, got {shown(value)}") from None
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


def _to_str(value: Any, key: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ConfigError(f"{key}: expected a string, got {value!r}")


def _to_dict(value: Any, key: str) -> dict:
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


def _to_list(value: Any, key: str) -> list:
    if isinstance(value, str):
        value = yaml.safe_load(value)
    if isinstance(value, (list, tuple)):
        return [_to_float(v, f"{key}[{i}]") for i, v in enumerate(value)]  # lists of numbers only
    raise ConfigError(f"{key}: expected a list, got {value!r}")


_CONVERTERS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, dict: _to_dict, list: _to_list}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert ``value`` to the annotated type ``tp``; raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _to_union(value, tp, key)
    convert = _CONVERTERS.get(origin or tp)
    if convert is None:
        raise ConfigError(f"{key}: unsupported type {tp}")
    return convert(value, key)


def _unknown(key: str, valid: list[str]) -> ConfigError:
    # compare the last component with the last components of the valid keys ("rooot" ~ "root")
    leaves = {v.split(".")[-1]: v for v in valid}
    close = difflib.get_close_matches(key.split(".")[-1], list(leaves), n=1)
    hint = f" Did you mean '{leaves[close[0]]}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}")


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set ``section.name`` of ``cfg`` to ``value`` converted to the field's type and checked
    against its choices."""
    parts = dotted.split(".")
    sections = section_types(Config)
    if len(parts) != 2:
        if len(parts) == 1 and parts[0] not in sections:
            raise _unknown(dotted, list(sections))
        raise ConfigError(f"config key '{dotted}' must look like section.key (e.g. data.root)")
    sec, name = parts
    if sec not in sections:
        raise _unknown(sec, list(sections))
    section_obj = getattr(cfg, sec)
    types_ = section_types(type(section_obj))
    if name not in types_:
        raise _unknown(dotted, [f"{sec}.{k}" for k in types_])
    val = coerce(value, types_[name], dotted)
    if dotted in CHOICES and str(val) not in CHOICES[dotted]:
        raise ConfigError(f"{dotted}: {val!r} is not one of {', '.join(CHOICES[dotted])}")
    setattr(section_obj, name, val)


def validate(cfg: Config) -> None:
    """Apply :data:`RULES`; the first broken rule raises a ConfigError naming the key."""
    for key, check in RULES:
        sec, name = key.split(".")
        value = getattr(getattr(cfg, sec), name)
        problem = check(value, cfg)
        if problem:
            raise ConfigError(f"{key} {problem}, got {shown(value)}")


def parse_value(key: str, text: str) -> Any:
    """Parse the value of a ``key=value`` override as YAML (``yaml.safe_load``: no Python tags)."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: the value {shown(text)!r} is not valid YAML ({reason})") from exc
    except ValueError as exc:  # an integer over Python's int-string limit (4300 digits)
        raise ConfigError(f"{key}: the value {shown(text)!r} is not a usable number ({int_limit(exc)})") from None


def config_from_dict(raw: dict | None, overrides: list[str] | None = None, source: str = "config") -> Config:
    """Build a :class:`Config` from a nested dict and ``key=value`` overrides (strict)."""
    cfg = Config()
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    sections = section_types(Config)
    for sec, body in raw.items():
        if sec not in sections:
            raise _unknown(str(sec), list(sections))
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section '{sec}' must be a mapping, got {body!r}")
        for name, value in body.items():
            set_key(cfg, f"{sec}.{name}", value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value (e.g. data.root=/data)")
        key, value = item.split("=", 1)
        set_key(cfg, key.strip(), parse_value(key.strip(), value))
    validate(cfg)
    return cfg
