"""Tests for diffmic.diffusion.samplers (ancestral, truncated and DDIM samplers)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from diffmic.diffusion.process import posterior_mean_variance, predict_y0_from_eps
from diffmic.diffusion.samplers import (
    SAMPLERS,
    SampleOutput,
    ddim_timesteps,
    num_noise_draws,
    sample,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp2m,
    sample_truncated,
)
from diffmic.diffusion.schedule import NoiseSchedule

T = 1000
N, C = 6, 4


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.build("linear", T, dtype=torch.float64)


@pytest.fixture(scope="module")
def small() -> NoiseSchedule:
    return NoiseSchedule.build("linear", 50, beta_start=1e-3, beta_end=0.2, dtype=torch.float64)


def _problem(seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y0 = torch.nn.functional.one_hot(torch.randint(0, C, (N,), generator=g), C).double()
    mu = torch.softmax(2 * torch.randn(N, C, generator=g, dtype=torch.float64), -1)
    return y0, mu


class Recorder:
    """Wraps an eps function and records every timestep tensor it receives."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn
        self.ts: list[Tensor] = []

    def __call__(self, y: Tensor, t: Tensor) -> Tensor:
        assert t.dtype == torch.long and t.shape == (y.shape[0],)
        assert torch.all(t == t[0])
        self.ts.append(t.clone())
        return self.fn(y, t)

    @property
    def steps(self) -> list[int]:
        return [int(t[0]) for t in self.ts]


def oracle(schedule: NoiseSchedule, y0: Tensor, mu: Tensor) -> Recorder:
    """Bayes-optimal ε for a deterministic y0: ε̂ = (y_t − √ᾱ_t y0 − (1−√ᾱ_t) μ) / √(1−ᾱ_t)."""

    def fn(y: Tensor, t: Tensor) -> Tensor:
        a = schedule.sqrt_alphas_cumprod[t].unsqueeze(1)
        s = schedule.sqrt_one_minus_alphas_cumprod[t].unsqueeze(1)
        return (y - a * y0 - (1 - a) * mu) / s

    return Recorder(fn)


def smooth_net(mu: Tensor) -> Recorder:
    """A non-oracle, t-dependent ε-net (so that noise and arithmetic matter)."""
    return Recorder(lambda y, t: 0.5 * torch.tanh(y - mu) + 1e-3 * t.unsqueeze(1).to(y.dtype))


def _sequential_noise(seed: int, draws: int, like: Tensor) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randn(like.shape, generator=g, dtype=like.dtype) for _ in range(draws)])


# --- oracle recovery -----------------------------------------------------------------------------


def test_ddpm_oracle_recovers_y0_with_T_calls(sched: NoiseSchedule) -> None:
    y0, mu = _problem()
    eps = oracle(sched, y0, mu)
    out = sample_ddpm(eps, sched, mu, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, SampleOutput) and out.trajectory is None
    assert torch.allclose(out.y0, y0, atol=1e-3)
    assert len(eps.ts) == T
    assert eps.steps == list(range(T - 1, -1, -1))


@pytest.mark.parametrize("n", [250, 60])
def test_truncated_oracle_recovers_y0_with_n_calls(sched: NoiseSchedule, n: int) -> None:
    y0, mu = _problem(1)
    eps = oracle(sched, y0, mu)
    out = sample_truncated(eps, sched, mu, n, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(out.y0, y0, atol=1e-3)
    assert eps.steps == list(range(n - 1, -1, -1))  # no striding: the last n steps of the chain


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("start", ["noise", "mean"])
def test_ddim_oracle_recovers_y0(sched: NoiseSchedule, eta: float, start: str) -> None:
    y0, mu = _problem(2)
    eps = oracle(sched, y0, mu)
    out = sample_ddim(eps, sched, mu, 10, eta, start=start, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.y0, y0, atol=1e-3)
    assert len(eps.ts) == 10
    expected = torch.linspace(T - 1, 0, 10).round().long().tolist()
    assert eps.steps == expected and expected[0] == T - 1 and expected[-1] == 0


def test_ddim_timesteps() -> None:
    assert ddim_timesteps(1000, 10).tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert ddim_timesteps(1000, 1).tolist() == [999]
    assert ddim_timesteps(7, 7).tolist() == [6, 5, 4, 3, 2, 1, 0]
    for n in (2, 3, 17, 999, 1000):
        ts = ddim_timesteps(1000, n)
        assert ts.numel() == n and torch.all(ts.diff() < 0)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 1001)
    with pytest.raises(ValueError):
        ddim_timesteps(1000, 0)


