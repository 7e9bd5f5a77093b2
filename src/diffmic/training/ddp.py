"""DDP helpers used by :func:`diffmic.training.run._trainer`.

Why :class:`BroadcastBuffers`: BatchNorm running statistics are buffers, which DDP copies from
rank 0 at the start of each training forward, except on the first forward after a no-grad one
(torch skips the copy then: after every validation). The DCG computes the diffusion priors in
eval mode (``train.exact_dcg_priors``, as released), i.e. from its running statistics, so rank 1
would use its own, diverged statistics for the first batch of every epoch. Only rank 0's copy is
saved, so a run resumed under DDP would then differ from an uninterrupted one (up to 4e-3 on the
denoiser weights after one epoch in tests/test_ddp.py). Broadcasting rank 0's buffers at the start
of every training epoch makes every epoch start as a resumed one does. (``SyncBatchNorm`` would
also do it, on GPUs only.)
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


class BroadcastBuffers(pl.Callback):
    """At the start of every training epoch, copy rank 0's module buffers to every rank."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        with torch.no_grad():
            for buf in pl_module.buffers():
                dist.broadcast(buf, src=0)
