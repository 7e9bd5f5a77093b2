"""Configuration: the rules and choices each field declares (every rule tested here), choice sets
taken from the library, generic coercion from the dataclass field types, presets that compose
(``base:``), and the arguments the config gives each constructor."""

from __future__ import annotations

import re

import pytest
import yaml

import diffmic.config
from diffmic.cli import main
from diffmic.config import (
    CHOICES,
    RULES,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    read_preset,
    section_kwargs,
)

# One bad value per rule of config.RULES, and what the message must say. The first test checks
# that this table covers every rule, so a new rule without a test fails the suite.
BAD: dict[str, tuple[str, str]] = {
    "run.seed": ("-1", r"run.seed must be in \[0, 4294967295\], got -1"),
    # paths the operating system cannot open (ENAMETOOLONG): refused naming the key (issue 21.12)
    "run.dir": ("r" * 256, r"run.dir has a file or folder name of 256 bytes; names are limited to 255"),
    "data.root": ("/".join(["d" * 200] * 21), r"data.root is a path of 4220 bytes; paths are limited to 4095"),
    "data.cache_dir": ("c/" + "c" * 300, r"data.cache_dir has a file or folder name of 300 bytes"),
    "model.encoder_weights": ("w" * 256 + ".pt", r"model.encoder_weights has a file or folder name of 259"),
    "model.dcg_weights": ("w" * 256 + ".pt", r"model.dcg_weights has a file or folder name of 259"),
    "model.pretrained": ("p" * 256 + ".pt", r"model.pretrained has a file or folder name of 259"),
    "data.split": ("lesion ; data.dataset=folder", r"data.split needs lesion ids"),
    "data.test_fraction": ("1", r"data.test_fraction must be in \(0, 1\), got 1.0"),
    "data.image_size": ("4", r"data.image_size must be in \[8, 8192\], got 4"),
    "data.in_chans": ("2", r"data.in_chans must be one of 1, 3, got 2"),
    "data.batch_size": ("0", r"data.batch_size must be in \[1, 1000000\], got 0"),
    "data.eval_batch_size": ("0", r"data.eval_batch_size must be in \[1, 1000000\], got 0"),
    "data.num_workers": ("-2", r"data.num_workers must be in \[0, 1024\], got -2"),
    "data.val_fraction": ("1.5", r"data.val_fraction must be in \[0, 1\), got 1.5"),
    "data.rotation": ("400", r"data.rotation must be in \[0, 180\], got 400"),
    "data.subset": ("0", r"data.subset must be >= 1, got 0"),
    "data.class_balance": ("2", r"data.class_balance must be in \[0, 1\]"),
    "data.folds": ("1", r"data.folds must be 0 \(no cross-validation\) or a number of folds in \[2, 100\], got 1"),
    "data.fold": ("5 ; data.folds=5", r"data.fold must be in \[0, data.folds-1=4\] .*, got 5"),
    "train.logger": ("csv,neptune", r"train.logger must name one or more of csv, tensorboard, mlflow, wandb"),
    "model.encoder": ("resnet81", r"model.encoder is not a known backbone \(did you mean 'resnet18'\?\)"),
    "model.dcg_global": ("tv:resnet999", r"model.dcg_global is not a torchvision model"),
    "model.dcg_local": ("timm:not_a_net", r"model.dcg_local is not a timm model"),
    "model.hidden_dim": ("0", r"model.hidden_dim must be in \[1, 1000000\], got 0"),
    "model.num_layers": ("0", r"model.num_layers must be in \[1, 1000\]"),
    "model.num_rois": ("0", r"model.num_rois must be in \[1, 100000\]"),
    "model.crop_size": ("500", r"model.crop_size must be in \[1, data.image_size=64\]"),
    "diffusion.num_timesteps": ("0", r"diffusion.num_timesteps must be in \[1, 1000000\]"),
    "diffusion.beta_start": ("0", r"diffusion.beta_start must be in \(0, 1\)"),
    "diffusion.beta_end": ("1.5", r"diffusion.beta_end must be in \(0, 1\)"),
    "loss.mmd_weight": ("-0.5", r"loss.mmd_weight must be in \[0, 1000000\]"),
    "loss.mmd_bandwidth": ("[1.0, -2]", r"loss.mmd_bandwidth must be null \(C\^2\), a number > 0"),
    "train.epochs": ("-1", r"train.epochs must be in \[0, 10000000\], got -1"),
    "train.dcg_warmup_epochs": ("-3", r"train.dcg_warmup_epochs must be in \[0, 10000000\]"),
    "train.lr": ("0", r"train.lr must be in \(0, 10\], got 0.0"),
    "train.lr_warmup_epochs": ("-1", r"train.lr_warmup_epochs must be >= 0"),
    "train.min_lr": ("1", r"train.min_lr must be in \[0, train.lr=0.001\], got 1.0"),
    "train.dcg_lr": ("100", r"train.dcg_lr must be in \(0, 10\]"),
    "train.dcg_warmup_lr": ("-1", r"train.dcg_warmup_lr must be in \(0, 10\], got -1"),
    "train.grad_clip": ("-1", r"train.grad_clip must be >= 0"),
    "train.accumulate_grad_batches": ("0", r"train.accumulate_grad_batches must be in \[1, 10000\], got 0"),
    "train.early_stop_patience": ("0", r"train.early_stop_patience must be in \[1, 1000000\], got 0"),
    "train.early_stop_min_delta": ("-0.1", r"train.early_stop_min_delta must be in \[0, 1\], got -0.1"),
    "train.ema_decay": ("1.5", r"train.ema_decay must be in \[0, 1\]"),
    "train.encoder_lr_scale": ("-1", r"train.encoder_lr_scale must be in \[0, 1000\]"),
    "train.init_encoder_from": (
        "runs/x",
        r"train.init_encoder_from and train.init_encoder_from_dcg exclude each other",
    ),
    "train.noise_samples_per_image": ("0", r"train.noise_samples_per_image must be in \[1, 100000\]"),
    "train.prior_swap": ("1", r"train.prior_swap must be in \[0, 1\)"),
    "train.precision": ("31-true", r"train.precision is not a Lightning precision: use one of .*32-true"),
    "train.accelerator": ("gpuu", r"train.accelerator is not a Lightning accelerator: use one of auto, gpu"),
    "train.devices": ("0", r"train.devices must be a count >= 1, -1 \(all\), 'auto'"),
    "train.strategy": ("dpp", r"train.strategy is not a Lightning strategy: use one of auto, ddp"),
    "train.num_nodes": ("0", r"train.num_nodes must be >= 1"),
    "train.check_val_every_n_epoch": ("0", r"train.check_val_every_n_epoch must be >= 1"),
    "train.checkpoint_every_n_steps": ("0", r"train.checkpoint_every_n_steps must be >= 1"),
    "train.limit_train_batches": ("1.5", r"train.limit_train_batches must be a number of batches >= 1 or a fraction"),
    "train.limit_val_batches": ("0", r"train.limit_val_batches must be a number of batches >= 1"),
    "train.log_every_n_steps": ("0", r"train.log_every_n_steps must be >= 1"),
    "eval.steps": ("5000", r"eval.steps must be in \[1, diffusion.num_timesteps=100\], got 5000"),
    "eval.val_steps": ("101", r"eval.val_steps must be in \[1, diffusion.num_timesteps=100\], got 101"),
    "eval.eta": ("2", r"eval.eta must be in \[0, 1\], got 2.0"),
    "eval.num_samples": ("0", r"eval.num_samples must be in \[1, 1000000\]"),
    "eval.point_steps": ("-1", r"eval.point_steps must be in \[0, 100000\]"),
    "eval.temperature": ("0", r"eval.temperature must be in \(0, 1000000\], got 0.0"),
    "eval.sample_seed": ("-5", r"eval.sample_seed must be in \[0, 4294967295\]"),
    "eval.refer_threshold": ("1.2", r"eval.refer_threshold must be in \[0, 1\]"),
    "model.encoder_kwargs": ("{patch_size: 8}", r"model.encoder_kwargs only applies to timm encoders"),
    "model.dcg_output_stride": ("4", r"model.dcg_output_stride must be one of 8, 16, 32, got 4"),
    "model.freeze_stride": ("32", r"model.freeze_stride must be one of 0, 2, 4, 8, 16, got 32"),
    "train.prior_folds": ("3 ; model.variant=basic", r"train.prior_folds needs a variant whose denoiser takes"),
    "train.prior_split": ("0.5 ; train.prior_folds=2", r"train.prior_split and train.prior_folds exclude each other"),
    "eval.prior_source": ("folds", r"eval.prior_source folds needs a model trained with train.prior_folds >= 2"),
    "train.joint_steps": ("-1", r"train.joint_steps must be in \[0, 1000000000\], got -1"),
    "train.dcg_warmup_steps": ("-5", r"train.dcg_warmup_steps must be in \[0, 1000000000\], got -5"),
    "eval.t_start": ("3 ; eval.steps=10", r"eval.t_start must be >= eval.steps-1=9"),
    "eval.refer_max_fraction": ("1.5", r"eval.refer_max_fraction must be in \[0, 1\], got 1.5"),
    "eval.refer_target_accuracy": ("0", r"eval.refer_target_accuracy must be in \(0, 1\]"),
    "eval.conformal_level": ("1", r"eval.conformal_level must be in \(0, 1\), got 1.0"),
    "eval.raps_lambda": ("-0.1", r"eval.raps_lambda must be in \[0, 100\], got -0.1"),
    "eval.raps_k_reg": ("-1", r"eval.raps_k_reg must be in \[0, 100000\], got -1"),
    "eval.bootstrap_resamples": ("-1", r"eval.bootstrap_resamples must be in \[0, 1000000\]"),
    "eval.ood_score": (
        "spread ; eval.num_samples=1",
        r"eval.ood_score cannot be used: spread needs K >= 2 reverse samples .*, got spread",
    ),
    "eval.ood_false_flag_rate": ("1", r"eval.ood_false_flag_rate must be in \(0, 1\), got 1.0"),
}


