"""Calibration: NLL, ECE (15 equal-width bins), classwise ECE, Brier; the calibrators of
``eval.calibrator`` fitted on the validation split (temperature scaling by the NLL, then optionally a
top-label isotonic map; vector, matrix and Dirichlet scaling of the log-probabilities; ``auto``, a
choice by repeated cross-validation on the split); the fitted referral threshold; a reliability diagram.

Probabilities are rescaled as ``softmax(log p / T)``: for the ``mean`` read-out ``log p`` equals the
sampler's logits ``mean y0 / eval.temperature`` up to a constant, for ``basic`` the classifier
logits, so this is ordinary temperature scaling (Guo et al. 2017); vector and matrix scaling act on
the same ``log p`` (on log-probabilities, matrix scaling is Dirichlet calibration, Kull et al. 2019).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# torchmetrics is imported inside ece / classwise_ece: serving (the Predictor) needs this module but
# not these two metrics, and importing torchmetrics costs seconds (issue 27.2)

EPS = 1e-12
# eval.calibrator: how the validation split maps scores to probabilities (docs/uncertainty.md)
#   temperature           softmax(log p / T), T minimising the NLL (Guo et al. 2017)
#   temperature+isotonic  then the top-label confidence through an isotonic map fitted on the same
#                         split (Zadrozny & Elkan 2002), the other classes rescaled to sum to 1
#   vector                softmax(w * log p + b), one scale and one bias per class (Guo et al. 2017)
#   matrix                softmax(W log p + b), a full C x C matrix: on log-probabilities this is
#                         Dirichlet calibration (Kull et al. 2019) without regularisation
#   dirichlet             the same with the off-diagonal and intercept (ODIR) penalty of Kull et al.,
#                         its weight chosen among DIRICHLET_LAMBDAS by a 5-fold CV of the NLL
#   auto                  the arg-max-keeping calibrator (AUTO_CANDIDATES) with the lowest held-out ECE
#                         in a repeated 5-fold cross-validation on the split, among those whose
#                         held-out Brier score is not above the temperature's (proper-score guard
#                         against a map that overfits a small split)
#   auto_nll              every fixed calibrator (AUTO_NLL_CANDIDATES) scored by its held-out NLL
#                         (a proper score: steadier than the ECE of a 140-image fold) in the same
#                         repeated cross-validation (Dirichlet's penalty chosen once on the whole
#                         split, as compare_calibrators does: slightly optimistic for it); the lowest
#                         wins (it may change the arg-max: the change in accuracy is reported)
# temperature and the isotonic map never change the arg-max; vector, matrix and dirichlet may (the
# calibrated arg-max is then the prediction, and the change in accuracy is reported)
CALIBRATORS: tuple[str, ...] = (
    "temperature",
    "temperature+isotonic",
    "vector",
    "matrix",
    "dirichlet",
    "auto",
    "auto_nll",
)
FIXED_CALIBRATORS: tuple[str, ...] = tuple(c for c in CALIBRATORS if not c.startswith("auto"))
ARGMAX_KEPT: frozenset[str] = frozenset({"temperature", "temperature+isotonic"})
AUTO_CANDIDATES: tuple[str, ...] = ("temperature", "temperature+isotonic")
AUTO_NLL_CANDIDATES: tuple[str, ...] = FIXED_CALIBRATORS
AUTO_FOLDS = 5
AUTO_REPEATS = 3  # the CV is repeated over this many random fold assignments (seeds 0..): a steadier choice
DIRICHLET_LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
# weight of the raw confidence mixed into the isotonic map so that it is strictly increasing: the
# ranking of images by confidence (referral, AURC) is the temperature-scaled one, without ties
ISO_TIEBREAK = 1e-6


def _logits(probs: Tensor) -> Tensor:
    return torch.as_tensor(probs, dtype=torch.float64).clamp_min(EPS).log()


def apply_temperature(probs: Tensor, temperature: float) -> Tensor:
    """``softmax(log p / T)``: T > 1 softens, T < 1 sharpens, T = 1 leaves ``probs`` unchanged."""
    return torch.softmax(_logits(probs) / float(temperature), dim=-1)


def nll(probs: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    return float(F.nll_loss(_logits(probs), torch.as_tensor(labels).long()))


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multiclass Brier score: mean over images of sum_c (p_c - 1[y = c])^2 (0 best, 2 worst)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    onehot = F.one_hot(torch.as_tensor(labels).long(), p.shape[-1]).to(p.dtype)
    return float(((p - onehot) ** 2).sum(-1).mean())


def ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Top-label expected calibration error, equal-width bins (torchmetrics, L1)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.as_tensor(probs, dtype=torch.float32)
    return float(multiclass_calibration_error(p, torch.as_tensor(labels).long(), p.shape[-1], n_bins=n_bins, norm="l1"))


def classwise_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Mean over classes of the one-vs-rest ECE of p_c against 1[y = c] (Kull et al. 2019)."""
    from torchmetrics.functional.classification import binary_calibration_error

    p = torch.as_tensor(probs, dtype=torch.float32)
    y = torch.as_tensor(labels).long()
    vals = [
        float(binary_calibration_error(p[:, c], (y == c).long(), n_bins=n_bins, norm="l1")) for c in range(p.shape[-1])
    ]
    return sum(vals) / len(vals)


