"""Plain data records: one labelled image (`Record`), a list of them (`DatasetIndex`), a data
problem (`Problem`) and the error raised for bad data (`DataError`).

Nothing here opens an image; loaders in :mod:`diffmic.data.sources` build these objects and
:mod:`diffmic.data.checks` validates them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import overload

import numpy as np

__all__ = [
    "Record",
    "DatasetIndex",
    "Problem",
    "DataError",
    "filter_existing",
    "SPLIT_NAMES",
]

#: canonical split names, in the order they are reported
SPLIT_NAMES = ("train", "val", "test", "all")


@dataclass(frozen=True)
class Record:
    """One labelled image.

    id: unique name of the image inside its dataset (e.g. ``ISIC_0024306``).
    label: class index in ``[0, num_classes)``; ``-1`` = unknown / unlabelled (loaders also use
        ``-1`` for a row whose label could not be parsed, with a matching `Problem` in the index).
    path: image file, or ``None`` for in-memory images (MedMNIST), which use ``array_index``.
    group: records sharing a group must stay in the same split (HAM10000: ``lesion_id``).
    array_index: row of ``DatasetIndex.images`` for in-memory datasets.
    source: where the record came from, for messages (``"diffmic_train.csv:line 17"``).
    """

    id: str
    label: int
    path: Path | None = None
    group: str | None = None
    array_index: int | None = None
    source: str | None = None

    def where(self) -> str:
        """Human-readable location of the record for error messages."""
        parts = [f"id {self.id!r}"]
        if self.source:
            parts.append(self.source)
        if self.path is not None:
            parts.append(str(self.path))
        elif self.array_index is not None:
            parts.append(f"array row {self.array_index}")
        return ", ".join(parts)


_SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Problem:
    """A data problem found by a loader or by :func:`diffmic.data.checks.check_dataset`.

    severity: ``"error"`` (training must not start), ``"warning"`` or ``"info"``.
    kind: short machine name, e.g. ``missing_file``, ``corrupt_image``, ``label_out_of_range``.
    message: what is wrong, naming the file / CSV row.
    hint: what to do about it.
    """

    kind: str
    message: str
    severity: str = "error"
    split: str | None = None
    record_id: str | None = None
    path: str | None = None
    hint: str = ""

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITIES:
            raise ValueError(f"severity must be one of {_SEVERITIES}, got {self.severity!r}")

    def format(self) -> str:
        split = f"[{self.split}] " if self.split else ""
        text = f"{self.severity.upper()} {self.kind}: {split}{self.message}"
        if self.hint:
            text += f"\n      -> {self.hint}"
        return text

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.format()


class DataError(ValueError):
    """Raised for data that cannot be used as it is. ``problems`` lists every problem found
    (not only the first); ``report`` is the :class:`~diffmic.data.checks.DataReport` when the
    error comes from a dataset check."""

    def __init__(self, message: str, problems: Sequence[Problem] = (), report=None) -> None:
        self.problems = list(problems)
        self.report = report
        super().__init__(message)

    @classmethod
    def from_problems(
        cls, problems: Sequence[Problem], *, header: str | None = None, report=None, limit: int = 50
    ) -> DataError:
        problems = list(problems)
        errors = [p for p in problems if p.severity == "error"]
        shown = errors if errors else problems
        from collections import Counter

        kinds = Counter(p.kind for p in shown)
        head = (header or f"{len(errors)} data problem(s) found").rstrip(": ")
        lines = [head + " (" + ", ".join(f"{k}: {n}" for k, n in kinds.most_common()) + "):"]
        for p in shown[:limit]:
            lines.append("  - " + p.format().replace("\n", "\n  "))
        if len(shown) > limit:
            lines.append(f"  ... and {len(shown) - limit} more (see DataReport.problems)")
        lines.append(
            "Fix the data (or the split files), or pass skip_bad=True to drop the bad items and continue with the rest."
        )
        return cls("\n".join(lines), problems, report)


@dataclass
class DatasetIndex:
    """The records of one split, the class names, and (MedMNIST only) the in-memory images.

    ``images`` is a uint8 array ``[N, H, W]`` or ``[N, H, W, C]`` indexed by
    ``Record.array_index``. ``problems`` holds problems the loader already found (e.g. an
    unknown class name in a CSV row); :func:`~diffmic.data.checks.check_dataset` reports them.
    """

    records: list[Record]
    class_names: list[str]
    images: np.ndarray | None = None
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self):
        return iter(self.records)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([r.label for r in self.records], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def groups(self) -> list[str]:
        """Group of every record; a record without a group is its own group."""
        return [r.group if r.group is not None else f"__id__{r.id}" for r in self.records]

    @property
    def has_groups(self) -> bool:
        return any(r.group is not None for r in self.records)

    def class_counts(self) -> np.ndarray:
        labels = self.labels
        ok = (labels >= 0) & (labels < self.num_classes)
        return np.bincount(labels[ok], minlength=self.num_classes)

    def subset(self, indices: Iterable[int]) -> DatasetIndex:
        """The records at ``indices`` (same order); shares ``images`` and keeps the problems
        that concern the kept records."""
        recs = [self.records[int(i)] for i in indices]
        return self._with_records(recs)

    def filter(self, keep: Callable[[Record], bool]) -> DatasetIndex:
        return self._with_records([r for r in self.records if keep(r)])

    def _with_records(self, recs: list[Record]) -> DatasetIndex:
        ids = {r.id for r in recs}
        probs = [p for p in self.problems if p.record_id is None or p.record_id in ids]
        return replace(self, records=recs, problems=probs)


@overload
def filter_existing(indexes: DatasetIndex) -> tuple[DatasetIndex, list[Record]]: ...
@overload
def filter_existing(indexes: Mapping[str, DatasetIndex]) -> tuple[dict[str, DatasetIndex], list[Record]]: ...
def filter_existing(
    indexes: DatasetIndex | Mapping[str, DatasetIndex],
) -> tuple[DatasetIndex | dict[str, DatasetIndex], list[Record]]:
    """Drop records whose image file does not exist (records without a path are kept).

    Returns ``(filtered, removed)`` with the same shape as the input (one index or a dict of
    splits). Use it deliberately, e.g. for a partial copy of a dataset such as the two-image
    APTOS folder; by default missing files are errors reported by ``check_dataset``.
    """
    removed: list[Record] = []

    def keep(r: Record) -> bool:
        if r.path is None or r.path.is_file():
            return True
        removed.append(r)
        return False

    if isinstance(indexes, DatasetIndex):
        return indexes.filter(keep), removed
    return {k: v.filter(keep) for k, v in indexes.items()}, removed