def test_every_rule_has_a_test_and_names_a_real_key():
    keys = [k for k, _ in RULES]
    assert set(keys) == set(BAD)
    assert set(keys) <= {f"{sec}.{k}" for sec, body in Config().to_dict().items() for k in body}


@pytest.mark.parametrize("key", sorted(BAD))
def test_rule_rejects_a_bad_value_and_names_the_key(key):
    value, expected = BAD[key]
    value, *context = value.split(" ; ")  # other keys the rule needs to be broken
    with pytest.raises(ConfigError, match=expected):
        load_config("cpu_v1", [f"{key}={value}", *context])


@pytest.mark.parametrize(
    "key, value",
    [
        ("train.precision", "bf16-mixed"),
        ("train.precision", "16"),
        ("train.accelerator", "cpu"),
        ("train.devices", "2"),
        ("train.devices", "0,1"),
        ("train.devices", "-1"),
        ("train.strategy", "ddp"),
        ("model.encoder", "tv:resnet18"),
        ("model.encoder", "timm:resnet10t"),
        ("train.limit_train_batches", "0.5"),
        ("train.limit_train_batches", "3"),
        ("loss.mmd_bandwidth", "[0.5, 2]"),
        ("eval.steps", "100"),
        ("train.min_lr", "0.001"),
        ("model.crop_size", "64"),
        ("train.accumulate_grad_batches", "4"),
        ("train.early_stop_patience", "3"),
    ],
)
def test_rule_accepts_valid_values(key, value):
    load_config("cpu_v1", [f"{key}={value}"])


