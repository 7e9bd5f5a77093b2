"""Dataset checks: find every problem before training starts, and say what to do about it.

:func:`check_dataset` looks for missing / empty / corrupt / truncated / oversized images,
duplicate ids and files, ids shared between splits, labels outside the class range (and the
loader's unknown class names), and classes without any image in a split. It raises one
:class:`~diffmic.data.records.DataError` listing all of them, or with ``skip_bad=True`` removes
the bad records and lists them in the returned :class:`DataReport`.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

from .records import SPLIT_NAMES, DataError, DatasetIndex, Problem, Record
from .transforms import DEFAULT_MAX_PIXELS, open_image

__all__ = ["DataReport", "check_dataset", "check_image_file"]

_COMMON_MODES = {"RGB", "L"}
#: priority for keeping one copy of an id that appears in several splits: the test copy is kept
_KEEP_PRIORITY = {"test": 0, "val": 1, "all": 2, "train": 3}


@dataclass
class DataReport:
    """What :func:`check_dataset` found.

    splits: the checked indexes (with ``skip_bad=True``: the cleaned ones).
    problems: every problem (``severity`` error / warning / info), in check order.
    removed: with ``skip_bad=True``, one problem per removed record (severity ``warning``).
    image_sizes: per split, an ``[n, 2]`` array of (width, height) of the images read.
    modes: Pillow modes seen, with counts.
    """

    class_names: list[str]
    splits: dict[str, DatasetIndex]
    problems: list[Problem] = field(default_factory=list)
    removed: list[Problem] = field(default_factory=list)
    image_sizes: dict[str, np.ndarray] = field(default_factory=dict)
    modes: Counter = field(default_factory=Counter)
    checked_images: bool = False

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def infos(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "info"]

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def index(self) -> DatasetIndex:
        """The only split, for a report on a single index."""
        if len(self.splits) != 1:
            raise ValueError(f"report has {len(self.splits)} splits; use .splits[name]")
        return next(iter(self.splits.values()))

    def raise_if_errors(self) -> DataReport:
        if self.errors:
            raise DataError.from_problems(self.problems, report=self)
        return self

    def summary(self, max_problems: int = 30) -> str:
        names = self.class_names
        splits = list(self.splits)
        lines = [
            f"Data check: {len(names)} classes, splits: "
            + ", ".join(f"{s} {len(self.splits[s])}" for s in splits)
            + f" (total {sum(len(v) for v in self.splits.values())})"
        ]
        w = max([len("class")] + [len(n) for n in names]) + 2
        lines.append("class".ljust(w) + "".join(s.rjust(9) for s in splits))
        counts = {s: self.splits[s].class_counts() for s in splits}
        for c, n in enumerate(names):
            lines.append(f"{c} {n}".ljust(w) + "".join(str(int(counts[s][c])).rjust(9) for s in splits))
        lines.append("all".ljust(w) + "".join(str(len(self.splits[s])).rjust(9) for s in splits))
        if self.checked_images and self.image_sizes:
            allsz = np.concatenate(
                [a for a in self.image_sizes.values() if len(a)] or [np.zeros((0, 2), dtype=np.int64)]
            )
            if len(allsz):
                wd, ht = allsz[:, 0], allsz[:, 1]
                lines.append(
                    f"Image sizes ({len(allsz)} read): width {wd.min()}-{wd.max()} (median "
                    f"{int(np.median(wd))}), height {ht.min()}-{ht.max()} (median {int(np.median(ht))})"
                )
            if self.modes:
                lines.append("Modes: " + ", ".join(f"{m} {k}" for m, k in self.modes.most_common()))
        elif not self.checked_images:
            lines.append("Images were not opened (check_images=False).")
        e, wn, i = len(self.errors), len(self.warnings), len(self.infos)
        lines.append(f"Problems: {e} error(s), {wn} warning(s), {i} info")
        shown = self.errors + self.warnings + self.infos
        for p in shown[:max_problems]:
            lines.append("  - " + p.format().replace("\n", "\n  "))
        if len(shown) > max_problems:
            lines.append(f"  ... and {len(shown) - max_problems} more")
        if self.removed:
            lines.append(f"Removed {len(self.removed)} record(s) (skip_bad=True).")
        lines.append("OK" if self.ok else "NOT OK: fix the errors above or use skip_bad=True")
        return "\n".join(lines)


def check_image_file(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> tuple[tuple[int, int, str] | None, str | None, str | None]:
    """Open, verify and fully decode one image file.

    Returns ``((width, height, mode), None, None)`` when it is fine, else
    ``(None, kind, reason)`` with kind in ``empty_file``, ``missing_file``, ``too_large``,
    ``truncated_image``, ``corrupt_image``."""
    info, kind, reason, _ = _inspect_image(path, max_pixels)
    return info, kind, reason


def pixel_digest(img_or_array: np.ndarray | Image.Image) -> str:
    """SHA-1 of decoded pixels (mode, size and bytes): equal for byte-identical images whatever
    their file names or formats."""
    h = hashlib.sha1()
    if isinstance(img_or_array, np.ndarray):
        a = np.ascontiguousarray(img_or_array)
        h.update(f"{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    else:
        h.update(f"{img_or_array.mode}|{img_or_array.size}|".encode())
        h.update(img_or_array.tobytes())
    return h.hexdigest()


#: what :func:`_inspect_image` finds: ``(width, height, mode)`` or ``None``, the kind and reason of a
#: problem (``None`` when fine), the digest of the decoded pixels (``None`` when bad)
_Inspection = tuple[tuple[int, int, str] | None, str | None, str | None, str | None]


def _inspect_image(path: str | os.PathLike, max_pixels: int | None) -> _Inspection:
    """:func:`check_image_file` plus the digest of the decoded pixels (``None`` when bad)."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return None, "missing_file", "file not found", None
    if st.st_size == 0:
        return None, "empty_file", "file is empty (0 bytes)", None
    try:
        img = open_image(p, max_pixels)
    except DataError as e:
        msg = str(e)
        kind = "too_large" if ("limit" in msg or "bomb" in msg) else "corrupt_image"
        return None, kind, msg.split(": ", 1)[-1], None
    try:
        with img:
            size, mode = img.size, img.mode
            img.verify()
        with open_image(p, max_pixels) as img2:  # a DICOM file: its windowed 8-bit image
            img2.load()
            digest = pixel_digest(img2)
    except Exception as e:  # untrusted bytes: many exception types are possible
        text = f"{type(e).__name__}: {e}"
        kind = "truncated_image" if "truncat" in text.lower() else "corrupt_image"
        return None, kind, text, None
    return (int(size[0]), int(size[1]), str(mode)), None, None, digest


