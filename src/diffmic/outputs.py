"""Which output files are ours to replace or remove.

``diffmic predict`` (checked before anything is computed or written): output names never collide
(explanations keep the path of each image relative to the inputs), an existing file is replaced
only when it is one of our own earlier outputs (a predictions CSV with our header, an explanation
PNG carrying our tag), and no output ever lands on an input image or inside an input folder.

Run folders: ``<run>/.diffmic-files.json`` (the manifest) lists every entry that ``fit``,
``test`` and ``report`` wrote there, recorded before it is written and settled afterwards;
``fit --overwrite`` removes exactly those (:func:`remove_run_outputs`), never a file of the
user's, and nothing at all in a folder without a manifest (see docs/robustness.md).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from diffmic.atomic import atomic_path

#: PNG text chunk that marks an explanation image written by diffmic
EXPLAIN_TAG = ("diffmic", "explanation")
#: first columns of a predictions CSV written by ``diffmic predict``
CSV_HEADER = "id,pred,label,confidence,agreement,spread,entropy,refer"


class OutputError(ValueError):
    """An output path would overwrite a file that is not ours, or an input."""


def _key(p: Path) -> str:
    return os.path.normcase(os.path.realpath(p))


def is_our_csv(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.readline().strip().startswith(CSV_HEADER)
    except OSError:
        return False


def is_our_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "text", {}).get(EXPLAIN_TAG[0]) == EXPLAIN_TAG[1]
    except Exception:  # noqa: BLE001 - any unreadable file is simply not ours
        return False


def explanation_names(images: Sequence[Path], roots: Sequence[Path]) -> list[Path]:
    """Relative output names, one per image, that never collide: the image's path relative to
    the input folder it was found in (or its own name for a file given directly), with the
    extension replaced by ``.png`` (kept, as ``name.jpg.png``, where that would collide)."""
    rels = []
    for img, root in zip(images, roots):
        rel = Path(img).relative_to(root) if root is not None else Path(Path(img).name)
        if root is not None:
            rel = Path(Path(root).name or "input") / rel
        rels.append(rel)
    # the same relative name from different inputs: prefix with the input's position
    seen: dict[str, int] = {}
    for r in rels:
        seen[r.as_posix().lower()] = seen.get(r.as_posix().lower(), 0) + 1
    out = []
    for i, r in enumerate(rels):
        if seen[r.as_posix().lower()] > 1:
            r = Path(f"input{i + 1}") / r
        out.append(r)
    stems: dict[str, int] = {}
    for r in out:
        k = r.with_suffix(".png").as_posix().lower()
        stems[k] = stems.get(k, 0) + 1
    names = [
        r.with_suffix(".png") if stems[r.with_suffix(".png").as_posix().lower()] == 1 else r.with_name(r.name + ".png")
        for r in out
    ]
    assert len({n.as_posix().lower() for n in names}) == len(names), "explanation names collide"
    return names


def plan_outputs(
    images: Sequence[Path], roots: Sequence[Path], input_dirs: Sequence[Path], output: str | None, explain: str | None
) -> list[Path] | None:
    """Check every output path before anything is computed; return the explanation paths.

    Raises :class:`OutputError` naming the file when an output would land on an input, inside an
    input folder, or on an existing file that is not one of our own earlier outputs."""
    inputs = {_key(p) for p in images}
    if output is not None:
        out = Path(output)
        if _key(out) in inputs:
            raise OutputError(
                f"--output '{out}' is one of the input images; it would be overwritten. "
                "Choose another file for the predictions CSV."
            )
        if out.is_dir():
            raise OutputError(f"--output '{out}' is a folder; give a CSV file name, e.g. {out / 'predictions.csv'}")
        if out.exists() and not is_our_csv(out):
            raise OutputError(
                f"--output '{out}' exists and is not a predictions CSV written by diffmic; "
                "nothing was written. Choose another file or move it away."
            )
    if explain is None:
        return None
    ex = Path(explain)
    if ex.exists() and not ex.is_dir():
        raise OutputError(f"--explain '{ex}' is a file, not a folder; nothing was written.")
    exk = _key(ex)
    for d in input_dirs:
        dk = _key(d)
        if exk == dk or exk.startswith(dk.rstrip(os.sep) + os.sep):
            raise OutputError(
                f"--explain '{ex}' is inside the input folder '{d}': explanation images "
                "would mix with (or replace) the inputs. Choose a folder outside the inputs."
            )
    paths = [ex / n for n in explanation_names(images, roots)]
    clash = [p for p in paths if _key(p) in inputs]
    if clash:
        raise OutputError(
            f"--explain would overwrite the input image '{clash[0]}'; nothing was written. Choose another folder."
        )
    foreign = [p for p in paths if p.exists() and not is_our_png(p)]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise OutputError(
            f"--explain: '{foreign[0]}'{more} exists and is not an explanation written by "
            "diffmic; nothing was written. Choose an empty folder or move the files away."
        )
    return paths


# --------------------------------------------------------------------------------------------------
# Run folders: which entries a run of ours wrote (the manifest)
# --------------------------------------------------------------------------------------------------

#: the record, in the run folder, of every entry a run of ours created there
MANIFEST = ".diffmic-files.json"
#: the lock a fit holds on its run folder (fresh or resumed): one fit per run folder
RUN_LOCK = ".diffmic-run.lock"
#: what ``fit`` writes into a run folder
FIT_OUTPUTS = ("checkpoints", "logs", "config.yaml", "split.json", "skipped.csv", "fit_summary.json")
#: what ``test`` writes into a run folder
TEST_OUTPUTS = ("test_metrics.json", "predictions.csv", "risk_coverage.png", "reliability.png")
#: what ``report`` writes into a run folder (``report.html`` only without ``--output``)
REPORT_OUTPUTS = ("report.html", "report_files", "lesion_hits.json")
#: every entry a run of ours may write; ``fit --overwrite`` removes only these, and only when the
#: manifest says a run of ours wrote them
RUN_OUTPUTS = FIT_OUTPUTS + TEST_OUTPUTS + REPORT_OUTPUTS
_BOOKKEEPING = (MANIFEST, RUN_LOCK)


def read_manifest(run_dir: Path) -> set[str] | None:
    """The entries the manifest of ``run_dir`` lists (only plain names a run writes: a tampered
    file can name nothing else), or ``None`` when the folder has no manifest (not a run folder,
    or one written by a diffmic older than the manifest)."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    import json

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = raw["entries"]
        if not isinstance(entries, list):
            raise TypeError("'entries' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise OutputError(
            f"'{path}' (the record of the files diffmic wrote in this run folder) is damaged ({exc}); "
            "nothing was removed. Restore it, or delete the run's files yourself."
        ) from exc
    return {e for e in entries if isinstance(e, str) and e in RUN_OUTPUTS}