# --- exact step maths with a non-oracle net ----------------------------------------------------


def test_truncated_two_steps_by_hand(small: NoiseSchedule) -> None:
    _, mu = _problem(3)
    net = smooth_net(mu)
    noise = _sequential_noise(5, 2, mu)
    out = sample_truncated(net, small, mu, 2, noise=noise)
    # by hand: start at t = 1, one ancestral step, then the t = 0 read-out
    b = small.betas
    abar = torch.cumprod(1 - b, 0)
    y = mu + noise[0]
    t1 = torch.ones(N, dtype=torch.long)
    e = net.fn(y, t1)
    y0_hat = (y - (1 - abar[1].sqrt()) * mu - (1 - abar[1]).sqrt() * e) / abar[1].sqrt()
    g0 = b[1] * abar[0].sqrt() / (1 - abar[1])
    g1 = (1 - abar[0]) * (1 - b[1]).sqrt() / (1 - abar[1])
    var = b[1] * (1 - abar[0]) / (1 - abar[1])
    y = g0 * y0_hat + g1 * y + (1 - g0 - g1) * mu + var.sqrt() * noise[1]
    e = net.fn(y, torch.zeros(N, dtype=torch.long))
    y0 = (y - (1 - abar[0].sqrt()) * mu - (1 - abar[0]).sqrt() * e) / abar[0].sqrt()
    assert torch.allclose(out.y0, y0, atol=1e-12)


def test_ancestral_step_uses_process_functions(small: NoiseSchedule) -> None:
    _, mu = _problem(4)
    net = smooth_net(mu)
    noise = _sequential_noise(6, 3, mu)
    out = sample_truncated(net, small, mu, 3, noise=noise, return_trajectory=True)
    y = mu + noise[0]
    for i, step in enumerate((2, 1)):
        t = torch.full((N,), step, dtype=torch.long)
        y0_hat = predict_y0_from_eps(small, y, t, mu, net.fn(y, t))
        mean, var = posterior_mean_variance(small, y0_hat, y, t, mu)
        y = mean + var.sqrt() * noise[i + 1]
        assert torch.allclose(out.trajectory[i + 1], y, atol=1e-12)
    t0 = torch.zeros(N, dtype=torch.long)
    assert torch.allclose(out.y0, predict_y0_from_eps(small, y, t0, mu, net.fn(y, t0)), atol=1e-12)


def test_ddim_two_steps_by_hand(small: NoiseSchedule) -> None:
    _, mu = _problem(5)
    net = smooth_net(mu)
    noise = _sequential_noise(7, 1, mu)
    out = sample_ddim(net, small, mu, 2, 0.0, noise=noise)
    abar = small.alphas_cumprod
    tT, t0 = small.num_timesteps - 1, 0
    r = noise[0]
    e = net.fn(r + mu, torch.full((N,), tT, dtype=torch.long))
    r0 = (r - (1 - abar[tT]).sqrt() * e) / abar[tT].sqrt()
    r = abar[t0].sqrt() * r0 + (1 - abar[t0]).sqrt() * e
    e = net.fn(r + mu, torch.zeros(N, dtype=torch.long))
    r0 = (r - (1 - abar[t0]).sqrt() * e) / abar[t0].sqrt()
    assert torch.allclose(out.y0, r0 + mu, atol=1e-12)