_HINTS = {
    "missing_file": "restore the file, fix the path, or remove the row from the split",
    "empty_file": "re-download or re-export the image, or remove it",
    "corrupt_image": "re-download or re-export the image, or remove it",
    "truncated_image": "the file is cut short: re-download it, or remove it",
    "too_large": "check the file; raise max_pixels if the image is genuine",
}


#: a record's place in the checked splits: (split name, position in that split's records)
_Where = tuple[str, int]
#: a file to open: its split, its position there, the record and its (existing, non-empty) path
_ToOpen = tuple[str, int, Record, Path]


@dataclass
class _Findings:
    """What the checks of one :func:`check_dataset` call share: the splits, the problems found so
    far (in check order), the records an error marks for removal, and what was read from the
    images (sizes, modes and pixel digests)."""

    splits: dict[str, DatasetIndex]
    class_names: list[str]
    num_classes: int
    problems: list[Problem] = field(default_factory=list)
    #: split -> record id -> the first error about that record
    bad: defaultdict[str, dict[str, Problem]] = field(default_factory=lambda: defaultdict(dict))
    #: split -> positions to drop
    bad_pos: defaultdict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    sizes: defaultdict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))
    modes: Counter[str] = field(default_factory=Counter)
    mode_example: dict[str, str] = field(default_factory=dict)
    #: pixel digest -> where those pixels were seen
    digests: defaultdict[str, list[_Where]] = field(default_factory=lambda: defaultdict(list))

    def add(self, p: Problem, split: str | None = None, pos: int | None = None) -> None:
        """Record a problem; an error about a record (``split`` and ``pos`` given) marks it bad."""
        self.problems.append(p)
        if p.severity == "error" and split is not None and pos is not None:
            self.bad_pos[split].add(pos)
            self.bad[split].setdefault(p.record_id or str(pos), p)

    def saw_image(self, where: _Where, digest: str, width: int, height: int, mode: str) -> None:
        """Note an image that could be read."""
        self.digests[digest].append(where)
        self.sizes[where[0]].append((width, height))
        self.modes[mode] += 1

    def record(self, where: _Where) -> Record:
        return self.splits[where[0]].records[where[1]]


