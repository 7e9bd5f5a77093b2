"""``diffmic.fit`` / ``diffmic.test`` (issue 26 §5): the fit and test commands as Python functions,
with the command line's config resolution and errors, returning the run folder and its metrics."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

import diffmic
from diffmic.api import resolve_config
from diffmic.cli import main
from diffmic.config import ConfigError, load_config

from _helpers import TINY_MODEL
from conftest import DARK_BRIGHT, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(data, run, cache) -> dict:
    """TINY_MODEL and the data as a dict of Python values (what a notebook would write)."""
    over = {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in TINY_MODEL)}
    return {
        **over,
        "data.dataset": "folder",
        "data.root": data,  # a Path
        "data.split": "random",
        "data.image_size": 32,
        "data.batch_size": 16,
        "data.cache_dir": str(cache),
        "train.epochs": 1,
        "train.dcg_warmup_epochs": 1,
        "run.dir": str(run),
    }


@pytest.mark.slow
def test_python_training_example(tmp_path):
    """The README's example on generated images: fit, then test, from Python. The run folder and
    the metrics come back; they are the run's fit_summary.json and test_metrics.json, and the test
    accuracy is the share of correct rows of its predictions.csv."""
    data = write_synthetic_folder(tmp_path / "data", (12, 12), 40, **DARK_BRIGHT)
    settings = _tiny(data, tmp_path / "runs" / "mine", tmp_path / "cache")

    run, fitted = diffmic.fit("cpu_v1", settings)
    print(run, fitted["monitor"], fitted["best_score"])
    run, tested = diffmic.test(run)
    print(tested["acc"], tested["f1"], tested["ci"]["acc"])

    assert run == tmp_path / "runs" / "mine"
    assert fitted == json.loads((run / "fit_summary.json").read_text())
    assert fitted["monitor"] == "val/acc" and fitted["epochs"] == 2
    assert tested == json.loads((run / "test_metrics.json").read_text())
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    assert tested["acc"] == pytest.approx(sum(r["label"] == r["pred"] for r in rows) / len(rows))
    # the run folder is refused a second fresh fit, as on the command line
    with pytest.raises(ConfigError, match="already holds a training run"):
        diffmic.fit("cpu_v1", settings)
    # eval overrides as a dict
    again = diffmic.test(run, {"eval.num_samples": 2})
    assert isinstance(again, diffmic.RunResult) and again.run == run and again.metrics["num_samples"] == 2


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = f"diffmic {argv[0]}: error: "
    assert err.startswith(prefix)
    return err[len(prefix) :]


@pytest.mark.parametrize(
    ("config", "overrides", "argv"),
    [
        ("cpu_v1", ["data.rooot=/x"], ["--config", "cpu_v1", "data.rooot=/x"]),
        ("cpu_v1", {"data.rooot": "/x"}, ["--config", "cpu_v1", "data.rooot=/x"]),
        ("cpu_v1", {"train.epochs": "many"}, ["--config", "cpu_v1", "train.epochs=many"]),
        ("cpu_v1", {"eval.temperature": 0}, ["--config", "cpu_v1", "eval.temperature=0"]),
        ("cpu_v1", ["model.variant=huge"], ["--config", "cpu_v1", "model.variant=huge"]),
        ("no_such_preset", None, ["--config", "no_such_preset"]),
        (
            "cpu_v1",
            {"train.accumulate_grad_batches": 0, "train.joint_steps": 10},
            ["--config", "cpu_v1", "train.accumulate_grad_batches=0", "train.joint_steps=10"],
        ),
    ],
)
def test_fit_refuses_what_the_command_refuses_with_the_same_message(capsys, config, overrides, argv):
    with pytest.raises(ConfigError) as info:
        diffmic.fit(config, overrides)
    assert str(info.value) == _cli_error(capsys, ["fit", *argv])


def test_a_non_empty_run_folder_is_refused_like_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as info:
        diffmic.fit("cpu_v1", run=run)
    assert str(info.value) == _cli_error(capsys, ["fit", "--config", "cpu_v1", "--run", str(run)])
    assert (run / "notes.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="resume and overwrite exclude each other"):
        diffmic.fit("cpu_v1", run=run, resume=True, overwrite=True)
    with pytest.raises(ConfigError, match="is a folder"):
        diffmic.fit(tmp_path)
    with pytest.raises(ConfigError, match="list of 'section.key=value' strings or a dict"):
        diffmic.fit("cpu_v1", "train.epochs=1")


def test_every_way_to_give_a_config_resolves_to_the_same(tmp_path):
    """A preset name with overrides, a YAML file, a dict of sections (with ``base:``), a Config, and
    dict overrides of Python values give the config ``diffmic fit --config cpu_v1 ...`` trains with."""
    strings = ["train.epochs=3", "data.root=/data/x", "data.split_col=yes"]
    reference = load_config("cpu_v1", [*strings[:2], "data.split_col='yes'"]).to_dict()
    assert reference["data"]["split_col"] == "yes"
    (tmp_path / "mine.yaml").write_text("base: cpu_v1\ntrain: {epochs: 3}\ndata: {root: /data/x, split_col: 'yes'}\n")
    sections = {"base": "cpu_v1", "train": {"epochs": 3}, "data": {"root": "/data/x", "split_col": "yes"}}
    ways = [
        resolve_config("cpu_v1", {"train.epochs": 3, "data.root": "/data/x", "data.split_col": "yes"}),
        resolve_config(tmp_path / "mine.yaml"),
        resolve_config(sections),
        resolve_config(load_config("cpu_v1"), {"train.epochs": 3, "data.root": "/data/x", "data.split_col": "yes"}),
        resolve_config(str(tmp_path / "mine.yaml"), ["train.epochs=3"]),
    ]
    for cfg in ways:
        assert cfg.to_dict() == reference
    # run= sets run.dir; resume= without a config reads the run's config.yaml
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(reference))
    cfg = resolve_config(None, run=run, resume=True)
    assert cfg.run.dir == str(run) and cfg.train.epochs == 3
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        resolve_config({"trian": {"epochs": 3}})
    with pytest.raises(ConfigError, match="'base' must name a preset"):
        resolve_config({"base": 3})
