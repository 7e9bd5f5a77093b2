"""The LightningModule: DCG warm-up, joint DCG + diffusion training, evaluation by reverse sampling.

Stages (paper Sect. 2.3, released code §4.1):

1. ``train.dcg_warmup_epochs`` epochs of DCG cross-entropy only (released code 15, paper 10).
2. Joint training: each step one diffusion step (noise MSE on the dual-prior branch + λ·MMD on the
   global and local branches, Eq. 6) with the denoiser optimiser, then one DCG cross-entropy step
   with the DCG optimiser (``train.joint_dcg``).

Speed-ups relative to the released step (see ``docs/performance.md``):
* the image encoder ρ(x) runs once per step and feeds the three denoiser branches (released: three
  passes; forward values and summed gradients are identical, BN running stats get one update
  instead of three);
* the DCG priors for the diffusion loss are computed under ``torch.no_grad`` (the released code
  back-propagates through the DCG and then discards those gradients: no parameter update changes).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from diffmic import __version__
from diffmic.config import Config, config_from_dict
from diffmic.diffusion.process import antithetic_timesteps, q_sample
from diffmic.diffusion.reverse import reverse_sample
from diffmic.diffusion.schedule import NoiseSchedule
from diffmic.losses import diffusion_loss, guidance_ce
from diffmic.metrics import (
    SCALAR_METRICS,
    classification_metrics,
    metrics_to_json,
    readout,
    referral_rule,
    risk_coverage,
    selective_summary,
    should_refer,
)
from diffmic.reporting import plot_risk_coverage, write_json, write_rows_csv
from diffmic.training.crossfit import FoldAverage, dcg_part, fold_of, out_of_fold_guidance
from diffmic.training.loading import build_model, ema_modules  # serving rebuilds the network without Lightning
from diffmic.training.schedules import lr_factor, warmup_dcg_lr
from diffmic.trust.fitting import prior_probs, sample_columns, test_trust
from diffmic.trust.lesions import image_hits, lesion_mask_dir, mask_file, read_mask, summarise_hits
from diffmic.trust.ood import OODInputs, classifier_outputs, ood_scores
from diffmic.trust.ood import flags as ood_flags


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or Inf."""


