"""Issue 21 (second hostile round), run side: ``fit --overwrite`` removes only what a run of ours
wrote (the manifest ``.diffmic-files.json``), a run folder may not hold or lie inside the data,
one fit at a time per run folder (fresh or ``--resume``: the run lock), and hostile config values
(a 5000-digit integer, an over-long path) are exit-2 errors naming the key.

All data are generated (2-class folder of 32 px images); each fit takes a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest

from diffmic.cli import main
from diffmic.training.checkpoint import read_checkpoint

from _helpers import fit_args, one_thread  # noqa: F401
from conftest import NUMBERED, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")

MANIFEST = ".diffmic-files.json"
LOCK = ".diffmic-run.lock"


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_folder(tmp_path_factory.mktemp("data") / "folder", (8, 8), **NUMBERED)


# ------------------------------------------------------------------ 5. --overwrite by origin
def test_overwrite_refuses_a_folder_without_a_record_of_our_files(tmp_path, data, capsys):
    """The user's own config.yaml, logs/ and predictions.csv (no run of ours ever wrote them)."""
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "notes.txt").write_text("my lab notes")
    (run / "config.yaml").write_text("my: own config\n")
    (run / "predictions.csv").write_text("patient,diagnosis\n1,benign\n")
    before = _files(run)
    rc = main(fit_args(data, run, "--overwrite", epochs=1))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    assert MANIFEST in err and "config.yaml" in err and "predictions.csv" in err and "logs" in err, err
    assert _files(run) == before  # nothing deleted (before: all three were)


def test_overwrite_removes_the_old_runs_files_and_report_and_nothing_else(tmp_path, data, monkeypatch, capsys):
    run = tmp_path / "run"
    assert main(fit_args(data, run, epochs=1)) == 0
    assert main(["test", "--run", str(run)]) == 0
    assert (run / "reliability.png").is_file() and (run / "risk_coverage.png").is_file()

    def fake_report(run_dir, output=None, **kw):  # what `diffmic report` writes into the run folder
        (run_dir / "report_files").mkdir(exist_ok=True)
        (run_dir / "report_files" / "gallery0.png").write_bytes(b"png")
        out = output or run_dir / "report.html"
        out.write_text("<html>old report</html>")
        return out

    import diffmic.inference.explain as explain

    monkeypatch.setattr(explain, "build_report", fake_report)
    assert main(["report", str(run)]) == 0
    (run / "notes.txt").write_text("mine")  # the user's own file: never ours to remove
    listed = set(json.loads((run / MANIFEST).read_text())["entries"])
    assert {"checkpoints", "logs", "config.yaml", "test_metrics.json", "reliability.png", "report.html"} <= listed
    assert "report_files" in listed and "notes.txt" not in listed
    capsys.readouterr()
    assert main(fit_args(data, run, "--overwrite", epochs=1)) == 0
    for stale in ("report.html", "report_files", "reliability.png", "risk_coverage.png", "test_metrics.json"):
        assert not (run / stale).exists(), stale  # before: report.html, report_files/, reliability.png stayed
    assert (run / "notes.txt").read_text() == "mine"
    read_checkpoint(run / "checkpoints" / "best.ckpt")
    assert not (run / LOCK).exists()


