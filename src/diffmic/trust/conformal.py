"""Split-conformal prediction sets: Adaptive Prediction Sets scores (APS, Romano et al. 2020) and
their regularised version (RAPS, Angelopoulos et al. 2021), each with one quantile for all images
(marginal) or one per class (Mondrian, class-conditional; Vovk 2012).

The APS score of class y is the total probability of the classes ranked above y plus ``u`` times its
own, with ``u`` uniform on (0, 1) per image (randomised APS; ``u = 1`` gives the conservative
non-randomised version, which over-covers when many classes are unlikely). RAPS adds
``lam * max(0, rank(y) - k_reg)`` (rank 1 = the most probable class), which keeps unlikely classes
out of the sets. With ``n`` exchangeable calibration images and q = the ceil((n+1) level)-th
smallest true-class score, the set {y : score(x, y) <= q} (plus the top class, so never empty)
covers the true class with probability >= level, on average over images. The Mondrian sets fit
one quantile q_c per class from the ``n_c`` calibration images of class c and include c when
score(x, c) <= q_c: each class is covered with probability >= level on its own (given the images
of each class are exchangeable). A class with fewer than level / (1 - level) calibration images
(ceil((n_c+1) level) > n_c: 9 at 90 %) cannot be given that guarantee by a finite quantile; it is
then included in every set (q_c = infinity), which keeps its guarantee, and named in
``always_included``. For reproducible sets ``u`` is derived from the image id (:func:`image_uniforms`)."""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch
from torch import Tensor


def image_uniforms(ids: Sequence[str], seed: int = 0) -> Tensor:
    """A uniform (0, 1) number per image id, the same on every run and machine."""
    return torch.tensor([(zlib.crc32(f"{seed}:{i}".encode()) + 0.5) / 2**32 for i in ids], dtype=torch.float64)


def aps_scores(probs: Tensor, u: Tensor | None = None) -> Tensor:
    """``[N,C]``: score of every class = probability ranked above it + ``u`` x its own (u = 1: at or above)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    sorted_p, order = torch.sort(p, dim=-1, descending=True, stable=True)
    cum = torch.cumsum(sorted_p, dim=-1)
    scores = torch.empty_like(cum).scatter_(-1, order, cum)
    if u is not None:
        scores = scores - (1 - torch.as_tensor(u, dtype=torch.float64)[:, None]) * p
    return scores


def raps_scores(probs: Tensor, u: Tensor | None = None, lam: float = 0.1, k_reg: int = 1) -> Tensor:
    """``[N,C]``: APS scores plus ``lam * max(0, rank - k_reg)``, rank 1 for the most probable class."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    order = torch.sort(p, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(1, p.shape[-1] + 1).expand_as(order).contiguous())
    return aps_scores(p, u) + float(lam) * (rank - int(k_reg)).clamp_min(0).to(torch.float64)


def conformal_quantile(scores: Tensor, level: float) -> float:
    """The ceil((n+1) level)-th smallest of ``scores`` (n of them); infinity when that exceeds n
    (too few calibration scores for ``level``: only the full label set is guaranteed)."""
    if not 0 < level < 1:
        raise ValueError(f"conformal level must be in (0, 1), got {level}")
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    n = s.numel()
    k = math.ceil((n + 1) * level - 1e-9)  # (9 + 1) * 0.9 is 9.000000000000002 in floating point
    if k > n:
        return float("inf")
    return float(torch.sort(s).values[k - 1])


def fit_aps(probs: Tensor, labels: Tensor, level: float = 0.9, u: Tensor | None = None) -> float:
    """The conformal quantile q of the true-class APS scores on the calibration split."""
    s = aps_scores(probs, u).gather(1, torch.as_tensor(labels).long()[:, None]).flatten()
    return conformal_quantile(s, level)


