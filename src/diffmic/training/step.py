"""One training step, without Lightning: the optimisers and the losses of one batch.

:class:`~diffmic.training.module.DiffMICModule` runs :func:`train_step` in ``training_step`` with
:func:`build_optimizers`' optimisers, and the benchmarks (``benchmarks/bench_train.py``,
``bench_scaling.py``, ``bench_gpu.py``) run the same two functions with :class:`PlainHost`, so that
they time the step users run, every ``train.*`` / ``loss.*`` switch included.

The step (paper Sect. 2.3, released code §4.1) by stage:

* classifiers: ``basic`` one cross-entropy step of the encoder and head; ``dcg`` one DCG
  cross-entropy step (:func:`dcg_step`).
* the DCG warm-up (variants with a DCG, ``train.dcg_warmup_epochs``): a DCG cross-entropy step only
  (and one step of the fold DCGs with ``train.prior_folds``).
* joint: one diffusion step (:func:`diffusion_losses`: noise MSE on the dual-prior branch + λ·MMD on the
  global and local branches, Eq. 6; one ρ(x) pass feeds every branch and ``R`` noise draws per image),
  then one DCG cross-entropy step (``train.joint_dcg``) and one fold-DCG step.

What the step needs from whoever runs it (clipping, gradient accumulation, learning-rate schedules,
logging) is a :class:`StepHost`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffmic.config import Config, TrainConfig
from diffmic.diffusion.process import antithetic_timesteps, q_sample
from diffmic.diffusion.schedule import NoiseSchedule
from diffmic.losses import diffusion_loss, guidance_ce
from diffmic.nn.diffmic import DiffMIC
from diffmic.training.crossfit import dcg_part, fold_of, out_of_fold_guidance

__all__ = [
    "NonFiniteLossError",
    "StepHost",
    "PlainHost",
    "PlainStep",
    "StepOptimizers",
    "build_optimizers",
    "make_fold_dcgs",
    "swap_priors",
    "diffusion_losses",
    "dcg_step",
    "fold_step",
    "train_step",
]


class NonFiniteLossError(FloatingPointError):
    """Raised when a training loss becomes NaN or Inf."""


class StepHost(Protocol):
    """What :func:`train_step` asks of its runner."""

    def apply(self, opt: torch.optim.Optimizer, loss: Tensor, clip: Optional[float], what: str) -> None:
        """Check that ``loss`` is finite (``what`` names it), back-propagate it into ``opt``'s
        parameters and step ``opt`` (gradient-norm clipping at ``clip`` when set)."""

    def set_lr(self, kind: str, opt: torch.optim.Optimizer) -> float:
        """Set and return the learning rate of ``opt`` for this batch; ``kind`` is ``"diffusion"``
        (ρ(x) and the denoiser, or the ``basic`` classifier) or ``"dcg"`` (the DCG and the fold DCGs)."""

    def log(self, name: str, value: Any, *, batch_size: int, prog_bar: bool = False, logger: bool = True) -> None:
        """Record a training value (the LightningModule's ``log``)."""

    def trace(self, what: str, folds: Optional[list], ids: Optional[list]) -> None:
        """Which images a network trained on (``training.crossfit``'s tests); may do nothing."""


class PlainHost:
    """A :class:`StepHost` without Lightning (the benchmarks'): zero the gradients, back-propagate,
    clip, step; learning rates stay as the optimisers hold them; logged values are kept in ``logged``
    as floats (``train/loss``, ``train/mse``, ``train/dcg_ce``, ...)."""

    def __init__(self) -> None:
        self.logged: dict[str, float] = {}

    def apply(self, opt: torch.optim.Optimizer, loss: Tensor, clip: Optional[float], what: str) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{what} loss is {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        opt.step()

    def set_lr(self, kind: str, opt: torch.optim.Optimizer) -> float:
        return float(opt.param_groups[0]["lr"])

    def log(self, name: str, value: Any, *, batch_size: int, prog_bar: bool = False, logger: bool = True) -> None:
        self.logged[name] = float(value.detach()) if isinstance(value, Tensor) else float(value)

    def trace(self, what: str, folds: Optional[list], ids: Optional[list]) -> None:
        return None


# ---------------------------------------------------------------------------------------- optimisers
def make_fold_dcgs(model: DiffMIC, train: TrainConfig) -> Optional[nn.ModuleList]:
    """``train.prior_folds = K >= 2``: K fold DCGs, copies of the DCG's initial weights
    (:mod:`diffmic.training.crossfit`); None otherwise."""
    K = train.prior_folds
    if K < 2 or model.dcg is None:
        return None
    return nn.ModuleList(copy.deepcopy(model.dcg) for _ in range(K))


def build_optimizers(
    model: DiffMIC, train: TrainConfig, fold_dcgs: Optional[nn.Module] = None
) -> list[torch.optim.Optimizer]:
    """The optimisers of a run, in this order: Adam for ρ(x) and the denoiser (the ``basic``
    classifier's encoder and head; none for ``dcg``), ``train.encoder_lr_scale`` as a parameter
    group of ρ's backbone; Adam for the DCG (``train.dcg_lr``, or ``train.dcg_warmup_lr`` at the
    start, AMSGrad as released); with ``fold_dcgs``, one Adam for every fold DCG (the DCG's
    settings). ``train.fused_adam``: one fused kernel (not under a ``*-mixed`` precision, where
    Lightning cannot clip a fused optimiser's gradients)."""
    t = train
    params = list(model.diffusion_parameters())
    groups: list[dict] = [{"params": params, "lr_scale": 1.0}]
    if t.encoder_lr_scale != 1.0 and model.image_embedding is not None:
        enc = {id(p) for p in model.image_embedding.encoder.parameters()}
        groups = [
            {"params": [p for p in params if id(p) not in enc], "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in enc], "lr_scale": t.encoder_lr_scale},
        ]
    # fused Adam: one kernel over all parameters (the 108 M-parameter head's update is ~3.6x faster
    # on a CPU than the default for-each, docs/method.md)
    fused = True if t.fused_adam and not str(t.precision).endswith("-mixed") else None  # None: torch's default
    opts: list[torch.optim.Optimizer] = []
    if params:
        opts.append(torch.optim.Adam(groups, lr=t.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused))
    if model.uses_dcg:
        lr0 = t.dcg_warmup_lr if t.dcg_warmup_lr is not None else t.dcg_lr
        dcg_params = list(model.dcg_parameters())
        opts.append(torch.optim.Adam(dcg_params, lr=lr0, amsgrad=t.dcg_amsgrad, fused=fused))
        if fold_dcgs is not None:  # the fold DCGs: one optimiser, the DCG's settings
            opts.append(torch.optim.Adam(fold_dcgs.parameters(), lr=lr0, amsgrad=t.dcg_amsgrad, fused=fused))
    return opts


@dataclass(frozen=True)
class StepOptimizers:
    """:func:`build_optimizers`' list by role."""

    diffusion: Optional[torch.optim.Optimizer]  #: ρ(x) + denoiser, or the basic classifier; None for dcg
    dcg: Optional[torch.optim.Optimizer]  #: the DCG (variants with one)
    folds: Optional[torch.optim.Optimizer] = None  #: the fold DCGs (train.prior_folds >= 2)

    @classmethod
    def of(cls, model: DiffMIC, opts: Sequence[torch.optim.Optimizer]) -> StepOptimizers:
        rest = list(opts)
        diffusion = rest.pop(0) if model.uses_diffusion or not model.uses_dcg else None
        dcg = rest.pop(0) if model.uses_dcg and rest else None
        return cls(diffusion, dcg, rest.pop(0) if rest else None)


# ---------------------------------------------------------------------------------------- losses
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


def diffusion_losses(
    model: DiffMIC,
    schedule: NoiseSchedule,
    x: Tensor,
    y: Tensor,
    g: Any,
    cfg: Config,
    noise: Optional[tuple[Tensor, Tensor]] = None,
) -> dict[str, Tensor]:
    """The denoiser's losses for one batch (Eq. 6): ``loss``, ``mse``, ``mmd_global``, ``mmd_local``.

    ``g``: the DCG's outputs for ``x`` (no gradient; ``None`` without a DCG) give the priors. One
    ρ(x) pass feeds every branch and the ``train.noise_samples_per_image`` = R (t, ε) draws per
    image; ``train.prior_swap`` swaps a share of the draws' priors (:func:`swap_priors`). With MMD
    (``full``, ``loss.mmd_weight`` > 0) the fused, global and local branches run as one grouped
    denoiser call. ``noise``: the timesteps and noise ``(t [B·R], ε [B·R, C])`` instead of drawing
    them (benchmarks compare steps on the same draws)."""
    t_cfg, loss_cfg = cfg.train, cfg.loss
    B = x.shape[0]
    pri = model.priors(g, B, x.device, x.dtype)
    feat = model.encode(x)
    y0 = F.one_hot(y, model.num_classes).to(x.dtype)
    R = t_cfg.noise_samples_per_image
    if R > 1:  # R (t, eps) draws per image share one encoder pass: same loss expectation
        feat, y0 = feat.repeat_interleave(R, 0), y0.repeat_interleave(R, 0)
        pri = type(pri)(*(p.repeat_interleave(R, 0) for p in pri))
    if t_cfg.prior_swap > 0 and g is not None:
        pri, _ = swap_priors(pri, t_cfg.prior_swap, B, R)
    if noise is None:
        t = antithetic_timesteps(B * R, schedule.num_timesteps, device=x.device)
        eps = torch.randn(B * R, model.num_classes, device=x.device, dtype=x.dtype)
    else:
        t, eps = noise
    gf, gg, gl = model.branch_guidance(pri)
    y_f = q_sample(schedule, y0, t, pri.fused, eps)
    eps_g = eps_l = None
    mmd_w = loss_cfg.mmd_weight if model.uses_mmd else 0.0
    if mmd_w > 0:
        # the fused, global and local branches as one grouped denoiser call: one pass over the
        # head's weights instead of three, each branch with its own BatchNorm statistics (= three calls)
        assert gf is not None and gg is not None and gl is not None  # MMD: a variant with a DCG's guidance
        y_g, y_l = q_sample(schedule, y0, t, pri.global_, eps), q_sample(schedule, y0, t, pri.local, eps)
        eps_f, eps_g, eps_l = model.eps(
            feat, torch.cat((y_f, y_g, y_l)), t.repeat(3), torch.cat((gf, gg, gl)), groups=3
        ).chunk(3)
    else:
        eps_f = model.eps(feat, y_f, t, gf)
    return diffusion_loss(eps, eps_f, eps_g, eps_l, mmd_weight=mmd_w, bandwidth=loss_cfg.mmd_bandwidth)


def _rows(ids: list, mask: Optional[Tensor]) -> list:
    return list(ids) if mask is None else [i for i, m in zip(ids, mask.tolist()) if m]


def dcg_step(
    host: StepHost,
    guide: Callable[[Tensor], Any],
    opt: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    mode: str,
    g: Any = None,
    ids: Optional[list] = None,
) -> None:
    """One DCG cross-entropy step (``loss.dcg_ce``); ``g``: its train-mode outputs for ``x`` when
    already computed (``train.exact_dcg_priors=false``), else ``guide(x)``."""
    g = guide(x) if g is None else g
    loss = guidance_ce(g.z_fused, g.z_global, g.z_local, y, mode=mode)
    host.apply(opt, loss, None, "DCG cross-entropy")
    host.log("train/dcg_ce", loss, prog_bar=True, batch_size=x.shape[0])
    host.trace("dcg", None, ids)


def fold_step(
    host: StepHost,
    fold_dcgs: Optional[nn.ModuleList],
    opt: Optional[torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    ids: list,
    cfg: Config,
) -> None:
    """One CE step of the K fold DCGs (``train.prior_folds``): DCG k on the batch's images outside
    fold k. Their losses are summed into one step of their optimiser (disjoint parameters, so this
    equals K separate steps)."""
    if fold_dcgs is None or opt is None:
        return
    host.set_lr("dcg", opt)
    folds = fold_of(ids, len(fold_dcgs), cfg.run.seed).to(x.device)
    loss = None
    for k, dcg in enumerate(fold_dcgs):
        rows = folds != k
        if int(rows.sum()) < 2:  # BatchNorm needs two images
            continue
        g = dcg(x[rows])
        part = guidance_ce(g.z_fused, g.z_global, g.z_local, y[rows], mode=cfg.loss.dcg_ce)
        loss = part if loss is None else loss + part
        host.trace("fold", [k] * int(rows.sum()), _rows(ids, rows))
    if loss is None:
        return
    host.apply(opt, loss, None, "fold DCG cross-entropy")
    host.log("train/fold_dcg_ce", loss / len(fold_dcgs), batch_size=x.shape[0])


def _step_priors(model: DiffMIC, x: Tensor, ids: list, cfg: Config, fold_dcgs: Any, joint: bool, host: StepHost):
    """The DCG outputs that give the diffusion step its priors (no gradient), and the train-mode
    DCG pass the DCG step reuses (``train.exact_dcg_priors=false``; else None)."""
    if fold_dcgs is not None:  # out-of-fold priors: image i's from the DCG of its fold
        folds = fold_of(ids, len(fold_dcgs), cfg.run.seed).to(x.device)
        host.trace("prior", folds.tolist(), ids)
        return out_of_fold_guidance(fold_dcgs, x, folds), None
    if model.uses_dcg and not cfg.train.exact_dcg_priors and joint:
        # one train-mode DCG pass with autograd: its detached outputs are the priors, and the
        # DCG step back-propagates its CE (the diffusion step does not change the DCG)
        g_train = model.guide(x)
        assert g_train is not None  # the variant has a DCG
        return type(g_train)(*(v.detach() for v in g_train)), g_train
    if model.uses_dcg:
        assert model.dcg is not None
        with torch.no_grad():
            was_training = model.dcg.training
            if cfg.train.exact_dcg_priors:
                model.dcg.eval()  # released code: priors from the DCG in eval mode
            g = model.guide(x)
            model.dcg.train(was_training)
        return g, None
    return None, None


def train_step(
    host: StepHost,
    model: DiffMIC,
    schedule: NoiseSchedule,
    batch: dict,
    opts: StepOptimizers,
    cfg: Config,
    *,
    warmup: bool = False,
    fold_dcgs: Optional[nn.ModuleList] = None,
    noise: Optional[tuple[Tensor, Tensor]] = None,
) -> None:
    """One training step on ``batch`` (``image``, ``label``, ``id``): every optimiser of the stage
    steps once through ``host`` (see the module docstring). ``warmup``: the DCG warm-up stage.
    ``noise``: the diffusion step's ``(t, ε)`` instead of drawing them (:func:`diffusion_losses`)."""
    x, y, ids = batch["image"], batch["label"], list(batch["id"])
    B = x.shape[0]
    mode = cfg.loss.dcg_ce
    if not model.uses_diffusion:
        if model.uses_dcg:  # DCG alone: its cross-entropy step, same lr schedule as in `full`
            assert opts.dcg is not None
            host.log("train/dcg_lr", host.set_lr("dcg", opts.dcg), batch_size=B)
            dcg_step(host, model.guide, opts.dcg, x, y, mode)
            return
        assert opts.diffusion is not None  # basic: the encoder and head's cross-entropy step
        host.set_lr("diffusion", opts.diffusion)
        loss = F.cross_entropy(model.classify(x), y)
        host.apply(opts.diffusion, loss, cfg.train.grad_clip, "cross-entropy")
        host.log("train/loss", loss, prog_bar=True, batch_size=B)
        return

    # train.prior_split: the DCG trains on its share of the images, the denoiser on the rest
    split = cfg.train.prior_split
    part = dcg_part(ids, split, cfg.run.seed).to(x.device) if split > 0 else None
    xg, yg = (x[part], y[part]) if part is not None else (x, y)  # the DCG's rows
    if warmup:
        assert opts.dcg is not None
        host.log("train/dcg_lr", host.set_lr("dcg", opts.dcg), batch_size=B)
        if xg.shape[0] > 1:  # BatchNorm needs two images
            dcg_step(host, model.guide, opts.dcg, xg, yg, mode, ids=_rows(ids, part))
        fold_step(host, fold_dcgs, opts.folds, x, y, ids, cfg)
        return
    joint = opts.dcg is not None and cfg.train.joint_dcg
    if part is not None:  # the denoiser's rows; the DCG step below uses the others
        if joint and xg.shape[0] > 1:
            assert opts.dcg is not None
            host.set_lr("dcg", opts.dcg)
            dcg_step(host, model.guide, opts.dcg, xg, yg, mode, ids=_rows(ids, part))
        joint = False
        keep = ~part
        ids = _rows(ids, keep)
        x, y = x[keep], y[keep]
        B = x.shape[0]
        if B < 2:
            return

    # ---- diffusion step (one encoder pass feeds all branches)
    assert opts.diffusion is not None
    lr = host.set_lr("diffusion", opts.diffusion)
    g, g_train = _step_priors(model, x, ids, cfg, fold_dcgs, joint, host)
    losses = diffusion_losses(model, schedule, x, y, g, cfg, noise)
    host.apply(opts.diffusion, losses["loss"], cfg.train.grad_clip, "diffusion")
    for k, v in losses.items():
        if v is not None:
            host.log(f"train/{k}", v, batch_size=B)
    host.log("train/loss_diff", losses["loss"], prog_bar=True, batch_size=B, logger=False)
    host.log("train/lr", lr, batch_size=B)
    host.trace("denoiser", None, ids)

    # ---- DCG step on the same batch (released: after every diffusion step)
    if joint:
        assert opts.dcg is not None
        host.set_lr("dcg", opts.dcg)
        dcg_step(host, model.guide, opts.dcg, x, y, mode, g_train, ids=ids)
        fold_step(host, fold_dcgs, opts.folds, x, y, ids, cfg)


class PlainStep:
    """:func:`train_step` outside Lightning, as the benchmarks run it: ``model``'s optimisers from
    :func:`build_optimizers` (and its fold DCGs, :func:`make_fold_dcgs`), a :class:`PlainHost` (no lr
    schedule, no gradient accumulation). Each call is one joint-stage step on ``batch``; returns the
    logged values without their ``train/`` prefix (``loss``, ``mse``, ``mmd_global``, ``mmd_local``,
    ``dcg_ce``, ...)."""

    def __init__(self, model: DiffMIC, cfg: Config) -> None:
        self.model, self.cfg = model, cfg
        self.fold_dcgs = make_fold_dcgs(model, cfg.train)
        self.optimizers = build_optimizers(model, cfg.train, self.fold_dcgs)
        self.opts = StepOptimizers.of(model, self.optimizers)

    def __call__(
        self, schedule: NoiseSchedule, batch: dict, noise: Optional[tuple[Tensor, Tensor]] = None
    ) -> dict[str, float]:
        host = PlainHost()
        self.model.train()
        if self.fold_dcgs is not None:
            self.fold_dcgs.train()
        train_step(host, self.model, schedule, batch, self.opts, self.cfg, fold_dcgs=self.fold_dcgs, noise=noise)
        return {k.removeprefix("train/"): v for k, v in host.logged.items()}
