"""DiffMIC model: image embedding ρ, conditional denoiser ε_θ and the DCG prior network τ_D.

Variants (paper Table 2):

* ``"basic"`` — encoder + linear head, no diffusion, no DCG (``classify(x) -> logits``).
* ``"C1"``    — diffusion without DCG: zero prior mean, denoiser input ``y_t`` only.
* ``"C2"``    — diffusion with DCG (noise MSE only; the loss is chosen by the trainer).
* ``"full"``  — diffusion with DCG and the condition-specific MMD terms (``uses_mmd``).
* ``"dcg"``   — the DCG alone as a GMIC-like classifier (ours, a baseline): no ρ(x), no denoiser;
  ``classify(x)`` returns the fused logits ``z_fused``, whose softmax is the fused prior of ``full``.

No optimiser, no data, no sampling loop here: the trainer/predictor composes ``encode`` (once per image),
``guide``/``priors`` (once per image) and ``eps`` (once per diffusion step).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple, TypeVar, cast

import torch
from torch import Tensor, nn

from diffmic.diffusion.process import PRIOR_KINDS, prior_mean

from .denoiser import ConditionalDenoiser, ImageEmbedding
from .encoders import Encoder, create_encoder
from .guidance import DCG, ROI_CHANNELS, GuidanceOutput, WeightsArg

__all__ = [
    "VariantParts",
    "VARIANT_PARTS",
    "variant_parts",
    "VARIANTS",
    "BASELINE_VARIANTS",
    "ALL_VARIANTS",
    "DCG_VARIANTS",
    "DIFFUSION_VARIANTS",
    "GUIDED_VARIANTS",
    "PRIOR_KINDS",
    "DENOISER_INPUTS",
    "Priors",
    "DiffMIC",
]


class VariantParts(NamedTuple):
    """What a model variant is made of."""

    diffusion: bool  #: ρ(x) and the conditional denoiser: trained with the diffusion loss, evaluated by sampling
    dcg: bool  #: the DCG (trained alone first, for ``train.dcg_warmup_epochs``)
    mmd: bool  #: the condition-specific MMD terms of Eq. 6 (global and local branches)
    paper: bool  #: a variant of the paper's Table 2 (else a baseline of ours)


#: every model variant and its parts: the one place a variant is declared (the config's choices, the
#: trainer's stages, the EMA, the evaluation path and the predictor read it through the tuples below or
#: :func:`variant_parts`). Without diffusion a variant is a classifier: the DCG's fused logits when it
#: has a DCG (``dcg``), else an encoder and a linear head (``basic``).
VARIANT_PARTS: dict[str, VariantParts] = {
    "basic": VariantParts(diffusion=False, dcg=False, mmd=False, paper=True),
    "C1": VariantParts(diffusion=True, dcg=False, mmd=False, paper=True),
    "C2": VariantParts(diffusion=True, dcg=True, mmd=False, paper=True),
    "full": VariantParts(diffusion=True, dcg=True, mmd=True, paper=True),
    "dcg": VariantParts(diffusion=False, dcg=True, mmd=False, paper=False),
}
VARIANTS: tuple[str, ...] = tuple(v for v, p in VARIANT_PARTS.items() if p.paper)
#: baseline variants beside the paper's Table 2 ones (accepted by :class:`DiffMIC` and the config)
BASELINE_VARIANTS: tuple[str, ...] = tuple(v for v, p in VARIANT_PARTS.items() if not p.paper)
ALL_VARIANTS: tuple[str, ...] = tuple(VARIANT_PARTS)
#: the variants with a DCG (trained first alone for ``train.dcg_warmup_epochs``)
DCG_VARIANTS: tuple[str, ...] = tuple(v for v, p in VARIANT_PARTS.items() if p.dcg)
#: the variants with ρ(x) and a denoiser (the others are classifiers: no sampling, no EMA)
DIFFUSION_VARIANTS: tuple[str, ...] = tuple(v for v, p in VARIANT_PARTS.items() if p.diffusion)
#: the variants whose denoiser takes the DCG's priors (out-of-fold priors apply to them)
GUIDED_VARIANTS: tuple[str, ...] = tuple(v for v, p in VARIANT_PARTS.items() if p.diffusion and p.dcg)


def variant_parts(variant: str) -> VariantParts:
    """The parts of ``variant`` (a ValueError naming the known variants for any other name)."""
    try:
        return VARIANT_PARTS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"unknown variant {variant!r}; expected one of {ALL_VARIANTS}") from None


#: denoiser input: ``released`` = [y_t, ŷ] (2C, the released code: ŷ is the branch's guidance vector);
#: ``paper`` = [y_t, ŷ_g, ŷ_l] (3C, the paper's Eq. 3, the same for every branch).
DENOISER_INPUTS: tuple[str, ...] = ("released", "paper")


class Priors(NamedTuple):
    """Per-branch prior mean μ, which is also that branch's guidance vector; each ``[B, C]``."""

    fused: Tensor  #: prior_mean(kind, z_g, z_l) — main branch, the only one used at inference
    global_: Tensor  #: softmax(z_g) — global MMD branch
    local: Tensor  #: softmax(z_l) — local MMD branch
    #: the fused branch's guidance vector: ``fused`` except for ``prior="zero"`` (released
    #: ``--noise_prior``: μ = 0, the guidance stays softmax(½(z_g + z_l))); ``[B, 2C]`` =
    #: ``[ŷ_g, ŷ_l]`` for ``denoiser_input="paper"``
    guidance: Tensor