def check_dataset(
    index: DatasetIndex | Mapping[str, DatasetIndex],
    num_classes: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
    *,
    skip_bad: bool = False,
    allow_empty_classes: bool = False,
    workers: int | None = None,
    duplicate_content: str = "error",
    label_conflict: str = "error",
) -> DataReport:
    """Check one index or a dict of splits; returns a :class:`DataReport`.

    Errors: missing files, empty / corrupt / truncated images, images over ``max_pixels``
    (decompression-bomb guard), records without an image, duplicate ids or files in a split,
    ids or files shared between splits, labels outside ``[0, num_classes)`` (default: the
    number of class names), the loader's label problems, a class with no image in a split
    (a warning instead with ``allow_empty_classes`` or ``skip_bad``). Info: unusual image modes
    (converted when decoding), groups (lesions) shared between train and test.

    Without ``skip_bad`` any error raises :class:`DataError` (its ``report`` attribute holds the
    report). With ``skip_bad`` the bad records are removed from ``report.splits`` and listed in
    ``report.removed``. ``check_images=False`` only checks that files exist and are non-empty.

    Also: byte-identical decoded pixels in two splits (leakage under another file name) with
    severity ``duplicate_content`` (``"error"``, ``"warning"`` or ``"off"``; needs
    ``check_images`` for files), and fewer than two classes with images in train (an error).

    The same decoded pixels under two different labels, in one split or in two, are a
    ``label_conflict`` (severity ``label_conflict``: ``"error"`` or ``"warning"``) naming every
    copy: ``skip_bad`` drops all of them, never picking a label (also needs ``check_images`` for
    files). Copies with one label in two splits stay a ``duplicate_content`` leakage.
    """
    if label_conflict not in ("error", "warning"):
        raise ValueError(f"label_conflict must be 'error' or 'warning', got {label_conflict!r}")
    splits = {"all": index} if isinstance(index, DatasetIndex) else dict(index)
    class_names = _shared_class_names(splits)
    f = _Findings(splits, class_names, int(num_classes) if num_classes is not None else len(class_names))

    _check_class_count(f, num_classes)
    to_open: list[_ToOpen] = []
    for s, ix in splits.items():
        pos_of_id: defaultdict[str, list[int]] = defaultdict(list)
        for pos, r in enumerate(ix.records):
            pos_of_id[r.id].append(pos)
        to_open += _check_records(f, s, ix, pos_of_id, check_images)
        _check_duplicate_ids(f, s, ix, pos_of_id)
        _check_duplicate_files(f, s, ix)
    if len(splits) > 1:
        _check_split_overlap(f)
    if to_open:
        _check_images(f, to_open, max_pixels, workers)
    conflicted = _check_label_conflicts(f, label_conflict)
    if duplicate_content != "off" and len(splits) > 1:
        _check_duplicate_content(f, "error" if duplicate_content == "error" else "warning", conflicted)
    _check_modes(f)

    removed: list[Problem] = []
    problems, out_splits = f.problems, splits
    if skip_bad:
        out_splits, removed, problems = _remove_bad(f)
    # checks on what is left
    problems += _check_class_coverage(out_splits, f, lenient=allow_empty_classes or skip_bad)
    problems += _check_group_overlap(out_splits)

    order = {n: i for i, n in enumerate(SPLIT_NAMES)}
    report = DataReport(
        class_names=class_names,
        splits=out_splits,
        problems=problems,
        removed=removed,
        image_sizes={
            s: np.asarray(v, dtype=np.int64).reshape(-1, 2)
            for s, v in sorted(f.sizes.items(), key=lambda kv: order.get(kv[0], 9))
        },
        modes=f.modes,
        checked_images=check_images,
    )
    if report.errors:
        raise DataError.from_problems(report.problems, report=report)
    return report


