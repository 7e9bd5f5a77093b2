"""Training losses of DiffMIC (paper Eqs. 4–6) and the DCG cross-entropy.

Pure tensor maths; no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["GUIDANCE_CE_MODES", "diffusion_loss", "gaussian_mmd", "guidance_ce", "noise_mse"]

GUIDANCE_CE_MODES: tuple[str, ...] = ("fused", "all")


def noise_mse(eps: Tensor, eps_hat: Tensor) -> Tensor:
    """Noise-estimation loss L_ε = ‖ε − ε̂‖² (paper Eq. 4), averaged over all B×C entries.

    Args:
        eps: true noise ``[B, C]``.
        eps_hat: predicted noise ``[B, C]``.

    Returns:
        scalar Tensor.
    """
    return (eps - eps_hat).square().mean()


def gaussian_mmd(x: Tensor, y: Tensor, bandwidth: float | Sequence[float] | None = None) -> Tensor:
    """Squared MMD with a Gaussian kernel, biased V-statistic (paper Eq. 5).

    MMD² = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) − 2 mean_ij k(x_i, y_j), diagonal included,
    with k(a, b) = exp(−‖a − b‖² / bw). It compares the two *batch distributions*; rows are not
    paired.

    Args:
        x: ``[B1, D]`` (e.g. true noises ε).
        y: ``[B2, D]`` (e.g. predicted noises ε̂ of one branch).
        bandwidth: ``None`` → bw = D², the released code's kernel exp(−mean_d (a−b)² / D);
            a float → that bw; a sequence of floats → the sum of the kernels over those bandwidths.

    Returns:
        scalar Tensor (≥ 0 up to rounding).
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must be [B, D] with equal D, got {tuple(x.shape)} and {tuple(y.shape)}")
    dim = x.shape[1]
    if bandwidth is None:
        bws: list[float] = [float(dim * dim)]
    elif isinstance(bandwidth, (int, float)):
        bws = [float(bandwidth)]
    else:
        bws = [float(b) for b in bandwidth]
    if not bws or any(not b > 0 for b in bws):
        raise ValueError(f"bandwidths must be positive, got {bandwidth!r}")

    def kernel_mean(a: Tensor, b: Tensor) -> Tensor:
        # Explicit squared distances (not cdist): exact zeros on the diagonal, finite gradients.
        d2 = (a.unsqueeze(1) - b.unsqueeze(0)).square().sum(-1)  # [Ba, Bb]
        total = torch.exp(-d2 / bws[0])
        for bw in bws[1:]:
            total = total + torch.exp(-d2 / bw)
        return total.mean()

    return kernel_mean(x, x) + kernel_mean(y, y) - 2.0 * kernel_mean(x, y)


def diffusion_loss(
    eps: Tensor,
    eps_fused: Tensor,
    eps_global: Tensor | None = None,
    eps_local: Tensor | None = None,
    mmd_weight: float = 0.5,
    bandwidth: float | Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Total denoiser loss L_diff = L_ε + λ (L^g_MMD + L^l_MMD) (paper Eq. 6).

    L_ε is :func:`noise_mse` on the fused (dual-prior) branch; each MMD compares the true noise
    batch with one branch's predicted noise batch (:func:`gaussian_mmd`). An MMD term is skipped
    (reported as 0) when its prediction is ``None`` or ``mmd_weight == 0``.

    Args:
        eps: true noise ``[B, C]`` (shared by the three branches).
        eps_fused: ε̂ of the fused branch ``[B, C]``.
        eps_global: ε̂ of the global-prior branch ``[B, C]`` or None.
        eps_local: ε̂ of the local-prior branch ``[B, C]`` or None.
        mmd_weight: λ (0.5 in the released code).
        bandwidth: see :func:`gaussian_mmd`.

    Returns:
        dict with scalar tensors ``loss``, ``mse``, ``mmd_global``, ``mmd_local``.
    """
    mse = noise_mse(eps, eps_fused)
    zero = mse.new_zeros(())
    use_mmd = mmd_weight != 0
    mmd_g = gaussian_mmd(eps, eps_global, bandwidth) if use_mmd and eps_global is not None else zero
    mmd_l = gaussian_mmd(eps, eps_local, bandwidth) if use_mmd and eps_local is not None else zero
    loss = mse + mmd_weight * (mmd_g + mmd_l) if use_mmd else mse
    return {"loss": loss, "mse": mse, "mmd_global": mmd_g, "mmd_local": mmd_l}


def guidance_ce(
    z_fused: Tensor,
    z_global: Tensor | None,
    z_local: Tensor | None,
    target: Tensor,
    mode: str = "fused",
) -> Tensor:
    """Cross-entropy for the DCG guidance model (reference note §2.5).

    Args:
        z_fused: fused logits ``[B, C]``.
        z_global: global logits ``[B, C]`` (needed for ``mode="all"``).
        z_local: local logits ``[B, C]`` (needed for ``mode="all"``).
        target: class indices LongTensor ``[B]`` or class probabilities / one-hot ``[B, C]``.
        mode: ``"fused"`` → CE(z_f) (released code); ``"all"`` → CE(z_f) + CE(z_g) + CE(z_l).

    Returns:
        scalar Tensor.
    """
    if mode not in GUIDANCE_CE_MODES:
        raise ValueError(f"unknown guidance CE mode {mode!r}; valid: {', '.join(GUIDANCE_CE_MODES)}")
    if target.is_floating_point():
        target = target.to(z_fused.dtype)
    loss = F.cross_entropy(z_fused, target)
    if mode == "all":
        if z_global is None or z_local is None:
            raise ValueError("mode='all' needs z_global and z_local")
        loss = loss + F.cross_entropy(z_global, target) + F.cross_entropy(z_local, target)
    return loss