def _path_or_none(p: WeightsArg) -> Any:
    if p is None:
        return None
    if isinstance(p, (tuple, list)):
        return tuple(None if q is None else os.fspath(q) for q in p)
    return os.fspath(p)


#: constructor arguments recorded only when they differ from their default, so that the hparams of
#: checkpoints written before the argument existed stay exactly as they were
_RECORDED_IF_SET: dict[str, Any] = {"denoiser_input": "released", "freeze_stride": 0, "encoder_kwargs": {}}


def architecture(**kwargs: Any) -> dict[str, Any]:
    """The constructor arguments of :class:`DiffMIC` as it records them (``model.hparams``, an exported
    folder's ``architecture``): every argument in signature order, normalised (ints, paths as strings),
    those of :data:`_RECORDED_IF_SET` only when not at their default. ``DiffMIC(**architecture(...))``
    rebuilds the same network. One definition for the model, the checkpoint and the export checks."""
    sig = inspect.signature(DiffMIC.__init__)
    out: dict[str, Any] = {}
    for name, par in list(sig.parameters.items())[1:]:
        v = kwargs.pop(name, par.default)
        if v is inspect.Parameter.empty:
            raise TypeError(f"architecture() missing the argument {name!r}")
        if name in ("encoder_weights", "dcg_weights"):
            v = _path_or_none(v)
        elif name == "pretrained":
            v = v if isinstance(v, (bool, type(None))) else os.fspath(v)
        elif name == "encoder_kwargs":
            v = {str(k): x for k, x in (v or {}).items()}
        elif name == "num_classes" or (isinstance(par.default, int) and not isinstance(par.default, bool)):
            v = int(v)
        if name in _RECORDED_IF_SET and v == _RECORDED_IF_SET[name]:
            continue
        out[name] = v
    if kwargs:
        raise TypeError(f"architecture() got unknown arguments {sorted(kwargs)}")
    return out


_Init = TypeVar("_Init", bound=Callable[..., None])


def _records_architecture(init: _Init) -> _Init:
    """Decorator for :meth:`DiffMIC.__init__`: once the model is built, ``self.hparams`` is
    :func:`architecture` of the arguments of the call, defaults included (bound to the signature, so
    each argument is named once, in the signature; cf. diffusers' ``register_to_config``)."""
    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: DiffMIC, *args: Any, **kwargs: Any) -> None:
        bound = sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        self.hparams = architecture(**{k: v for k, v in bound.arguments.items() if k != "self"})

    return cast(_Init, wrapper)