def fit_isotonic(confidence: Tensor, correct: Tensor) -> dict:
    """Isotonic regression of correctness on top-label confidence (scikit-learn), as the knots of a
    piecewise-linear non-decreasing map from [0, 1] to [0, 1]: ``{"x": [...], "y": [...]}``."""
    from sklearn.isotonic import IsotonicRegression

    c = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    ok = torch.as_tensor(correct).flatten().to(torch.float64)
    if c.numel() == 0:
        raise ValueError("cannot fit an isotonic map on an empty split")
    ir = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip").fit(c.numpy(), ok.numpy())
    return {"x": [float(v) for v in ir.X_thresholds_], "y": [float(v) for v in ir.y_thresholds_]}


def isotonic_confidence(confidence: Tensor, knots: dict) -> Tensor:
    """The isotonic map at ``confidence`` (linear between knots, constant outside them, as scikit-learn's
    ``predict``), mixed with ``ISO_TIEBREAK`` of the confidence itself: strictly increasing, in (0, 1)."""
    c = torch.as_tensor(confidence, dtype=torch.float64)
    x = torch.tensor(knots["x"], dtype=torch.float64)
    y = torch.tensor(knots["y"], dtype=torch.float64)
    if x.numel() == 1:
        mapped = y.expand_as(c).clone()
    else:
        cc = c.clamp(float(x[0]), float(x[-1]))
        i = torch.searchsorted(x, cc, right=True).clamp(1, x.numel() - 1)
        x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
        w = torch.where(x1 > x0, (cc - x0) / (x1 - x0).clamp_min(EPS), torch.ones_like(cc))
        mapped = y0 + w * (y1 - y0)
    out = (1 - ISO_TIEBREAK) * mapped + ISO_TIEBREAK * c
    return out.clamp(EPS, 1 - EPS)


