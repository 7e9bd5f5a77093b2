"""Tables written beside a run's results: CSV rows and JSON documents, written atomically.

A reader never sees a half-written file: each is written to a fresh hidden temporary name beside it
(never an existing file) and renamed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from diffmic.atomic import atomic_path, atomic_write_text


def write_rows_csv(path: str | Path, rows: list[dict]) -> Path:
    """Write ``rows`` (dicts sharing the first row's keys) as a CSV file with a header."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "x", newline="") as fh:
        if rows:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    return path


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON."""
    return atomic_write_text(path, json.dumps(data, indent=2))  # ASCII (ensure_ascii)