def test_overwrite_refuses_a_users_file_under_a_name_a_run_writes(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(fit_args(data, run, epochs=1)) == 0  # fitted, never tested: predictions.csv is not ours
    (run / "predictions.csv").write_text("patient,diagnosis\n1,benign\n")
    before = _files(run)
    capsys.readouterr()
    rc = main(fit_args(data, run, "--overwrite", epochs=1))
    err = capsys.readouterr().err
    assert rc == 2 and "predictions.csv" in err and "Traceback" not in err, err
    assert _files(run) == before  # the old run is kept too: nothing is removed unless all of it can be


@pytest.mark.parametrize("where", ["equal", "inside", "holds", "symlink"])
def test_run_folder_holding_or_inside_the_data_is_refused(tmp_path, where, capsys):
    # a class folder named `logs`
    data = write_synthetic_folder(tmp_path / "data", (6, 6), names=("benign", "logs"), **NUMBERED)
    run = {
        "equal": data,
        "inside": data / "benign" / "run",
        "holds": tmp_path,
        "symlink": tmp_path / "link",
    }[where]
    if where == "symlink":
        run.symlink_to(data, target_is_directory=True)
    before = _files(data)
    rc = main(fit_args(data, run, "--overwrite", epochs=1))
    err = capsys.readouterr().err
    assert rc == 2 and "data.root" in err and "run.dir" in err and "Traceback" not in err, err
    assert _files(data) == before  # before (equal, --overwrite): the class folder `logs` was deleted
    assert not (data / "benign" / "run").exists()


# -------------------------------------------------------------------- 7. one fit per run folder
def test_a_second_fit_on_a_run_in_use_is_refused_resume_included(tmp_path, data, monkeypatch, capsys):
    import diffmic.training.run as run_mod

    run = tmp_path / "run"
    seen: dict = {}

    class SecondFit(pl.Callback):  # while this fit trains, a second one on the same run folder
        def on_train_start(self, trainer, pl_module):
            if not seen:
                seen["lock"] = json.loads((run / LOCK).read_text())
                seen["resume"] = main(["fit", "--run", str(run), "--resume"])
                seen["resume_err"] = capsys.readouterr().err
                seen["fresh"] = main(fit_args(data, run, "--overwrite", epochs=1))
                seen["fresh_err"] = capsys.readouterr().err

    orig = run_mod._trainer
    monkeypatch.setattr(
        run_mod, "_trainer", lambda cfg, d, cbs, for_fit: orig(cfg, d, [*cbs, SecondFit()] if for_fit else cbs, for_fit)
    )
    assert main(fit_args(data, run, epochs=1)) == 0
    assert seen["lock"]["pid"] == os.getpid()
    for verb in ("resume", "fresh"):
        err = seen[f"{verb}_err"]
        assert seen[verb] == 2 and LOCK in err and f"process {os.getpid()}" in err and "Traceback" not in err, err
    assert not (run / LOCK).exists()  # released when the fit ends
    monkeypatch.setattr(run_mod, "_trainer", orig)

    # a lock left by a process that is gone is taken over: the resume runs
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    assert main(["fit", "--run", str(run), "--resume", "train.epochs=2"]) == 0
    assert json.loads((run / "fit_summary.json").read_text())["epochs"] == 3
    assert not (run / LOCK).exists()


HOLDER = (
    "import fcntl, json, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, json.dumps({'pid': os.getpid(), 'host': 'h'}).encode()); "
    "print('locked', flush=True); sys.stdin.read()"
)


@pytest.mark.skipif(sys.platform == "win32", reason="the holder uses fcntl")
def test_resume_while_another_process_holds_the_lock_is_refused(tmp_path, data, capsys):
    run = tmp_path / "run"
    assert main(fit_args(data, run, epochs=1)) == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(run / LOCK)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"  # another fit holds the run
        before = _files(run)
        capsys.readouterr()
        rc = main(["fit", "--run", str(run), "--resume", "train.epochs=2"])
        err = capsys.readouterr().err
        assert rc == 2 and f"process {holder.pid}" in err and LOCK in err and "Traceback" not in err, err
        assert _files(run) == before  # the other process's lock and run untouched
    finally:
        holder.communicate("")
    assert main(["fit", "--run", str(run), "--resume", "train.epochs=2"]) == 0  # the holder is gone


# ---------------------------------------------------------------- 12. exit 2, not a traceback
@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=" + "1" * 5000, "train.epochs"),
        ("train.lr=" + "1" * 4000, "train.lr"),
        ("run.dir=" + "a" * 300, "run.dir"),
        ("data.root=" + "a" * 300, "data.root"),
        ("data.root=" + "/".join(["d" * 200] * 30), "data.root"),
        ("data.cache_dir=" + "c" * 300, "data.cache_dir"),
    ],
)
def test_hostile_values_are_errors_naming_the_key(tmp_path, data, override, key, capsys):
    rc = main([*fit_args(data, tmp_path / "run", epochs=1), override])
    err = capsys.readouterr().err
    assert rc == 2 and key in err and "Traceback" not in err, err
    assert len(err) < 2000  # the value is not echoed in full
    assert not (tmp_path / "run").exists()


def test_hostile_number_in_a_config_file_is_an_error(tmp_path, capsys):
    f = tmp_path / "my.yaml"
    f.write_text("train:\n  epochs: " + "9" * 5000 + "\n")
    rc = main(["fit", "--config", str(f), f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and str(f) in err and "digits" in err and "Traceback" not in err, err
