"""Class-conditional (Mondrian) split-conformal sets and RAPS (issue 25.1) against hand-worked
quantiles and simulated exchangeable data with known class-conditional score distributions."""

from __future__ import annotations

import math

import pytest
import torch

from diffmic.trust.conformal import (
    CONFORMAL_METHODS,
    aps_scores,
    aps_sets,
    conformal_quantile,
    conformal_sets,
    fit_conformal,
    method_scores,
    raps_scores,
    set_summary,
)


def test_conformal_quantile_by_hand():
    s = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.7, 0.2, 0.8, 0.4, 0.6])  # n = 9
    # k = ceil((n + 1) level): 10 * 0.9 = 9 (not 9.000000000000002 rounded up to 10) -> the largest
    assert conformal_quantile(s, 0.9) == pytest.approx(0.9)
    assert conformal_quantile(s, 0.5) == pytest.approx(0.5)  # ceil(5) = 5th smallest
    assert conformal_quantile(s, 0.55) == pytest.approx(0.6)  # ceil(5.5) = 6th smallest
    assert conformal_quantile(s[:8], 0.9) == math.inf  # ceil(8.1) = 9 > 8 images
    with pytest.raises(ValueError, match=r"conformal level must be in \(0, 1\)"):
        conformal_quantile(s, 1.0)


def test_raps_scores_by_hand():
    p = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64)  # ranks 3, 1, 2
    assert aps_scores(p)[0].tolist() == pytest.approx([1.0, 0.5, 0.8])
    # + lam * max(0, rank - k_reg): k_reg = 1 -> penalties 0.2, 0, 0.1 (lam 0.1)
    assert raps_scores(p, lam=0.1, k_reg=1)[0].tolist() == pytest.approx([1.2, 0.5, 0.9])
    assert raps_scores(p, lam=0.1, k_reg=2)[0].tolist() == pytest.approx([1.1, 0.5, 0.8])
    u = torch.tensor([0.25], dtype=torch.float64)  # randomised: own probability counted u times
    assert raps_scores(p, u, lam=0.1, k_reg=1)[0].tolist() == pytest.approx([0.85 + 0.2, 0.125, 0.575 + 0.1])


def test_mondrian_quantiles_and_sets_by_hand():
    # class 0: 9 calibration images, class 1: 4 (too few for 90 %: included in every set)
    probs = torch.tensor(
        [[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4], [0.95, 0.05], [0.85, 0.15], [0.75, 0.25], [0.65, 0.35]]
        + [[0.55, 0.45]]
        + [[0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]],
        dtype=torch.float64,
    )
    labels = torch.tensor([0] * 9 + [1] * 4)
    f = fit_conformal(probs, labels, "mondrian_aps", 0.9)
    # non-randomised APS score of the true class 0 = p0 when class 0 is on top (all 9 are): the
    # 9th smallest of the 9 (k = ceil(10 * 0.9) = 9) is the largest, 0.95
    assert f["qhat_per_class"][0] == pytest.approx(0.95)
    assert f["qhat_per_class"][1] is None and f["always_included"] == [1] and f["n_per_class"] == [9, 4]
    # at level 0.5: class 0 scores sorted 0.55 0.6 0.65 0.7 0.75 ...: ceil(10 * 0.5) = 5th = 0.75;
    # class 1 scores 0.7, 1.0 (ranked second: 0.6 + 0.4), 0.8, 0.55: ceil(5 * 0.5) = 3rd smallest = 0.8
    f5 = fit_conformal(probs, labels, "mondrian_aps", 0.5)
    assert f5["qhat_per_class"] == pytest.approx([0.75, 0.8]) and f5["always_included"] == []
    new = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9]], dtype=torch.float64)
    # at 0.9 class 1 is in every set; class 0 when its score <= 0.95: 0.9 yes, 0.5 (tie: first) yes,
    # third image: class 0 is second, score 0.9 + 0.1 = 1.0 > 0.95 -> no
    assert conformal_sets(new, f).tolist() == [[True, True], [True, True], [False, True]]
    m = fit_conformal(probs, labels, "aps", 0.5)  # marginal: one quantile, 7th smallest of 13
    allscores = sorted(aps_scores(probs).gather(1, labels[:, None]).flatten().tolist())
    assert m["qhat"] == pytest.approx(allscores[6])


