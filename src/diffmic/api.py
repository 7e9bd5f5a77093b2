"""Training and testing from Python: ``diffmic.fit`` and ``diffmic.test``, the ``diffmic fit`` and
``diffmic test`` commands as functions.

.. code-block:: python

    import diffmic

    run, fitted = diffmic.fit(
        "cpu",  # a preset name, a YAML file, a dict of sections (``base:`` allowed) or a Config
        {"data.dataset": "folder", "data.root": "data/my_images", "data.split": "random", "run.dir": "runs/mine"},
    )
    print(run, fitted["monitor"], fitted["best_score"])  # the run folder; the best validation score
    run, tested = diffmic.test(run)  # writes test_metrics.json and predictions.csv into the run folder
    print(tested["acc"], tested["f1"], tested["ci"]["acc"])

The config is resolved exactly as on the command line (``diffmic fit --config NAME key=value ...``):
the same presets and ``base:`` chains, the same coercion and rules (``config.RULES``), the same
errors (:class:`~diffmic.config.ConfigError` naming the key, with a "did you mean"; ``DataError``
naming the file or row; ``RunFolderError``, ``CheckpointError``), the same run-folder guarantees
(a non-empty run folder is refused unless ``resume`` or ``overwrite``; one fit per folder at a time).
Overrides are ``"section.key=value"`` strings (YAML values, as typed on the command line) or a
mapping ``{"section.key": value}`` of Python values.

Each returns a :class:`RunResult` ``(run, metrics)``: the run folder and, for ``fit``, the content of
its ``fit_summary.json`` (best validation score, monitor, epochs, optimiser steps, early stopping),
for ``test``, that of ``test_metrics.json`` (metrics, per-class scores, confusion matrix, calibration,
conformal sets, referral, bootstrap intervals).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from diffmic.config import Config, ConfigError, load_config

__all__ = ["RunResult", "fit", "test", "resolve_config"]

ConfigSource = Union[str, os.PathLike, Mapping, Config, None]
Overrides = Union[Sequence[str], Mapping[str, Any], None]


class RunResult(NamedTuple):
    """What :func:`fit` and :func:`test` return: the run folder and its metrics."""

    run: Path
    metrics: dict


def _override_list(overrides: Overrides) -> list[str]:
    """``"section.key=value"`` strings as the command line takes them; a mapping's Python values are
    written as JSON (valid YAML), so that ``{"data.root": "yes"}`` stays the string ``"yes"``."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides must be a list of 'section.key=value' strings or a dict, got the string {overrides!r}"
        )
    if isinstance(overrides, Mapping):
        out = []
        for key, value in overrides.items():
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
            try:
                text = json.dumps(value)
            except TypeError as exc:
                raise ConfigError(f"{key}: {type(value).__name__} is not a config value ({exc})") from None
            out.append(f"{key}={text}")
        return out
    return [str(item) for item in overrides]


def resolve_config(
    config: ConfigSource = None,
    overrides: Overrides = None,
    *,
    run: Optional[str | os.PathLike] = None,
    resume: bool = False,
) -> Config:
    """The config :func:`fit` trains with (``diffmic fit``'s resolution): ``config`` is a preset
    name or YAML path (a folder is refused), a mapping of sections, a :class:`Config` or ``None``
    (the defaults); ``run`` sets ``run.dir`` (``--run``), and with ``resume`` and no ``config`` the
    run folder's ``config.yaml`` is used."""
    over = _override_list(overrides)
    if run is not None:
        if resume and config is None:
            config = Path(run) / "config.yaml"
        over.append(f"run.dir={json.dumps(os.fspath(run))}")
    if isinstance(config, Config):
        config = config.to_dict()
    if isinstance(config, (str, os.PathLike)) and Path(config).is_dir():
        raise ConfigError(
            f"config '{os.fspath(config)}' is a folder; give a YAML file (or a preset name), "
            f"e.g. {Path(config) / 'config.yaml'}"
        )
    if config is not None and not isinstance(config, (str, os.PathLike, Mapping)):
        raise ConfigError(f"config must be a preset name, a YAML path, a dict or a Config, got {type(config).__name__}")
    return load_config(Path(config) if isinstance(config, os.PathLike) else config, over)


def fit(
    config: ConfigSource = None,
    overrides: Overrides = None,
    *,
    run: Optional[str | os.PathLike] = None,
    resume: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
) -> RunResult:
    """Train, selecting the best checkpoint on validation (``diffmic fit``). Returns the run folder
    and its fit summary.

    ``resume`` continues ``<run>/checkpoints/last.ckpt`` (``--resume``); ``overwrite`` replaces the
    run in a non-empty run folder, removing only what the folder's manifest says diffmic wrote
    (``--overwrite``); they exclude each other. ``verbose`` shows Lightning's full output (``-v``).
    """
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume keeps the run, overwrite replaces it")
    cfg = resolve_config(config, overrides, run=run, resume=resume)
    from diffmic.training.console import quiet
    from diffmic.training.run import fit as fit_run

    quiet(not verbose)
    run_dir = fit_run(cfg, resume=resume, overwrite=overwrite)
    summary = run_dir / "fit_summary.json"
    return RunResult(run_dir, json.loads(summary.read_text()) if summary.is_file() else {})


def test(
    run: str | os.PathLike,
    overrides: Overrides = None,
    *,
    ckpt: Optional[str | os.PathLike] = None,
    config: Optional[str | os.PathLike] = None,
    verbose: bool = False,
) -> RunResult:
    """Evaluate a trained run on its test split (``diffmic test --run RUN``): ``eval.*`` overrides
    change the sampling (overrides that would change the recorded data split are refused), ``ckpt``
    another checkpoint than ``best.ckpt``, ``config`` another config than the run's. Writes
    ``test_metrics.json`` and ``predictions.csv`` into the run folder; returns the run folder and the
    test metrics."""
    from diffmic.training.console import quiet
    from diffmic.training.run import evaluate

    if config is not None and Path(config).is_dir():
        raise ConfigError(
            f"config '{os.fspath(config)}' is a folder; give a YAML file, e.g. {Path(config) / 'config.yaml'}"
        )
    quiet(not verbose)
    result = evaluate(
        Path(run),
        stage="test",
        ckpt=os.fspath(ckpt) if ckpt is not None else None,
        overrides=_override_list(overrides),
        config_path=os.fspath(config) if config is not None else None,
    )
    return RunResult(Path(run), result)


test.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into a test module
