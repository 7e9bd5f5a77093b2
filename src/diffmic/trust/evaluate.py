"""Fit the trust parameters on the validation split (:func:`fit_trust`) and evaluate with them: the
test rows (:func:`test_trust`) and new predictions (:func:`predict_trust`).

The fitted parameters (temperature, referral threshold, conformal quantile, with the evaluation
settings they were fitted for) are stored in the checkpoint under ``diffmic_calibration``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffmic.trust.bootstrap import bootstrap_ci
from diffmic.trust.calibration import (
    apply_calibration,
    apply_temperature,
    calibration_summary,
    calibrator_kind,
    compare_calibrators,
    ece,
    fit_calibration,
    fit_referral,
    scores,
)
from diffmic.trust.conformal import (
    CONFORMAL_METHODS,
    METHOD_TEXT,
    conformal_sets,
    fit_conformal,
    image_uniforms,
    set_summary,
)
from diffmic.trust.ood import OODInputs, ood_scores, public, rule_text
from diffmic.trust.ood import flags as ood_flags
from diffmic.trust.rows import calibrate_row
from diffmic.trust.uncertainty import card_uncertainty, pavpu

CKPT_KEY = "diffmic_calibration"
SETTINGS = (
    "sampler",
    "steps",
    "eta",
    "start",
    "t_start",
    "point_steps",
    "num_samples",
    "aggregate",
    "temperature",
    "sample_seed",
    "refer_max_fraction",
    "refer_target_accuracy",
    "conformal_level",
    "conformal_method",
    "raps_lambda",
    "raps_k_reg",
    "calibrator",
    "ood_score",
    "ood_false_flag_rate",
)


def eval_settings(eval_cfg) -> dict:
    return {k: getattr(eval_cfg, k) for k in SETTINGS}


# keys added to SETTINGS after calibrations were first stored, with the value they had implicitly then
ADDED_LATER = {
    "t_start": None,
    "point_steps": 0,
    "calibrator": "temperature",
    "conformal_method": "aps",  # one APS quantile for all images (before issue 25.1)
    "raps_lambda": 0.1,
    "raps_k_reg": 1,
    "ood_score": "none",  # calibrations without an out-of-distribution flag
    "ood_false_flag_rate": 0.05,
}


def settings_match(stored: dict | None, eval_cfg) -> bool:
    """Whether a stored calibration was fitted for ``eval_cfg``'s read-out. A key added to the settings
    later (``ADDED_LATER``) that a stored calibration lacks counts as the value it implicitly had."""
    if not isinstance(stored, dict):
        return False
    return all(stored.get(k, ADDED_LATER.get(k)) == getattr(eval_cfg, k) for k in SETTINGS)


def fit_trust(
    probs: Tensor,
    labels: Tensor,
    eval_cfg,
    split: str = "val",
    ids: list | None = None,
    prior: Tensor | None = None,
    compare: bool = True,
) -> dict:
    """All trust parameters from one split's (unscaled) probabilities and labels. With ``compare``,
    also every fixed calibrator and every conformal method fitted on the split (``compared``, applied
    to the test split for the record); with ``prior`` (the DCG prior's probabilities of the same
    images), the same calibration and comparison for the prior (``prior``)."""
    probs = torch.as_tensor(probs, dtype=torch.float64)
    labels = torch.as_tensor(labels).long()
    calib = fit_calibration(probs, labels, eval_cfg.calibrator)
    scaled = apply_temperature(probs, calib["temperature"])
    cal = apply_calibration(probs, calib)
    conf, pred = cal.max(-1)
    referral = fit_referral(conf, pred == labels, eval_cfg.refer_max_fraction, eval_cfg.refer_target_accuracy)
    referral["num_images"] = int(labels.numel())
    u = image_uniforms(ids) if ids is not None else None

    def conformal(method: str) -> dict:
        return fit_conformal(
            scaled, labels, method, eval_cfg.conformal_level, u, eval_cfg.raps_lambda, eval_cfg.raps_k_reg
        )

    out = {
        "fitted_on": split,
        "num_images": int(labels.numel()),
        "settings": eval_settings(eval_cfg),
        "calibrator": eval_cfg.calibrator,
        **calib,
        "fit_nll_unscaled": calibration_summary(probs, labels)["nll"],
        "fit_nll": calibration_summary(cal, labels)["nll"],
        "referral": referral,
        # the conformal sets use the temperature-scaled probabilities: one fitted parameter, where the
        # isotonic map's many would be fitted on the same labels as the conformal quantile
        "conformal": {
            **conformal(eval_cfg.conformal_method),
            "method": METHOD_TEXT[eval_cfg.conformal_method] + ", randomised by image id",
            "probs": "temperature",
            "randomised": ids is not None,
        },
    }
    compare = compare and labels.numel() >= 10  # fewer: no meaningful held-out folds to compare on
    if compare:
        out["compared"] = compare_calibrators(probs, labels)
        out["conformal"]["compared"] = {m: conformal(m) for m in CONFORMAL_METHODS}
    pp = prior_probs(prior)
    if pp is not None:
        out["prior"] = {
            "what": "the DCG prior (its mean, normalised to sum to 1), calibrated like the read-out",
            **fit_calibration(pp, labels, eval_cfg.calibrator),
            **({"compared": compare_calibrators(pp, labels)} if compare else {}),
        }
    return out


def check_trust(calib: dict, num_classes: int) -> None:
    """Validate the calibrator, referral threshold and conformal fit of a stored calibration
    (untrusted, e.g. an exported ``config.json``): otherwise a ``ValueError`` whose text starts with
    the key below the calibration (``.referral.threshold must be ...``); the ``ood`` part has its own
    check (:func:`diffmic.trust.ood.check_ood`)."""
    from diffmic.trust.calibration import check_calibration
    from diffmic.trust.conformal import check_conformal

    check_calibration(calib, num_classes)
    ref = calib.get("referral")
    if ref is not None:
        thr = ref.get("threshold") if isinstance(ref, dict) else None
        if not (isinstance(thr, (int, float)) and not isinstance(thr, bool) and 0 <= thr <= 1 + 1e-9):
            raise ValueError(f".referral.threshold must be a number in [0, 1], got {str(thr)[:100]!r}")
    conf = calib.get("conformal")
    if conf is not None:
        if not isinstance(conf, dict):
            raise ValueError(".conformal must be a JSON object")
        try:
            check_conformal(conf, num_classes)
        except ValueError as exc:
            raise ValueError(f".conformal{exc}") from exc
    prior = calib.get("prior")
    if isinstance(prior, dict):
        try:
            check_calibration(prior, num_classes)
        except ValueError as exc:
            raise ValueError(f".prior{exc}") from exc


def prior_probs(prior: Tensor | None) -> Tensor | None:
    """The DCG prior mean as class probabilities (rows normalised to sum to 1: ``sum_probs`` sums to
    2); ``None`` without a prior or for the zero prior."""
    if prior is None:
        return None
    p = torch.as_tensor(prior, dtype=torch.float64)
    total = p.sum(-1, keepdim=True)
    if p.numel() == 0 or not bool((total > 0).all()):
        return None
    return p / total


def _conformal_probs(calib: dict, scaled: Tensor, cal: Tensor) -> Tensor:
    """The probabilities the conformal quantile was fitted on: temperature-scaled ones (calibrations
    fitted before the isotonic option stored no ``probs`` key and used the calibrated ones, equal then)."""
    return scaled if calib["conformal"].get("probs") == "temperature" else cal


@torch.no_grad()
def collect_probs(module, loader, ood: list | None = None, prior: list | None = None) -> tuple[Tensor, Tensor, list]:
    """Unscaled class probabilities, labels and ids of every image of ``loader`` (test-time sampler).
    With ``ood`` (a list), the same pass appends the out-of-distribution inputs of each batch
    (:class:`~diffmic.trust.ood.OODInputs`) to it; with ``prior`` (a list), the DCG prior mean of
    each batch (variants with a DCG prior)."""
    module.eval()
    ps, ys, ids = [], [], []
    for batch in loader:
        batch = {k: (v.to(module.device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
        if ood is None:
            probs, _, pr = module.scores(batch, "test")
        else:
            probs, _, pr, extra = module._eval_batch(batch, "test")
            ood.append(extra["ood"].detached())
        if prior is not None and pr is not None:
            prior.append(pr.detach().double().cpu())
        ps.append(probs.double().cpu())
        ys.append(batch["label"].cpu())
        ids += [str(i) for i in batch["id"]]
    return torch.cat(ps), torch.cat(ys), ids


@dataclass
class _Applied:
    """A stored calibration applied to the test rows: the tensors every block is computed from."""

    raw: Tensor  # the model's probabilities [N,C]
    scaled: Tensor  # temperature-scaled
    cal: Tensor  # calibrated (the calibrator's output)
    labels: Tensor
    conf: Tensor  # calibrated top-class probability
    pred: Tensor  # calibrated arg-max
    correct: Tensor
    refer: Tensor  # below the fitted threshold, or flagged out-of-distribution
    sets: Tensor  # conformal prediction sets [N,C] (bool)
    cprobs: Tensor  # the probabilities the conformal sets are built from
    u: Tensor | None  # per-image uniforms of randomised sets
    ood: dict  # the ``ood`` block (:func:`_ood_block`)


@dataclass
class TrustTest:
    """What :func:`test_trust` measured: the blocks of test_metrics.json, and what the two figures
    beside it draw (the caller draws them: :func:`diffmic.reporting.plot_referral` and
    :func:`diffmic.reporting.plot_reliability`)."""

    blocks: dict
    #: the risk-coverage curve of the calibrated confidence (:func:`diffmic.metrics.risk_coverage`)
    curve: tuple[Tensor, Tensor]
    #: the reliability diagram's panels: (title, probabilities) of the test images
    reliability: list[tuple[str, Tensor]]
    labels: Tensor


def test_trust(rows: list[dict], calib: dict, class_names: list[str], seed: int = 0, resamples: int = 500) -> TrustTest:
    """Apply ``calib`` to the test rows (in place, :func:`diffmic.trust.rows.calibrate_row`:
    calibrated ``confidence``/``p_*`` with the unscaled values kept as ``*_unscaled``, the fitted
    ``refer``, the prediction set) and measure the ``calibration``, ``conformal``, ``referral``,
    ``ood``, ``uncertainty`` and ``ci`` blocks."""
    from diffmic.metrics import risk_coverage

    a = _apply(rows, calib, class_names)
    curve = risk_coverage(a.conf, a.correct)
    blocks: dict = {"calibration": _calibration_block(rows, calib, class_names, a)}
    blocks["conformal"] = _conformal_block(calib["conformal"], a.sets, a.cprobs, a.labels, class_names, a.u)
    blocks["referral"] = _referral_block(calib, a, curve)
    blocks["ood"] = a.ood
    unc = torch.tensor([r["uncertain"] for r in rows]).bool() if "uncertain" in rows[0] else None
    blocks["uncertainty"] = (
        {"method": "CARD: paired t-test between the two largest sampled classes, alpha 0.05", **pavpu(a.correct, unc)}
        if unc is not None
        else {"method": "none: one deterministic output (no reverse samples)", "pavpu": None}
    )
    stats = _bootstrap_stats(calib, a, unc, len(class_names))
    blocks["ci"] = {k: bootstrap_ci(f, len(rows), resamples, seed) for k, f in stats.items()}
    blocks["ci_method"] = f"percentile bootstrap over test images, {resamples} resamples, seed {seed}, 95 %"
    return TrustTest(blocks, curve, _reliability_panels(calib, a), a.labels)


def _apply(rows: list[dict], calib: dict, class_names: list[str]) -> _Applied:
    """Calibrate, refer and build the prediction sets of the test rows, and write them into the rows."""
    raw = torch.tensor([[r[f"p_{n}"] for n in class_names] for r in rows], dtype=torch.float64)
    labels = torch.tensor([r["label"] for r in rows]).long()
    scaled = apply_temperature(raw, float(calib["temperature"]))
    cal = apply_calibration(raw, calib)
    conf, pred = cal.max(-1)  # vector / matrix / dirichlet may move the arg-max: the prediction follows
    correct = pred == labels
    refer = conf < float(calib["referral"]["threshold"])
    ood_block, ood_flag = _ood_block(rows, calib.get("ood"), correct)
    if ood_flag is not None:  # flagged images are referred whatever their confidence
        refer = refer | ood_flag
    u = image_uniforms([r["id"] for r in rows]) if calib["conformal"].get("randomised", False) else None
    cprobs = _conformal_probs(calib, scaled, cal)
    sets = conformal_sets(cprobs, calib["conformal"], u)
    moved = bool((pred != raw.argmax(-1)).any())
    for i, r in enumerate(rows):
        calibrate_row(
            r,
            class_names,
            cal[i],
            confidence=float(conf[i]),
            pred=int(pred[i]) if moved else None,
            refer=bool(refer[i]),
            prediction_set=[n for c, n in enumerate(class_names) if sets[i, c]],
        )
    return _Applied(raw, scaled, cal, labels, conf, pred, correct, refer, sets, cprobs, u, ood_block)


def _calibration_block(rows: list[dict], calib: dict, class_names: list[str], a: _Applied) -> dict:
    """The ``calibration`` block: the calibrator's scores on the test images, unscaled and (beyond a
    temperature) temperature-scaled beside it, every compared calibrator and the DCG prior's."""
    kind = calibrator_kind(calib)
    beyond_t = kind != "temperature"
    block = {
        "calibrator": kind,
        **({"auto": calib["auto"]} if calib.get("auto") else {}),
        "temperature": float(calib["temperature"]),
        "fitted_on": calib.get("fitted_on"),
        "n_bins": 15,
        **calibration_summary(a.cal, a.labels),
        **{f"{k}_unscaled": v for k, v in calibration_summary(a.raw, a.labels).items()},
        **({f"{k}_temperature": v for k, v in calibration_summary(a.scaled, a.labels).items()} if beyond_t else {}),
        # the arg-max of the calibrated probabilities against the model's (the headline metrics)
        "accuracy": float(a.correct.double().mean()),
        "accuracy_unscaled": float((a.raw.argmax(-1) == a.labels).double().mean()),
        "argmax_changed": float((a.pred != a.raw.argmax(-1)).double().mean()),
    }
    if calib.get("compared"):
        block["compared"] = _compared(a.raw, a.labels, calib["compared"])
    prior_block = _prior_block(rows, calib.get("prior"), a.labels, class_names)
    if prior_block is not None:
        block["prior"] = prior_block
    return block


