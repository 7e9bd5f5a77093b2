"""``diffmic data download NAME --root DIR``: fetch a public data set into the layout the loaders read.

Like torchvision's and MedMNIST's downloaders:

* a progress bar (tqdm, on stderr);
* resumable: a file is written to ``<name>.part`` in ``DIR/.diffmic-downloads/``; an interrupted
  download continues from where it stopped with an HTTP ``Range`` request (a server that ignores
  ``Range`` makes it start again);
* checksums verified where the source publishes them (MedMNIST: the MD5s in the ``medmnist``
  package's ``INFO``; Harvard Dataverse: the MD5 that the Dataverse file listing reports for every
  file); a mismatch deletes the file and stops;
* atomic: the data set is assembled in a temporary folder next to the target, a marker file
  ``.diffmic-complete`` (JSON: source, files, checksums) is written last, and the folder is renamed
  into place, so a killed or failed download never leaves ``DIR/NAME`` looking complete;
* offline: a clear error that lists what to download by hand and where to put it (CLI exit 2).

Every URL lives in the entry of its data set in :data:`diffmic.data.sources.REGISTRY`
(``DatasetSpec.downloads``, described with the classes of :mod:`diffmic.data.remote`);
:data:`SOURCES` is the table of them all, by download name. ``mirror`` (``--mirror`` / ``DIFFMIC_DATA_MIRROR``)
rewrites ``https://<host>/<path>`` to ``<mirror>/<host>/<path>``: for institutional mirrors and for
the tests, which serve fake archives from a local HTTP server on 127.0.0.1.

APTOS 2019 is distributed only under Kaggle's competition terms (an account and accepting the
rules), so it is not downloaded: :class:`ManualSource` prints where to get it and the layout.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

from diffmic.atomic import atomic_path

from .records import DataError
from .remote import DataverseFile, DownloadSource, ManualSource, RemoteFile
from .sources import REGISTRY

__all__ = [
    "MARKER",
    "SOURCES",
    "DataverseFile",
    "DownloadError",
    "DownloadSource",
    "ManualDownloadRequired",
    "ManualSource",
    "RemoteFile",
    "available_datasets",
    "download_source",
    "download_dataset",
    "fetch_file",
    "is_complete",
]

MARKER = ".diffmic-complete"  # written last, inside the data-set folder
STAGING = ".diffmic-downloads"  # ROOT/.diffmic-downloads/<name>/<file>.part
USER_AGENT = "diffmic-downloader (+https://github.com/diffmic)"
CHUNK = 1 << 16
_JSON_LIMIT = 64 * 2**20  # a file listing is a few KB; a longer answer is not one


class DownloadError(DataError):
    """A download failed (offline, HTTP error, checksum mismatch, bad archive)."""


class ManualDownloadRequired(DownloadError):
    """The data set cannot be downloaded automatically; the message says how to get it."""


# ----------------------------------------------------------------------------------------------
# The table of sources


#: every download, by name: the ``downloads`` of the data sets in :data:`~diffmic.data.sources.REGISTRY`
SOURCES: dict[str, DownloadSource | ManualSource] = {d.name: d for spec in REGISTRY.values() for d in spec.downloads}


def _registered() -> dict[str, DownloadSource | ManualSource]:
    """The downloads of the data sets in the registry now (one registered after this import too)."""
    return {d.name: d for spec in REGISTRY.values() for d in spec.downloads}


def download_source(name: str) -> DownloadSource | ManualSource | None:
    """The download called ``name`` (any case): :data:`SOURCES`, then the registry's data sets."""
    key = name.lower()
    return SOURCES.get(key) or _registered().get(key)


def available_datasets() -> list[str]:
    return sorted(set(SOURCES) | set(_registered()))


# ----------------------------------------------------------------------------------------------
# HTTP


def _mirror(url: str, mirror: str | None) -> str:
    if not mirror:
        return url
    parts = urllib.parse.urlsplit(url)
    rest = parts.path + (f"?{parts.query}" if parts.query else "")
    return f"{mirror.rstrip('/')}/{parts.netloc}{rest}"


