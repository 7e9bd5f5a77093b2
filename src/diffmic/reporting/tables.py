"""Tables written beside a run's results: CSV rows and JSON documents, written atomically.

A reader never sees a half-written file: each is written to a fresh hidden temporary name beside it
(never an existing file) and renamed.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from diffmic.reporting.figures import fresh_temp_name


def write_rows_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts sharing the first row's keys) as a CSV file with a header."""
    path = Path(path)
    tmp = fresh_temp_name(path)
    try:
        with open(tmp, "x", newline="") as fh:
            if rows:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
                writer.writeheader()
                writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON."""
    path = Path(path)
    tmp = fresh_temp_name(path)
    try:
        with open(tmp, "x") as fh:
            fh.write(json.dumps(data, indent=2))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