def _referral_block(calib: dict, a: _Applied, curve: tuple[Tensor, Tensor]) -> dict:
    """The ``referral`` block: the fitted rule and goal, and what it buys on the test images."""
    from diffmic.metrics import selective_summary

    g = calib["referral"]
    goal = (
        f"refer at most {g['max_referred']:.0%}"
        if "max_referred" in g
        else f"accuracy >= {g['target_accuracy']} on kept images"
    )
    return {
        "rule": applied_rule(calib),
        "threshold": float(g["threshold"]),
        "goal": goal,
        "fit_referred_fraction": g.get("fit_referred_fraction"),
        "fit_accuracy_kept": g.get("fit_accuracy_kept"),
        **selective_summary(a.conf, a.correct, a.refer, curve=curve),
    }


def _reliability_panels(calib: dict, a: _Applied) -> list[tuple[str, Tensor]]:
    """The reliability diagram's panels: unscaled, temperature-scaled and (beyond a temperature) calibrated."""
    kind = calibrator_kind(calib)
    T = float(calib["temperature"])
    panels = [("unscaled", a.raw), (f"temperature {T:.2f} (fitted on validation)", a.scaled)]
    if kind == "temperature+isotonic":
        panels.append(("then isotonic (fitted on validation)", a.cal))
    elif kind != "temperature":
        panels.append((f"{kind} scaling (fitted on validation)", a.cal))
    return panels


