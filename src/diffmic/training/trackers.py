"""Experiment trackers (``train.logger``): Lightning's CSV, TensorBoard, MLflow and W&B loggers.

``train.logger`` names one or more of :data:`diffmic.config.LOGGERS`, separated by commas
(``csv,tensorboard`` by default; ``csv,mlflow,wandb``). Every logger gets the resolved config (the
module's hyper-parameters) and the metrics of every epoch; after ``diffmic test`` the MLflow and W&B
runs of the fit also get the test metrics (``test/<key>``, nested blocks as ``test/<block>/<key>``)
and the figures (``reliability.png``, ``risk_coverage.png``) and ``test_metrics.json`` as artifacts.

Offline by default: MLflow writes a file store in ``<run>/logs/mlruns`` (``train.tracking_uri``
names another store: a folder, ``file:``, ``sqlite:`` or a server) and W&B runs in offline mode in
``<run>/logs/wandb`` (``train.tracker_offline=false`` sends it; ``wandb sync`` uploads an offline run
later). The tracker runs of a fit are recorded in ``<run>/logs/trackers.json`` so that
``fit --resume`` continues them and ``diffmic test`` adds to them. MLflow and W&B need the
``trackers`` extra (``pip install 'diffmic[trackers]'``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from diffmic.atomic import atomic_write_text
from diffmic.config import Config, ConfigError, logger_names

__all__ = [
    "TRACKERS_FILE",
    "FIGURES",
    "check_available",
    "build_loggers",
    "finish",
    "log_test",
    "mlflow_uri",
    "read_record",
    "metric_scalars",
]

#: the tracker runs of a fit (MLflow run id, W&B run id), in ``<run>/logs``
TRACKERS_FILE = "trackers.json"
#: the figures ``diffmic test`` writes, logged as artifacts
FIGURES = ("reliability.png", "risk_coverage.png")
#: the order the loggers are built in (the first gives ``trainer.log_dir``: ``<run>/logs``)
_ORDER = ("tensorboard", "csv", "mlflow", "wandb")
_EXTRA = "pip install 'diffmic[trackers]'"


def _names(cfg: Config) -> list[str]:
    return sorted(logger_names(cfg.train.logger), key=_ORDER.index)


def check_available(cfg: Config) -> None:
    """Refuse (before a run folder is touched) a tracker whose package is not installed."""
    for name, module in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if name in _names(cfg):
            try:
                __import__(module)
            except ImportError as exc:
                raise ConfigError(
                    f"train.logger={cfg.train.logger} needs the {module} package ({exc}); install the trackers "
                    f"extra ({_EXTRA}) or leave {name} out of train.logger"
                ) from exc


def mlflow_uri(cfg: Config, run_dir: Path) -> str:
    """``train.tracking_uri``, or a file store in ``<run>/logs/mlruns`` (an absolute ``file:`` URI)."""
    if cfg.train.tracking_uri:
        uri = cfg.train.tracking_uri
        return uri if "://" in uri or uri.startswith("file:") else Path(uri).resolve().as_uri()
    return (Path(run_dir).resolve() / "logs" / "mlruns").as_uri()


def _record_path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / TRACKERS_FILE


def read_record(run_dir: Path) -> dict:
    """``<run>/logs/trackers.json`` ({} when absent)."""
    path = _record_path(run_dir)
    if not path.is_file():
        return {}
    try:
        rec = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(
            f"'{path}' is damaged ({exc}); it names the tracker runs of this fit. Delete it to start new ones."
        ) from exc
    return rec if isinstance(rec, dict) else {}


def _write_record(run_dir: Path, rec: dict) -> None:
    path = _record_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(rec, indent=2))  # ASCII JSON


def _mlflow_logger(cfg: Config, run_dir: Path, run_id: str | None):
    from lightning.pytorch.loggers import MLFlowLogger

    uri = mlflow_uri(cfg, run_dir)
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store behind this switch; a file store is the offline default here
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

    class _Logger(MLFlowLogger):
        """MLflow refuses to change a logged parameter: a resumed run logs only the keys it lacks, and
        a value changed on resume as the tag ``resumed/<key>``."""

        def log_hyperparams(self, params: Any) -> None:
            if run_id is None:
                return super().log_hyperparams(params)
            from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

            flat = _flatten_dict(_convert_params(params))
            old = self.experiment.get_run(self.run_id).data.params
            new = {k: v for k, v in flat.items() if k not in old}
            if new:
                super().log_hyperparams(new)
            for k, v in flat.items():
                if k in old and str(v)[:6000] != old[k]:
                    self.experiment.set_tag(self.run_id, f"resumed/{k}"[:250], str(v)[:5000])

    try:
        logger = _Logger(
            experiment_name=cfg.train.tracker_project,
            run_name=Path(run_dir).resolve().name,
            tracking_uri=uri,
            run_id=run_id,
            tags={"diffmic.run_dir": str(Path(run_dir).resolve())},
        )
        logger.run_id  # noqa: B018 - creates (or opens) the run now: its id is recorded before training
    except Exception as exc:  # MlflowException: a store it cannot open, a deleted run, ...
        raise ConfigError(f"train.logger=mlflow: cannot open the MLflow run at {uri}: {exc}") from exc
    return logger


def _wandb_logger(cfg: Config, run_dir: Path, run_id: str | None):
    from lightning.pytorch.loggers import WandbLogger

    save = Path(run_dir) / "logs"
    save.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"id": run_id, "resume": "allow"} if run_id else {}
    return WandbLogger(
        name=Path(run_dir).resolve().name,
        project=cfg.train.tracker_project,
        save_dir=str(save),
        offline=cfg.train.tracker_offline,
        **kwargs,
    )


def build_loggers(cfg: Config, run_dir: Path, lead: bool = True) -> list:
    """The Lightning loggers ``train.logger`` names, for a fit in ``run_dir``. MLflow and W&B
    continue the runs recorded in ``<run>/logs/trackers.json`` (a resumed fit: a fresh fit starts
    from an empty or cleared run folder) and record new ones there (``lead``: the process that
    writes the run folder; the others get the CSV and TensorBoard loggers only)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    run_dir = Path(run_dir)
    rec = read_record(run_dir)
    loggers: list = []
    for name in _names(cfg):
        if name == "tensorboard":
            loggers.append(TensorBoardLogger(str(run_dir), name="logs", version=""))
        elif name == "csv":
            loggers.append(CSVLogger(str(run_dir), name="logs", version=""))
        elif not lead:
            continue
        elif name == "mlflow":
            old = rec.get("mlflow", {}).get("run_id")
            logger = _mlflow_logger(cfg, run_dir, old)
            rec["mlflow"] = {
                "tracking_uri": mlflow_uri(cfg, run_dir),
                "experiment_name": cfg.train.tracker_project,
                "experiment_id": logger.experiment_id,
                "run_id": logger.run_id,
            }
            cfg_file = run_dir / "config.yaml"
            if cfg_file.is_file():
                logger.experiment.log_artifact(logger.run_id, str(cfg_file))
            loggers.append(logger)
        elif name == "wandb":
            old = rec.get("wandb", {}).get("id")
            logger = _wandb_logger(cfg, run_dir, old)
            rec["wandb"] = {
                "id": logger.experiment.id,
                "project": cfg.train.tracker_project,
                "dir": str((run_dir / "logs" / "wandb").resolve()),
                "offline": cfg.train.tracker_offline,
            }
            loggers.append(logger)
    if lead and ("mlflow" in rec or "wandb" in rec):
        _write_record(run_dir, rec)
    return loggers