def test_ddim_full_steps_eta1_equals_ddpm(small: NoiseSchedule) -> None:
    """DDIM with every timestep and η = 1 is the DDPM posterior step on r (σ² = β̃_t)."""
    _, mu = _problem(6)
    Ts = small.num_timesteps
    assert num_noise_draws("ddim", Ts, Ts, 1.0) == num_noise_draws("ddpm", Ts, None, 0.0) == Ts
    noise = _sequential_noise(8, Ts, mu)
    a = sample_ddpm(smooth_net(mu), small, mu, noise=noise)
    b = sample_ddim(smooth_net(mu), small, mu, Ts, 1.0, noise=noise)
    assert torch.allclose(a.y0, b.y0, atol=1e-9)


# --- noise handling, reproducibility ------------------------------------------------------------


def test_num_noise_draws() -> None:
    assert num_noise_draws("ddpm", 1000, None, 0.0) == 1000
    assert num_noise_draws("truncated", 1000, 250, 0.0) == 250
    assert num_noise_draws("truncated", 1000, None, 0.0) == 1000
    assert num_noise_draws("ddim", 1000, 10, 0.0) == 1
    assert num_noise_draws("ddim", 1000, 10, 0.5) == 10
    assert num_noise_draws("ddim", 1000, None, 0.0) == 1
    with pytest.raises(ValueError, match="ddpm"):
        num_noise_draws("euler", 1000, 10, 0.0)


@pytest.mark.parametrize(
    "name,steps,eta",
    [("ddpm", None, 0.0), ("truncated", 60, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0)],
)
def test_given_noise_replaces_generator_draws(small: NoiseSchedule, name: str, steps: int | None, eta: float) -> None:
    _, mu = _problem(8)
    steps = None if steps is None else min(steps, small.num_timesteps)
    draws = num_noise_draws(name, small.num_timesteps, steps, eta)
    noise = _sequential_noise(11, draws, mu)
    gen = torch.Generator().manual_seed(11)
    from_gen = sample(name, smooth_net(mu), small, mu, steps=steps, eta=eta, generator=gen)
    from_noise = sample(name, smooth_net(mu), small, mu, steps=steps, eta=eta, noise=noise)
    assert torch.equal(from_gen.y0, from_noise.y0)
    other = sample(name, smooth_net(mu), small, mu, steps=steps, eta=eta, generator=torch.Generator().manual_seed(12))
    assert not torch.allclose(other.y0, from_gen.y0)


def test_ddim_mean_start_is_seed_free(sched: NoiseSchedule) -> None:
    _, mu = _problem(10)
    a = sample_ddim(smooth_net(mu), sched, mu, 10, 0.0, start="mean", generator=torch.Generator().manual_seed(0))
    b = sample_ddim(smooth_net(mu), sched, mu, 10, 0.0, start="mean", generator=torch.Generator().manual_seed(1))
    c = sample_ddim(smooth_net(mu), sched, mu, 10, 0.0, start="mean", noise=torch.full((1, N, C), 5.0, dtype=mu.dtype))
    assert torch.equal(a.y0, b.y0) and torch.equal(a.y0, c.y0)


def test_noise_shape_is_checked(sched: NoiseSchedule) -> None:
    _, mu = _problem(11)
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_truncated(smooth_net(mu), sched, mu, 60, noise=torch.zeros(59, N, C, dtype=mu.dtype))
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_ddim(smooth_net(mu), sched, mu, 10, 0.5, noise=torch.zeros(1, N, C, dtype=mu.dtype))


def test_trajectory_lengths(sched: NoiseSchedule, small: NoiseSchedule) -> None:
    _, mu = _problem(12)
    noise = _sequential_noise(1, small.num_timesteps, mu)
    out = sample_ddpm(smooth_net(mu), small, mu, noise=noise, return_trajectory=True)
    assert len(out.trajectory) == small.num_timesteps + 1
    assert torch.equal(out.trajectory[0], mu + noise[0]) and out.trajectory[-1] is out.y0
    out = sample_truncated(smooth_net(mu), sched, mu, 60, return_trajectory=True)
    assert len(out.trajectory) == 61 and out.trajectory[-1] is out.y0
    out = sample_ddim(smooth_net(mu), sched, mu, 10, 0.0, start="mean", return_trajectory=True)
    assert len(out.trajectory) == 11 and torch.equal(out.trajectory[0], mu) and out.trajectory[-1] is out.y0
    assert all(x.shape == (N, C) for x in out.trajectory)


