"""Experiment trackers (issue 26.3): ``train.logger=csv,mlflow,wandb`` through Lightning's loggers,
offline. The MLflow file store of a tiny fit + test is read back with MLflow's own client: the
resolved config as parameters, every epoch's validation metrics (equal to the CSV logger's), the
test metrics (equal to test_metrics.json) and the figures as artifacts (byte for byte); a resumed
fit continues the same run. The W&B offline run file is decoded with W&B's own protobuf records."""

from __future__ import annotations

import csv
import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml

from diffmic.cli import main
from diffmic.training.trackers import TRACKERS_FILE, metric_scalars

from _helpers import TINY_MODEL  # noqa: E402
from conftest import write_synthetic_npz

pytestmark = pytest.mark.usefixtures("one_thread")


def need_module(name: str):
    """The optional package ``name`` (the trackers extra): skipped where it is missing, except under
    ``CI=true``, whose test extra installs it."""
    if os.environ.get("CI", "").lower() == "true":
        __import__(name)
        return sys.modules[name]
    return pytest.importorskip(name)


def _have(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    need_module("mlflow")
    tmp = tmp_path_factory.mktemp("trackers")
    write_synthetic_npz(tmp / "tiny.npz", {"train": 24, "val": 12, "test": 12})  # conftest's generator
    wandb = _have("wandb") or os.environ.get("CI", "").lower() == "true"
    run = tmp / "run"
    common = [
        "data.dataset=medmnist",
        f"data.root={tmp / 'tiny.npz'}",
        "data.image_size=32",
        "data.batch_size=12",
        "model.crop_size=8",
        *TINY_MODEL,
        f"data.cache_dir={tmp / 'cache'}",
        "model.dcg_output_stride=8",
        "model.variant=basic",
        "train.epochs=2",
        "train.log_every_n_steps=1",
    ]
    logger = "csv,mlflow" + (",wandb" if wandb else "")
    assert main(["fit", "--config", "cpu_v1", *common, f"train.logger={logger}", f"run.dir={run}"]) == 0
    assert main(["test", "--run", str(run)]) == 0
    return run, wandb


def _client(run: Path):
    from mlflow.tracking import MlflowClient

    rec = json.loads((run / "logs" / TRACKERS_FILE).read_text())["mlflow"]
    assert rec["tracking_uri"] == (run.resolve() / "logs" / "mlruns").as_uri()  # offline: inside the run folder
    return MlflowClient(tracking_uri=rec["tracking_uri"]), rec


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):  # an empty mapping (model.encoder_kwargs: {}) has no parameter
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _csv_column(run: Path, name: str) -> list[float]:
    rows = list(csv.DictReader(open(run / "logs" / "metrics.csv")))
    return [float(r[name]) for r in rows if r.get(name)]


def test_mlflow_store_holds_the_config_epoch_metrics_test_metrics_and_figures(tracked_run, tmp_path):
    run, _ = tracked_run
    client, rec = _client(run)
    exp = client.get_experiment_by_name("diffmic")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [rec["run_id"]]  # fit and test share one run
    r = client.get_run(rec["run_id"])
    assert r.info.run_name == "run" and r.info.status == "FINISHED"
    # the resolved config: every key of config.yaml as a parameter config/<section>/<key>
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    params = r.data.params
    expected = {f"config/{k}": v for k, v in _flat(cfg).items()}
    assert set(expected) <= set(params)
    for key in ("config/train/lr", "config/model/variant", "config/train/logger", "config/data/image_size"):
        assert params[key] == str(expected[key])
    assert params["class_names"] == str(["0", "1"])
    # the metrics of every epoch: the same numbers as the CSV logger's
    history = [m.value for m in sorted(client.get_metric_history(r.info.run_id, "val/acc"), key=lambda m: m.step)]
    assert len(history) == 2 and history == pytest.approx(_csv_column(run, "val/acc"))
    # the test metrics: test_metrics.json's numbers
    result = json.loads((run / "test_metrics.json").read_text())
    assert r.data.metrics["test/acc"] == pytest.approx(result["acc"])
    assert r.data.metrics["test/f1"] == pytest.approx(result["f1"])
    if "ci" in result:
        assert r.data.metrics["test/ci/acc_low"] == pytest.approx(result["ci"]["acc"][0])
    # the figures and the metrics file as artifacts, byte for byte
    arts = {a.path for a in client.list_artifacts(r.info.run_id, "test")}
    assert {"test/reliability.png", "test/risk_coverage.png", "test/test_metrics.json"} <= arts
    from mlflow.artifacts import download_artifacts

    for name in ("reliability.png", "risk_coverage.png"):
        got = download_artifacts(
            run_id=r.info.run_id, artifact_path=f"test/{name}", dst_path=str(tmp_path), tracking_uri=rec["tracking_uri"]
        )
        assert Path(got).read_bytes() == (run / name).read_bytes()
    got = download_artifacts(
        run_id=r.info.run_id, artifact_path="config.yaml", dst_path=str(tmp_path), tracking_uri=rec["tracking_uri"]
    )
    assert Path(got).read_bytes() == (run / "config.yaml").read_bytes()


