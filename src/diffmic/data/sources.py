"""Dataset loaders. They read labels, split files and folder layouts and build
:class:`~diffmic.data.records.DatasetIndex` objects; they never decode images and do not
check that image files exist (that is :func:`diffmic.data.checks.check_dataset`'s job, so that
every missing file is reported, not silently dropped).

Every loader returns ``dict[str, DatasetIndex]`` keyed by split name: ``"train"``, ``"val"``,
``"test"`` when the source defines splits, or the single key ``"all"`` when it does not (a CSV
without a split column, a class-folder tree without train/val/test folders).

Structural problems that make a source unusable (missing CSV columns, an unreadable split file,
an unknown split name) raise :class:`DataError` at once, listing every offending row. Row-level
label problems (unknown class name, non-integer label) are recorded as problems in the index
with label ``-1`` and reported by the checker, so ``skip_bad=True`` can drop just those rows.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .dicom import DICOM_EXTENSIONS
from .records import DataError, DatasetIndex, Problem, Record
from .splits import stratified_split

__all__ = [
    "HAM10000_CLASSES",
    "HAM10000_DX",
    "APTOS_CLASSES",
    "MEDMNIST_CLASSES",
    "IMAGE_EXTENSIONS",
    "load_ham10000",
    "load_aptos2019",
    "load_csv_manifest",
    "load_image_folder",
    "load_medmnist",
    "split_all",
]

HAM10000_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
#: HAM10000 metadata ``dx`` code -> class index (ISIC 2018 ground-truth column order)
HAM10000_DX = {name.lower(): i for i, name in enumerate(HAM10000_CLASSES)}
APTOS_CLASSES = ["No_DR", "Mild", "Moderate", "Severe", "Proliferative_DR"]
MEDMNIST_CLASSES = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
}
DATASETS = ("ham10000", "aptos2019", "csv", "folder", "medmnist")  # data.dataset (DiffMICDataModule)
SPLITS = ("authors", "lesion", "random")  # data.split
#: the suffixes of image files in class folders and in ``diffmic predict`` folders (DICOM needs the
#: ``dicom`` extra; see :mod:`diffmic.data.dicom`)
IMAGE_EXTENSIONS = (
    ".png",
    ".jpg",
    ".jpeg",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".webp",
    ".ppm",
    ".pgm",
    *DICOM_EXTENSIONS,
)
_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


# ----------------------------------------------------------------------------------------------
# helpers


def _read_csv(path: Path, required: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV as ``(line_number, row)``; header = line 1. Raises DataError when the file is
    missing/unreadable or lacks a required column."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"CSV file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read CSV {path}: {e}") from e
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = [f.strip() for f in (reader.fieldnames or [])]
        reader.fieldnames = fields
        missing = [c for c in required if c not in fields]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; found {fields}. "
                "Pass the right column names or fix the header line."
            )
        rows = [
            (reader.line_num, {k: (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None})
            for row in reader
        ]
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e
    return rows


def _parse_int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        f = float(text)
    except ValueError:
        return None
    if not np.isfinite(f) or f != int(f):
        return None
    return int(f)


def split_all(
    index: DatasetIndex, test_fraction: float = 0.3, seed: int = 1234, grouped: bool = False
) -> dict[str, DatasetIndex]:
    """Seeded stratified ``train``/``test`` split of one index (grouped if asked and the
    records have groups)."""
    groups = index.groups if (grouped and index.has_groups) else None
    tr, te = stratified_split(index.labels, test_fraction=test_fraction, seed=seed, groups=groups)
    return {"train": index.subset(tr), "test": index.subset(te)}


def _check_split_name(split: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    if split not in allowed:
        raise ValueError(f"split must be one of {allowed}, got {split!r}")


# ----------------------------------------------------------------------------------------------
# HAM10000


def load_ham10000(
    root: str | os.PathLike, split: str = "authors", seed: int = 1234, test_fraction: float = 0.3
) -> dict[str, DatasetIndex]:
    """HAM10000 (ISIC 2018 Task 3). Returns ``{"train": ..., "test": ...}``.

    Layout: ``root/images/ISIC_*.jpg`` (or ``root/ISIC2018_Task3_Training_Input``),
    ``root/HAM10000_metadata.csv`` (``lesion_id,image_id,dx,...``), and for ``split="authors"``
    ``root/splits/diffmic_{train,test}.csv`` (``image_id,label,class``).
    Classes: 0 MEL, 1 NV, 2 BCC, 3 AKIEC, 4 BKL, 5 DF, 6 VASC. ``Record.group`` is the lesion id.

    split: ``"authors"`` = the released DiffMIC split (per image; lesions overlap train/test);
    ``"lesion"`` = seeded lesion-grouped stratified split (no lesion in both parts);
    ``"random"`` = seeded stratified per-image split. ``test_fraction`` applies to the last two.
    """
    _check_split_name(split, ("authors", "lesion", "random"))
    root = Path(root)
    img_dir = root / "images"
    if not img_dir.is_dir() and (root / "ISIC2018_Task3_Training_Input").is_dir():
        img_dir = root / "ISIC2018_Task3_Training_Input"
    meta_path = root / "HAM10000_metadata.csv"
    meta: dict[str, dict[str, str]] = {}
    meta_lines: dict[str, int] = {}
    if meta_path.is_file():
        for line, row in _read_csv(meta_path, ["lesion_id", "image_id", "dx"]):
            meta[row["image_id"]] = row
            meta_lines[row["image_id"]] = line
    elif split != "authors":
        raise DataError(
            f"{meta_path} not found: split={split!r} needs the HAM10000 metadata (lesion ids and diagnoses)"
        )

    def make(image_id: str, label: int, source: str) -> Record:
        m = meta.get(image_id)
        group = m["lesion_id"] if m and m.get("lesion_id") else None
        return Record(id=image_id, label=label, path=img_dir / f"{image_id}.jpg", group=group, source=source)

    if split == "authors":
        out: dict[str, DatasetIndex] = {}
        for part in ("train", "test"):
            f = root / "splits" / f"diffmic_{part}.csv"
            if not f.is_file():
                raise DataError(
                    f"split file not found: {f}. Use split='lesion' or 'random', or restore the DiffMIC split files."
                )
            recs, probs = [], []
            for line, row in _read_csv(f, ["image_id", "label"]):
                src = f"{f.name}:line {line}"
                lab = _parse_int(row["label"])
                if lab is None:
                    probs.append(
                        Problem(
                            "bad_label",
                            f"{src}: label {row['label']!r} of {row['image_id']!r} is not an integer",
                            split=part,
                            record_id=row["image_id"],
                            hint="use class indices 0-6 (MEL..VASC)",
                        )
                    )
                    lab = -1
                else:
                    m = meta.get(row["image_id"])
                    if m is not None and HAM10000_DX.get(m["dx"].lower()) not in (None, lab):
                        probs.append(
                            Problem(
                                "label_mismatch",
                                f"{src}: label {lab} ({HAM10000_CLASSES[lab] if 0 <= lab < 7 else '?'})"
                                f" of {row['image_id']!r} disagrees with metadata dx={m['dx']!r}",
                                severity="warning",
                                split=part,
                                record_id=row["image_id"],
                                hint="check the split file against HAM10000_metadata.csv",
                            )
                        )
                recs.append(make(row["image_id"], lab, src))
            out[part] = DatasetIndex(recs, list(HAM10000_CLASSES), problems=probs)
        return out

    recs, probs = [], []
    for image_id, m in meta.items():
        src = f"{meta_path.name}:line {meta_lines[image_id]}"
        lab = HAM10000_DX.get(m["dx"].lower(), -1)
        if lab < 0:
            probs.append(
                Problem(
                    "unknown_class",
                    f"{src}: unknown diagnosis dx={m['dx']!r} for {image_id!r}; expected one of {sorted(HAM10000_DX)}",
                    record_id=image_id,
                    hint="fix the metadata row or drop it",
                )
            )
        recs.append(make(image_id, lab, src))
    full = DatasetIndex(recs, list(HAM10000_CLASSES), problems=probs)
    return split_all(full, test_fraction, seed, grouped=(split == "lesion"))


# ----------------------------------------------------------------------------------------------
# APTOS 2019


def load_aptos2019(
    root: str | os.PathLike, split: str = "authors", seed: int = 1234, test_fraction: float = 0.3
) -> dict[str, DatasetIndex]:
    """APTOS 2019 blindness detection (Kaggle layout). Returns ``{"train": ..., "test": ...}``.

    Layout: ``root/train.csv`` (``id_code,diagnosis``), ``root/train_images/<id_code>.png``
    (or ``root/train/``), and for ``split="authors"`` ``root/splits/diffmic_{train,test}.csv``
    (``id_code,label,class``). Grades: 0 No_DR, 1 Mild, 2 Moderate, 3 Severe,
    4 Proliferative_DR. ``split="random"``: seeded stratified split of ``train.csv``.

    Image files are not required to exist here: on a partial copy, ``check_dataset`` lists
    every missing file; use :func:`diffmic.data.records.filter_existing` to work on the images
    that are present.
    """
    _check_split_name(split, ("authors", "random"))
    root = Path(root)
    img_dir = root / "train_images"
    if not img_dir.is_dir() and (root / "train").is_dir():
        img_dir = root / "train"
    labels_path = root / "train.csv"
    diag: dict[str, int] = {}
    if labels_path.is_file():
        for _, row in _read_csv(labels_path, ["id_code", "diagnosis"]):
            lab = _parse_int(row["diagnosis"])
            if lab is not None:
                diag[row["id_code"]] = lab

    def make(id_code: str, label: int, source: str) -> Record:
        return Record(id=id_code, label=label, path=img_dir / f"{id_code}.png", source=source)

    if split == "authors":
        out: dict[str, DatasetIndex] = {}
        for part in ("train", "test"):
            f = root / "splits" / f"diffmic_{part}.csv"
            if not f.is_file():
                raise DataError(f"split file not found: {f}. Use split='random', or restore the DiffMIC split files.")
            recs, probs = [], []
            for line, row in _read_csv(f, ["id_code", "label"]):
                src = f"{f.name}:line {line}"
                lab = _parse_int(row["label"])
                if lab is None:
                    probs.append(
                        Problem(
                            "bad_label",
                            f"{src}: label {row['label']!r} of {row['id_code']!r} is not an integer",
                            split=part,
                            record_id=row["id_code"],
                            hint="use grades 0-4",
                        )
                    )
                    lab = -1
                elif row["id_code"] in diag and diag[row["id_code"]] != lab:
                    probs.append(
                        Problem(
                            "label_mismatch",
                            f"{src}: label {lab} of {row['id_code']!r} disagrees "
                            f"with train.csv diagnosis {diag[row['id_code']]}",
                            severity="warning",
                            split=part,
                            record_id=row["id_code"],
                            hint="check the split file against train.csv",
                        )
                    )
                recs.append(make(row["id_code"], lab, src))
            out[part] = DatasetIndex(recs, list(APTOS_CLASSES), problems=probs)
        return out

    if not labels_path.is_file():
        raise DataError(f"{labels_path} not found: split='random' needs train.csv")
    recs, probs = [], []
    for line, row in _read_csv(labels_path, ["id_code", "diagnosis"]):
        src = f"{labels_path.name}:line {line}"
        lab = _parse_int(row["diagnosis"])
        if lab is None:
            probs.append(
                Problem(
                    "bad_label",
                    f"{src}: diagnosis {row['diagnosis']!r} of {row['id_code']!r} is not an integer",
                    record_id=row["id_code"],
                    hint="use grades 0-4",
                )
            )
            lab = -1
        recs.append(make(row["id_code"], lab, src))
    full = DatasetIndex(recs, list(APTOS_CLASSES), problems=probs)
    return split_all(full, test_fraction, seed)


# ----------------------------------------------------------------------------------------------
# generic CSV manifest


def _label_kind(v: str | None) -> str:
    """``empty``, ``int``, ``fraction`` (1.5), ``not_finite`` (NaN, inf) or ``name``."""
    if v is None or str(v).strip() == "":
        return "empty"
    try:
        f = float(v)
    except ValueError:
        return "name"
    if not np.isfinite(f):
        return "not_finite"
    return "int" if f == int(f) else "fraction"


def _did_you_mean(v: str, names: Sequence[str]) -> str:
    import difflib

    folded = [n for n in names if n.casefold() == str(v).strip().casefold()]
    close = folded or difflib.get_close_matches(str(v), list(names), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _near_miss_names(counts: dict[str, int]) -> dict[str, str]:
    """Rare names that look like a typo or another spelling (case, spaces) of a frequent one:
    ``{rare: frequent}``."""
    import difflib

    out: dict[str, str] = {}
    for n, c in counts.items():
        best = None
        for m, cm in counts.items():
            if m == n:
                continue
            same = m.strip().casefold() == n.strip().casefold()
            if same and (cm, m) > (c, n):
                best = m
            elif not same and cm >= 3 * c and difflib.SequenceMatcher(None, n.casefold(), m.casefold()).ratio() >= 0.8:
                best = best or m
        if best is not None:
            out[n] = best
    return out


def _csv_labels(csv_path: Path, rows, label_col: str, class_names: Sequence[str] | None):
    """The class names of a CSV manifest and a function ``(line, value) -> (index, problem)``.

    With ``class_names``, a label is one of the names exactly (or an integer index into them);
    without, the labels are either integer indices, which must be ``0..C-1`` with no gap, or class
    names (a rare name that differs from a frequent one only in case, spaces or a typo is an
    error with a "did you mean", not a new class). NaN, ``1.5``, an index out of range or an
    unknown name is a problem of that row (index -1), never a class."""
    values = [row[label_col] for _, row in rows]
    kinds = [_label_kind(v) for v in values]
    n_int, n_name = kinds.count("int"), kinds.count("name")
    suspicious: dict[str, str] = {}
    numeric = False
    if class_names is not None:
        names = [str(c) for c in class_names]
        if len(set(names)) != len(names):
            raise ValueError(f"class_names has duplicates: {names}")
    elif n_int and n_int >= n_name:
        numeric = True
        present = sorted({int(float(v)) for v, k in zip(values, kinds) if k == "int"})
        C = 0
        while C in present:
            C += 1
        names = [str(i) for i in range(C)]
        found = ", ".join(map(str, present[:12])) + (", ..." if len(present) > 12 else "")
    else:
        counts: dict[str, int] = {}
        for v, k in zip(values, kinds):
            if k == "name":
                counts[v] = counts.get(v, 0) + 1
        suspicious = _near_miss_names(counts)
        names = sorted(n for n in counts if n not in suspicious)
    name_to_idx = {n: i for i, n in enumerate(names)}
    C = len(names)
    fix = "fix the label or remove the row"

    def label_of(line: int, v):
        k = _label_kind(v)
        if k == "empty":
            return -1, ("bad_label", "empty label", "fill in the label or remove the row")
        if k == "not_finite":
            return -1, ("bad_label", f"label {v!r} is not a class (missing or not a number)", fix)
        if class_names is not None and v in name_to_idx:
            return name_to_idx[v], None
        if k == "fraction":
            return -1, ("bad_label", f"label {v!r} is not an integer class index", fix)
        if k == "int":
            i = int(float(v))
            if 0 <= i < C and (numeric or class_names is not None):
                return i, None
            if numeric:
                return -1, (
                    "label_out_of_range",
                    f"label {i} is outside 0..{C - 1}: integer labels must be 0..C-1 with no gap (found {found})",
                    "fix the label (labels start at 0), or use class names in the CSV",
                )
            if class_names is not None:
                return -1, ("label_out_of_range", f"label {i} is outside 0..{C - 1} ({C} classes {names})", fix)
            return -1, ("bad_label", f"label {v!r} is a number but the other labels are class names {names}", fix)
        if v in name_to_idx:
            return name_to_idx[v], None
        if v in suspicious:
            return -1, (
                "unknown_class",
                f"class name {v!r} is not one of the classes {names}; did you mean {suspicious[v]!r}?",
                "class names are matched exactly (case too): fix the label",
            )
        if numeric:
            return -1, (
                "bad_label",
                f"label {v!r} is not an integer class index (the other labels are 0..{C - 1})",
                fix,
            )
        return -1, (
            "unknown_class",
            f"unknown class name {v!r}; known classes: {names}{_did_you_mean(v, names)}",
            "fix the label, or add the name to class_names",
        )

    return names, label_of


def load_csv_manifest(
    csv_path: str | os.PathLike,
    root: str | os.PathLike | None = None,
    path_col: str = "path",
    label_col: str = "label",
    split_col: str | None = None,
    class_names: Sequence[str] | None = None,
    id_col: str | None = None,
    group_col: str | None = None,
) -> dict[str, DatasetIndex]:
    """A CSV with one row per image.

    Paths in ``path_col`` are relative to ``root`` (default: the CSV's folder) unless absolute.
    Labels in ``label_col`` are either all integers (class indices; names ``"0".."K-1"`` unless
    ``class_names`` is given) or class names (mapped to indices in the order of
    ``class_names``, or of the sorted distinct names). An unknown name or an empty label is
    recorded as a problem of that row. ``id_col`` (default: the path as written) names records.
    ``group_col`` (a lesion or patient id; empty = the row is its own group) keeps a group's images
    together when splits or cross-validation folds are drawn.

    Returns ``{"train", "val", "test"}`` (those present) when ``split_col`` is given (values
    train/val/test and common aliases), else ``{"all": index}``.
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    required = [path_col, label_col] + ([split_col] if split_col else []) + ([id_col] if id_col else [])
    required += [group_col] if group_col else []
    rows = _read_csv(csv_path, required)
    names, label_of = _csv_labels(csv_path, rows, label_col, class_names)
    bad_splits = []
    per_split: dict[str, tuple[list[Record], list[Problem]]] = {}
    for line, row in rows:
        src = f"{csv_path.name}:line {line}"
        part = "all"
        if split_col:
            part = _SPLIT_ALIASES.get(str(row[split_col]).lower(), "")
            if not part:
                bad_splits.append(f"{src}: split {row[split_col]!r}")
                continue
        p = Path(row[path_col]) if row[path_col] else None
        path = (p if p.is_absolute() else root / p) if p is not None else None
        rid = row[id_col] if id_col else row[path_col]
        recs, probs = per_split.setdefault(part, ([], []))
        lab, problem = label_of(line, row[label_col])
        if problem is not None:
            kind, text, hint = problem
            probs.append(Problem(kind, f"{src}: {text} (row {rid!r})", split=part, record_id=rid, hint=hint))
        if path is None:
            probs.append(
                Problem(
                    "missing_file",
                    f"{src}: empty path for {rid!r}",
                    split=part,
                    record_id=rid,
                    hint="fill in the image path or remove the row",
                )
            )
        group = (row[group_col] or None) if group_col else None
        recs.append(Record(id=rid, label=lab, path=path, group=group, source=src))
    if bad_splits:
        raise DataError(
            f"{csv_path}: unknown split names in column {split_col!r} (use "
            "train/val/test):\n  " + "\n  ".join(bad_splits[:50])
        )
    return {part: DatasetIndex(recs, list(names), problems=probs) for part, (recs, probs) in per_split.items()}


# ----------------------------------------------------------------------------------------------
# class folders


def _list_images(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def load_image_folder(root: str | os.PathLike, class_names: Sequence[str] | None = None) -> dict[str, DatasetIndex]:
    """Class sub-folders: ``root/<class>/*.png|jpg|...|dcm`` -> ``{"all": index}``, or
    ``root/{train,val,test}/<class>/...`` -> one index per split folder present.

    Classes are the sorted folder names (union over splits) unless ``class_names`` fixes the
    order; images in nested folders below a class folder belong to that class. Record ids are
    the paths relative to ``root``. Hidden files and non-image extensions are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    bases = split_dirs if split_dirs else {"all": root}
    found: set[str] = set()
    for base in bases.values():
        found.update(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    names = list(class_names) if class_names is not None else sorted(found)
    if not names:
        raise DataError(f"{root}: no class folders found; expected root/<class>/<image> or root/train/<class>/<image>")
    out: dict[str, DatasetIndex] = {}
    for part, base in bases.items():
        recs, probs = [], []
        for d in sorted(x for x in base.iterdir() if x.is_dir() and not x.name.startswith(".")):
            if d.name in names:
                lab = names.index(d.name)
            else:
                lab = -1
            for p in _list_images(d):
                rid = p.relative_to(root).as_posix()
                if lab < 0:
                    probs.append(
                        Problem(
                            "unknown_class",
                            f"{rid}: folder {d.name!r} is not one of the classes {names}",
                            split=part,
                            record_id=rid,
                            hint="add it to class_names or move the images",
                        )
                    )
                recs.append(Record(id=rid, label=lab, path=p))
        out[part] = DatasetIndex(recs, list(names), problems=probs)
    return out


# ----------------------------------------------------------------------------------------------
# MedMNIST


def load_medmnist(npz_path: str | os.PathLike, class_names: Sequence[str] | None = None) -> dict[str, DatasetIndex]:
    """A MedMNIST ``.npz`` (keys ``{train,val,test}_{images,labels}``), kept in memory.

    Returns ``{"train", "val", "test"}`` (those present). Images ``[N,H,W]`` (grey) or
    ``[N,H,W,3]`` (RGB); labels ``[N]`` or ``[N,1]`` (multi-label ``[N,K>1]`` is refused).
    Records have ``array_index`` into ``DatasetIndex.images`` and ids ``"<split>_<i>"``.
    Class names: ``class_names``, a built-in table for known files (BreastMNIST), else
    ``"0".."K-1"``.
    """
    npz_path = Path(npz_path)
    if npz_path.is_dir():
        cands = sorted(npz_path.glob("*.npz"))
        if len(cands) != 1:
            raise DataError(f"{npz_path}: expected exactly one .npz file, found {len(cands)}")
        npz_path = cands[0]
    if not npz_path.is_file():
        raise DataError(f"MedMNIST file not found: {npz_path}")
    try:
        with np.load(npz_path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as e:
        raise DataError(f"{npz_path}: cannot read as .npz ({type(e).__name__}: {e})") from e
    parts = [s for s in ("train", "val", "test") if f"{s}_images" in data]
    if not parts:
        raise DataError(f"{npz_path}: no '<split>_images' arrays; keys are {sorted(data)}")
    labels: dict[str, np.ndarray] = {}
    for s in parts:
        if f"{s}_labels" not in data:
            raise DataError(f"{npz_path}: '{s}_images' has no matching '{s}_labels'")
        imgs, lab = data[f"{s}_images"], data[f"{s}_labels"]
        if imgs.ndim not in (3, 4) or (imgs.ndim == 4 and imgs.shape[-1] not in (1, 3)):
            raise DataError(f"{npz_path}: {s}_images has shape {imgs.shape}; expected [N,H,W] or [N,H,W,3]")
        if lab.ndim == 2 and lab.shape[1] == 1:
            lab = lab[:, 0]
        if lab.ndim != 1:
            raise DataError(
                f"{npz_path}: {s}_labels has shape {data[f'{s}_labels'].shape}; "
                "only single-label [N] or [N,1] labels are supported"
            )
        if len(lab) != len(imgs):
            raise DataError(f"{npz_path}: {s} has {len(imgs)} images but {len(lab)} labels")
        labels[s] = lab.astype(np.int64)
    if class_names is None:
        class_names = MEDMNIST_CLASSES.get(npz_path.stem.lower().split("_")[0])
        if class_names is None:
            k = int(max(int(l.max()) if len(l) else -1 for l in labels.values())) + 1
            class_names = [str(i) for i in range(k)]
    out = {}
    for s in parts:
        imgs = data[f"{s}_images"]
        if imgs.dtype != np.uint8:
            raise DataError(f"{npz_path}: {s}_images has dtype {imgs.dtype}; expected uint8")
        recs = [
            Record(id=f"{s}_{i:05d}", label=int(l), array_index=i, source=f"{npz_path.name}:{s}[{i}]")
            for i, l in enumerate(labels[s])
        ]
        out[s] = DatasetIndex(recs, list(class_names), images=imgs)
    return out
