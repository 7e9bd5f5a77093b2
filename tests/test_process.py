"""Tests for diffmic.diffusion.process (forward process, posterior, priors, timesteps)."""

from __future__ import annotations

import pytest
import torch

from diffmic.diffusion.process import (
    PRIOR_KINDS,
    antithetic_timesteps,
    posterior_mean_variance,
    predict_y0_from_eps,
    prior_mean,
    q_sample,
)
from diffmic.diffusion.schedule import NoiseSchedule

T = 1000


@pytest.fixture(scope="module")
def sched64() -> NoiseSchedule:
    return NoiseSchedule.build("linear", T, dtype=torch.float64)


def _data(b: int = 8, c: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y0 = torch.nn.functional.one_hot(torch.randint(0, c, (b,), generator=g), c).double()
    mu = torch.softmax(torch.randn(b, c, generator=g, dtype=torch.float64), -1)
    eps = torch.randn(b, c, generator=g, dtype=torch.float64)
    return y0, mu, eps


def test_q_sample_closed_form(sched64: NoiseSchedule) -> None:
    y0, mu, eps = _data()
    t = torch.tensor([0, 1, 59, 249, 499, 700, 998, 999])
    out = q_sample(sched64, y0, t, mu, eps)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0)[t].unsqueeze(1)
    expected = abar.sqrt() * y0 + (1 - abar).sqrt() * eps + (1 - abar.sqrt()) * mu
    assert out.shape == y0.shape
    assert torch.allclose(out, expected, atol=1e-12)


def test_q_sample_extremes(sched64: NoiseSchedule) -> None:
    y0, mu, eps = _data(b=16)
    t0 = torch.zeros(16, dtype=torch.long)
    out0 = q_sample(sched64, y0, t0, mu, eps)
    assert torch.all((out0 - y0).abs() <= 0.02 * eps.abs() + 1e-4)
    tT = torch.full((16,), T - 1, dtype=torch.long)
    outT = q_sample(sched64, y0, tT, mu, eps)
    assert torch.allclose(outT, mu + eps, atol=1e-2)


def test_predict_y0_inverts_q_sample(sched64: NoiseSchedule) -> None:
    y0, mu, eps = _data(b=6)
    t = torch.tensor([0, 10, 300, 600, 900, 999])
    y_t = q_sample(sched64, y0, t, mu, eps)
    assert torch.allclose(predict_y0_from_eps(sched64, y_t, t, mu, eps), y0, atol=1e-9)


def test_posterior_mean_matches_residual_ddpm_posterior(sched64: NoiseSchedule) -> None:
    y0, mu, eps = _data(b=5)
    t = torch.tensor([1, 59, 249, 500, 999])
    y_t = q_sample(sched64, y0, t, mu, eps)
    mean, var = posterior_mean_variance(sched64, y0, y_t, t, mu)
    betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    b, a, a_prev = betas[t, None], abar[t, None], abar[t - 1, None]
    # q(r_{t-1} | r_t, r_0) of a standard DDPM on r = y − μ
    expected = mu + (a_prev.sqrt() * b / (1 - a)) * (y0 - mu) + ((1 - b).sqrt() * (1 - a_prev) / (1 - a)) * (y_t - mu)
    assert torch.allclose(mean, expected, atol=1e-12)
    assert var.shape == (5, 1)
    assert torch.allclose(var, b * (1 - a_prev) / (1 - a), atol=1e-15)


def test_posterior_at_t0_returns_y0_hat(sched64: NoiseSchedule) -> None:
    y0, mu, eps = _data(b=3)
    t = torch.zeros(3, dtype=torch.long)
    y_t = q_sample(sched64, y0, t, mu, eps)
    mean, var = posterior_mean_variance(sched64, y0, y_t, t, mu)
    assert torch.allclose(mean, y0, atol=1e-12) and torch.all(var == 0)


def test_process_keeps_input_dtype() -> None:
    s64 = NoiseSchedule.build("linear", 50, dtype=torch.float64)
    y0 = torch.zeros(2, 3)
    out = q_sample(s64, y0, torch.tensor([3, 4]), torch.ones(2, 3), torch.randn(2, 3))
    assert out.dtype == torch.float32


def test_prior_mean_kinds() -> None:
    zg = torch.tensor([[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]], dtype=torch.float64)
    zl = torch.tensor([[0.0, 1.0, 4.0], [2.0, 2.0, -2.0]], dtype=torch.float64)

    def softmax(z: torch.Tensor) -> torch.Tensor:
        e = z.exp()
        return e / e.sum(-1, keepdim=True)

    assert torch.allclose(prior_mean("softmax_mean_logits", zg, zl), softmax((zg + zl) / 2))
    assert torch.allclose(prior_mean("mean_probs", zg, zl), (softmax(zg) + softmax(zl)) / 2)
    assert torch.allclose(prior_mean("sum_probs", zg, zl), softmax(zg) + softmax(zl))
    z = prior_mean("zero", zg, zl)
    assert torch.equal(z, torch.zeros_like(zg)) and z.dtype == zg.dtype
    # the released default is NOT the mean of probabilities
    assert not torch.allclose(prior_mean("softmax_mean_logits", zg, zl), prior_mean("mean_probs", zg, zl))
    # every advertised kind is implemented, and no two give the same prior
    outs = [prior_mean(k, zg, zl) for k in PRIOR_KINDS]
    assert all(o.shape == zg.shape for o in outs)
    assert all(not torch.allclose(a, b) for i, a in enumerate(outs) for b in outs[i + 1 :])
    with pytest.raises(ValueError, match="softmax_mean_logits"):
        prior_mean("bogus", zg, zl)


@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_antithetic_timesteps(batch: int) -> None:
    g = torch.Generator().manual_seed(3)
    t = antithetic_timesteps(batch, T, generator=g)
    assert t.shape == (batch,) and t.dtype == torch.long
    assert int(t.min()) >= 0 and int(t.max()) <= T - 1
    half = batch // 2 + 1
    for i in range(batch - half):
        assert int(t[i] + t[half + i]) == T - 1
    t2 = antithetic_timesteps(batch, T, generator=torch.Generator().manual_seed(3))
    assert torch.equal(t, t2)


def test_antithetic_timesteps_is_uniform_ish() -> None:
    t = antithetic_timesteps(20000, 10, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(t, minlength=10).double()
    assert torch.all((counts / 20000 - 0.1).abs() < 0.02)
