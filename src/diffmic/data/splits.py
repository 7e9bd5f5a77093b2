"""Deterministic stratified (and optionally grouped) splits.

Every function takes an explicit ``seed`` and draws from its own ``numpy.random.Generator``;
the global NumPy / Python / torch RNGs are never used or changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from .records import DataError, DatasetIndex, Problem, Record

__all__ = [
    "stratified_split",
    "carve_validation",
    "stratified_subset",
    "allocate",
    "stratified_kfold",
    "kfold_split",
    "pool_splits",
]


def _fractions(fractions: Sequence[float] | None, test_fraction: float | None) -> np.ndarray:
    if fractions is not None and test_fraction is not None:
        raise ValueError("give fractions or test_fraction, not both")
    if test_fraction is not None:
        if not 0.0 <= test_fraction <= 1.0:
            raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
        fractions = (1.0 - test_fraction, test_fraction)
    elif fractions is None:
        raise ValueError("give either fractions=(...) or test_fraction=...")
    f = np.asarray(fractions, dtype=np.float64)
    if f.ndim != 1 or len(f) < 1 or np.any(f < 0) or not np.isfinite(f).all():
        raise ValueError(f"fractions must be non-negative numbers, got {fractions}")
    if abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {list(fractions)} (sum {f.sum():.6f})")
    return f / f.sum()


def _largest_remainder(n: int, fractions: np.ndarray) -> np.ndarray:
    """Split the integer n into parts proportional to ``fractions`` (sum exactly n)."""
    raw = n * fractions
    base = np.floor(raw + 1e-9).astype(np.int64)
    left = n - int(base.sum())
    if left > 0:
        order = sorted(range(len(fractions)), key=lambda p: (-(raw[p] - base[p]), p))
        for p in order[:left]:
            base[p] += 1
    return base


def _stratum_counts(sizes: Sequence[int] | np.ndarray, f: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-class part sizes: each within one of ``n_c * f_p``, summing to ``n_c`` per class and,
    as closely as possible, to the largest-remainder split of the total per part (rounding
    leftovers are shared out across classes instead of always favouring the same part)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    raw = sizes[:, None] * f[None, :]
    base = np.floor(raw + 1e-9).astype(np.int64)
    left = sizes - base.sum(1)
    quota = _largest_remainder(int(sizes.sum()), f) - base.sum(0)
    rem = raw - base
    tiebreak = rng.random(rem.shape)
    order = sorted(((c, p) for c in range(len(sizes)) for p in range(len(f))), key=lambda cp: (-rem[cp], tiebreak[cp]))
    for c, p in order:
        if left[c] > 0 and quota[p] > 0 and rem[c, p] > 1e-9:
            base[c, p] += 1
            left[c] -= 1
            quota[p] -= 1
    for k in np.flatnonzero(left > 0):  # quotas exhausted: fall back to the class's own remainders
        for p in sorted(range(len(f)), key=lambda p: (-rem[k, p], p))[: left[k]]:
            base[k, p] += 1
    return base


def allocate(n: int, sizes: Sequence[int] | np.ndarray, min_one: bool = True) -> np.ndarray:
    """How many items to take from each class to draw ``n`` items in proportion to ``sizes``,
    never more than a class has; with ``min_one`` every non-empty class gets at least one item
    when ``n`` allows it (largest classes first otherwise). The result sums to ``min(n, sum)``."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(sizes.sum())
    n = int(min(max(n, 0), total))
    alloc = np.zeros_like(sizes)
    if n == 0:
        return alloc
    target = n * sizes / total
    alloc = np.minimum(sizes, np.floor(target + 1e-9).astype(np.int64))
    if min_one:
        nonempty = np.flatnonzero(sizes > 0)
        # largest classes first, stable
        nonempty = nonempty[np.argsort(-sizes[nonempty], kind="stable")]
        for c in nonempty[:n]:
            alloc[c] = max(alloc[c], 1)
    # too many (min_one): take back from the classes furthest above target
    while alloc.sum() > n:
        over = np.where(alloc > 1, alloc - target, -np.inf)
        alloc[int(np.argmax(over))] -= 1
    # too few: give to the classes furthest below target that still have room
    while alloc.sum() < n:
        gap = np.where(alloc < sizes, target - alloc, -np.inf)
        alloc[int(np.argmax(gap))] += 1
    return alloc


