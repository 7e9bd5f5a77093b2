"""``train.early_stop_patience`` (issue 26 §5): Lightning's EarlyStopping on ``val/<monitor>``,
counting the joint stage's validations only. The epoch a fit stops at is recomputed from the
validation metrics it logged, with the rule written out here."""

from __future__ import annotations

import csv
import json

import pytest

from diffmic.cli import main

from _helpers import tiny_fit_args
from conftest import DARK_BRIGHT, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def expected_stop(values: list[float], patience: int, min_delta: float = 0.0) -> int | None:
    """Index of the validation after which training stops: the first at which ``patience``
    validations in a row have not beaten the best before them by more than ``min_delta``."""
    best, wait = None, 0
    for i, v in enumerate(values):
        if best is None or v > best + min_delta:
            best, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return i
    return None


def _validations(run) -> tuple[list[float], list[float]]:
    """(val/dcg_acc of the warm-up, val/acc of the joint stage) in the order logged."""
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    warm = [float(r["val/dcg_acc"]) for r in rows if r.get("val/dcg_acc")]
    joint = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    return warm, joint


def test_expected_stop_rule():
    assert expected_stop([0.5, 0.6, 0.6, 0.6], 2) == 3
    assert expected_stop([0.5, 0.4, 0.7, 0.7, 0.69], 2) == 4
    assert expected_stop([0.5, 0.6, 0.7], 1) is None
    assert expected_stop([0.5, 0.55, 0.58], 1, min_delta=0.1) == 1


@pytest.mark.slow
def test_a_fit_whose_validation_stops_improving_stops(tmp_path):
    """The full model with 2 DCG warm-up epochs and up to 8 joint epochs at a learning rate too small
    to change its predictions: val/acc stops improving, the fit ends at the validation the rule
    gives (patience 2), the warm-up's validations not counted, and fit_summary.json says so."""
    data = write_synthetic_folder(tmp_path / "data", (12, 12), 40, **DARK_BRIGHT)
    run = tmp_path / "run"
    args = tiny_fit_args(data, run, tmp_path / "cache", epochs=8, warmup=2)
    frozen = ["train.lr=1e-9", "train.min_lr=1e-9", "train.dcg_lr=1e-9", "train.dcg_warmup_lr=1e-9"]
    assert main([*args, *frozen, "train.early_stop_patience=2"]) == 0
    warm, joint = _validations(run)
    assert len(warm) == 2  # the warm-up validated twice without stopping the fit
    stop = expected_stop(joint, 2)
    assert stop is not None and len(joint) == stop + 1 < 8
    summary = json.loads((run / "fit_summary.json").read_text())
    es = summary["early_stopping"]
    assert es["stopped"] and es["patience"] == 2 and es["monitor"] == "val/acc"
    assert es["stopped_epoch"] == 2 + stop  # 0-based epoch: after the 2 warm-up epochs
    assert es["best_score"] == pytest.approx(max(joint))
    assert summary["epochs"] == 2 + stop + 1  # epochs run


def test_without_patience_there_is_no_early_stopping(tmp_path):
    from diffmic.config import load_config

    assert load_config("cpu_v1").train.early_stop_patience is None  # default: off
