"""``train.accumulate_grad_batches`` (issue 26 §5): manual optimisation accumulates itself.

N batches of B images give the optimiser the gradient one batch of N·B images gives (each loss
divided by the window's size; a shorter last window by its own size), clipped as one gradient, and
each optimiser steps once per window; the EMA follows the optimiser steps. Checked on networks
without BatchNorm (whose batch statistics would make a batch of 2B differ from two of B by
construction), in a real Lightning Trainer."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn

from diffmic.config import load_config
from diffmic.training.module import DiffMICModule

from _helpers import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


class Images(torch.utils.data.Dataset):
    """12 fixed RGB images of 32 px, two classes (dark / bright), as the data module yields them."""

    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.labels = torch.arange(n) % 2
        self.x = torch.randn(n, 3, 32, 32, generator=g) + self.labels.view(-1, 1, 1, 1).float()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "label": int(self.labels[i]), "id": f"img{i}"}


def _without_batchnorm(module: nn.Module) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _without_batchnorm(child)


class Steps(pl.Callback):
    """The gradient each optimiser steps on, and how often each steps."""

    def __init__(self) -> None:
        self.grads: list[tuple[int, list[torch.Tensor]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.grads.append((id(optimizer), [p.grad.detach().clone() for p in params if p.grad is not None]))

    def counts(self) -> list[int]:
        order = list(dict.fromkeys(k for k, _ in self.grads))
        return [sum(k == o for k, _ in self.grads) for o in order]


def _fit(variant: str, accumulate: int, batches: list[list[int]], extra: tuple = (), callbacks=()) -> tuple:
    cfg = load_config(
        "cpu_v1",
        [
            *TINY_MODEL,
            f"model.variant={variant}",
            "data.image_size=32",
            "train.epochs=1",
            "train.dcg_warmup_epochs=0",
            "train.min_lr=0.003",  # = train.lr: a constant lr, so that the step's epoch position does not matter
            f"train.accumulate_grad_batches={accumulate}",
            "run.seed=3",
            *extra,
        ],
    )
    torch.manual_seed(0)
    module = DiffMICModule(cfg.to_dict(), 2, ["dark", "bright"])
    _without_batchnorm(module)
    steps = Steps()
    loader = torch.utils.data.DataLoader(Images(), batch_sampler=batches)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[steps, *callbacks],
    )
    trainer.fit(module, train_dataloaders=loader)
    return module, steps


# the DCG's cross-entropy steps are not clipped (released code): its clip case would test nothing
@pytest.mark.parametrize(("variant", "clip"), [("basic", 0.0), ("basic", 0.05), ("dcg", 0.0)])
def test_two_batches_of_b_update_like_one_batch_of_2b(variant, clip):
    """Batches [0-3], [4-7], [8-9] with N=2 (windows [0-7] and a last window of one batch [8-9])
    against batches [0-7], [8-9] with N=1: the same gradient at both steps, the same weights after.
    Without clipping this checks the scale (a loss not divided by the window would double the first
    gradient; Adam would hide that in the weights); with a small clipping threshold, that the window's
    summed gradient is clipped, not each batch's."""
    over = (f"train.grad_clip={clip}",)
    acc, acc_steps = _fit(variant, 2, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]], over)
    big, big_steps = _fit(variant, 1, [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]], over)
    assert acc_steps.counts() == big_steps.counts() == [2]
    for (_, g_acc), (_, g_big) in zip(acc_steps.grads, big_steps.grads):
        assert len(g_acc) == len(g_big) > 0
        for a, b in zip(g_acc, g_big):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    norm = float(torch.sqrt(sum((g**2).sum() for g in acc_steps.grads[0][1])))
    if clip:
        assert norm == pytest.approx(clip, rel=1e-4)  # clipped
    else:
        assert norm > 0.05  # the threshold above acts on these gradients
    for (name, p), q in zip(acc.model.named_parameters(), big.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_each_optimiser_steps_once_per_window_and_the_ema_follows():
    """The full model (denoiser and DCG optimisers): 6 batches with N=2 give 3 steps of each
    optimiser and 3 EMA updates; N=4 gives windows of 4 and 2 batches: 2 steps; N=1: 6."""
    from diffmic.training.callbacks import DenoiserEMA

    batches = [[2 * i, 2 * i + 1] for i in range(6)]
    for n, expected in ((1, 6), (2, 3), (4, 2)):
        ema = DenoiserEMA(0.9)
        module, steps = _fit("full", n, batches, callbacks=[ema])
        assert steps.counts() == [expected, expected], n
        assert int(ema.ema.n_averaged) == expected
        assert module.trainer.global_step == 2 * expected  # Lightning counts every optimiser step


def test_accumulation_window_positions():
    """(first, last, size) of each batch for 7 batches and N=3: windows [0,1,2], [3,4,5], [6]."""
    module = DiffMICModule(
        load_config("cpu_v1", [*TINY_MODEL, "model.variant=basic", "train.accumulate_grad_batches=3"]).to_dict(),
        2,
        ["a", "b"],
    )

    class FakeTrainer:
        num_training_batches = 7

    module._trainer = FakeTrainer()
    got = []
    for b in range(7):
        module._batch_in_epoch = b
        got.append(module.accumulation_window())
    F, T = False, True
    assert got == [(T, F, 3), (F, F, 3), (F, T, 3), (T, F, 3), (F, F, 3), (F, T, 3), (T, T, 1)]
    assert np.sum([w[1] for w in got]) == 3