def stratified_split(
    labels: Sequence[int] | np.ndarray,
    fractions: Sequence[float] | float | None = None,
    seed: int = 0,
    groups: Sequence[str] | np.ndarray | None = None,
    *,
    test_fraction: float | None = None,
) -> tuple[np.ndarray, ...]:
    """Split item positions ``0..N-1`` into parts with the given ``fractions`` (e.g.
    ``(0.7, 0.3)`` or ``(0.8, 0.1, 0.1)``), stratified by label. A single number, or
    ``test_fraction=f``, means ``(1 - f, f)``: ``train, test = stratified_split(y, 0.3, seed)``.

    Returns one sorted ``int64`` index array per part. Deterministic for a given ``seed``.

    With ``groups`` (e.g. lesion ids) the split is grouped: all items of a group land in the same
    part. Each group is assigned to the stratum of its majority label (ties: smallest label); in
    each stratum the groups are shuffled, ordered largest first, and each is given to the part
    that is furthest below its target image count. Part sizes are then close to, not exactly,
    the requested fractions.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if fractions is not None and np.ndim(fractions) == 0:
        if test_fraction is not None:
            raise ValueError("give fractions or test_fraction, not both")
        fractions, test_fraction = None, float(fractions)  # type: ignore[arg-type]
    f = _fractions(fractions, test_fraction)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in f]
    if len(y) == 0:
        return tuple(np.zeros(0, dtype=np.int64) for _ in f)

    if groups is None:
        classes = np.unique(y)
        counts_all = _stratum_counts([int((y == c).sum()) for c in classes], f, rng)
        for c, counts in zip(classes, counts_all):
            idx = np.flatnonzero(y == c)
            idx = idx[rng.permutation(len(idx))]
            start = 0
            for p, k in enumerate(counts):
                parts[p].append(idx[start : start + k])
                start += k
    else:
        g = np.asarray([str(x) for x in groups])
        if len(g) != len(y):
            raise ValueError(f"groups has {len(g)} items but labels has {len(y)}")
        uniq, inv = np.unique(g, return_inverse=True)
        members: list[list[int]] = [[] for _ in uniq]
        for i, gi in enumerate(inv):
            members[gi].append(i)
        sizes = np.asarray([len(m) for m in members], dtype=np.int64)
        ymin = int(y.min())
        majority = np.asarray([int(np.argmax(np.bincount(y[m] - ymin))) + ymin for m in members], dtype=np.int64)
        for c in np.unique(majority):
            gidx = np.flatnonzero(majority == c)
            gidx = gidx[rng.permutation(len(gidx))]
            gidx = gidx[np.argsort(-sizes[gidx], kind="stable")]
            target = f * sizes[gidx].sum()
            current = np.zeros(len(f))
            for gi in gidx:
                p = int(np.argmax(target - current))
                parts[p].append(np.asarray(members[gi], dtype=np.int64))
                current[p] += sizes[gi]
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) if p else np.zeros(0, dtype=np.int64) for p in parts)


def carve_validation(
    index: DatasetIndex,
    fraction: float = 0.1,
    seed: int = 1234,
    grouped: bool = True,
) -> tuple[DatasetIndex, DatasetIndex]:
    """Split a training index into ``(train, val)``, stratified by label; grouped (no group in
    both) when ``grouped`` and the records have groups (HAM10000 lesions)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {fraction}")
    if fraction == 0.0 or len(index) == 0:
        return index, index.subset([])
    groups = index.groups if (grouped and index.has_groups) else None
    tr, va = stratified_split(index.labels, test_fraction=fraction, seed=seed, groups=groups)
    return index.subset(tr), index.subset(va)


def stratified_subset(index: DatasetIndex, n: int, seed: int = 1234) -> DatasetIndex:
    """A stratified random subset of at most ``n`` records (all of them if ``n >= len``), in the
    original order. Every class keeps at least one record when ``n`` is large enough."""
    if n < 0:
        raise ValueError(f"subset size must be >= 0, got {n}")
    if n >= len(index):
        return index
    y = index.labels
    classes, inv = np.unique(y, return_inverse=True)
    sizes = np.bincount(inv, minlength=len(classes))
    take = allocate(n, sizes)
    rng = np.random.default_rng(seed)
    chosen = []
    for ci in range(len(classes)):
        idx = np.flatnonzero(inv == ci)
        chosen.append(idx[rng.permutation(len(idx))[: take[ci]]])
    return index.subset(np.sort(np.concatenate(chosen)))