def _shared_class_names(splits: dict[str, DatasetIndex]) -> list[str]:
    """The class names every split shares (a ``ValueError`` when none is given or they differ)."""
    if not splits:
        raise ValueError("nothing to check: no splits given")
    class_names = list(next(iter(splits.values())).class_names)
    for s, ix in splits.items():
        if list(ix.class_names) != class_names:
            raise ValueError(f"split {s!r} has class names {ix.class_names}, expected {class_names}")
    return class_names


def _check_class_count(f: _Findings, num_classes: int | None) -> None:
    if num_classes is not None and num_classes != len(f.class_names):
        f.add(
            Problem(
                "class_count",
                f"num_classes={num_classes} but the data has {len(f.class_names)} class names {f.class_names}",
                hint="pass the matching num_classes or fix the class list",
            )
        )


# ---- per-record structural checks ------------------------------------------------------------
def _check_records(
    f: _Findings, s: str, ix: DatasetIndex, pos_of_id: Mapping[str, list[int]], check_images: bool
) -> list[_ToOpen]:
    """The loader's problems, the label range and the image of each record of split ``s``;
    returns the files to open (with ``check_images``)."""
    loader_probs = _loader_problems(f, s, ix, pos_of_id)
    to_open: list[_ToOpen] = []
    for pos, r in enumerate(ix.records):
        lp = loader_probs.get(r.id, [])
        for p in lp:
            f.add(p, s, pos)
        _check_label(f, s, pos, r, lp)
        if r.array_index is not None:
            _check_array_image(f, s, ix, pos, r, r.array_index)
            continue
        path = _check_file(f, s, pos, r, lp)
        if path is not None and check_images:
            to_open.append((s, pos, r, path))
    return to_open


def _loader_problems(
    f: _Findings, s: str, ix: DatasetIndex, pos_of_id: Mapping[str, list[int]]
) -> dict[str, list[Problem]]:
    """Adds the loader's problems that name no record of the split; returns the others by id."""
    loader_probs: defaultdict[str, list[Problem]] = defaultdict(list)
    for p in ix.problems:
        p = p if p.split is not None else replace(p, split=s)
        if p.record_id is not None and p.record_id in pos_of_id:
            # the loader's split ("all") may since have been divided: the record's split now
            loader_probs[p.record_id].append(replace(p, split=s))
        else:
            f.add(p)
    return loader_probs


def _check_label(f: _Findings, s: str, pos: int, r: Record, loader_probs: list[Problem]) -> None:
    C = f.num_classes
    if not (0 <= r.label < C) and not any(p.severity == "error" for p in loader_probs):
        f.add(
            Problem(
                "label_out_of_range",
                f"{r.where()}: label {r.label} is outside 0..{C - 1} ({C} classes: {', '.join(f.class_names[:C])})",
                split=s,
                record_id=r.id,
                path=str(r.path) if r.path else None,
                hint="fix the label, or the class list / num_classes",
            ),
            s,
            pos,
        )