def apply_isotonic(probs: Tensor, knots: dict) -> Tensor:
    """Replace each row's top probability by the isotonic confidence and rescale the other classes
    so that the row sums to 1 (their ratios kept). The arg-max never changes: the new top value is
    kept at least as large as every other entry."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    conf, pred = p.max(-1)
    new = isotonic_confidence(conf, knots)
    rest = p.clone()
    rest.scatter_(-1, pred[:, None], 0.0)
    total = rest.sum(-1, keepdim=True)
    C = p.shape[-1]
    # rows where the other classes carry no mass: share the remainder equally
    share = torch.where(total > EPS, rest / total.clamp_min(EPS), torch.full_like(rest, 1.0 / max(C - 1, 1)))
    share.scatter_(-1, pred[:, None], 0.0)
    # the top class stays the arg-max: top >= m (1 - top) for the largest share m of the others
    m = share.max(-1).values
    top = torch.maximum(new, m / (1 + m) + 1e-9)
    out = share * (1 - top)[:, None]
    out.scatter_(-1, pred[:, None], top[:, None])
    return out


def fit_affine(probs: Tensor, labels: Tensor, kind: str, lam: float = 0.0, max_iter: int = 100) -> dict:
    """Vector or matrix scaling of the log-probabilities, ``softmax(w * log p + b)`` (``vector``) or
    ``softmax(W log p + b)`` (``matrix``), minimising the NLL (plus, with ``lam`` > 0 and a matrix,
    the ODIR penalty ``lam * (mean of the squared off-diagonal weights + mean squared bias)``,
    Kull et al. 2019). LBFGS in float64 from the temperature's solution (``W = I / T``, ``b = 0``),
    where the penalty is 0: the fitted NLL is never above the temperature's on the fitting data.
    Returns ``{"weight": ..., "bias": ..., "lambda": lam}`` as plain lists."""
    if kind not in ("vector", "matrix"):
        raise ValueError(f"affine calibration kind must be 'vector' or 'matrix', got {kind!r}")
    z = _logits(probs)
    y = torch.as_tensor(labels).long()
    if z.shape[0] == 0:
        raise ValueError("cannot fit a calibration map on an empty split")
    C = z.shape[-1]
    T = fit_temperature(probs, y)
    w0 = torch.full((C,), 1.0 / T, dtype=torch.float64) if kind == "vector" else torch.eye(C, dtype=torch.float64) / T
    w = w0.clone().requires_grad_(True)
    b = torch.zeros(C, dtype=torch.float64, requires_grad=True)
    off = ~torch.eye(C, dtype=torch.bool)

    def objective() -> Tensor:
        logits = z * w + b if kind == "vector" else z @ w.T + b
        loss = F.cross_entropy(logits, y)
        if lam > 0 and kind == "matrix" and C > 1:
            loss = loss + lam * ((w[off] ** 2).mean() + (b**2).mean())
        return loss

    with torch.no_grad():
        start = float(objective())
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14
    )

    def closure():
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    # a few thousand x C values: threads only contend (5x slower with 2 threads on a busy machine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        end = float(objective())
    if not (end <= start) or not torch.isfinite(w).all() or not torch.isfinite(b).all():
        w, b = w0, torch.zeros(C, dtype=torch.float64)  # never worse than where it started
    return {"weight": w.detach().tolist(), "bias": b.detach().tolist(), "lambda": float(lam)}


def apply_affine(probs: Tensor, fitted: dict) -> Tensor:
    """The probabilities of a vector (``weight`` [C]) or matrix (``weight`` [C, C]) scaling."""
    z = _logits(probs)
    w = torch.tensor(fitted["weight"], dtype=torch.float64)
    b = torch.tensor(fitted["bias"], dtype=torch.float64)
    return torch.softmax((z * w if w.ndim == 1 else z @ w.T) + b, dim=-1)


def fit_dirichlet(probs: Tensor, labels: Tensor, lambdas: tuple[float, ...] = DIRICHLET_LAMBDAS) -> dict:
    """Matrix scaling of log p with the ODIR penalty, its weight the one of ``lambdas`` with the
    lowest NLL in a 5-fold CV on this split (fewer than 10 images: the largest weight)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    n = y.numel()
    if n < 10:
        lam = max(lambdas)
    else:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        scores = []
        for lam in lambdas:
            held = torch.zeros_like(p)
            for f in perm.chunk(5):
                keep = torch.ones(n, dtype=torch.bool)
                keep[f] = False
                held[f] = apply_affine(p[f], fit_affine(p[keep], y[keep], "matrix", lam))
            scores.append(nll(held, y))
        lam = lambdas[min(range(len(lambdas)), key=lambda i: (scores[i], -lambdas[i]))]
    return fit_affine(p, y, "matrix", lam)


def calibrator_kind(calib: dict) -> str:
    """The fitted calibrator of a calibration dict (those stored before the ``kind`` key: temperature,
    with the isotonic map when it has one)."""
    if calib.get("kind"):
        return str(calib["kind"])
    return "temperature+isotonic" if calib.get("isotonic") else "temperature"


def apply_calibration(probs: Tensor, calib: dict) -> Tensor:
    """The calibrated probabilities of a fitted calibration: the vector / matrix scaling when it has
    one (``calib["affine"]``), else the temperature; then the isotonic map when it has one
    (``calib["isotonic"]``). Reads every calibration diffmic has stored."""
    if calib.get("affine"):
        cal = apply_affine(probs, calib["affine"])
    else:
        cal = apply_temperature(probs, float(calib["temperature"]))
    if calib.get("isotonic"):
        cal = apply_isotonic(cal, calib["isotonic"])
    return cal


