"""The LightningModule: DCG warm-up, joint DCG + diffusion training, evaluation by reverse sampling.

Stages (paper Sect. 2.3, released code §4.1):

1. ``train.dcg_warmup_epochs`` epochs of DCG cross-entropy only (released code 15, paper 10).
2. Joint training: each step one diffusion step (noise MSE on the dual-prior branch + λ·MMD on the
   global and local branches, Eq. 6) with the denoiser optimiser, then one DCG cross-entropy step
   with the DCG optimiser (``train.joint_dcg``).

The step itself (losses for one batch) and the optimisers are :mod:`diffmic.training.step`'s, shared
with the benchmarks; this module adds what Lightning runs around them: learning-rate schedules,
gradient accumulation, clipping, logging, seeding and evaluation. Speed-ups relative to the released
step (see ``docs/performance.md``):
* the image encoder ρ(x) runs once per step and feeds the three denoiser branches (released: three
  passes; forward values and summed gradients are identical, BN running stats get one update
  instead of three);
* the DCG priors for the diffusion loss are computed under ``torch.no_grad`` (the released code
  back-propagates through the DCG and then discards those gradients: no parameter update changes).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, cast

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from diffmic import __version__
from diffmic.config import Config, config_from_dict
from diffmic.diffusion.reverse import reverse_sample
from diffmic.diffusion.schedule import NoiseSchedule
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
from diffmic.reporting import plot_referral, plot_reliability, write_json, write_rows_csv
from diffmic.training.crossfit import FoldAverage
from diffmic.training.loading import build_model, ema_modules  # serving rebuilds the network without Lightning
from diffmic.training.schedules import lr_factor, warmup_dcg_lr
from diffmic.training.step import (  # noqa: F401  (NonFiniteLossError, swap_priors: re-exported)
    NonFiniteLossError,
    StepOptimizers,
    build_optimizers,
    make_fold_dcgs,
    swap_priors,
    train_step,
)
from diffmic.trust.evaluate import prior_probs, test_trust
from diffmic.trust.lesions import image_hits, lesion_mask_dir, mask_file, read_mask, summarise_hits
from diffmic.trust.ood import OODInputs, classifier_outputs, ood_scores
from diffmic.trust.ood import flags as ood_flags
from diffmic.trust.rows import prediction_row
from diffmic.trust.uncertainty import card_uncertainty


class DiffMICModule(pl.LightningModule):
    """Training and evaluation of :class:`~diffmic.nn.diffmic.DiffMIC` (all Table 2 variants)."""

    encoder_from_dcg_done: Tensor  # a buffer (__init__)
    # set by training.checkpoint.load_module on a module read from a checkpoint
    loaded_from: str
    diffmic_version: str
    calibration: Optional[dict]  # the trust parameters fitted on validation (None: not calibrated)

    def __init__(self, config: dict, num_classes: int, class_names: list[str]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: Config = config_from_dict(config)
        self.num_classes = num_classes
        self.class_names = list(class_names)
        self.model = build_model(self.cfg, num_classes)
        # train.prior_folds = K >= 2: K fold DCGs (copies of the DCG's initial weights; training.crossfit)
        self.fold_dcgs = make_fold_dcgs(self.model, self.cfg.train)
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
        return build_optimizers(self.model, self.cfg.train, self.fold_dcgs)

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
        assert self.model.dcg is not None and self.model.image_embedding is not None  # C2 / full
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
        opts = self.optimizers()
        train_step(
            _LightningHost(self, batch_idx),
            self.model,
            self.schedule,
            batch,
            # a LightningOptimizer is an instance of its optimizer's class at run time (Lightning
            # subclasses it on the fly), which its annotations do not say
            StepOptimizers.of(
                self.model, cast(list[torch.optim.Optimizer], opts if isinstance(opts, list) else [opts])
            ),
            self.cfg,
            warmup=self.in_dcg_warmup,
            fold_dcgs=self.fold_dcgs,
        )

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
    def scores(self, batch: dict, stage: str) -> tuple[Tensor, Optional[Any], Optional[Tensor]]:
        """The evaluation pass of one batch, as ``diffmic test`` runs it (public: the trust layer and the
        benchmarks call it): class probabilities ``[B,C]``, the sample read-out when the model samples
        (else None) and the fused DCG prior ``[B,C]`` (else None). ``stage`` is ``"val"`` or
        ``"test"`` (``eval.val_sampler`` or ``eval.sampler``)."""
        return self._eval_batch(batch, stage)[:3]

    def _eval_batch(self, batch: dict, stage: str) -> tuple[Tensor, Optional[Any], Optional[Tensor], dict]:
        """:meth:`scores` and, from the same forward pass, ``{"ood": OODInputs, "guidance": ...}``:
        the per-image inputs of the out-of-distribution scores (trust.ood) and the DCG outputs."""
        x = batch["image"]
        e = self.cfg.eval
        if not self.model.uses_diffusion:  # a classifier (basic, dcg): no sampling
            logits, feat, g = classifier_outputs(self.model, x)
            return torch.softmax(logits, -1), None, None, {"ood": OODInputs(logits, feat), "guidance": g}
        if stage == "val" and self.in_dcg_warmup:
            g = self.model.guide(x)
            assert g is not None  # the warm-up trains the DCG
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
        guidance: Any = out.guidance  # a GuidanceOutput or None (the diffusion layer does not name nn types)
        z = guidance.z_fused if guidance is not None else None
        inputs = OODInputs(z, out.feat, r.spread if out.y0.shape[1] >= 2 else None)
        return r.probs, r, out.prior, {"ood": inputs, "guidance": guidance}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        probs, _, prior = self.scores(batch, "val")
        self.val_metrics.update(probs, batch["label"])
        if prior is not None and self.model.uses_dcg:
            self.val_prior_metrics.update(prior, batch["label"])
            self._val_prior_seen = True

    def on_validation_epoch_end(self) -> None:
        values = self.val_metrics.compute()
        prefix = "val/dcg_" if self.in_dcg_warmup else "val/"
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
        card = card_uncertainty(r.samples) if r is not None and r.samples is not None else None
        pp = prior_probs(prior.detach().double().cpu()) if prior is not None else None  # the DCG's own probabilities
        for i, image_id in enumerate(batch["id"]):
            row = prediction_row(
                image_id,
                self.class_names,
                probs[i],
                label=int(labels[i]),
                pred=int(pred[i]),
                confidence=float(conf[i]),
                readout=(float(r.agreement[i]), float(r.spread[i]), float(r.entropy[i])) if r is not None else None,
                refer=(
                    should_refer(float(conf[i]), float(r.agreement[i]), self.cfg.eval.refer_threshold)
                    if r is not None
                    else None
                ),
                prior_pred=int(prior[i].argmax()) if prior is not None else None,
                prior_probs=pp[i] if pp is not None else None,
                ttest_p=float(card.p_value[i]) if card is not None else None,
                uncertain=bool(card.uncertain[i]) if card is not None else None,
                card_interval=(card.mean[i], card.low[i], card.high[i]) if card is not None else None,
                ood=(float(ood[0][i]), bool(ood[1][i])) if ood is not None else None,
            )
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
            recorded = self.model.uses_diffusion or self.model.uses_dcg  # not `basic` (as before: `dcg` records it)
            result.update(
                num_images=len({r["id"] for r in rows}),
                class_names=self.class_names,
                variant=self.model.variant,
                sampler=e.sampler if recorded else None,
                steps=e.steps if recorded else None,
                num_samples=e.num_samples,
                aggregate=e.aggregate,
            )
            out = Path(self.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            calib = getattr(self, "calibration", None)
            if rows and calib is not None:  # fitted on validation (diffmic calibrate / first test)
                tested = test_trust(
                    rows, calib, self.class_names, seed=self.cfg.run.seed, resamples=e.bootstrap_resamples
                )
                result.update(tested.blocks)
                plot_referral(*tested.curve, tested.blocks["referral"], out / "risk_coverage.png")
                plot_reliability(tested.reliability, tested.labels, out / "reliability.png")
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
        plot_referral(cov, acc, summary, out / "risk_coverage.png")
        return summary


class _LightningHost:
    """The :class:`~diffmic.training.step.StepHost` of :meth:`DiffMICModule.training_step`: the finite
    check, manual backward with gradient accumulation and Lightning's clipping, the lr schedules at
    this batch, Lightning's ``log`` and the cross-fitting trace."""

    def __init__(self, module: DiffMICModule, batch_idx: int) -> None:
        self.module, self.batch_idx = module, batch_idx

    def apply(self, opt: torch.optim.Optimizer, loss: Tensor, clip: Optional[float], what: str) -> None:
        self.module._check_finite(loss, what)
        self.module._step(opt, loss, clip)

    def set_lr(self, kind: str, opt: torch.optim.Optimizer) -> float:
        if kind == "dcg":
            return self.module._set_dcg_lr(opt, self.batch_idx)
        return self.module._set_diffusion_lr(opt, self.batch_idx)

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.module.log(name, value, **kwargs)

    def trace(self, what: str, folds: Optional[list], ids: Optional[list]) -> None:
        self.module._trace(what, folds, ids)
