"""One ECE, one bootstrap and one set of scalar metrics: experiment.py's ECE, bootstraps and metrics are trust's, and all equal
independent reference computations (a hand-worked ECE, numpy / torch percentile bootstraps)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffmic import experiment as E
from diffmic.trust.bootstrap import bootstrap_ci, percentile_interval, resamples
from diffmic.trust.calibration import ece


def test_both_eces_equal_a_hand_worked_two_bin_example():
    # top-label confidences 0.3, 0.4 (bin [0, 0.5]) and 0.9, 0.6 (bin (0.5, 1]); correct: yes, no, yes, no
    probs = np.array(
        [
            [0.3, 0.25, 0.25, 0.2],
            [0.2, 0.4, 0.2, 0.2],
            [0.9, 0.05, 0.03, 0.02],
            [0.1, 0.1, 0.6, 0.2],
        ]
    )
    labels = np.array([0, 0, 0, 1])
    # bin 1: accuracy 1/2, mean confidence 0.35; bin 2: accuracy 1/2, mean confidence 0.75
    hand = 2 / 4 * abs(0.5 - 0.35) + 2 / 4 * abs(0.5 - 0.75)  # 0.2
    assert ece(torch.as_tensor(probs), torch.as_tensor(labels), n_bins=2) == pytest.approx(hand, abs=1e-6)


@pytest.mark.parametrize("seed", [2, 10, 15])
def test_the_experiments_ece_is_trusts_on_random_probabilities(seed):
    rng = np.random.default_rng(seed)
    for C in (2, 3, 7):
        p = torch.as_tensor(rng.dirichlet(np.ones(C) * 0.7, 200))
        y = torch.as_tensor(rng.integers(0, C, 200))
        assert E.metric_fn("ece", C) is ece
        assert E.cell_metrics({"probs": p.numpy(), "labels": y.numpy()})["ece"] == ece(p, y)


def _numpy_reference(n, n_boot, seed, stat, alpha):
    """The experiment's former loop: numpy default_rng indices, finite values, np.quantile."""
    rng = np.random.default_rng(seed)
    vals = np.array([stat(rng.integers(0, n, n)) for _ in range(n_boot)])
    vals = vals[np.isfinite(vals)]
    return np.quantile(vals, [alpha / 2, 1 - alpha / 2])


def _data(n=80, C=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, C, n)
    return y, rng.dirichlet(np.ones(C), n), rng.dirichlet(np.ones(C) * 3, n)


def test_the_experiment_bootstraps_equal_an_independent_numpy_bootstrap():
    y, pa, pb = _data()
    n = len(y)
    ok_a, ok_b = pa.argmax(1) == y, pb.argmax(1) == y
    obs, lo, hi = E.paired_bootstrap(y, pa, pb, "acc", n_boot=300, seed=4, alpha=0.1)
    ref = _numpy_reference(n, 300, 4, lambda i: ok_a[i].mean() - ok_b[i].mean(), 0.1)
    assert obs == pytest.approx(ok_a.mean() - ok_b.mean(), abs=1e-12)
    assert [lo, hi] == pytest.approx(list(ref), abs=1e-12)

    obs, lo, hi = E.seed_mean_ci(y, [pa, pb], "acc", n_boot=300, seed=2, alpha=0.05)
    ref = _numpy_reference(n, 300, 2, lambda i: (ok_a[i].mean() + ok_b[i].mean()) / 2, 0.05)
    assert obs == pytest.approx((ok_a.mean() + ok_b.mean()) / 2, abs=1e-12)
    assert [lo, hi] == pytest.approx(list(ref), abs=1e-12)

    rows = lambda p: {"ids": list(range(n)), "labels": y, "probs": p}  # noqa: E731
    got = E.pooled_ci([rows(pa)], [rows(pb)], "acc", 300, seed=1)
    d = ok_a.mean() - ok_b.mean()
    lo, hi = _numpy_reference(n, 300, 1, lambda i: ok_a[i].mean() - ok_b[i].mean(), 0.05)
    assert got == f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def test_trusts_bootstrap_equals_an_independent_torch_bootstrap_and_takes_the_numpy_stream():
    y, pa, _ = _data(n=120, seed=3)
    ok = torch.as_tensor(pa.argmax(1) == y).double()
    g = torch.Generator().manual_seed(7)
    draws = [float(ok[torch.randint(0, 120, (120,), generator=g)].mean()) for _ in range(250)]
    vals, a = torch.tensor(draws, dtype=torch.float64), (1 - 0.9) / 2
    ref = [float(torch.quantile(vals, a)), float(torch.quantile(vals, 1 - a))]
    assert bootstrap_ci(lambda i: float(ok[i].mean()), 120, 250, seed=7, level=0.9) == ref  # bit for bit
    okn = ok.numpy()
    got = bootstrap_ci(lambda i: float(ok[i].mean()), 120, 250, seed=7, level=0.9, rng="numpy")
    assert got == pytest.approx(list(_numpy_reference(120, 250, 7, lambda i: okn[i].mean(), 0.1)), abs=1e-12)


def test_resamples_and_the_interval_drop_nan_and_infinite_values():
    a, b = list(resamples(5, 3, seed=1, rng="numpy")), list(resamples(5, 3, seed=1, rng="numpy"))
    assert all(torch.equal(x, y) and x.shape == (5,) and x.min() >= 0 and x.max() < 5 for x, y in zip(a, b))
    with pytest.raises(ValueError, match="rng"):
        next(resamples(5, 1, rng="python"))  # type: ignore[arg-type]
    assert percentile_interval([1.0, math.nan, 3.0, math.inf, -math.inf], alpha=0.0) == (1.0, 3.0)
    lo, hi = percentile_interval([math.nan, math.inf])
    assert math.isnan(lo) and math.isnan(hi)
    assert percentile_interval([0.0, 1.0, 2.0, 3.0, 4.0], alpha=0.5) == (1.0, 3.0)  # quartiles, linear
    with pytest.raises(ValueError, match="unknown metric"):
        E.paired_bootstrap(np.zeros(4, int), np.ones((4, 2)) / 2, np.ones((4, 2)) / 2, "recall")