def aps_sets(probs: Tensor, qhat: float, u: Tensor | None = None) -> Tensor:
    """Boolean ``[N,C]`` membership of the prediction sets (the top class always included)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    member = aps_scores(p, u) <= qhat + 1e-12
    member[torch.arange(p.shape[0]), p.argmax(-1)] = True
    return member


# eval.conformal_method
CONFORMAL_METHODS: tuple[str, ...] = ("aps", "mondrian_aps", "raps", "mondrian_raps")
METHOD_TEXT = {
    "aps": "APS, one quantile for all images (marginal coverage)",
    "mondrian_aps": "Mondrian APS, one quantile per class (class-conditional coverage)",
    "raps": "RAPS, one quantile for all images (marginal coverage)",
    "mondrian_raps": "Mondrian RAPS, one quantile per class (class-conditional coverage)",
}


def method_scores(probs: Tensor, method: str, u: Tensor | None = None, lam: float = 0.1, k_reg: int = 1) -> Tensor:
    """``[N,C]`` conformity scores of ``method`` (APS or RAPS; Mondrian or not uses the same scores)."""
    if method not in CONFORMAL_METHODS:
        raise ValueError(f"conformal method must be one of {', '.join(CONFORMAL_METHODS)}, got {method!r}")
    return raps_scores(probs, u, lam, k_reg) if method.endswith("raps") else aps_scores(probs, u)


def _finite(q: float) -> float | None:
    return q if math.isfinite(q) else None  # infinity stored as None (plain JSON)


def fit_conformal(
    probs: Tensor,
    labels: Tensor,
    method: str = "aps",
    level: float = 0.9,
    u: Tensor | None = None,
    lam: float = 0.1,
    k_reg: int = 1,
) -> dict:
    """The quantile(s) of ``method`` on the calibration split, as plain values: ``qhat`` (marginal;
    None = infinity) or ``qhat_per_class`` with ``n_per_class`` and ``always_included`` (Mondrian:
    the class indices with too few calibration images, included in every set)."""
    y = torch.as_tensor(labels).long()
    s = method_scores(probs, method, u, lam, k_reg)
    true = s.gather(1, y[:, None]).flatten()
    out: dict = {"kind": method, "level": float(level), "text": METHOD_TEXT[method]}
    if method.endswith("raps"):
        out.update(lam=float(lam), k_reg=int(k_reg))
    if not method.startswith("mondrian"):
        out["qhat"] = _finite(conformal_quantile(true, level))
        return out
    C = s.shape[-1]
    qs = [conformal_quantile(true[y == c], level) for c in range(C)]
    out["qhat_per_class"] = [_finite(q) for q in qs]
    out["n_per_class"] = [int((y == c).sum()) for c in range(C)]
    out["always_included"] = [c for c in range(C) if not math.isfinite(qs[c])]
    return out


def conformal_sets(probs: Tensor, fitted: dict, u: Tensor | None = None) -> Tensor:
    """Boolean ``[N,C]`` membership of the sets of a :func:`fit_conformal` result (the top class
    always included). A stored APS quantile without ``kind`` (calibrations before the choice of
    method) is marginal APS."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    method = fitted.get("kind", "aps")
    s = method_scores(p, method, u, fitted.get("lam", 0.1), fitted.get("k_reg", 1))
    if method.startswith("mondrian"):
        q = torch.tensor([math.inf if v is None else float(v) for v in fitted["qhat_per_class"]], dtype=torch.float64)
        member = s <= q[None, :] + 1e-12
    else:
        qhat = fitted.get("qhat")
        member = s <= (math.inf if qhat is None else float(qhat)) + 1e-12
    member[torch.arange(p.shape[0]), p.argmax(-1)] = True
    return member


# a class "reaches the level" on a test split when its coverage is at least level - CLASS_TOLERANCE
CLASS_TOLERANCE = 0.03


def set_summary(sets: Tensor, labels: Tensor, class_names: list[str], level: float) -> dict:
    """Empirical coverage and mean set size, overall and per true class; the lowest class
    coverage and the classes covered less than ``level - CLASS_TOLERANCE`` (``classes_short``)."""
    y = torch.as_tensor(labels).long()
    covered = sets[torch.arange(y.numel()), y].double()
    size = sets.sum(-1).double()
    per = {}
    for c, name in enumerate(class_names):
        m = y == c
        if m.any():
            per[name] = {
                "n": int(m.sum()),
                "coverage": float(covered[m].mean()),
                "mean_set_size": float(size[m].mean()),
            }
    low = min((v["coverage"] for v in per.values()), default=None)
    short = [n for n, v in per.items() if v["coverage"] < level - CLASS_TOLERANCE - 1e-12]
    return {
        "level": level,
        "coverage": float(covered.mean()),
        "mean_set_size": float(size.mean()),
        "per_class": per,
        "min_class_coverage": low,
        "classes_short": short,
    }


def check_conformal(fitted: dict, num_classes: int) -> None:
    """Validate a stored conformal fit (untrusted, e.g. an exported ``config.json``): otherwise a
    ``ValueError`` whose text starts with the key (``.qhat must be ...``)."""

    def number_or_null(v) -> bool:
        return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v))

    kind = fitted.get("kind", "aps")
    if kind not in CONFORMAL_METHODS:
        raise ValueError(f".kind must be one of {', '.join(CONFORMAL_METHODS)}, got {str(kind)[:100]!r}")
    lvl = fitted.get("level")
    if not (isinstance(lvl, (int, float)) and not isinstance(lvl, bool) and 0 < lvl < 1):
        raise ValueError(f".level must be a number in (0, 1), got {str(lvl)[:100]!r}")
    if kind.startswith("mondrian"):
        q = fitted.get("qhat_per_class")
        if not (isinstance(q, list) and len(q) == num_classes and all(number_or_null(v) for v in q)):
            raise ValueError(f".qhat_per_class must be {num_classes} numbers or nulls")
    elif not number_or_null(fitted.get("qhat")):
        raise ValueError(f".qhat must be a number or null, got {str(fitted.get('qhat'))[:100]!r}")
    for k in ("lam", "k_reg"):
        if k in fitted and not (number_or_null(fitted[k]) and fitted[k] is not None and fitted[k] >= 0):
            raise ValueError(f".{k} must be a number >= 0, got {str(fitted[k])[:100]!r}")
