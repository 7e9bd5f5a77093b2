"""Pure ``nn.Module`` building blocks of DiffMIC (built from integers/strings; no configs, no data)."""

from diffmic.nn.denoiser import ConditionalDenoiser, ConditionalLinear, ImageEmbedding
from diffmic.nn.diffmic import VARIANTS, DiffMIC, Priors
from diffmic.nn.encoders import available_encoders, create_encoder, load_weights, register_encoder
from diffmic.nn.guidance import (
    DCG,
    ROI_CHANNELS,
    GatedAttention,
    GuidanceOutput,
    RoiSelection,
    crop_rois,
    grid_shape,
    select_rois,
)

__all__ = [
    "DCG",
    "ROI_CHANNELS",
    "VARIANTS",
    "ConditionalDenoiser",
    "ConditionalLinear",
    "DiffMIC",
    "GatedAttention",
    "GuidanceOutput",
    "ImageEmbedding",
    "Priors",
    "RoiSelection",
    "available_encoders",
    "create_encoder",
    "crop_rois",
    "grid_shape",
    "load_weights",
    "register_encoder",
    "select_rois",
]