@pytest.mark.parametrize("value", ["nan", ".nan", "inf", "-.inf"])
def test_non_finite_numbers_are_refused_for_every_float(value):
    for key in ("train.lr", "eval.temperature", "data.rotation", "loss.mmd_weight"):
        with pytest.raises(ConfigError, match=rf"{key}: expected a finite number"):
            load_config("cpu_v1", [f"{key}={value}"])
    with pytest.raises(ConfigError, match=r"loss.mmd_bandwidth\[1\]: expected a finite number"):
        load_config("cpu_v1", [f"loss.mmd_bandwidth=[1, {value}]"])


def test_every_shipped_preset_and_the_defaults_pass_the_rules():
    from diffmic.config import preset_dir

    load_config(None)
    for p in preset_dir().glob("*.yaml"):
        load_config(p.stem)


def test_bad_value_on_the_command_line_exits_2_without_traceback(capsys):
    for over, key in (
        ("eval.temperature=0", "eval.temperature"),
        ("model.encoder=resnet81", "model.encoder"),
        ("train.precision=31", "train.precision"),
        ("train.lr=nan", "train.lr"),
    ):
        assert main(["fit", "--config", "cpu_v1", over]) == 2
        err = capsys.readouterr().err
        assert key in err and "Traceback" not in err, err


