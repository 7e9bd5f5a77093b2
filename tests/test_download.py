"""`diffmic data download` against a local HTTP server on 127.0.0.1 (Range support, fake archives):
layout, checksums, a corrupted and an interrupted download, offline errors, manual data sets."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from diffmic.cli import main
from diffmic.data import download as dl
from diffmic.data.sources import load_ham10000, load_medmnist

IMAGE_IDS = [f"ISIC_{24306 + i:07d}" for i in range(6)]
DX = ["nv", "mel", "nv", "bkl", "bcc", "nv"]


class FakeServer:
    """Serves ``routes`` (path with query -> bytes); honours ``Range: bytes=N-``. A path in
    ``truncate_once`` is answered once with the full Content-Length but only half of the body."""

    def __init__(self) -> None:
        self.routes: dict[str, bytes] = {}
        self.truncate_once: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                outer.requests.append((self.path, rng))
                body = outer.routes.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if rng and rng.startswith("bytes="):
                    start = int(rng[6:].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                payload = body[start:]
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.path in outer.truncate_once:
                    outer.truncate_once.discard(self.path)
                    self.wfile.write(payload[: len(payload) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _ham_routes(server: FakeServer, bad_md5_for: str | None = None) -> dict[str, bytes]:
    """A fake Dataverse data set + DiffMIC split pickles, at the real paths below the mirror."""
    big = bytes(range(256)) * 400  # ~100 KB of padding so that half a file is a real partial download
    part1 = _zip({f"{i}.jpg": f"jpeg {i}".encode() + big for i in IMAGE_IDS[:3]} | {"readme.txt": b"x"})
    part2 = _zip({f"HAM10000_images_part_2/{i}.jpg": f"jpeg {i}".encode() for i in IMAGE_IDS[3:]})
    masks = _zip({f"HAM10000_segmentations_lesion_tschandl/{i}_segmentation.png": b"png" for i in IMAGE_IDS})
    # Dataverse ingests CSVs into tab-separated tables; the file we get may be either
    meta = "lesion_id\timage_id\tdx\tdx_type\tage\tsex\tlocalization\n" + "".join(
        f"HAM_{k // 2:07d}\t{i}\t{d}\thisto\t50.0\tmale\tback\n" for k, (i, d) in enumerate(zip(IMAGE_IDS, DX))
    )
    files = {
        101: ("HAM10000_metadata.tab", meta.encode(), "HAM10000_metadata.csv"),
        102: ("HAM10000_images_part_1.zip", part1, None),
        103: ("HAM10000_images_part_2.zip", part2, None),
        104: ("HAM10000_segmentations_lesion_tschandl.zip", masks, None),
    }
    listing = []
    for fid, (name, body, original) in files.items():
        df = {"id": fid, "filename": name, "checksum": {"type": "MD5", "value": _md5(body)}}
        if name == bad_md5_for:
            df["checksum"]["value"] = "0" * 32
        if original:
            df["originalFileFormat"] = "text/csv"
            df["originalFileName"] = original
        listing.append({"label": name, "dataFile": df})
        path = f"/dataverse.harvard.edu/api/access/datafile/{fid}" + ("?format=original" if original else "")
        server.routes[path] = body
    server.routes[
        "/dataverse.harvard.edu/api/datasets/:persistentId/versions/:latest-published/files"
        "?persistentId=doi:10.7910/DVN/DBW86T"
    ] = json.dumps({"status": "OK", "data": listing}).encode()
    # the released split pickles must have 7011 / 3004 entries (their real sizes)
    repo = "/raw.githubusercontent.com/scott-yjyang/DiffMIC/ae42dc7506bed03790eeb97fe242223235a75d5e"
    for part, n in (("train", 7011), ("test", 3004)):
        entries = [{"img_root": f"./dataset/isic2018/images/ISIC_{k:07d}.jpg", "label": k % 7} for k in range(n)]
        server.routes[f"{repo}/dataset/isic2018/isic2018_{part}.pkl"] = pickle.dumps(entries, protocol=4)
    return {name: body for name, body, _ in files.values()}


def test_ham10000_download_layout_marker_and_loader(tmp_path):
    with FakeServer() as srv:
        bodies = _ham_routes(srv)
        out = dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
        assert out == tmp_path / "ham10000"
        assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == IMAGE_IDS
        assert not (out / "images" / "readme.txt").exists()
        assert (out / "images" / f"{IMAGE_IDS[0]}.jpg").read_bytes().startswith(f"jpeg {IMAGE_IDS[0]}".encode())
        assert sorted(p.name for p in (out / "masks").iterdir()) == [f"{i}_segmentation.png" for i in IMAGE_IDS]
        marker = json.loads((out / dl.MARKER).read_text())
        by_file = {r["file"]: r for r in marker["files"]}
        assert by_file["HAM10000_images_part_1.zip"]["md5"] == _md5(bodies["HAM10000_images_part_1.zip"])
        assert by_file["HAM10000_images_part_1.zip"]["md5_published"] is True
        assert by_file["isic2018_train.pkl"]["md5_published"] is False
        assert by_file["HAM10000_metadata.csv"]["md5_published"] is False  # ingested table: checked by content
        # no temporary folder or archive left behind
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ham10000"]
        # the tab-separated table became the comma-separated CSV the loader reads
        header = (out / "HAM10000_metadata.csv").read_text().splitlines()[0]
        assert header == "lesion_id,image_id,dx,dx_type,age,sex,localization"
        idx = load_ham10000(out, split="authors")
        assert (len(idx["train"]), len(idx["test"])) == (7011, 3004)
        assert idx["train"].records[8].label == 8 % 7  # label column from the pickle
        lesion = load_ham10000(out, split="lesion", test_fraction=0.5)
        assert sum(len(v) for v in lesion.values()) == 6
        # a second call sees the marker and downloads nothing
        n = len(srv.requests)
        assert dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None) == out
        assert len(srv.requests) == n


def test_corrupted_download_is_deleted_and_nothing_is_complete(tmp_path):
    with FakeServer() as srv:
        _ham_routes(srv, bad_md5_for="HAM10000_images_part_2.zip")
        with pytest.raises(dl.DownloadError, match="checksum mismatch"):
            dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
    assert not (tmp_path / "ham10000").exists()
    assert not dl.is_complete(tmp_path / "ham10000")
    staging = tmp_path / dl.STAGING / "ham10000"
    assert not (staging / "HAM10000_images_part_2.zip.part").exists()
    assert not (staging / "HAM10000_images_part_2.zip").exists()
    assert (staging / "HAM10000_images_part_1.zip").is_file()  # verified files are kept for the retry
    assert not list(tmp_path.glob(".ham10000.tmp-*"))


def test_interrupted_download_resumes_with_range(tmp_path):
    with FakeServer() as srv:
        bodies = _ham_routes(srv)
        path = "/dataverse.harvard.edu/api/access/datafile/102"
        srv.truncate_once.add(path)
        with pytest.raises(dl.DownloadError, match="interrupted"):
            dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
        assert not (tmp_path / "ham10000").exists()
        part = tmp_path / dl.STAGING / "ham10000" / "HAM10000_images_part_1.zip.part"
        got = part.stat().st_size
        full = bodies["HAM10000_images_part_1.zip"]
        assert 0 < got < len(full) and part.read_bytes() == full[:got]
        out = dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
        assert (path, f"bytes={got}-") in srv.requests  # resumed, not restarted
        assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == IMAGE_IDS
        assert dl.is_complete(out)


def test_fetch_file_restarts_when_server_ignores_range(tmp_path):
    body = bytes(range(256)) * 64
    with FakeServer() as srv:
        srv.routes["/f.bin"] = body
        dest = tmp_path / "f.bin"
        (tmp_path / "f.bin.part").write_bytes(b"garbage-that-is-not-a-prefix")
        # a server that answers 200 to a Range request: the file must start again from byte 0
        orig = dl._open
        dl_open_calls = []

        def no_range(url, start=0, timeout=60.0):
            dl_open_calls.append(start)
            return orig(url, 0, timeout)

        dl._open, saved = no_range, dl._open
        try:
            dl.fetch_file(f"{srv.url}/f.bin", dest, _md5(body), progress=False)
        finally:
            dl._open = saved
        assert dl_open_calls == [len(b"garbage-that-is-not-a-prefix")]
        assert dest.read_bytes() == body and not (tmp_path / "f.bin.part").exists()


def test_offline_error_says_what_to_download_and_cli_exits_2(tmp_path, capsys):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there: like being offline
    with pytest.raises(dl.DownloadError) as ei:
        dl.download_dataset(
            "breastmnist", tmp_path, mirror=f"http://127.0.0.1:{port}", progress=False, log=lambda s: None
        )
    msg = str(ei.value)
    assert "offline" in msg and "zenodo.org/records/10519652/files/breastmnist.npz" in msg
    assert "750601b1f35ba3300ea97c75c52ff8f6" in msg and "breastmnist/breastmnist.npz" in msg
    rc = main(
        [
            "data",
            "download",
            "ham10000",
            "--root",
            str(tmp_path),
            "--mirror",
            f"http://127.0.0.1:{port}",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "doi.org/10.7910/DVN/DBW86T" in err and "HAM10000_images_part_1.zip" in err
    assert not (tmp_path / "ham10000").exists()


def _fake_npz() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    arrays = {}
    for s, n in (("train", 6), ("val", 2), ("test", 4)):
        arrays[f"{s}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{s}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_medmnist_checksum_from_the_published_table(tmp_path, monkeypatch):
    body = _fake_npz()
    with FakeServer() as srv:
        srv.routes["/zenodo.org/records/10519652/files/breastmnist.npz?download=1"] = body
        # the real published MD5 does not match our fake file: refused, nothing complete
        with pytest.raises(dl.DownloadError, match="750601b1f35ba3300ea97c75c52ff8f6"):
            dl.download_dataset("breastmnist", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
        assert not (tmp_path / "breastmnist").exists()
        # with the table entry's MD5 set to the fake file's, it is accepted and laid out
        src = dl.SOURCES["breastmnist"]
        f = dataclasses.replace(src.files[0], md5=_md5(body))
        monkeypatch.setitem(dl.SOURCES, "breastmnist", dataclasses.replace(src, files=(f,)))
        rc = main(["data", "download", "breastmnist", "--root", str(tmp_path), "--mirror", srv.url, "--no-progress"])
        assert rc == 0
    npz = tmp_path / "breastmnist" / "breastmnist.npz"
    assert npz.read_bytes() == body and dl.is_complete(npz.parent)
    idx = load_medmnist(npz)
    assert [len(idx[s]) for s in ("train", "val", "test")] == [6, 2, 4]
    assert idx["train"].class_names == ["malignant", "normal, benign"]


def test_aptos_prints_where_to_get_it(tmp_path, capsys):
    rc = main(["data", "download", "aptos2019", "--root", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "kaggle.com/competitions/aptos2019-blindness-detection" in err
    assert f"{tmp_path}/aptos2019/train_images/<id_code>.png" in err and "train.csv" in err
    assert "diffmic data download aptos2019_splits" in err


def test_aptos_split_lists_are_downloaded_for_the_loader(tmp_path):
    repo = "/raw.githubusercontent.com/scott-yjyang/DiffMIC/ae42dc7506bed03790eeb97fe242223235a75d5e"
    with FakeServer() as srv:
        for part, n in (("train", 2564), ("test", 1098)):
            entries = [{"img_root": f"./dataset/aptos/train/{k:012x}.png", "label": k % 5} for k in range(n)]
            srv.routes[f"{repo}/dataset/aptos/aptos_{part}.pkl"] = pickle.dumps(entries, protocol=4)
        out = dl.download_dataset("aptos2019_splits", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
    aptos = tmp_path / "aptos2019"
    (aptos / "splits").mkdir(parents=True)
    for f in out.glob("diffmic_*.csv"):
        (aptos / "splits" / f.name).write_bytes(f.read_bytes())
    from diffmic.data.sources import load_aptos2019

    idx = load_aptos2019(aptos, split="authors")
    assert (len(idx["train"]), len(idx["test"])) == (2564, 1098)
    assert idx["train"].records[7].id == f"{7:012x}" and idx["train"].records[7].label == 2


def test_existing_folder_without_marker_is_left_alone(tmp_path, capsys):
    (tmp_path / "ham10000").mkdir()
    (tmp_path / "ham10000" / "mine.txt").write_text("keep")
    rc = main(["data", "download", "ham10000", "--root", str(tmp_path), "--mirror", "http://127.0.0.1:9"])
    err = capsys.readouterr().err
    assert rc == 2 and "not written by 'diffmic data download'" in err
    assert (tmp_path / "ham10000" / "mine.txt").read_text() == "keep"


def test_unknown_name_lists_the_available_ones(tmp_path, capsys):
    assert main(["data", "download", "imagenet", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ham10000" in err and "breastmnist_224" in err
    assert main(["data", "download", "--list"]) == 0
    assert "pneumoniamnist" in capsys.readouterr().out


def test_every_medmnist_entry_uses_the_published_md5():
    # independent of the table: the MD5s the medmnist package publishes for these files (info.py)
    published = {
        "breastmnist": "750601b1f35ba3300ea97c75c52ff8f6",
        "breastmnist_224": "b56378a6eefa9fed602bb16d192d4c8b",
        "pneumoniamnist": "28209eda62fecd6e6a2d98b1501bb15f",
        "dermamnist_64": "b70a2f5635c6199aeaa28c31d7202e1f",
    }
    for name, md5 in published.items():
        (f,) = dl.SOURCES[name].files
        assert f.md5 == md5 and f.url == f"https://zenodo.org/records/10519652/files/{name}.npz?download=1"


# ---------------------------------------------------------------------------------------------
# Issue 21.1: names in a listing are data, never paths


def _tamper_listing(srv: FakeServer, fid: int, **fields) -> None:
    """Change (or with value None remove) fields of file ``fid``'s ``dataFile`` in the served listing."""
    key = (
        "/dataverse.harvard.edu/api/datasets/:persistentId/versions/:latest-published/files"
        "?persistentId=doi:10.7910/DVN/DBW86T"
    )
    obj = json.loads(srv.routes[key])
    for entry in obj["data"]:
        if entry["dataFile"]["id"] == fid:
            for k, v in fields.items():
                if v is None:
                    entry["dataFile"].pop(k, None)
                else:
                    entry["dataFile"][k] = v
    srv.routes[key] = json.dumps(obj).encode()


