"""Calibration: NLL, ECE (15 equal-width bins), classwise ECE, Brier; temperature scaling fitted on
the validation split by minimising the NLL; the fitted referral threshold; a reliability diagram.

Probabilities are rescaled as ``softmax(log p / T)``: for the ``mean`` read-out ``log p`` equals the
sampler's logits ``mean y0 / eval.temperature`` up to a constant, for ``basic`` the classifier
logits, so this is ordinary temperature scaling (Guo et al. 2017).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_calibration_error,
    multiclass_calibration_error,
)

EPS = 1e-12


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
    p = torch.as_tensor(probs, dtype=torch.float32)
    return float(multiclass_calibration_error(p, torch.as_tensor(labels).long(), p.shape[-1], n_bins=n_bins, norm="l1"))


def classwise_ece(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """Mean over classes of the one-vs-rest ECE of p_c against 1[y = c] (Kull et al. 2019)."""
    p = torch.as_tensor(probs, dtype=torch.float32)
    y = torch.as_tensor(labels).long()
    vals = [
        float(binary_calibration_error(p[:, c], (y == c).long(), n_bins=n_bins, norm="l1")) for c in range(p.shape[-1])
    ]
    return sum(vals) / len(vals)


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
    else:
        k = int(max_referred * n + 1e-9)
        goal = {"max_referred": float(max_referred)}
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


def plot_reliability(panels: list[tuple[str, Tensor]], labels: Tensor, path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram, one panel per (title, probs): accuracy per confidence bin vs the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), dpi=120, squeeze=False)
    try:
        edges = torch.linspace(0, 1, n_bins + 1)
        for ax, (title, probs) in zip(axes[0], panels):
            mc, ma, cnt = reliability_bins(probs, labels, n_bins)
            keep = cnt > 0
            ax.bar(
                edges[:-1][keep].numpy(),
                ma[keep].numpy(),
                width=1 / n_bins,
                align="edge",
                edgecolor="k",
                lw=0.5,
                label="accuracy",
            )
            ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
            ax.plot(
                mc[keep].numpy(), ma[keep].numpy(), "o", color="C3", ms=3, label="(mean confidence, accuracy) per bin"
            )
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xlabel("confidence")
            ax.set_ylabel("accuracy")
            ax.set_title(f"{title}\nECE {ece(probs, labels, n_bins):.3f}", fontsize=9)
            ax.legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
