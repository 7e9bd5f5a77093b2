"""Out-of-distribution flag: "this image does not look like the training data".

Every candidate score is computed here, from what the model computes for every image anyway
(:class:`OODInputs`): the DCG's fused logits ``z_fused`` (the ``basic`` head's logits), the image
features ρ(x), and the spread of the K reverse samples. Each score is oriented the same way:
**higher = less like the training data**.

* ``energy``: the free energy of the logits, ``E(x) = -T log sum_c exp(z_c / T)`` with T = 1
  (Liu et al., NeurIPS 2020);
* ``max_logit``: ``-max_c z_c`` (Hendrycks et al., ICML 2022);
* ``msp``: ``-max_c softmax(z)_c``, the maximum softmax probability (Hendrycks & Gimpel, ICLR 2017);
* ``mahalanobis``: ``min_c (f - mu_c)^T Sigma^-1 (f - mu_c)`` on ρ(x) features ``f``, with class
  means ``mu_c`` and one shared (Ledoit-Wolf shrunk) covariance ``Sigma`` of the class-centred
  features (Lee et al., NeurIPS 2018), fitted on the TRAINING split;
* ``spread``: the mean over classes of the standard deviation of the K reverse samples.

The threshold is fitted on the validation split at a stated false flag rate ``a``: with the n
validation scores sorted, ``tau`` = the ``ceil((n + 1)(1 - a))``-th smallest, and an image is
flagged when its score is ``> tau``. For a new image exchangeable with the validation images, the
chance of being flagged is then at most ``a`` (the split-conformal rule; with ``(n + 1)(1 - a) > n``
no threshold can promise it and nothing is flagged: ``tau = None``).

Why the Mahalanobis statistics come from the training split and the threshold from validation:
a shared covariance of a few hundred dimensions needs many images (HAM10000: 6,309 training
against 703 validation images), and a threshold fitted on the same images as the means and
covariance would sit too low (those images are closer to their own means than new images are),
so the false flag rate on new in-distribution images would exceed the one asked for.

Stored with the calibration (``calibration["ood"]``, checkpoint and exported ``config.json``);
the Mahalanobis matrices as base64 float32 (:func:`encode_array`), checked on load
(:func:`check_ood`).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, TypeGuard, overload

import numpy as np
import torch
from torch import Tensor

#: ``eval.ood_score`` choices: ``auto`` = :data:`AUTO_ORDER`'s first score the model has
OOD_SCORES: tuple[str, ...] = ("auto", "none", "energy", "max_logit", "msp", "mahalanobis", "spread")
#: the scores that can be computed (and compared)
CANDIDATES: tuple[str, ...] = ("energy", "max_logit", "msp", "mahalanobis", "spread")
#: ``auto``: the best score on the measured held-out sets (docs/uncertainty.md) first
AUTO_ORDER: tuple[str, ...] = ("mahalanobis", "energy", "spread")
#: the Mahalanobis whitening keeps at most this many numbers (k x d): all of ρ(x) up to 1024
#: dimensions, the leading principal directions beyond (config.json stays a few MB)
MAX_WHITEN_VALUES = 2**20

LOGIT_SCORES = ("energy", "max_logit", "msp")
NOT_STORED = (
    "no out-of-distribution flag stored with this model (calibrated by an older diffmic); `diffmic calibrate` fits one"
)


@dataclass
class OODInputs:
    """Per-image inputs of the scores; any may be ``None`` when the model has no such output."""

    logits: Optional[Tensor] = None  # [N,C] DCG z_fused, or the basic head's logits
    feat: Optional[Tensor] = None  # [N,D] rho(x) (the basic variant: its backbone features)
    spread: Optional[Tensor] = None  # [N] spread of the K reverse samples (K >= 2)

    @staticmethod
    def concat(parts: Sequence[OODInputs]) -> OODInputs:
        def cat(name: str) -> Optional[Tensor]:
            vals = [getattr(p, name) for p in parts]
            if not vals or any(v is None for v in vals):
                return None
            return torch.cat([v.detach().double().cpu() for v in vals])

        return OODInputs(cat("logits"), cat("feat"), cat("spread"))

    def detached(self) -> OODInputs:
        return OODInputs(
            *(None if v is None else v.detach().double().cpu() for v in (self.logits, self.feat, self.spread))
        )


def classifier_outputs(model, x: Tensor) -> tuple[Tensor, Optional[Tensor], Any]:
    """``basic`` / ``dcg`` models: ``(logits, features, guidance)`` from one forward pass, the same
    logits as ``model.classify(x)`` (``basic``: the head on ``encode(x)``; ``dcg``: ``z_fused``)."""
    if model.uses_dcg:
        g = model.guide(x)
        return g.z_fused, None, g
    feat = model.encode(x)
    return model.classifier(feat), feat, None


@torch.no_grad()
def collect_features(module, loader) -> tuple[Tensor, Tensor]:
    """Image features ``model.encode(x)`` (ρ(x); ``basic``: the backbone's) and labels of every
    image of ``loader`` (the Mahalanobis statistics' training split)."""
    module.eval()
    fs, ys = [], []
    for batch in loader:
        fs.append(module.model.encode(batch["image"].to(module.device)).double().cpu())
        ys.append(torch.as_tensor(batch["label"]).cpu())
    if not fs:
        raise ValueError("the training split is empty: no features for the Mahalanobis statistics")
    return torch.cat(fs), torch.cat(ys)


# ---------------------------------------------------------------------------------------- scores


def energy_score(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Free energy ``-T logsumexp(z / T)`` per image (higher = less like the training data)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    return -temperature * torch.logsumexp(z / temperature, dim=-1)


def max_logit_score(logits: Tensor) -> Tensor:
    return -torch.as_tensor(logits, dtype=torch.float64).max(-1).values


def msp_score(logits: Tensor) -> Tensor:
    return -torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1).max(-1).values


def fit_mahalanobis(feat: Tensor, labels: Tensor, max_values: int = MAX_WHITEN_VALUES) -> dict:
    """Class means and one shared covariance of ``feat [N,D]`` (Ledoit-Wolf shrinkage of the
    class-centred features, scikit-learn), stored as a whitening ``W [k,D]`` with
    ``W^T W = Sigma^-1`` restricted to the ``k = min(D, max_values // D)`` leading principal
    directions (all of them when ``k = D``), and the whitened class means ``W mu_c``."""
    from sklearn.covariance import LedoitWolf

    f = torch.as_tensor(feat, dtype=torch.float64).cpu().numpy()
    y = torch.as_tensor(labels).long().cpu().numpy()
    if f.ndim != 2 or len(f) != len(y) or len(f) < 2:
        raise ValueError(f"need features [N,D] with N >= 2 and one label each, got {f.shape} and {y.shape}")
    classes = sorted(int(c) for c in np.unique(y))
    means = np.stack([f[y == c].mean(0) for c in classes])
    centred = f - means[np.searchsorted(classes, y)]
    lw = LedoitWolf(assume_centered=True).fit(centred)
    d = f.shape[1]
    k = max(1, min(d, max_values // d))
    lam, U = np.linalg.eigh(lw.covariance_)  # ascending
    lam, U = lam[::-1][:k], U[:, ::-1][:, :k]
    if not (lam > 0).all():
        raise ValueError("the shared feature covariance is singular even after shrinkage (constant features?)")
    W = (U / np.sqrt(lam)).T  # [k, D]
    return {
        "classes": classes,
        "dim": d,
        "rank": k,
        "shrinkage": float(lw.shrinkage_),
        "num_images": len(f),
        "whiten": encode_array(W),
        "means": encode_array(means @ W.T),
    }


def mahalanobis_score(feat: Tensor, params: dict) -> Tensor:
    """``min_c ||W (f - mu_c)||^2`` per image (the squared Mahalanobis distance to the nearest class
    mean when ``W^T W = Sigma^-1``)."""
    W = torch.as_tensor(decode_array(params["whiten"], "whiten"), dtype=torch.float64)
    m = torch.as_tensor(decode_array(params["means"], "means"), dtype=torch.float64)
    f = torch.as_tensor(feat, dtype=torch.float64).cpu()
    if f.ndim != 2 or f.shape[1] != W.shape[1]:
        raise ValueError(
            f"the stored Mahalanobis statistics are for {W.shape[1]}-dimensional features, the model gives "
            f"{tuple(f.shape)}: refit with `diffmic calibrate`"
        )
    z = f @ W.T  # [N,k]
    return torch.cdist(z, m).pow(2).min(-1).values


def candidate_scores(inputs: OODInputs, mahalanobis: Optional[dict] = None) -> dict[str, Tensor]:
    """Every score :data:`CANDIDATES` that ``inputs`` (and the fitted Mahalanobis statistics) allow."""
    out: dict[str, Tensor] = {}
    if inputs.logits is not None:
        out["energy"] = energy_score(inputs.logits)
        out["max_logit"] = max_logit_score(inputs.logits)
        out["msp"] = msp_score(inputs.logits)
    if inputs.feat is not None and mahalanobis is not None:
        out["mahalanobis"] = mahalanobis_score(inputs.feat, mahalanobis)
    if inputs.spread is not None:
        out["spread"] = torch.as_tensor(inputs.spread, dtype=torch.float64).cpu()
    return out


def score_problem(name: str, variant: str, num_samples: int) -> Optional[str]:
    """Why ``name`` cannot be computed for this model (``None`` when it can)."""
    from diffmic.nn.diffmic import variant_parts

    parts = variant_parts(variant)
    if name in LOGIT_SCORES and parts.diffusion and not parts.dcg:  # the denoiser's read-out only
        return f"variant {variant} has no DCG logits (use mahalanobis or spread)"
    if name == "mahalanobis" and parts.dcg and not parts.diffusion:  # the DCG alone: no rho(x)
        return f"variant {variant} has no image features rho(x) (use energy, max_logit or msp)"
    if name == "spread" and (not parts.diffusion or num_samples < 2):
        return "spread needs K >= 2 reverse samples (eval.num_samples >= 2, a diffusion variant)"
    return None


def resolve_score(name: str, variant: str, num_samples: int) -> Optional[str]:
    """The score ``eval.ood_score`` names for this model: ``auto`` -> the first of
    :data:`AUTO_ORDER` it has; ``none`` -> ``None``."""
    if name == "none":
        return None
    if name == "auto":
        return next((s for s in AUTO_ORDER if score_problem(s, variant, num_samples) is None), None)
    return name


# ------------------------------------------------------------------------------------- threshold


def fit_threshold(scores: Tensor, false_flag_rate: float) -> Optional[float]:
    """``tau`` = the ``ceil((n + 1)(1 - a))``-th smallest of the n scores (flag: score > tau), so
    that an exchangeable new image is flagged with probability <= ``a``; ``None`` (never flag)
    when ``(n + 1)(1 - a) > n`` (too few images for this rate)."""
    if not 0 < false_flag_rate < 1:
        raise ValueError(f"false flag rate must be in (0, 1), got {false_flag_rate}")
    s = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if not torch.isfinite(s).all():
        raise ValueError("out-of-distribution scores must be finite")
    n = s.numel()
    k = math.ceil(round((n + 1) * (1 - false_flag_rate), 9))
    if k > n or n == 0:
        return None
    return float(torch.sort(s).values[k - 1])


def flags(scores: Tensor, threshold: Optional[float]) -> Tensor:
    s = torch.as_tensor(scores, dtype=torch.float64)
    if threshold is None:
        return torch.zeros_like(s, dtype=torch.bool)
    return s > threshold


def fit_ood(
    inputs: OODInputs,
    score: Optional[str],
    false_flag_rate: float,
    mahalanobis: Optional[dict] = None,
    fitted_on: str = "val",
) -> dict:
    """The stored OOD flag: the score's name, its threshold fitted on ``inputs`` (the validation
    split) at ``false_flag_rate``, and the Mahalanobis statistics when that is the score."""
    if score is None:
        return {"score": None, "reason": "eval.ood_score=none (or no score this model can compute)"}
    scores = candidate_scores(inputs, mahalanobis)
    if score not in scores:
        raise ValueError(f"eval.ood_score={score}: this model gives no input for it")
    s = scores[score]
    thr = fit_threshold(s, false_flag_rate)
    out: dict[str, Any] = {
        "score": score,
        "threshold": thr,
        "false_flag_rate": float(false_flag_rate),
        "fitted_on": fitted_on,
        "num_images": int(s.numel()),
        "fit_flagged_fraction": float(flags(s, thr).double().mean()) if s.numel() else None,
    }
    if score == "mahalanobis" and mahalanobis is not None:  # candidate_scores gives it only with the statistics
        out["mahalanobis"] = {**mahalanobis, "fitted_on": mahalanobis.get("fitted_on", "train")}
    return out


def ood_scores(inputs: OODInputs, ood: dict) -> Optional[Tensor]:
    """The stored score of each image (``None`` when the stored flag has no score)."""
    name = ood.get("score")
    if name is None:
        return None
    scores = candidate_scores(inputs, ood.get("mahalanobis"))
    if name not in scores:
        raise ValueError(f"the stored out-of-distribution score {name!r} cannot be computed for this model")
    return scores[name]


def rule_text(ood: Optional[dict]) -> str:
    """The flag in words (one line)."""
    if not ood:
        return NOT_STORED
    if ood.get("score") is None:
        return "no out-of-distribution flag (eval.ood_score=none)"
    thr = ood.get("threshold")
    if thr is None:
        return (
            f"{ood['score']} score: too few validation images for a {ood['false_flag_rate']:.0%} false flag "
            "rate, nothing is flagged"
        )
    return (
        f"{ood['score']} score > {thr:.4g} (fitted on {ood.get('fitted_on')} to flag "
        f"{ood['false_flag_rate']:.0%} of in-distribution images): the image does not look like the "
        "training data and is referred whatever its confidence"
    )


@overload
def public(ood: dict) -> dict: ...
@overload
def public(ood: None) -> None: ...
def public(ood: Optional[dict]) -> Optional[dict]:
    """``ood`` without its matrices (for printing, test_metrics.json and the model card)."""
    if not isinstance(ood, dict):
        return ood
    out = {k: v for k, v in ood.items() if k != "mahalanobis"}
    m = ood.get("mahalanobis")
    if isinstance(m, dict):
        out["mahalanobis"] = {k: v for k, v in m.items() if k not in ("whiten", "means")}
    return out


# ----------------------------------------------------------------------------- storage and checks


def encode_array(a: np.ndarray) -> dict:
    a = np.ascontiguousarray(np.asarray(a, dtype="<f4"))
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_array(d: Any, name: str = "array") -> np.ndarray:
    """A float32 array stored by :func:`encode_array`, checked (shape, length, finite values);
    ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(d, dict) or d.get("dtype") != "float32":
        raise ValueError(f"{name}: expected an object with dtype 'float32', shape and base64")
    shape = d.get("shape")
    if not (
        isinstance(shape, list)
        and len(shape) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_WHITEN_VALUES for v in shape)
    ):
        raise ValueError(f"{name}.shape must be two positive whole numbers, got {str(shape)[:100]}")
    n = shape[0] * shape[1]
    if n > MAX_WHITEN_VALUES:
        raise ValueError(f"{name} holds {n} values, more than {MAX_WHITEN_VALUES}")
    text = d.get("base64")
    if not isinstance(text, str) or len(text) != 4 * math.ceil(4 * n / 3):
        raise ValueError(f"{name}.base64 must encode {4 * n} bytes ({shape[0]} x {shape[1]} float32)")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError(f"{name}.base64 is not valid base64 ({exc})") from exc
    if len(raw) != 4 * n:
        raise ValueError(f"{name}.base64 decodes to {len(raw)} bytes, {4 * n} expected")
    a = np.frombuffer(raw, dtype="<f4").reshape(shape).copy()
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds non-finite values")
    return a


def _number(v: Any) -> TypeGuard[int | float]:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_ood(ood: Any, num_classes: Optional[int] = None, feature_dim: Optional[int] = None) -> None:
    """Validate a stored OOD flag (untrusted, e.g. an exported ``config.json``); otherwise a
    ``ValueError`` whose text starts with the key below ``ood`` (``.threshold must be ...``), to be
    prefixed with where ``ood`` sits."""
    if not isinstance(ood, dict):
        raise ValueError(f": must be a JSON object or null, got {type(ood).__name__}")
    score = ood.get("score")
    if score is None:
        return
    if score not in CANDIDATES:
        raise ValueError(f".score must be one of {', '.join(CANDIDATES)} or null, got {str(score)[:100]!r}")
    thr = ood.get("threshold")
    if thr is not None and not _number(thr):
        raise ValueError(f".threshold must be a finite number or null, got {str(thr)[:100]!r}")
    rate = ood.get("false_flag_rate")
    if not (_number(rate) and 0 < rate < 1):
        raise ValueError(f".false_flag_rate must be a number in (0, 1), got {str(rate)[:100]!r}")
    if score != "mahalanobis":
        return
    m = ood.get("mahalanobis")
    if not isinstance(m, dict):
        raise ValueError(".mahalanobis is missing: score mahalanobis needs its fitted statistics")
    W = decode_array(m.get("whiten"), ".mahalanobis.whiten")
    mu = decode_array(m.get("means"), ".mahalanobis.means")
    if mu.shape[1] != W.shape[0]:
        raise ValueError(f".mahalanobis.means has {mu.shape[1]} columns, whiten {W.shape[0]} rows")
    classes = m.get("classes")
    if not (
        isinstance(classes, list)
        and len(classes) == mu.shape[0]
        and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)
    ):
        raise ValueError(f".mahalanobis.classes must list {mu.shape[0]} class indices")
    if num_classes is not None and any(c >= num_classes for c in classes):
        raise ValueError(f".mahalanobis.classes names a class >= {num_classes}")
    if feature_dim is not None and W.shape[1] != feature_dim:
        raise ValueError(f".mahalanobis.whiten is for {W.shape[1]}-dimensional features, the model gives {feature_dim}")
