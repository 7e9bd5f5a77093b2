"""Issue 9 (run side): last.ckpt after every epoch (SIGKILL after a non-improving epoch, then
resume), non-empty run folders refused unless --resume/--overwrite, a failed resume changes
nothing, the split is recorded and evaluation refuses overrides that change it, skip_bad writes
skipped.csv, a write probe before evaluation, untrusted checkpoint sizes checked before
allocating, and a model trained from an initial-weights file loads after the file is gone.

All data are generated (2-class folder of 32 px images); each fit takes a few seconds."""

from __future__ import annotations

import csv
import errno
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from diffmic.cli import main
from diffmic.training.checkpoint import CheckpointError, load_module, read_checkpoint

from _helpers import ONE_THREAD_ENV, fit_args, one_thread  # noqa: F401
from conftest import NUMBERED, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_folder(tmp_path_factory.mktemp("data") / "folder", (8, 8), **NUMBERED)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> dict:
    """A run whose encoder started from a local initial-weights file, deleted after the fit."""
    from diffmic.nn.encoders import create_encoder

    tmp = tmp_path_factory.mktemp("trained")
    init = tmp / "init_encoder.pt"
    torch.manual_seed(0)
    torch.save(create_encoder("resnet10_tiny").state_dict(), init)
    run = tmp / "run"
    assert main(fit_args(data, run, f"model.encoder_weights={init}", epochs=1)) == 0
    init.unlink()  # the initial weights are gone: the checkpoint must hold every weight
    return {"run": run, "init": init}


