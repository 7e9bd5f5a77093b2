"""Calibration, referral, CARD uncertainty, conformal sets and bootstrap intervals against
hand-computed values and independent implementations (scipy); all data generated here."""

from __future__ import annotations

import math

import pytest
import torch

from diffmic.trust.bootstrap import bootstrap_ci
from diffmic.trust.calibration import (
    apply_temperature,
    brier,
    classwise_ece,
    ece,
    fit_referral,
    fit_temperature,
    nll,
    plot_reliability,
    reliability_bins,
)
from diffmic.trust.conformal import (
    aps_scores,
    aps_sets,
    fit_aps,
    image_uniforms,
    set_summary,
)
from diffmic.trust.uncertainty import card_uncertainty, pavpu


def test_ece_of_a_perfectly_calibrated_toy_set_is_zero():
    # 10 images at confidence 0.8 (8 right) and 4 at 0.75 (3 right): every bin's accuracy = confidence
    probs = torch.tensor([[0.8, 0.2]] * 10 + [[0.25, 0.75]] * 4)
    labels = torch.tensor([0] * 8 + [1] * 2 + [1] * 3 + [0])
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-6)
    # shift the confidence: ECE = |0.9 - 0.8| weighted over all 10 + 4 images
    probs2 = torch.tensor([[0.9, 0.1]] * 10 + [[0.25, 0.75]] * 4)
    assert ece(probs2, labels) == pytest.approx(10 / 14 * 0.1, abs=1e-6)


def test_classwise_ece_brier_nll_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]])
    labels = torch.tensor([0, 2])
    assert nll(probs, labels) == pytest.approx(-(math.log(0.7) + math.log(0.3)) / 2)
    b = ((0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.6**2 + 0.7**2)) / 2
    assert brier(probs, labels) == pytest.approx(b)
    # classwise: class 0 p=(0.7,0.1) y=(1,0): bins hold one image each -> (0.3 + 0.1)/2
    # class 1 p=(0.2,0.6) y=(0,0): (0.2 + 0.6)/2; class 2 p=(0.1,0.3) y=(0,1): (0.1 + 0.7)/2
    assert classwise_ece(probs, labels) == pytest.approx(((0.4 / 2) + (0.8 / 2) + (0.8 / 2)) / 3, abs=1e-6)


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_nll():
    g = torch.Generator().manual_seed(0)
    n, c = 4000, 5
    logits = torch.randn(n, c, generator=g) * 1.5
    labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).flatten()  # calibrated at T=1
    over = torch.softmax(3.0 * logits, -1)  # deliberately over-confident
    T = fit_temperature(over, labels)
    assert T == pytest.approx(3.0, rel=0.1)
    scaled = apply_temperature(over, T)
    assert nll(scaled, labels) < nll(over, labels) - 0.1
    assert ece(scaled, labels) < ece(over, labels) / 3
    assert torch.equal(scaled.argmax(-1), over.argmax(-1))  # the prediction never changes
    assert torch.allclose(apply_temperature(over, 1.0), over.double(), atol=1e-9)


def test_referral_threshold_max_fraction_and_target_accuracy():
    conf = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    correct = torch.tensor([0, 0, 1, 0, 1, 1, 1, 1, 1, 1])
    r = fit_referral(conf, correct, max_referred=0.2)
    assert r["threshold"] == pytest.approx(0.3) and r["fit_referred_fraction"] == pytest.approx(0.2)
    assert r["fit_accuracy_kept"] == pytest.approx(7 / 8)
    # accuracy 1.0 on kept images first reached by referring the 4 least confident
    r = fit_referral(conf, correct, target_accuracy=1.0)
    assert r["threshold"] == pytest.approx(0.5) and r["fit_referred_fraction"] == pytest.approx(0.4)
    r = fit_referral(conf, correct, max_referred=0.0)
    assert r["fit_referred_fraction"] == 0.0


def test_card_t_test_on_constructed_samples_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    # image 0: class 0 beats class 1 by 1, 2, 3, 4 -> t = 2.5 / (1.291 / 2) = 3.873, p = 0.0305 (df 3)
    a = torch.tensor([[5.0, 4.0, 0.0], [6.0, 4.0, 0.0], [7.0, 4.0, 0.0], [8.0, 4.0, 0.0]])
    # image 1: two classes tied on average, alternating -> t = 0, p = 1, uncertain
    b = torch.tensor([[1.0, 0.0, 0.2], [0.0, 1.0, 0.2], [1.0, 0.0, 0.2], [0.0, 1.0, 0.2]])
    u = card_uncertainty(torch.stack([a, b]))
    assert u.t[0] == pytest.approx(2.5 / (math.sqrt(5 / 3) / 2))
    ref = stats.ttest_rel(a[:, 0].double().numpy(), a[:, 1].double().numpy())
    assert float(u.p_value[0]) == pytest.approx(ref.pvalue, rel=1e-9)
    assert float(u.p_value[0]) == pytest.approx(0.0305, abs=5e-4)
    assert u.uncertain.tolist() == [False, True]
    assert float(u.p_value[1]) == pytest.approx(1.0)
    assert u.top2[0].tolist() == [0, 1]
    assert u.mean[0].tolist() == pytest.approx([6.5, 4.0, 0.0])
    # 95 % interval = 2.5 / 97.5 percentiles (linear interpolation) over the 4 samples
    assert float(u.low[0, 0]) == pytest.approx(5 + 0.075 * 1) and float(u.high[0, 0]) == pytest.approx(8 - 0.075)


