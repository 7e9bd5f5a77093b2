"""Out-of-fold DCG priors (``train.prior_folds``, ``train.prior_split``; issue 23 §1)."""

from __future__ import annotations

import torch
from torch import nn

from diffmic.config import load_config
from diffmic.nn.guidance import GuidanceOutput
from diffmic.training.checkpoint import read_checkpoint
from diffmic.training.crossfit import FoldAverage, dcg_part, fold_of, out_of_fold_guidance
from diffmic.training.module import DiffMICModule
from diffmic.training.run import evaluate, fit

from _helpers import TINY_MODEL


def test_folds_are_stable_balanced_and_independent_of_the_batch():
    ids = [f"img{i:05d}" for i in range(3000)]
    f = fold_of(ids, 3, seed=7)
    assert f.dtype == torch.long and set(f.tolist()) == {0, 1, 2}
    counts = torch.bincount(f, minlength=3).float()
    assert (counts - 1000).abs().max() < 90  # binomial SD 26: within 3.5 SD
    # an image's fold does not depend on what else is in its batch, nor on the order
    assert fold_of(ids[1234:1240], 3, 7).tolist() == f[1234:1240].tolist()
    assert fold_of(ids[::-1][:5], 3, 7).tolist() == f.flip(0)[:5].tolist()
    assert fold_of(ids, 3, seed=8).tolist() != f.tolist()  # the run's seed moves them
    part = dcg_part(ids, 0.25, seed=7)
    assert abs(float(part.float().mean()) - 0.25) < 0.03


class _Const(nn.Module):
    """A stand-in DCG whose logits are its own number k (to see which DCG produced a row)."""

    def __init__(self, k: int, C: int = 3) -> None:
        super().__init__()
        self.k, self.C = float(k), C
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> GuidanceOutput:
        b = x.shape[0]
        z = torch.full((b, self.C), self.k) + 0 * self.w
        return GuidanceOutput(
            z, z + 10, z + 5, torch.zeros(b, self.C, 2, 2), torch.zeros(b, 6, 4).long(), torch.ones(b, 6)
        )


def test_out_of_fold_guidance_takes_each_row_from_its_folds_dcg_in_eval_mode():
    dcgs = nn.ModuleList(_Const(k) for k in range(3)).train()
    x = torch.randn(7, 3, 4, 4)
    folds = torch.tensor([2, 0, 1, 2, 2, 0, 1])
    g = out_of_fold_guidance(dcgs, x, folds)
    assert g.z_global[:, 0].tolist() == [2.0, 0.0, 1.0, 2.0, 2.0, 0.0, 1.0]
    assert torch.equal(g.z_local, g.z_global + 10) and not g.z_global.requires_grad
    assert all(d.training for d in dcgs)  # modes restored
    avg = FoldAverage(dcgs)(x)
    assert torch.allclose(avg.z_global, torch.full((7, 3), 1.0)) and torch.allclose(avg.z_fused, avg.z_global + 5)


def _cfg(tmp_path, npz, name, *extra):
    return load_config(
        "cpu_v1",
        [
            *TINY_MODEL,
            "data.dataset=medmnist",
            f"data.root={npz}",
            "data.batch_size=16",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / name}",
            "train.epochs=2",
            "train.dcg_warmup_epochs=2",
            "eval.num_samples=1",
            *extra,
        ],
    )


def test_an_images_prior_never_comes_from_a_dcg_that_trained_on_it(tmp_path, synth_npz, monkeypatch):
    trace: list = []
    monkeypatch.setattr(DiffMICModule, "CROSSFIT_TRACE", trace)
    run = fit(_cfg(tmp_path, synth_npz, "k3", "train.prior_folds=3"))
    trained: dict[int, set] = {0: set(), 1: set(), 2: set()}
    for what, _epoch, folds, ids in trace:
        if what == "fold":
            for k, i in zip(folds, ids):
                trained[k].add(i)
    priors = [(k, i) for what, _e, folds, ids in trace if what == "prior" for k, i in zip(folds, ids)]
    assert priors and all(trained[k] for k in trained)
    assert not [(k, i) for k, i in priors if i in trained[k]]  # never the DCG that trained on it
    # every fold DCG trained in the warm-up and in the joint stage, on the other folds' images
    epochs = {e for what, e, *_ in trace if what == "fold"}
    assert epochs == {0, 1, 2, 3}
    assert {i for _k, i in priors} <= trained[0] | trained[1] | trained[2]
    # the fold DCGs are saved with the model, and the folds' average is a usable test-time prior
    sd = read_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("fold_dcgs.2.") for k in sd)
    # (the folds' prior is taken for every validation image, and only when asked for)
    seen: list[int] = []
    forward = FoldAverage.forward
    monkeypatch.setattr(FoldAverage, "forward", lambda self, x: seen.append(x.shape[0]) or forward(self, x))
    full = evaluate(run, stage="validate")
    assert seen == []
    folds = evaluate(run, stage="validate", overrides=["eval.prior_source=folds"])
    assert set(full) == set(folds) and sum(seen) == 16, seen  # conftest's 16 validation images


def test_prior_split_keeps_the_dcgs_and_the_denoisers_images_apart(tmp_path, synth_npz, monkeypatch):
    trace: list = []
    monkeypatch.setattr(DiffMICModule, "CROSSFIT_TRACE", trace)
    fit(_cfg(tmp_path, synth_npz, "split", "train.prior_split=0.5"))
    dcg = {i for what, _e, _f, ids in trace if what == "dcg" for i in ids}
    den = {i for what, _e, _f, ids in trace if what == "denoiser" for i in ids}
    assert dcg and den and not dcg & den
    assert dcg == {i for i in dcg | den if bool(dcg_part([i], 0.5, 1234)[0])}


def test_one_fold_is_todays_training_exactly(tmp_path, synth_npz):
    a = fit(_cfg(tmp_path, synth_npz, "off"))
    b = fit(_cfg(tmp_path, synth_npz, "k1", "train.prior_folds=1"))
    sa = read_checkpoint(a / "checkpoints" / "last.ckpt")["state_dict"]
    sb = read_checkpoint(b / "checkpoints" / "last.ckpt")["state_dict"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
