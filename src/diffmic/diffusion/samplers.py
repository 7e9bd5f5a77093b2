"""Reverse-process samplers for the DiffMIC label diffusion.

Every sampler takes an ``eps_fn(y_t [N, C], t LongTensor[N]) -> eps [N, C]`` closure. Image features
and the DCG guidance are bound inside the closure by the caller, so the (expensive) encoders run
once per image and only the small denoiser head runs at every step (reference note §9.1).

Samplers (``SAMPLERS``):

* ``"ddpm"`` — the full T-step CARD ancestral chain (what the released code runs for validation).
* ``"truncated"`` — the released code's ``test_timesteps`` behaviour: the *last* n steps of the
  T-step chain started from μ + N(0, I). **Not an accelerated sampler** (reference note §1.6).
* ``"ddim"`` — DDIM (η ∈ [0, 1]) on the residual r = y − μ with evenly spaced timesteps from T−1
  (or ``t_start``) to 0; a proper accelerated sampler for the same trained network (reference
  note §1.5, §9.1).
* ``"dpmpp2m"`` — DPM-Solver++(2M) (Lu et al., 2022), the multistep second-order solver of the
  probability-flow ODE in data prediction, on the same residual process (deterministic).

Noise: by default every random draw is ``torch.randn(prior_mean.shape, generator=generator,
device=prior_mean.device, dtype=prior_mean.dtype)`` (the generator must live on that device).
Alternatively ``noise=`` takes a tensor ``[num_noise_draws(...), N, C]`` whose rows replace all
draws in order (row 0 is the start state), so callers can use per-image seeded noise that does not
depend on the batch composition.

The samplers do not disable autograd; call them under ``torch.inference_mode()`` at test time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmic.diffusion.schedule import NoiseSchedule

__all__ = [
    "DDIM_STARTS",
    "SAMPLERS",
    "EpsFn",
    "SampleOptions",
    "SampleOutput",
    "SamplerSpec",
    "ddim_timesteps",
    "get_sampler",
    "num_noise_draws",
    "sample",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp2m",
    "sample_truncated",
]

EpsFn = Callable[[Tensor, Tensor], Tensor]
DDIM_STARTS: tuple[str, ...] = ("noise", "mean")
DEFAULT_DDIM_STEPS = 10


@dataclass
class SampleOutput:
    """Result of a sampler.

    Attributes:
        y0: final label estimate ``[N, C]`` (take ``argmax(-1)`` for the class).
        trajectory: with ``return_trajectory=True``, the list of states ``[N, C]``: the start state,
            the state after every update, and finally ``y0``; its length is the number of network
            calls + 1. ``None`` otherwise.
    """

    y0: Tensor
    trajectory: list[Tensor] | None = None


# ---------------------------------------------------------------------------------------------
# helpers


class _NoiseSource:
    """Yields the sampler's ``[N, C]`` noise draws, from a given tensor or freshly drawn."""

    def __init__(self, like: Tensor, num_draws: int, noise: Tensor | None, generator: torch.Generator | None) -> None:
        self._like = like
        self._generator = generator
        self._index = 0
        if noise is not None:
            expected = (num_draws, *like.shape)
            if tuple(noise.shape) != expected:
                raise ValueError(
                    f"noise must have shape {expected} (num_noise_draws x prior_mean.shape), got {tuple(noise.shape)}"
                )
            noise = noise.to(device=like.device, dtype=like.dtype)
        self._noise = noise

    def next(self) -> Tensor:
        """Return the next draw ``[N, C]``."""
        i = self._index
        self._index += 1
        if self._noise is not None:
            return self._noise[i]
        return torch.randn(
            self._like.shape, generator=self._generator, device=self._like.device, dtype=self._like.dtype
        )

    def skip(self) -> None:
        """Consume a draw without producing it (keeps the layout of a given ``noise`` tensor)."""
        self._index += 1


def _check_prior(prior_mean: Tensor) -> None:
    if prior_mean.ndim < 1 or not prior_mean.is_floating_point():
        raise ValueError("prior_mean must be a floating tensor [N, C]")


def _check_steps(n_steps: int, num_timesteps: int, what: str) -> int:
    if int(n_steps) != n_steps or not 1 <= n_steps <= num_timesteps:
        raise ValueError(f"{what} must be an integer in [1, {num_timesteps}], got {n_steps!r}")
    return int(n_steps)


