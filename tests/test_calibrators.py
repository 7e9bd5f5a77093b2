"""Multi-class calibrators beyond one temperature (issue 25.2): vector / matrix / Dirichlet scaling
against their closed-form optimum on constructed data, NLL never above the temperature's on the
fitting data, the arg-max kept where it must be, ``auto``'s rule by hand, and old stored
calibrations still applied."""

from __future__ import annotations

import math

import pytest
import torch

from diffmic.trust.calibration import (
    ARGMAX_KEPT,
    AUTO_CANDIDATES,
    AUTO_NLL_CANDIDATES,
    FIXED_CALIBRATORS,
    apply_affine,
    apply_calibration,
    apply_temperature,
    auto_choice,
    auto_nll_choice,
    calibrator_kind,
    compare_calibrators,
    ece,
    fit_affine,
    fit_calibration,
    fit_isotonic,
    nll,
    scores,
)


def _affine_data(seed: int, n: int, weight: torch.Tensor, bias: torch.Tensor):
    """Model probabilities p and labels drawn from softmax(W log p + b): the known map is the
    perfectly calibrating one (the maximum-likelihood fit converges to it)."""
    g = torch.Generator().manual_seed(seed)
    C = bias.numel()
    logp = torch.log_softmax(torch.randn(n, C, generator=g, dtype=torch.float64) * 1.5, -1)
    true = (logp * weight if weight.ndim == 1 else logp @ weight.T) + bias
    y = torch.multinomial(torch.softmax(true, -1), 1, generator=g).flatten()
    return logp.exp(), y, torch.softmax(true, -1)


def test_vector_scaling_recovers_the_map_that_calibrates_the_data():
    w = torch.tensor([0.5, 1.5, 2.0, 0.8], dtype=torch.float64)
    b = torch.tensor([0.3, -0.2, 0.1, 0.0], dtype=torch.float64)
    p, y, truth = _affine_data(0, 40000, w, b)
    f = fit_affine(p, y, "vector")
    got_w, got_b = (torch.tensor(f[k], dtype=torch.float64) for k in ("weight", "bias"))
    # b is defined up to a constant added to every class (softmax is unchanged)
    torch.testing.assert_close(got_w, w, atol=0.06, rtol=0)
    torch.testing.assert_close(got_b - got_b.mean(), b - b.mean(), atol=0.06, rtol=0)
    cal = apply_affine(p, f)
    assert (cal - truth).abs().max() < 0.05
    # the fitted map's NLL on these data is that of the true probabilities (the optimum), to rounding
    assert nll(cal, y) <= nll(truth, y) + 1e-3


