"""Selective prediction (referral) metrics: closed forms and invariants."""

from __future__ import annotations

import pytest
import torch

from diffmic.metrics import risk_coverage, selective_summary


def test_risk_coverage_closed_form():
    # confidences rank the 3 correct images above the 2 wrong ones
    conf = torch.tensor([0.9, 0.2, 0.8, 0.1, 0.7])
    correct = torch.tensor([1, 0, 1, 0, 1])
    cov, acc = risk_coverage(conf, correct)
    torch.testing.assert_close(cov, torch.tensor([0.2, 0.4, 0.6, 0.8, 1.0], dtype=torch.float64))
    torch.testing.assert_close(acc, torch.tensor([1, 1, 1, 3 / 4, 3 / 5], dtype=torch.float64))
    s = selective_summary(conf, correct, coverages=(1.0, 0.6, 0.4))
    assert s["accuracy_at_coverage"] == {"1": pytest.approx(0.6), "0.6": 1.0, "0.4": 1.0}
    # AURC = mean error over k: (0 + 0 + 0 + 1/4 + 2/5) / 5
    assert s["aurc"] == pytest.approx((0.25 + 0.4) / 5)


def test_risk_coverage_extremes_and_ties():
    n = 50
    ones, zeros = torch.ones(n), torch.zeros(n)
    assert selective_summary(torch.rand(n), ones)["aurc"] == 0.0
    assert selective_summary(torch.rand(n), zeros)["aurc"] == 1.0
    # the worst ranking (wrong images most confident) gives a larger AURC than the best one
    correct = torch.tensor([1] * 30 + [0] * 20)
    conf = torch.linspace(1, 0, n)
    best = selective_summary(conf, correct)["aurc"]
    worst = selective_summary(1 - conf, correct)["aurc"]
    assert best < 0.4 < worst  # 0.4 = error rate = the full-coverage risk
    # equal confidences: input order decides (stable), and full coverage is the plain accuracy
    _, acc = risk_coverage(torch.full((4,), 0.5), torch.tensor([0, 1, 1, 1]))
    torch.testing.assert_close(acc, torch.tensor([0, 0.5, 2 / 3, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError):
        risk_coverage(torch.rand(3), torch.ones(4))


def test_referral_split():
    conf = torch.tensor([0.95, 0.9, 0.4, 0.3])
    correct = torch.tensor([1, 1, 0, 1])
    s = selective_summary(conf, correct, refer=conf < 0.5)
    assert s["referred_fraction"] == 0.5
    assert s["accuracy_kept"] == 1.0 and s["accuracy_referred"] == 0.5
    none = selective_summary(conf, correct, refer=torch.zeros(4, dtype=torch.bool))
    assert none["referred_fraction"] == 0.0 and none["accuracy_referred"] is None


def test_referral_rule():
    from diffmic.metrics import referral_rule, should_refer

    assert should_refer(0.4, 1.0, 0.5) and not should_refer(0.6, 1.0, 0.5)
    assert should_refer(0.9, 0.875, 0.5)  # 7 of 8 samples agree: refer
    assert not should_refer(0.9, None, 0.5)  # no samples (basic variant): confidence only
    # in words (issue 25.5): the fixed threshold, with sample agreement when there are K >= 2 samples
    assert referral_rule(0.5, 8) == (
        "refer to a clinician when the model's probability for its predicted class is below 0.500, or when "
        "its 8 reverse-diffusion samples do not all agree on the class (a fixed threshold, eval.refer_threshold: "
        "the model was not calibrated on validation images)"
    )
    assert "samples" not in referral_rule(0.5, None) and "samples" not in referral_rule(0.5, 1)
    # a threshold fitted on validation: no sample agreement, and how it was chosen
    fitted = {"max_referred": 0.2, "threshold": 0.74233, "fit_referred_fraction": 0.1997, "fit_accuracy_kept": 0.9108}
    assert referral_rule(0.5, 8, fitted={**fitted, "num_images": 701, "fitted_on": "val"}) == (
        "refer to a clinician when the model's calibrated probability for its predicted class is below 0.742 "
        "(threshold chosen on 701 validation images so that at most 20% of them are referred; 20.0% of them "
        "were referred and 91.1% of the others were classified correctly)"
    )
    target = {"target_accuracy": 0.9, "threshold": 0.8}
    assert "as the lowest at which the images kept reach 90% accuracy" in referral_rule(0.5, 8, fitted=target)
    assert referral_rule(0.5, None, also="when X").endswith("; also when X")
