"""Dual-granularity conditional guidance (DCG) model τ_D.

Global stream: spatial backbone → bias-free 1×1 conv to ``C`` channels = saliency map ``S`` (raw logits, no
sigmoid); ``z_global = mean_{h,w} S``.

ROI selection (generalised to any input size): the input ``H×W`` is tiled into a ``g_h×g_w`` grid of
``crop_size`` px cells (``g_h = H // crop_size``, ``g_w = W // crop_size``); ``S`` is bilinearly resized to
``(g_h, g_w)`` (identity when it already has that size — 224 px, crop 32, stride-32 ResNet gives the released
7×7 behaviour); every class channel is min–max normalised per image (range clamped at ``eps``, so a constant
channel gives zeros, not NaN); the channels are summed; the top-``K`` cells (``K ≤ g_h·g_w``) are taken with
``torch.topk``.  Crops are gathered with index arithmetic (no Python loop over ``B×K``, no host syncs).

Local stream: crops ``[B·K, C', crop, crop]`` → pooled local encoder → gated attention (Ilse et al., 2018)
→ bias-free linear → ``z_local``.  ``z_fused = ½ (z_global + z_local)``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import OUTPUT_STRIDES, create_encoder, set_output_stride

__all__ = [
    "ROI_CHANNELS",
    "ROI_SELECT",
    "GuidanceOutput",
    "RoiSelection",
    "GatedAttention",
    "DCG",
    "select_rois",
    "crop_rois",
    "grid_shape",
    "set_output_stride",
    "OUTPUT_STRIDES",
]

ROI_CHANNELS: tuple[str, ...] = ("rgb", "first")
#: how the ROI cells are ranked: "sum" of every class's min-max normalised saliency channel (released
#: code), or "top_class": the channel of the class the global stream predicts (ours)
ROI_SELECT: tuple[str, ...] = ("sum", "top_class")

WeightsArg = str | os.PathLike[str] | tuple[str | os.PathLike[str] | None, str | os.PathLike[str] | None] | None


class GuidanceOutput(NamedTuple):
    """DCG outputs (logits are raw, no softmax)."""

    z_global: Tensor  #: [B, C] global-stream logits (mean of the saliency map)
    z_local: Tensor  #: [B, C] local-stream logits
    z_fused: Tensor  #: [B, C] ½ (z_global + z_local)
    saliency: Tensor  #: [B, C, h, w] saliency map / CAM at backbone resolution
    roi_boxes: Tensor  #: [B, K, 4] long, (y0, x0, y1, x1) in input pixels (y1, x1 exclusive)
    roi_attention: Tensor  #: [B, K] gated-attention weights (sum to 1 over K)


class RoiSelection(NamedTuple):
    """Output of :func:`select_rois`."""

    cell_idx: Tensor  #: [B, K] long, row-major cell index in the (g_h, g_w) grid, by decreasing score
    scores: Tensor  #: [B, K] selection-map value of each chosen cell
    selection_map: Tensor  #: [B, g_h, g_w] Σ_c minmax(S_c) on the grid


def grid_shape(height: int, width: int, crop_size: int) -> tuple[int, int]:
    """ROI grid ``(H // crop_size, W // crop_size)``; raises if the image is smaller than one cell."""
    gh, gw = int(height) // int(crop_size), int(width) // int(crop_size)
    if gh < 1 or gw < 1:
        raise ValueError(f"input {height}x{width} is smaller than one {crop_size}px ROI cell")
    return gh, gw


@torch.no_grad()
def select_rois(saliency: Tensor, grid_hw: tuple[int, int], k: int, eps: float = 1e-6) -> RoiSelection:
    """Pick the ``k`` most salient grid cells (no gradient flows through the selection).

    Args:
        saliency: ``[B, C, h, w]`` saliency map.
        grid_hw: ``(g_h, g_w)`` ROI grid; ``saliency`` is bilinearly resized to it unless already that size.
        k: number of cells; clamped to ``g_h·g_w``.
        eps: lower clamp of the per-channel range in the min–max normalisation.

    Returns:
        :class:`RoiSelection` with ``cell_idx [B, K]`` sorted by decreasing score.
    """
    if saliency.dim() != 4:
        raise ValueError(f"saliency must be [B, C, h, w], got shape {tuple(saliency.shape)}")
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    s = saliency.detach().float()
    if tuple(s.shape[-2:]) != (gh, gw):
        s = F.interpolate(s, size=(gh, gw), mode="bilinear", align_corners=False)
    flat = s.flatten(2)  # [B, C, gh*gw]
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    rng = hi - lo
    # A channel whose range is round-off relative to its magnitude counts as constant (zeros):
    # otherwise 1-ulp differences from the resize would be blown up to [0, 1] and pick the ROIs.
    flat_scale = torch.maximum(hi.abs(), lo.abs()).clamp_min(1.0)
    constant = rng <= 1e-5 * flat_scale
    norm = torch.where(constant, torch.zeros_like(flat), (flat - lo) / rng.clamp_min(eps))
    sel = norm.sum(dim=1)  # [B, gh*gw]
    kk = max(1, min(int(k), gh * gw))
    scores, idx = torch.topk(sel, kk, dim=1, largest=True, sorted=True)
    return RoiSelection(idx, scores, sel.view(-1, gh, gw))


def crop_rois(
    x: Tensor, cell_idx: Tensor, crop_size: int, grid_hw: tuple[int, int], channels: str = "rgb"
) -> tuple[Tensor, Tensor]:
    """Gather grid-cell crops from the network input (vectorised).

    Args:
        x: ``[B, C_in, H, W]`` network input.
        cell_idx: ``[B, K]`` long, row-major cell indices in the ``grid_hw`` grid.
        crop_size: cell size in pixels.
        grid_hw: ``(g_h, g_w)``; cell ``(r, c)`` covers ``[r·s, r·s+s) × [c·s, c·s+s)``.
        channels: ``"rgb"`` keeps all ``C_in`` channels; ``"first"`` replicates channel 0 to 3 channels
            (the released code).

    Returns:
        ``crops [B, K, C', s, s]`` (``C' = C_in`` or 3) and ``boxes [B, K, 4]`` long ``(y0, x0, y1, x1)``.
    """
    if channels not in ROI_CHANNELS:
        raise ValueError(f"roi_channels must be one of {ROI_CHANNELS}, got {channels!r}")
    b, c_in, h, w = x.shape
    s = int(crop_size)
    gh, gw = int(grid_hw[0]), int(grid_hw[1])
    if gh * s > h or gw * s > w:
        raise ValueError(f"grid {gh}x{gw} of {s}px cells does not fit a {h}x{w} input")
    src = x[:, :1] if channels == "first" else x
    cells = src[:, :, : gh * s, : gw * s].reshape(b, src.shape[1], gh, s, gw, s)
    rows = torch.div(cell_idx, gw, rounding_mode="floor")
    cols = cell_idx - rows * gw
    bidx = torch.arange(b, device=x.device).unsqueeze(1)
    # advanced indices separated by slices -> indexed dims come first: [B, K, C, s, s]
    crops = cells[bidx, :, rows, :, cols, :]
    if channels == "first":
        crops = crops.expand(-1, -1, 3, -1, -1)
    y0, x0 = rows * s, cols * s
    boxes = torch.stack((y0, x0, y0 + s, x0 + s), dim=-1)
    return crops, boxes


class GatedAttention(nn.Module):
    """Gated-attention MIL pooling (Ilse et al., 2018).

    ``a_k = softmax_k(w^T [tanh(V h_k) ⊙ sigmoid(U h_k)])``, ``z = Σ_k a_k h_k``; V, U, w are bias-free.
    """

    def __init__(self, in_dim: int, attn_dim: int = 128) -> None:
        super().__init__()
        self.V = nn.Linear(in_dim, attn_dim, bias=False)
        self.U = nn.Linear(in_dim, attn_dim, bias=False)
        self.w = nn.Linear(attn_dim, 1, bias=False)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """``h [B, K, D] -> (z [B, D], a [B, K])``."""
        logits = self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)
        a = torch.softmax(logits, dim=1)
        z = torch.einsum("bk,bkd->bd", a, h)
        return z, a