def swap_priors(pri: Any, share: float, images: int, draws: int = 1) -> tuple[Any, Tensor]:
    """``train.prior_swap``: give a share of the training draws the priors of another image.

    ``pri`` holds ``[images * draws, C]`` tensors, image-major (as ``repeat_interleave`` lays them
    out). Each row, independently with probability ``share``, takes every prior field (forward-process
    mean and guidance alike) from the same draw slot of another image of the batch, drawn uniformly.
    On the training images the DCG's priors are nearly always right, so a denoiser trained on them
    learns to copy its prior and to ignore rho(x); swapped rows are the cases where copying fails.
    Returns the new priors and the boolean mask of swapped rows. No-op for ``share <= 0`` or one image.
    """
    n = images * draws
    dev = pri[0].device
    if share <= 0 or images < 2:
        return pri, torch.zeros(n, dtype=torch.bool, device=dev)
    rows = torch.arange(n, device=dev)
    swap = torch.rand(n, device=dev) < share
    other = (rows // draws + torch.randint(1, images, (n,), device=dev)) % images
    src = torch.where(swap, other * draws + rows % draws, rows)
    return type(pri)(*(p[src] for p in pri)), swap


class DiffMICModule(pl.LightningModule):
    """Training and evaluation of :class:`~diffmic.nn.diffmic.DiffMIC` (all Table 2 variants)."""

    def __init__(self, config: dict, num_classes: int, class_names: list[str]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = config_from_dict(config)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.model = build_model(self.cfg, num_classes)
        # train.prior_folds = K >= 2: K fold DCGs (copies of the DCG's initial weights; training.crossfit)
        K = self.cfg.train.prior_folds
        self.fold_dcgs = (
            torch.nn.ModuleList(copy.deepcopy(self.model.dcg) for _ in range(K))
            if K >= 2 and self.model.dcg is not None
            else None
        )
        self.automatic_optimization = False
        self.val_metrics = classification_metrics(num_classes)
        # the fused DCG prior of a C2/full model in the joint phase, logged beside the read-out
        # (val/prior_*): how far the diffusion moves from its own prior as training goes on
        self.val_prior_metrics = classification_metrics(num_classes)
        self._val_prior_seen = False
        self.test_metrics = classification_metrics(num_classes)
        self._schedule: Optional[NoiseSchedule] = None
        self._test_rows: list[dict] = []
        self._mask_dir: Optional[Path] = None  # lesion masks of the test images (on_test_epoch_start)
        self.output_dir: Optional[Path] = None  # where test writes metrics/predictions
        # persistent flag (saved in checkpoints) so a resumed run does not re-initialise rho(x); set
        # by either initialisation (train.init_encoder_from_dcg or train.init_encoder_from, which
        # exclude each other); the name is kept so earlier checkpoints load unchanged
        self.register_buffer("encoder_from_dcg_done", torch.zeros((), dtype=torch.bool))
        self._encoder_init: Optional[dict[str, Tensor]] = None  # train.init_encoder_from, until applied
        self._encoder_init_loader: Optional[Callable[[], dict[str, Tensor]]] = None

    # ------------------------------------------------------------------ helpers
    @property
    def schedule(self) -> NoiseSchedule:
        s = self._schedule
        if s is None or s.betas.device != self.device:
            d = self.cfg.diffusion
            s = NoiseSchedule.build(d.schedule, d.num_timesteps, d.beta_start, d.beta_end).to(self.device)
            self._schedule = s
        return s

    @property
    def in_dcg_warmup(self) -> bool:
        """True during the DCG-only warm-up epochs of ``fit`` (never in validate/test/predict)."""
        if self._trainer is None or self.trainer.state.fn != "fit":
            return False
        return self.model.uses_dcg and self.current_epoch < self.cfg.train.dcg_warmup_epochs

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["diffmic_version"] = __version__  # read back by training.checkpoint

    def diffusion_modules(self) -> torch.nn.ModuleList:
        """The modules covered by the EMA: everything but the DCG (ρ(x), the denoiser / head)."""
        return ema_modules(self.model)

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self):
        t = self.cfg.train
        params = list(self.model.diffusion_parameters())
        groups: list[dict] = [{"params": params, "lr_scale": 1.0}]
        if t.encoder_lr_scale != 1.0 and self.model.image_embedding is not None:
            enc = {id(p) for p in self.model.image_embedding.encoder.parameters()}
            groups = [
                {"params": [p for p in params if id(p) not in enc], "lr_scale": 1.0},
                {"params": [p for p in params if id(p) in enc], "lr_scale": t.encoder_lr_scale},
            ]
        # fused Adam: one kernel over all parameters (the 108 M-parameter head's update is ~5x faster
        # on a CPU than the default for-each); Lightning cannot clip the gradients of a fused
        # optimiser under mixed precision, so the *-mixed precisions keep the for-each version
        fused = {"fused": True} if t.fused_adam and not str(t.precision).endswith("-mixed") else {}
        opts = [torch.optim.Adam(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, **fused)] if params else []
        if self.model.uses_dcg:
            lr0 = t.dcg_warmup_lr if t.dcg_warmup_lr is not None else t.dcg_lr
            dcg_params = list(self.model.dcg_parameters())
            opts.append(torch.optim.Adam(dcg_params, lr=lr0, amsgrad=t.dcg_amsgrad, **fused))
            if self.fold_dcgs is not None:  # the fold DCGs: one optimiser, the DCG's settings
                opts.append(torch.optim.Adam(self.fold_dcgs.parameters(), lr=lr0, amsgrad=t.dcg_amsgrad, **fused))
        return opts

    def _set_diffusion_lr(self, opt: torch.optim.Optimizer, batch_idx: int) -> float:
        t = self.cfg.train
        n = max(self.trainer.num_training_batches, 1) if self.trainer is not None else 1
        warm = t.dcg_warmup_epochs if self.model.uses_dcg else 0
        epoch = (self.current_epoch - warm) + batch_idx / n
        lr = t.lr * lr_factor(epoch, t.lr_warmup_epochs, t.epochs, t.min_lr / t.lr if t.lr else 0.0)
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr

    def _set_dcg_lr(self, opt: torch.optim.Optimizer, batch_idx: int) -> float:
        """DCG lr: during the warm-up ``dcg_warmup_lr`` (constant, or half-cosine down to
        ``dcg_lr`` at its end); afterwards ``dcg_lr`` (constant, as released)."""
        t = self.cfg.train
        lr = t.dcg_lr
        if self.in_dcg_warmup and t.dcg_warmup_lr is not None:
            n = max(self.trainer.num_training_batches, 1)
            progress = (self.current_epoch + batch_idx / n) / max(t.dcg_warmup_epochs, 1)
            lr = warmup_dcg_lr(progress, t.dcg_warmup_lr, t.dcg_lr, t.dcg_warmup_schedule)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

    def _check_finite(self, loss: Tensor, what: str) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"{what} loss is {loss.item()} at epoch {self.current_epoch}, global step "
                f"{self.global_step}. Training stopped; the last good checkpoint in "
                f"{self.cfg.run.dir}/checkpoints is kept. Lower train.lr, check the data, or use "
                f"train.precision=32-true."
            )

    # ------------------------------------------------------------------ training
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Re-seed at the first batch of every epoch from (seed, epoch, rank): the noise and
        # timesteps of an epoch do not depend on what ran before (augmentation is seeded per
        # sample by the sampler), so a resumed run repeats an uninterrupted one. Done here rather
        # than in on_train_epoch_start because Lightning creates the data iterator (which draws
        # from the global RNG) before or after that hook depending on whether the fit resumed.
        self._batch_in_epoch = batch_idx  # train.accumulate_grad_batches: where in its window (_step)
        if batch_idx == 0:
            seed = (self.cfg.run.seed * 1_000_003 + self.current_epoch * 1_009 + self.global_rank) % (2**31 - 1)
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)

    def on_train_epoch_start(self) -> None:
        # rho(x) is initialised at the start of the joint phase (it is unused during the DCG
        # warm-up), once: the flag in the checkpoint stops a resumed run from doing it again
        t = self.cfg.train
        joint = not self.model.uses_dcg or self.current_epoch >= t.dcg_warmup_epochs
        if not (joint and self.model.uses_diffusion and not bool(self.encoder_from_dcg_done)):
            return
        if t.init_encoder_from_dcg and self.model.uses_dcg:
            self.init_encoder_from_dcg()
        elif t.init_encoder_from:
            self.init_encoder_from_checkpoint()

    def init_encoder_from_dcg(self) -> None:
        """Start ρ(x) from the warmed-up DCG global backbone (``train.init_encoder_from_dcg``).

        Not in the paper or the released code (there ρ starts from random weights and learns only
        from the diffusion loss, which takes hundreds of epochs). Needs ``model.encoder`` and
        ``model.dcg_global`` to name the same architecture.
        """
        src = self.model.dcg.global_encoder.state_dict()
        dst = self.model.image_embedding.encoder
        try:
            dst.load_state_dict(src, strict=True)
        except RuntimeError as exc:
            raise ValueError(
                "train.init_encoder_from_dcg needs model.encoder and model.dcg_global to be the same "
                f"backbone (got {self.cfg.model.encoder!r} and {self.cfg.model.dcg_global!r}): {str(exc)[:300]}"
            ) from exc
        self.encoder_from_dcg_done.fill_(True)

    def prepare_encoder_init(
        self,
        state: Optional[dict[str, Tensor]] = None,
        loader: Optional[Callable[[], dict[str, Tensor]]] = None,
    ) -> None:
        """Hold the encoder weights for ``train.init_encoder_from`` until the joint phase starts:
        ``state`` (``fit`` reads and checks them before training, so a missing or unfitting file
        fails at once, not after the DCG warm-up), or ``loader``, called when the joint phase starts
        (a run resumed within the DCG warm-up). ``fit`` passes
        :func:`diffmic.training.checkpoint.encoder_init_state` bound to the run's config; this module
        does not import the checkpoint module, which imports it."""
        assert self.model.image_embedding is not None and self.cfg.train.init_encoder_from
        self._encoder_init = state
        self._encoder_init_loader = loader

    def init_encoder_from_checkpoint(self) -> None:
        """Start ρ(x)'s backbone from the encoder of an earlier run (``train.init_encoder_from``):
        ρ's backbone of a C1/C2/full run, the backbone of a ``basic`` classifier, or the DCG global
        backbone of a ``dcg`` run (ours; e.g. an independently trained ``basic`` classifier gives the
        denoiser a view of the image other than the DCG's). The projection and BN of ρ(x) keep their
        fresh initialisation."""
        if self._encoder_init is None:  # e.g. a run resumed from a checkpoint of the warm-up
            if self._encoder_init_loader is None:
                raise RuntimeError(
                    "train.init_encoder_from: no encoder weights were prepared (call prepare_encoder_init)"
                )
            self._encoder_init = self._encoder_init_loader()
        assert self.model.image_embedding is not None and self._encoder_init is not None
        self.model.image_embedding.encoder.load_state_dict(self._encoder_init, strict=True)
        self._encoder_init = None
        self.encoder_from_dcg_done.fill_(True)

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x, y = batch["image"], batch["label"]
        opts = self.optimizers()
        opts = opts if isinstance(opts, list) else [opts]
        opt_diff = opts[0]
        opt_dcg = opts[1] if len(opts) > 1 else None
        opt_folds = opts[2] if len(opts) > 2 else None
        B = x.shape[0]

        if self.model.variant == "dcg":  # DCG alone: its cross-entropy step, same lr schedule as in `full`
            self.log("train/dcg_lr", self._set_dcg_lr(opts[-1], batch_idx), batch_size=B)
            self._dcg_step(opts[-1], x, y)
            return

        if self.model.variant == "basic":
            self._set_diffusion_lr(opt_diff, batch_idx)
            loss = F.cross_entropy(self.model.classify(x), y)
            self._check_finite(loss, "cross-entropy")
            self._step(opt_diff, loss, self.cfg.train.grad_clip)
            self.log("train/loss", loss, prog_bar=True, batch_size=B)
            return

        # train.prior_split: the DCG trains on its share of the images, the denoiser on the rest
        split = self.cfg.train.prior_split
        part = dcg_part(batch["id"], split, self.cfg.run.seed).to(x.device) if split > 0 else None
        xg, yg = (x[part], y[part]) if part is not None else (x, y)  # the DCG's rows
        if self.in_dcg_warmup:
            self.log("train/dcg_lr", self._set_dcg_lr(opt_dcg, batch_idx), batch_size=B)
            if xg.shape[0] > 1:  # BatchNorm needs two images
                self._dcg_step(opt_dcg, xg, yg, ids=self._rows(batch["id"], part))
            self._fold_step(opt_folds, x, y, batch["id"], batch_idx)
            return
        joint = opt_dcg is not None and self.cfg.train.joint_dcg
        if part is not None:  # the denoiser's rows; the DCG step below uses the others
            if joint and xg.shape[0] > 1:
                self._set_dcg_lr(opt_dcg, batch_idx)
                self._dcg_step(opt_dcg, xg, yg, ids=self._rows(batch["id"], part))
            joint = False
            keep = ~part
            batch = {**batch, "id": self._rows(batch["id"], keep)}
            x, y = x[keep], y[keep]
            B = x.shape[0]
            if B < 2:
                return

        # ---- diffusion step (one encoder pass feeds all branches)
        lr = self._set_diffusion_lr(opt_diff, batch_idx)
        g_train = None  # train-mode DCG pass reused by the DCG step (exact_dcg_priors=false)
        if self.fold_dcgs is not None:  # out-of-fold priors: image i's from the DCG of its fold
            folds = fold_of(batch["id"], len(self.fold_dcgs), self.cfg.run.seed).to(x.device)
            g = out_of_fold_guidance(self.fold_dcgs, x, folds)
            self._trace("prior", folds.tolist(), batch["id"])
        elif self.model.uses_dcg and not self.cfg.train.exact_dcg_priors and joint:
            # one train-mode DCG pass with autograd: its detached outputs are the priors, and the
            # DCG step below back-propagates its CE (the diffusion step does not change the DCG)
            g_train = self.model.guide(x)
            g = type(g_train)(*(v.detach() for v in g_train))
        elif self.model.uses_dcg:
            with torch.no_grad():
                was_training = self.model.dcg.training
                if self.cfg.train.exact_dcg_priors:
                    self.model.dcg.eval()  # released code: priors from the DCG in eval mode
                g = self.model.guide(x)
                self.model.dcg.train(was_training)
        else:
            g = None
        pri = self.model.priors(g, B, x.device, x.dtype)
        s = self.schedule
        feat = self.model.encode(x)
        y0 = F.one_hot(y, self.num_classes).to(x.dtype)
        R = self.cfg.train.noise_samples_per_image
        if R > 1:  # R (t, eps) draws per image share one encoder pass: same loss expectation
            feat, y0 = feat.repeat_interleave(R, 0), y0.repeat_interleave(R, 0)
            pri = type(pri)(*(p.repeat_interleave(R, 0) for p in pri))
        if self.cfg.train.prior_swap > 0 and g is not None:
            pri, _ = swap_priors(pri, self.cfg.train.prior_swap, B, R)
        t = antithetic_timesteps(B * R, s.num_timesteps, device=x.device)
        eps = torch.randn(B * R, self.num_classes, device=x.device, dtype=x.dtype)
        gf, gg, gl = self.model.branch_guidance(pri)
        y_f = q_sample(s, y0, t, pri.fused, eps)
        eps_g = eps_l = None
        mmd_w = self.cfg.loss.mmd_weight if self.model.uses_mmd else 0.0
        if mmd_w > 0:
            # the fused, global and local branches as one grouped denoiser call: one pass over the
            # head's weights instead of three, each branch with its own BatchNorm statistics (= three calls)
            y_g, y_l = q_sample(s, y0, t, pri.global_, eps), q_sample(s, y0, t, pri.local, eps)
            eps_f, eps_g, eps_l = self.model.eps(
                feat, torch.cat((y_f, y_g, y_l)), t.repeat(3), torch.cat((gf, gg, gl)), groups=3
            ).chunk(3)
        else:
            eps_f = self.model.eps(feat, y_f, t, gf)
        losses = diffusion_loss(eps, eps_f, eps_g, eps_l, mmd_weight=mmd_w, bandwidth=self.cfg.loss.mmd_bandwidth)
        self._check_finite(losses["loss"], "diffusion")
        self._step(opt_diff, losses["loss"], self.cfg.train.grad_clip)
        self.log_dict({f"train/{k}": v for k, v in losses.items() if v is not None}, batch_size=B)
        self.log("train/loss_diff", losses["loss"], prog_bar=True, batch_size=B, logger=False)
        self.log("train/lr", lr, batch_size=B)
        self._trace("denoiser", None, batch["id"])

        # ---- DCG step on the same batch (released: after every diffusion step)
        if joint:
            self._set_dcg_lr(opt_dcg, batch_idx)
            self._dcg_step(opt_dcg, x, y, g_train, ids=batch["id"])
            self._fold_step(opt_folds, x, y, batch["id"], batch_idx)

    def _dcg_step(
        self, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, g: Any = None, ids: Optional[list] = None
    ) -> None:
        g = self.model.guide(x) if g is None else g
        loss = guidance_ce(g.z_fused, g.z_global, g.z_local, y, mode=self.cfg.loss.dcg_ce)
        self._check_finite(loss, "DCG cross-entropy")
        self._step(opt, loss, None)
        self.log("train/dcg_ce", loss, prog_bar=True, batch_size=x.shape[0])
        self._trace("dcg", None, ids)

    def _fold_step(self, opt: Optional[torch.optim.Optimizer], x: Tensor, y: Tensor, ids: list, batch_idx: int) -> None:
        """One CE step of the K fold DCGs (``train.prior_folds``): DCG k on the batch's images outside
        fold k. Their losses are summed into one step of their optimiser (disjoint parameters, so this
        equals K separate steps)."""
        if self.fold_dcgs is None or opt is None:
            return
        self._set_dcg_lr(opt, batch_idx)
        folds = fold_of(ids, len(self.fold_dcgs), self.cfg.run.seed).to(x.device)
        loss = None
        for k, dcg in enumerate(self.fold_dcgs):
            rows = folds != k
            if int(rows.sum()) < 2:  # BatchNorm needs two images
                continue
            g = dcg(x[rows])
            part = guidance_ce(g.z_fused, g.z_global, g.z_local, y[rows], mode=self.cfg.loss.dcg_ce)
            loss = part if loss is None else loss + part
            self._trace("fold", [k] * int(rows.sum()), self._rows(ids, rows))
        if loss is None:
            return
        self._check_finite(loss, "fold DCG cross-entropy")
        self._step(opt, loss, None)
        self.log("train/fold_dcg_ce", loss / len(self.fold_dcgs), batch_size=x.shape[0])

    @staticmethod
    def _rows(ids: list, mask: Optional[Tensor]) -> list:
        return list(ids) if mask is None else [i for i, m in zip(ids, mask.tolist()) if m]

    #: tests set a list here to record which images each network trained on (training.crossfit)
    CROSSFIT_TRACE: Optional[list] = None

    def _trace(self, what: str, folds: Optional[list], ids: Optional[list]) -> None:
        if DiffMICModule.CROSSFIT_TRACE is not None and ids is not None:
            DiffMICModule.CROSSFIT_TRACE.append((what, self.current_epoch, folds, list(ids)))

    def accumulation_window(self) -> tuple[bool, bool, int]:
        """``train.accumulate_grad_batches = N``: the training batches of an epoch form windows of N
        (the last one shorter when N does not divide them). Returns (first batch of its window, last
        batch of its window, number of batches in the window) for the current batch; (True, True, 1)
        when N = 1 or outside fit."""
        n = self.cfg.train.accumulate_grad_batches
        b = getattr(self, "_batch_in_epoch", None)
        if n <= 1 or b is None or self._trainer is None:
            return True, True, 1
        total = self.trainer.num_training_batches
        start = (b // n) * n
        size = int(min(n, total - start)) if total != float("inf") else n
        return b == start, b == start + size - 1, size

    @property
    def optimizer_stepped(self) -> bool:
        """Whether the optimisers stepped on the current batch (the last of its accumulation window;
        every batch without accumulation): the EMA is updated only then."""
        return self.accumulation_window()[1]

    def _step(self, opt: torch.optim.Optimizer, loss: Tensor, clip: Optional[float]) -> None:
        """Back-propagate ``loss`` into ``opt``'s parameters; the optimiser steps on the last batch of
        each window of ``train.accumulate_grad_batches`` batches (every batch when 1), on the mean of the
        window's batch gradients (each loss divided by the window's size), clipped as one gradient.
        Lightning leaves gradient accumulation to manual optimisation."""
        first, last, size = self.accumulation_window()
        if first:
            opt.zero_grad(set_to_none=True)
        self.manual_backward(loss / size if size > 1 else loss)
        if not last:
            return
        if clip:
            self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
        opt.step()
        if self.cfg.train.accumulate_grad_batches > 1:  # a window whose first batch skips opt starts from zero
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ evaluation
    def _scores(self, batch: dict, stage: str) -> tuple[Tensor, Optional[Any], Optional[Tensor]]:
        """Class probabilities ``[B,C]`` for the metrics, plus the sample read-out when sampling."""
        return self._eval_batch(batch, stage)[:3]

    def _eval_batch(self, batch: dict, stage: str) -> tuple[Tensor, Optional[Any], Optional[Tensor], dict]:
        """:meth:`_scores` and, from the same forward pass, ``{"ood": OODInputs, "guidance": ...}``:
        the per-image inputs of the out-of-distribution scores (trust.ood) and the DCG outputs."""
        x = batch["image"]
        e = self.cfg.eval
        if self.model.variant in ("basic", "dcg"):
            logits, feat, g = classifier_outputs(self.model, x)
            return torch.softmax(logits, -1), None, None, {"ood": OODInputs(logits, feat), "guidance": g}
        if stage == "val" and self.in_dcg_warmup:
            g = self.model.guide(x)
            return torch.softmax(g.z_fused, -1), None, None, {"ood": OODInputs(g.z_fused), "guidance": g}
        out = reverse_sample(
            self.model,
            self.schedule,
            x,
            **e.reverse_kwargs(stage),
            ids=batch["id"],
            guide=FoldAverage(self.fold_dcgs) if self.fold_dcgs is not None and e.prior_source == "folds" else None,
        )
        r = readout(out.y0, e.aggregate, e.temperature, point=out.point)
        g = out.guidance
        inputs = OODInputs(g.z_fused if g is not None else None, out.feat, r.spread if out.y0.shape[1] >= 2 else None)
        return r.probs, r, out.prior, {"ood": inputs, "guidance": g}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        probs, _, prior = self._scores(batch, "val")
        self.val_metrics.update(probs, batch["label"])
        if prior is not None and self.model.uses_dcg:
            self.val_prior_metrics.update(prior, batch["label"])
            self._val_prior_seen = True

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        prefix = "val/dcg_" if (self.in_dcg_warmup and self.model.variant != "basic") else "val/"
        for k in SCALAR_METRICS:
            self.log(f"{prefix}{k}", values[k], prog_bar=(k == self.cfg.train.monitor))
        self.val_metrics.reset()
        if self._val_prior_seen:
            prior_values = self.val_prior_metrics.compute()
            for k in SCALAR_METRICS:
                self.log(f"val/prior_{k}", prior_values[k])
            self.val_prior_metrics.reset()
            self._val_prior_seen = False

    def on_test_epoch_start(self) -> None:
        # HAM10000's lesion masks, when the data set has them: test_metrics.json's `lesions` block
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        self._mask_dir = lesion_mask_dir(getattr(dm, "dataset", ""), getattr(dm, "root", None))

    def _ood_columns(self, inputs: OODInputs) -> Optional[tuple[Tensor, Tensor]]:
        """Per-image score and flag of the stored out-of-distribution flag (None without one)."""
        ood = (getattr(self, "calibration", None) or {}).get("ood")
        if not ood or ood.get("score") is None:
            return None
        s = ood_scores(inputs.detached(), ood)
        return None if s is None else (s, ood_flags(s, ood.get("threshold")))

    def test_step(self, batch: dict, batch_idx: int) -> None:
        probs, r, prior, extra = self._eval_batch(batch, "test")
        labels = batch["label"]
        ood = self._ood_columns(extra["ood"])
        g = extra["guidance"]
        mask_dir = self._mask_dir
        self.test_metrics.update(probs, labels)
        pred = probs.argmax(-1)
        conf = probs.max(-1).values
        card = sample_columns(r.samples, self.class_names) if r is not None and r.samples is not None else None
        pp = prior_probs(prior.detach().double().cpu()) if prior is not None else None  # the DCG's own probabilities
        for i, image_id in enumerate(batch["id"]):
            row = {"id": image_id, "label": int(labels[i]), "pred": int(pred[i]), "confidence": float(conf[i])}
            if r is not None:
                row["agreement"] = float(r.agreement[i])
                row["spread"] = float(r.spread[i])
                row["entropy"] = float(r.entropy[i])
                row["refer"] = int(should_refer(float(conf[i]), float(r.agreement[i]), self.cfg.eval.refer_threshold))
            for c, name in enumerate(self.class_names):
                row[f"p_{name}"] = float(probs[i, c])
            if prior is not None:
                row["prior_pred"] = int(prior[i].argmax())
            if pp is not None:
                row.update({f"prior_p_{name}": float(pp[i, c]) for c, name in enumerate(self.class_names)})
            if card is not None:
                row.update(card[i])
            if ood is not None:
                row["ood_score"], row["ood"] = float(ood[0][i]), int(ood[1][i])
            mask = mask_file(mask_dir, image_id) if g is not None else None
            if mask is not None:  # per-image hit rates, averaged into test_metrics.json's `lesions` block
                row["_lesion"] = image_hits(
                    read_mask(mask),
                    g.saliency[i, int(labels[i])].float().cpu().numpy(),
                    g.roi_boxes[i].cpu().tolist(),
                    self.cfg.data.image_size,
                )
            self._test_rows.append(row)

    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        result = metrics_to_json(values, self.class_names)
        self.log_dict({f"test/{k}": values[k] for k in SCALAR_METRICS})
        self.test_metrics.reset()
        rows = self._test_rows
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        self._test_rows = []
        lesion_rows = list({r["id"]: r.pop("_lesion") for r in rows if "_lesion" in r}.values())  # once per image
        if self.trainer.is_global_zero and self.output_dir is not None:
            e = self.cfg.eval
            result.update(
                num_images=len({r["id"] for r in rows}),
                class_names=self.class_names,
                variant=self.model.variant,
                sampler=e.sampler if self.model.variant != "basic" else None,
                steps=e.steps if self.model.variant != "basic" else None,
                num_samples=e.num_samples,
                aggregate=e.aggregate,
            )
            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            calib = getattr(self, "calibration", None)
            if rows and calib is not None:  # fitted on validation (diffmic calibrate / first test)
                result.update(
                    test_trust(
                        rows, calib, self.class_names, out, seed=self.cfg.run.seed, resamples=e.bootstrap_resamples
                    )
                )
            elif rows:
                result["referral"] = self._referral(rows, out)
            lesions = summarise_hits(lesion_rows)
            if lesions is not None:  # the report's measures, over every test image with a mask
                result["lesions"] = {**lesions, "masks": str(self._mask_dir)}
            write_json(out / "test_metrics.json", result)
            write_rows_csv(out / "predictions.csv", sorted({r["id"]: r for r in rows}.values(), key=lambda r: r["id"]))
            self.test_result = result

    def _referral(self, rows: list[dict], out: Path) -> dict:
        """Selective-prediction summary of the test rows, and ``risk_coverage.png``."""
        e = self.cfg.eval
        conf = torch.tensor([r["confidence"] for r in rows], dtype=torch.float64)
        correct = torch.tensor([r["label"] == r["pred"] for r in rows])
        sampled = "agreement" in rows[0]  # no samples for the `basic` variant
        refer = torch.tensor([should_refer(r["confidence"], r.get("agreement"), e.refer_threshold) for r in rows])
        rule = referral_rule(e.refer_threshold, e.num_samples if sampled else None)
        cov, acc = risk_coverage(conf, correct)
        summary = {"rule": rule, **selective_summary(conf, correct, refer, curve=(cov, acc))}
        point = None
        if summary["accuracy_kept"] is not None:
            point = (1.0 - summary["referred_fraction"], summary["accuracy_kept"])
        plot_risk_coverage(
            cov, acc, out / "risk_coverage.png", point, title=f"{len(rows)} test images, AURC {summary['aurc']:.3f}"
        )
        return summary