def _offline_error(url: str, exc: BaseException, manual: str) -> DownloadError:
    return DownloadError(f"cannot download {url}: {exc}. Is this machine offline or behind a proxy?\n{manual}")


def _open(url: str, start: int = 0, timeout: float = 60.0):
    headers = {"User-Agent": USER_AGENT}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
    req = urllib.request.Request(url, headers=headers)
    return urllib.request.urlopen(req, timeout=timeout)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_file(
    url: str,
    dest: str | os.PathLike,
    md5: str | None = None,
    *,
    progress: bool = True,
    manual: str = "",
    timeout: float = 60.0,
) -> Path:
    """Download ``url`` to ``dest`` (resumable through ``dest + '.part'``), verify ``md5`` if given.

    A finished ``dest`` is only ever the complete, verified file (renamed from ``.part``). An
    interrupted transfer leaves ``.part`` behind and the next call resumes it with ``Range``; a
    checksum mismatch deletes ``.part`` and raises :class:`DownloadError`.
    """
    dest = Path(dest)
    if dest.is_file():
        if md5 is None or _md5(dest) == md5.lower():
            return dest
        dest.unlink()  # a stale or corrupt finished file: fetch again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.is_file() else 0
    try:
        resp = _open(url, start, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start > 0:  # the .part is already complete (or longer than the file)
            resp = None
        else:
            raise DownloadError(f"cannot download {url}: HTTP {exc.code} {exc.reason}.\n{manual}") from exc
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError) as exc:
        raise _offline_error(url, getattr(exc, "reason", exc), manual) from exc
    if resp is not None:
        with resp:
            status = getattr(resp, "status", 200)
            if start > 0 and status != 206:  # server ignored Range: start again
                start = 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=total,
                    initial=start,
                    unit="B",
                    unit_scale=True,
                    unit_divisor=1024,
                    desc=dest.name,
                    file=sys.stderr,
                    leave=False,
                )
            received = start
            try:
                with open(part, "ab" if start > 0 else "wb") as fh:
                    while True:
                        try:
                            block = resp.read(CHUNK)
                        except (TimeoutError, ConnectionError, OSError, http.client.HTTPException) as exc:
                            raise DownloadError(
                                f"download of {url} was interrupted after {received} bytes ({exc}); "
                                f"run the same command again to resume from {part}"
                            ) from exc
                        if not block:
                            break
                        fh.write(block)
                        received += len(block)
                        if bar is not None:
                            bar.update(len(block))
            finally:
                if bar is not None:
                    bar.close()
            if total is not None and received < total:
                raise DownloadError(
                    f"download of {url} was interrupted after {received} of {total} bytes; "
                    f"run the same command again to resume from {part}"
                )
    if md5 is not None:
        got = _md5(part)
        if got != md5.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"checksum mismatch for {url}: MD5 {got}, published {md5}. The corrupt file was deleted; "
                "run the command again (if it keeps failing, the source changed the file: report it)."
            )
    os.replace(part, dest)
    return dest


def _read_json(url: str, manual: str, timeout: float = 60.0) -> object:
    try:
        with _open(url, 0, timeout) as resp:
            text = resp.read(_JSON_LIMIT + 1)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"cannot read {url}: HTTP {exc.code} {exc.reason}.\n{manual}") from exc
    except (TimeoutError, urllib.error.URLError, ConnectionError, OSError, http.client.HTTPException) as exc:
        raise _offline_error(url, getattr(exc, "reason", exc), manual) from exc
    if len(text) > _JSON_LIMIT:
        raise DownloadError(f"{url} answered with more than {_JSON_LIMIT // 2**20} MiB of JSON; refusing it")
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise DownloadError(f"{url} did not return JSON ({exc})") from exc


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ ()+,=-]{0,199}")


