"""Dataset loaders and the registry of named data sets.

:data:`REGISTRY` holds one :class:`DatasetSpec` per ``data.dataset`` name: its loader, the split
protocols it supports, its lesion / patient groups, its downloads, its lesion masks and original
images. :data:`DATASETS` (the config's choices), the data module, ``diffmic data download``, the
lesion checks, the report and the model card read it; a new data set is a loader and one entry.

The loaders read labels, split files and folder layouts and build
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import overload

import numpy as np

from .dicom import DICOM_EXTENSIONS
from .records import DataError, DatasetIndex, Problem, Record
from .remote import DataverseFile, DownloadSource, ManualSource, RemoteFile
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
    "DATASETS",
    "SPLITS",
    "REGISTRY",
    "DatasetSpec",
    "LoadRequest",
    "dataset_spec",
    "find_dataset",
    "image_id_file",
]

HAM10000_CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
#: HAM10000 metadata ``dx`` code -> class index (ISIC 2018 ground-truth column order)
HAM10000_DX = {name.lower(): i for i, name in enumerate(HAM10000_CLASSES)}
APTOS_CLASSES = ["No_DR", "Mild", "Moderate", "Severe", "Proliferative_DR"]
MEDMNIST_CLASSES = {
    "breastmnist": ["malignant", "normal, benign"],
    "pneumoniamnist": ["normal", "pneumonia"],
}
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


def _authors_split(
    root: Path,
    id_column: str,
    classes: list[str],
    make: Callable[[str, int, str], Record],
    known_label: Callable[[str], tuple[int | None, str]],
    *,
    other_splits: str,
    label_hint: str,
    reference: str,
) -> dict[str, DatasetIndex]:
    """The authors' published split, ``root/splits/diffmic_{train,test}.csv`` (``<id_column>,label``).

    A label that is not an integer is an error (the record keeps label −1); one that disagrees with
    the data set's own label, ``known_label(id) -> (label or None, what it is)``, a warning.
    """
    out: dict[str, DatasetIndex] = {}
    for part in ("train", "test"):
        f = root / "splits" / f"diffmic_{part}.csv"
        if not f.is_file():
            raise DataError(f"split file not found: {f}. Use {other_splits}, or restore the DiffMIC split files.")
        recs, probs = [], []
        for line, row in _read_csv(f, [id_column, "label"]):
            src, rid = f"{f.name}:line {line}", row[id_column]
            lab = _parse_int(row["label"])
            if lab is None:
                probs.append(
                    Problem(
                        "bad_label",
                        f"{src}: label {row['label']!r} of {rid!r} is not an integer",
                        split=part,
                        record_id=rid,
                        hint=label_hint,
                    )
                )
                lab = -1
            else:
                expected, what = known_label(rid)
                if expected is not None and expected != lab:
                    name = classes[lab] if 0 <= lab < len(classes) else "?"
                    probs.append(
                        Problem(
                            "label_mismatch",
                            f"{src}: label {lab} ({name}) of {rid!r} disagrees with {what}",
                            severity="warning",
                            split=part,
                            record_id=rid,
                            hint=f"check the split file against {reference}",
                        )
                    )
            recs.append(make(rid, lab, src))
        out[part] = DatasetIndex(recs, classes, problems=probs)
    return out


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

        def ham_label(image_id: str) -> tuple[int | None, str]:
            m = meta.get(image_id)
            return (None, "") if m is None else (HAM10000_DX.get(m["dx"].lower()), f"metadata dx={m['dx']!r}")

        return _authors_split(
            root,
            "image_id",
            list(HAM10000_CLASSES),
            make,
            ham_label,
            other_splits="split='lesion' or 'random'",
            label_hint="use class indices 0-6 (MEL..VASC)",
            reference="HAM10000_metadata.csv",
        )

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


#: where the HAM10000 files and the DiffMIC split come from (``diffmic data download ham10000``)
_DIFFMIC_REPO = "https://raw.githubusercontent.com/scott-yjyang/DiffMIC/ae42dc7506bed03790eeb97fe242223235a75d5e"
HAM10000_DOWNLOAD = DownloadSource(
    name="ham10000",
    description="HAM10000 (ISIC 2018 Task 3 training set): 10,015 dermatoscopic images (600x450 JPEG), "
    "metadata, lesion segmentation masks, and the DiffMIC authors' 7,011/3,004 split",
    licence="CC BY-NC 4.0 (images, metadata, masks); split files from github.com/scott-yjyang/DiffMIC",
    citation="Tschandl, Rosendahl & Kittler, 'The HAM10000 dataset', Sci. Data 5, 180161 (2018)",
    approx_size="about 3 GB downloaded (two image zips ~2.6 GB, masks ~30 MB), about 3 GB on disk",
    dataverse_server="https://dataverse.harvard.edu",
    dataverse_doi="10.7910/DVN/DBW86T",
    dataverse_files=(
        DataverseFile("HAM10000_metadata", "metadata_csv", "HAM10000_metadata.csv"),
        DataverseFile("HAM10000_images_part_1.zip", "unzip_jpg", "images"),
        DataverseFile("HAM10000_images_part_2.zip", "unzip_jpg", "images"),
        DataverseFile("HAM10000_segmentations_lesion_tschandl.zip", "unzip_png", "masks"),
    ),
    files=tuple(
        RemoteFile(
            f"{_DIFFMIC_REPO}/dataset/isic2018/isic2018_{part}.pkl",
            f"isic2018_{part}.pkl",
            None,
            "pkl_split",
            f"splits/diffmic_{part}.csv",
            expect_rows=rows,
            classes=tuple(HAM10000_CLASSES),
        )
        for part, rows in (("train", 7011), ("test", 3004))
    ),
    layout="ham10000/images/ISIC_*.jpg, ham10000/masks/ISIC_*_segmentation.png, "
    "ham10000/HAM10000_metadata.csv, ham10000/splits/diffmic_{train,test}.csv",
    config_hint="data.dataset=ham10000 data.root={path}",
)


def _ham10000_original(root: Path | None, image_id: str) -> Path | None:
    """The JPEG of a HAM10000 image id (``root/images/<id>.jpg``), where it is."""
    if root is None:
        return None
    p = root / "images" / f"{image_id}.jpg"
    return p if p.is_file() else None


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
        return _authors_split(
            root,
            "id_code",
            list(APTOS_CLASSES),
            make,
            lambda id_code: (diag.get(id_code), f"train.csv diagnosis {diag.get(id_code)}"),
            other_splits="split='random'",
            label_hint="use grades 0-4",
            reference="train.csv",
        )

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


APTOS2019_DOWNLOADS = (
    ManualSource(
        name="aptos2019",
        message=(
            "APTOS 2019 Blindness Detection is distributed only under Kaggle's competition rules "
            "(a Kaggle account that has accepted them), so diffmic does not download it.\n"
            "Get it from https://www.kaggle.com/competitions/aptos2019-blindness-detection/data "
            "(or `kaggle competitions download -c aptos2019-blindness-detection`, ~9.5 GB), unzip it "
            "and lay it out as\n"
            "  {root}/aptos2019/train.csv               (id_code,diagnosis; 3,662 rows)\n"
            "  {root}/aptos2019/train_images/<id_code>.png\n"
            "  {root}/aptos2019/splits/diffmic_{{train,test}}.csv   (the DiffMIC authors' 2,564/1,098 split: "
            "`diffmic data download aptos2019_splits --root {root}` writes them to {root}/aptos2019_splits/; "
            "copy them there. Without them use data.split=random)\n"
            "then train with: diffmic fit --config aptos2019 data.root={root}/aptos2019"
        ),
    ),
    DownloadSource(
        name="aptos2019_splits",
        description="the DiffMIC authors' APTOS 2019 split (2,564 train / 1,098 test id_codes; images not included)",
        licence="split lists from github.com/scott-yjyang/DiffMIC; the APTOS images are under Kaggle's terms",
        citation="Yang et al., DiffMIC, MICCAI 2023",
        approx_size="about 100 KB",
        files=tuple(
            RemoteFile(
                f"{_DIFFMIC_REPO}/dataset/aptos/aptos_{part}.pkl",
                f"aptos_{part}.pkl",
                None,
                "pkl_split",
                f"diffmic_{part}.csv",
                expect_rows=rows,
                id_col="id_code",
                classes=tuple(APTOS_CLASSES),
            )
            for part, rows in (("train", 2564), ("test", 1098))
        ),
        layout="aptos2019_splits/diffmic_{train,test}.csv (copy into aptos2019/splits/)",
        config_hint="copy {path}/diffmic_*.csv to <aptos2019 folder>/splits/, then data.root=<aptos2019 folder>",
    ),
)


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


# MedMNIST v2 2-D single-label sets: URLs and MD5s exactly as the `medmnist` package (3.0.2,
# medmnist/info.py INFO[...]["url"/"MD5"...]) publishes them. Multi-label ChestMNIST and the 3-D
# sets are left out: the loader reads single-label 2-D images.
_ZENODO = "https://zenodo.org/records/10519652/files"
_MEDMNIST_MD5 = {
    "breastmnist": (
        "750601b1f35ba3300ea97c75c52ff8f6",
        "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1",
        "b56378a6eefa9fed602bb16d192d4c8b",
    ),
    "pneumoniamnist": (
        "28209eda62fecd6e6a2d98b1501bb15f",
        "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971",
        "d6a3c71de1b945ea11211b03746c1fe1",
    ),
    "dermamnist": (
        "0744692d530f8e62ec473284d019b0c7",
        "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1",
        "8974907d8e169bef5f5b96bc506ae45d",
    ),
    "retinamnist": (
        "bd4c0672f1bba3e3a89f0e4e876791e4",
        "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18",
        "eae7e3b6f3fcbda4ae613ebdcbe35348",
    ),
    "bloodmnist": (
        "7053d0359d879ad8a5505303e11de1dc",
        "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c",
        "b718ff6835fcbdb22ba9eacccd7b2601",
    ),
}
_MEDMNIST_LICENCE = {"dermamnist": "CC BY-NC 4.0"}


def _medmnist_download(name: str, suffix: str, md5: str) -> DownloadSource:
    """One official MedMNIST ``.npz`` (``suffix``: ``""`` = 28 px, ``"_64"``, ``"_128"``, ``"_224"``)."""
    n = f"{name}{suffix}"
    size = suffix[1:] or "28"
    return DownloadSource(
        name=n,
        description=f"MedMNIST v2 {name} at {size}x{size} (official .npz)",
        licence=_MEDMNIST_LICENCE.get(name, "CC BY 4.0"),
        citation="Yang et al., 'MedMNIST v2', Sci. Data 10, 41 (2023)",
        approx_size="see https://zenodo.org/records/10519652",
        files=(RemoteFile(f"{_ZENODO}/{n}.npz?download=1", f"{n}.npz", md5, "copy", f"{n}.npz"),),
        layout=f"{n}/{n}.npz",
        config_hint="data.dataset=medmnist data.root={path}/" + f"{n}.npz",
    )


MEDMNIST_DOWNLOADS = tuple(
    _medmnist_download(name, suffix, md5)
    for name, md5s in _MEDMNIST_MD5.items()
    for suffix, md5 in zip(("", "_64", "_128", "_224"), md5s)
)


# ----------------------------------------------------------------------------------------------
# The registry: one entry per named data set


@dataclass(frozen=True)
class LoadRequest:
    """What the data module asks a data set's loader for: its ``data.*`` settings."""

    root: Path | None
    split: str = "authors"
    seed: int = 1234
    test_fraction: float = 0.3
    csv_path: Path | None = None
    path_col: str = "path"
    label_col: str = "label"
    split_col: str | None = None
    group_col: str | None = None
    class_names: tuple[str, ...] | None = None

    def folder(self, dataset: str) -> Path:
        """``root``, which every data set but a CSV manifest needs."""
        if self.root is None:
            raise ValueError(f"dataset={dataset!r} needs root (csv_path is for dataset='csv')")
        return self.root