def _bootstrap_stats(calib: dict, a: _Applied, unc: Tensor | None, num_classes: int) -> dict[str, Callable]:
    """The statistics of the ``ci`` block, each a function of a resample's image indices: the
    headline metrics of the model's probabilities (:func:`diffmic.metrics.scalar_metric_fns`, in
    float32 as the headline metrics themselves), calibration, referral and conformal measures."""
    from diffmic.metrics import scalar_metric_fns, selective_summary

    raw, cal, labels, correct, refer, sets = a.raw, a.cal, a.labels, a.correct, a.refer, a.sets
    p = raw.float()
    stats: dict[str, Callable] = {
        k: (lambda i, f=f: f(p[i], labels[i])) for k, f in scalar_metric_fns(num_classes).items()
    }
    stats["ece"] = lambda i: ece(cal[i], labels[i])
    stats["ece_unscaled"] = lambda i: ece(raw[i], labels[i])
    if calibrator_kind(calib) != "temperature":
        stats["ece_temperature"] = lambda i: ece(a.scaled[i], labels[i])
    stats["nll"] = lambda i: float(torch.nn.functional.nll_loss(cal[i].clamp_min(1e-12).log(), labels[i]))
    stats["brier"] = lambda i: float(
        ((cal[i] - torch.nn.functional.one_hot(labels[i], num_classes)) ** 2).sum(-1).mean()
    )
    stats["aurc"] = lambda i: selective_summary(a.conf[i], correct[i])["aurc"]
    stats["referred_fraction"] = lambda i: float(refer[i].double().mean())
    stats["accuracy_kept"] = lambda i: (
        float(correct[i][~refer[i]].double().mean()) if (~refer[i]).any() else float("nan")
    )
    covered = sets[torch.arange(labels.numel()), labels]
    stats["conformal_coverage"] = lambda i: float(covered[i].double().mean())
    stats["mean_set_size"] = lambda i: float(sets[i].sum(-1).double().mean())
    if unc is not None:
        stats["pavpu"] = lambda i: pavpu(correct[i], unc[i])["pavpu"]
    return stats