_KEY = re.compile(r"[^A-Za-z0-9_\-./ ]")


def metric_scalars(result: dict, prefix: str = "test") -> dict[str, float]:
    """The numbers of ``test_metrics.json`` as flat tracker metrics: ``test/acc``,
    ``test/calibration/ece``, ``test/ci/acc_low`` / ``_high`` (booleans, texts and longer lists left
    out; characters a tracker refuses in a name become ``_``)."""
    out: dict[str, float] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, bool) or value is None:
            return
        if isinstance(value, (int, float)):
            if math.isfinite(float(value)):
                out[_KEY.sub("_", key)[:250]] = float(value)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            walk(value[0], f"{key}_low")
            walk(value[1], f"{key}_high")

    for k, v in result.items():
        if k != "provenance":
            walk(v, f"{prefix}/{k}")
    return out


def log_test(cfg: Config, run_dir: Path, result: dict) -> list[str]:
    """After ``diffmic test``: add the test metrics, the figures and ``test_metrics.json`` to the
    MLflow / W&B runs of the fit (new runs when the fit recorded none). Returns the trackers used."""
    names = [n for n in _names(cfg) if n in ("mlflow", "wandb")]
    if not names:
        return []
    check_available(cfg)
    run_dir = Path(run_dir)
    rec = read_record(run_dir)
    metrics = metric_scalars(result)
    files = [run_dir / f for f in (*FIGURES, "test_metrics.json") if (run_dir / f).is_file()]
    step = _last_step(run_dir)
    if "mlflow" in names:
        logger = _mlflow_logger(cfg, run_dir, rec.get("mlflow", {}).get("run_id"))
        logger.log_metrics(metrics, step=step)
        for f in files:
            logger.experiment.log_artifact(logger.run_id, str(f), artifact_path="test")
        logger.finalize("success")
        rec["mlflow"] = {**rec.get("mlflow", {}), "run_id": logger.run_id, "experiment_id": logger.experiment_id}
    if "wandb" in names:
        import wandb

        logger = _wandb_logger(cfg, run_dir, rec.get("wandb", {}).get("id"))
        logger.log_metrics(metrics, step=step)
        figures = [f for f in files if f.suffix == ".png"]
        for f in figures:
            logger.log_image(key=f"test/{f.stem}", images=[str(f)], step=step)
        logger.experiment.summary.update(metrics)
        rec["wandb"] = {**rec.get("wandb", {}), "id": logger.experiment.id}
        wandb.finish()
    _write_record(run_dir, rec)
    return names


def finish(loggers: list) -> None:
    """End the W&B run of a fit (Lightning leaves it open until the process exits), so that a test
    in the same process (an experiment grid) continues it."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()


def _last_step(run_dir: Path) -> int:
    """The fit's last global step (``fit_summary.json``), so that test metrics sit after training."""
    f = Path(run_dir) / "fit_summary.json"
    try:
        return int(json.loads(f.read_text()).get("global_step") or 0) if f.is_file() else 0
    except (ValueError, TypeError, AttributeError):
        return 0
