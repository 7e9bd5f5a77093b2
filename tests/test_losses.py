"""Tests for diffmic.losses (paper Eqs. 4–6 and the DCG cross-entropy)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffmic.losses import diffusion_loss, gaussian_mmd, guidance_ce, noise_mse


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_noise_mse_is_mean_over_all_entries() -> None:
    eps = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    eps_hat = torch.tensor([[0.0, 2.0], [2.0, -1.0]])
    assert noise_mse(eps, eps_hat).item() == pytest.approx((1 + 0 + 4 + 0) / 4)


def test_mmd_hand_computed_examples() -> None:
    # B = 1, D = 2: default bandwidth D² = 4, ‖x − y‖² = 2
    x = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    assert gaussian_mmd(x, y).item() == pytest.approx(2 - 2 * math.exp(-0.5), rel=1e-12)
    # B = 2, D = 1 (bandwidth 1): V-statistic with the diagonal included
    x = torch.tensor([[0.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    kxx = (1 + 1 + 2 * math.exp(-4)) / 4
    expected = kxx + 1.0 - 2 * math.exp(-1)
    assert gaussian_mmd(x, y).item() == pytest.approx(expected, rel=1e-12)


def test_mmd_default_bandwidth_is_d_squared_released_kernel() -> None:
    x, y = _randn(5, 7, seed=1), _randn(6, 7, seed=2) + 0.3
    d = 7
    assert gaussian_mmd(x, y).item() == pytest.approx(gaussian_mmd(x, y, bandwidth=d * d).item(), rel=1e-12)
    assert gaussian_mmd(x, y).item() != pytest.approx(gaussian_mmd(x, y, bandwidth=float(d)).item(), rel=1e-3)

    # the released kernel exp(−(1/D)·mean_d (a_d − b_d)²), written out with loops
    def k_mean(a: torch.Tensor, b: torch.Tensor) -> float:
        vals = [math.exp(-((ai - bj) ** 2).mean().item() / d) for ai in a for bj in b]
        return sum(vals) / len(vals)

    released = k_mean(x, x) + k_mean(y, y) - 2 * k_mean(x, y)
    assert gaussian_mmd(x, y).item() == pytest.approx(released, rel=1e-10)


def test_mmd_zero_symmetric_nonnegative() -> None:
    x, y = _randn(16, 5, seed=3), _randn(16, 5, seed=4)
    assert gaussian_mmd(x, x).abs().item() < 1e-12
    assert gaussian_mmd(x, y).item() == pytest.approx(gaussian_mmd(y, x).item(), rel=1e-12)
    for seed in range(5):
        a, b = _randn(8, 3, seed=10 + seed), _randn(8, 3, seed=20 + seed) * 2
        for bw in (None, 0.5, 10.0, [1.0, 4.0]):
            assert gaussian_mmd(a, b, bw).item() >= -1e-12


def test_mmd_grows_with_mean_shift() -> None:
    x, base = _randn(256, 7, seed=5), _randn(256, 7, seed=6)
    values = [gaussian_mmd(x, base + shift).item() for shift in (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)]
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_mmd_multi_bandwidth_sums_kernels() -> None:
    x, y = _randn(6, 4, seed=7), _randn(9, 4, seed=8) + 1
    bws = [0.5, 2.0, 16.0]
    total = sum(gaussian_mmd(x, y, bw).item() for bw in bws)
    assert gaussian_mmd(x, y, bws).item() == pytest.approx(total, rel=1e-12)
    with pytest.raises(ValueError):
        gaussian_mmd(x, y, 0.0)
    with pytest.raises(ValueError):
        gaussian_mmd(x, y[:, :3])


def test_mmd_gradient_is_finite_on_identical_rows() -> None:
    x = _randn(4, 3, seed=9).requires_grad_(True)
    gaussian_mmd(x, x.detach().clone()).backward()
    assert torch.isfinite(x.grad).all()


def test_diffusion_loss_eq6() -> None:
    eps = _randn(8, 5, seed=11)
    ef, eg, el = _randn(8, 5, seed=12), _randn(8, 5, seed=13), _randn(8, 5, seed=14)
    out = diffusion_loss(eps, ef, eg, el)
    assert set(out) == {"loss", "mse", "mmd_global", "mmd_local"}
    assert out["mse"].item() == pytest.approx(noise_mse(eps, ef).item())
    assert out["mmd_global"].item() == pytest.approx(gaussian_mmd(eps, eg).item())
    assert out["mmd_local"].item() == pytest.approx(gaussian_mmd(eps, el).item())
    expected = out["mse"] + 0.5 * (out["mmd_global"] + out["mmd_local"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-12)
    assert out["mmd_global"].item() > 0 and out["mmd_local"].item() > 0

    only_mse = diffusion_loss(eps, ef)
    assert only_mse["loss"].item() == pytest.approx(out["mse"].item())
    assert only_mse["mmd_global"].item() == 0.0 and only_mse["mmd_local"].item() == 0.0
    no_mmd = diffusion_loss(eps, ef, eg, el, mmd_weight=0.0)
    assert no_mmd["loss"].item() == pytest.approx(out["mse"].item())
    w = diffusion_loss(eps, ef, eg, None, mmd_weight=2.0, bandwidth=3.0)
    assert w["loss"].item() == pytest.approx(out["mse"].item() + 2.0 * gaussian_mmd(eps, eg, 3.0).item())


def test_guidance_ce_modes() -> None:
    zf, zg, zl = _randn(6, 4, seed=15), _randn(6, 4, seed=16), _randn(6, 4, seed=17)
    target = torch.tensor([0, 1, 2, 3, 0, 1])
    assert guidance_ce(zf, zg, zl, target).item() == pytest.approx(F.cross_entropy(zf, target).item())
    assert guidance_ce(zf, None, None, target).item() == pytest.approx(F.cross_entropy(zf, target).item())
    all_ = F.cross_entropy(zf, target) + F.cross_entropy(zg, target) + F.cross_entropy(zl, target)
    assert guidance_ce(zf, zg, zl, target, mode="all").item() == pytest.approx(all_.item())
    one_hot = F.one_hot(target, 4).float()
    assert guidance_ce(zf, zg, zl, one_hot).item() == pytest.approx(F.cross_entropy(zf, target).item())
    with pytest.raises(ValueError, match="fused"):
        guidance_ce(zf, zg, zl, target, mode="global")
    with pytest.raises(ValueError):
        guidance_ce(zf, None, zl, target, mode="all")
