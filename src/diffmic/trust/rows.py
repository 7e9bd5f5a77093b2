"""The per-image prediction row: the one place that names and formats the columns of ``diffmic
test``'s ``predictions.csv`` and of ``diffmic predict``'s CSV.

A row's keys, in order, are the CSV header. The two files keep the layouts they have always had
(scripts read them by column name, and files written before compare byte for byte):

``"test"`` (:func:`prediction_row`, then :func:`calibrate_row` when the checkpoint is calibrated)
    ``id, label`` (the true class index) ``, pred, confidence``, with reverse samples
    ``agreement, spread, entropy, refer``, then ``p_<class>...``, with a DCG prior ``prior_pred`` and
    ``prior_p_<class>...``, with K >= 2 samples the CARD columns ``ttest_p, uncertain`` and
    ``y_mean_<class>, y_lo_<class>, y_hi_<class>`` per class, with an out-of-distribution flag
    ``ood_score, ood``; a calibration replaces ``confidence``, ``pred`` and ``p_<class>`` by the
    calibrated values and appends ``confidence_unscaled``, ``pred_unscaled`` (when the calibration
    moves some arg-max), ``refer`` (where the row had none), ``set``, ``set_size`` and
    ``unscaled_p_<class>...``.
``"predict"``
    ``id, pred, label`` (the predicted class name) ``, confidence, agreement, spread, entropy, refer,
    p_<class>...``, when calibrated ``confidence_unscaled, set``, with K >= 2 samples ``uncertain,
    ttest_p``, with an out-of-distribution flag ``ood, ood_score``, with the DCG's crops ``roi_boxes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Union

from torch import Tensor

Layout = Literal["test", "predict"]
#: one value per class, in the order of the class names
PerClass = Union[Sequence[float], Tensor]


def _per_class(prefix: str, class_names: Sequence[str], values: PerClass) -> dict[str, float]:
    return {f"{prefix}{n}": float(values[c]) for c, n in enumerate(class_names)}


def prediction_row(
    image_id: str,
    class_names: Sequence[str],
    probs: PerClass,
    *,
    label: int | str,
    pred: int,
    confidence: float,
    layout: Layout = "test",
    readout: tuple[float | None, float | None, float] | None = None,
    refer: bool | None = None,
    prior_pred: int | None = None,
    prior_probs: PerClass | None = None,
    ttest_p: float | None = None,
    uncertain: bool | None = None,
    card_interval: tuple[PerClass, PerClass, PerClass] | None = None,
    ood: tuple[float, bool] | None = None,
    confidence_unscaled: float | None = None,
    prediction_set: Sequence[str] | None = None,
    roi_boxes: Sequence[Sequence[int]] | None = None,
) -> dict[str, Any]:
    """One image's row in ``layout`` (see the module docstring); a column whose value is ``None``
    is left out.

    ``label``: the true class index (test) or the predicted class name (predict); ``readout``:
    ``(agreement, spread, entropy)`` of the K reverse samples (a ``None`` is left out); ``ttest_p`` / ``uncertain``: CARD's
    t-test of the two top classes; ``card_interval``: per-class ``(mean, low, high)`` of the
    samples (test); ``ood``: ``(score, flagged)``; ``confidence_unscaled`` / ``prediction_set``:
    the uncalibrated confidence and the conformal set of a calibrated prediction (predict; test rows
    gain theirs from :func:`calibrate_row`); ``roi_boxes``: the DCG's crops in pixels (predict).
    """
    test = layout == "test"
    if layout not in ("test", "predict"):
        raise ValueError(f"layout must be 'test' or 'predict', got {layout!r}")
    row: dict[str, Any] = {"id": image_id}
    row.update({"label": label, "pred": int(pred)} if test else {"pred": int(pred), "label": label})
    row["confidence"] = float(confidence)
    if readout is not None:  # agreement / spread None: no samples were drawn (predict --fast)
        row.update({k: float(v) for k, v in zip(("agreement", "spread", "entropy"), readout) if v is not None})
    if refer is not None:
        row["refer"] = int(refer)
    row.update(_per_class("p_", class_names, probs))
    if not test and prediction_set is not None:
        row["confidence_unscaled"] = confidence_unscaled
        row["set"] = "|".join(prediction_set)
    if prior_pred is not None:
        row["prior_pred"] = int(prior_pred)
    if prior_probs is not None:
        row.update(_per_class("prior_p_", class_names, prior_probs))
    if uncertain is not None and ttest_p is not None:
        card = {"ttest_p": float(ttest_p), "uncertain": int(uncertain)}
        row.update(card if test else {"uncertain": card["uncertain"], "ttest_p": card["ttest_p"]})
    if card_interval is not None:
        mean, low, high = card_interval
        for c, n in enumerate(class_names):
            row[f"y_mean_{n}"] = float(mean[c])
            row[f"y_lo_{n}"] = float(low[c])
            row[f"y_hi_{n}"] = float(high[c])
    if ood is not None:
        score, flag = float(ood[0]), int(ood[1])
        row.update({"ood_score": score, "ood": flag} if test else {"ood": flag, "ood_score": score})
    if roi_boxes is not None:
        row["roi_boxes"] = ";".join(",".join(str(int(v)) for v in box) for box in roi_boxes)
    return row


def calibrate_row(
    row: dict[str, Any],
    class_names: Sequence[str],
    probs: PerClass,
    *,
    confidence: float,
    pred: int | None,
    refer: bool,
    prediction_set: Sequence[str],
) -> None:
    """Apply a calibration to a test row in place (see the module docstring): ``probs`` (the
    calibrated probabilities) and ``confidence`` (theirs at the arg-max) replace the row's, the unscaled values are kept
    as ``confidence_unscaled`` / ``unscaled_p_<class>``; ``pred``: the calibrated arg-max when the
    calibration moved some image's (``None``: the column is left as it is)."""
    update: dict[str, Any] = {"confidence_unscaled": row["confidence"], "confidence": float(confidence)}
    if pred is not None:
        update["pred_unscaled"] = row["pred"]
        update["pred"] = int(pred)
    update["refer"] = int(refer)
    update["set"] = "|".join(prediction_set)
    update["set_size"] = len(prediction_set)
    update.update({f"unscaled_p_{n}": row[f"p_{n}"] for n in class_names})
    update.update(_per_class("p_", class_names, probs))
    row.update(update)