def _files_under(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", ["traversal", "backslashes", "absolute_with_md5", "absolute_without_md5"])
def test_listing_file_names_never_reach_outside_the_staging_folder(tmp_path, case):
    root = tmp_path / "a" / "b" / "root"
    root.mkdir(parents=True)
    victim = tmp_path / "victim.zip"
    victim.write_bytes(b"the user's own file")
    before = _files_under(tmp_path)
    with FakeServer() as srv:
        bodies = _ham_routes(srv)
        name = {
            "traversal": "../../../escaped.zip",
            "backslashes": "..\\..\\..\\escaped.zip",
            "absolute_with_md5": str(victim),
            "absolute_without_md5": str(victim),
        }[case]
        _tamper_listing(srv, 102, filename=name)  # matched by its label, HAM10000_images_part_1.zip
        if case == "absolute_without_md5":
            _tamper_listing(srv, 102, checksum=None)
        out = dl.download_dataset("ham10000", root, mirror=srv.url, progress=False, log=lambda s: None)
    # the file was fetched under its base name inside the staging folder, and used from there
    assert sorted(p.stem for p in (out / "images").glob("*.jpg")) == IMAGE_IDS
    marker = json.loads((out / dl.MARKER).read_text())
    base = "victim.zip" if case.startswith("absolute") else "escaped.zip"
    assert base in {r["file"] for r in marker["files"]}
    assert bodies["HAM10000_images_part_1.zip"]  # served
    # nothing outside root was written, overwritten or deleted
    after = {k: v for k, v in _files_under(tmp_path).items() if not k.startswith("a/b/root/")}
    assert after == before
    assert victim.read_bytes() == b"the user's own file"


@pytest.mark.parametrize("bad", ["..", ".", "/", "a/..", ".hidden.zip", "a\x00b.zip", "x" * 300 + ".zip"])
def test_unusable_listing_names_are_refused(tmp_path, capsys, bad):
    with FakeServer() as srv:
        _ham_routes(srv)
        _tamper_listing(srv, 102, filename=bad)
        rc = main(["data", "download", "ham10000", "--root", str(tmp_path), "--mirror", srv.url, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "not a plain file name" in err and "HAM10000_images_part_1.zip" in err
    assert not (tmp_path / "ham10000").exists()


def test_listing_with_a_non_numeric_file_id_or_two_files_of_one_name_is_refused(tmp_path):
    with FakeServer() as srv:
        _ham_routes(srv)
        _tamper_listing(srv, 102, id="../../admin")
        with pytest.raises(dl.DownloadError, match="file id"):
            dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
    with FakeServer() as srv:
        _ham_routes(srv)
        _tamper_listing(srv, 103, filename="x/HAM10000_images_part_1.zip")  # same base name as file 102
        with pytest.raises(dl.DownloadError, match="two files named 'HAM10000_images_part_1.zip'"):
            dl.download_dataset("ham10000", tmp_path / "r2", mirror=srv.url, progress=False, log=lambda s: None)


def test_download_deletes_only_files_it_created(tmp_path):
    import os

    staging = tmp_path / dl.STAGING / "ham10000"
    staging.mkdir(parents=True)
    (staging / "notes.txt").write_text("mine")
    stale = tmp_path / f".ham10000.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "keep.txt").write_text("mine too")
    with FakeServer() as srv:
        _ham_routes(srv)
        out = dl.download_dataset("ham10000", tmp_path, mirror=srv.url, progress=False, log=lambda s: None)
    assert dl.is_complete(out)
    assert (staging / "notes.txt").read_text() == "mine"
    assert (stale / "keep.txt").read_text() == "mine too"
    assert not list(staging.glob("*.zip")) and not list(staging.glob("*.pkl"))  # our own files are removed