def fit_calibration(probs: Tensor, labels: Tensor, calibrator: str = "temperature") -> dict:
    """Fit ``calibrator`` (one of CALIBRATORS) on one split's unscaled probabilities:
    ``{"kind", "temperature": T, "isotonic": knots or None, "affine": weights or None}`` (every kind
    stores the temperature alone too: the conformal sets use it), and for ``auto`` the
    cross-validation it decided on (``"auto": {"chosen", "rule", "cv": {kind: scores}}``)."""
    if calibrator not in CALIBRATORS:
        raise ValueError(f"calibrator must be one of {', '.join(CALIBRATORS)}, got {calibrator!r}")
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    if calibrator in ("auto", "auto_nll"):
        by_nll = calibrator == "auto_nll"
        dirichlet = None
        if by_nll:  # Dirichlet's penalty chosen once on the split: 15 fits in the CV instead of 300
            dirichlet = fit_dirichlet(p, y)
            cv = cross_validate_calibrators(p, y, AUTO_NLL_CANDIDATES, dirichlet_lambda=dirichlet["lambda"])
        else:
            cv = cross_validate_calibrators(p, y, AUTO_CANDIDATES)
        chosen = auto_nll_choice(cv) if by_nll else auto_choice(cv)
        auto = _fit_one(p, y, chosen, dirichlet)  # Dirichlet chosen: the fit above, not a second one
        auto["auto"] = {
            "chosen": chosen,
            "by": calibrator,
            "rule": AUTO_NLL_RULE if by_nll else AUTO_RULE,
            "folds": AUTO_FOLDS,
            "repeats": AUTO_REPEATS,
            "cv": cv,
        }
        return auto
    return _fit_one(p, y, calibrator)


def _fit_one(p: Tensor, y: Tensor, calibrator: str, dirichlet: dict | None = None) -> dict:
    """One fixed calibrator fitted (``fit_calibration`` for every kind but ``auto*``); ``dirichlet``:
    a Dirichlet fit of the same data already made, used instead of fitting it again."""
    T = fit_temperature(p, y)
    fitted: dict = {"kind": calibrator, "temperature": T, "isotonic": None, "affine": None}
    if calibrator == "temperature+isotonic":
        conf, pred = apply_temperature(p, T).max(-1)
        fitted["isotonic"] = fit_isotonic(conf, pred == y)
    elif calibrator in ("vector", "matrix"):
        fitted["affine"] = {"kind": calibrator, **fit_affine(p, y, calibrator)}
    elif calibrator == "dirichlet":
        fitted["affine"] = {"kind": "matrix", **(dirichlet if dirichlet is not None else fit_dirichlet(p, y))}
    return fitted


AUTO_RULE = (
    f"the arg-max-keeping calibrator ({', '.join(AUTO_CANDIDATES)}) with the lowest held-out ECE in "
    f"{AUTO_REPEATS} x {AUTO_FOLDS}-fold cross-validation on the validation split, among those whose "
    "held-out Brier score is not above the temperature's"
)


AUTO_NLL_RULE = (
    f"the calibrator ({', '.join(AUTO_NLL_CANDIDATES)}) with the lowest held-out negative log-likelihood in "
    f"{AUTO_REPEATS} x {AUTO_FOLDS}-fold cross-validation on the validation split (vector, matrix and Dirichlet "
    "scaling may change the predicted class: the change in accuracy is reported)"
)


def auto_nll_choice(cv: dict) -> str:
    """``auto_nll``'s rule (:data:`AUTO_NLL_RULE`): the lowest held-out NLL; a tie goes to the simpler
    calibrator (the earlier in :data:`AUTO_NLL_CANDIDATES`)."""
    ok = [k for k in AUTO_NLL_CANDIDATES if k in cv]
    return min(ok, key=lambda k: (round(cv[k]["nll"], 12), AUTO_NLL_CANDIDATES.index(k)))


