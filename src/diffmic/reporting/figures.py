"""Figures written beside a run's results (matplotlib, headless).

Every string that holds data (class names, file names, titles built from them) is drawn as plain
text: :func:`plain_text` escapes the ``$`` that would switch matplotlib to mathtext (where a
class called ``$\\undefinedcmd$`` is a parse error that kills the figure), and the texts we
create pass ``usetex=False`` so that a ``text.usetex: True`` matplotlibrc does not hand them to
LaTeX either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from torch import Tensor

from diffmic.atomic import atomic_path, fresh_temp_name  # noqa: F401 (fresh_temp_name: re-exported)

#: keyword arguments for every matplotlib Text that holds data: never LaTeX
PLAIN: dict[str, Any] = {"usetex": False}


def plain_text(s: object) -> str:
    """``s`` as a string that matplotlib draws verbatim (mathtext off): each ``$`` escaped as
    ``\\$``, which matplotlib shows as ``$``; nothing else changes (a backslash outside math
    mode is drawn as itself)."""
    return str(s).replace("$", "\\$")


def save_figure_atomic(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` to a fresh temporary file beside ``path``, then renamed over it: a failed
    write leaves no partial file, and no other file (``name.tmp.png``) is ever written over."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)
    return path


def plot_risk_coverage(
    coverage: Tensor,
    accuracy: Tensor,
    path: str | Path,
    referred_point: Optional[tuple[float, float]] = None,
    title: str = "",
) -> Path:
    """Accuracy of the kept images against the fraction kept (most confident first).

    ``referred_point`` = (coverage, accuracy) of the run's referral rule, marked on the curve.
    The file is written to a temporary name and renamed, so a failed write leaves no partial PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(4.5, 3.5), dpi=120)
    try:
        ax.plot(coverage.numpy(), accuracy.numpy(), lw=1.5, label="keep the most confident")
        ax.axhline(float(accuracy[-1]), color="grey", lw=0.8, ls="--", label="no referral")
        if referred_point is not None:
            ax.plot([referred_point[0]], [referred_point[1]], "o", color="C3", label="referral rule")
        ax.set_xlabel("coverage (fraction not referred)")
        ax.set_ylabel("accuracy on kept images")
        ax.set_xlim(0, 1)
        ax.set_title(plain_text(title), fontsize=9, **PLAIN)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        save_figure_atomic(fig, path)
    finally:
        plt.close(fig)
    return path


def plot_referral(coverage: Tensor, accuracy: Tensor, summary: dict, path: str | Path) -> Path:
    """:func:`plot_risk_coverage` of a test split, with the point of its referral rule (from the
    ``referral`` block of test_metrics.json, :func:`diffmic.metrics.selective_summary`)."""
    point = None
    if summary["accuracy_kept"] is not None:
        point = (1.0 - summary["referred_fraction"], summary["accuracy_kept"])
    title = f"{summary['num_images']} test images, AURC {summary['aurc']:.3f}"
    return plot_risk_coverage(coverage, accuracy, path, point, title=title)


def plot_reliability(panels: list[tuple[str, Tensor]], labels: Tensor, path: str | Path, n_bins: int = 15) -> Path:
    """Reliability diagram, one panel per (title, probs): accuracy per confidence bin vs the diagonal
    (:func:`diffmic.trust.calibration.reliability_bins`), each titled with its ECE."""
    import matplotlib
    import torch

    from diffmic.trust.calibration import ece, reliability_bins

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
        with atomic_path(path) as tmp:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    return path
