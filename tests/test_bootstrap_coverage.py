"""The percentile-bootstrap intervals that every headline metric carries (``trust.bootstrap``) cover the
true value about as often as their level says, on simulated data with a known answer."""

from __future__ import annotations

import numpy as np
import torch

from diffmic.trust.bootstrap import bootstrap_ci


def test_accuracy_interval_covers_the_true_accuracy_at_its_level():
    """200 test sets of 300 images, each image right with probability 0.8: the 90 % interval of the
    accuracy contains 0.8 in about 90 % of them (binomial SD of the coverage over 200 sets: 2.1
    points; the percentile bootstrap of a mean runs a little narrow at this n)."""
    rng = np.random.default_rng(0)
    p, n, sets = 0.8, 300, 200
    hits, widths = 0, []
    for s in range(sets):
        correct = torch.from_numpy(rng.random(n) < p).double()
        lo, hi = bootstrap_ci(lambda idx, c=correct: float(c[idx].mean()), n, num_resamples=300, seed=s, level=0.9)
        hits += lo <= p <= hi
        widths.append(hi - lo)
    assert 0.84 <= hits / sets <= 0.96
    # and its width is the normal approximation's, 2 x 1.645 x sqrt(p (1 - p) / n) = 0.076
    assert abs(np.mean(widths) - 2 * 1.645 * np.sqrt(p * (1 - p) / n)) < 0.01


def test_a_wrong_interval_would_fail_these_checks():
    """The checks above can fail: an interval of the wrong level misses its coverage."""
    rng = np.random.default_rng(1)
    p, n, hits = 0.8, 300, 0
    for s in range(200):
        correct = torch.from_numpy(rng.random(n) < p).double()
        lo, hi = bootstrap_ci(lambda idx, c=correct: float(c[idx].mean()), n, num_resamples=300, seed=s, level=0.5)
        hits += lo <= p <= hi
    assert not 0.84 <= hits / 200 <= 0.96
