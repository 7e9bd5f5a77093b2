"""Where ``diffmic predict`` writes, checked before anything is computed or written.

Guarantees (docs/robustness.md): output names never collide (explanations keep the path of each
image relative to the inputs), an existing file is replaced only when it is one of our own
earlier outputs (a predictions CSV with our header, an explanation PNG carrying our tag), and
no output ever lands on an input image or inside an input folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

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
    stems = {}
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