def _call_eps(eps_fn: EpsFn, y: Tensor, t: Tensor) -> Tensor:
    eps = eps_fn(y, t)
    if eps.shape != y.shape:
        raise ValueError(f"eps_fn returned shape {tuple(eps.shape)}, expected {tuple(y.shape)}")
    return eps


def _full_t(step: int, like: Tensor) -> Tensor:
    return torch.full((like.shape[0],), step, dtype=torch.long, device=like.device)


def ddim_timesteps(num_timesteps: int, n_steps: int, t_start: int | None = None) -> Tensor:
    """Evenly spaced DDIM timesteps from ``t_start`` (default T−1) down to 0.

    ``linspace(t_start, 0, n_steps).round()``; strictly decreasing and unique for
    1 ≤ n_steps ≤ t_start + 1 (n_steps = 1 gives ``[t_start]``).

    Returns:
        CPU LongTensor ``[n_steps]``.
    """
    n_steps = _check_steps(n_steps, num_timesteps, "n_steps")
    top = num_timesteps - 1 if t_start is None else int(t_start)
    if not 0 <= top <= num_timesteps - 1:
        raise ValueError(f"t_start must be in [0, {num_timesteps - 1}], got {t_start!r}")
    if n_steps > top + 1:
        raise ValueError(f"n_steps={n_steps} exceeds the {top + 1} timesteps from t_start={top} to 0")
    ts = torch.linspace(top, 0, n_steps, dtype=torch.float64).round().long()
    ts = torch.unique_consecutive(ts)
    return ts


def num_noise_draws(name: str, num_timesteps: int, steps: int | None = None, eta: float = 0.0) -> int:
    """Number of ``[N, C]`` noise draws a sampler makes, including the start state.

    * ``"ddpm"``: T (start + one per step t = T−1 … 1; the t = 0 read-out is noise-free).
    * ``"truncated"``: n = ``steps`` (default T).
    * ``"ddim"``: 1 (start) + (n_steps − 1 if eta > 0 else 0), n_steps = ``steps`` (default 10).
    * ``"dpmpp2m"``: 1 (start; deterministic afterwards).
      The start row is counted even with ``start="mean"`` (where it is ignored), so the noise
      layout does not depend on ``start``.

    This is the leading size of the ``noise=`` tensor accepted by the samplers.
    """
    return get_sampler(name).num_draws(int(num_timesteps), steps, eta)


# ---------------------------------------------------------------------------------------------
# ancestral (CARD) samplers


def _ancestral(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    prior_mean: Tensor,
    n_steps: int,
    generator: torch.Generator | None,
    noise: Tensor | None,
    return_trajectory: bool,
) -> SampleOutput:
    """CARD ancestral chain over t = n−1 … 1 plus the noise-free t = 0 read-out (n calls)."""
    _check_prior(prior_mean)
    n = _check_steps(n_steps, schedule.num_timesteps, "n_steps")
    mu = prior_mean
    src = _NoiseSource(mu, n, noise, generator)

    # Per-step coefficients for t = n−1 … 0, precomputed once: [n, 6].
    idx = torch.arange(n - 1, -1, -1, device=schedule.device)
    sqrt_var = schedule.posterior_variance.clamp(min=0).sqrt()
    table = torch.stack(
        [
            schedule.sqrt_alphas_cumprod[idx],
            schedule.sqrt_one_minus_alphas_cumprod[idx],
            schedule.gamma0[idx],
            schedule.gamma1[idx],
            schedule.gamma2[idx],
            sqrt_var[idx],
        ],
        dim=1,
    ).to(device=mu.device, dtype=mu.dtype)

    y = mu + src.next()
    traj: list[Tensor] | None = [y] if return_trajectory else None
    for i in range(n - 1):  # t = n−1 … 1
        t = n - 1 - i
        eps = _call_eps(eps_fn, y, _full_t(t, mu))
        sqrt_ab, sqrt_1m_ab, g0, g1, g2, sd = table[i].unbind(0)
        y0_hat = (y - (1.0 - sqrt_ab) * mu - sqrt_1m_ab * eps) / sqrt_ab  # ŷ0 (§1.5)
        y = g0 * y0_hat + g1 * y + g2 * mu + sd * src.next()  # mean + √β̃_t z
        if traj is not None:
            traj.append(y)
    # t = 0: deterministic read-out ŷ0.
    eps = _call_eps(eps_fn, y, _full_t(0, mu))
    sqrt_ab, sqrt_1m_ab = table[n - 1, 0], table[n - 1, 1]
    y0 = (y - (1.0 - sqrt_ab) * mu - sqrt_1m_ab * eps) / sqrt_ab
    if traj is not None:
        traj.append(y0)
    return SampleOutput(y0=y0, trajectory=traj)