def test_matrix_scaling_recovers_off_diagonal_terms_and_the_penalty_removes_them():
    W = torch.tensor([[1.2, 0.4, 0.0], [0.0, 0.8, -0.3], [0.2, 0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([0.2, 0.0, -0.4], dtype=torch.float64)
    p, y, truth = _affine_data(1, 40000, W, b)
    f = fit_affine(p, y, "matrix")
    got = torch.tensor(f["weight"], dtype=torch.float64)
    # W is defined up to a vector added to every row (it adds the same sum of log p to every
    # class): compare with the column means removed
    torch.testing.assert_close(got - got.mean(0), W - W.mean(0), atol=0.05, rtol=0)
    cal = apply_affine(p, f)
    assert (cal - truth).abs().mean() < 0.01
    assert nll(cal, y) <= nll(truth, y) + 1e-3
    # a very large ODIR weight drives the off-diagonal weights and the biases to 0: temperature-like
    heavy = fit_affine(p, y, "matrix", lam=1e4)
    Wh = torch.tensor(heavy["weight"])
    off = ~torch.eye(3, dtype=torch.bool)
    assert Wh[off].abs().max() < 1e-2 and torch.tensor(heavy["bias"]).abs().max() < 1e-2


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [25, 400])
def test_no_calibrator_fits_worse_than_the_temperature_alone(seed, n):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 5, generator=g) * 2
    y = torch.multinomial(torch.softmax(logits / 2 + torch.tensor([1.0, 0, 0, 0, -1.0]), -1), 1, generator=g).flatten()
    p = torch.softmax(logits, -1).double()
    base = nll(apply_calibration(p, fit_calibration(p, y, "temperature")), y)
    for kind in ("vector", "matrix", "dirichlet"):
        f = fit_calibration(p, y, kind)
        assert calibrator_kind(f) == kind
        assert nll(apply_calibration(p, f), y) <= base + 1e-9, kind


def test_arg_max_kept_by_temperature_and_isotonic_and_the_change_reported_otherwise():
    g = torch.Generator().manual_seed(5)
    n = 3000
    # the model under-predicts class 2 by a constant bias: a vector bias fixes it and changes arg-maxes
    logits = torch.randn(n, 3, generator=g, dtype=torch.float64) * 1.5
    y = torch.multinomial(
        torch.softmax(logits + torch.tensor([0.0, 0.0, 1.5], dtype=torch.float64), -1), 1, generator=g
    )
    y = y.flatten()
    p = torch.softmax(logits, -1)
    for kind in ARGMAX_KEPT:
        assert torch.equal(apply_calibration(p, fit_calibration(p, y, kind)).argmax(-1), p.argmax(-1)), kind
    assert set(AUTO_CANDIDATES) <= ARGMAX_KEPT  # auto never changes the prediction
    cal = apply_calibration(p, fit_calibration(p, y, "vector"))
    s = scores(cal, y, p)
    changed = cal.argmax(-1) != p.argmax(-1)
    assert s["argmax_changed"] == pytest.approx(float(changed.double().mean())) and s["argmax_changed"] > 0.05
    assert s["acc"] == pytest.approx(float((cal.argmax(-1) == y).double().mean()))
    # the images whose arg-max moved to class 2 are more often class 2 than the old arg-max
    assert (y[changed] == 2).double().mean() > 0.5


def test_auto_rule_by_hand():
    cv = {
        "temperature": {"ece": 0.06, "brier": 0.260},
        "temperature+isotonic": {"ece": 0.03, "brier": 0.257},
    }
    assert auto_choice(cv) == "temperature+isotonic"
    cv["temperature+isotonic"]["brier"] = 0.261  # lower ECE, but a worse Brier score: refused
    assert auto_choice(cv) == "temperature"
    cv["temperature+isotonic"].update(brier=0.260, ece=0.06)  # a tie on both: the simpler one
    assert auto_choice(cv) == "temperature"


def test_auto_nll_rule_by_hand():
    cv = {k: {"nll": 0.60, "ece": 0.05} for k in AUTO_NLL_CANDIDATES}
    assert auto_nll_choice(cv) == "temperature"  # a tie everywhere: the simplest
    cv["dirichlet"]["nll"] = 0.55
    cv["dirichlet"]["ece"] = 0.09  # a worse held-out ECE does not matter: the NLL decides
    assert auto_nll_choice(cv) == "dirichlet"
    cv["vector"]["nll"] = 0.549
    assert auto_nll_choice(cv) == "vector"
    assert set(AUTO_NLL_CANDIDATES) == set(FIXED_CALIBRATORS)


def test_auto_nll_finds_the_class_bias_and_leaves_a_calibrated_model_alone():
    """Probabilities off by a per-class bias (what vector scaling fixes, one temperature cannot):
    auto_nll leaves the temperature and its held-out NLL is lower than the temperature's on fresh
    images drawn the same way. Probabilities that are already calibrated: it keeps a temperature
    (within the noise, the simplest calibrator), and the test NLL does not get worse."""
    w = torch.ones(4, dtype=torch.float64)
    b = torch.tensor([0.8, 0.0, -0.6, 0.0], dtype=torch.float64)
    p, y, _ = _affine_data(3, 800, w, b)
    pt, yt, _ = _affine_data(4, 20000, w, b)
    f = fit_calibration(p, y, "auto_nll")
    assert f["auto"]["by"] == "auto_nll" and f["auto"]["chosen"] in ("vector", "matrix", "dirichlet")
    assert set(f["auto"]["cv"]) == set(AUTO_NLL_CANDIDATES)
    temp = fit_calibration(p, y, "temperature")
    assert nll(apply_calibration(pt, f), yt) < nll(apply_calibration(pt, temp), yt) - 0.01
    p0, y0, _ = _affine_data(5, 800, w, torch.zeros(4, dtype=torch.float64))
    pt0, yt0, _ = _affine_data(6, 20000, w, torch.zeros(4, dtype=torch.float64))
    f0 = fit_calibration(p0, y0, "auto_nll")
    assert nll(apply_calibration(pt0, f0), yt0) <= nll(pt0, yt0) + 0.005


def test_auto_keeps_the_same_choice_over_independent_validation_splits():
    """A shape one temperature cannot fix (correct 50 % below confidence 0.8, 95 % above): on 700
    images per split, auto takes the isotonic map on each of 5 independent splits."""
    picks = []
    for seed in range(5):
        g = torch.Generator().manual_seed(100 + seed)
        n = 700
        conf = torch.rand(n, generator=g) * 0.5 + 0.5
        correct = torch.rand(n, generator=g) < torch.where(conf < 0.8, 0.5, 0.95)
        probs = torch.stack([conf, 1 - conf], -1)
        picks.append(fit_calibration(probs, (~correct).long(), "auto")["auto"]["chosen"])
    assert picks == ["temperature+isotonic"] * 5


def test_old_stored_calibrations_still_apply():
    p = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(0)), -1).double()
    # session 5: a temperature and a method name; session 6: the isotonic knots beside it
    old_t = {"method": "temperature", "temperature": 1.7}
    torch.testing.assert_close(apply_calibration(p, old_t), apply_temperature(p, 1.7))
    knots = fit_isotonic(torch.linspace(0.4, 1.0, 50), torch.arange(50) % 3 != 0)
    old_iso = {"temperature": 1.2, "isotonic": knots}
    assert calibrator_kind(old_t) == "temperature" and calibrator_kind(old_iso) == "temperature+isotonic"
    from diffmic.trust.calibration import apply_isotonic

    torch.testing.assert_close(apply_calibration(p, old_iso), apply_isotonic(apply_temperature(p, 1.2), knots))