def test_one_set_of_scalar_metrics_equals_scikit_learn_and_serves_the_experiment_and_trust():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, f1_score, roc_auc_score
    from torchmetrics.functional.classification import multiclass_accuracy

    from diffmic.config import EvalConfig
    from diffmic.metrics import SCALAR_METRICS, scalar_metric_fns
    from diffmic.trust.evaluate import fit_trust, test_trust

    rng = np.random.default_rng(5)
    n, C = 150, 4
    y = rng.integers(0, C, n)
    p64 = torch.as_tensor(rng.dirichlet(np.ones(C) * 0.6, n)).float().double()  # float32 values, as in the CSV
    yt = torch.as_tensor(y)
    fns = scalar_metric_fns(C)
    assert tuple(fns) == SCALAR_METRICS
    pred = p64.argmax(1).numpy()
    ref = {
        "acc": accuracy_score(y, pred),
        "balanced_acc": balanced_accuracy_score(y, pred),
        "f1": f1_score(y, pred, average="macro"),
        "kappa": cohen_kappa_score(y, pred, weights="quadratic"),
        "auroc": roc_auc_score(y, p64.numpy(), multi_class="ovr", average="macro"),
    }
    for k, f in fns.items():
        assert f(p64, yt) == pytest.approx(ref[k], abs=1e-6), k
    assert fns["acc"](p64, yt) == ref["acc"]  # float64: the exact fraction
    # float32: torchmetrics' micro accuracy bit for bit (the headline acc of test_metrics.json)
    assert fns["acc"](p64.float(), yt) == float(multiclass_accuracy(p64.float(), yt, C, average="micro"))
    # the experiment table scores with these functions ...
    cells = E.cell_metrics({"probs": p64.numpy(), "labels": y})
    assert all(cells[k] == f(p64, yt) for k, f in fns.items())
    # ... and so do the bootstrap intervals of test_metrics.json (on the float32 probabilities)
    ids = [f"i{j}" for j in range(n)]
    calib = fit_trust(p64[:70], yt[:70], EvalConfig(calibrator="temperature"), ids=ids[:70], compare=False)
    rows = [
        {"id": ids[j], "label": int(y[j]), "pred": int(pred[j]), "confidence": float(p64[j].max())}
        | {f"p_{c}": float(p64[j, c]) for c in range(C)}
        for j in range(70, n)
    ]
    ci = test_trust(rows, calib, [str(c) for c in range(C)], seed=3, resamples=40).blocks["ci"]
    p32, y2 = p64[70:].float(), yt[70:]
    for k, f in fns.items():
        assert ci[k] == bootstrap_ci(lambda i, f=f: f(p32[i], y2[i]), n - 70, 40, seed=3), k


def test_pooled_ci_scores_each_seed_against_its_own_test_images():
    """Seeds of a grid with a seeded random split (a class folder) are tested on different images.
    Each seed's difference is scored against that seed's labels: here model A is right on every image
    of both seeds and B on none, so the difference is +1 exactly, and every resample agrees. (Scoring
    seed 2 against seed 1's labels, as before, gives a difference well below 1.) With different test
    sizes, each seed draws its own resamples; the interval is an independent numpy bootstrap's."""
    C = 3
    rng = np.random.default_rng(7)

    def seed_rows(n, start):
        y = rng.integers(0, C, n)
        right = np.eye(C)[y] * 0.8 + 0.2 / C  # argmax = the label
        wrong = np.eye(C)[(y + 1) % C] * 0.8 + 0.2 / C  # argmax = another class
        ids = list(range(start, start + n))
        return {"ids": ids, "labels": y, "probs": right}, {"ids": ids, "labels": y, "probs": wrong}

    (a1, b1), (a2, b2) = seed_rows(60, 0), seed_rows(60, 1000)
    assert E.pooled_ci([a1, a2], [b1, b2], "acc", 200, seed=3) == "+1.000 [+1.000, +1.000]"

    # different sizes and a model that is right on part of each seed: an independent bootstrap per seed
    ya, yb = rng.integers(0, C, 50), rng.integers(0, C, 70)
    pa = [np.eye(C)[y] for y in (ya, yb)]
    pb = [np.eye(C)[np.where(np.arange(len(y)) % 3 == 0, y, (y + 1) % C)] for y in (ya, yb)]
    A = [
        {"ids": [f"s{k}-{i}" for i in range(len(y))], "labels": y, "probs": p}
        for k, (y, p) in enumerate(zip((ya, yb), pa))
    ]
    B = [{**r, "probs": p} for r, p in zip(A, pb)]
    ok_b = [(p.argmax(1) == y).astype(float) for p, y in zip(pb, (ya, yb))]
    observed = np.mean([1 - ok.mean() for ok in ok_b])
    r0, r1 = np.random.default_rng(5), np.random.default_rng(6)
    vals = [
        np.mean([1 - ok_b[0][r0.integers(0, 50, 50)].mean(), 1 - ok_b[1][r1.integers(0, 70, 70)].mean()])
        for _ in range(300)
    ]
    lo, hi = np.quantile(vals, [0.025, 0.975])
    assert E.pooled_ci(A, B, "acc", 300, seed=5) == f"{observed:+.3f} [{lo:+.3f}, {hi:+.3f}]"