def _checked_parts(num_classes: int, variant: str, prior: str, roi_channels: str, denoiser_input: str) -> VariantParts:
    """The parts of ``variant`` once the choices of :class:`DiffMIC` are checked (a ValueError names the
    argument and its choices)."""
    if denoiser_input not in DENOISER_INPUTS:
        raise ValueError(f"unknown denoiser_input {denoiser_input!r}; expected one of {DENOISER_INPUTS}")
    parts = variant_parts(variant)
    if prior not in PRIOR_KINDS:
        raise ValueError(f"unknown prior {prior!r}; expected one of {PRIOR_KINDS}")
    if roi_channels not in ROI_CHANNELS:
        raise ValueError(f"unknown roi_channels {roi_channels!r}; expected one of {ROI_CHANNELS}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    return parts


class DiffMIC(nn.Module):
    """DiffMIC (Yang et al., MICCAI 2023).

    Args:
        num_classes: ``C``.
        variant: one of :data:`VARIANTS`.
        encoder: image-encoder name for ρ (see :func:`diffmic.nn.encoders.create_encoder`).
        hidden_dim: denoiser width ``H`` (6144).
        num_layers: denoiser depth (3).
        num_timesteps: ``T`` (1000).
        dcg_global, dcg_local: DCG backbones.
        num_rois, crop_size, roi_channels: DCG ROI settings (``roi_channels`` in ``("rgb", "first")``).
        prior: fused prior kind, one of ``PRIOR_KINDS``.
        in_chans: image channels.
        encoder_weights: optional local state-dict file for ρ's encoder.
        dcg_weights: optional local backbone state-dict file(s) for the DCG (see :class:`DCG`).
        denoiser_input: one of :data:`DENOISER_INPUTS` (``released`` [y_t, ŷ], ``paper`` [y_t, ŷ_g, ŷ_l]).
        pretrained: ImageNet weights for ρ's encoder and both DCG streams: ``True`` (torchvision/timm
            download), a state-dict file or a folder of them; ``encoder_weights``/``dcg_weights`` win.
        encoder_kwargs: extra ``timm.create_model`` arguments for a ``timm:<name>`` ``encoder`` (e.g.
            ``{"img_size": 64, "patch_size": 8}``), used as given (the config's automatic ``img_size`` is
            added by :func:`diffmic.training.module.build_model`).
        freeze_stride: freeze every backbone's layers up to this output stride (0: none; see
            :func:`diffmic.nn.encoders.freeze_to_stride`): a pretrained backbone fine-tunes only its
            later layers.

    Attributes:
        hparams: the constructor arguments as :func:`architecture` records them;
            ``DiffMIC(**model.hparams)`` rebuilds the architecture.
    """

    hparams: dict[str, Any]

    @_records_architecture
    def __init__(
        self,
        num_classes: int,
        variant: str = "full",
        encoder: str = "resnet18",
        hidden_dim: int = 6144,
        num_layers: int = 3,
        num_timesteps: int = 1000,
        dcg_global: str = "resnet18",
        dcg_local: str = "resnet18",
        num_rois: int = 6,
        crop_size: int = 32,
        roi_channels: str = "rgb",
        prior: str = "softmax_mean_logits",
        in_chans: int = 3,
        encoder_weights: str | os.PathLike[str] | None = None,
        dcg_weights: WeightsArg = None,
        denoiser_input: str = "released",
        pretrained: bool | str | os.PathLike[str] | None = None,
        dcg_output_stride: int = 32,
        roi_select: str = "sum",
        encoder_kwargs: Mapping[str, Any] | None = None,
        freeze_stride: int = 0,
    ) -> None:
        super().__init__()
        parts = _checked_parts(num_classes, variant, prior, roi_channels, denoiser_input)
        self.denoiser_input = denoiser_input
        self.num_classes = int(num_classes)
        self.variant = variant
        self.prior = prior
        self.num_timesteps = int(num_timesteps)

        self.encoder: Encoder | None = None
        self.classifier: nn.Linear | None = None
        self.image_embedding: ImageEmbedding | None = None
        self.denoiser: ConditionalDenoiser | None = None
        self.dcg: DCG | None = None
        enc_kw = {str(k): v for k, v in (encoder_kwargs or {}).items()}
        if parts.diffusion:  # ρ(x) and the denoiser (built before the DCG: a seed's draws depend on the order)
            self._build_diffusion(
                encoder, hidden_dim, num_layers, in_chans, encoder_weights, pretrained, enc_kw, freeze_stride
            )
        elif not parts.dcg:  # basic: encoder + linear head
            self._build_classifier(encoder, in_chans, encoder_weights, pretrained, enc_kw, freeze_stride)
        if parts.dcg:
            self.dcg = DCG(
                self.num_classes,
                global_backbone=dcg_global,
                local_backbone=dcg_local,
                num_rois=num_rois,
                crop_size=crop_size,
                roi_channels=roi_channels,
                in_chans=in_chans,
                weights_path=dcg_weights,
                pretrained=pretrained,
                output_stride=dcg_output_stride,
                roi_select=roi_select,
                freeze_stride=freeze_stride,
            )

    def _build_classifier(
        self,
        encoder: str,
        in_chans: int,
        weights: str | os.PathLike[str] | None,
        pretrained: bool | str | os.PathLike[str] | None,
        encoder_kwargs: dict[str, Any],
        freeze_stride: int,
    ) -> None:
        """``basic``: the encoder and a linear head on its pooled features."""
        self.encoder = create_encoder(
            encoder,
            in_chans=in_chans,
            weights_path=weights,
            pretrained=pretrained,
            kwargs=encoder_kwargs,
            freeze_stride=freeze_stride,
        )
        self.classifier = nn.Linear(self.encoder.out_dim, self.num_classes)

    def _build_diffusion(
        self,
        encoder: str,
        hidden_dim: int,
        num_layers: int,
        in_chans: int,
        weights: str | os.PathLike[str] | None,
        pretrained: bool | str | os.PathLike[str] | None,
        encoder_kwargs: dict[str, Any],
        freeze_stride: int,
    ) -> None:
        """The diffusion variants: ρ(x) and the conditional denoiser (guided when the variant has a DCG)."""
        self.image_embedding = ImageEmbedding(
            encoder,
            hidden_dim,
            in_chans=in_chans,
            weights_path=weights,
            pretrained=pretrained,
            encoder_kwargs=encoder_kwargs,
            freeze_stride=freeze_stride,
        )
        self.denoiser = ConditionalDenoiser(
            self.num_classes,
            hidden_dim,
            num_layers,
            self.num_timesteps,
            use_guidance=self.uses_dcg,
            guidance_dim=(2 if self.denoiser_input == "paper" else 1) * self.num_classes,
        )

    # ------------------------------------------------------------------ flags
    @property
    def uses_diffusion(self) -> bool:
        """ρ(x) and a denoiser (:data:`DIFFUSION_VARIANTS`); False for the classifiers ``basic`` and ``dcg``."""
        return VARIANT_PARTS[self.variant].diffusion

    @property
    def uses_dcg(self) -> bool:
        """A DCG (:data:`DCG_VARIANTS`: ``C2``, ``full`` and ``dcg``)."""
        return VARIANT_PARTS[self.variant].dcg

    @property
    def uses_guidance(self) -> bool:
        """Whether the denoiser takes a guidance vector (:data:`GUIDED_VARIANTS`: ``C2`` and ``full``)."""
        return self.uses_dcg and self.uses_diffusion

    @property
    def uses_mmd(self) -> bool:
        """The condition-specific MMD regularisation (``full`` only)."""
        return VARIANT_PARTS[self.variant].mmd

    # ------------------------------------------------------------------ parameter groups
    def diffusion_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of everything except the DCG (ρ + denoiser, or encoder + head for ``basic``)."""
        for name, p in self.named_parameters():
            if not name.startswith("dcg."):
                yield p

    def dcg_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the DCG (empty when the variant has none)."""
        if self.dcg is not None:
            yield from self.dcg.parameters()

    # ------------------------------------------------------------------ compute
    def encode(self, x: Tensor) -> Tensor:
        """Image features: ρ(x) ``[B, hidden_dim]`` (``[B, D]`` backbone features for ``basic``)."""
        if self.image_embedding is not None:
            return self.image_embedding(x)
        assert self.encoder is not None
        return self.encoder(x)

    def classify(self, x: Tensor) -> Tensor:
        """``basic`` and ``dcg`` only: ``x [B, C_in, H, W] -> logits [B, C]`` (``dcg``: ``z_fused``)."""
        if self.classifier is None and not self.uses_diffusion and self.dcg is not None:
            return self.dcg(x).z_fused
        if self.classifier is None:
            raise RuntimeError(f"classify() is only available for variant 'basic', not {self.variant!r}")
        return self.classifier(self.encode(x))

    def guide(self, x: Tensor) -> GuidanceOutput | None:
        """DCG outputs for ``x``, or ``None`` when the variant has no DCG."""
        return self.dcg(x) if self.dcg is not None else None

    def priors(
        self,
        g: GuidanceOutput | None,
        batch_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Priors:
        """Prior means / guidance vectors ``[B, C]`` for the fused, global and local branches.

        With DCG: ``fused = prior_mean(self.prior, z_g, z_l)``, ``global_ = softmax(z_g)``,
        ``local = softmax(z_l)``. ``prior == "zero"`` is the released ``--noise_prior``: only the fused
        prior mean is 0; its guidance vector stays softmax(½(z_g + z_l)) and the global/local
        branches are unchanged. Without DCG (``g is None``, variants ``basic``/``C1``): zeros of
        shape ``[batch_size, C]`` on ``device``/``dtype``.
        """
        if g is None:
            z = torch.zeros(batch_size, self.num_classes, device=device, dtype=dtype)
            return Priors(z, z, z, z)
        fused = prior_mean(self.prior, g.z_global, g.z_local)
        pg, pl = torch.softmax(g.z_global, dim=-1), torch.softmax(g.z_local, dim=-1)
        if self.prior == "zero":
            guide = prior_mean("softmax_mean_logits", g.z_global, g.z_local)
        else:
            guide = fused
        if self.denoiser_input == "paper":
            guide = torch.cat((pg, pl), dim=-1)
        if dtype is not None:
            fused, pg, pl, guide = fused.to(dtype), pg.to(dtype), pl.to(dtype), guide.to(dtype)
        return Priors(fused, pg, pl, guide)

    def branch_guidance(self, pri: Priors) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Guidance vectors fed to the denoiser by the fused, global and local branches (``None``
        when the variant takes none): released ``(guidance, ŷ_g, ŷ_l)``; paper Eq. 3: ``[ŷ_g, ŷ_l]``
        for every branch."""
        if not self.uses_guidance:
            return None, None, None
        if self.denoiser_input == "paper":
            return pri.guidance, pri.guidance, pri.guidance
        return pri.guidance, pri.global_, pri.local

    def eps(self, feat: Tensor, y_t: Tensor, t: Tensor, guidance: Tensor | None = None, groups: int = 1) -> Tensor:
        """Predicted noise ``[B, C]`` from ``feat [B, H]``, ``y_t [B, C]``, ``t [B]`` and ``guidance [B, C]``.

        ``guidance`` is ignored for ``C1`` (the denoiser sees ``y_t`` only). ``groups``: G stacked
        independent calls in one pass (see :meth:`ConditionalDenoiser.forward`).
        """
        if self.denoiser is None:
            raise RuntimeError("eps() is not available for variant 'basic' (no diffusion)")
        return self.denoiser(feat, y_t, t, guidance if self.denoiser.use_guidance else None, groups=groups)

    def forward(
        self, x: Tensor, y_t: Tensor | None = None, t: Tensor | None = None, guidance: Tensor | None = None
    ) -> Tensor:
        """``basic``: logits ``[B, C]``; diffusion variants: ``eps(encode(x), y_t, t, guidance)`` ``[B, C]``."""
        if not self.uses_diffusion:
            return self.classify(x)
        if y_t is None or t is None:
            raise ValueError("diffusion variants need y_t and t in forward()")
        return self.eps(self.encode(x), y_t, t, guidance)