def safe_file_name(name: object, what: str) -> str:
    """The base name of a file name given by a server (a listing is data, never a path): the part
    after the last ``/`` or ``\\``, which must be a plain name (letters, digits, ``._ ()+,=-``, not
    starting with a dot, at most 200 characters). Anything else raises :class:`DownloadError`
    naming ``what`` (the file the listing describes)."""
    base = re.split(r"[\\/]", name)[-1].strip() if isinstance(name, str) else ""
    if not _SAFE_NAME.fullmatch(base) or base.strip(".") == "":
        raise DownloadError(
            f"the file listing names {what} {name!r}, which is not a plain file name (letters, digits and "
            "'._ ()+,=-', not starting with a dot, at most 200 characters); refusing it. The server or "
            "mirror answered with an unexpected listing: check --mirror / DIFFMIC_DATA_MIRROR."
        )
    return base


def _norm(name: str) -> str:
    stem = re.sub(r"\.(zip|csv|tab|tsv|txt)$", "", name.lower())
    return re.sub(r"[^a-z0-9]", "", stem)


def _dataverse_listing(src: DownloadSource, mirror: str | None, manual: str) -> list[dict]:
    url = _mirror(
        f"{src.dataverse_server}/api/datasets/:persistentId/versions/:latest-published/files"
        f"?persistentId=doi:{src.dataverse_doi}",
        mirror,
    )
    obj = _read_json(url, manual)
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list):
        raise DownloadError(f"{url}: unexpected Dataverse answer (no 'data' list)")
    return data


def _resolve_dataverse(
    src: DownloadSource, listing: list[dict], want: DataverseFile, mirror: str | None
) -> tuple[str, str, str | None]:
    """``(url, filename, md5)`` of the listed file matching ``want``."""
    for entry in listing:
        if not isinstance(entry, dict) or not isinstance(entry.get("dataFile") or {}, dict):
            continue  # not a file entry: a listing is data, checked before use
        df = entry.get("dataFile") or {}
        given = [df.get("filename"), df.get("originalFileName"), entry.get("label")]
        if any(isinstance(n, str) and _norm(n) == _norm(want.match) for n in given):
            fid = df.get("id")
            if isinstance(fid, bool) or not (isinstance(fid, int) or (isinstance(fid, str) and fid.isdigit())):
                raise DownloadError(
                    f"doi:{src.dataverse_doi}: the listing gives '{want.match}' the file id {fid!r}, not a "
                    "number; refusing it (check --mirror / DIFFMIC_DATA_MIRROR)."
                )
            original = bool(df.get("originalFileFormat"))  # ingested table: fetch the uploaded file
            url = f"{src.dataverse_server}/api/access/datafile/{fid}" + ("?format=original" if original else "")
            md5 = (
                (df.get("checksum") or {}).get("value")
                if (df.get("checksum") or {}).get("type") == "MD5"
                else df.get("md5")
            )
            fname = safe_file_name(df.get("originalFileName") or df.get("filename") or want.match, f"'{want.match}' as")
            if md5 is not None and not (isinstance(md5, str) and re.fullmatch(r"[0-9a-fA-F]{32}", md5)):
                raise DownloadError(
                    f"doi:{src.dataverse_doi}: the listing gives '{want.match}' the MD5 {md5!r}, not 32 hex "
                    "digits; refusing it (check --mirror / DIFFMIC_DATA_MIRROR)."
                )
            if original:
                # Dataverse's checksum of an ingested table does not reliably match the original file it
                # serves (IQSS/dataverse#9501): checked by content instead (header, see _metadata_csv)
                md5 = None
            return _mirror(url, mirror), fname, md5
    names = sorted(
        str((e.get("dataFile") or {}).get("filename"))
        for e in listing
        if isinstance(e, dict) and isinstance(e.get("dataFile") or {}, dict)
    )
    raise DownloadError(
        f"doi:{src.dataverse_doi} lists no file named like '{want.match}' (it lists: {', '.join(names)})"
    )


# ----------------------------------------------------------------------------------------------
# Unpacking