def _check_array_image(f: _Findings, s: str, ix: DatasetIndex, pos: int, r: Record, row: int) -> None:
    """An in-memory image (row ``row`` of ``ix.images``) must exist; it is then read."""
    if ix.images is None or not (0 <= row < len(ix.images)):
        f.add(
            Problem(
                "missing_image",
                f"{r.where()}: in-memory image row {row} does not exist",
                split=s,
                record_id=r.id,
                hint="rebuild the index from the .npz file",
            ),
            s,
            pos,
        )
        return
    im = ix.images[row]
    mode = "L" if im.ndim == 2 or im.shape[-1] == 1 else "RGB"
    f.saw_image((s, pos), pixel_digest(im), int(im.shape[1]), int(im.shape[0]), mode)


def _check_file(f: _Findings, s: str, pos: int, r: Record, loader_probs: list[Problem]) -> Path | None:
    """The record's image file must be named, exist and be non-empty; returns it when it is."""
    if r.path is None:
        if not any(p.kind == "missing_file" for p in loader_probs):
            f.add(
                Problem(
                    "missing_file",
                    f"{r.where()}: record has no image path",
                    split=s,
                    record_id=r.id,
                    hint=_HINTS["missing_file"],
                ),
                s,
                pos,
            )
        return None
    path = r.path

    def file_problem(kind: str, what: str) -> None:
        f.add(Problem(kind, f"{r.where()}: {what}", split=s, record_id=r.id, path=str(path), hint=_HINTS[kind]), s, pos)

    try:
        st = os.stat(path)
    except OSError:
        file_problem("missing_file", "image file not found")
        return None
    if st.st_size == 0:
        file_problem("empty_file", "image file is empty (0 bytes)")
        return None
    return path


# ---- duplicates inside a split -----------------------------------------------------------------
def _check_duplicate_ids(f: _Findings, s: str, ix: DatasetIndex, pos_of_id: Mapping[str, list[int]]) -> None:
    for rid, ps in pos_of_id.items():
        if len(ps) > 1:
            where = "; ".join(ix.records[p].source or f"position {p}" for p in ps[:5])
            for p in ps[1:]:
                f.add(
                    Problem(
                        "duplicate_id",
                        f"id {rid!r} appears {len(ps)} times in split {s!r} ({where}); keeping the first",
                        split=s,
                        record_id=rid,
                        hint="remove the duplicate rows",
                    ),
                    s,
                    p,
                )


def _check_duplicate_files(f: _Findings, s: str, ix: DatasetIndex) -> None:
    seen_path: dict[str, int] = {}
    for pos, r in enumerate(ix.records):
        if r.path is None:
            continue
        key = os.path.normpath(os.path.abspath(r.path))
        if key in seen_path and ix.records[seen_path[key]].id != r.id:
            other = ix.records[seen_path[key]]
            f.add(
                Problem(
                    "duplicate_file",
                    f"{r.where()}: same file as {other.where()}",
                    split=s,
                    record_id=r.id,
                    path=str(r.path),
                    hint="remove one of the two rows",
                ),
                s,
                pos,
            )
        else:
            seen_path.setdefault(key, pos)


def _kept_split(split_set: set[str]) -> str:
    """Of the splits holding copies of one record, the one whose copy is kept."""
    return min(split_set, key=lambda s: _KEEP_PRIORITY.get(s, 9))


# ---- ids / files shared between splits (leakage) -----------------------------------------------
def _check_split_overlap(f: _Findings) -> None:
    owners: defaultdict[str, list[_Where]] = defaultdict(list)
    for s, ix in f.splits.items():
        seen = set()
        for pos, r in enumerate(ix.records):
            keys = {f"id:{r.id}"}
            if r.path is not None:
                keys.add("path:" + os.path.normpath(os.path.abspath(r.path)))
            for k in keys:
                if (k, s) not in seen:
                    seen.add((k, s))
                    owners[k].append((s, pos))
    reported: set[_Where] = set()
    for occ in owners.values():
        split_set = {s for s, _ in occ}
        if len(split_set) < 2:
            continue
        keep = _kept_split(split_set)
        for s, pos in occ:
            if s == keep or (s, pos) in reported:
                continue
            reported.add((s, pos))
            r = f.record((s, pos))
            f.add(
                Problem(
                    "split_overlap",
                    f"{r.where()} is also in split {keep!r} (test-set leakage)",
                    split=s,
                    record_id=r.id,
                    path=str(r.path) if r.path else None,
                    hint=f"remove it from {s!r} (skip_bad keeps the {keep!r} copy)",
                ),
                s,
                pos,
            )