def test_a_calibration_stored_before_the_methods_still_gives_its_sets():
    p = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(0)), -1).double()
    u = torch.rand(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    old = {"method": "APS (randomised by image id, split conformal)", "level": 0.9, "qhat": 0.77}
    assert torch.equal(conformal_sets(p, old, u), aps_sets(p, 0.77, u))
    assert conformal_sets(p, {**old, "qhat": math.inf}).all()


def _imbalanced(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes with priors 0.8 / 0.15 / 0.05, exchangeable images; the model sees the common
    class clearly and the rare ones poorly, so their true-class scores are high."""
    y = torch.multinomial(torch.tensor([0.8, 0.15, 0.05]), n, replacement=True, generator=g)
    strength = torch.tensor([3.0, 1.0, 0.4])[y]  # how far the true class's logit stands out
    logits = torch.randn(n, 3, generator=g) + 1.2 * torch.tensor([1.0, 0.0, -0.5])  # a prior-like bias
    logits[torch.arange(n), y] += strength
    return torch.softmax(logits, -1).double(), y


@pytest.mark.parametrize("method", ["mondrian_aps", "mondrian_raps"])
def test_mondrian_sets_cover_every_class_and_marginal_ones_do_not(method):
    level, reps, n_cal, n_test = 0.9, 60, 2000, 2000
    g = torch.Generator().manual_seed(7)
    cov = {m: torch.zeros(reps, 3, dtype=torch.float64) for m in (method, method.split("_", 1)[1])}
    raw = torch.zeros(reps, 3, dtype=torch.float64)  # the score sets alone, without the forced top class
    n_min = n_cal
    for r in range(reps):
        p, y = _imbalanced(g, n_cal + n_test)
        u = torch.rand(n_cal + n_test, generator=g, dtype=torch.float64)
        n_min = min(n_min, int(torch.bincount(y[:n_cal], minlength=3).min()))
        yt = y[n_cal:]
        for m in cov:
            f = fit_conformal(p[:n_cal], y[:n_cal], m, level, u[:n_cal], lam=0.1, k_reg=1)
            sets = conformal_sets(p[n_cal:], f, u[n_cal:])
            hit = sets[torch.arange(n_test), yt].double()
            for c in range(3):
                cov[m][r, c] = hit[yt == c].mean()
            if m == method:
                s = method_scores(p[n_cal:], m, u[n_cal:], lam=0.1, k_reg=1)[torch.arange(n_test), yt]
                q = torch.tensor(f["qhat_per_class"], dtype=torch.float64)[yt]
                for c in range(3):
                    raw[r, c] = (s <= q)[yt == c].double().mean()
    # the rarest class has about 100 calibration and 100 test images per repetition: the mean over
    # 60 repetitions has a standard error below 0.005 (Beta(k, n + 1 - k) coverage given the
    # calibration split, binomial on the test images). Exact bound of the score sets, per class:
    # level <= coverage <= level + 1/(n_c + 1); forcing the top class in only adds coverage
    assert (raw.mean(0) >= level - 0.015).all() and (raw.mean(0) <= level + 1 / (n_min + 1) + 0.015).all(), raw
    mean = cov[method].mean(0)
    assert (mean >= level - 0.015).all(), mean
    assert (cov[method] >= raw).all()
    marginal = cov[method.split("_", 1)[1]].mean(0)
    # the marginal quantile reaches the level on average over images, carried by the common class
    # (over-covered), while the rare class falls far short
    assert marginal[0] > level + 0.03 and marginal[2] < level - 0.15, marginal


def test_marginal_raps_reaches_the_level_on_average_and_is_aps_without_its_penalty():
    level, reps, n = 0.9, 40, 1500
    g = torch.Generator().manual_seed(3)
    covs = []
    for _ in range(reps):
        logits = torch.randn(2 * n, 8, generator=g) * 1.5
        y = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).flatten()
        p = torch.softmax(logits * 0.7, -1).double()  # under-confident: the guarantee still holds
        u = torch.rand(2 * n, generator=g, dtype=torch.float64)
        f = fit_conformal(p[:n], y[:n], "raps", level, u[:n], lam=0.2, k_reg=1)
        s = conformal_sets(p[n:], f, u[n:])
        covs.append(float(s[torch.arange(n), y[n:]].double().mean()))
    assert level - 0.01 <= sum(covs) / reps <= level + 1 / (n + 1) + 0.01
    a = fit_conformal(p[:n], y[:n], "aps", level, u[:n])
    r0 = fit_conformal(p[:n], y[:n], "raps", level, u[:n], lam=0.0, k_reg=1)
    assert r0["qhat"] == pytest.approx(a["qhat"])
    assert torch.equal(conformal_sets(p[n:], r0, u[n:]), conformal_sets(p[n:], a, u[n:]))


def test_set_summary_names_the_classes_short_of_the_level():
    sets = torch.tensor([[True, False], [True, False], [False, True], [True, False]])
    labels = torch.tensor([0, 0, 1, 1])
    s = set_summary(sets, labels, ["a", "b"], 0.9)
    assert s["per_class"]["a"]["coverage"] == 1.0 and s["per_class"]["b"]["coverage"] == 0.5
    assert s["min_class_coverage"] == 0.5 and s["classes_short"] == ["b"]
    with pytest.raises(ValueError, match="conformal method must be one of"):
        fit_conformal(torch.ones(2, 2) / 2, torch.tensor([0, 1]), "lac")


def test_every_advertised_method_is_implemented_and_distinct():
    """Each name in CONFORMAL_METHODS (the choices of eval.conformal_method) fits, reaches its level on
    exchangeable simulated data, and gives sets different from every other method's."""
    g = torch.Generator().manual_seed(11)
    p, y = _imbalanced(g, 4000)
    u = torch.rand(4000, generator=g, dtype=torch.float64)
    sets = {}
    for m in CONFORMAL_METHODS:
        f = fit_conformal(p[:2000], y[:2000], m, 0.9, u[:2000])
        assert f["kind"] == m and ("qhat_per_class" in f) == m.startswith("mondrian"), f
        sets[m] = conformal_sets(p[2000:], f, u[2000:])
        assert sets[m][torch.arange(2000), y[2000:]].double().mean() >= 0.9 - 0.02, m
    names = list(sets)
    assert all(not torch.equal(sets[a], sets[b]) for i, a in enumerate(names) for b in names[i + 1 :])


def test_a_stored_conformal_fit_is_checked_before_use():
    from diffmic.trust.conformal import check_conformal

    p = torch.softmax(torch.randn(60, 3, generator=torch.Generator().manual_seed(0)), -1)
    y = torch.arange(60) % 3
    for m in CONFORMAL_METHODS:
        check_conformal(fit_conformal(p, y, m, 0.9), 3)
    check_conformal({"method": "APS (randomised by image id, split conformal)", "level": 0.9, "qhat": 0.8}, 3)
    good = fit_conformal(p, y, "mondrian_aps", 0.9)
    for bad, msg in (
        ({**good, "qhat_per_class": [0.5, 0.5]}, r"\.qhat_per_class must be 3 numbers or nulls"),
        ({**good, "kind": "lac"}, r"\.kind must be one of"),
        ({**good, "level": 1.5}, r"\.level must be a number in \(0, 1\)"),
        ({"kind": "aps", "level": 0.9, "qhat": "high"}, r"\.qhat must be a number or null"),
    ):
        with pytest.raises(ValueError, match=msg):
            check_conformal(bad, 3)