def test_config_path_that_is_a_folder_is_a_clear_error(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    assert main(["fit", "--config", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    # a folder that happens to share a preset's name does not hide the preset
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cpu").mkdir()
    assert load_config("cpu_v1").data.image_size == 64


# ----------------------------------------------------------------------------- one source of truth
def test_choice_sets_are_the_librarys_own_constants():
    from diffmic.data.sources import DATASETS, SPLITS
    from diffmic.diffusion.process import PRIOR_KINDS
    from diffmic.diffusion.samplers import DDIM_STARTS, SAMPLERS
    from diffmic.diffusion.schedule import BETA_SCHEDULES
    from diffmic.losses import GUIDANCE_CE_MODES
    from diffmic.metrics import AGGREGATES, SCALAR_METRICS
    from diffmic.nn.diffmic import ALL_VARIANTS, DENOISER_INPUTS
    from diffmic.nn.guidance import ROI_CHANNELS, ROI_SELECT
    from diffmic.trust.calibration import CALIBRATORS
    from diffmic.trust.conformal import CONFORMAL_METHODS
    from diffmic.trust.ood import OOD_SCORES

    same = {
        "data.dataset": DATASETS,
        "data.split": SPLITS,
        "model.variant": ALL_VARIANTS,
        "model.roi_select": ROI_SELECT,
        "model.prior": PRIOR_KINDS,
        "model.roi_channels": ROI_CHANNELS,
        "model.denoiser_input": DENOISER_INPUTS,
        "diffusion.schedule": BETA_SCHEDULES,
        "loss.dcg_ce": GUIDANCE_CE_MODES,
        "train.monitor": SCALAR_METRICS,
        "eval.sampler": SAMPLERS,
        "eval.val_sampler": SAMPLERS,
        "eval.start": DDIM_STARTS,
        "eval.aggregate": AGGREGATES,
        "eval.calibrator": CALIBRATORS,
        "eval.conformal_method": CONFORMAL_METHODS,
        "eval.ood_score": OOD_SCORES,
    }
    for key, const in same.items():
        assert CHOICES[key] is const, key
    with pytest.raises(ConfigError, match=r"model.variant: 'huge' is not one of basic, C1, C2, full, dcg"):
        load_config("cpu_v1", ["model.variant=huge"])


def test_cli_and_data_layer_share_the_image_suffixes(tmp_path, capsys):
    """A .gif (accepted by the data layer) is also found by `predict` in a folder; the error for
    an empty folder lists the same suffixes."""
    from diffmic.cli import _expand_inputs
    from diffmic.data.sources import IMAGE_EXTENSIONS

    (tmp_path / "a.gif").write_bytes(b"GIF89a")
    (tmp_path / "notes.txt").write_text("x")
    images, _ = _expand_inputs([str(tmp_path)])
    assert [p.name for p in images] == ["a.gif"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as exc:
        _expand_inputs([str(empty)])
    assert all(s in str(exc.value) for s in IMAGE_EXTENSIONS)


def test_coercion_follows_the_field_types():
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.lr=1e-2",
            "data.subset=",
            "train.use_ema=no",
            "train.devices=2",
            "train.limit_train_batches=0.25",
            "run.dir=123",
        ],
    )
    assert cfg.train.epochs == 3 and isinstance(cfg.train.lr, float) and cfg.train.lr == 0.01
    assert cfg.data.subset is None and cfg.train.use_ema is False
    assert cfg.train.devices == 2 and cfg.train.limit_train_batches == 0.25 and cfg.run.dir == "123"
    n = load_config(None, ["train.limit_train_batches=2"]).train.limit_train_batches
    assert n == 2 and type(n) is int  # Union[int, float]: an int stays a batch count
    with pytest.raises(ConfigError, match=r"train.epochs: expected an integer, got 2.5"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match=r"data.image_size: expected an integer, got True"):
        load_config(None, ["data.image_size=true"])


def test_section_kwargs_maps_fields_by_name():
    def build(variant, hidden_dim, num_timesteps=1, other=0):
        return variant, hidden_dim, num_timesteps, other

    cfg = load_config("cpu_v1")
    kw = section_kwargs(build, cfg.model, num_timesteps=7)
    assert kw == {"variant": "full", "hidden_dim": 512, "num_timesteps": 7}


def test_the_data_module_gets_every_data_key_and_the_run_seed():
    """datamodule_kwargs passes each data.* field under its own name (a field the data module does not
    take would be a TypeError, not a silently dropped key); the protocol of train.select_on picks
    the split validation runs on."""
    import dataclasses
    import inspect

    from diffmic.config import datamodule_kwargs
    from diffmic.data.datamodule import DiffMICDataModule

    cfg = load_config("cpu_v1", ["data.rotation=12.5", "run.seed=77", "train.select_on=test"])
    kw = datamodule_kwargs(cfg)
    params = inspect.signature(DiffMICDataModule).parameters
    assert set(kw) <= set(params)
    assert {f.name for f in dataclasses.fields(cfg.data)} <= set(kw)
    assert (kw["rotation"], kw["seed"], kw["val_split"]) == (12.5, 77, "test")
    assert datamodule_kwargs(load_config("cpu_v1"))["val_split"] == "val"


@pytest.mark.parametrize("variant, warmup", [("full", 3), ("C2", 3), ("dcg", 3), ("C1", 0), ("basic", 0)])
def test_the_trainer_runs_the_warm_up_only_for_variants_with_a_dcg(variant, warmup):
    import inspect

    import lightning.pytorch as pl

    from diffmic.config import trainer_kwargs

    over = [f"model.variant={variant}", "train.epochs=5", "train.dcg_warmup_epochs=3", "train.log_every_n_steps=7"]
    kw = trainer_kwargs(load_config("cpu_v1", over))
    assert set(kw) <= set(inspect.signature(pl.Trainer).parameters)
    assert kw["max_epochs"] == 5 + warmup and kw["log_every_n_steps"] == 7
    assert "accumulate_grad_batches" not in kw  # manual optimisation accumulates itself


def test_each_choice_key_is_refused_with_its_declared_choices():
    """The choices a field declares are the ones the error lists (the only list of them)."""
    import dataclasses

    for sec, sec_type in ((s, type(getattr(Config(), s))) for s in Config().to_dict()):
        for f in dataclasses.fields(sec_type):
            if "choices" not in f.metadata:
                continue
            key = f"{sec}.{f.name}"
            assert CHOICES[key] is f.metadata["choices"]
            listed = re.escape(", ".join(f.metadata["choices"]))
            with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: 'bogus' is not one of {listed}$"):
                load_config(None, [f"{key}=bogus"])


# ------------------------------------------------------------------------------------ presets
def test_presets_compose_with_base(tmp_path):
    """Every derived preset holds only what differs from its base, and loads to base + those keys."""
    from diffmic.config import _merge

    for child, base in (("demo_cpu", "cpu"), ("breastmnist", "cpu"), ("cpu_v1", "cpu"), ("cpu_steps", "cpu_v1")):
        own = yaml.safe_load((diffmic.config.preset_dir() / f"{child}.yaml").read_text())
        assert own.pop("base") == base
        parent = load_config(base).to_dict()
        redundant = {(s, k) for s, body in own.items() for k, v in body.items() if parent[s][k] == v}
        assert not redundant, f"{child}.yaml repeats {sorted(redundant)} of {base}"
        assert load_config(child).to_dict() == config_from_dict(_merge(parent, own)).to_dict()
    assert load_config("demo_cpu").run.dir == "runs/demo"
    raw = read_preset("breastmnist")
    assert "base" not in raw and raw["model"]["dcg_local"] == "efficientnet_lite0"  # inherited from cpu

    # a user's file with a chain of bases, relative to the file; later files win
    (tmp_path / "mine.yaml").write_text("base: cpu\ntrain:\n  epochs: 7\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\neval:\n  num_samples: 2\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.lr=0.002"])
    assert (cfg.train.epochs, cfg.eval.num_samples, cfg.train.lr, cfg.data.image_size) == (7, 2, 0.002, 128)


def test_preset_base_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="form a cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nope\n")
    with pytest.raises(ConfigError, match="config file 'nope' not found"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("base: [cpu]\n")
    with pytest.raises(ConfigError, match="'base' must name a preset"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "e.yaml").write_text("base: cpu\ntrian:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'. Did you mean 'train'\?"):
        load_config(tmp_path / "e.yaml")


def test_saved_config_is_flat_and_reloads_identically(tmp_path):
    from diffmic.config import save_config

    cfg = load_config("breastmnist", ["model.denoiser_input=paper"])
    save_config(cfg, tmp_path / "c.yaml")
    assert "base" not in yaml.safe_load((tmp_path / "c.yaml").read_text())
    assert load_config(tmp_path / "c.yaml") == cfg
