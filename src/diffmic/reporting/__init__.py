"""Everything a run writes for people and scripts: CSV and JSON tables, figures.

``diffmic.reporting`` sits above ``diffmic.trust`` (it draws what trust measures: the reliability
diagram, the lesion crops) and below ``diffmic.training`` and ``diffmic.inference``: both write
their outputs through it, and it imports neither.
"""

from diffmic.reporting.figures import (
    PLAIN,
    plain_text,
    plot_referral,
    plot_reliability,
    plot_risk_coverage,
    save_figure_atomic,
)
from diffmic.reporting.tables import write_json, write_rows_csv

__all__ = [
    "PLAIN",
    "plain_text",
    "plot_referral",
    "plot_reliability",
    "plot_risk_coverage",
    "save_figure_atomic",
    "write_json",
    "write_rows_csv",
]