def auto_choice(cv: dict) -> str:
    """``auto``'s rule (:data:`AUTO_RULE`) applied to :func:`cross_validate_calibrators`' scores."""
    base = cv["temperature"]["brier"]
    ok = [k for k in AUTO_CANDIDATES if k in cv and (k == "temperature" or cv[k]["brier"] <= base)]
    return min(ok, key=lambda k: (cv[k]["ece"], AUTO_CANDIDATES.index(k)))


def cross_validate_calibrators(
    probs: Tensor,
    labels: Tensor,
    kinds: tuple[str, ...] = AUTO_CANDIDATES,
    folds: int = AUTO_FOLDS,
    repeats: int = AUTO_REPEATS,
    dirichlet_lambda: float | None = None,
) -> dict:
    """Held-out scores of each fixed calibrator on one split: fitted on the other folds, scored
    (ECE, classwise ECE, NLL, Brier, accuracy, share of arg-max changed) on the pooled held-out
    predictions, averaged over ``repeats`` random fold assignments (seeds 0, 1, ...). ``"none"`` in
    ``kinds``: the unscaled probabilities. Fewer images than folds: every fold is one image.
    ``dirichlet_lambda``: the penalty weight ``dirichlet`` uses in every fold (default: chosen anew
    by an inner CV in each fold, 20 more fits per fold)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    n = y.numel()
    if n < 2:
        raise ValueError("cannot cross-validate a calibrator on fewer than 2 images")
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(s)) for s in range(repeats)]

    def fit(kind: str, pp: Tensor, yy: Tensor) -> dict:
        if kind == "dirichlet" and dirichlet_lambda is not None:
            return {"temperature": 1.0, "affine": fit_affine(pp, yy, "matrix", dirichlet_lambda)}
        return fit_calibration(pp, yy, kind)

    out = {}
    for kind in kinds:
        runs = []
        for perm in perms:
            held = torch.zeros_like(p)
            for f in perm.chunk(min(folds, n)):
                train = torch.ones(n, dtype=torch.bool)
                train[f] = False
                held[f] = p[f] if kind == "none" else apply_calibration(p[f], fit(kind, p[train], y[train]))
            runs.append(scores(held, y, p))
        out[kind] = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
    return out


def scores(probs: Tensor, labels: Tensor, reference: Tensor | None = None, n_bins: int = 15) -> dict:
    """:func:`calibration_summary` plus the accuracy of the arg-max, and with ``reference`` (the
    probabilities before calibration) the share of images whose arg-max the calibration changed."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    out = {**calibration_summary(p, y, n_bins), "acc": float((p.argmax(-1) == y).double().mean())}
    if reference is not None:
        ref = torch.as_tensor(reference, dtype=torch.float64)
        out["argmax_changed"] = float((p.argmax(-1) != ref.argmax(-1)).double().mean())
    return out


def compare_calibrators(probs: Tensor, labels: Tensor, kinds: tuple[str, ...] = FIXED_CALIBRATORS) -> dict:
    """Every fixed calibrator fitted on the whole split (to be applied to the test split), with its
    held-out scores on the split (:func:`cross_validate_calibrators`, ``none`` included; ``dirichlet``
    with the penalty weight chosen on the whole split, a slightly optimistic held-out score)."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    y = torch.as_tensor(labels).long()
    fitted = {k: fit_calibration(p, y, k) for k in kinds}
    lam = fitted["dirichlet"]["affine"]["lambda"] if "dirichlet" in fitted else None
    return {"fitted": fitted, "cv": cross_validate_calibrators(p, y, ("none", *kinds), dirichlet_lambda=lam)}


def calibration_summary(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict:
    return {
        "ece": ece(probs, labels, n_bins),
        "classwise_ece": classwise_ece(probs, labels, n_bins),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
    }


def fit_temperature(probs: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the NLL of ``softmax(log p / T)`` (LBFGS over log T)."""
    z = _logits(probs)
    y = torch.as_tensor(labels).long()
    if z.shape[0] == 0:
        raise ValueError("cannot fit a temperature on an empty split")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not (t > 0 and t < float("inf")):
        raise FloatingPointError(f"temperature fit diverged (T = {t})")
    return t


