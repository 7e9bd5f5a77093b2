"""Few-step samplers: DPM-Solver++(2M) and the truncated-window start (``t_start``).

Checked against closed forms: for Gaussian residual data r0 ~ N(m, s²) the exact noise
prediction is known, and the probability-flow ODE maps r_T to r_t linearly, so the exact
end point of every deterministic sampler is available in closed form.
"""

from __future__ import annotations

import pytest
import torch

from diffmic.diffusion import samplers
from diffmic.diffusion.schedule import NoiseSchedule


def _gaussian_eps_fn(schedule: NoiseSchedule, mu: torch.Tensor, m: float, s: float):
    """Exact ε̂ = E[ε | r_t] for r0 ~ N(m, s²) per coordinate (r = y − μ)."""
    ab = schedule.alphas_cumprod.to(torch.float64)

    def eps_fn(y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ab[t].sqrt()[:, None]
        sg = (1 - ab[t]).sqrt()[:, None]
        r = y - mu
        r0 = m + a * s**2 / (a**2 * s**2 + sg**2) * (r - a * m)
        return (r - a * r0) / sg

    return eps_fn


def _exact_readout(schedule: NoiseSchedule, r_start: torch.Tensor, t_start: int, m: float, s: float):
    """Exact PF-ODE transport from (r_start, t_start) to t = 0, then the exact r̂0 at t = 0."""
    ab = schedule.alphas_cumprod.to(torch.float64)
    a1, s1 = ab[t_start].sqrt(), (1 - ab[t_start]).sqrt()
    a0, s0 = ab[0].sqrt(), (1 - ab[0]).sqrt()
    z = (r_start - a1 * m) / (a1**2 * s**2 + s1**2).sqrt()
    r0 = a0 * m + (a0**2 * s**2 + s0**2).sqrt() * z
    return m + a0 * s**2 / (a0**2 * s**2 + s0**2) * (r0 - a0 * m)


def test_t_start_timesteps_hand_worked():
    assert samplers.ddim_timesteps(100, 5, t_start=24).tolist() == [24, 18, 12, 6, 0]
    assert samplers.ddim_timesteps(100, 1, t_start=24).tolist() == [24]
    assert samplers.ddim_timesteps(100, 3).tolist() == [99, 50, 0]  # default unchanged (49.5 rounds to 50)


def test_t_start_rejects_bad_values():
    import pytest

    with pytest.raises(ValueError, match="t_start"):
        samplers.ddim_timesteps(100, 5, t_start=100)
    with pytest.raises(ValueError, match="exceeds"):
        samplers.ddim_timesteps(100, 10, t_start=4)
    s = NoiseSchedule.build(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
    mu = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t_start"):
        samplers.sample("truncated", lambda y, t: torch.zeros_like(y), s, mu, steps=5, t_start=4)
    with pytest.raises(ValueError, match="eta"):
        samplers.sample("dpmpp2m", lambda y, t: torch.zeros_like(y), s, mu, eta=0.5)


def test_exact_eps_gives_exact_data_when_data_is_a_point():
    # r0 = c exactly: ε̂ = (r − √ᾱ c)/√(1−ᾱ) gives D = c at every step; any sampler returns μ + c.
    s = NoiseSchedule.build(num_timesteps=100, beta_start=1e-3, beta_end=0.2, dtype=torch.float64)
    mu = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)
    c = torch.tensor([[0.8, -0.5, -0.3]], dtype=torch.float64)
    ab = s.alphas_cumprod

    def eps_fn(y, t):
        a, sg = ab[t].sqrt()[:, None], (1 - ab[t]).sqrt()[:, None]
        return (y - mu - a * c) / sg

    for name in ("ddim", "dpmpp2m"):
        for start in ("mean", "noise"):
            out = samplers.sample(
                name, eps_fn, s, mu, steps=4, start=start, t_start=24, noise=torch.randn(1, 1, 3, dtype=torch.float64)
            )
            torch.testing.assert_close(out.y0, mu + c, rtol=0, atol=1e-10)


def test_dpmpp2m_converges_to_the_exact_ode_solution_and_beats_ddim():
    s = NoiseSchedule.build(num_timesteps=1000, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    mu = torch.rand(64, 4, generator=g, dtype=torch.float64)
    m, sd = 0.3, 0.2
    eps_fn = _gaussian_eps_fn(s, mu, m, sd)
    r_T = torch.randn(1, 64, 4, generator=g, dtype=torch.float64)
    exact = _exact_readout(s, r_T[0], 999, m, sd) + mu
    errs = {}
    for name in ("ddim", "dpmpp2m"):
        for n in (8, 1000):
            y0 = samplers.sample(name, eps_fn, s, mu, steps=n, start="noise", noise=r_T).y0
            errs[name, n] = float((y0 - exact).abs().max())
    # measured: ddim 0.37 / 0.0039, dpmpp2m 0.084 / 0.00037 (8 / 1000 steps)
    assert errs["dpmpp2m", 1000] < 1e-3
    assert errs["dpmpp2m", 8] < 0.5 * errs["ddim", 8]
    assert errs["dpmpp2m", 1000] < 0.2 * errs["ddim", 1000]


def test_mean_start_is_seed_free_and_matches_closed_form_from_the_window_start():
    s = NoiseSchedule.build(num_timesteps=100, beta_start=1e-3, beta_end=0.2, dtype=torch.float64)
    mu = torch.softmax(torch.randn(5, 7, generator=torch.Generator().manual_seed(1), dtype=torch.float64), -1)
    m, sd = 0.1, 0.3
    eps_fn = _gaussian_eps_fn(s, mu, m, sd)
    exact = _exact_readout(s, torch.zeros_like(mu), 24, m, sd) + mu  # r = 0 (y = μ) at t = 24
    a = samplers.sample(
        "dpmpp2m", eps_fn, s, mu, steps=25, start="mean", t_start=24, noise=torch.randn(1, 5, 7, dtype=torch.float64)
    ).y0
    b = samplers.sample(
        "dpmpp2m", eps_fn, s, mu, steps=25, start="mean", t_start=24, noise=torch.randn(1, 5, 7, dtype=torch.float64)
    ).y0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, exact, rtol=0, atol=2e-3)


def test_num_noise_draws_for_dpmpp2m_and_call_count():
    s = NoiseSchedule.build(num_timesteps=100, beta_start=1e-3, beta_end=0.2)
    assert samplers.num_noise_draws("dpmpp2m", 100, 5) == 1
    calls = []

    def eps_fn(y, t):
        calls.append(int(t[0]))
        return torch.zeros_like(y)

    out = samplers.sample(
        "dpmpp2m", eps_fn, s, torch.zeros(2, 3), steps=5, start="mean", t_start=24, return_trajectory=True
    )
    assert calls == [24, 18, 12, 6, 0]
    assert len(out.trajectory) == 6


def test_reverse_sample_ancestral_chains_ignore_the_ode_start_options():
    from diffmic.diffusion.reverse import reverse_sample

    m = _tiny_full()
    s = NoiseSchedule.build(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.randn(5, 2, 3)
    a = reverse_sample(m, s, x, sampler="truncated", steps=5, noise=noise).y0
    b = reverse_sample(m, s, x, sampler="truncated", steps=5, start="mean", t_start=4, noise=noise).y0
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the few-step default: deterministic, no noise needed, same answer for any seed
    c = reverse_sample(m, s, x, sampler="ddim", steps=3, start="mean", t_start=4, seed=1, ids=["a", "b"]).y0
    d = reverse_sample(m, s, x, sampler="ddim", steps=3, start="mean", t_start=4, seed=2, ids=["a", "b"]).y0
    torch.testing.assert_close(c, d, rtol=0, atol=0)


def _tiny_full(T: int = 20):
    from diffmic.nn.diffmic import DiffMIC

    torch.manual_seed(0)
    return DiffMIC(
        3,
        variant="full",
        encoder="resnet10_tiny",
        hidden_dim=16,
        num_layers=2,
        num_timesteps=T,
        dcg_global="resnet10_tiny",
        dcg_local="resnet10_tiny",
        num_rois=2,
    ).eval()


def test_point_readout_is_the_deterministic_ode_over_the_samplers_window():
    """eval.point_steps: beside the K sampled chains, the deterministic DDIM read-out from μ over the
    same window (the fast switch's answer), from the same encoder pass; the samples are unchanged."""
    from diffmic.diffusion.reverse import reverse_sample

    m, s = _tiny_full(), NoiseSchedule.build(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
    x = torch.randn(2, 3, 32, 32)
    noise = torch.randn(5, 2 * 4, 3)
    plain = reverse_sample(m, s, x, sampler="truncated", steps=5, num_samples=4, noise=noise)
    both = reverse_sample(m, s, x, sampler="truncated", steps=5, num_samples=4, noise=noise, point_steps=3)
    assert plain.point is None and both.point.shape == (2, 3)
    torch.testing.assert_close(both.y0, plain.y0, rtol=0, atol=0)
    fast = reverse_sample(m, s, x, sampler="ddim", steps=3, start="mean", t_start=4).y0[:, 0]  # window 5 -> t = 4
    torch.testing.assert_close(both.point, fast, rtol=1e-6, atol=1e-6)
    # the full chain's window is all T steps; an ODE sampler's is its own t_start
    full = reverse_sample(m, s, x, sampler="ddpm", noise=torch.randn(20, 2, 3), point_steps=3).point
    ode = reverse_sample(m, s, x, sampler="ddim", steps=3, start="mean").y0[:, 0]  # t_start default T - 1
    torch.testing.assert_close(full, ode, rtol=1e-6, atol=1e-6)


def test_readout_with_a_point_hand_values():
    from diffmic.metrics import readout

    # two images, K = 3 samples, C = 2
    y0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]])
    point = torch.tensor([[0.0, 0.2], [0.0, 1.0]])  # image 0: the point says class 1, 2 of 3 samples say 0
    r = readout(y0, "mean", 0.2, point=point)
    p1 = 1 / (1 + torch.exp(torch.tensor(-1.0)))  # softmax([0, 0.2] / 0.2)[1] = sigmoid(1)
    torch.testing.assert_close(r.probs[0], torch.stack([1 - p1, p1]))
    assert r.pred.tolist() == [1, 1]
    torch.testing.assert_close(r.agreement, torch.tensor([1 / 3, 1.0]))  # samples agreeing with the point
    torch.testing.assert_close(r.spread[1], torch.tensor(0.0))
    import pytest

    with pytest.raises(ValueError, match="point must be"):
        readout(y0, point=torch.zeros(2, 3))