def test_metric_scalars_flatten_the_test_metrics():
    result = {
        "acc": 0.75,
        "num_images": 12,
        "ci": {"acc": [0.5, 0.9]},
        "calibration": {"ece": 0.1, "calibrator": "temperature", "per_class": {"a b%": 0.2}},
        "refer": True,
        "curve": [0.1, 0.2, 0.3],
        "provenance": {"wall_time_s": 3.0},
        "bad": float("nan"),
    }
    assert metric_scalars(result) == {
        "test/acc": 0.75,
        "test/num_images": 12.0,
        "test/ci/acc_low": 0.5,
        "test/ci/acc_high": 0.9,
        "test/calibration/ece": 0.1,
        "test/calibration/per_class/a b_": 0.2,
    }


# W&B writes its offline run as a LevelDB-style log of protobuf records (header ":W&B", magic 0xBEE1,
# version 0; blocks of 32 KiB; each chunk: CRC-32C (4), length (2, little-endian), type (1: full,
# 2: first, 3: middle, 4: last)). The records are decoded with W&B's own protobuf classes.
def _wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, out, buf = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def test_wandb_offline_run_holds_the_config_epoch_metrics_and_test_metrics(tracked_run):
    run, wandb = tracked_run
    if not wandb:
        pytest.skip("wandb is not installed (the trackers extra)")
    rec = json.loads((run / "logs" / TRACKERS_FILE).read_text())["wandb"]
    assert rec["offline"] is True
    files = sorted((run / "logs" / "wandb").glob(f"offline-run-*-{rec['id']}/run-{rec['id']}.wandb"))
    assert len(files) == 2  # the fit, then the test continuing the same run id (offline: nothing sent)
    assert not list((run / "logs" / "wandb").glob("run-*"))  # no online run folder
    fit, test = (_wandb_records(f) for f in files)
    history = [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in fit
        if r.WhichOneof("record_type") == "history"
    ]
    val = [h["val/acc"] for h in history if "val/acc" in h]
    assert val == pytest.approx(_csv_column(run, "val/acc"))
    config = {}
    for r in fit:
        if r.WhichOneof("record_type") == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
    assert config["config"]["train"]["logger"] == "csv,mlflow,wandb"
    result = json.loads((run / "test_metrics.json").read_text())
    summary = {}
    for r in test:
        if r.WhichOneof("record_type") == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert summary["test/acc"] == pytest.approx(result["acc"])


def test_resumed_fit_continues_the_mlflow_run(tracked_run):
    run, _ = tracked_run
    client, rec = _client(run)
    assert main(["fit", "--run", str(run), "--resume", "train.epochs=3"]) == 0
    r = client.get_run(rec["run_id"])
    history = client.get_metric_history(r.info.run_id, "val/acc")
    assert len(history) == 3  # the third epoch in the same run
    assert r.data.params["config/train/epochs"] == "2" and r.data.tags["resumed/config/train/epochs"] == "3"
    assert len(client.search_runs([r.info.experiment_id])) == 1


def test_a_tracker_without_its_package_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    run = tmp_path / "run"
    code = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            "data.dataset=medmnist",
            "data.root=x.npz",
            "train.logger=mlflow",
            f"run.dir={run}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "needs the mlflow package" in err and "diffmic[trackers]" in err and "Traceback" not in err
    assert not run.exists()