# ---- open every image ----------------------------------------------------------------------------
def _check_images(f: _Findings, to_open: list[_ToOpen], max_pixels: int | None, workers: int | None) -> None:
    def work(item: _ToOpen) -> _Inspection:
        return _inspect_image(item[3], max_pixels)

    nw = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
    if nw <= 1 or len(to_open) < 16:
        results = [work(it) for it in to_open]
    else:
        with ThreadPoolExecutor(max_workers=nw) as ex:
            results = list(ex.map(work, to_open, chunksize=16))
    for (s, pos, r, path), (info, kind, reason, digest) in zip(to_open, results):
        if info is None or digest is None:
            f.add(
                Problem(
                    kind or "corrupt_image",
                    f"{r.where()}: {reason}",
                    split=s,
                    record_id=r.id,
                    path=str(path),
                    hint=_HINTS.get(kind or "", _HINTS["corrupt_image"]),
                ),
                s,
                pos,
            )
            continue
        w, h, m = info
        f.saw_image((s, pos), digest, w, h, m)
        f.mode_example.setdefault(m, str(path))


# ---- the same pixels under two labels (whatever the split) -----------------------------------------
def _check_label_conflicts(f: _Findings, severity: str) -> set[str]:
    """Adds a ``label_conflict`` for every copy of pixels seen under two labels; returns their digests."""
    C, class_names = f.num_classes, f.class_names
    conflicted: set[str] = set()

    def label_of(where: _Where) -> int:
        return f.record(where).label

    def label_text(label: int) -> str:
        return repr(class_names[label]) if 0 <= label < min(C, len(class_names)) else str(label)

    for digest, occ in f.digests.items():
        labelled = [w for w in occ if 0 <= label_of(w) < C]  # bad labels: reported above
        if len({label_of(w) for w in labelled}) < 2:
            continue
        conflicted.add(digest)
        for s, pos in labelled:
            r = f.record((s, pos))
            others = [w for w in labelled if w != (s, pos)]
            shown = "; ".join(
                f"{f.record(w).where()} (label {label_text(label_of(w))}, split {w[0]!r})" for w in others[:3]
            ) + (f"; and {len(others) - 3} more" if len(others) > 3 else "")
            f.add(
                Problem(
                    "label_conflict",
                    f"{r.where()} (label {label_text(r.label)}) has the same pixels as {shown}: "
                    "one image under different labels",
                    severity=severity,
                    split=s,
                    record_id=r.id,
                    path=str(r.path) if r.path else None,
                    hint="keep the copy with the right label and remove the others (skip_bad drops every copy)",
                ),
                s,
                pos,
            )
    return conflicted


# ---- the same pixels in two splits (leakage under another name) ------------------------------------
def _check_duplicate_content(f: _Findings, severity: str, conflicted: set[str]) -> None:
    for digest, occ in f.digests.items():
        split_set = {s for s, _ in occ}
        if len(split_set) < 2 or digest in conflicted:
            continue
        keep = _kept_split(split_set)
        first = f.record(next(w for w in occ if w[0] == keep))
        for s, pos in occ:
            r = f.record((s, pos))
            if s == keep or (r.path is not None and first.path is not None and os.path.samefile(r.path, first.path)):
                continue  # the same file: reported as split_overlap
            f.add(
                Problem(
                    "duplicate_content",
                    f"{r.where()} has the same pixels as {first.where()} in split {keep!r} (test-set leakage)",
                    severity=severity,
                    split=s,
                    record_id=r.id,
                    path=str(r.path) if r.path else None,
                    hint=f"remove one copy (skip_bad drops the {s!r} one)",
                ),
                s,
                pos,
            )


