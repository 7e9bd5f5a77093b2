"""Figures written beside a run's results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import Tensor


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
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        fig.savefig(tmp)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return path