def sample_ddpm(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    prior_mean: Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Full T-step CARD ancestral sampler (paper Eq. 1 reverse chain; reference note §1.5–1.6).

    y_{T−1} = μ + z; for t = T−1 … 1: ŷ0 = [y_t − (1−√ᾱ_t)μ − √(1−ᾱ_t) ε̂]/√ᾱ_t,
    y_{t−1} = γ0 ŷ0 + γ1 y_t + γ2 μ + √β̃_t z; finally y0 = ŷ0 at t = 0 (no noise).
    Exactly T network calls and T noise draws.

    Args:
        eps_fn: ``eps_fn(y_t [N, C], t LongTensor[N]) -> eps [N, C]``.
        schedule: noise schedule.
        prior_mean: μ ``[N, C]`` (N = B·K when K samples per image are batched).
        generator: RNG for the noise draws (same device as ``prior_mean``).
        noise: optional ``[T, N, C]`` tensor replacing all draws in order.
        return_trajectory: also return all intermediate states.

    Returns:
        :class:`SampleOutput` with ``y0 [N, C]``.
    """
    return _ancestral(eps_fn, schedule, prior_mean, schedule.num_timesteps, generator, noise, return_trajectory)


def sample_truncated(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    prior_mean: Tensor,
    n_steps: int,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """The released code's ``test_timesteps`` sampler (reference note §1.6).

    Starts from y = μ + z **treated as if it were at t = n−1**, applies the CARD ancestral step for
    t = n−1 … 1 and the noise-free read-out at t = 0: the *last* n steps of the T-step chain, with
    no striding. Exactly n network calls and n noise draws; ``n_steps = T`` equals
    :func:`sample_ddpm`.

    This is **not** an accelerated sampler: the start distribution N(μ, I) is not the marginal at
    t = n−1 (e.g. at t = 59 the true std is 0.20, not 1), so it is SDEdit-like partial denoising
    from a mis-specified start. Use it to reproduce the released numbers (ISIC n = 250,
    APTOS n = 60); use :func:`sample_ddim` for proper few-step sampling.

    Args:
        eps_fn, schedule, prior_mean, generator, return_trajectory: as in :func:`sample_ddpm`.
        n_steps: n in [1, T].
        noise: optional ``[n, N, C]`` tensor replacing all draws in order.
    """
    return _ancestral(eps_fn, schedule, prior_mean, n_steps, generator, noise, return_trajectory)


# ---------------------------------------------------------------------------------------------
# DDIM on the residual


def sample_ddim(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    prior_mean: Tensor,
    n_steps: int = DEFAULT_DDIM_STEPS,
    eta: float = 0.0,
    *,
    start: str = "noise",
    t_start: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """DDIM (Song et al., 2021) on the residual r = y − μ (reference note §1.5 and §9.1).

    The forward process (paper Eq. 2) is a standard DDPM on r, so with timesteps
    τ_1 = T−1 > … > τ_n = 0 (:func:`ddim_timesteps`):

    * ε̂ = eps_fn(r + μ, τ_i);  r̂0 = (r − √(1−ᾱ_τ) ε̂) / √ᾱ_τ
    * σ = η √((1−ᾱ_prev)/(1−ᾱ_τ)) √(1 − ᾱ_τ/ᾱ_prev)
    * r ← √ᾱ_prev r̂0 + √(1−ᾱ_prev−σ²) ε̂ + σ z
    * the last step (τ_n = 0) returns y0 = r̂0 + μ.

    Exactly ``n_steps`` network calls.

    Args:
        eps_fn, schedule, prior_mean, generator, return_trajectory: as in :func:`sample_ddpm`.
        n_steps: number of timesteps (= network calls), in [1, T].
        eta: η ≥ 0; 0 is deterministic given the start, 1 is DDPM-like.
        start: ``"noise"`` (r_T ~ N(0, I), i.e. y_T = μ + z) or ``"mean"`` (r_T = 0, i.e. y_T = μ;
            with η = 0 the result is then deterministic and seed-free).
        t_start: first timestep (default T−1). ``t_start = n−1`` with ``start="mean"`` and η = 0
            is the deterministic counterpart of the truncated chain started at μ.
        noise: optional ``[num_noise_draws("ddim", T, n_steps, eta), N, C]`` tensor; row 0 is the
            start draw (ignored when ``start="mean"``), then one row per stochastic step.
    """
    _check_prior(prior_mean)
    if start not in DDIM_STARTS:
        raise ValueError(f"unknown DDIM start {start!r}; valid: {', '.join(DDIM_STARTS)}")
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    mu = prior_mean
    ts = ddim_timesteps(schedule.num_timesteps, n_steps, t_start)
    n = int(ts.numel())
    stochastic = eta > 0
    src = _NoiseSource(mu, 1 + (n - 1 if stochastic else 0), noise, generator)

    # Coefficients in float64, then cast: [n, 5] = √ᾱ, √(1−ᾱ), √ᾱ_prev, √(1−ᾱ_prev−σ²), σ.
    ab = schedule.alphas_cumprod.to(torch.float64)[ts.to(schedule.device)]
    ab_prev = torch.cat([ab[1:], ab.new_ones(1)])  # last entry unused (final step returns r̂0)
    sigma = eta * ((1.0 - ab_prev) / (1.0 - ab)).sqrt() * (1.0 - ab / ab_prev).clamp(min=0).sqrt()
    table = torch.stack(
        [ab.sqrt(), (1.0 - ab).sqrt(), ab_prev.sqrt(), (1.0 - ab_prev - sigma**2).clamp(min=0).sqrt(), sigma],
        dim=1,
    ).to(device=mu.device, dtype=mu.dtype)
    steps = ts.tolist()  # host-side list built once, before the loop

    if start == "noise":
        r = src.next()
    else:
        if noise is not None:
            src.skip()
        r = torch.zeros_like(mu)
    y = r + mu
    traj: list[Tensor] | None = [y] if return_trajectory else None
    y0 = y
    for i, t in enumerate(steps):
        eps = _call_eps(eps_fn, y, _full_t(t, mu))
        sqrt_ab, sqrt_1m_ab, sqrt_ab_prev, c_dir, sig = table[i].unbind(0)
        r0_hat = (r - sqrt_1m_ab * eps) / sqrt_ab
        if i == n - 1:
            y0 = r0_hat + mu
            y = y0
        else:
            r = sqrt_ab_prev * r0_hat + c_dir * eps
            if stochastic:
                r = r + sig * src.next()
            y = r + mu
        if traj is not None:
            traj.append(y)
    return SampleOutput(y0=y0, trajectory=traj)


def sample_dpmpp2m(
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    prior_mean: Tensor,
    n_steps: int = DEFAULT_DDIM_STEPS,
    *,
    start: str = "mean",
    t_start: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """DPM-Solver++(2M) (Lu et al., 2022) on the residual r = y − μ, a standard VP process.

    With α = √ᾱ_τ, σ = √(1−ᾱ_τ), λ = log(α/σ), timesteps τ_1 > … > τ_n = 0
    (:func:`ddim_timesteps`) and the data prediction D_i = r̂0(r_i, τ_i):

    * step i → i+1, h = λ_{i+1} − λ_i:  r ← (σ_{i+1}/σ_i) r − α_{i+1}(e^{−h} − 1) D,
      with D = D_i for the first step (= DDIM, η = 0) and
      D = (1 + 1/(2ρ)) D_i − 1/(2ρ) D_{i−1}, ρ = h_{i−1}/h, afterwards;
    * the last evaluation (τ_n = 0) returns y0 = D_n + μ.

    Exactly ``n_steps`` network calls; deterministic given the start.

    Args:
        eps_fn, schedule, prior_mean, generator, return_trajectory: as in :func:`sample_ddpm`.
        n_steps: number of network calls, in [1, t_start + 1].
        start: ``"mean"`` (r = 0, y = μ: seed-free) or ``"noise"`` (r ~ N(0, I)).
        t_start: first timestep (default T−1).
        noise: optional ``[1, N, C]`` tensor: the start draw (ignored when ``start="mean"``).
    """
    _check_prior(prior_mean)
    if start not in DDIM_STARTS:
        raise ValueError(f"unknown start {start!r}; valid: {', '.join(DDIM_STARTS)}")
    mu = prior_mean
    ts = ddim_timesteps(schedule.num_timesteps, n_steps, t_start)
    n = int(ts.numel())
    src = _NoiseSource(mu, 1, noise, generator)
    ab = schedule.alphas_cumprod.to(torch.float64)[ts.to(schedule.device)].cpu()
    alpha, sigma = ab.sqrt(), (1.0 - ab).sqrt()
    lam = (alpha / sigma).log()
    coef = [(float(alpha[i]), float(sigma[i])) for i in range(n)]
    if start == "noise":
        r = src.next()
    else:
        r = torch.zeros_like(mu)
    traj: list[Tensor] | None = [r + mu] if return_trajectory else None
    d_prev: Tensor | None = None
    y0 = r + mu
    for i, t in enumerate(ts.tolist()):
        a_i, s_i = coef[i]
        eps = _call_eps(eps_fn, r + mu, _full_t(t, mu))
        d = (r - s_i * eps) / a_i
        if i == n - 1:
            y0 = d + mu
            if traj is not None:
                traj.append(y0)
            break
        a_n, s_n = coef[i + 1]
        h = float(lam[i + 1] - lam[i])
        if d_prev is None:
            d_use = d
        else:
            rho = float(lam[i] - lam[i - 1]) / h
            d_use = (1.0 + 0.5 / rho) * d - (0.5 / rho) * d_prev
        r = (s_n / s_i) * r - a_n * math.expm1(-h) * d_use
        d_prev = d
        if traj is not None:
            traj.append(r + mu)
    return SampleOutput(y0=y0, trajectory=traj)


# ---------------------------------------------------------------------------------------------
# the registry: every sampler is declared once, here


@dataclass(frozen=True)
class SamplerSpec:
    """What the library needs to know about one sampler; :data:`SAMPLERS` lists their names.

    Attributes:
        name: the value of ``eval.sampler`` / ``eval.val_sampler``.
        run: ``run(eps_fn, schedule, prior_mean, options: SampleOptions) -> SampleOutput``; raises
            ``ValueError`` for an option the sampler does not support.
        num_draws: ``num_draws(T, steps, eta)``, the leading size of its ``noise=`` tensor
            (:func:`num_noise_draws`).
        takes_start: True for samplers that honour ``start`` (``"noise"`` / ``"mean"``) and
            ``t_start``; the ancestral chains always start from μ + z at the top of their window,
            and :func:`~diffmic.diffusion.reverse.reverse_sample` resets those options for them.
        full_chain: True when the sampler always runs all T steps (``steps`` is ignored).
    """

    name: str
    run: Callable[[EpsFn, NoiseSchedule, Tensor, SampleOptions], SampleOutput]
    num_draws: Callable[[int, int | None, float], int]
    takes_start: bool
    full_chain: bool = False

    def first_timestep(self, num_timesteps: int, steps: int | None, t_start: int | None) -> int:
        """The first (highest) timestep of the sampler's window.

        ``t_start`` (default T−1) for the samplers that take a start; ``steps − 1`` for a truncated
        ancestral chain; T − 1 for the full chain.
        """
        if self.takes_start:
            return num_timesteps - 1 if t_start is None else int(t_start)
        if self.full_chain or steps is None:
            return num_timesteps - 1
        return min(int(steps), num_timesteps) - 1


@dataclass(frozen=True)
class SampleOptions:
    """The options :func:`sample` passes to a sampler's ``run`` (see :func:`sample`)."""

    steps: int | None = None
    eta: float = 0.0
    start: str = "noise"
    t_start: int | None = None
    generator: torch.Generator | None = None
    noise: Tensor | None = None
    return_trajectory: bool = False


def _ancestral_options(name: str, o: SampleOptions) -> None:
    if o.t_start is not None:
        raise ValueError(f"t_start applies to 'ddim' and 'dpmpp2m' only, not {name!r}; set eval.t_start=null")
    if o.eta != 0 or o.start != "noise":
        raise ValueError(
            f"sampler {name!r} supports only eta=0 and start='noise' (got eta={o.eta}, start={o.start!r}); "
            "set eval.eta=0 eval.start=noise"
        )


def _run_ddpm(eps_fn: EpsFn, schedule: NoiseSchedule, prior_mean: Tensor, o: SampleOptions) -> SampleOutput:
    _ancestral_options("ddpm", o)
    T = schedule.num_timesteps
    if o.steps is not None and o.steps != T:
        raise ValueError(f"sampler 'ddpm' always runs T={T} steps; got steps={o.steps} (use 'truncated' or 'ddim')")
    return sample_ddpm(
        eps_fn, schedule, prior_mean, generator=o.generator, noise=o.noise, return_trajectory=o.return_trajectory
    )


def _run_truncated(eps_fn: EpsFn, schedule: NoiseSchedule, prior_mean: Tensor, o: SampleOptions) -> SampleOutput:
    _ancestral_options("truncated", o)
    n = schedule.num_timesteps if o.steps is None else o.steps
    return sample_truncated(
        eps_fn, schedule, prior_mean, n, generator=o.generator, noise=o.noise, return_trajectory=o.return_trajectory
    )


def _run_ddim(eps_fn: EpsFn, schedule: NoiseSchedule, prior_mean: Tensor, o: SampleOptions) -> SampleOutput:
    n = DEFAULT_DDIM_STEPS if o.steps is None else o.steps
    return sample_ddim(
        eps_fn,
        schedule,
        prior_mean,
        n,
        o.eta,
        start=o.start,
        t_start=o.t_start,
        generator=o.generator,
        noise=o.noise,
        return_trajectory=o.return_trajectory,
    )


def _run_dpmpp2m(eps_fn: EpsFn, schedule: NoiseSchedule, prior_mean: Tensor, o: SampleOptions) -> SampleOutput:
    if o.eta != 0:
        raise ValueError(f"sampler 'dpmpp2m' is deterministic: eta must be 0, got {o.eta}")
    n = DEFAULT_DDIM_STEPS if o.steps is None else o.steps
    return sample_dpmpp2m(
        eps_fn,
        schedule,
        prior_mean,
        n,
        start=o.start,
        t_start=o.t_start,
        generator=o.generator,
        noise=o.noise,
        return_trajectory=o.return_trajectory,
    )


def _ddim_draws(num_timesteps: int, steps: int | None, eta: float) -> int:
    n = ddim_timesteps(num_timesteps, DEFAULT_DDIM_STEPS if steps is None else steps).numel()
    return 1 + (n - 1 if eta > 0 else 0)


def _dpmpp2m_draws(num_timesteps: int, steps: int | None, eta: float) -> int:
    _check_steps(DEFAULT_DDIM_STEPS if steps is None else steps, num_timesteps, "steps")
    return 1


_REGISTRY: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", _run_ddpm, lambda T, steps, eta: int(T), takes_start=False, full_chain=True),
        SamplerSpec(
            "truncated",
            _run_truncated,
            lambda T, steps, eta: _check_steps(T if steps is None else steps, T, "steps"),
            takes_start=False,
        ),
        SamplerSpec("ddim", _run_ddim, _ddim_draws, takes_start=True),
        SamplerSpec("dpmpp2m", _run_dpmpp2m, _dpmpp2m_draws, takes_start=True),
    )
}
SAMPLERS: tuple[str, ...] = tuple(_REGISTRY)


