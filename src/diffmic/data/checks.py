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


def pixel_digest(img_or_array) -> str:
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


def _inspect_image(path, max_pixels):
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
    if isinstance(index, DatasetIndex):
        splits = {"all": index}
    else:
        splits = dict(index)
    if not splits:
        raise ValueError("nothing to check: no splits given")
    first = next(iter(splits.values()))
    class_names = list(first.class_names)
    for s, ix in splits.items():
        if list(ix.class_names) != class_names:
            raise ValueError(f"split {s!r} has class names {ix.class_names}, expected {class_names}")
    C = int(num_classes) if num_classes is not None else len(class_names)

    problems: list[Problem] = []
    bad: dict[str, dict[str, Problem]] = defaultdict(dict)  # split -> record id -> first error
    bad_pos: dict[str, set[int]] = defaultdict(set)  # split -> positions to drop
    sizes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    modes: Counter = Counter()
    mode_example: dict[str, str] = {}
    digests: dict[str, list[tuple[str, int]]] = defaultdict(list)  # pixel digest -> (split, pos)

    def add(p: Problem, split: str | None = None, pos: int | None = None) -> None:
        problems.append(p)
        if p.severity == "error" and split is not None and pos is not None:
            bad_pos[split].add(pos)
            bad[split].setdefault(p.record_id or str(pos), p)

    if num_classes is not None and num_classes != len(class_names):
        add(
            Problem(
                "class_count",
                f"num_classes={num_classes} but the data has {len(class_names)} class names {class_names}",
                hint="pass the matching num_classes or fix the class list",
            )
        )

    # ---- per-record structural checks --------------------------------------------------------
    to_open: list[tuple[str, int, Record]] = []
    for s, ix in splits.items():
        pos_of_id: dict[str, list[int]] = defaultdict(list)
        for pos, r in enumerate(ix.records):
            pos_of_id[r.id].append(pos)
        loader_probs: dict[str, list[Problem]] = defaultdict(list)
        for p in ix.problems:
            p = p if p.split is not None else replace(p, split=s)
            if p.record_id is not None and p.record_id in pos_of_id:
                # the loader's split ("all") may since have been divided: the record's split now
                loader_probs[p.record_id].append(replace(p, split=s))
            else:
                add(p)
        for pos, r in enumerate(ix.records):
            lp = loader_probs.get(r.id, [])
            for p in lp:
                add(p, s, pos)
            if not (0 <= r.label < C) and not any(p.severity == "error" for p in lp):
                add(
                    Problem(
                        "label_out_of_range",
                        f"{r.where()}: label {r.label} is outside 0..{C - 1} "
                        f"({C} classes: {', '.join(class_names[:C])})",
                        split=s,
                        record_id=r.id,
                        path=str(r.path) if r.path else None,
                        hint="fix the label, or the class list / num_classes",
                    ),
                    s,
                    pos,
                )
            if r.array_index is not None:
                if ix.images is None or not (0 <= r.array_index < len(ix.images)):
                    add(
                        Problem(
                            "missing_image",
                            f"{r.where()}: in-memory image row {r.array_index} does not exist",
                            split=s,
                            record_id=r.id,
                            hint="rebuild the index from the .npz file",
                        ),
                        s,
                        pos,
                    )
                else:
                    im = ix.images[r.array_index]
                    digests[pixel_digest(im)].append((s, pos))
                    sizes[s].append((int(im.shape[1]), int(im.shape[0])))
                    m = "L" if im.ndim == 2 or im.shape[-1] == 1 else "RGB"
                    modes[m] += 1
                continue
            if r.path is None:
                if not any(p.kind == "missing_file" for p in lp):
                    add(
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
                continue
            try:
                st = os.stat(r.path)
            except OSError:
                add(
                    Problem(
                        "missing_file",
                        f"{r.where()}: image file not found",
                        split=s,
                        record_id=r.id,
                        path=str(r.path),
                        hint=_HINTS["missing_file"],
                    ),
                    s,
                    pos,
                )
                continue
            if st.st_size == 0:
                add(
                    Problem(
                        "empty_file",
                        f"{r.where()}: image file is empty (0 bytes)",
                        split=s,
                        record_id=r.id,
                        path=str(r.path),
                        hint=_HINTS["empty_file"],
                    ),
                    s,
                    pos,
                )
                continue
            if check_images:
                to_open.append((s, pos, r))
        # duplicates inside the split
        for rid, ps in pos_of_id.items():
            if len(ps) > 1:
                where = "; ".join(ix.records[p].source or f"position {p}" for p in ps[:5])
                for p in ps[1:]:
                    add(
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
        seen_path: dict[str, int] = {}
        for pos, r in enumerate(ix.records):
            if r.path is None:
                continue
            key = os.path.normpath(os.path.abspath(r.path))
            if key in seen_path and ix.records[seen_path[key]].id != r.id:
                other = ix.records[seen_path[key]]
                add(
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

    # ---- ids / files shared between splits (leakage) -----------------------------------------
    if len(splits) > 1:
        owners: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for s, ix in splits.items():
            seen = set()
            for pos, r in enumerate(ix.records):
                keys = {f"id:{r.id}"}
                if r.path is not None:
                    keys.add("path:" + os.path.normpath(os.path.abspath(r.path)))
                for k in keys:
                    if (k, s) not in seen:
                        seen.add((k, s))
                        owners[k].append((s, pos))
        reported: set[tuple[str, int]] = set()
        for occ in owners.values():
            split_set = {s for s, _ in occ}
            if len(split_set) < 2:
                continue
            keep = min(split_set, key=lambda s: _KEEP_PRIORITY.get(s, 9))
            for s, pos in occ:
                if s == keep or (s, pos) in reported:
                    continue
                reported.add((s, pos))
                r = splits[s].records[pos]
                add(
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

    # ---- open every image --------------------------------------------------------------------
    if to_open:

        def work(item):
            return _inspect_image(item[2].path, max_pixels)

        nw = workers if workers is not None else max(1, min(4, os.cpu_count() or 1))
        if nw <= 1 or len(to_open) < 16:
            results = [work(it) for it in to_open]
        else:
            with ThreadPoolExecutor(max_workers=nw) as ex:
                results = list(ex.map(work, to_open, chunksize=16))
        for (s, pos, r), (info, kind, reason, digest) in zip(to_open, results):
            if info is None:
                add(
                    Problem(
                        kind or "corrupt_image",
                        f"{r.where()}: {reason}",
                        split=s,
                        record_id=r.id,
                        path=str(r.path),
                        hint=_HINTS.get(kind or "", _HINTS["corrupt_image"]),
                    ),
                    s,
                    pos,
                )
                continue
            w, h, m = info
            digests[digest].append((s, pos))
            sizes[s].append((w, h))
            modes[m] += 1
            mode_example.setdefault(m, str(r.path))
    # ---- the same pixels under two labels (whatever the split) -------------------------------
    conflicted: set[str] = set()

    def label_of(s: str, pos: int) -> int:
        return splits[s].records[pos].label

    def label_text(label: int) -> str:
        return repr(class_names[label]) if 0 <= label < min(C, len(class_names)) else str(label)

    for digest, occ in digests.items():
        labelled = [(s, pos) for s, pos in occ if 0 <= label_of(s, pos) < C]  # bad labels: reported above
        if len({label_of(s, pos) for s, pos in labelled}) < 2:
            continue
        conflicted.add(digest)
        for s, pos in labelled:
            r = splits[s].records[pos]
            others = [(s2, p2) for s2, p2 in labelled if (s2, p2) != (s, pos)]
            shown = "; ".join(
                f"{splits[s2].records[p2].where()} (label {label_text(label_of(s2, p2))}, split {s2!r})"
                for s2, p2 in others[:3]
            ) + (f"; and {len(others) - 3} more" if len(others) > 3 else "")
            add(
                Problem(
                    "label_conflict",
                    f"{r.where()} (label {label_text(r.label)}) has the same pixels as {shown}: "
                    "one image under different labels",
                    severity=label_conflict,
                    split=s,
                    record_id=r.id,
                    path=str(r.path) if r.path else None,
                    hint="keep the copy with the right label and remove the others (skip_bad drops every copy)",
                ),
                s,
                pos,
            )
    # ---- the same pixels in two splits (leakage under another name) ---------------------------
    if duplicate_content != "off" and len(splits) > 1:
        sev = "error" if duplicate_content == "error" else "warning"
        for digest, occ in digests.items():
            split_set = {s for s, _ in occ}
            if len(split_set) < 2 or digest in conflicted:
                continue
            keep = min(split_set, key=lambda s: _KEEP_PRIORITY.get(s, 9))
            first = splits[keep].records[next(pos for s, pos in occ if s == keep)]
            for s, pos in occ:
                r = splits[s].records[pos]
                if s == keep or (
                    r.path is not None and first.path is not None and os.path.samefile(r.path, first.path)
                ):
                    continue  # the same file: reported as split_overlap
                add(
                    Problem(
                        "duplicate_content",
                        f"{r.where()} has the same pixels as {first.where()} in split {keep!r} (test-set leakage)",
                        severity=sev,
                        split=s,
                        record_id=r.id,
                        path=str(r.path) if r.path else None,
                        hint=f"remove one copy (skip_bad drops the {s!r} one)",
                    ),
                    s,
                    pos,
                )
    for m, k in modes.items():
        if m not in _COMMON_MODES:
            add(
                Problem(
                    "unusual_mode",
                    f"{k} image(s) in mode {m!r} (e.g. {mode_example.get(m, '?')});"
                    " they are converted when decoding (alpha/palette composited on black, "
                    "16-bit scaled to 8-bit, CMYK to RGB)",
                    severity="info",
                )
            )

    # ---- remove bad records (skip_bad) -------------------------------------------------------
    removed: list[Problem] = []
    out_splits = splits
    if skip_bad:
        out_splits = {}
        for s, ix in splits.items():
            drop = bad_pos.get(s, set())
            keep = [i for i in range(len(ix)) if i not in drop]
            out_splits[s] = ix.subset(keep) if drop else ix
            for pos in sorted(drop):
                r = ix.records[pos]
                cause = bad.get(s, {}).get(r.id)
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
            for p in problems
        ]

    # ---- empty classes / group overlap (on what is left) -------------------------------------
    for s, ix in out_splits.items():
        counts = ix.class_counts()
        for c in range(min(C, len(class_names))):
            if counts[c] == 0:
                sev = "warning" if (allow_empty_classes or skip_bad) else "error"
                problems.append(
                    Problem(
                        "empty_class",
                        f"split {s!r} has no images of class {c} {class_names[c]!r}",
                        severity=sev,
                        split=s,
                        hint="check the labels / split file, or pass allow_empty_classes=True if this is intended",
                    )
                )
    train_split = "train" if "train" in out_splits else None
    if train_split is not None:
        counts = out_splits[train_split].class_counts()
        present = [class_names[c] for c in range(min(C, len(class_names))) if counts[c] > 0]
        if len(present) < 2:
            problems.append(
                Problem(
                    "single_class",
                    f"split {train_split!r} has images of {len(present)} class(es) "
                    f"{present} (classes: {class_names}); a classifier needs images of at least 2 classes",
                    split=train_split,
                    hint="add images of the other classes, or fix the labels / class folders",
                )
            )
    if "train" in out_splits and out_splits["train"].has_groups:
        train_groups = {r.group for r in out_splits["train"].records if r.group is not None}
        for s in ("val", "test"):
            if s in out_splits:
                shared = [r for r in out_splits[s].records if r.group in train_groups]
                if shared:
                    problems.append(
                        Problem(
                            "group_overlap",
                            f"{len(shared)} of {len(out_splits[s])} {s} images "
                            f"share a group (lesion) with train, e.g. {shared[0].id} "
                            f"(group {shared[0].group}); scores on {s} are optimistic",
                            severity="info",
                            split=s,
                            hint="use a grouped split (split='lesion') for an honest estimate",
                        )
                    )

    order = {n: i for i, n in enumerate(SPLIT_NAMES)}
    report = DataReport(
        class_names=class_names,
        splits=out_splits,
        problems=problems,
        removed=removed,
        image_sizes={
            s: np.asarray(v, dtype=np.int64).reshape(-1, 2)
            for s, v in sorted(sizes.items(), key=lambda kv: order.get(kv[0], 9))
        },
        modes=modes,
        checked_images=check_images,
    )
    if report.errors:
        raise DataError.from_problems(report.problems, report=report)
    return report
