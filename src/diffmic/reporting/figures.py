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
