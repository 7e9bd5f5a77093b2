"""Forward process, posterior and priors of the DiffMIC label diffusion (pure tensor maths).

Notation (0-based t, see :mod:`diffmic.diffusion.schedule`): y0 ``[B, C]`` is the clean label
vector (one-hot in the released code), μ ``[B, C]`` the prior mean from the DCG, ε ~ N(0, I).

Residual view (reference note §1.3): with r = y − μ, the process is a standard DDPM on r,
r_t = √ᾱ_t r0 + √(1−ᾱ_t) ε.

Schedule coefficients are cast to the dtype of the label tensors, so outputs keep the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffmic.diffusion.schedule import NoiseSchedule, extract

__all__ = [
    "PRIOR_KINDS",
    "antithetic_timesteps",
    "posterior_mean_variance",
    "predict_y0_from_eps",
    "prior_mean",
    "q_sample",
]

PRIOR_KINDS: tuple[str, ...] = ("softmax_mean_logits", "mean_probs", "sum_probs", "zero")


def _coef(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` as ``[N, 1]`` in ``like``'s dtype."""
    return extract(values, t).to(dtype=like.dtype)


def q_sample(schedule: NoiseSchedule, y0: Tensor, t: Tensor, prior_mean: Tensor, noise: Tensor) -> Tensor:
    """Sample y_t ~ q(y_t | y0, μ) (paper Eq. 2, with the prior mean μ of the chosen prior kind).

    y_t = √ᾱ_t · y0 + √(1−ᾱ_t) · ε + (1 − √ᾱ_t) · μ

    Args:
        schedule: noise schedule (tables on the same device as ``t``).
        y0: clean labels ``[B, C]``.
        t: LongTensor ``[B]`` of 0-based timesteps.
        prior_mean: μ ``[B, C]``.
        noise: ε ``[B, C]``.

    Returns:
        y_t ``[B, C]``.
    """
    sqrt_ab = _coef(schedule.sqrt_alphas_cumprod, t, y0)
    sqrt_1m_ab = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, y0)
    return sqrt_ab * y0 + sqrt_1m_ab * noise + (1.0 - sqrt_ab) * prior_mean


def predict_y0_from_eps(schedule: NoiseSchedule, y_t: Tensor, t: Tensor, prior_mean: Tensor, eps: Tensor) -> Tensor:
    """Invert Eq. 2 for y0 given a noise estimate (reference note §1.5, ŷ0).

    ŷ0 = [y_t − (1 − √ᾱ_t) μ − √(1−ᾱ_t) ε̂] / √ᾱ_t

    Args:
        schedule: noise schedule.
        y_t: noisy labels ``[N, C]``.
        t: LongTensor ``[N]``.
        prior_mean: μ ``[N, C]``.
        eps: ε̂ ``[N, C]``.

    Returns:
        ŷ0 ``[N, C]``.
    """
    sqrt_ab = _coef(schedule.sqrt_alphas_cumprod, t, y_t)
    sqrt_1m_ab = _coef(schedule.sqrt_one_minus_alphas_cumprod, t, y_t)
    return (y_t - (1.0 - sqrt_ab) * prior_mean - sqrt_1m_ab * eps) / sqrt_ab


def posterior_mean_variance(
    schedule: NoiseSchedule, y0_hat: Tensor, y_t: Tensor, t: Tensor, prior_mean: Tensor
) -> tuple[Tensor, Tensor]:
    """Mean and variance of q(y_{t−1} | y_t, ŷ0, μ) (CARD reverse step, reference note §1.5).

    mean = γ0 ŷ0 + γ1 y_t + γ2 μ,  variance = β̃_t = β_t (1−ᾱ_{t−1}) / (1−ᾱ_t).

    Since γ2 = 1 − γ0 − γ1 this equals the DDPM posterior on the residual r = y − μ:
    mean − μ = γ0 (ŷ0 − μ) + γ1 (y_t − μ).

    Args:
        schedule: noise schedule.
        y0_hat: ŷ0 ``[N, C]``.
        y_t: ``[N, C]``.
        t: LongTensor ``[N]`` (t ≥ 1 for a proper step; at t = 0 the variance is 0 and mean = ŷ0).
        prior_mean: μ ``[N, C]``.

    Returns:
        ``(mean [N, C], variance [N, 1])``.
    """
    g0 = _coef(schedule.gamma0, t, y_t)
    g1 = _coef(schedule.gamma1, t, y_t)
    g2 = _coef(schedule.gamma2, t, y_t)
    mean = g0 * y0_hat + g1 * y_t + g2 * prior_mean
    var = _coef(schedule.posterior_variance, t, y_t)
    return mean, var


def prior_mean(kind: str, z_global: Tensor, z_local: Tensor) -> Tensor:
    """Prior mean μ from the DCG global/local logits ``[B, C]`` (softmax over the last dim).

    Kinds (``PRIOR_KINDS``):

    * ``"softmax_mean_logits"``: softmax(½(z_g + z_l)) — the released code's default.
    * ``"mean_probs"``: (softmax z_g + softmax z_l) / 2 — the mean of the start distribution in paper Eq. 1.
    * ``"sum_probs"``: softmax z_g + softmax z_l — the prior term (ŷ_g + ŷ_l) as written in paper Eq. 2.
    * ``"zero"``: zeros shaped like z_g (the released ``--noise_prior`` option, μ = 0).

    Returns:
        μ ``[B, C]``.
    """
    if kind == "softmax_mean_logits":
        return torch.softmax(0.5 * (z_global + z_local), dim=-1)
    if kind == "mean_probs":
        return 0.5 * (torch.softmax(z_global, dim=-1) + torch.softmax(z_local, dim=-1))
    if kind == "sum_probs":
        return torch.softmax(z_global, dim=-1) + torch.softmax(z_local, dim=-1)
    if kind == "zero":
        return torch.zeros_like(z_global)
    raise ValueError(f"unknown prior kind {kind!r}; valid kinds: {', '.join(PRIOR_KINDS)}")


def antithetic_timesteps(
    batch: int,
    num_timesteps: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Antithetic timestep sampling used in training (reference note §1.4).

    Draw ⌊B/2⌋+1 integers uniformly in [0, T−1], append their mirror T−1−t, keep the first B.

    Args:
        batch: B ≥ 0.
        num_timesteps: T.
        generator: optional ``torch.Generator``; the draw happens on the generator's device and the
            result is moved to ``device``.
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        LongTensor ``[B]`` with values in [0, T−1].
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    draw_device = generator.device if generator is not None else device
    half = torch.randint(0, num_timesteps, (batch // 2 + 1,), generator=generator, device=draw_device)
    t = torch.cat([half, num_timesteps - 1 - half])[:batch]
    return t if device is None else t.to(device)
