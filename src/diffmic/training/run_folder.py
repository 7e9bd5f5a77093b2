"""Run-folder guarantees that are not training: the recorded data split, the list of skipped
images, a write probe before an evaluation, the run lock (one fit per run folder) and the refusal
of a run folder that holds or lies inside the data (see docs/robustness.md)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from diffmic.atomic import atomic_write_text
from diffmic.config import ConfigError

SPLIT_FILE = "split.json"
SKIPPED_FILE = "skipped.csv"
SPLIT_NAMES = ("train", "val", "test")  # the splits of a run (data.split names the protocol: data.sources.SPLITS)
#: overrides that can change which images land in which split
_SPLIT_KEYS = ("data.", "run.seed", "--config")


def split_record(dm) -> dict:
    """The ids of every split after ``setup()``, and a SHA-256 over them."""
    splits = {k: list(dm.indexes[k].ids) for k in SPLIT_NAMES if k in dm.indexes}
    digest = hashlib.sha256(json.dumps(splits, sort_keys=True).encode("utf-8")).hexdigest()
    record = {"format": 1, "sha256": digest, "sizes": {k: len(v) for k, v in splits.items()}, "splits": splits}
    if getattr(dm, "folds", 0) >= 2:  # k-fold cross-validation: which fold is the test split
        record["cv"] = {"folds": int(dm.folds), "fold": int(dm.fold)}
    return record


def write_split(run_dir: Path, record: dict) -> Path:
    return atomic_write_text(Path(run_dir) / SPLIT_FILE, json.dumps(record, indent=1))  # ASCII JSON


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
    for k in SPLIT_NAMES:
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


# ------------------------------------------------------------------------------ the run lock
def _lock_file(fd: int) -> bool:
    """An exclusive, non-blocking lock on the open file ``fd`` (released by the kernel when the
    process ends, however it ends); False when another open of the file holds it."""
    if sys.platform == "win32":  # pragma: no cover - no fcntl there
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"process {int(info['pid'])} on {info.get('host', '?')} (since {info.get('started', '?')})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


class RunLock:
    """One fit (fresh or ``--resume``) per run folder: an exclusive lock on
    ``<run>/.diffmic-run.lock`` (holding the pid, host and start time), taken before the folder is
    checked or written and released when the fit ends. The operating system releases the lock of a
    process that dies, so a lock file left by a killed fit is simply taken again."""

    def __init__(self, run_dir: Path, error: type[Exception]):
        from diffmic.outputs import RUN_LOCK

        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RUN_LOCK
        self.error = error
        self.fd: int | None = None
        self.created: list[Path] = []

    def acquire(self) -> RunLock:
        import datetime
        import socket

        try:
            missing = [p for p in (self.run_dir, *self.run_dir.parents) if not p.exists()]
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self.error(
                f"cannot write to run folder '{self.run_dir}' (run.dir): {exc}. Choose a writable run.dir."
            ) from exc
        self.created = missing  # removed again on release when left empty
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                self.release()
                raise self.error(
                    f"cannot write to run folder '{self.run_dir}' (run.dir): {exc}. Choose a writable run.dir."
                ) from exc
            if not _lock_file(fd):
                os.close(fd)
                holder = _holder(self.path)
                self.release()
                raise self.error(
                    f"run folder '{self.run_dir}' is in use by {holder}: it holds the lock file "
                    f"'{self.path}'. Wait for that fit to end, or choose another run.dir; nothing was changed."
                )
            try:  # the file may have been removed (released) between open and lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.fd = fd
            info = {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
            }
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode())
            return self
        raise self.error(f"could not lock run folder '{self.run_dir}' ({self.path} keeps being replaced)")

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        for d in self.created:  # folders made for this fit and left empty (it stopped early)
            try:
                d.rmdir()
            except OSError:
                break
        self.created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------- run folders apart from the data
def check_run_outside_data(run_dir: str | Path, data_root: str | Path) -> None:
    """Refuse a run folder that is the data folder, lies inside it, or holds it (symbolic links
    resolved): a run writes files there and ``fit --overwrite`` removes its own, which must never
    mix with (or be taken for) the images. A data root that is a file (a CSV manifest, an
    ``.npz``) is refused only when the run folder holds it."""
    run = Path(os.path.normcase(os.path.realpath(run_dir)))
    data = Path(os.path.normcase(os.path.realpath(data_root)))
    if data.is_file():
        relation = "holds the data file" if run in data.parents else None
    elif run == data:
        relation = "is the data folder"
    elif data in run.parents:
        relation = "is inside the data folder"
    elif run in data.parents:
        relation = "holds the data folder"
    else:
        relation = None
    if relation:
        raise ConfigError(
            f"run.dir '{run_dir}' {relation} data.root '{data_root}' (resolved: {run} and {data}). A run "
            f"writes its checkpoints, logs and results into its folder (and --overwrite removes them), so it "
            f"must not share a folder with the data: choose a run.dir outside the data; nothing was written."
        )
