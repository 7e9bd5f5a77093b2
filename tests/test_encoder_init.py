"""``train.init_encoder_from``: ρ(x) of a `full` run starts from the backbone of an earlier `basic`
run at the start of the joint phase, once (a resume does not re-initialise it), and a missing,
unfinished, non-checkpoint or unfitting source is a clear error before anything is written.

All data are generated (2-class folder of 32 px images); each fit takes a few seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffmic.cli import main
from diffmic.config import ConfigError, load_config
from diffmic.training.checkpoint import read_checkpoint
from diffmic.training.module import DiffMICModule

from _helpers import fit_args, one_thread  # noqa: F401
from conftest import NUMBERED, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")

FROM = "train.init_encoder_from_dcg=false"  # the CPU preset starts rho(x) from the DCG instead


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_synthetic_folder(tmp_path_factory.mktemp("data") / "folder", (8, 8), **NUMBERED)


@pytest.fixture(scope="module")
def basic(tmp_path_factory, data) -> Path:
    run = tmp_path_factory.mktemp("basic") / "run"
    assert main(fit_args(data, run, "model.variant=basic", epochs=1)) == 0
    return run


def _encoder_weights(ckpt: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def full(tmp_path_factory, data, basic) -> dict:
    """A `full` run (1 warm-up epoch, 1 joint epoch) whose rho(x) starts from `basic`; records ρ's
    backbone just before and just after the initialisation, and the epoch it happened in."""
    seen: dict = {}
    orig = DiffMICModule.init_encoder_from_checkpoint

    def spy(self):
        enc = self.model.image_embedding.encoder
        seen["before"] = {k: v.clone() for k, v in enc.state_dict().items()}
        orig(self)
        seen["after"] = {k: v.clone() for k, v in enc.state_dict().items()}
        seen["epoch"] = self.current_epoch

    run = tmp_path_factory.mktemp("full") / "run"
    mp = pytest.MonkeyPatch()
    mp.setattr(DiffMICModule, "init_encoder_from_checkpoint", spy)
    try:
        assert main(fit_args(data, run, FROM, f"train.init_encoder_from={basic}", warmup=1, epochs=1)) == 0
    finally:
        mp.undo()
    return {"run": run, **seen}


def test_rho_starts_from_the_basic_backbone_at_the_joint_phase(basic, full):
    src = _encoder_weights(read_checkpoint(basic / "checkpoints" / "best.ckpt"), "model.encoder.")
    assert full["epoch"] == 1  # after the DCG warm-up epoch 0
    assert set(full["after"]) == set(src) and len(src) > 10
    for k, v in src.items():
        assert torch.equal(full["after"][k], v), k
    differ = [k for k, v in src.items() if v.is_floating_point() and not torch.equal(full["before"][k], v)]
    assert len(differ) > len(src) // 2  # the fresh initialisation was something else
    last = read_checkpoint(full["run"] / "checkpoints" / "last.ckpt")
    assert bool(last["state_dict"]["encoder_from_dcg_done"])  # the flag a resume reads


def test_a_ckpt_file_works_like_its_run_folder(tmp_path, basic):
    from diffmic.nn.encoders import create_encoder
    from diffmic.training.checkpoint import encoder_init_state

    target = create_encoder("resnet10_tiny")
    a = encoder_init_state(basic, target, "resnet10_tiny")
    b = encoder_init_state(basic / "checkpoints" / "best.ckpt", target, "resnet10_tiny")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_does_not_reinitialise_rho(tmp_path, basic, full, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(full["run"], run)
    moved = basic.with_name("basic_moved")
    basic.rename(moved)  # a re-initialisation would fail: the source is gone
    epoch = read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"]
    calls = []
    monkeypatch.setattr(DiffMICModule, "init_encoder_from_checkpoint", lambda self: calls.append(1))
    try:
        assert main(["fit", "--run", str(run), "--resume", "train.epochs=2"]) == 0
    finally:
        moved.rename(basic)
    assert calls == []
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["epoch"] == epoch + 1  # one more joint epoch ran


def test_resume_within_the_warmup_reads_the_source_at_the_joint_phase(tmp_path, data, basic):
    """A checkpoint saved during the DCG warm-up has no initialised rho(x): the resumed run reads
    the source when its joint phase starts, and rho(x) equals the basic backbone then."""
    run = tmp_path / "run"
    assert main(fit_args(data, run, FROM, f"train.init_encoder_from={basic}", warmup=1, epochs=0)) == 0
    assert not bool(read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]["encoder_from_dcg_done"])
    seen: dict = {}
    orig = DiffMICModule.init_encoder_from_checkpoint

    def spy(self):
        orig(self)
        seen["after"] = {k: v.clone() for k, v in self.model.image_embedding.encoder.state_dict().items()}

    mp = pytest.MonkeyPatch()
    mp.setattr(DiffMICModule, "init_encoder_from_checkpoint", spy)
    try:
        assert main(["fit", "--run", str(run), "--resume", "train.epochs=1"]) == 0
    finally:
        mp.undo()
    src = _encoder_weights(read_checkpoint(basic / "checkpoints" / "best.ckpt"), "model.encoder.")
    assert set(seen["after"]) == set(src)
    for k, v in src.items():
        assert torch.equal(seen["after"][k], v), k
    assert bool(read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]["encoder_from_dcg_done"])


def _fails(capsys, args, *expected: str) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for e in expected:
        assert e in err, err
    return err


def test_bad_sources_are_clear_errors_before_anything_is_written(tmp_path, data, basic, capsys):
    run = tmp_path / "run"
    missing = tmp_path / "nowhere"
    _fails(capsys, fit_args(data, run, FROM, f"train.init_encoder_from={missing}"), str(missing), "does not exist")
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    shutil.copy(basic / "checkpoints" / "best.ckpt", unfinished / "checkpoints" / "best.ckpt")
    _fails(capsys, fit_args(data, run, FROM, f"train.init_encoder_from={unfinished}"), "has not finished training")
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    _fails(capsys, fit_args(data, run, FROM, f"train.init_encoder_from={text}"), str(text), "is not a checkpoint")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"lr": 1}}, other)
    _fails(capsys, fit_args(data, run, FROM, f"train.init_encoder_from={other}"), str(other), "not of diffmic")
    # a wider backbone (resnet10, width 64) than the source's resnet10_tiny (width 16)
    err = _fails(
        capsys,
        fit_args(data, run, FROM, f"train.init_encoder_from={basic}", "model.encoder=resnet10"),
        "does not fit this run's rho(x) encoder (resnet10)",
        "the backbone (resnet10_tiny) of a 'basic' run",
    )
    assert "in the file" in err
    assert not run.exists()  # every failure came before the run folder was written


def test_config_rules():
    over = ["model.variant=full", "train.init_encoder_from=runs/x"]
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config("cpu_v1", over)  # the CPU preset has init_encoder_from_dcg=true
    with pytest.raises(ConfigError, match="needs a diffusion variant"):
        load_config("cpu_v1", [*over, FROM, "model.variant=basic"])
    assert load_config("cpu_v1", [*over, FROM]).train.init_encoder_from == "runs/x"
    assert load_config("cpu_v1").train.init_encoder_from is None


def test_source_check_builds_the_encoder_the_run_builds(monkeypatch):
    """The key/shape check of train.init_encoder_from compares against rho(x) as build_model makes it,
    timm kwargs and the automatic img_size included (a ViT's position table depends on them)."""
    import diffmic.training.checkpoint as ckpt_mod
    from diffmic.training.module import build_model
    from diffmic.training.run import _read_encoder_init

    cfg = load_config(
        "cpu_v1",
        [
            "model.encoder=timm:vit_tiny_patch16_224",
            "model.encoder_kwargs={patch_size: 8}",
            "data.image_size=32",
            FROM,
            "train.init_encoder_from=/nonexistent/run",
        ],
    )
    seen = {}
    monkeypatch.setattr(ckpt_mod, "encoder_init_state", lambda src, target, name: seen.setdefault("t", target) and {})
    _read_encoder_init(cfg)
    want = build_model(cfg, 2).image_embedding.encoder.state_dict()
    got = seen["t"].state_dict()
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