def _unzip_flat(archive: Path, folder: Path, suffix: str) -> int:
    """Extract the ``*suffix`` members of ``archive`` into ``folder`` without their directories
    (no path from the archive is ever used: no zip-slip). Returns the number of files."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                base = Path(info.filename.replace("\\", "/")).name
                if info.is_dir() or not base.lower().endswith(suffix) or base.startswith("."):
                    continue
                with zf.open(info) as src, open(folder / base, "wb") as dst:
                    shutil.copyfileobj(src, dst, CHUNK)
                n += 1
    except zipfile.BadZipFile as exc:
        archive.unlink(missing_ok=True)
        raise DownloadError(f"{archive.name} is not a valid zip archive ({exc}); deleted it, run again") from exc
    if n == 0:
        raise DownloadError(f"{archive.name} holds no {suffix} files")
    return n


def _metadata_csv(src_file: Path, dest: Path) -> int:
    """Copy the metadata table as a comma-separated CSV (Dataverse may serve it tab-separated)."""
    text = src_file.read_text(encoding="utf-8-sig")
    first = text.splitlines()[0] if text else ""
    delim = "\t" if first.count("\t") > first.count(",") else ","
    rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delim))
    rows = [[c.strip().strip('"') for c in r] for r in rows if r]
    if not rows or not {"lesion_id", "image_id", "dx"} <= set(rows[0]):
        raise DownloadError(f"{src_file.name}: not the HAM10000 metadata table (header {rows[0] if rows else []})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)
    return len(rows) - 1


def _pkl_split(
    src_file: Path, dest: Path, expect_rows: int | None, id_col: str = "image_id", classes: Sequence[str] = ()
) -> int:
    """Released ``.pkl`` split (list of {'img_root', 'label'}, read with the restricted unpickler) ->
    ``<id_col>,label,class`` CSV as :func:`~diffmic.data.sources.load_ham10000` (``image_id``) and
    :func:`~diffmic.data.sources.load_aptos2019` (``id_code``) read it (``class``: the name of the
    label in ``classes``, empty where it has none)."""
    from .pickle_splits import load_pickle_split

    entries = load_pickle_split(src_file)
    if expect_rows is not None and len(entries) != expect_rows:
        raise DownloadError(f"{src_file.name}: {len(entries)} entries, expected {expect_rows}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow([id_col, "label", "class"])
        for e in entries:
            lab = int(e["label"])
            w.writerow(
                [Path(str(e["img_root"]).replace("\\", "/")).stem, lab, classes[lab] if 0 <= lab < len(classes) else ""]
            )
    return len(entries)


def _apply(
    action: str,
    file: Path,
    target: Path,
    expect_rows: int | None = None,
    id_col: str = "image_id",
    classes: Sequence[str] = (),
) -> int:
    if action == "copy":
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
        return 1
    if action == "unzip_jpg":
        return _unzip_flat(file, target, ".jpg")
    if action == "unzip_png":
        return _unzip_flat(file, target, ".png")
    if action == "metadata_csv":
        return _metadata_csv(file, target)
    if action == "pkl_split":
        return _pkl_split(file, target, expect_rows, id_col, classes)
    raise ValueError(f"unknown action {action!r}")


# ----------------------------------------------------------------------------------------------
# Entry point


def is_complete(folder: str | os.PathLike) -> bool:
    """True when ``folder`` was fully written by :func:`download_dataset` (its marker exists)."""
    return (Path(folder) / MARKER).is_file()


def _manual_text(src: DownloadSource, root: Path) -> str:
    lines = [f"To get {src.name} by hand: download"]
    if src.dataverse_doi:
        lines.append(
            f"  from https://doi.org/{src.dataverse_doi} (Harvard Dataverse): "
            + ", ".join(f.match for f in src.dataverse_files)
        )
    for f in src.files:
        lines.append(f"  {f.url}" + (f"  (MD5 {f.md5})" if f.md5 else ""))
    lines.append(f"and lay them out under {root} as: {src.layout}")
    return "\n".join(lines)


def download_dataset(
    name: str,
    root: str | os.PathLike,
    *,
    mirror: str | None = None,
    progress: bool = True,
    keep_archives: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Download data set ``name`` into ``root/<name>`` and return that folder.

    Already complete (marker present): returns at once. An existing folder without the marker
    (written by hand, or by something else) is never touched: :class:`DownloadError`.
    """
    src = download_source(name)
    if src is None:
        raise DownloadError(f"unknown data set '{name}'; available: {', '.join(available_datasets())}")
    root = Path(root).expanduser()
    if isinstance(src, ManualSource):
        raise ManualDownloadRequired(src.message.format(root=root))
    mirror = mirror or os.environ.get("DIFFMIC_DATA_MIRROR") or None
    final = root / src.name
    if is_complete(final):
        log(f"{src.name} is already complete in {final} (delete the folder to download it again)")
        return final
    if final.exists():
        raise DownloadError(
            f"{final} exists but was not written by 'diffmic data download' (no {MARKER} file); it is "
            f"left untouched. Use it as is ({src.config_hint.format(path=final)}), or move it away and "
            "run the command again."
        )
    manual = _manual_text(src, root)
    staging = root / STAGING / src.name
    staging.mkdir(parents=True, exist_ok=True)
    log(f"downloading {src.name}: {src.description}; {src.approx_size}. Licence: {src.licence}.")

    # 1. fetch everything (resumable, verified)
    jobs: list[tuple[str, str, str | None, str, str, int | None, str, tuple[str, ...]]] = []
    if src.dataverse_doi:
        listing = _dataverse_listing(src, mirror, manual)
        for want in src.dataverse_files:
            url, fname, md5 = _resolve_dataverse(src, listing, want, mirror)
            jobs.append((url, fname, md5, want.action, want.dest, None, "", ()))
    for f in src.files:
        jobs.append(
            (_mirror(f.url, mirror), f.filename, f.md5, f.action, f.dest, f.expect_rows, f.id_col, tuple(f.classes))
        )
    # names are data: each file is fetched under a plain base name inside the staging folder, and
    # two files of one name are refused (one must never overwrite or stand in for the other)
    seen: dict[str, str] = {}
    for url, fname, *_ in jobs:
        if fname.lower() in seen:
            raise DownloadError(
                f"the listing for {src.name} has two files named '{fname}' ({seen[fname.lower()]} and {url}); "
                "refusing it (check --mirror / DIFFMIC_DATA_MIRROR)."
            )
        seen[fname.lower()] = url
    fetched: list[Path] = []
    for url, fname, md5, *_ in jobs:
        dest = staging / safe_file_name(fname, "the file")
        if dest.parent != staging or dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise DownloadError(f"{dest} is not a plain file in {staging}; move it away and run again")
        fetched.append(fetch_file(url, dest, md5, progress=progress, manual=manual))

    # 2. assemble in a new temporary folder (never one that exists), write the marker last, rename into place
    tmp = Path(tempfile.mkdtemp(prefix=f".{src.name}.tmp-", dir=root))
    with atomic_path(final, tmp=tmp):  # renamed into place when complete, removed on any error
        record = []
        for path, (url, fname, md5, action, dest_name, rows, id_col, classes) in zip(fetched, jobs):
            n = _apply(action, path, tmp / dest_name, rows, id_col, classes)
            record.append(
                {
                    "file": fname,
                    "url": url,
                    "md5": md5 or _md5(path),
                    "md5_published": md5 is not None,
                    "action": action,
                    "dest": dest_name,
                    "count": n,
                }
            )
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "dataset": src.name,
                    "licence": src.licence,
                    "citation": src.citation,
                    "files": record,
                    "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                indent=1,
            )
        )
    if not keep_archives:
        # only the files this download wrote; the folders go only when nothing else is in them
        for path in fetched:
            path.unlink(missing_ok=True)
        for folder in (staging, root / STAGING):
            try:
                folder.rmdir()
            except OSError:
                pass
    log(f"{src.name} is complete in {final}. Use: {src.config_hint.format(path=final)}")
    return final