def test_card_degenerate_cases_and_pavpu():
    same = torch.tensor([[[1.0, 0.0]] * 3])  # identical samples, clear winner: confident
    assert card_uncertainty(same).uncertain.tolist() == [False]
    one = torch.tensor([[[1.0, 0.0]]])  # K = 1: no test possible
    assert card_uncertainty(one).uncertain.tolist() == [True]
    correct = torch.tensor([1, 1, 0, 0, 1])
    uncertain = torch.tensor([0, 1, 1, 0, 0])
    r = pavpu(correct, uncertain)  # accurate&certain 2, inaccurate&uncertain 1 -> 3/5
    assert r["pavpu"] == pytest.approx(0.6)
    assert r["accuracy_confident"] == pytest.approx(2 / 3) and r["accuracy_uncertain"] == pytest.approx(0.5)


def test_aps_scores_and_sets_by_hand():
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    assert aps_scores(p).tolist()[0] == pytest.approx([0.5, 0.8, 1.0])
    assert aps_sets(p, 0.8).tolist() == [[True, True, False]]
    assert aps_sets(p, 0.1).tolist() == [[True, False, False]]  # never empty
    # q = ceil((n+1) * level)-th smallest true-class score: n = 4, level 0.6 -> 3rd
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 0, 1])  # scores 0.9, 1.0, 0.7, 0.8
    assert fit_aps(probs, labels, 0.6) == pytest.approx(0.9)
    assert fit_aps(probs, labels, 0.9) == math.inf  # too few images for 90 %


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_split_conformal_coverage_reaches_nominal_on_exchangeable_data(level):
    g = torch.Generator().manual_seed(1)
    c, n_cal, n_test, reps = 6, 300, 300, 200
    covs, covs_nr, sizes, sizes_nr = [], [], [], []
    for _ in range(reps):
        logits = torch.randn(n_cal + n_test, c, generator=g) * 2
        labels = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).flatten()
        probs = torch.softmax(logits * 2.5, -1)  # a miscalibrated model: the guarantee still holds
        u = torch.rand(n_cal + n_test, generator=g, dtype=torch.float64)
        q = fit_aps(probs[:n_cal], labels[:n_cal], level, u[:n_cal])
        sets = aps_sets(probs[n_cal:], q, u[n_cal:])
        covs.append(float(sets[torch.arange(n_test), labels[n_cal:]].double().mean()))
        sizes.append(float(sets.sum(-1).double().mean()))
        q_nr = fit_aps(probs[:n_cal], labels[:n_cal], level)  # non-randomised: conservative
        sets_nr = aps_sets(probs[n_cal:], q_nr)
        covs_nr.append(float(sets_nr[torch.arange(n_test), labels[n_cal:]].double().mean()))
        sizes_nr.append(float(sets_nr.sum(-1).double().mean()))
    mean_cov = sum(covs) / reps
    # guarantee: level <= E[coverage] <= level + 1/(n+1) for randomised APS (exact), plus what
    # forcing the top class into empty sets adds; the mean of 200 repetitions has a standard
    # error below 0.002
    assert mean_cov >= level - 0.006
    assert mean_cov <= level + 1 / (n_cal + 1) + 0.015
    assert sum(covs_nr) / reps >= level - 0.006  # also valid, larger sets
    assert sum(sizes_nr) > sum(sizes)
    s = set_summary(sets, labels[n_cal:], [f"c{i}" for i in range(c)], level)
    assert s["mean_set_size"] == pytest.approx(float(sets.sum(-1).double().mean()))


def test_image_uniforms_are_stable_and_uniform():
    u = image_uniforms([f"img{i}" for i in range(4000)])
    assert u.equal(image_uniforms([f"img{i}" for i in range(4000)]))
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.015)
    # randomised score of the true class: the mass above it plus u times its own
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    assert aps_scores(p, torch.tensor([0.5])).tolist()[0] == pytest.approx([0.25, 0.65, 0.9])


def test_bootstrap_ci_of_an_accuracy_matches_the_normal_approximation():
    n = 2000
    correct = torch.zeros(n)
    correct[:1400] = 1  # p = 0.7
    lo, hi = bootstrap_ci(lambda i: correct[i].mean(), n, num_resamples=1000, seed=3)
    half = 1.96 * math.sqrt(0.7 * 0.3 / n)  # 0.0201
    assert lo == pytest.approx(0.7 - half, abs=0.004) and hi == pytest.approx(0.7 + half, abs=0.004)
    assert bootstrap_ci(lambda i: correct[i].mean(), n, 200, seed=3) == bootstrap_ci(
        lambda i: correct[i].mean(), n, 200, seed=3
    )


def test_reliability_diagram_bins_and_png(tmp_path):
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.52, 0.48]])
    labels = torch.tensor([0, 1, 0])
    mc, ma, cnt = reliability_bins(probs, labels, 10)
    assert cnt[9] == 1 and cnt[5] == 2 and ma[5] == pytest.approx(0.5) and mc[5] == pytest.approx(0.535)
    out = plot_reliability([("raw", probs)], labels, tmp_path / "rel.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