# ------------------------------------------------------------------------ 2. last.ckpt every epoch
KILLER = textwrap.dedent("""
    import os, signal, sys
    import lightning.pytorch as pl
    import diffmic.training.run as run
    from diffmic.training.callbacks import StageAwareCheckpoint

    # epochs after the first joint epoch (1) never improve the monitored metric
    _orig = StageAwareCheckpoint.check_monitor_top_k
    StageAwareCheckpoint.check_monitor_top_k = (
        lambda self, trainer, current=None: trainer.current_epoch <= 1 and _orig(self, trainer, current))

    class Kill(pl.Callback):  # SIGKILL at the start of epoch 3: epoch 2 finished, did not improve
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                os.kill(os.getpid(), signal.SIGKILL)

    _trainer = run._trainer
    run._trainer = lambda cfg, d, cbs, for_fit: _trainer(cfg, d, list(cbs) + ([Kill()] if for_fit else []), for_fit)
    from diffmic.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_kill_after_a_non_improving_epoch_resumes_after_it(tmp_path, data):
    run = tmp_path / "run"
    args = fit_args(data, run, warmup=1, epochs=3)  # epochs 0 (DCG warm-up), 1, 2, 3
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, *args],
        env=ONE_THREAD_ENV,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    best = read_checkpoint(run / "checkpoints" / "best.ckpt")
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert best["epoch"] == 1  # epoch 2 did not improve ...
    assert last["epoch"] == 2  # ... and still its end is kept (before: last.ckpt of epoch 1)
    assert not list((run / "checkpoints").glob("*.tmp-*"))
    assert main(["fit", "--run", str(run), "--resume"]) == 0
    resumed = _csv(run / "logs" / "metrics.csv")
    trained_epochs = sorted({int(r["epoch"]) for r in resumed if r.get("train/loss")})
    assert trained_epochs == [3]  # only the epoch that had not finished was trained again
    assert json.loads((run / "fit_summary.json").read_text())["epochs"] == 4


# --------------------------------------------------------------- 3. non-empty run folder refused
@pytest.mark.parametrize(
    "present", [["checkpoints/best.ckpt", "test_metrics.json"], ["config.yaml"], ["logs/metrics.csv"], ["notes.txt"]]
)
def test_fit_refuses_any_non_empty_run_folder(tmp_path, data, capsys, present):
    run = tmp_path / "run"
    for name in present:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(f"the user's {name}")
    before = _files(run)
    rc = main(fit_args(data, run))
    err = capsys.readouterr().err
    assert rc == 2 and "--resume" in err and "--overwrite" in err and "nothing was overwritten" in err, err
    assert Path(present[0]).parts[0] in err  # names what is there
    assert _files(run) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(tmp_path, data):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best.ckpt").write_text("old model")
    (run / "test_metrics.json").write_text('{"acc": 0.99}')  # stale: describes the old model
    (run / "notes.txt").write_text("mine")
    # the record a run of ours keeps of what it wrote (issue 21.5: without it nothing is removed)
    (run / ".diffmic-files.json").write_text('{"format": 1, "entries": ["checkpoints", "test_metrics.json"]}')
    assert main(fit_args(data, run, "--overwrite", epochs=1)) == 0
    assert not (run / "test_metrics.json").exists()
    assert (run / "notes.txt").read_text() == "mine"
    read_checkpoint(run / "checkpoints" / "best.ckpt")


# ------------------------------------------------------------- 4. failed resume changes nothing
def test_failed_resume_with_other_architecture_changes_nothing(trained, capsys):
    run = trained["run"]
    before = _files(run)
    rc = main(["fit", "--run", str(run), "--resume", "model.hidden_dim=32", "diffusion.num_timesteps=50"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.hidden_dim: 64 -> 32" in err and "diffusion.num_timesteps: 100 -> 50" in err, err
    assert "nothing in the run folder was changed" in err and "Traceback" not in err
    assert _files(run) == before  # config.yaml not rewritten, metrics.csv not moved


# ------------------------------------------------------------------------- 5. the split recorded
def test_split_is_recorded_and_evaluation_refuses_to_change_it(trained, capsys):
    run = trained["run"]
    rec = json.loads((run / "split.json").read_text())
    sizes = {k: len(v) for k, v in rec["splits"].items()}
    assert sizes == rec["sizes"] and sum(sizes.values()) == 16 and min(sizes.values()) > 0
    assert not set(rec["splits"]["train"]) & set(rec["splits"]["test"])
    assert main(["test", "--run", str(run)]) == 0
    before = _files(run)
    for over in (["run.seed=5"], ["data.test_fraction=0.5"]):
        rc = main(["test", "--run", str(run), *over])
        err = capsys.readouterr().err
        assert rc == 2 and over[0] in err and "split" in err and "Nothing was written" in err, err
        assert _files(run) == before  # test_metrics.json / predictions.csv untouched
    assert main(["test", "--run", str(run), "eval.steps=3"]) == 0  # evaluation keys are fine


# ------------------------------------------------------------------- 8. skip_bad -> skipped.csv
def test_skip_bad_prints_and_writes_skipped_csv(tmp_path, capsys):
    d = write_synthetic_folder(tmp_path / "data", (8, 8), **NUMBERED)
    (d / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "malignant" / "empty.png").write_bytes(b"")
    run = tmp_path / "run"
    assert main(fit_args(d, run, "data.skip_bad=true", epochs=1)) == 0
    out = capsys.readouterr().out
    rows = _csv(run / "skipped.csv")
    assert sorted(Path(r["path"]).name for r in rows) == ["broken.png", "empty.png"]
    assert all(r["reason"] and r["problem"] for r in rows)
    assert "broken.png" in out and "empty.png" in out and "skipped.csv" in out


# ------------------------------------------------------------ 12. clear errors instead of traces
def test_write_probe_before_evaluation(trained, monkeypatch, capsys):
    import diffmic.training.run as run_mod
    from diffmic.training import run_folder

    run = trained["run"]
    before = _files(run)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_data(cfg):
        raise AssertionError("the data were read before the write probe")

    monkeypatch.setattr(run_folder.os, "fsync", full_disk)
    monkeypatch.setattr(run_mod, "build_datamodule", no_data)
    rc = main(["test", "--run", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and str(run) in err and "Nothing was evaluated" in err
    assert _files(run) == before and not list(run.glob(".diffmic-write-probe-*"))


def test_checkpoint_asking_for_a_huge_model_is_refused_before_allocating(trained, tmp_path):
    ck = torch.load(trained["run"] / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    # the largest width the config rules allow: ~2 x 10^12 weights in the head (8 TB)
    ck["hyper_parameters"]["config"]["model"]["hidden_dim"] = 1_000_000
    ck["hyper_parameters"]["config"]["model"]["encoder_weights"] = None
    evil = tmp_path / "huge.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": ck["hyper_parameters"]}, evil)
    assert evil.stat().st_size < 100_000
    with pytest.raises(CheckpointError, match="describes a model of .* GiB that it cannot hold"):
        load_module(evil)


def test_model_from_initial_weights_file_loads_after_the_file_is_gone(trained, tmp_path, capsys):
    run, init = trained["run"], trained["init"]
    assert not init.exists()
    cfg = read_checkpoint(run / "checkpoints" / "best.ckpt")["hyper_parameters"]["config"]
    assert cfg["model"]["encoder_weights"] == str(init)  # it was trained from that file
    load_module(run / "checkpoints" / "best.ckpt")  # before: FileNotFoundError for init_encoder.pt
    assert main(["test", "--run", str(run)]) == 0
    # resuming also needs no initial-weights file
    assert main(["fit", "--run", str(run), "--resume", "train.epochs=2"]) == 0
