"""CARD-style conditional denoiser ε_θ and the image embedding ρ(x).

Architecture (released ``ConditionalModel``)::

    feat = ρ(x) = BN1d(Linear(D → H)(encoder(x)))                               [B, H]
    h = softplus(BN(ConditionalLinear([y_t, ŷ] → H)(·, t)))  ⊙ feat              [B, H]
    h = softplus(BN(ConditionalLinear(H → H)(h, t)))         × (num_layers − 1)  [B, H]
    ε̂ = Linear(H → C)(h)                                                          [B, C]

Time conditioning is a purely multiplicative gate: ``ConditionalLinear(x, t) = (W x + b) ⊙ E[t]`` with a learned
table ``E ∈ R^{(T+1)×out}`` initialised U(0, 1).  ``t`` is 0-based (0 … T−1).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import create_encoder

__all__ = ["ConditionalLinear", "ImageEmbedding", "ConditionalDenoiser"]


class ConditionalLinear(nn.Module):
    """``(W x + b) ⊙ E[t]``; ``E = nn.Embedding(num_timesteps + 1, out_features)`` initialised U(0, 1).

    Forward: ``x [B, in_features], t [B] long -> [B, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int, num_timesteps: int) -> None:
        super().__init__()
        self.lin = nn.Linear(in_features, out_features)
        self.embed = nn.Embedding(int(num_timesteps) + 1, out_features)
        nn.init.uniform_(self.embed.weight, 0.0, 1.0)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x [B, in], t [B] -> [B, out]``."""
        return self.lin(x) * self.embed(t)


class ImageEmbedding(nn.Module):
    """ρ(x): ``encoder → Linear(D, hidden_dim) → BatchNorm1d(hidden_dim)``.

    Forward: ``x [B, in_chans, H, W] -> [B, hidden_dim]``.
    """

    def __init__(
        self,
        encoder_name: str,
        hidden_dim: int,
        in_chans: int = 3,
        weights_path: str | os.PathLike[str] | None = None,
        pretrained: bool | str | os.PathLike[str] | None = None,
        encoder_kwargs: Mapping[str, Any] | None = None,
        freeze_stride: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = create_encoder(
            encoder_name,
            in_chans=in_chans,
            weights_path=weights_path,
            pretrained=pretrained,
            kwargs=encoder_kwargs,
            freeze_stride=freeze_stride,
        )
        self.proj = nn.Linear(self.encoder.out_dim, int(hidden_dim))
        self.norm = nn.BatchNorm1d(int(hidden_dim))
        self.out_dim = int(hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, in_chans, H, W] -> feat [B, hidden_dim]``."""
        return self.norm(self.proj(self.encoder(x)))


class ConditionalDenoiser(nn.Module):
    """Noise-prediction MLP conditioned on the image embedding, the guidance vector and t.

    Args:
        num_classes: ``C``.
        hidden_dim: width ``H`` (6144 in the paper / released code).
        num_layers: number of ConditionalLinear→BN→Softplus blocks (3 released).
        num_timesteps: ``T``; time tables have ``T + 1`` rows.
        use_guidance: input is ``[y_t, guidance]`` (``2C``) when True, ``y_t`` only (``C``) when False.
        guidance_dim: width of the guidance vector (default ``C``; ``2C`` for the paper's Eq. 3 input
            ``[y_t, ŷ_g, ŷ_l]``).

    Forward: ``feat [B, H], y_t [B, C], t [B] long, guidance [B, C] | None -> eps [B, C]``.
    """

    def __init__(
        self,
        num_classes: int,
        hidden_dim: int = 6144,
        num_layers: int = 3,
        num_timesteps: int = 1000,
        use_guidance: bool = True,
        guidance_dim: int | None = None,
    ) -> None:
        super().__init__()
        if int(num_classes) < 1 or int(hidden_dim) < 1 or int(num_layers) < 1 or int(num_timesteps) < 1:
            raise ValueError("num_classes, hidden_dim, num_layers and num_timesteps must all be >= 1")
        c, h = int(num_classes), int(hidden_dim)
        self.num_classes = c
        self.hidden_dim = h
        self.use_guidance = bool(use_guidance)
        self.guidance_dim = c if guidance_dim is None else int(guidance_dim)
        in_dim = c + self.guidance_dim if self.use_guidance else c
        self.layers = nn.ModuleList(
            [ConditionalLinear(in_dim if i == 0 else h, h, num_timesteps) for i in range(int(num_layers))]
        )
        self.norms = nn.ModuleList([nn.BatchNorm1d(h) for _ in range(int(num_layers))])
        self.out = nn.Linear(h, c)

    def forward(self, feat: Tensor, y_t: Tensor, t: Tensor, guidance: Tensor | None = None, groups: int = 1) -> Tensor:
        """``feat [B, H], y_t [B, C], t [B], guidance [B, C] | None -> eps [B, C]``.

        ``groups = G > 1``: the rows are G independent calls stacked (``B = G·b``, call ``g`` in rows
        ``g·b … (g+1)·b − 1``). The linear layers run once on all rows (one pass over the 6144-wide
        weights instead of G), while each BatchNorm in training mode normalises every group by its own
        batch statistics and updates its running statistics once per group, in order: outputs,
        gradients and running statistics equal G separate calls (to rounding). ``feat`` may be ``[b, H]``
        (shared by the groups) or ``[B, H]``.
        """
        G = int(groups)
        if G < 1 or y_t.shape[0] % G:
            raise ValueError(f"groups={groups} must divide the {y_t.shape[0]} rows of y_t")
        if G > 1 and feat.shape[0] * G == y_t.shape[0]:
            feat = feat.repeat(G, 1)
        if self.use_guidance:
            if guidance is None:
                raise ValueError(
                    f"this denoiser was built with use_guidance=True; pass guidance [B, {self.guidance_dim}]"
                )
            h = torch.cat((y_t, guidance.to(y_t.dtype)), dim=-1)
        else:
            h = y_t
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            z = layer(h, t)
            if G > 1 and norm.training:  # per-group batch statistics, as G separate calls would use
                z = torch.cat([norm(zg) for zg in z.chunk(G, 0)], 0)
            else:
                z = norm(z)
            h = F.softplus(z)
            if i == 0:
                h = h * feat
        return self.out(h)