def applied_rule(calib: dict | None, refer_threshold: float = 0.5, num_samples: int | None = None) -> str:
    """The referral rule that ``calib`` applies (or, without one, ``eval.refer_threshold`` and sample
    agreement), in words: :func:`diffmic.metrics.referral_rule` on the stored fit."""
    from diffmic.metrics import referral_rule

    if calib is None or not isinstance(calib.get("referral"), dict):
        return referral_rule(refer_threshold, num_samples)
    g = dict(calib["referral"])
    g.setdefault("num_images", calib.get("num_images"))
    g.setdefault("fitted_on", calib.get("fitted_on"))
    ood = calib.get("ood")
    also = None
    if isinstance(ood, dict) and ood.get("score") is not None and ood.get("threshold") is not None:
        also = (
            f"when the image does not look like the training data ({ood['score']} score above "
            f"{float(ood['threshold']):.4g}), whatever its probability"
        )
    return referral_rule(float(g["threshold"]), None, fitted=g, also=also)


CALIBRATOR_TEXT = {
    "temperature": "one temperature",
    "temperature+isotonic": "one temperature, then a top-label isotonic map",
    "vector": "vector scaling (a scale and a bias per class)",
    "matrix": "matrix scaling",
    "dirichlet": "Dirichlet calibration (matrix scaling, ODIR-regularised)",
}


