"""Robust and safe: interrupted runs, non-finite losses, write failures, untrusted files, bad configs.

The data-level checks (corrupt / truncated / odd images, missing files, duplicate ids, labels out of
range, restricted unpickler for .pkl splits, fuzzing) live in ``tests/test_data*.py``; see
``docs/robustness.md`` for the full table.

Every fit here uses a tiny CPU config on the generated MedMNIST-style file of ``conftest.py``
(64 training images, 2 classes): 16 batches of 4 per epoch, well under a second per epoch on one
thread. No real data are needed: these tests run on a fresh clone.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffmic.cli import main
from diffmic.config import ConfigError, load_config
from diffmic.training.checkpoint import CheckpointError, load_module, read_checkpoint

from _helpers import ONE_THREAD_ENV, TINY_MODEL, one_thread  # noqa: F401

FAST = [
    "data.dataset=medmnist",
    "data.subset=64",
    "data.image_size=32",
    "data.batch_size=4",
    *TINY_MODEL,
    "train.log_every_n_steps=1",
]
EPOCHS = ["train.epochs=2", "train.dcg_warmup_epochs=1"]  # 3 epochs: 1 DCG warm-up + 2 joint

ONE_THREAD = ONE_THREAD_ENV
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def fast(synth_npz) -> list[str]:
    """The tiny config on the generated .npz."""
    return [*FAST, f"data.root={synth_npz}"]


def _fit_args(fast: list[str], run: Path, cache: Path, *extra: str) -> list[str]:
    return ["fit", "--config", "cpu_v1", *fast, *EPOCHS, f"data.cache_dir={cache}", f"run.dir={run}", *extra]


def _metrics(run: Path) -> dict:
    m = json.loads((run / "test_metrics.json").read_text())
    m.pop("checkpoint")  # the path differs between runs
    m.pop("provenance")  # and the test's own wall time
    return m


def _csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as fh:
            return list(csv.DictReader(fh))
    except (OSError, csv.Error):
        return []


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, cache, fast) -> Path:
    """An uninterrupted run (fit + test), the reference for the resumed one."""
    run = tmp_path_factory.mktemp("full") / "run"
    assert main(_fit_args(fast, run, cache)) == 0
    assert main(["test", "--run", str(run)]) == 0
    return run


# ------------------------------------------------------------------------------------------ faults
@pytest.fixture(scope="module")
def killed_run(tmp_path_factory, cache, fast) -> dict:
    """``diffmic fit`` in a subprocess, SIGKILLed after the first logged step of epoch 2 (so
    ``last.ckpt`` is epoch 1's and epoch 2 is half done); returns what was found after the kill.
    The same folder is then resumed and tested."""
    tmp = tmp_path_factory.mktemp("killed")
    run = tmp / "run"
    log = run / "logs" / "metrics.csv"
    with open(tmp / "fit.log", "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffmic.cli", *_fit_args(fast, run, cache)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=ONE_THREAD,
        )
        try:
            for _ in range(60_000):  # a hang guard, not a speed check: polls for up to 10 minutes
                if any(r.get("epoch") == "2" and r.get("train/loss") for r in _csv_rows(log)):
                    break
                if proc.poll() is not None:
                    pytest.fail(
                        f"fit ended (rc {proc.returncode}) before it could be killed:\n"
                        + (tmp / "fit.log").read_text()[-3000:]
                    )
                time.sleep(0.01)
            else:
                pytest.fail("fit logged no step of epoch 2 in 60000 polls:\n" + (tmp / "fit.log").read_text()[-3000:])
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
    ckpts = run / "checkpoints"
    after_kill = {
        "returncode": proc.returncode,
        "files": sorted(p.name for p in ckpts.iterdir()),
        "last_epoch": read_checkpoint(ckpts / "last.ckpt")["epoch"],
        "summary_exists": (run / "fit_summary.json").exists(),
        "logged_epochs": sorted({r["epoch"] for r in _csv_rows(log) if r.get("epoch")}),
    }
    for p in ckpts.glob("*.ckpt"):  # raises if any checkpoint is partial or corrupt
        read_checkpoint(p)
    resume_rc = main(["fit", "--run", str(run), "--resume"])
    test_rc = main(["test", "--run", str(run)]) if resume_rc == 0 else None
    return {"run": run, "after_kill": after_kill, "resume_rc": resume_rc, "test_rc": test_rc}


def test_sigkill_mid_epoch_leaves_complete_checkpoints_and_resume_finishes(killed_run, full_run):
    k = killed_run["after_kill"]
    run = killed_run["run"]
    assert k["returncode"] == -signal.SIGKILL
    # The kill came mid-epoch: epoch 2 had logged steps, the newest checkpoint is epoch 1's.
    assert k["last_epoch"] == 1 and "2" in k["logged_epochs"] and not k["summary_exists"]
    # Nothing partial was left: only complete checkpoints (each one loaded in the fixture).
    assert k["files"] and all(n.endswith(".ckpt") for n in k["files"]), k["files"]

    assert killed_run["resume_rc"] == 0 and killed_run["test_rc"] == 0
    ref = json.loads((full_run / "fit_summary.json").read_text())
    got = json.loads((run / "fit_summary.json").read_text())
    assert (got["epochs"], got["global_step"]) == (ref["epochs"], ref["global_step"])
    for p in (run / "checkpoints").iterdir():
        assert p.suffix == ".ckpt", p
        read_checkpoint(p)
    m = _metrics(run)
    assert m["num_images"] == 32  # the generated test split
    # The training log of the epochs before the kill is kept (Lightning would delete it).
    before = {r["epoch"] for r in _csv_rows(run / "logs" / "metrics.part1.csv") if r.get("epoch")}
    after = {r["epoch"] for r in _csv_rows(run / "logs" / "metrics.csv") if r.get("epoch")}
    assert {"0", "1", "2"} <= before and after == {"2"}


def test_resumed_run_equals_uninterrupted_run(killed_run, full_run):
    """Resumed from the epoch-1 ``last.ckpt``, the run must end with exactly the weights, the
    selected checkpoint and the test metrics of a run that was never stopped (CPU)."""
    run = killed_run["run"]
    a = read_checkpoint(full_run / "checkpoints" / "last.ckpt")["state_dict"]
    b = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    diff = {
        k: (a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel() and a[k].is_floating_point()
    }
    worst = max(diff, key=diff.get)
    assert all(torch.equal(a[k], b[k]) for k in a), f"final weights differ: {worst} by {diff[worst]}"
    ref = json.loads((full_run / "fit_summary.json").read_text())
    got = json.loads((run / "fit_summary.json").read_text())
    assert got["best_score"] == ref["best_score"]
    assert _metrics(run) == _metrics(full_run)
    assert (run / "predictions.csv").read_text() == (full_run / "predictions.csv").read_text()


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(monkeypatch, tmp_path, cache, capsys, fast):
    """A NaN loss in the first joint step stops training with a message naming epoch and step;
    the checkpoint of the DCG warm-up epoch is still complete and loadable."""
    import diffmic.training.step as step_mod  # the training step calls the losses from here

    real = step_mod.diffusion_loss

    def nan_loss(*args, **kwargs):
        out = real(*args, **kwargs)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(step_mod, "diffusion_loss", nan_loss)
    run = tmp_path / "run"
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            *fast,
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            f"data.cache_dir={cache}",
            f"run.dir={run}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "diffusion loss is nan at epoch 1, global step" in err, err
    assert not (run / "fit_summary.json").exists()
    last = run / "checkpoints" / "last.ckpt"
    assert read_checkpoint(last)["epoch"] == 0
    module = load_module(last)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_loss_raises_in_the_library(monkeypatch, tmp_path, cache, fast):
    import diffmic.training.step as step_mod
    from diffmic.training.module import NonFiniteLossError
    from diffmic.training.run import fit

    monkeypatch.setattr(step_mod, "guidance_ce", lambda *a, **k: torch.tensor(float("inf"), requires_grad=True))
    cfg = load_config(
        "cpu_v1",
        [
            *fast,
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            "train.limit_train_batches=1",
            "train.limit_val_batches=1",
            f"data.cache_dir={cache}",
            f"run.dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(NonFiniteLossError, match=r"DCG cross-entropy loss is inf at epoch 0, global step 0"):
        fit(cfg)


def test_unwritable_run_folder_is_a_clear_error(tmp_path, capsys, fast):
    """A run.dir that cannot be created (under a regular file; as root, chmod does not stop
    writes) or written (read-only folder, when not root) exits 2 naming the folder."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    run = blocker / "sub"
    rc = main(["fit", "--config", "cpu_v1", *fast, f"run.dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"cannot write to run folder '{run}'" in err and "Traceback" not in err
    assert blocker.read_text() == "not a folder"

    if hasattr(os, "geteuid") and os.geteuid() != 0:
        ro = tmp_path / "readonly"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            rc = main(["fit", "--config", "cpu_v1", *fast, f"run.dir={ro / 'run'}"])
            err = capsys.readouterr().err
            assert rc == 2 and str(ro / "run") in err, err
        finally:
            ro.chmod(0o755)


def test_fit_never_overwrites_an_existing_run(tmp_path, capsys, fast):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"weeks of training")
    (run / "checkpoints" / "best.ckpt").write_bytes(b"the selected model")
    (run / "config.yaml").write_text("run:\n  seed: 7\n")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    rc = main(["fit", "--config", "cpu_v1", *fast, f"run.dir={run}"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "already holds a training run" in err and "--resume" in err and "nothing was overwritten" in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    rc = main(["fit", "--run", str(tmp_path / "empty"), "--resume", "--config", "cpu_v1"])
    assert rc == 2 and "--resume: no" in capsys.readouterr().err


def test_checkpoint_write_is_atomic_even_across_filesystems(monkeypatch, tmp_path):
    """A checkpoint is written to a sibling temporary file and renamed over the old one, so a
    kill at any moment leaves either the old or the new file, never a partial one. (Lightning's
    default writes to the system temp folder and moves the file; when that folder is on another
    filesystem, as on many clusters, the move is a copy that a kill can cut short.)"""
    from diffmic.training.run import _trainer

    cfg = load_config("cpu_v1", [f"run.dir={tmp_path}", "train.progress_bar=false"])
    io = _trainer(cfg, tmp_path, [], for_fit=False).strategy.checkpoint_io
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {}}, path)

    # 1) The system temp folder is on another filesystem, and the process dies mid-copy.
    real_rename = os.rename

    def cross_device_rename(src, dst, *a, **k):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *a, **k)

    def killed_copy(src, dst, *a, **k):
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fout.write(fin.read()[:100])
        raise KeyboardInterrupt("killed mid-copy")

    with monkeypatch.context() as m:
        m.setattr(os, "rename", cross_device_rename)
        m.setattr(shutil, "copyfile", killed_copy)
        m.setattr(shutil, "copy2", killed_copy)
        try:
            io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "hyper_parameters": {}}, path)
        except KeyboardInterrupt:
            pass
    w = torch.load(path, weights_only=True)["state_dict"]["w"]
    assert torch.equal(w, torch.ones(3)) or torch.equal(w, torch.zeros(3))

    # 2) The write itself fails half-way (disk full): the previous file is intact, no debris.
    def failing_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    before = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(torch, "save", failing_save)
        with pytest.raises(OSError, match="No space left"):
            io.save_checkpoint({"state_dict": {"w": torch.full((3,), 2.0)}, "hyper_parameters": {}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


# ----------------------------------------------------------------------------- untrusted files
class _Payload:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_checkpoint_with_pickled_code_is_refused_and_never_runs(full_run, tmp_path, capsys):
    pwned = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    good = read_checkpoint(full_run / "checkpoints" / "best.ckpt")
    good["hyper_parameters"]["payload"] = _Payload(pwned)
    torch.save(good, evil)
    assert not pwned.exists()

    with pytest.raises(CheckpointError, match="refused: it contains pickled objects"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_module(evil)
    from diffmic.inference.predictor import Predictor

    with pytest.raises(CheckpointError, match="refused"):
        Predictor.from_checkpoint(evil)
    assert main(["test", "--run", str(full_run), "--ckpt", str(evil)]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and str(evil) in err and "Traceback" not in err
    assert not pwned.exists(), "the pickled payload ran"


def test_checkpoints_of_other_models_or_edited_are_refused_whole(full_run, tmp_path):
    src = full_run / "checkpoints" / "best.ckpt"
    good = read_checkpoint(src)

    plain = tmp_path / "plain.ckpt"
    torch.save(good["state_dict"], plain)
    with pytest.raises(CheckpointError, match="not a diffmic checkpoint"):
        load_module(plain)

    other = tmp_path / "other.ckpt"
    torch.save({**good, "hyper_parameters": {"lr": 0.1, "num_layers": 4}}, other)
    with pytest.raises(CheckpointError, match="another model"):
        load_module(other)

    missing = tmp_path / "missing_key.ckpt"
    sd = dict(good["state_dict"])
    removed = sorted(sd)[len(sd) // 2]
    del sd[removed]
    torch.save({**good, "state_dict": sd}, missing)
    with pytest.raises(CheckpointError, match="does not match the model") as exc:
        load_module(missing)
    assert removed in str(exc.value)

    reshaped = tmp_path / "reshaped.ckpt"
    sd = dict(good["state_dict"])
    key = next(k for k, v in sd.items() if v.ndim == 2)
    sd[key] = sd[key].t().contiguous() if sd[key].shape[0] != sd[key].shape[1] else sd[key][:-1]
    torch.save({**good, "state_dict": sd}, reshaped)
    with pytest.raises(CheckpointError, match="nothing was loaded") as exc:
        load_module(reshaped)
    assert key in str(exc.value)

    # A module that load_module is never asked to return cannot be half-loaded; the Predictor,
    # which owns one, keeps its weights when it is asked to load a bad file.
    from diffmic.inference.predictor import Predictor

    pred = Predictor.from_checkpoint(src, device="cpu")
    weights = {k: v.clone() for k, v in pred.module.state_dict().items()}
    with pytest.raises(CheckpointError):
        Predictor.from_checkpoint(reshaped, device="cpu")
    assert all(torch.equal(weights[k], v) for k, v in pred.module.state_dict().items())

    ema = tmp_path / "bad_ema.ckpt"
    bad_ema = dict(good["diffmic_ema"])
    bad_ema.pop(next(iter(bad_ema)))
    torch.save({**good, "diffmic_ema": bad_ema}, ema)
    with pytest.raises(CheckpointError, match="EMA weights"):
        load_module(ema)

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a torch file"):
        load_module(truncated)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="could not be read"):
        read_checkpoint(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.ckpt")


def test_checkpoint_for_other_classes_is_refused(full_run, tmp_path, capsys):
    ckpt = full_run / "checkpoints" / "best.ckpt"
    trained = read_checkpoint(ckpt)["hyper_parameters"]["class_names"]
    seven = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    with pytest.raises(CheckpointError) as exc:
        load_module(ckpt, expected_class_names=seven)
    msg = str(exc.value)
    assert "2 classes" in msg and "7 classes" in msg and str(trained) in msg and str(seven) in msg

    # Through the CLI: a folder data set with 7 classes.
    from PIL import Image

    root = tmp_path / "seven"
    for c in seven:
        (root / c).mkdir(parents=True)
        for i in range(4):
            # distinct pixels per class (identical images in two splits are reported as leakage)
            Image.new("RGB", (16, 16), (30 * i, 20 + 25 * seven.index(c), 99)).save(root / c / f"{c}_{i}.png")
    rc = main(
        [
            "test",
            "--run",
            str(full_run),
            "data.dataset=folder",
            f"data.root={root}",
            "data.split=random",
            "data.val_fraction=0",
            "data.test_fraction=0.5",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "was trained on 2 classes" in err and "7 classes" in err and "VASC" in err


def test_loading_overrides_that_change_the_network_are_refused(full_run):
    with pytest.raises(CheckpointError, match="change the network"):
        load_module(full_run / "checkpoints" / "best.ckpt", overrides={"model": {"hidden_dim": 8}})


# ---------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.rooot=/x", r"unknown config key 'data.rooot'. Did you mean 'data.root'\?"),
        ("trian.epochs=3", r"unknown config key 'trian'. Did you mean 'train'\?"),
        ("train.epochs=many", r"train.epochs: expected an integer, got 'many'"),
        ("train.use_ema=maybe", r"train.use_ema: expected true/false"),
        ("model.variant=huge", r"model.variant: 'huge' is not one of basic, C1, C2, full"),
        ("eval.eta=2", r"eval.eta must be in \[0, 1\], got 2.0"),
        ("data.batch_size=0", r"data.batch_size must be in \[1, 1000000\], got 0"),
        ("eval.steps=5000", r"eval.steps must be in \[1, diffusion.num_timesteps=\d+\], got 5000"),
        ("data.val_fraction=1.5", r"data.val_fraction must be in \[0, 1\), got 1.5"),
        ("data.class_balance=2", r"data.class_balance must be in \[0, 1\]"),
        ("train.dcg_warmup_schedule=step", r"train.dcg_warmup_schedule: 'step' is not one of constant, cosine"),
        ("train.dcg_warmup_lr=-1", r"train.dcg_warmup_lr must be in \(0, 10\], got -1"),
        ("train.epochs", r"override 'train.epochs' must look like section.key=value"),
        ("train.epochs=[1", r"train.epochs: the value '\[1' is not valid YAML"),
    ],
)
def test_bad_config_values_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config("cpu_v1", [override])


def test_bad_config_in_a_file_and_on_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.epoch'. Did you mean 'train.epochs'\?"):
        load_config(cfg)
    cfg.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(cfg)
    assert main(["fit", "--config", "cpu_v1", "train.epochs=[1"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "Traceback" not in err
    assert main(["predict", "--ckpt", str(tmp_path / "x.ckpt"), str(cfg), "eval.steps=[1"]) == 2
    assert "eval.steps" in capsys.readouterr().err


def test_yaml_with_python_tags_is_refused_and_never_runs(tmp_path, capsys):
    pwned = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"run:\n  dir: !!python/object/apply:os.system ['touch {pwned}']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="run.dir"):
        load_config("cpu_v1", [f"run.dir=!!python/object/apply:os.system ['touch {pwned}']"])
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
    assert not pwned.exists(), "the YAML payload ran"
    # The run folder's config.yaml is read the same way by resume/test.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.read_text())
    assert main(["test", "--run", str(run)]) == 2
    assert not pwned.exists()


def test_data_check_reports_a_corrupt_image_by_name(tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "imgs"
    for c in ("benign", "malignant"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(root / c / f"{c}_{i}.png")
    (root / "malignant" / "broken_scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    rc = main(
        [
            "data",
            "check",
            "--config",
            "cpu_v1",
            "data.dataset=folder",
            f"data.root={root}",
            "data.split=random",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    cap = capsys.readouterr()
    assert rc != 0
    assert "broken_scan.png" in cap.out + cap.err


# ------------------------------------------------------------------ EMA and checkpoint selection
def test_evaluation_uses_the_ema_weights(full_run):
    """The checkpoint's EMA (averaged over the joint steps only) is what test/predict load; the
    live weights differ from it."""
    ckpt = read_checkpoint(full_run / "checkpoints" / "last.ckpt")
    ema = ckpt["diffmic_ema"]
    # 2 joint epochs of 16 batches: the 16 DCG warm-up steps are not averaged
    assert ckpt["diffmic_ema_n"] == 32
    module = load_module(full_run / "checkpoints" / "last.ckpt")
    loaded = module.diffusion_modules().state_dict()
    assert loaded.keys() == ema.keys()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)
    live = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    live_diff = {
        f"{i}.{k.split('.', 1)[1]}": v
        for k, v in live.items()
        for i, name in enumerate(("image_embedding", "denoiser"))
        if k.startswith(name + ".")
    }
    assert live_diff.keys() == ema.keys()
    assert any(not torch.equal(live_diff[k], ema[k]) for k in ema if ema[k].is_floating_point())


def test_no_checkpoint_is_selected_during_the_dcg_warmup(full_run):
    """Epoch 0 is the DCG warm-up (its validation logs val/dcg_*): best.ckpt is a joint epoch,
    and the selected score is that epoch's logged val/acc."""
    best = read_checkpoint(full_run / "checkpoints" / "best.ckpt")
    assert best["epoch"] >= 1
    rows = [r for r in _csv_rows(full_run / "logs" / "metrics.csv") if r.get("val/acc")]
    assert {r["epoch"] for r in rows} == {"1", "2"}  # no val/acc in the warm-up epoch
    warm = [r for r in _csv_rows(full_run / "logs" / "metrics.csv") if r.get("val/dcg_acc")]
    assert {r["epoch"] for r in warm} == {"0"}
    # the joint phase also logs the fused prior's validation metrics beside the read-out's
    prior = [r for r in _csv_rows(full_run / "logs" / "metrics.csv") if r.get("val/prior_acc")]
    assert {r["epoch"] for r in prior} == {"1", "2"}
    summary = json.loads((full_run / "fit_summary.json").read_text())
    best_val = max(float(r["val/acc"]) for r in rows)
    assert summary["best_score"] == pytest.approx(best_val)