def image_id_file(root: Path | None, image_id: str) -> Path | None:
    """The original image of an item whose id is a path (CSV manifests), where that file is."""
    p = Path(image_id)
    return p if p.is_file() else None


@dataclass(frozen=True)
class DatasetSpec:
    """Everything that differs between named data sets (``data.dataset``); every part of the package
    that depends on the data set reads it from here (:func:`find_dataset`).

    ``load`` reads the source's splits (``{"train", "val", "test"}`` or ``{"all"}``, as the loaders
    above). ``splits``: the ``data.split`` protocols it supports (``"lesion"`` needs records with
    groups). ``group_column``: the column of the data set's own files that names a record's group
    (lesion / patient id, ``Record.group``), kept in one split and one fold; a CSV manifest names
    its own (``data.group_col``). ``resplit_random``: ``split="random"`` pools the source's own splits
    and draws a new one (the loader itself does not split). ``public_benchmark``: the published split
    is kept as it is, so the same pixels in two splits or under two labels are a warning, not an
    error. ``downloads``: what ``diffmic data download`` fetches for it. ``mask_folder``: the folder
    under ``root`` of its lesion masks (``<image id>_segmentation.png``). ``original_image``: the
    original file of an item (``root``, image id) for the report, or ``None``. ``split_notes``: a
    sentence for the model card, by split.
    """

    name: str
    title: str  # in messages ("HAM10000")
    load: Callable[[LoadRequest], dict[str, DatasetIndex]]
    splits: tuple[str, ...] = ("authors", "random")
    aliases: tuple[str, ...] = ()
    group_column: str | None = None
    resplit_random: bool = False
    public_benchmark: bool = False
    downloads: tuple[DownloadSource | ManualSource, ...] = ()
    mask_folder: str | None = None
    original_image: Callable[[Path | None, str], Path | None] = image_id_file
    split_notes: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        unknown = [s for s in self.splits if s not in SPLITS]
        if not self.splits or unknown:
            raise ValueError(f"data set {self.name!r}: splits must be some of {SPLITS}, got {self.splits}")
        if "lesion" in self.splits and self.group_column is None:
            raise ValueError(f"data set {self.name!r}: split 'lesion' needs a group_column (lesion ids)")

    def split_error(self, split: str) -> str | None:
        """Why this data set cannot be split by ``split`` (``None``: it can)."""
        if split in self.splits:
            return None
        if split == "lesion":
            have = " and ".join(s.title for s in REGISTRY.values() if "lesion" in s.splits) or "no data set"
            return f"split='lesion' needs lesion ids, which only {have} has"
        if self.splits == ("authors",):
            return f"{self.title} only supports its official split (split='authors')"
        return f"{self.title} supports split={' / '.join(self.splits)}, not {split!r}"