def describe_calibration(calib: dict | None, class_names: list[str] | None = None) -> str:
    """What a stored calibration does, in words (the model card): the calibrator, how it was chosen,
    and the prediction sets; the fitted values themselves stay in the stored dict."""
    if not isinstance(calib, dict):
        return "none: the probabilities are the model's own, not calibrated on validation images"
    n = calib.get("num_images")
    where = f"{n} validation images" if n else "the validation images"
    kind = calibrator_kind(calib)
    text = f"fitted on {where}: {CALIBRATOR_TEXT.get(kind, kind)}"
    if kind in ("temperature", "temperature+isotonic") and calib.get("temperature") is not None:
        text += f" (temperature {float(calib['temperature']):.3f})"
    if calib.get("auto"):
        by = calib["auto"].get("by", "auto")
        text += f", chosen by eval.calibrator={by}: " + str(calib["auto"].get("rule", ""))
    if kind not in ("temperature", "temperature+isotonic"):
        text += "; it may change the predicted class"
    conf = calib.get("conformal")
    if isinstance(conf, dict):
        level = conf.get("level")
        how = conf.get("text") or conf.get("method") or "APS"
        text += (
            f". Prediction sets: {how}, level {float(level):.0%}" if level is not None else f". Prediction sets: {how}"
        )
        always = conf.get("always_included") or []
        if always:
            names = [class_names[c] if class_names and c < len(class_names) else str(c) for c in always]
            text += (
                f"; {', '.join(names)} had too few validation images for a per-class guarantee at this level "
                "and is in every set"
            )
    return text


def _compared(raw: Tensor, labels: Tensor, compared: dict) -> dict:
    """Each calibrator fitted on validation (``compared["fitted"]``) applied to these probabilities:
    its scores here (:func:`~diffmic.trust.calibration.scores`) beside its held-out validation scores."""
    cv = compared.get("cv", {})
    out = {"none": {**scores(raw, labels, raw), "val_cv": cv.get("none")}}
    for k, fitted in compared.get("fitted", {}).items():
        out[k] = {**scores(apply_calibration(raw, fitted), labels, raw), "val_cv": cv.get(k)}
    return out