def test_a_calibration_from_before_a_new_eval_key_still_matches():
    from diffmic.config import EvalConfig
    from diffmic.trust.evaluate import eval_settings, settings_match

    cur = EvalConfig()
    old = {k: v for k, v in eval_settings(cur).items() if k not in ("point_steps", "t_start")}
    assert settings_match(old, cur)
    cur.point_steps = 5
    assert not settings_match(old, cur) and settings_match(eval_settings(cur), cur)
    assert not settings_match(None, cur)


def test_point_readout_in_a_window_shorter_than_its_steps():
    """point_steps larger than the window: one call per timestep of the window (no error)."""
    from diffmic.diffusion.reverse import reverse_sample

    m, s = _tiny_full(), NoiseSchedule.build(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
    x = torch.randn(2, 3, 32, 32)
    out = reverse_sample(m, s, x, sampler="truncated", steps=3, noise=torch.randn(3, 2, 3), point_steps=5)
    ref = reverse_sample(m, s, x, sampler="ddim", steps=3, start="mean", t_start=2).y0[:, 0]
    torch.testing.assert_close(out.point, ref, rtol=1e-6, atol=1e-6)


def test_a_sampler_is_one_registry_entry(monkeypatch):
    """Adding a sampler is one `SamplerSpec` in `samplers._REGISTRY`: `sample`, `num_noise_draws`
    and `reverse_sample` (its start options, window and point read-out) all read the entry. A
    throw-away sampler that runs DDIM under another name gives DDIM's answer through every path."""
    from dataclasses import replace

    from diffmic.diffusion.reverse import reverse_sample

    spec = replace(samplers.get_sampler("ddim"), name="ddim_alias")
    monkeypatch.setitem(samplers._REGISTRY, "ddim_alias", spec)
    m, s = _tiny_full(), NoiseSchedule.build(num_timesteps=20, beta_start=1e-3, beta_end=0.2)
    x = torch.randn(2, 3, 32, 32)
    assert samplers.num_noise_draws("ddim_alias", 20, 4, 0.5) == samplers.num_noise_draws("ddim", 20, 4, 0.5) == 4
    kw = dict(steps=3, start="mean", t_start=9, seed=3, ids=["a", "b"], point_steps=2)
    a = reverse_sample(m, s, x, sampler="ddim", **kw)
    b = reverse_sample(m, s, x, sampler="ddim_alias", **kw)
    torch.testing.assert_close(b.y0, a.y0, rtol=0, atol=0)
    torch.testing.assert_close(b.point, a.point, rtol=0, atol=0)
    # the same spec declared as an ancestral-style sampler: reverse_sample resets start/t_start, and
    # the point read-out's window is the last `steps` timesteps instead of t_start
    anc = replace(spec, name="ddim_anc", takes_start=False)
    monkeypatch.setitem(samplers._REGISTRY, "ddim_anc", anc)
    assert anc.first_timestep(20, 3, 9) == 2 and spec.first_timestep(20, 3, 9) == 9
    c = reverse_sample(m, s, x, sampler="ddim_anc", **kw)
    d = reverse_sample(m, s, x, sampler="ddim", **{**kw, "start": "noise", "t_start": None})
    torch.testing.assert_close(c.y0, d.y0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="valid samplers: ddpm, truncated, ddim, dpmpp2m"):
        samplers.get_sampler("euler")


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_every_sampler_uses_exactly_its_declared_noise_draws(name):
    """`num_draws` is the leading size of the noise a sampler accepts: one row more or less is refused."""
    s = NoiseSchedule.build(num_timesteps=12, beta_start=1e-3, beta_end=0.2)
    mu = torch.zeros(2, 3)
    steps = None if samplers.get_sampler(name).full_chain else 4
    eta = 0.5 if name == "ddim" else 0.0
    n = samplers.num_noise_draws(name, 12, steps, eta)
    eps_fn = lambda y, t: torch.zeros_like(y)  # noqa: E731
    samplers.sample(name, eps_fn, s, mu, steps=steps, eta=eta, noise=torch.randn(n, 2, 3))
    for wrong in (n - 1, n + 1):
        with pytest.raises(ValueError, match="noise must have shape"):
            samplers.sample(name, eps_fn, s, mu, steps=steps, eta=eta, noise=torch.randn(wrong, 2, 3))