def _split_weights(weights_path: WeightsArg) -> tuple[str | os.PathLike[str] | None, str | os.PathLike[str] | None]:
    if isinstance(weights_path, (tuple, list)):
        if len(weights_path) != 2:
            raise ValueError("weights_path pair must be (global_backbone_file, local_backbone_file)")
        return weights_path[0], weights_path[1]
    return weights_path, weights_path


class DCG(nn.Module):
    """Dual-granularity conditional guidance model.

    Args:
        num_classes: ``C``.
        global_backbone: encoder name for the global stream (used spatially).
        local_backbone: encoder name for the ROI stream (pooled).
        num_rois: ``K`` (clamped to the number of grid cells at run time).
        crop_size: ROI cell size in input pixels.
        roi_channels: ``"rgb"`` (all input channels) or ``"first"`` (channel 0 replicated to 3, released code).
        attn_dim: gated-attention hidden size.
        in_chans: input channels.
        weights_path: optional local backbone state-dict file applied to both streams, or a pair
            ``(global_file, local_file)`` (either may be ``None``).
        pretrained: ImageNet weights for both streams where ``weights_path`` gives none (see
            :func:`~diffmic.nn.encoders.create_encoder`).
        output_stride: global-stream output stride, 32 (released) or 16/8 (see :func:`set_output_stride`).
        roi_select: ``"sum"`` (released: rank cells by the sum over classes of the min-max normalised
            saliency) or ``"top_class"`` (rank by the channel of the class with the largest ``z_global``).
        freeze_stride: freeze both streams' backbone layers up to this output stride (0: none).

    Forward: ``x [B, in_chans, H, W] -> GuidanceOutput``.
    """

    def __init__(
        self,
        num_classes: int,
        global_backbone: str = "resnet18",
        local_backbone: str = "resnet18",
        num_rois: int = 6,
        crop_size: int = 32,
        roi_channels: str = "rgb",
        attn_dim: int = 128,
        in_chans: int = 3,
        weights_path: WeightsArg = None,
        pretrained: bool | str | os.PathLike[str] | None = None,
        output_stride: int = 32,
        roi_select: str = "sum",
        freeze_stride: int = 0,
    ) -> None:
        super().__init__()
        if roi_select not in ROI_SELECT:
            raise ValueError(f"roi_select must be one of {ROI_SELECT}, got {roi_select!r}")
        self.roi_select = roi_select
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if roi_channels not in ROI_CHANNELS:
            raise ValueError(f"roi_channels must be one of {ROI_CHANNELS}, got {roi_channels!r}")
        if int(num_rois) < 1 or int(crop_size) < 1 or int(attn_dim) < 1:
            raise ValueError("num_rois, crop_size and attn_dim must be >= 1")
        g_w, l_w = _split_weights(weights_path)
        self.num_classes = int(num_classes)
        self.num_rois = int(num_rois)
        self.crop_size = int(crop_size)
        self.roi_channels = roi_channels
        self.global_encoder = create_encoder(
            global_backbone,
            in_chans=in_chans,
            weights_path=g_w,
            spatial=True,
            pretrained=pretrained,
            output_stride=output_stride,
            freeze_stride=freeze_stride,
        )
        self.saliency_head = nn.Conv2d(self.global_encoder.out_dim, self.num_classes, kernel_size=1, bias=False)
        local_in = 3 if roi_channels == "first" else int(in_chans)
        self.local_encoder = create_encoder(
            local_backbone,
            in_chans=local_in,
            weights_path=l_w,
            spatial=False,
            pretrained=pretrained,
            freeze_stride=freeze_stride,
        )
        d_l = self.local_encoder.out_dim
        self.attention = GatedAttention(d_l, int(attn_dim))
        self.local_head = nn.Linear(d_l, self.num_classes, bias=False)

    def global_stream(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x -> (z_global [B, C], saliency [B, C, h, w])``."""
        sal = self.saliency_head(self.global_encoder(x))
        return sal.mean(dim=(2, 3)), sal

    def local_stream(self, crops: Tensor) -> tuple[Tensor, Tensor]:
        """``crops [B, K, C', s, s] -> (z_local [B, C], attention [B, K])``."""
        b, k = crops.shape[:2]
        h = self.local_encoder(crops.reshape(b * k, *crops.shape[2:])).view(b, k, -1)
        z, a = self.attention(h)
        return self.local_head(z), a

    def forward(self, x: Tensor) -> GuidanceOutput:
        """``x [B, in_chans, H, W] -> GuidanceOutput`` (see class docstring)."""
        z_g, sal = self.global_stream(x)
        grid = grid_shape(x.shape[-2], x.shape[-1], self.crop_size)
        if self.roi_select == "top_class":
            top = z_g.detach().argmax(1)
            sel = select_rois(sal[torch.arange(sal.shape[0], device=sal.device), top].unsqueeze(1), grid, self.num_rois)
        else:
            sel = select_rois(sal, grid, self.num_rois)
        crops, boxes = crop_rois(x, sel.cell_idx, self.crop_size, grid, self.roi_channels)
        z_l, a = self.local_stream(crops)
        return GuidanceOutput(z_g, z_l, 0.5 * (z_g + z_l), sal, boxes, a)