def _check_modes(f: _Findings) -> None:
    for m, k in f.modes.items():
        if m not in _COMMON_MODES:
            f.add(
                Problem(
                    "unusual_mode",
                    f"{k} image(s) in mode {m!r} (e.g. {f.mode_example.get(m, '?')});"
                    " they are converted when decoding (alpha/palette composited on black, "
                    "16-bit scaled to 8-bit, CMYK to RGB)",
                    severity="info",
                )
            )


# ---- remove bad records (skip_bad) -----------------------------------------------------------------
def _remove_bad(f: _Findings) -> tuple[dict[str, DatasetIndex], list[Problem], list[Problem]]:
    """Drops the records an error names: returns the cleaned splits, one warning per removed
    record, and the problems with the errors about removed records turned into warnings."""
    removed: list[Problem] = []
    out_splits: dict[str, DatasetIndex] = {}
    for s, ix in f.splits.items():
        drop = f.bad_pos.get(s, set())
        kept = [i for i in range(len(ix)) if i not in drop]
        out_splits[s] = ix.subset(kept) if drop else ix
        for pos in sorted(drop):
            r = ix.records[pos]
            cause = f.bad.get(s, {}).get(r.id)
            msg = cause.message if cause else r.where()
            removed.append(
                Problem(
                    cause.kind if cause else "removed",
                    f"removed: {msg}",
                    severity="warning",
                    split=s,
                    record_id=r.id,
                    path=str(r.path) if r.path else None,
                )
            )
    dropped = {(p.split, p.record_id) for p in removed}
    problems = [
        replace(p, severity="warning", message=p.message + " [removed]")
        if p.severity == "error" and (p.split, p.record_id) in dropped
        else p
        for p in f.problems
    ]
    return out_splits, removed, problems


# ---- checks on the splits as they are used ---------------------------------------------------------
def _check_class_coverage(splits: dict[str, DatasetIndex], f: _Findings, *, lenient: bool) -> list[Problem]:
    """Classes without images in a split (warnings when ``lenient``), fewer than two classes in train."""
    class_names = f.class_names
    n = min(f.num_classes, len(class_names))
    problems: list[Problem] = []
    for s, ix in splits.items():
        counts = ix.class_counts()
        for c in range(n):
            if counts[c] == 0:
                problems.append(
                    Problem(
                        "empty_class",
                        f"split {s!r} has no images of class {c} {class_names[c]!r}",
                        severity="warning" if lenient else "error",
                        split=s,
                        hint="check the labels / split file, or pass allow_empty_classes=True if this is intended",
                    )
                )
    if "train" in splits:
        counts = splits["train"].class_counts()
        present = [class_names[c] for c in range(n) if counts[c] > 0]
        if len(present) < 2:
            problems.append(
                Problem(
                    "single_class",
                    f"split 'train' has images of {len(present)} class(es) "
                    f"{present} (classes: {class_names}); a classifier needs images of at least 2 classes",
                    split="train",
                    hint="add images of the other classes, or fix the labels / class folders",
                )
            )
    return problems


def _check_group_overlap(splits: dict[str, DatasetIndex]) -> list[Problem]:
    """Groups (lesions) of train that also appear in val or test: optimistic scores (info)."""
    if "train" not in splits or not splits["train"].has_groups:
        return []
    train_groups = {r.group for r in splits["train"].records if r.group is not None}
    problems: list[Problem] = []
    for s in ("val", "test"):
        if s in splits:
            shared = [r for r in splits[s].records if r.group in train_groups]
            if shared:
                problems.append(
                    Problem(
                        "group_overlap",
                        f"{len(shared)} of {len(splits[s])} {s} images "
                        f"share a group (lesion) with train, e.g. {shared[0].id} "
                        f"(group {shared[0].group}); scores on {s} are optimistic",
                        severity="info",
                        split=s,
                        hint="use a grouped split (split='lesion') for an honest estimate",
                    )
                )
    return problems