def test_compare_calibrators_fits_every_kind_and_scores_it_held_out():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(300, 4, generator=g) * 2
    y = torch.multinomial(torch.softmax(logits / 2, -1), 1, generator=g).flatten()
    p = torch.softmax(logits, -1).double()
    out = compare_calibrators(p, y)
    assert set(out["fitted"]) == set(FIXED_CALIBRATORS)
    assert set(out["cv"]) == {"none", *FIXED_CALIBRATORS}
    # "none" held out is the unscaled probabilities themselves
    assert out["cv"]["none"]["ece"] == pytest.approx(ece(p, y), abs=1e-6)
    assert out["cv"]["none"]["nll"] == pytest.approx(nll(p, y))
    # over-confident by a factor 2: every calibrator improves the held-out NLL on unscaled
    for kind in FIXED_CALIBRATORS:
        assert out["cv"][kind]["nll"] < out["cv"]["none"]["nll"], kind
    assert all(math.isfinite(v) for k in out["cv"].values() for v in k.values())


def test_a_stored_calibrator_is_checked_before_use():
    from diffmic.trust.calibration import check_calibration

    good = fit_calibration(
        torch.softmax(torch.randn(40, 3, generator=torch.Generator().manual_seed(0)), -1),
        torch.arange(40) % 3,
        "matrix",
    )
    check_calibration(good, 3)
    check_calibration({"temperature": 1.7}, 3)  # a calibration stored before the calibrators
    for bad, msg in (
        ({"temperature": 0}, r"\.temperature must be a positive number"),
        ({"temperature": "1"}, r"\.temperature must be a positive number"),
        ({**good, "affine": {**good["affine"], "weight": [[1.0, 0.0], [0.0, 1.0]]}}, r"\.affine\.weight must be 3"),
        ({**good, "affine": {**good["affine"], "bias": [0.0, float("nan"), 0.0]}}, r"\.affine\.bias must be 3"),
        ({"temperature": 1.0, "isotonic": {"x": [0.5, 0.2], "y": [0.1, 0.2]}}, r"\.isotonic must hold knots"),
    ):
        with pytest.raises(ValueError, match=msg):
            check_calibration(bad, 3)
