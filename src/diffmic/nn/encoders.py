"""Image-encoder registry.

``create_encoder(name, in_chans=3, weights_path=None, spatial=False)`` returns an ``nn.Module`` with an
``out_dim`` attribute whose forward maps ``x [B, in_chans, H, W]`` to

* ``[B, D]``        — globally average-pooled features (``spatial=False``), or
* ``[B, D, h, w]``  — the last feature map before pooling (``spatial=True``),

with ``D == out_dim``.

Names resolve in this order:

1. the registry (``register_encoder``): ``resnet18``, ``resnet34``, ``resnet50``, ``densenet121``,
   ``efficientnet_b0``, ``mobilenet_v3_small``, ``convnext_tiny`` (torchvision architectures), and the small
   CPU-friendly ``resnet10`` (BasicBlock ``[1, 1, 1, 1]``, width 64) and ``resnet10_tiny`` (width 16);
2. ``"tv:<name>"`` — any ``torchvision.models.get_model`` classifier with a supported layout (ResNet/ResNeXt/
   Wide-ResNet, RegNet, DenseNet, ConvNeXt, ShuffleNetV2, MNASNet and ``.features`` models such as
   EfficientNet, MobileNet, VGG, SqueezeNet);
3. ``"timm:<name>"`` — any ``timm`` model (``num_classes=0``; spatial uses ``forward_features``).

Encoders are always randomly initialised (nothing is ever downloaded).  ``weights_path`` loads a local
state-dict file (``torch.load(weights_only=True)``) with strict key matching after (a) unwrapping a
``{"state_dict": ...}`` / ``{"model": ...}`` container, (b) stripping a prefix shared by every key such as
``module.`` or ``model.``, and (c) dropping classifier-head keys (``fc.*``, ``classifier.*``, ``head.*``, …)
that the headless encoder does not have.  A 3-channel stem is adapted to ``in_chans != 3`` (timm-style).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

__all__ = [
    "EncoderFactory",
    "TrunkEncoder",
    "TimmEncoder",
    "register_encoder",
    "create_encoder",
    "available_encoders",
    "load_weights",
]

#: ``factory(in_chans, spatial) -> nn.Module`` with ``.out_dim``.
EncoderFactory = Callable[[int, bool], nn.Module]

_REGISTRY: dict[str, EncoderFactory] = {}

_STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "model.", "encoder.", "backbone.", "net.")
_HEAD_NAMES: frozenset[str] = frozenset({"fc", "classifier", "head", "heads", "last_linear", "head_dist"})


def register_encoder(name: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator registering ``factory(in_chans: int, spatial: bool) -> nn.Module`` under ``name``.

    The module must expose ``out_dim`` and return ``[B, D]`` (or ``[B, D, h, w]`` when ``spatial``).
    """

    def deco(fn: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def available_encoders() -> list[str]:
    """Registered names (``tv:<name>`` and ``timm:<name>`` are accepted in addition)."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------


class TrunkEncoder(nn.Module):
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


class TimmEncoder(nn.Module):
    """Wraps a headless timm model (``num_classes=0``) as ``model``.

    Pooled output is the model's own ``forward`` (its pooling and any head norm); spatial output is
    ``forward_features`` (channels-first ``[B, D, h, w]``; NHWC outputs are permuted).
    """

    def __init__(self, model: nn.Module, spatial: bool = False) -> None:
        super().__init__()
        self.model = model
        self.out_dim = int(model.num_features)
        self.spatial = bool(spatial)

    @property
    def weights_target(self) -> nn.Module:
        """Module whose state-dict keys match the native timm checkpoint."""
        return self.model

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, C_in, H, W] -> [B, D]`` or ``[B, D, h, w]``."""
        if not self.spatial:
            return self.model(x)
        f = self.model.forward_features(x)
        if f.dim() != 4:
            raise ValueError(
                f"timm model {type(self.model).__name__} gives {f.dim()}-D features; spatial=True needs a CNN"
            )
        if f.shape[1] != self.out_dim and f.shape[-1] == self.out_dim:
            f = f.permute(0, 3, 1, 2)
        return f


# --------------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------------


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
                    kernel_size=child.kernel_size,
                    stride=child.stride,
                    padding=child.padding,
                    dilation=child.dilation,
                    groups=child.groups,
                    bias=child.bias is not None,
                    padding_mode=child.padding_mode,
                )
                setattr(parent, cname, new)
                return
    raise ValueError(f"{type(model).__name__}: no 3-channel stem convolution to adapt to in_chans={in_chans}")


