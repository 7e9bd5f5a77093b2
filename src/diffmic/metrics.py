"""Dataset-level, DDP-safe metrics (torchmetrics) and read-outs from K reverse samples per image.

torchmetrics is imported by :func:`classification_metrics` and :func:`scalar_metric_fns` only: the
read-outs (:func:`readout`, :func:`should_refer`, :func:`referral_rule`) serve predictions, which
must not pay the seconds that importing torchmetrics takes (issue 27.2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from torchmetrics import MetricCollection


def classification_metrics(num_classes: int) -> MetricCollection:
    """Metrics accumulated over the whole split (synchronised across DDP ranks by torchmetrics).

    ``acc`` is dataset-level top-1 accuracy (the released code averages per-batch accuracies),
    ``balanced_acc`` the mean per-class recall, ``f1`` macro-F1, ``kappa`` quadratic-weighted
    Cohen's kappa (APTOS grading), ``auroc`` macro one-vs-rest AUROC on the class probabilities.
    """
    from torchmetrics import MetricCollection
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassAUROC,
        MulticlassCohenKappa,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    c = num_classes
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(c, average="micro"),
            "balanced_acc": MulticlassRecall(c, average="macro"),
            "f1": MulticlassF1Score(c, average="macro"),
            "kappa": MulticlassCohenKappa(c, weights="quadratic"),
            "auroc": MulticlassAUROC(c, average="macro"),
            "precision_per_class": MulticlassPrecision(c, average=None),
            "recall_per_class": MulticlassRecall(c, average=None),
            "f1_per_class": MulticlassF1Score(c, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(c),
        }
    )


SCALAR_METRICS = ("acc", "balanced_acc", "f1", "kappa", "auroc")

#: ``(probs [N,C], labels [N]) -> float``: one scalar metric of a set of predictions
MetricFn = Callable[[Tensor, Tensor], float]


def scalar_metric_fns(num_classes: int) -> dict[str, MetricFn]:
    """The :data:`SCALAR_METRICS` as functions of one set of predictions: the one definition behind
    the bootstrap intervals of test_metrics.json (``trust``) and the experiment tables.

    ``balanced_acc``, ``f1``, ``kappa`` and ``auroc`` are torchmetrics' functional forms of the
    metrics of :func:`classification_metrics`; ``acc`` is the fraction of arg-max hits in the dtype
    of ``probs``: for float32 probabilities torchmetrics' micro accuracy bit for bit (the headline
    ``acc`` of test_metrics.json), for float64 ones the exact fraction (the experiment tables).
    """
    from torchmetrics.functional.classification import (
        multiclass_auroc,
        multiclass_cohen_kappa,
        multiclass_f1_score,
        multiclass_recall,
    )

    c = num_classes

    def acc(p: Tensor, y: Tensor) -> float:
        return float((p.argmax(1) == y).to(p.dtype).mean())

    def balanced_acc(p: Tensor, y: Tensor) -> float:
        return float(multiclass_recall(p, y, c, average="macro"))

    def f1(p: Tensor, y: Tensor) -> float:
        return float(multiclass_f1_score(p, y, c, average="macro"))

    def kappa(p: Tensor, y: Tensor) -> float:
        return float(multiclass_cohen_kappa(p, y, c, weights="quadratic"))

    def auroc(p: Tensor, y: Tensor) -> float:
        return float(multiclass_auroc(p, y, c, average="macro"))

    return {"acc": acc, "balanced_acc": balanced_acc, "f1": f1, "kappa": kappa, "auroc": auroc}


AGGREGATES: tuple[str, ...] = ("mean", "vote")  # read-outs of the K samples (readout)


def metrics_to_json(values: dict[str, Tensor], class_names: list[str]) -> dict:
    """Turn a computed MetricCollection into plain JSON-able values with named classes."""
    out: dict = {}
    for key, val in values.items():
        val = val.detach().cpu()
        if key == "confusion_matrix":
            out[key] = val.long().tolist()
        elif val.ndim == 1:
            out[key] = {name: float(v) for name, v in zip(class_names, val)}
        else:
            out[key] = float(val)
    return out


@dataclass
class SampleReadout:
    """Per-image prediction from K reverse samples ``y0 [B,K,C]``.

    ``probs``: softmax of the mean sample (aggregate="mean") or vote frequencies (aggregate="vote").
    ``pred``: the predicted class. ``confidence``: probability of the predicted class.
    ``agreement``: fraction of the K samples whose argmax equals ``pred`` (1 when K = 1).
    ``spread``: mean over classes of the std of y0 across samples (0 when K = 1).
    ``entropy``: entropy of ``probs`` in nats.
    """

    probs: Tensor
    pred: Tensor
    confidence: Tensor
    agreement: Tensor
    spread: Tensor
    entropy: Tensor
    samples: Tensor | None = None  # the K samples y0 [B,K,C] themselves


def readout(
    y0: Tensor, aggregate: str = "mean", temperature: float = 0.2, point: Tensor | None = None
) -> SampleReadout:
    """Aggregate reverse-diffusion samples ``y0 [B,K,C]`` into a prediction and uncertainty.

    ``mean``: probabilities softmax(mean_k y0_k / temperature); the argmax equals the released
    code's argmax(y0) for K = 1. The sampled label vector lives on the one-hot scale, so
    softmax(y0) itself (temperature 1) would give a perfect one-hot only 0.31 for 7 classes; the
    default temperature 0.2 maps a one-hot to 0.93 (C = 7). These scores are not calibrated.
    ``vote``: the frequency of each class among the K sample argmaxes (CARD's majority vote).
    ``point [B,C]`` (the deterministic read-out, ``eval.point_steps``): probabilities
    softmax(point / temperature) instead of the sample mean; the K samples still give the
    agreement (with the point's class) and the spread.
    """
    if y0.ndim != 3:
        raise ValueError(f"y0 must be [B,K,C], got shape {tuple(y0.shape)}")
    num_classes = y0.shape[-1]
    votes = y0.argmax(-1)  # [B,K]
    freq = torch.nn.functional.one_hot(votes, num_classes).to(y0.dtype).mean(1)  # [B,C]
    if point is not None:
        if point.shape != (y0.shape[0], num_classes):
            raise ValueError(f"point must be [B,C] = {(y0.shape[0], num_classes)}, got {tuple(point.shape)}")
        probs = torch.softmax(point.to(y0.dtype) / temperature, dim=-1)
    elif aggregate == "mean":
        probs = torch.softmax(y0.mean(1) / temperature, dim=-1)
    elif aggregate == "vote":
        probs = freq
    else:
        raise ValueError(f"aggregate must be 'mean' or 'vote', got {aggregate!r}")
    pred = probs.argmax(-1)
    confidence = probs.gather(1, pred[:, None]).squeeze(1)
    agreement = (votes == pred[:, None]).to(y0.dtype).mean(1)
    spread = y0.std(1, unbiased=False).mean(-1) if y0.shape[1] > 1 else torch.zeros_like(confidence)
    entropy = -(probs.clamp_min(1e-12).log() * probs).sum(-1)
    return SampleReadout(probs, pred, confidence, agreement, spread, entropy, y0)


def should_refer(confidence: float, agreement: float | None, threshold: float) -> bool:
    """The referral rule: refer to a clinician when the confidence is below ``threshold`` or,
    with K reverse samples (``agreement`` given), when the samples do not all agree."""
    return confidence < threshold or (agreement is not None and agreement < 1.0)


def referral_rule(
    threshold: float, num_samples: int | None, fitted: dict | None = None, also: str | None = None
) -> str:
    """The referral rule that is applied, in words a clinician reads: the one function behind every
    place that states it (``diffmic test``/``report``, ``predict``, the Predictor, ``serve``, the model
    card; issue 25.5).

    ``fitted`` None: :func:`should_refer` with the fixed ``eval.refer_threshold`` (``num_samples``
    None or 1: no sample agreement). ``fitted``: the threshold fitted on validation images
    (``diffmic calibrate``; the dict of :func:`diffmic.trust.calibration.fit_referral` with
    ``num_images`` and ``fitted_on``), which alone decides (no sample agreement). ``also``: a further
    reason to refer that is applied (e.g. the out-of-distribution flag), as a clause.
    The threshold is shown with 3 decimals; the exact value is in ``test_metrics.json``."""
    if fitted is None:
        text = f"refer to a clinician when the model's probability for its predicted class is below {threshold:.3f}"
        if num_samples is not None and num_samples >= 2:
            text += f", or when its {num_samples} reverse-diffusion samples do not all agree on the class"
        text += " (a fixed threshold, eval.refer_threshold: the model was not calibrated on validation images)"
    else:
        thr = float(fitted["threshold"])
        text = (
            f"refer to a clinician when the model's calibrated probability for its predicted class is below {thr:.3f}"
        )
        n = fitted.get("num_images")
        where = f"{n} {fitted.get('fitted_on') or 'validation'} images" if n else "the validation images"
        where = where.replace(" val images", " validation images")
        done = fitted.get("fit_referred_fraction")
        kept = fitted.get("fit_accuracy_kept")
        result = ""
        if done is not None:
            result = f"; {done:.1%} of them were referred"
            if kept is not None:
                result += f" and {kept:.1%} of the others were classified correctly"
        if fitted.get("target_accuracy") is not None:
            goal = f"as the lowest at which the images kept reach {fitted['target_accuracy']:.0%} accuracy"
        elif fitted.get("max_referred") is not None:
            goal = f"so that at most {fitted['max_referred']:.0%} of them are referred"
        else:
            goal = "by diffmic calibrate"
        text += f" (threshold chosen on {where} {goal}{result})"
    if also:
        text += f"; also {also}"
    return text


def risk_coverage(confidence: Tensor, correct: Tensor) -> tuple[Tensor, Tensor]:
    """Selective prediction: keep the ``k`` most confident images and refer the rest.

    Returns ``coverage[k-1] = k / n`` and ``accuracy[k-1]`` = accuracy over the ``k`` most
    confident images, for k = 1..n. Ties in confidence are broken by input order (stable sort),
    so the curve is deterministic.
    """
    confidence = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    correct = torch.as_tensor(correct).flatten().to(torch.float64)
    if confidence.numel() != correct.numel() or confidence.numel() == 0:
        raise ValueError("confidence and correct must be non-empty and of the same length")
    order = torch.sort(-confidence, stable=True).indices
    k = torch.arange(1, confidence.numel() + 1, dtype=torch.float64)
    return k / confidence.numel(), torch.cumsum(correct[order], 0) / k


def selective_summary(
    confidence: Tensor,
    correct: Tensor,
    refer: Tensor | None = None,
    coverages: tuple[float, ...] = (1.0, 0.9, 0.8, 0.7, 0.5),
    curve: tuple[Tensor, Tensor] | None = None,
) -> dict:
    """What referring uncertain images to a clinician buys, as plain JSON values.

    ``accuracy_at_coverage``: accuracy on the most confident fraction kept (rounded to whole
    images); ``aurc``: area under the risk (error rate) - coverage curve, the mean over k of the
    error among the k most confident images (0 for a perfect ranking of an error-free model; the
    error rate itself for an uninformative confidence, in expectation). With ``refer`` (1 = referred
    by the run's rule) also the referred fraction and the accuracy of the kept and referred images.
    ``curve``: the :func:`risk_coverage` of the same inputs, if already computed.
    """
    cov, acc = curve if curve is not None else risk_coverage(confidence, correct)
    n = cov.numel()
    out: dict = {
        "num_images": n,
        "accuracy_at_coverage": {f"{c:g}": float(acc[max(int(round(c * n)), 1) - 1]) for c in coverages},
        "aurc": float((1.0 - acc).mean()),
    }
    if refer is not None:
        refer = torch.as_tensor(refer).flatten().bool()
        correct_b = torch.as_tensor(correct).flatten().bool()
        kept = ~refer
        out["referred_fraction"] = float(refer.double().mean())
        out["accuracy_kept"] = float(correct_b[kept].double().mean()) if kept.any() else None
        out["accuracy_referred"] = float(correct_b[refer].double().mean()) if refer.any() else None
    return out
