"""Noise schedules for the label-space diffusion of DiffMIC.

DiffMIC (Yang et al., MICCAI 2023, Sec. 2.1 / "Training Details") uses a linear β schedule from
β_1 = 1e-4 to β_T = 0.02 with T = 1000. The index ``t`` is **0-based** throughout this package
(t = 0 … T−1), like the released code, so ``betas[0] = 1e-4`` and ``betas[T-1] = 0.02``.

All quantities are computed in float64 and cast to the requested dtype at the end, so a float32
schedule carries no accumulated cumulative-product error from float32 arithmetic.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BETA_SCHEDULES", "NoiseSchedule", "extract", "make_beta_schedule"]

BETA_SCHEDULES: tuple[str, ...] = ("linear", "quadratic", "cosine", "sigmoid")


def make_beta_schedule(
    kind: str = "linear",
    num_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Return the variance schedule β_t, t = 0 … T−1, as a float64 tensor of shape ``[T]``.

    Args:
        kind: one of ``BETA_SCHEDULES``:

            * ``"linear"``: β_t evenly spaced from ``beta_start`` to ``beta_end`` (DiffMIC default).
            * ``"quadratic"``: √β_t evenly spaced from √beta_start to √beta_end, then squared.
            * ``"cosine"``: Nichol & Dhariwal (2021) — ᾱ(s) = cos²(((s/T)+0.008)/1.008 · π/2),
              β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999). ``beta_start``/``beta_end`` are ignored.
            * ``"sigmoid"``: sigmoid(linspace(−6, 6, T)) rescaled to [beta_start, beta_end].
        num_timesteps: T ≥ 1.
        beta_start: β at t = 0 (linear/quadratic/sigmoid).
        beta_end: β at t = T−1 (linear/quadratic/sigmoid).

    Returns:
        float64 Tensor ``[T]`` with values in (0, 1).

    Raises:
        ValueError: unknown ``kind`` (the message lists the valid kinds) or invalid numbers.
    """
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"unknown beta schedule {kind!r}; valid kinds: {', '.join(BETA_SCHEDULES)}")
    if int(num_timesteps) != num_timesteps or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    num_timesteps = int(num_timesteps)
    if kind != "cosine" and not (0.0 < beta_start <= beta_end < 1.0):
        raise ValueError(f"need 0 < beta_start <= beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}")
    f64 = torch.float64
    if kind == "linear":
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=f64)
    elif kind == "quadratic":
        betas = torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=f64) ** 2
    elif kind == "cosine":
        s = 0.008
        grid = torch.arange(num_timesteps + 1, dtype=f64) / num_timesteps
        alpha_bar = torch.cos((grid + s) / (1.0 + s) * (math.pi / 2.0)) ** 2
        betas = (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:  # sigmoid
        x = torch.linspace(-6.0, 6.0, num_timesteps, dtype=f64)
        betas = torch.sigmoid(x) * (beta_end - beta_start) + beta_start
    return betas


def extract(values: Tensor, t: Tensor) -> Tensor:
    """Gather per-sample schedule values.

    Args:
        values: Tensor ``[T]`` (one schedule table).
        t: integer Tensor ``[N]`` of 0-based timesteps, on the same device as ``values``.

    Returns:
        Tensor ``[N, 1]`` (``values[t]``), broadcastable against label tensors ``[N, C]``.
    """
    return values.gather(0, t.reshape(-1).long()).unsqueeze(-1)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """All per-timestep tables of the CARD/DiffMIC diffusion, each a Tensor ``[T]`` (0-based t).

    Forward process (paper Eq. 2, with the prior mean μ):
    y_t = √ᾱ_t y0 + √(1−ᾱ_t) ε + (1−√ᾱ_t) μ.

    Reverse step (CARD, used by the released DiffMIC code, reference note §1.5):
    mean = γ0 ŷ0 + γ1 y_t + γ2 μ, variance = β̃_t, with

    * γ0 = β_t √ᾱ_{t−1} / (1−ᾱ_t)
    * γ1 = (1−ᾱ_{t−1}) √α_t / (1−ᾱ_t)
    * γ2 = 1 + (√ᾱ_t − 1)(√α_t + √ᾱ_{t−1}) / (1−ᾱ_t)   (= 1 − γ0 − γ1)
    * β̃_t = β_t (1−ᾱ_{t−1}) / (1−ᾱ_t)   (0 at t = 0)

    where ᾱ_{−1} := 1 (``alphas_cumprod_prev[0] = 1``).
    """

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    sqrt_alphas_cumprod: Tensor
    sqrt_one_minus_alphas_cumprod: Tensor
    posterior_variance: Tensor
    gamma0: Tensor
    gamma1: Tensor
    gamma2: Tensor

    @classmethod
    def from_betas(cls, betas: Tensor, dtype: torch.dtype = torch.float32) -> NoiseSchedule:
        """Build all tables from β ``[T]`` (computed in float64, then cast to ``dtype``)."""
        if betas.ndim != 1 or betas.numel() < 1:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        b = betas.detach().to(dtype=torch.float64)
        if not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("all betas must lie in (0, 1)")
        alphas = 1.0 - b
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        one_minus_abar = 1.0 - abar
        sqrt_abar = abar.sqrt()
        sqrt_abar_prev = abar_prev.sqrt()
        sqrt_alphas = alphas.sqrt()
        tables = dict(
            betas=b,
            alphas=alphas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=abar_prev,
            sqrt_alphas_cumprod=sqrt_abar,
            sqrt_one_minus_alphas_cumprod=one_minus_abar.sqrt(),
            posterior_variance=b * (1.0 - abar_prev) / one_minus_abar,
            gamma0=b * sqrt_abar_prev / one_minus_abar,
            gamma1=(1.0 - abar_prev) * sqrt_alphas / one_minus_abar,
            gamma2=1.0 + (sqrt_abar - 1.0) * (sqrt_alphas + sqrt_abar_prev) / one_minus_abar,
        )
        return cls(**{k: v.to(dtype=dtype) for k, v in tables.items()})

    @classmethod
    def build(
        cls,
        kind: str = "linear",
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        dtype: torch.dtype = torch.float32,
    ) -> NoiseSchedule:
        """Make β with :func:`make_beta_schedule`, derive every table in float64, cast to ``dtype``."""
        return cls.from_betas(make_beta_schedule(kind, num_timesteps, beta_start, beta_end), dtype=dtype)

    @property
    def num_timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return int(self.betas.shape[0])

    @property
    def device(self) -> torch.device:
        """Device of the tables."""
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the tables."""
        return self.betas.dtype

    def as_dict(self) -> dict[str, Tensor]:
        """All tables by field name (e.g. to register them as module buffers)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> NoiseSchedule:
        """Return a copy with every table moved to ``device`` and/or cast to ``dtype``."""
        return dataclasses.replace(self, **{k: v.to(device=device, dtype=dtype) for k, v in self.as_dict().items()})

    def __repr__(self) -> str:
        return f"NoiseSchedule(T={self.num_timesteps}, dtype={self.dtype}, device={self.device})"