def test_zero_eps_truncated_leaves_unit_noise(sched: NoiseSchedule) -> None:
    """ε̂ ≡ 0 with n = 60 returns μ plus noise of std ≈ 1 (reference note §1.6)."""
    n_rows, c = 2000, 7
    mu = torch.softmax(torch.randn(n_rows, c, generator=torch.Generator().manual_seed(0), dtype=torch.float64), -1)
    out = sample_truncated(lambda y, t: torch.zeros_like(y), sched, mu, 60, generator=torch.Generator().manual_seed(1))
    resid = out.y0 - mu
    assert abs(resid.mean().item()) < 0.05
    assert 0.8 < resid.std().item() < 1.3


# --- dispatch --------------------------------------------------------------------------------


def test_sample_dispatch(sched: NoiseSchedule) -> None:
    y0, mu = _problem(13)
    # every advertised name runs its own sampler (a name missing here is a KeyError: test it),
    # and with the Bayes-optimal ε recovers y0 in the documented number of network calls
    direct = {
        "ddpm": lambda f, g: sample_ddpm(f, sched, mu, generator=g),
        "truncated": lambda f, g: sample_truncated(f, sched, mu, T, generator=g),
        "ddim": lambda f, g: sample_ddim(f, sched, mu, 10, generator=g),
        "dpmpp2m": lambda f, g: sample_dpmpp2m(f, sched, mu, 10, start="noise", generator=g),
    }
    calls = {"ddpm": T, "truncated": T, "ddim": 10, "dpmpp2m": 10}
    for name in SAMPLERS:
        rec = oracle(sched, y0, mu)
        torch.testing.assert_close(sample(name, rec, sched, mu, generator=torch.Generator().manual_seed(4)).y0, y0)
        assert len(rec.ts) == calls[name], name
        got = sample(name, smooth_net(mu), sched, mu, generator=torch.Generator().manual_seed(5)).y0
        assert torch.equal(got, direct[name](smooth_net(mu), torch.Generator().manual_seed(5)).y0), name
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    a = sample("truncated", oracle(sched, y0, mu), sched, mu, steps=60, generator=g())
    b = sample_truncated(oracle(sched, y0, mu), sched, mu, 60, generator=g())
    assert torch.equal(a.y0, b.y0)
    a = sample("ddim", oracle(sched, y0, mu), sched, mu, steps=5, eta=0.3, generator=g())
    b = sample_ddim(oracle(sched, y0, mu), sched, mu, 5, 0.3, generator=g())
    assert torch.equal(a.y0, b.y0)
    rec = oracle(sched, y0, mu)
    sample("ddim", rec, sched, mu)
    assert len(rec.ts) == 10  # default DDIM steps
    with pytest.raises(ValueError, match="ddpm.*truncated.*ddim"):
        sample("dpm_solver", rec, sched, mu)
    with pytest.raises(ValueError):
        sample("ddpm", rec, sched, mu, steps=10)
    with pytest.raises(ValueError):
        sample("truncated", rec, sched, mu, steps=10, start="mean")
    with pytest.raises(ValueError):
        sample_ddim(rec, sched, mu, 10, start="middle")


def test_float32_prior_gives_float32_output(sched: NoiseSchedule) -> None:
    y0, mu = _problem(14)
    y0, mu = y0.float(), mu.float()
    s32 = sched.to(dtype=torch.float32)
    out = sample_ddim(oracle(s32, y0, mu), s32, mu, 10, 0.0, generator=torch.Generator().manual_seed(0))
    assert out.y0.dtype == torch.float32
    assert torch.allclose(out.y0, y0, atol=1e-3)
