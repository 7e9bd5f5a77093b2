"""Seeded percentile bootstrap over test images: the one bootstrap of the package.

``test`` (the ``ci`` block of test_metrics.json, :func:`bootstrap_ci`) and the experiment summaries
(``experiment.bootstrap_ci`` / ``paired_bootstrap`` / ``pooled_ci``) draw their resamples with
:func:`resamples` and read the interval with :func:`percentile_interval`. The two differ only in the
random stream that draws the indices, kept so that recorded intervals reproduce: ``"torch"``
(``torch.Generator().manual_seed(seed)``, test_metrics.json) and ``"numpy"``
(``numpy.random.default_rng(seed)``, experiment summaries).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch

Stream = Literal["torch", "numpy"]


def resamples(n: int, num_resamples: int, seed: int = 0, rng: Stream = "torch") -> Iterator[torch.Tensor]:
    """``num_resamples`` index tensors, each ``n`` draws from ``range(n)`` with replacement, from a
    generator seeded with ``seed`` (``rng``: ``"torch"`` or ``"numpy"``, see the module docstring)."""
    if rng == "torch":
        g = torch.Generator().manual_seed(int(seed))
        for _ in range(num_resamples):
            yield torch.randint(0, n, (n,), generator=g)
    elif rng == "numpy":
        import numpy as np

        r = np.random.default_rng(seed)
        for _ in range(num_resamples):
            yield torch.as_tensor(r.integers(0, n, n))
    else:
        raise ValueError(f"rng must be 'torch' or 'numpy', got {rng!r}")


def percentile_interval(values: Iterable[float], alpha: float = 0.05) -> tuple[float, float]:
    """The ``[alpha/2, 1 − alpha/2]`` quantiles (linear interpolation) of the finite ``values``;
    resamples whose statistic is NaN or infinite (e.g. a class absent from the resample) are
    dropped; ``(nan, nan)`` when none is left."""
    t = torch.as_tensor([float(v) for v in values], dtype=torch.float64)
    t = t[torch.isfinite(t)]
    if not t.numel():
        return float("nan"), float("nan")
    return float(torch.quantile(t, alpha / 2)), float(torch.quantile(t, 1 - alpha / 2))


def bootstrap_ci(
    stat: Callable[[torch.Tensor], float],
    n: int,
    num_resamples: int = 500,
    seed: int = 0,
    level: float = 0.95,
    rng: Stream = "torch",
) -> list[float]:
    """``[low, high]`` percentile interval of ``stat(idx)`` over resamples ``idx`` of ``range(n)``
    drawn with replacement from ``torch.Generator().manual_seed(seed)`` (or ``rng="numpy"``).
    NaN (and infinite) resamples are dropped."""
    return list(percentile_interval((stat(idx) for idx in resamples(n, num_resamples, seed, rng)), 1 - level))
