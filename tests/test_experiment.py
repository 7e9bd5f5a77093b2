"""The experiment runner (grid -> run folders -> one table), its statistics, step budgets, the
`dcg` variant and the DCG output stride. Tiny generated data, tiny models."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from diffmic.cli import main
from diffmic.config import ConfigError, load_config
from diffmic.experiment import load_grid, metric_fn, paired_bootstrap, read_predictions
from diffmic.nn.diffmic import DiffMIC
from diffmic.nn.encoders import create_encoder
from diffmic.nn.guidance import set_output_stride
from diffmic.training.budget import apply_step_budget, epochs_for_steps

from _helpers import TINY_MODEL, cli_output  # noqa: E402
from conftest import write_synthetic_npz

# ---------------------------------------------------------------------------------------------- statistics


def _onehot(pred, C=2):
    return np.eye(C)[np.asarray(pred)] * 0.8 + 0.1


def test_paired_bootstrap_matches_binomial_quantiles():
    # A is right on every image; B is wrong on 30 of 100 and right on the rest. The paired
    # difference of accuracy is the mean of d_i in {0, 1} with 30 ones: the bootstrap distribution
    # is Binomial(100, 0.3) / 100, whose 2.5 % / 97.5 % quantiles are 0.21 / 0.39.
    y = np.zeros(100, dtype=int)
    pred_b = np.zeros(100, dtype=int)
    pred_b[:30] = 1
    obs, lo, hi = paired_bootstrap(y, _onehot(y), _onehot(pred_b), "acc", n_boot=4000, seed=1)
    assert obs == pytest.approx(0.3)
    q_lo, q_hi = stats.binom.ppf([0.025, 0.975], 100, 0.3) / 100
    assert (q_lo, q_hi) == pytest.approx((0.21, 0.39))
    assert lo == pytest.approx(q_lo, abs=0.015) and hi == pytest.approx(q_hi, abs=0.015)


def test_paired_bootstrap_identical_models_give_zero_interval():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 50)
    p = rng.dirichlet(np.ones(3), 50)
    assert paired_bootstrap(y, p, p, "f1", n_boot=200) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="same images"):
        paired_bootstrap(np.zeros(4, int), np.ones((4, 2)) / 2, np.ones((5, 2)) / 2)


def test_ece_hand_worked():
    # two images at confidence 0.9 in one bin, one right and one wrong: |0.5 - 0.9| = 0.4;
    # plus two at confidence 0.6, both right, in another bin: |1 - 0.6| = 0.4 -> ECE 0.4
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    ece = metric_fn("ece", 2)  # the experiment table's ECE: 15 bins
    assert ece(torch.as_tensor(probs), torch.as_tensor(labels)) == pytest.approx(0.4, abs=1e-6)
    labels2 = np.array([0, 0, 1, 1])  # 0.9 bin: |1 - 0.9| = 0.1, 0.6 bin: 0.4 -> mean 0.25
    assert ece(torch.as_tensor(probs), torch.as_tensor(labels2)) == pytest.approx(0.25, abs=1e-6)


# ---------------------------------------------------------------------------------------------- budgets


def test_epochs_for_steps_rounds_up_to_whole_epochs():
    assert epochs_for_steps(90, 546, 64) == 10  # 9 steps per epoch
    assert epochs_for_steps(91, 546, 64) == 11
    assert epochs_for_steps(1, 10_000, 64) == 1
    assert epochs_for_steps(0, 546, 64) == 0
    with pytest.raises(ConfigError):
        epochs_for_steps(-1, 546, 64)


def test_apply_step_budget_sets_epochs_from_the_data_size():
    cfg = load_config("cpu_v1", ["train.joint_steps=1000", "train.dcg_warmup_steps=200", "data.batch_size=64"])
    info = apply_step_budget(cfg, 546)
    assert (cfg.train.epochs, cfg.train.dcg_warmup_epochs) == (112, 23)  # ceil(1000/9), ceil(200/9)
    assert info["steps_per_epoch"] == 9
    big = load_config("cpu_v1", ["train.joint_steps=1000"])
    apply_step_budget(big, 7011)  # 110 steps per epoch
    assert big.train.epochs == 10 and big.train.dcg_warmup_epochs == 10  # warm-up untouched
    plain = load_config("cpu_v1")
    assert apply_step_budget(plain, 546) == {} and plain.train.epochs == 3


def test_equal_budget_gives_every_variant_the_same_steps():
    """basic / C1 have no DCG warm-up: by default they train for its length too, so a preset gives
    every variant the same optimiser steps (the issue-22 table: basic got 24 steps where full got 130)."""
    over = ["train.joint_steps=null", "train.dcg_warmup_steps=null", "train.epochs=3", "train.dcg_warmup_epochs=10"]
    full = load_config("cpu", ["model.variant=full", *over])
    basic = load_config("cpu", ["model.variant=basic", *over])
    apply_step_budget(full, 546)
    apply_step_budget(basic, 546)
    assert (full.train.epochs, full.train.dcg_warmup_epochs) == (3, 10)
    assert (basic.train.epochs, basic.train.dcg_warmup_epochs) == (13, 0)
    assert apply_step_budget(basic, 546) == {} and basic.train.epochs == 13  # a resume changes nothing
    # step budgets add up: 400 + 1000 steps at 9 steps per epoch = ceil(1400 / 9) epochs
    steps = ["train.joint_steps=400", "train.dcg_warmup_steps=1000", "data.batch_size=64"]
    c1 = load_config("cpu", ["model.variant=C1", *steps])
    apply_step_budget(c1, 546)
    assert (c1.train.epochs, c1.train.dcg_warmup_epochs) == (156, 0)
    again = apply_step_budget(c1, 546)
    assert (c1.train.epochs, c1.train.dcg_warmup_epochs) == (156, 0) and again["epochs"] == 156
    dcg = load_config("cpu", ["model.variant=dcg", *steps])
    apply_step_budget(dcg, 546)
    assert (dcg.train.epochs, dcg.train.dcg_warmup_epochs) == (45, 112)  # DCG variants keep their stages
    old = load_config("cpu", ["model.variant=basic", "train.equal_budget=false", *over])
    apply_step_budget(old, 546)
    assert (old.train.epochs, old.train.dcg_warmup_epochs) == (3, 10)  # the earlier rule, by a switch


def test_step_budget_counts_optimiser_steps_under_gradient_accumulation():
    """train.accumulate_grad_batches = N steps the optimisers once per N batches (a last, shorter
    window steps too), so a step budget needs about N times more epochs."""
    from diffmic.training.budget import steps_per_epoch

    assert [steps_per_epoch(7 * 16, 16, n) for n in (1, 2, 3, 7, 8)] == [7, 4, 3, 1, 1]
    one = load_config("cpu", ["train.joint_steps=400", "train.dcg_warmup_steps=1000", "data.batch_size=64"])
    two = load_config(
        "cpu",
        [
            "train.joint_steps=400",
            "train.dcg_warmup_steps=1000",
            "data.batch_size=64",
            "train.accumulate_grad_batches=2",
        ],
    )
    apply_step_budget(one, 546)  # 9 batches per epoch: 9 steps, or 5 with N = 2
    info = apply_step_budget(two, 546)
    assert (one.train.epochs, one.train.dcg_warmup_epochs) == (45, 112)  # ceil(400/9), ceil(1000/9)
    assert (two.train.epochs, two.train.dcg_warmup_epochs) == (80, 200) and info["steps_per_epoch"] == 5


# ---------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize(
    "name,os_,hw",
    [("resnet18", 32, 2), ("resnet18", 16, 4), ("resnet18", 8, 8), ("resnet50", 8, 8), ("resnet10_tiny", 8, 8)],
)
def test_output_stride_gives_finer_maps_with_the_same_weights(name, os_, hw):
    ref = create_encoder(name, spatial=True)
    enc = set_output_stride(create_encoder(name, spatial=True), os_)
    assert {k: v.shape for k, v in enc.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    enc.eval()
    with torch.no_grad():
        assert tuple(enc(torch.zeros(1, 3, 64, 64)).shape[-2:]) == (hw, hw)


def test_output_stride_rejects_bad_values():
    with pytest.raises(ValueError, match="8, 16 or 32"):
        set_output_stride(create_encoder("resnet10_tiny", spatial=True), 4)
    with pytest.raises(ConfigError, match="dcg_output_stride"):
        load_config("cpu_v1", ["model.dcg_output_stride=4"])


def test_dcg_variant_predicts_with_the_fused_logits():
    torch.manual_seed(0)
    m = DiffMIC(
        3, variant="dcg", dcg_global="resnet10_tiny", dcg_local="resnet10_tiny", crop_size=8, dcg_output_stride=8
    ).eval()
    assert m.image_embedding is None and m.denoiser is None and not m.uses_diffusion and m.uses_dcg
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        g = m.dcg(x)
        assert torch.equal(m.classify(x), g.z_fused)
        assert torch.allclose(torch.softmax(m.classify(x), -1), m.priors(g, 2).fused, atol=1e-6)
    assert tuple(g.saliency.shape[-2:]) == (4, 4)


# ---------------------------------------------------------------------------------------------- the grid


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """A MedMNIST-layout file: 2 classes (dark / bright squares on noise), 28 x 28 grey."""
    splits = {"train": 32, "val": 12, "test": 16}
    npz = tmp_path_factory.mktemp("npz") / "tiny.npz"
    return write_synthetic_npz(npz, splits, order="cycle", background=45.0, contrast=60.0)


def _grid(tmp, npz, models: dict) -> str:
    common = [
        "data.image_size=32",
        "data.batch_size=16",
        "model.crop_size=8",
        *TINY_MODEL,
        f"data.cache_dir={tmp / 'cache'}",
        "eval.num_samples=2",
        "model.dcg_output_stride=8",
    ]
    doc = {
        "out": str(tmp / "exp"),
        "reference": "basic",
        "seeds": [1, 2],
        "common": common,
        "datasets": {"tiny": {"config": "cpu_v1", "overrides": ["data.dataset=medmnist", f"data.root={npz}"]}},
        "models": models,
    }
    path = tmp / "grid.yaml"
    import yaml

    path.write_text(yaml.safe_dump(doc))
    return str(path)


MODELS = {
    "basic": ["model.variant=basic", "train.joint_steps=4"],
    "dcg": ["model.variant=dcg", "train.dcg_warmup_steps=2", "train.joint_steps=2"],
    "full": {"overrides": ["model.variant=full", "train.dcg_warmup_steps=2", "train.joint_steps=2"], "seeds": [1]},
}


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory, tiny_npz):
    tmp = tmp_path_factory.mktemp("grid")
    path = _grid(tmp, tiny_npz, MODELS)
    assert main(["experiment", path, "--n-boot", "50"]) == 0
    return tmp, path


def test_grid_writes_one_run_folder_per_cell_and_a_table(grid_run):
    tmp, path = grid_run
    exp = tmp / "exp"
    cells = sorted(p.relative_to(exp).as_posix() for p in exp.glob("tiny/*/seed*"))
    assert cells == ["tiny/basic/seed1", "tiny/basic/seed2", "tiny/dcg/seed1", "tiny/dcg/seed2", "tiny/full/seed1"]
    # the step budget became epochs: 32 images at batch 16 = 2 steps per epoch
    cfg = load_config(exp / "tiny/dcg/seed1/config.yaml")
    assert (cfg.train.dcg_warmup_epochs, cfg.train.epochs, cfg.run.seed) == (1, 1, 1)
    assert json.loads((exp / "tiny/basic/seed2/fit_summary.json").read_text())["global_step"] == 4
    rows = {r["model"]: r for r in csv.DictReader(open(exp / "summary.csv"))}
    assert {m: int(r["n"]) for m, r in rows.items()} == {"basic": 2, "dcg": 2, "full": 1}
    assert (exp / "summary.md").read_text().count("| tiny |") == 3 and (exp / "summary.png").stat().st_size > 0
    # the table's numbers are the cells' own predictions, re-scored
    cells_rows = list(csv.DictReader(open(exp / "cells.csv")))
    accs = [float(r["acc"]) for r in cells_rows if r["model"] == "dcg"]
    pred = read_predictions(exp / "tiny/dcg/seed1/predictions.csv")
    assert accs[0] == pytest.approx(float((pred["probs"].argmax(1) == pred["labels"]).mean()), abs=1e-5)
    assert float(rows["dcg"]["acc"].split(" ± ")[0]) == pytest.approx(np.mean(accs), abs=1e-3)
    assert rows["basic"]["d_acc_vs_basic"] == "—" and rows["dcg"]["d_acc_vs_basic"].count("[") == 1
    assert rows["full"]["aurc_agreement"] != "—" and rows["basic"]["aurc_agreement"] == "—"
    # record.json: the table, each cell's metrics, config, split hash and times, small enough to commit
    rec = json.loads((exp / "record.json").read_text())
    assert rec["grid"] == path and [r["model"] for r in rec["summary"]] == ["basic", "dcg", "full"]
    byname = {(c["model"], c["seed"]): c for c in rec["cells"]}
    assert len(byname) == 5 and byname[("dcg", 1)]["acc"] == pytest.approx(accs[0], abs=1e-5)
    split = (exp / "tiny/dcg/seed1/split.json").read_bytes()
    assert byname[("dcg", 1)]["split_sha256"] == hashlib.sha256(split).hexdigest()
    assert byname[("dcg", 1)]["config"]["model"]["variant"] == "dcg"
    assert byname[("dcg", 1)]["fit"]["wall_time_s"] > 0 and byname[("dcg", 1)]["test"]["wall_time_s"] > 0
    assert (exp / "record.json").stat().st_size < 100_000


def test_grid_resumes_skipping_finished_cells(grid_run, capsys):
    tmp, path = grid_run
    exp = tmp / "exp"
    before = {p: p.stat().st_mtime_ns for p in exp.glob("tiny/*/seed*/test_metrics.json")}
    fit_mtime = (exp / "tiny/basic/seed1/fit_summary.json").stat().st_mtime_ns
    (exp / "tiny/basic/seed1/test_metrics.json").unlink()  # interrupted after fit, before test
    capsys.readouterr()
    assert main(["experiment", path, "--n-boot", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("skipped (finished)") == 4 and "tiny/basic/seed1: tested" in out
    assert (exp / "tiny/basic/seed1/fit_summary.json").stat().st_mtime_ns == fit_mtime  # not refitted
    for p, t in before.items():
        if "basic/seed1" not in str(p):
            assert p.stat().st_mtime_ns == t


def test_experiment_prints_no_lightning_chatter(tmp_path, tiny_npz):
    """`diffmic experiment` is as quiet as `diffmic fit` (tests/test_output.py): no GPU banner, tips,
    model summary or known warnings; `-v` brings them back."""
    path = _grid(
        tmp_path, tiny_npz, {"basic": {"overrides": ["model.variant=basic", "train.joint_steps=2"], "seeds": [1]}}
    )

    def run(*extra: str) -> str:
        return cli_output(*extra, "experiment", path, "--n-boot", "10")

    text = run()
    assert "tiny/basic/seed1: running" in text and "| tiny |" in text
    for noise in ("GPU available:", "Trainable params", "Experiment logs directory", "💡 Tip"):
        assert noise not in text, noise
    (Path(tmp_path) / "exp" / "tiny" / "basic" / "seed1" / "test_metrics.json").unlink()  # re-tested with -v
    assert "GPU available:" in run("-v")


def test_bad_grid_is_a_clear_error(tmp_path, tiny_npz, capsys):
    path = _grid(tmp_path, tiny_npz, {"basic": ["model.variant=basic", "train.epoch=3"]})
    assert main(["experiment", path]) == 2
    err = capsys.readouterr().err
    assert "tiny/basic/seed1" in err and "train.epoch" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="reference"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("out: x\nreference: nope\ndatasets: {a: {}}\nmodels: {m: []}\n")
        load_grid(bad)


def test_summary_only_does_not_train(tmp_path, tiny_npz, capsys):
    path = _grid(tmp_path, tiny_npz, {"basic": ["model.variant=basic"]})
    assert main(["experiment", path, "--summary-only"]) == 0
    assert not (tmp_path / "exp" / "tiny").exists()
    rows = list(csv.DictReader(open(tmp_path / "exp" / "summary.csv")))
    assert [(r["model"], r["n"], r["acc"]) for r in rows] == [("basic", "0", "—")]


def test_top_class_roi_selection_ranks_by_the_predicted_class_channel():
    # two classes on a 2x2 grid; class 1 has the larger mean saliency (the predicted class) and
    # peaks at cell (0, 0), class 0 at cell (1, 1)
    from diffmic.nn.guidance import DCG

    dcg = DCG(2, "resnet10_tiny", "resnet10_tiny", num_rois=1, crop_size=8, roi_select="top_class").eval()
    sal = torch.zeros(1, 2, 2, 2)
    sal[0, 1] = torch.tensor([[9.0, 5.0], [5.0, 5.0]])
    sal[0, 0] = torch.tensor([[0.0, 1.0], [1.0, 3.0]])
    dcg.global_stream = lambda x: (sal.mean(dim=(2, 3)), sal)
    out = dcg(torch.zeros(1, 3, 16, 16))
    assert out.roi_boxes[0, 0].tolist() == [0, 0, 8, 8]
    dcg.roi_select = "sum"  # released rule: rank by minmax(c0) + minmax(c1)
    sal[0, 1] = torch.tensor([[5.0, 9.0], [5.0, 5.0]])  # now c1 peaks at (0, 1): sums [[0, 4/3], [1/3, 1]]
    assert dcg(torch.zeros(1, 3, 16, 16)).roi_boxes[0, 0].tolist() == [0, 8, 8, 16]
    with pytest.raises(ValueError, match="roi_select"):
        DCG(2, "resnet10_tiny", "resnet10_tiny", roi_select="max")


# ------------------------------------------------------------------ placeholders in grid overrides
def test_substitute_replaces_the_cell_placeholders():
    from diffmic.experiment import substitute

    text = "train.init_encoder_from={out}/{dataset}/basic/seed{seed}"
    assert substitute(text, seed=3, dataset="ham", out=Path("runs/exp")) == (
        "train.init_encoder_from=runs/exp/ham/basic/seed3"
    )
    assert substitute("data.root=/data", seed=1, dataset="d", out="o") == "data.root=/data"  # untouched
    assert substitute("x={seed}{seed}", seed=7, dataset="d", out="o") == "x=77"
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \{sed\}; known: \{seed\}"):
        substitute("train.init_encoder_from={out}/basic/seed{sed}", seed=1, dataset="d", out="o")


def test_grid_cells_naming_another_cell_run_after_it(tmp_path, tiny_npz):
    src = "train.init_encoder_from={out}/{dataset}/basic/seed{seed}"
    models = {  # the dependent model first in the file, and with seeds of its own
        "from_basic": {"overrides": ["model.variant=full", "train.init_encoder_from_dcg=false", src], "seeds": [2]},
        "basic": ["model.variant=basic"],
    }
    grid = load_grid(_grid(tmp_path, tiny_npz, models))
    order = [f"{c.model}/seed{c.seed}" for c in grid.cells]
    assert order.index("basic/seed2") < order.index("from_basic/seed2")
    cell = next(c for c in grid.cells if c.model == "from_basic")
    assert f"train.init_encoder_from={tmp_path / 'exp' / 'tiny' / 'basic' / 'seed2'}" in cell.overrides
    cfg = load_config(cell.config, cell.overrides)
    assert cfg.train.init_encoder_from == str(tmp_path / "exp" / "tiny" / "basic" / "seed2")
    with pytest.raises(ConfigError, match=r"cell tiny/basic/seed1: override .*unknown placeholder\(s\) \{model\}"):
        load_grid(_grid(tmp_path, tiny_npz, {"basic": ["model.variant=basic", "data.root={model}"]}))


def test_grid_cell_whose_source_has_not_run_names_the_folder(tmp_path, tiny_npz, capsys):
    models = {
        "from_basic": [
            "model.variant=full",
            "train.init_encoder_from_dcg=false",
            "train.init_encoder_from={out}/{dataset}/basic/seed{seed}",
        ],
        "basic": ["model.variant=basic"],
    }
    path = _grid(tmp_path, tiny_npz, models)
    assert main(["experiment", path, "--only", "from_basic"]) == 2  # basic left out: never run
    err = capsys.readouterr().err
    assert str(tmp_path / "exp" / "tiny" / "basic" / "seed1") in err and "does not exist" in err
    assert "Traceback" not in err


# ------------------------------------------------ issue 21.10: grid names and seeds are checked
@pytest.mark.parametrize(
    "models, seeds, match",
    [
        ({"basic": ["model.variant=basic"]}, [1, 1], r"seeds: seed 1 is listed twice"),
        ({"basic": {"overrides": ["model.variant=basic"], "seeds": [3, 2, 3]}}, [1], r"models.basic.seeds: seed 3"),
        ({"../../x": ["model.variant=basic"]}, [1], r"model name '\.\./\.\./x'"),
        ({"/tmp/x": ["model.variant=basic"]}, [1], r"model name '/tmp/x'"),
        ({"basic": ["model.variant=basic"], "./basic": ["model.variant=basic"]}, [1], r"'\./basic'.*'basic'"),
        (
            {"basic": ["model.variant=basic"], "Basic": ["model.variant=basic"]},
            [1],
            r"names '(basic|Basic)' and '(Basic|basic)' name the same",
        ),
        ({"a|b": ["model.variant=basic"]}, [1], r"model name 'a\|b'"),
        ({"": ["model.variant=basic"]}, [1], r"model name ''"),
        ({"..": ["model.variant=basic"]}, [1], r"model name '\.\.'"),
    ],
)
def test_grid_names_and_seeds_are_validated(tmp_path, tiny_npz, models, seeds, match):
    import yaml

    path = Path(_grid(tmp_path, tiny_npz, models))
    doc = yaml.safe_load(path.read_text())
    doc["seeds"] = seeds
    doc["reference"] = None
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=match):
        load_grid(path)
    assert not (tmp_path / "exp").exists() and not (tmp_path / "x").exists()


def test_grid_dataset_names_and_repeated_keys_are_validated(tmp_path, tiny_npz):
    path = Path(_grid(tmp_path, tiny_npz, {"basic": ["model.variant=basic"]}))
    text = path.read_text()
    for bad, match in (
        ("../up", r"data set name '\.\./up'"),
        ("summary.csv", r"data set name 'summary.csv'.*summary table"),
    ):
        assert "\n  tiny:\n" in text
        path.write_text(text.replace("\n  tiny:\n", f"\n  {bad}:\n"))
        with pytest.raises(ConfigError, match=match):
            load_grid(path)
    # the same key twice in a mapping: YAML keeps the last one silently; the grid refuses it
    path.write_text(text + "models:\n  basic: [model.variant=basic]\n")
    with pytest.raises(ConfigError, match=r"'models' appears twice"):
        load_grid(path)


def test_summary_markdown_escapes_table_characters():
    from diffmic.experiment import _markdown

    md = _markdown([{"dataset": "a|b", "model": "m", "acc": "0.5"}])
    assert md.splitlines()[2] == "| a\\|b | m | 0.5 |"
