"""Per-image uncertainty as CARD (Han et al. 2022) defines it, from the K reverse samples.

For each image: the per-class mean and 95 % interval (2.5 / 97.5 percentiles) of the sampled label
vectors, and a paired two-sided t-test between the two classes with the largest mean: the
prediction is *confident* when the difference is significant at ``alpha`` (0.05), otherwise
*uncertain*. Data-set level: PAvPU = (accurate & confident + inaccurate & uncertain) / N.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def t_sf_two_sided(t: Tensor, df: int) -> Tensor:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    from scipy.special import stdtr

    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.as_tensor(2.0 * stdtr(df, -t.abs().cpu().numpy()), dtype=torch.float64)


@dataclass
class CardUncertainty:
    mean: Tensor  # [B,C]
    low: Tensor  # [B,C] 2.5th percentile over the K samples
    high: Tensor  # [B,C] 97.5th percentile
    top2: Tensor  # [B,2] the two classes with the largest mean
    t: Tensor  # [B] paired t statistic (nan when K < 2)
    p_value: Tensor  # [B]
    uncertain: Tensor  # [B] bool


def card_uncertainty(samples: Tensor, alpha: float = 0.05) -> CardUncertainty:
    """``samples [B,K,C]`` -> :class:`CardUncertainty` (K < 2: no test, every image uncertain)."""
    y = torch.as_tensor(samples, dtype=torch.float64)
    if y.ndim != 3:
        raise ValueError(f"samples must be [B,K,C], got {tuple(y.shape)}")
    B, K, C = y.shape
    mean = y.mean(1)
    q = torch.quantile(y, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=1)
    top2 = mean.topk(min(2, C), dim=-1).indices
    if K < 2 or C < 2:
        nan = torch.full((B,), float("nan"), dtype=torch.float64)
        return CardUncertainty(mean, q[0], q[1], top2, nan, nan, torch.ones(B, dtype=torch.bool))
    a = y.gather(2, top2[:, None, 0:1].expand(B, K, 1)).squeeze(-1)
    b = y.gather(2, top2[:, None, 1:2].expand(B, K, 1)).squeeze(-1)
    d = a - b  # [B,K]
    sd = d.std(1, unbiased=True)
    md = d.mean(1)
    with torch.no_grad():
        t = md / (sd / K**0.5)
    # sd = 0: identical differences -> infinitely significant unless the mean difference is 0 too
    t = torch.where(sd == 0, torch.where(md == 0, torch.zeros_like(md), torch.full_like(md, float("inf"))), t)
    p = t_sf_two_sided(t, K - 1)
    return CardUncertainty(mean, q[0], q[1], top2, t, p, ~(p < alpha))


def pavpu(correct: Tensor, uncertain: Tensor) -> dict:
    """PAvPU and the accuracy of the confident and the uncertain predictions."""
    c = torch.as_tensor(correct).flatten().bool()
    u = torch.as_tensor(uncertain).flatten().bool()
    n = c.numel()
    return {
        "pavpu": float(((c & ~u).sum() + (~c & u).sum()) / n),
        "uncertain_fraction": float(u.double().mean()),
        "accuracy_confident": float(c[~u].double().mean()) if (~u).any() else None,
        "accuracy_uncertain": float(c[u].double().mean()) if u.any() else None,
    }