def _load_ham10000(req: LoadRequest) -> dict[str, DatasetIndex]:
    return load_ham10000(req.folder("ham10000"), req.split, seed=req.seed, test_fraction=req.test_fraction)


def _load_aptos2019(req: LoadRequest) -> dict[str, DatasetIndex]:
    return load_aptos2019(req.folder("aptos2019"), req.split, seed=req.seed, test_fraction=req.test_fraction)


def _load_csv(req: LoadRequest) -> dict[str, DatasetIndex]:
    csv_path, base = req.csv_path, req.root
    if csv_path is None:
        if req.root is not None and req.root.suffix.lower() == ".csv":
            csv_path, base = req.root, None
        else:
            raise ValueError("dataset='csv' needs csv_path (or root pointing at the CSV)")
    return load_csv_manifest(
        csv_path, base, req.path_col, req.label_col, req.split_col, req.class_names, group_col=req.group_col
    )


def _load_folder(req: LoadRequest) -> dict[str, DatasetIndex]:
    return load_image_folder(req.folder("folder"), req.class_names)


def _load_medmnist(req: LoadRequest) -> dict[str, DatasetIndex]:
    return load_medmnist(req.folder("medmnist"), req.class_names)


#: the named data sets (``data.dataset``), in the order the config lists them
REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="ham10000",
            title="HAM10000",
            load=_load_ham10000,
            splits=("authors", "lesion", "random"),
            aliases=("ham", "isic2018", "isic"),
            group_column="lesion_id",
            public_benchmark=True,
            downloads=(HAM10000_DOWNLOAD,),
            mask_folder="masks",
            original_image=_ham10000_original,
            split_notes={
                "authors": "Note: the authors' HAM10000 split is per image, and about a third of its test images "
                "show a lesion that is also in the training split, so test scores on it are optimistic."
            },
        ),
        DatasetSpec(
            name="aptos2019",
            title="APTOS 2019",
            load=_load_aptos2019,
            aliases=("aptos",),
            public_benchmark=True,
            downloads=APTOS2019_DOWNLOADS,
        ),
        DatasetSpec(name="csv", title="a CSV manifest", load=_load_csv, resplit_random=True),
        DatasetSpec(
            name="folder",
            title="a class-folder tree",
            load=_load_folder,
            aliases=("image_folder", "imagefolder"),
            resplit_random=True,
        ),
        DatasetSpec(
            name="medmnist",
            title="MedMNIST",
            load=_load_medmnist,
            splits=("authors",),
            aliases=("npz",),
            public_benchmark=True,
            downloads=MEDMNIST_DOWNLOADS,
        ),
    )
}


class _RegistryNames(Sequence[str]):
    """The names in :data:`REGISTRY`, read when asked (a tuple-like view: a data set registered later
    is one of them)."""

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[str, ...]: ...
    def __getitem__(self, i: int | slice) -> str | tuple[str, ...]:
        return tuple(REGISTRY)[i]

    def __len__(self) -> int:
        return len(REGISTRY)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (tuple, _RegistryNames)) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(tuple(REGISTRY))


#: ``data.dataset``'s choices: the names in :data:`REGISTRY`
DATASETS: Sequence[str] = _RegistryNames()


def find_dataset(name: str | None) -> DatasetSpec | None:
    """The entry of a data set by its name or an alias (any case); ``None`` for another name."""
    if not name:
        return None
    key = str(name).lower()
    if key in REGISTRY:
        return REGISTRY[key]
    return next((s for s in REGISTRY.values() if key in s.aliases), None)


def dataset_spec(name: str) -> DatasetSpec:
    """:func:`find_dataset`, raising ``ValueError`` (listing :data:`DATASETS`) for an unknown name."""
    spec = find_dataset(name)
    if spec is None:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return spec