def _trunk_from_torchvision(model: nn.Module, name: str, in_chans: int, spatial: bool) -> TrunkEncoder:
    """Headless ``TrunkEncoder`` from a torchvision classifier (native child names kept)."""
    _replace_stem(model, in_chans)
    kids = dict(model.named_children())
    pick = lambda *names: {n: kids[n] for n in names}  # noqa: E731
    if isinstance(model, tvm.ResNet) or {"conv1", "layer4", "fc"} <= kids.keys():
        mods = pick("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
        out_dim = _linear_in(kids["fc"]) if "fc" in kids else _last_channels(kids["layer4"])
        return TrunkEncoder(mods, out_dim, spatial)
    if isinstance(model, tvm.RegNet):
        return TrunkEncoder(pick("stem", "trunk_output"), model.fc.in_features, spatial)
    if isinstance(model, tvm.ShuffleNetV2):
        mods = pick("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")
        return TrunkEncoder(mods, model.fc.in_features, spatial)
    if isinstance(model, tvm.MNASNet):
        return TrunkEncoder(pick("layers"), _linear_in(model.classifier), spatial)
    if isinstance(model, tvm.DenseNet):
        return TrunkEncoder(pick("features"), model.classifier.in_features, spatial, final_relu=True)
    if isinstance(model, tvm.ConvNeXt):
        norm = model.classifier[0]
        return TrunkEncoder(pick("features"), _linear_in(model.classifier), spatial, norm=norm)
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


def _last_channels(mod: nn.Module) -> int:
    chans = [m.num_features for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    if not chans:
        raise ValueError(f"cannot infer channels of {type(mod).__name__}")
    return int(chans[-1])


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
        model = tvm.get_model(name, weights=None)
    except (ValueError, KeyError) as e:
        raise ValueError(
            f"unknown torchvision model {name!r}; see torchvision.models.list_models() ({e})"
        ) from None
    return _trunk_from_torchvision(model, name, in_chans, spatial)


def _timm_encoder(name: str, in_chans: int, spatial: bool) -> TimmEncoder:
    try:
        import timm
    except ImportError as e:  # pragma: no cover - timm is a declared dependency
        raise ImportError("timm is required for 'timm:<name>' encoders (pip install timm)") from e
    try:
        model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown timm model {name!r}; see timm.list_models()") from None
        raise
    return TimmEncoder(model, spatial)


class _SmallResNet(nn.Module):
    """ResNet with BasicBlocks, configurable depth per stage and base width (torchvision key names)."""

    def __init__(self, layers: tuple[int, int, int, int] = (1, 1, 1, 1), width: int = 64) -> None:
        super().__init__()
        w = int(width)
        self.conv1 = nn.Conv2d(3, w, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = w
        for i, (n, mult) in enumerate(zip(layers, (1, 2, 4, 8))):
            planes, stride = w * mult, (1 if i == 0 else 2)
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            blocks = [BasicBlock(inplanes, planes, stride, down)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(inplanes, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def small_resnet(in_chans: int = 3, spatial: bool = False, width: int = 64,
                 layers: tuple[int, int, int, int] = (1, 1, 1, 1)) -> TrunkEncoder:
    """Small BasicBlock ResNet encoder (``out_dim = 8 * width``); ``width=64`` is a ResNet-10."""
    m = _SmallResNet(layers, width)
    return _trunk_from_torchvision(m, f"resnet10_w{width}", in_chans, spatial)


def _register_tv(name: str) -> None:
    register_encoder(name)(lambda in_chans, spatial: _torchvision_encoder(name, in_chans, spatial))


for _n in ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0", "mobilenet_v3_small",
           "convnext_tiny"):
    _register_tv(_n)


@register_encoder("resnet10")
def _resnet10(in_chans: int, spatial: bool) -> nn.Module:
    """ResNet-10 (BasicBlock [1,1,1,1], width 64, D=512): ~4.9 M params."""
    return small_resnet(in_chans, spatial, width=64)


@register_encoder("resnet10_tiny")
def _resnet10_tiny(in_chans: int, spatial: bool) -> nn.Module:
    """ResNet-10 at width 16 (D=128): ~0.3 M params, for CPU tests and demos."""
    return small_resnet(in_chans, spatial, width=16)


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
                sd = {k[len(p):]: v for k, v in sd.items()}
                changed = True
                break
    return sd


def _adapt_input_conv(w: Tensor, in_chans: int) -> Tensor:
    """Adapt a 3-channel conv weight ``[O, 3, k, k]`` to ``in_chans`` inputs (sum for 1, tile otherwise)."""
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // w.shape[1])
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (w.shape[1] / in_chans)


def load_weights(module: nn.Module, weights_path: str | os.PathLike[str]) -> nn.Module:
    """Load a local state-dict file into ``module`` strictly (see module docstring for key handling).

    Raises:
        FileNotFoundError: the path does not exist or is not a file.
        ValueError: the file is not a state dict of tensors.
        RuntimeError: keys or shapes do not match (message names the file).
    """
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types
        raise ValueError(f"{path}: cannot be read as a weights-only torch state dict ({e})") from e
    sd = _unwrap(obj, path)
    own = module.state_dict()
    target = set(own)
    sd = _strip_prefixes(sd, target)
    sd = {k: v for k, v in sd.items() if k in target or k.split(".", 1)[0] not in _HEAD_NAMES}
    for k, v in list(sd.items()):
        ref = own.get(k)
        if (ref is not None and v.dim() == 4 and ref.dim() == 4 and v.shape[1] == 3 and ref.shape[1] != 3
                and v.shape[0] == ref.shape[0] and v.shape[2:] == ref.shape[2:]):
            sd[k] = _adapt_input_conv(v, ref.shape[1])
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RuntimeError(f"weights in {path} do not match the encoder: {e}") from None
    return module


# --------------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------------


def create_encoder(
    name: str,
    in_chans: int = 3,
    weights_path: str | os.PathLike[str] | None = None,
    spatial: bool = False,
) -> nn.Module:
    """Build a randomly initialised encoder and optionally load local weights.

    Args:
        name: registered name, ``"tv:<torchvision name>"`` or ``"timm:<timm name>"``.
        in_chans: input channels of ``x [B, in_chans, H, W]``.
        weights_path: optional local state-dict file (never downloads).
        spatial: return ``[B, D, h, w]`` feature maps instead of pooled ``[B, D]``.

    Returns:
        ``nn.Module`` with ``.out_dim == D``.

    Raises:
        ValueError: unknown name (the message lists the available names).
        FileNotFoundError: ``weights_path`` does not exist.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"encoder name must be a non-empty string, got {name!r}")
    if int(in_chans) < 1:
        raise ValueError(f"in_chans must be >= 1, got {in_chans}")
    in_chans = int(in_chans)
    if name in _REGISTRY:
        enc = _REGISTRY[name](in_chans, spatial)
    elif name.startswith("tv:"):
        enc = _torchvision_encoder(name[3:], in_chans, spatial)
    elif name.startswith("timm:"):
        enc = _timm_encoder(name[5:], in_chans, spatial)
    else:
        raise ValueError(
            f"unknown encoder {name!r}; available: {', '.join(available_encoders())}, "
            "or 'tv:<torchvision model>' / 'timm:<timm model>'"
        )
    if not hasattr(enc, "out_dim"):
        raise TypeError(f"encoder factory for {name!r} returned a module without .out_dim")
    if weights_path is not None:
        load_weights(getattr(enc, "weights_target", enc), weights_path)
    return enc