def stratified_kfold(
    labels: Sequence[int] | np.ndarray,
    k: int,
    seed: int = 0,
    groups: Sequence[str] | np.ndarray | None = None,
) -> list[np.ndarray]:
    """The test positions of each of ``k`` folds: sorted ``int64`` arrays that partition
    ``0..N-1`` (every item in exactly one fold), stratified by label.

    scikit-learn's ``StratifiedKFold`` (shuffled with ``seed``); with ``groups`` (lesion or
    patient ids) its ``StratifiedGroupKFold``, so that all items of a group are in one fold. A class
    with fewer than ``k`` items (groups) cannot be in every fold: scikit-learn warns about it.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"k-fold cross-validation needs k >= 2 folds, got {k!r}")
    units = len(y) if groups is None else len(set(map(str, groups)))
    what = "images" if groups is None else "groups (lesions / patients)"
    if units < k:
        raise ValueError(f"{k} folds need at least {k} {what}; the data have {units}")
    x = np.zeros((len(y), 1))
    try:
        if groups is None:
            parts = StratifiedKFold(n_splits=int(k), shuffle=True, random_state=int(seed)).split(x, y)
        else:
            g = np.asarray([str(v) for v in groups])
            if len(g) != len(y):
                raise ValueError(f"groups has {len(g)} items but labels has {len(y)}")
            parts = StratifiedGroupKFold(n_splits=int(k), shuffle=True, random_state=int(seed)).split(x, y, g)
        folds = [np.sort(np.asarray(test, dtype=np.int64)) for _, test in parts]
    except ValueError as exc:
        raise ValueError(f"cannot split {len(y)} {what if groups is None else 'images'} into {k} folds: {exc}") from exc
    return folds


def kfold_split(
    index: DatasetIndex, k: int, fold: int, seed: int = 0, grouped: bool = True
) -> tuple[DatasetIndex, DatasetIndex]:
    """``(rest, test)`` for fold ``fold`` (0-based) of a stratified ``k``-fold split of ``index``
    (:func:`stratified_kfold`); grouped when ``grouped`` and the records have groups, so that no
    lesion or patient has images in both parts."""
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k - 1}] for {k} folds, got {fold}")
    groups = index.groups if (grouped and index.has_groups) else None
    try:
        folds = stratified_kfold(index.labels, k, seed=seed, groups=groups)
    except ValueError as exc:
        raise DataError(f"data.folds={k}: {exc}. Use fewer folds or more data.") from exc
    test = folds[fold]
    rest = np.setdiff1d(np.arange(len(index), dtype=np.int64), test)
    return index.subset(rest), index.subset(test)


def pool_splits(splits: Mapping[str, DatasetIndex]) -> DatasetIndex:
    """One index holding the records of every split, in the order given (for k-fold
    cross-validation over all labelled data). In-memory images (MedMNIST) are concatenated and
    each record's ``array_index`` shifted to its row in the pooled array."""
    parts = list(splits.values())
    if not parts:
        raise DataError("no data to pool for k-fold cross-validation")
    names = list(parts[0].class_names)
    for name, ix in splits.items():
        if list(ix.class_names) != names:
            raise DataError(
                f"cannot pool the splits for k-fold cross-validation: split {name!r} has the classes "
                f"{list(ix.class_names)}, not {names}"
            )
    records: list[Record] = []
    problems: list[Problem] = []
    arrays: list[np.ndarray] = []
    offset = 0
    in_memory = any(ix.images is not None for ix in parts)
    for name, ix in splits.items():
        problems.extend(ix.problems)
        if in_memory:
            if ix.images is None:
                raise DataError(f"cannot pool split {name!r} (files) with in-memory images of other splits")
            if arrays and ix.images.shape[1:] != arrays[0].shape[1:]:
                raise DataError(
                    f"cannot pool the splits for k-fold cross-validation: split {name!r} has images of shape "
                    f"{ix.images.shape[1:]}, the others {arrays[0].shape[1:]}"
                )
            records.extend(
                dataclasses.replace(r, array_index=r.array_index + offset) if r.array_index is not None else r
                for r in ix.records
            )
            arrays.append(ix.images)
            offset += len(ix.images)
        else:
            records.extend(ix.records)
    images = np.concatenate(arrays) if in_memory else None
    return DatasetIndex(records, names, images=images, problems=problems)
