"""Tests for diffmic.diffusion.schedule (noise schedule tables)."""

from __future__ import annotations

import math
from decimal import Decimal

import pytest
import torch

from diffmic.diffusion.schedule import BETA_SCHEDULES, NoiseSchedule, extract, make_beta_schedule

# Reference note §1.1 table (linear, T = 1000, float32): t -> (β, ᾱ, √ᾱ, √(1−ᾱ), 1−√ᾱ).
REFERENCE_TABLE = {
    0: ("1.0e-4", "0.99990", "0.99995", "0.0100", "5.0e-5"),
    59: ("1.28e-3", "0.9596", "0.9796", "0.2011", "0.0204"),
    249: ("5.06e-3", "0.5241", "0.7239", "0.6899", "0.2761"),
    499: ("1.00e-2", "0.0786", "0.2803", "0.9599", "0.7197"),
    999: ("0.02", "4.04e-5", "0.00635", "0.99998", "0.99365"),
}


def _tolerance(printed: str) -> float:
    """Half a unit in the last printed digit (the table's own rounding), with 1 % slack."""
    exponent = Decimal(printed).as_tuple().exponent
    return 0.5 * 10.0 ** int(exponent) * 1.01


@pytest.mark.parametrize("t", sorted(REFERENCE_TABLE))
def test_linear_schedule_matches_reference_table(t: int) -> None:
    s = NoiseSchedule.build("linear", 1000, dtype=torch.float32)
    got = (
        s.betas[t].item(),
        s.alphas_cumprod[t].item(),
        s.sqrt_alphas_cumprod[t].item(),
        s.sqrt_one_minus_alphas_cumprod[t].item(),
        1.0 - s.sqrt_alphas_cumprod[t].item(),
    )
    names = ("beta", "abar", "sqrt_abar", "sqrt_1m_abar", "1m_sqrt_abar")
    for name, value, printed in zip(names, got, REFERENCE_TABLE[t]):
        ref = float(printed)
        # The table is rounded to the printed digits (e.g. β_59 = 1.2753e-3 is printed 1.28e-3, a
        # 0.4 % rounding), so the tolerance is half a unit in the last printed digit.
        assert abs(value - ref) <= _tolerance(printed), (t, name, value, ref)


def test_linear_betas_endpoints_and_dtype() -> None:
    b = make_beta_schedule("linear", 1000, 1e-4, 0.02)
    assert b.dtype == torch.float64 and b.shape == (1000,)
    assert b[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert b[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert torch.allclose(b.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_quadratic_is_squared_linear_in_sqrt() -> None:
    b = make_beta_schedule("quadratic", 50, 1e-4, 0.02)
    assert torch.allclose(b.sqrt().diff(), b.sqrt().diff()[0].expand(49), rtol=1e-10, atol=1e-14)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)


def test_cosine_schedule_follows_nichol_dhariwal() -> None:
    T = 200
    b = make_beta_schedule("cosine", T)
    assert b.max().item() <= 0.999 + 1e-12
    f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = torch.cumprod(1 - b, 0)
    # below the clip, ᾱ_t = f(t+1)/f(0)
    for t in (0, 10, 100, 150):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert b[-1].item() == pytest.approx(0.999)


def test_sigmoid_schedule_range_and_symmetry() -> None:
    b = make_beta_schedule("sigmoid", 100, 1e-4, 0.02)
    assert torch.all(b.diff() > 0)
    assert 1e-4 < b[0].item() < 2e-4 and 0.0199 < b[-1].item() < 0.02
    assert (b + b.flip(0)).allclose(torch.full_like(b, 1e-4 + 0.02))


@pytest.mark.parametrize("kind", BETA_SCHEDULES)
def test_all_kinds_monotone_alpha_bar(kind: str) -> None:
    s = NoiseSchedule.build(kind, 300, dtype=torch.float64)
    abar = s.alphas_cumprod
    assert torch.all(abar > 0) and torch.all(abar <= 1)
    assert torch.all(abar.diff() < 0)
    assert s.alphas_cumprod_prev[0].item() == 1.0
    assert torch.equal(s.alphas_cumprod_prev[1:], abar[:-1])


def test_unknown_kind_lists_valid_kinds() -> None:
    with pytest.raises(ValueError, match="linear.*quadratic.*cosine.*sigmoid"):
        make_beta_schedule("exponential")


def test_gammas_sum_to_one_and_posterior_variance() -> None:
    s = NoiseSchedule.build("linear", 1000, dtype=torch.float64)
    total = s.gamma0 + s.gamma1 + s.gamma2
    assert torch.allclose(total[1:], torch.ones(999, dtype=torch.float64), atol=1e-12, rtol=0)
    assert s.posterior_variance[0].item() == 0.0
    # β̃_t = β_t (1−ᾱ_{t−1})/(1−ᾱ_t) checked independently at one t
    t = 123
    a = torch.cumprod(1 - s.betas, 0)
    expected = s.betas[t] * (1 - a[t - 1]) / (1 - a[t])
    assert s.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-12)
    # γ's explicitly at one t
    g0 = s.betas[t] * a[t - 1].sqrt() / (1 - a[t])
    g1 = (1 - a[t - 1]) * (1 - s.betas[t]).sqrt() / (1 - a[t])
    assert s.gamma0[t].item() == pytest.approx(g0.item(), rel=1e-12)
    assert s.gamma1[t].item() == pytest.approx(g1.item(), rel=1e-12)


def test_build_is_float64_then_cast() -> None:
    s32 = NoiseSchedule.build("linear", 1000, dtype=torch.float32)
    s64 = NoiseSchedule.build("linear", 1000, dtype=torch.float64)
    for name, v in s32.as_dict().items():
        assert v.dtype == torch.float32, name
        assert torch.equal(v, s64.as_dict()[name].float()), name
    # a float32 cumulative product differs from the cast float64 one (so the cast really happened)
    naive = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32), 0)
    assert not torch.equal(naive, s32.alphas_cumprod)
    assert torch.allclose(naive, s32.alphas_cumprod, rtol=1e-3)


def test_to_and_num_timesteps_and_frozen() -> None:
    s = NoiseSchedule.build("linear", 17)
    assert s.num_timesteps == 17
    s64 = s.to(dtype=torch.float64)
    assert s64.betas.dtype == torch.float64 and s.betas.dtype == torch.float32
    assert s.to().betas.dtype == torch.float32
    with pytest.raises(AttributeError):
        s.betas = torch.zeros(17)  # type: ignore[misc]


def test_extract_gathers_per_sample() -> None:
    values = torch.arange(10, dtype=torch.float64) * 2
    t = torch.tensor([0, 9, 3, 3])
    out = extract(values, t)
    assert out.shape == (4, 1)
    assert out.squeeze(1).tolist() == [0.0, 18.0, 6.0, 6.0]
