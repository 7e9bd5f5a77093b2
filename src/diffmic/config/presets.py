"""Presets: YAML files (shipped ones by name) whose ``base:`` chains compose, and the mapping form
``diffmic.fit({...})`` takes; read with ``yaml.safe_load`` only."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import yaml

from diffmic.config.coerce import config_from_dict
from diffmic.config.errors import ConfigError, int_limit
from diffmic.config.sections import Config


def preset_dir() -> Path:
    """The shipped presets (``diffmic/configs/*.yaml``)."""
    return Path(__file__).parent.parent / "configs"


def _merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, section by section."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for sec, body in over.items():
        if isinstance(body, dict) and isinstance(out.get(sec), dict):
            out[sec].update(body)
        else:
            out[sec] = body
    return out


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
        raise ConfigError(f"{p}: a value is not a usable number ({int_limit(exc)})") from None
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


def save_config(cfg: Config, path: str | Path) -> None:
    """Write ``cfg`` as the flat, resolved YAML of a run folder's ``config.yaml``."""
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