def get_sampler(name: str) -> SamplerSpec:
    """The :class:`SamplerSpec` registered as ``name``.

    Raises:
        ValueError: ``name`` is not in :data:`SAMPLERS`.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None


def sample(
    name: str,
    eps_fn: EpsFn,
    schedule: NoiseSchedule,
    prior_mean: Tensor,
    *,
    steps: int | None = None,
    eta: float = 0.0,
    start: str = "noise",
    t_start: int | None = None,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    return_trajectory: bool = False,
) -> SampleOutput:
    """Run the sampler ``name`` in ``SAMPLERS``.

    Args:
        name: ``"ddpm"`` (``steps`` must be None or T), ``"truncated"`` (``steps`` = n, default T),
            ``"ddim"`` or ``"dpmpp2m"`` (``steps`` = number of network calls, default 10).
        eta, start: DDIM only; the ancestral samplers require ``eta == 0`` and ``start == "noise"``.
            ``"dpmpp2m"`` takes ``start`` and requires ``eta == 0``.
        t_start: first timestep of ``"ddim"`` / ``"dpmpp2m"`` (default T−1).
        Other arguments: as in :func:`sample_ddpm`.

    Raises:
        ValueError: unknown sampler name or an option the sampler does not support.
    """
    options = SampleOptions(steps, eta, start, t_start, generator, noise, return_trajectory)
    return get_sampler(name).run(eps_fn, schedule, prior_mean, options)
