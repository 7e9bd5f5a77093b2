"""What ``diffmic data download`` fetches: the description of a data set's files (standard library
only). A data set's downloads are part of its entry in :data:`diffmic.data.sources.REGISTRY`;
:mod:`diffmic.data.download` fetches and unpacks them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DataverseFile", "DownloadSource", "ManualSource", "RemoteFile"]


@dataclass(frozen=True)
class RemoteFile:
    """One file at a fixed URL. ``md5=None``: the source publishes no checksum (see docs)."""

    url: str
    filename: str
    md5: str | None = None
    action: str = "copy"  # copy | unzip_jpg | unzip_png | pkl_split
    dest: str = ""  # path inside the data-set folder (file for copy/pkl_split, folder for unzip_*)
    expect_rows: int | None = None  # pkl_split: number of rows the split must have
    id_col: str = "image_id"  # pkl_split: id column of the CSV written (HAM10000 image_id, APTOS id_code)
    classes: tuple[str, ...] = ()  # pkl_split: the class names written next to the labels


@dataclass(frozen=True)
class DataverseFile:
    """A file of a Harvard Dataverse data set, found by name in the data set's file listing
    (``/api/datasets/:persistentId/versions/:latest-published/files``), which also gives its MD5."""

    match: str  # file name (compared case-insensitively, ignoring '_', '-', '.' and the extension)
    action: str = "copy"  # copy | metadata_csv | unzip_jpg | unzip_png
    dest: str = ""


@dataclass(frozen=True)
class DownloadSource:
    name: str
    description: str
    licence: str
    citation: str
    approx_size: str
    files: Sequence[RemoteFile] = ()
    dataverse_server: str | None = None
    dataverse_doi: str | None = None
    dataverse_files: Sequence[DataverseFile] = ()
    layout: str = ""
    config_hint: str = ""  # how to point a config at the result ('{path}' is the data-set folder)


@dataclass(frozen=True)
class ManualSource:
    """A data set that cannot be downloaded automatically: ``message`` says how to get it
    (``{root}``: the ``--root`` folder)."""

    name: str
    message: str
