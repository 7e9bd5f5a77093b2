"""Run-folder guarantees that are not training: the recorded data split, the list of skipped
images, and a write probe before an evaluation (see docs/robustness.md)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from diffmic.config import ConfigError

SPLIT_FILE = "split.json"
SKIPPED_FILE = "skipped.csv"
SPLITS = ("train", "val", "test")
#: overrides that can change which images land in which split
_SPLIT_KEYS = ("data.", "run.seed", "--config")


def split_record(dm) -> dict:
    """The ids of every split after ``setup()``, and a SHA-256 over them."""
    splits = {k: list(dm.indexes[k].ids) for k in SPLITS if k in dm.indexes}
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode("utf-8")).hexdigest()
    return {"format": 1, "sha256": digest, "sizes": {k: len(v) for k, v in splits.items()}, "splits": splits}


def write_split(run_dir: Path, record: dict) -> Path:
    path = Path(run_dir) / SPLIT_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)
    return path


def check_split(run_dir: Path, dm, verb: str, overrides: list[str] | None = None) -> None:
    """Refuse when the split built now differs from the one recorded at fit (``split.json``),
    naming the overrides that can change it. Runs trained before ``split.json`` existed are not
    checked."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"'{path}' is damaged ({exc}); it records the data split of this run. "
            f"Restore it from a backup, or delete it to skip the check."
        ) from exc
    new = split_record(dm)["splits"]
    diffs = []
    for k in SPLITS:
        a, b = set(old.get(k, [])), set(new.get(k, []))
        if a != b:
            added, removed = sorted(b - a), sorted(a - b)
            eg = (added or removed)[0]
            diffs.append(f"{k}: {len(added)} id(s) added, {len(removed)} removed (e.g. {eg!r})")
    if not diffs:
        return
    suspects = [o for o in (overrides or []) if o.startswith(_SPLIT_KEYS)]
    cause = (
        f"the overrides {', '.join(suspects)} change it; remove them"
        if suspects
        else "the data on disk or the config changed since training; restore them"
    )
    raise ConfigError(
        f"{verb}: the data split differs from the one recorded when '{run_dir}' was trained ({path}): "
        f"{'; '.join(diffs)}. Evaluating on it could score training images: {cause}. Nothing was written."
    )


def report_skipped(run_dir: Path, dm) -> Path | None:
    """With ``data.skip_bad``: print every skipped image and why, and write ``skipped.csv``."""
    from diffmic.reporting import write_rows_csv

    rows = []
    report = getattr(dm, "report", None)
    for p in report.removed if report is not None else []:
        rows.append(
            {
                "split": p.split or "",
                "id": p.record_id or "",
                "path": p.path or "",
                "problem": p.kind,
                "reason": p.message.removeprefix("removed: "),
            }
        )
    for r in getattr(dm, "missing_dropped", []) or []:
        rows.append(
            {
                "split": "",
                "id": r.id,
                "path": str(r.path or ""),
                "problem": "missing_file",
                "reason": f"{r.where()}: image file not found",
            }
        )
    if not rows:
        return None
    out = Path(run_dir) / SKIPPED_FILE
    write_rows_csv(out, rows)
    print(f"skipped {len(rows)} bad image(s) (data.skip_bad=true); listed in {out}:")
    for row in rows:
        print(f"  skipped [{row['split']}] {row['reason']}")
    return out


def probe_writable(run_dir: Path, error: type[OSError] = OSError, nbytes: int = 1 << 20) -> None:
    """Write (and flush to disk) ``nbytes`` in ``run_dir`` and remove them again, so a read-only
    folder or a full disk is reported before a long evaluation, not after it; raises ``error``
    (the caller's run-folder error class) naming the folder."""
    run_dir = Path(run_dir)
    try:
        fd, name = tempfile.mkstemp(prefix=".diffmic-write-probe-", dir=run_dir)
    except OSError as exc:
        raise error(
            f"cannot write to run folder '{run_dir}': {exc}. Results (test_metrics.json, "
            f"predictions.csv) go there; make it writable. Nothing was evaluated."
        ) from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(b"\0" * nbytes)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise error(
            f"cannot write to run folder '{run_dir}': {exc}. Results (test_metrics.json, "
            f"predictions.csv) go there: free disk space or make it writable. "
            f"Nothing was evaluated."
        ) from exc
    finally:
        Path(name).unlink(missing_ok=True)
