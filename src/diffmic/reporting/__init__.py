"""Everything a run writes for people and scripts: CSV and JSON tables, figures.

``diffmic.reporting`` sits below ``diffmic.training`` and ``diffmic.inference``: both write
their outputs through it, and it imports neither.
"""

from diffmic.reporting.figures import plot_risk_coverage
from diffmic.reporting.tables import write_json, write_rows_csv

__all__ = ["plot_risk_coverage", "write_json", "write_rows_csv"]
