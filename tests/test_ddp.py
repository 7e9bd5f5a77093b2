"""DDP on CPU (2 processes, gloo): ``diffmic fit`` with the manual-optimisation module and its
callbacks, global test metrics equal to a single-process evaluation of the same checkpoint, and
``--resume`` under DDP equal to an uninterrupted DDP run.

Lightning's ``ddp`` strategy starts rank 1 by re-running the command line, so every DDP command
runs as ``python -m diffmic.cli`` in a subprocess."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffmic.cli import main
from diffmic.training.checkpoint import read_checkpoint

from _helpers import ONE_THREAD_ENV, one_thread, tiny_fit_args  # noqa: F401
from conftest import DARK_BRIGHT, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")

DDP = ["train.accelerator=cpu", "train.devices=2", "train.strategy=ddp", "train.progress_bar=false"]
# constant learning rates (min_lr = lr, no warm-up): the schedule does not depend on train.epochs,
# so a 2-epoch run resumed to 3 epochs must equal a 3-epoch run
CONSTANT_LR = ["train.min_lr=0.003", "train.lr_warmup_epochs=0"]
PER_CLASS = 15  # 30 images: a 9-image test split, shards of 5 and 4 on two ranks


def _cli(*args: str, timeout: int = 600) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "diffmic.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ONE_THREAD_ENV,
    )


def _wait(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_synthetic_folder(tmp / "data", (PER_CLASS, PER_CLASS), 40, **DARK_BRIGHT)
    resumed, straight = tmp / "resumed", tmp / "straight"
    a = _cli(*tiny_fit_args(data, resumed, tmp / "cache_a", epochs=1, warmup=1), *CONSTANT_LR, *DDP)
    b = _cli(*tiny_fit_args(data, straight, tmp / "cache_b", epochs=2, warmup=1), *CONSTANT_LR, *DDP)
    first = _wait(a)
    before = read_checkpoint(resumed / "checkpoints" / "last.ckpt")
    _wait(_cli("fit", "--run", str(resumed), "--resume", "train.epochs=2", *DDP))
    _wait(b)
    return {"resumed": resumed, "straight": straight, "before": before, "first_output": first, "data": data}


def test_ddp_fit_runs_both_ranks_and_prints_one_summary(runs):
    out = runs["first_output"]
    assert out.count("run folder:") == 1  # rank 1 prints nothing
    s = json.loads((runs["straight"] / "fit_summary.json").read_text())
    # 19 training images (30 - 9 test - 2 validation), batch 16 per rank on 2 ranks: one batch per
    # rank and epoch. Lightning counts optimiser steps: 1 in the DCG warm-up epoch, then 2 per
    # batch (diffusion + DCG) in each of the 2 joint epochs.
    assert s["epochs"] == 3 and s["global_step"] == 1 + 2 + 2, s


def _weight_diff(a: dict, b: dict) -> dict[str, float]:
    return {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point()}


def test_resume_under_ddp_continues_the_run(runs):
    resumed = read_checkpoint(runs["resumed"] / "checkpoints" / "last.ckpt")
    straight = read_checkpoint(runs["straight"] / "checkpoints" / "last.ckpt")
    before = runs["before"]
    # the final last.ckpt is written after the last epoch: epoch = epochs run, steps as above
    assert (before["epoch"], before["global_step"]) == (2, 3)
    assert (resumed["epoch"], resumed["global_step"]) == (straight["epoch"], straight["global_step"]) == (3, 5)
    for i in (0, 1):  # both optimisers restored and stepped on: same Adam step counts as the straight run
        steps_r = {int(v["step"]) for v in resumed["optimizer_states"][i]["state"].values()}
        steps_s = {int(v["step"]) for v in straight["optimizer_states"][i]["state"].values()}
        assert steps_r == steps_s, (i, steps_r, steps_s)
    sr, ss, sb = resumed["state_dict"], straight["state_dict"], before["state_dict"]
    assert sr.keys() == ss.keys()
    assert any(not torch.equal(sr[k], sb[k]) for k in sr if sr[k].is_floating_point()), "resume changed nothing"
    # the DCG (trained on the same batches, from the same restored state) ends identical
    dcg = {k: v for k, v in _weight_diff(sr, ss).items() if k.startswith("model.dcg.")}
    assert dcg and max(dcg.values()) == 0.0, sorted(dcg.items(), key=lambda kv: -kv[1])[:5]
    assert (runs["resumed"] / "logs" / "metrics.part1.csv").exists()  # the first part's log kept


def test_resume_under_ddp_equals_an_uninterrupted_ddp_run(runs):
    sr = read_checkpoint(runs["resumed"] / "checkpoints" / "last.ckpt")["state_dict"]
    ss = read_checkpoint(runs["straight"] / "checkpoints" / "last.ckpt")["state_dict"]
    # exact: every epoch starts from rank 0's BN statistics on all ranks (training.ddp.BroadcastBuffers),
    # as a resumed run does; without it the denoiser weights differed by up to 4e-3 here
    diff = _weight_diff(sr, ss)
    assert max(diff.values()) == 0.0, sorted(diff.items(), key=lambda kv: -kv[1])[:5]


def _rows(path: Path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_ddp_test_metrics_equal_single_process_evaluation(runs):
    run = runs["resumed"]
    out = _wait(_cli("test", "--run", str(run), *DDP))
    assert out.count('"written"') == 1
    ddp_metrics = json.loads((run / "test_metrics.json").read_text())
    ddp_rows = _rows(run / "predictions.csv")
    assert main(["test", "--run", str(run), "train.devices=1", "train.strategy=auto"]) == 0
    one = json.loads((run / "test_metrics.json").read_text())
    one_rows = _rows(run / "predictions.csv")
    # every test image exactly once (no padding duplicates from the distributed sampler)
    assert ddp_metrics["num_images"] == one["num_images"] == len(one_rows) == 9
    assert sorted(r["id"] for r in ddp_rows) == sorted(r["id"] for r in one_rows)
    assert [(r["id"], r["pred"]) for r in ddp_rows] == [(r["id"], r["pred"]) for r in one_rows]
    for k in ("acc", "balanced_acc", "f1", "kappa", "auroc"):
        assert ddp_metrics[k] == pytest.approx(one[k], abs=1e-6), k
    assert ddp_metrics["confusion_matrix"] == one["confusion_matrix"]
    # and the accuracy is that of the per-image rows (an independent count)
    correct = sum(r["label"] == r["pred"] for r in ddp_rows)
    assert ddp_metrics["acc"] == pytest.approx(correct / len(ddp_rows), abs=1e-6)