def _write_manifest(run_dir: Path, entries: set[str]) -> None:
    import json
    import tempfile

    run_dir = Path(run_dir)
    text = json.dumps({"format": 1, "written_by": "diffmic", "entries": sorted(entries)}, indent=1)
    fd, tmp = tempfile.mkstemp(prefix=MANIFEST + ".", suffix=".tmp", dir=run_dir)  # mode 0600, as before
    with atomic_path(run_dir / MANIFEST, tmp=tmp), os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")


def claim_outputs(
    run_dir: Path, names: Sequence[str], force: Sequence[str] = (), create: bool = False
) -> set[str] | None:
    """Record in the manifest that a run of ours writes ``names`` (entries of :data:`RUN_OUTPUTS`)
    in ``run_dir``; call before writing them. A name that exists already and is not listed is
    someone else's file and is not claimed, unless it is in ``force`` (the caller has checked that
    it is a run's own, e.g. a resumed run's checkpoints). A folder without a manifest gets one
    only with ``create`` (``fit``): ``test`` and ``report`` leave a folder from an older diffmic
    as it was. Returns the entries listed afterwards (``None``: no manifest)."""
    run_dir = Path(run_dir)
    unknown = [n for n in (*names, *force) if n not in RUN_OUTPUTS]
    if unknown:
        raise ValueError(f"not run outputs: {unknown}")
    listed = read_manifest(run_dir)
    if listed is None and not (create and run_dir.is_dir()):
        return None
    listed = listed or set()
    new = {n for n in names if n not in listed and (n in force or not os.path.lexists(run_dir / n))}
    if new or not (run_dir / MANIFEST).is_file():
        listed |= new
        _write_manifest(run_dir, listed)
    return listed


def foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` (top level) that no run of ours wrote, sorted; every entry when the
    folder has no manifest."""
    run_dir = Path(run_dir)
    listed = read_manifest(run_dir) or set()
    return sorted(p.name for p in run_dir.iterdir() if p.name not in listed and p.name not in _BOOKKEEPING)


def remove_run_outputs(run_dir: Path) -> list[str]:
    """``fit --overwrite``: remove every entry the manifest lists (a folder with its contents; a
    link itself, never its target), after checking that no entry of someone else would then be
    written over. Raises :class:`OutputError`, removing nothing, when the folder has no manifest
    (diffmic cannot tell the old run's files from the user's) or when a file that is not ours
    carries a name a run writes. Returns the removed names."""
    import shutil

    run_dir = Path(run_dir)
    listed = read_manifest(run_dir)
    present = sorted(p.name for p in run_dir.iterdir() if p.name not in _BOOKKEEPING)
    if listed is None:
        shown = ", ".join(present[:8]) + (f", ... ({len(present)} entries)" if len(present) > 8 else "")
        raise OutputError(
            f"--overwrite: run folder '{run_dir}' has no {MANIFEST} (the record of the files a diffmic run "
            f"wrote; runs made by diffmic before it have none), so diffmic cannot tell a run's files from "
            f"yours and removes nothing. It holds: {shown}. Delete the old run's files yourself, or choose "
            "another run.dir."
        )
    blocking = [n for n in present if n not in listed and n in RUN_OUTPUTS]
    if blocking:
        raise OutputError(
            f"--overwrite: {', '.join(repr(n) for n in blocking)} in run folder '{run_dir}' "
            f"{'is' if len(blocking) == 1 else 'are'} not listed in {MANIFEST} (the record of the files "
            "diffmic runs wrote there), and a new run would write over it; nothing was removed. Move it "
            "away, or choose another run.dir."
        )
    removed = []
    for name in sorted(listed):
        p = run_dir / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif os.path.lexists(p):
            p.unlink()
        else:
            continue
        removed.append(name)
    _write_manifest(run_dir, set())
    return removed


def settle_outputs(run_dir: Path) -> None:
    """After a command that claimed outputs: drop from the manifest the names it did not write
    after all (it stopped early), so that a file someone puts there later is never taken for
    ours. A folder without a manifest is left as it is."""
    run_dir = Path(run_dir)
    listed = read_manifest(run_dir)
    if listed is None:
        return
    written = {n for n in listed if os.path.lexists(run_dir / n)}
    if written != listed:
        _write_manifest(run_dir, written)


@contextlib.contextmanager
def writing_run_outputs(run_dir: Path, names: Sequence[str]) -> Iterator[None]:
    """Around a step that writes ``names`` into a run folder (``report``): claim them in the
    manifest first (:func:`claim_outputs`; a folder without one is left as it is), settle it
    afterwards (:func:`settle_outputs`), so that ``fit --overwrite`` removes them with the run.
    When the step fails its error is the one reported."""
    try:
        claim_outputs(run_dir, names)
    except OSError as exc:
        raise OutputError(f"cannot write to run folder '{run_dir}': {exc}") from exc
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError, OutputError):
            settle_outputs(run_dir)
        raise
    settle_outputs(run_dir)