def fit_referral(
    confidence: Tensor, correct: Tensor, max_referred: float | None = 0.2, target_accuracy: float | None = None
) -> dict:
    """A confidence threshold: refer an image when its (calibrated) confidence is below it.

    ``target_accuracy`` given: the lowest threshold whose kept images reach that accuracy on this
    split (the fewest referrals); if none does, every image but the most confident one is referred.
    Otherwise: the threshold that refers at most ``max_referred`` of the images (the
    ``floor(max_referred * n)`` least confident; ties at the threshold are kept).
    """
    conf = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    corr = torch.as_tensor(correct).flatten().to(torch.float64)
    n = conf.numel()
    if n == 0:
        raise ValueError("cannot fit a referral threshold on an empty split")
    order = torch.sort(conf, stable=True).indices  # least confident first
    sc, cc = conf[order], corr[order]
    if target_accuracy is not None:
        # keep images from index k on (k referred); accuracy of the kept tail
        tail = torch.flip(torch.cumsum(torch.flip(cc, [0]), 0), [0]) / torch.arange(n, 0, -1, dtype=torch.float64)
        ok = (tail >= target_accuracy).nonzero().flatten()
        k = int(ok[0]) if ok.numel() else n - 1
        goal = {"target_accuracy": float(target_accuracy)}
    elif max_referred is not None:
        k = int(max_referred * n + 1e-9)
        goal = {"max_referred": float(max_referred)}
    else:
        raise ValueError("fit_referral needs max_referred or target_accuracy")
    if k == 0:
        threshold = 0.0
    else:
        threshold = float(sc[k]) if k < n else float(sc[-1]) + 1e-12
        # ties: images with conf == threshold are kept, so fewer than k may be referred
    referred = conf < threshold
    kept = ~referred
    return {
        **goal,
        "threshold": threshold,
        "fit_referred_fraction": float(referred.double().mean()),
        "fit_accuracy_kept": float(corr[kept].mean()) if kept.any() else None,
    }


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 15) -> tuple[Tensor, Tensor, Tensor]:
    """Per equal-width bin of top-label confidence: mean confidence, accuracy, count."""
    p = torch.as_tensor(probs, dtype=torch.float64)
    conf, pred = p.max(-1)
    acc = (pred == torch.as_tensor(labels).long()).double()
    idx = torch.clamp((conf * n_bins).ceil().long() - 1, 0, n_bins - 1)
    cnt = torch.bincount(idx, minlength=n_bins).double()
    mc = torch.bincount(idx, conf, minlength=n_bins) / cnt.clamp_min(1)
    ma = torch.bincount(idx, acc, minlength=n_bins) / cnt.clamp_min(1)
    return mc, ma, cnt


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_calibration(calib: dict, num_classes: int) -> None:
    """Validate the calibrator of a stored calibration (untrusted, e.g. an exported ``config.json``):
    otherwise a ``ValueError`` whose text starts with the key (``.temperature must be ...``)."""
    t = calib.get("temperature")
    if t is not None and not (_finite_number(t) and t > 0):
        raise ValueError(f".temperature must be a positive number, got {str(t)[:100]!r}")
    iso = calib.get("isotonic")
    if iso:
        x, y = (iso.get(k) if isinstance(iso, dict) else None for k in ("x", "y"))
        if not (
            isinstance(x, list)
            and isinstance(y, list)
            and 1 <= len(x) == len(y) <= 1_000_000
            and all(_finite_number(v) for v in x + y)
            and all(a <= b for a, b in zip(x, x[1:]))
        ):
            raise ValueError(".isotonic must hold knots x (non-decreasing) and y: equal-length lists of numbers")
    aff = calib.get("affine")
    if aff:
        C = num_classes
        w = aff.get("weight") if isinstance(aff, dict) else None
        b = aff.get("bias") if isinstance(aff, dict) else None
        vector = isinstance(w, list) and len(w) == C and all(_finite_number(v) for v in w)
        matrix = (
            isinstance(w, list)
            and len(w) == C
            and all(isinstance(r, list) and len(r) == C and all(_finite_number(v) for v in r) for r in w)
        )
        if not (vector or matrix):
            raise ValueError(f".affine.weight must be {C} numbers (vector) or {C} x {C} (matrix)")
        if not (isinstance(b, list) and len(b) == C and all(_finite_number(v) for v in b)):
            raise ValueError(f".affine.bias must be {C} numbers")