def _prior_block(rows: list[dict], prior_calib: dict | None, labels: Tensor, class_names: list[str]) -> dict | None:
    """The DCG prior's probabilities (the rows' ``prior_p_*``) with the same calibration as the
    read-out, fitted on the prior's validation probabilities: its scores unscaled and calibrated."""
    if not prior_calib or not rows or f"prior_p_{class_names[0]}" not in rows[0]:
        return None
    pp = torch.tensor([[r[f"prior_p_{n}"] for n in class_names] for r in rows], dtype=torch.float64)
    cal = apply_calibration(pp, prior_calib)
    out = {
        "what": prior_calib.get("what"),
        "calibrator": calibrator_kind(prior_calib),
        "temperature": prior_calib.get("temperature"),
        **({"auto": prior_calib["auto"]} if prior_calib.get("auto") else {}),
        **scores(cal, labels, pp),
        **{f"{k}_unscaled": v for k, v in scores(pp, labels).items()},
    }
    if prior_calib.get("compared"):
        out["compared"] = _compared(pp, labels, prior_calib["compared"])
    return out


def _conformal_block(
    fitted: dict, sets: Tensor, probs: Tensor, labels: Tensor, class_names: list[str], u: Tensor | None
) -> dict:
    """Coverage and set size (overall, per class) of the applied method, and of every method fitted
    on validation (``compared``), with the classes each Mondrian method includes in every set."""
    level = float(fitted["level"])

    def described(f: dict) -> dict:
        extra = {k: f[k] for k in ("kind", "text", "qhat", "qhat_per_class", "lam", "k_reg") if k in f}
        if f.get("always_included") is not None:
            extra["always_included"] = [class_names[c] for c in f["always_included"]]
        return extra

    out = {**set_summary(sets, labels, class_names, level), **described(fitted), "method": fitted.get("method")}
    if fitted.get("compared"):
        out["compared"] = {
            m: {**set_summary(conformal_sets(probs, f, u), labels, class_names, level), **described(f)}
            for m, f in fitted["compared"].items()
        }
    return out


def _ood_block(rows: list[dict], ood: dict | None, correct: Tensor) -> tuple[dict, Tensor | None]:
    """The ``ood`` block of test_metrics.json from the rows' ``ood`` / ``ood_score`` columns (set by
    the test step from the stored flag), and the per-image flags (``None`` without a flag)."""
    if not ood or ood.get("score") is None or not rows or "ood" not in rows[0]:
        return {"score": None, "rule": rule_text(ood)}, None
    flagged = torch.tensor([bool(r["ood"]) for r in rows])
    scores = torch.tensor([r["ood_score"] for r in rows], dtype=torch.float64)
    n = int(flagged.sum())
    return {
        **public(ood),
        "rule": rule_text(ood),
        "flagged": n,
        "flagged_fraction": float(flagged.double().mean()),
        "score_median": float(scores.median()),
        "accuracy_flagged": float(correct[flagged].double().mean()) if n else None,
        "accuracy_not_flagged": float(correct[~flagged].double().mean()) if n < len(rows) else None,
    }, flagged


def predict_trust(
    probs: Tensor,
    samples: Tensor | None,
    calib: dict | None,
    ids: list | None = None,
    ood_inputs: OODInputs | None = None,
) -> dict:
    """Per-image trust outputs for new images: calibrated probabilities, fitted referral and the
    conformal set (when ``calib`` is given), CARD flag (when K >= 2 samples are given), and the
    out-of-distribution score and flag (when ``calib`` holds one and ``ood_inputs`` are given;
    a flagged image is referred whatever its confidence)."""
    out: dict = {}
    if calib is not None:
        raw = probs.detach().double().cpu()
        cal = apply_calibration(raw, calib)
        out["probs"] = cal
        out["refer"] = cal.max(-1).values < float(calib["referral"]["threshold"])
        ood = calib.get("ood")
        if ood and ood.get("score") is not None and ood_inputs is not None:
            s = ood_scores(ood_inputs.detached(), ood)
            if s is not None:
                out["ood_score"], out["ood"] = s, ood_flags(s, ood.get("threshold"))
                out["refer"] = out["refer"] | out["ood"]
        u = image_uniforms(ids) if ids is not None and calib["conformal"].get("randomised", False) else None
        scaled = apply_temperature(raw, float(calib["temperature"]))
        cp = _conformal_probs(calib, scaled, cal)
        out["sets"] = conformal_sets(cp, calib["conformal"], u)
    if samples is not None and samples.shape[1] >= 2:
        card = card_uncertainty(samples.detach().cpu())
        out["uncertain"], out["p_value"] = card.uncertain, card.p_value
    return out
