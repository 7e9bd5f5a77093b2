"""DICOM input (issue 26 §1): pixels a DICOM file holds become the 8-bit image a viewer shows,
checked on generated files with hand-worked pixels and on the files pydicom ships; bad files give
errors naming the file; patient identifiers never reach a run folder, a report, a CSV or the page.
"""

from __future__ import annotations

import importlib
import io
import os
from pathlib import Path

import numpy as np
import pytest

from diffmic.data.dicom import DICOM_EXTENSIONS, is_dicom
from diffmic.data.records import DataError
from diffmic.data.transforms import decode_image, open_image


def _need(module: str):
    """An optional package of the ``dicom`` / ``test`` extras: skipped where absent, a failure under
    ``CI=true`` (where the test extra installs it)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{module} is not installed (CI=true: the test extra installs it)")
        pytest.skip(f"{module} is not installed (pip install 'diffmic[dicom]')")


pydicom = _need("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid  # noqa: E402

#: identifiers written into every generated file: none may appear in anything diffmic writes or prints
PATIENT = {
    "PatientName": "Qzyxwv^Jorbtrude",
    "PatientID": "PID-97531-QZX",
    "PatientBirthDate": "19230417",
    "StudyDate": "20240229",
    "AccessionNumber": "ACC8642097",
    "InstitutionName": "Hospital of Quuxville",
    "ReferringPhysicianName": "Drplonk^Ebenezer",
}


def dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    *,
    slope: float | None = None,
    intercept: float | None = None,
    center: float | None = None,
    width: float | None = None,
    voi_lut: tuple[list[int], list[int]] | None = None,
    patient: bool = True,
) -> bytes:
    """A DICOM Part-10 file (explicit VR little endian) holding ``pixels`` as stored values."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    if patient:
        for k, v in PATIENT.items():
            setattr(ds, k, v)
    bits = bits_stored or 8 * pixels.dtype.itemsize
    ds.set_pixel_data(pixels, photometric, bits)
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0
    if center is not None:
        ds.WindowCenter, ds.WindowWidth = center, width
    if voi_lut is not None:
        item = Dataset()
        item.add_new(0x00283002, "US", voi_lut[0])  # LUT Descriptor: entries, first value mapped, bits
        item.add_new(0x00283006, "US", voi_lut[1])  # LUT Data
        ds.VOILUTSequence = [item]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def pixels_of(src) -> np.ndarray:
    with open_image(src) as img:
        return np.asarray(img)


def shipped(name: str) -> str:
    p = get_testdata_file(name, download=False)
    if p is None:  # pragma: no cover - the files below ship inside the pydicom wheel
        pytest.fail(f"pydicom's test file {name} is not installed")
    return str(p)


# ------------------------------------------------------------------------------ generated pixels

# modality values (HU-like) and their 8-bit rendering under window centre 0 / width 401 (LINEAR,
# PS3.3 C.11.2.1.2.1), worked by hand: ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped to 0..255
# -1000 -> 0; -100 -> 0.25125 * 255 = 64.07 -> 64; 0 -> 0.50125 * 255 = 127.82 -> 128;
# 100 -> 0.75125 * 255 = 191.57 -> 192; 150 -> 0.87625 * 255 = 223.44 -> 223; 3000 -> 255
WINDOW_VALUES = np.array([[-1000, -100, 0], [100, 150, 3000]])
WINDOW_EXPECTED = np.array([[0, 64, 128], [192, 223, 255]], dtype=np.uint8)


def test_window_centre_width_on_signed_pixels(tmp_path):
    p = write(tmp_path / "signed.dcm", dicom_bytes(WINDOW_VALUES.astype(np.int16), center=0, width=401))
    np.testing.assert_array_equal(pixels_of(p), WINDOW_EXPECTED)


def test_rescale_slope_intercept_then_window(tmp_path):
    """Unsigned 16-bit stored values s with slope 2, intercept -1024: x = 2 s - 1024 gives the same
    modality values, hence the same image."""
    stored = ((WINDOW_VALUES + 1024) // 2).astype(np.uint16)
    assert (2 * stored.astype(int) - 1024 == WINDOW_VALUES).all()
    p = write(tmp_path / "rescaled.dcm", dicom_bytes(stored, slope=2, intercept=-1024, center=0, width=401))
    np.testing.assert_array_equal(pixels_of(p), WINDOW_EXPECTED)


def test_voi_lut_sequence_wins_over_the_window(tmp_path):
    """A 16-bit VOI LUT of 4 entries starting at 0: 0, 1000, 30000, 65535 (inputs past the end take
    the last entry), scaled by 255 / 65535: 0, 3.89 -> 4, 116.7 -> 117, 255, 255."""
    stored = np.array([[0, 1, 2], [3, 7, 0]], dtype=np.uint16)
    data = dicom_bytes(stored, center=1, width=1, voi_lut=([4, 0, 16], [0, 1000, 30000, 65535]))
    np.testing.assert_array_equal(pixels_of(data), [[0, 4, 117], [255, 255, 0]])


@pytest.mark.parametrize(
    ("stored", "bits", "expected"),
    [
        # no window: the image's minimum..maximum -> 0..255: (x - 10) * 255 / 100
        (np.array([[10, 35, 110]], dtype=np.uint8), 8, [[0, 64, 255]]),
        # 16-bit: (x - 0) * 255 / 4000: 1000 -> 63.75 -> 64
        (np.array([[0, 1000, 4000]], dtype=np.uint16), 12, [[0, 64, 255]]),
        # signed: (x + 500) * 255 / 1000: 0 -> 127.5 -> 128 (half to even), 250 -> 191.25 -> 191
        (np.array([[-500, 0, 250, 500]], dtype=np.int16), 16, [[0, 128, 191, 255]]),
    ],
)
def test_no_window_spans_the_image_range(tmp_path, stored, bits, expected):
    p = write(tmp_path / "plain.dcm", dicom_bytes(stored, bits_stored=bits))
    np.testing.assert_array_equal(pixels_of(p), expected)


def test_monochrome1_is_inverted(tmp_path):
    """MONOCHROME1 shows low values white: 10, 35, 110 -> 255 - (0, 64, 255)."""
    stored = np.array([[10, 35, 110]], dtype=np.uint8)
    np.testing.assert_array_equal(pixels_of(dicom_bytes(stored, "MONOCHROME1")), [[255, 191, 0]])


def test_16_bit_colour_scaled_by_bits_stored(tmp_path):
    """RGB with 12 bits stored: x * 255 / 4095: 2048 -> 127.53 -> 128."""
    rgb = np.array([[[0, 4095, 2048], [4095, 0, 0]]], dtype=np.uint16)
    out = pixels_of(dicom_bytes(rgb, "RGB", 12))
    np.testing.assert_array_equal(out, [[[0, 255, 128], [255, 0, 0]]])


def test_decode_image_reads_a_file_its_bytes_and_an_extensionless_copy_alike(tmp_path):
    """decode_image (training, predict, serve) gives the same model input from the path, the bytes
    (an upload) and a PACS-style file without suffix."""
    rng = np.random.default_rng(0)
    stored = rng.integers(0, 4096, (48, 40)).astype(np.uint16)
    data = dicom_bytes(stored, bits_stored=12, center=2000, width=3000)
    a = write(tmp_path / "a.dcm", data)
    b = write(tmp_path / "IM000001", data)
    assert is_dicom(a) and is_dicom(b) and is_dicom(data)
    assert not is_dicom(tmp_path / "missing.png") and not is_dicom(b"\x89PNG" + bytes(200))
    ref = decode_image(a, 32, 1)
    assert ref.shape == (32, 32, 1)
    np.testing.assert_array_equal(decode_image(data, 32, 1), ref)
    np.testing.assert_array_equal(decode_image(b, 32, 1), ref)
    # the same 8-bit image saved as PNG decodes to the same model input: DICOM only changes the reading
    png = tmp_path / "same.png"
    from PIL import Image

    Image.fromarray(pixels_of(a)).save(png)
    np.testing.assert_array_equal(decode_image(png, 32, 3), decode_image(a, 32, 3))


def test_a_bare_data_set_without_preamble_is_read(tmp_path):
    """Older archives hold data sets without the Part-10 preamble and file meta (implicit VR)."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.array([[10, 35, 110]], dtype=np.uint8))))
    del ds.file_meta
    ds.preamble = None
    p = tmp_path / "bare.dcm"
    ds.save_as(p, implicit_vr=True, little_endian=True)
    assert p.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(pixels_of(p), [[0, 64, 255]])


def test_size_is_checked_from_the_header_before_the_pixels_are_read(tmp_path):
    """A header claiming 20000 x 20000 pixels (400 MP) over a few bytes of pixel data is refused by
    the pixel-count bound: reading its pixel data would fail otherwise ("less than expected")."""
    data = dicom_bytes(np.zeros((4, 4), dtype=np.uint8))
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.Rows = ds.Columns = 20000
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DataError, match=r"400\.0 MP exceeds the 100 MP limit"):
        decode_image(buf.getvalue(), 32)
    ds.Rows, ds.Columns = 4, 400  # aspect ratio 100:1
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(DataError, match="aspect ratio of 100:1"):
        decode_image(buf.getvalue(), 32)


def test_bad_dicom_files_name_the_file(tmp_path):
    not_dicom = write(tmp_path / "scan.dcm", b"\x89PNG\r\n" + bytes(300))
    with pytest.raises(DataError, match=r"scan\.dcm: not a readable DICOM file"):
        decode_image(not_dicom, 32)
    with pytest.raises(DataError, match=r"rtplan\.dcm: a DICOM file without an image .*modality RTPLAN"):
        decode_image(shipped("rtplan.dcm"), 32)
    with pytest.raises(DataError, match=r"MR_truncated\.dcm: cannot decode the DICOM pixel data"):
        decode_image(shipped("MR_truncated.dcm"), 32)


def test_multi_frame_is_refused_with_a_message():
    """examples_ybr_color.dcm: a 30-frame ultrasound cine loop (JPEG baseline)."""
    with pytest.raises(DataError, match=r"examples_ybr_color\.dcm: a multi-frame DICOM file \(30 frames"):
        decode_image(shipped("examples_ybr_color.dcm"), 32)


def test_a_transfer_syntax_without_a_handler_says_what_is_missing(tmp_path):
    """MPEG-2 video: no pydicom handler decodes it; the error names the file and the syntax."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(np.zeros((8, 8), dtype=np.uint8))))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    p = tmp_path / "clip.dcm"
    ds.save_as(p)
    with pytest.raises(
        DataError, match=r"clip\.dcm: cannot decode .*MPEG2 Main Profile.*pip install 'diffmic\[dicom\]'"
    ):
        decode_image(p, 32)


# ------------------------------------------------------------------------------ pydicom's files


def _window(values: np.ndarray, c: float, w: float) -> np.ndarray:
    """The LINEAR window of PS3.3 C.11.2.1.2.1 to 0..255, written out (independent of pydicom)."""
    lin = ((values - (c - 0.5)) / (w - 1) + 0.5) * 255
    return np.clip(np.rint(lin), 0, 255).astype(np.uint8)


def test_mr_small_is_windowed_by_its_centre_and_width():
    """MR_small.dcm: signed 16-bit, window 600 / 1600, no rescale."""
    ds = pydicom.dcmread(shipped("MR_small.dcm"))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600, 1600) and "RescaleSlope" not in ds
    np.testing.assert_array_equal(pixels_of(shipped("MR_small.dcm")), _window(ds.pixel_array.astype(float), 600, 1600))


def test_ct_small_in_hounsfield_units_spans_its_range():
    """CT_small.dcm: slope 1, intercept -1024 and no window: HU minimum..maximum -> 0..255."""
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint((hu - hu.min()) * 255 / (hu.max() - hu.min())).astype(np.uint8)
    np.testing.assert_array_equal(pixels_of(shipped("CT_small.dcm")), expected)


def test_ct_small_as_monochrome1_is_its_negative(tmp_path):
    ds = pydicom.dcmread(shipped("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "ct_m1.dcm")
    np.testing.assert_array_equal(pixels_of(tmp_path / "ct_m1.dcm"), 255 - pixels_of(shipped("CT_small.dcm")))


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_encodings_of_mr_small_give_its_pixels(name):
    """RLE, big endian and JPEG 2000 lossless (through Pillow) copies decode to MR_small exactly."""
    np.testing.assert_array_equal(pixels_of(shipped(name)), pixels_of(shipped("MR_small.dcm")))


def test_ultrasound_rgb_and_palette():
    """examples_rgb_color.dcm (US, RGB) is read as stored; examples_palette.dcm (US, PALETTE COLOR,
    16-bit palette) through its palette, scaled by 255 / 65535; examples_jpeg2k.dcm (US, JPEG 2000,
    YBR_RCT) is an RGB image of its size."""
    ds = pydicom.dcmread(shipped("examples_rgb_color.dcm"))
    np.testing.assert_array_equal(pixels_of(shipped("examples_rgb_color.dcm")), ds.pixel_array)
    ds = pydicom.dcmread(shipped("examples_palette.dcm"))
    lut = np.stack(
        [np.frombuffer(ds[f"{c}PaletteColorLookupTableData"].value, dtype="<u2") for c in ("Red", "Green", "Blue")],
        -1,
    )
    assert ds.RedPaletteColorLookupTableDescriptor[1] == 0  # first stored value mapped: 0
    expected = np.rint(lut[ds.pixel_array].astype(float) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(pixels_of(shipped("examples_palette.dcm")), expected)
    j2k = pixels_of(shipped("examples_jpeg2k.dcm"))
    assert j2k.shape == (480, 640, 3) and j2k.dtype == np.uint8


def test_jpeg_baseline_matches_the_lossless_copy():
    """SC_rgb_jpeg_dcmtk.dcm (JPEG baseline, YBR_FULL) against SC_rgb_rle.dcm (RLE lossless, RGB) of the
    same picture: close (lossy), and far closer than without the YBR -> RGB conversion."""
    jpeg = pixels_of(shipped("SC_rgb_jpeg_dcmtk.dcm")).astype(int)
    rle = pixels_of(shipped("SC_rgb_rle.dcm")).astype(int)
    assert jpeg.shape == rle.shape == (100, 100, 3)
    assert np.abs(jpeg - rle).mean() < 3
    ds = pydicom.dcmread(shipped("SC_rgb_jpeg_dcmtk.dcm"))
    raw = pydicom.pixels.pixel_array(ds, as_rgb=False).astype(int)  # still YBR
    assert np.abs(raw - rle).mean() > 20


def test_jpeg_lossless_needs_pylibjpeg_or_says_so():
    """SC_rgb_jpeg_gdcm.dcm (JPEG lossless, process 14): with pylibjpeg the RLE copy's pixels exactly;
    without, an error naming the file and what to install."""
    name = "SC_rgb_jpeg_gdcm.dcm"
    try:
        importlib.import_module("libjpeg")
    except ImportError:
        with pytest.raises(DataError, match=rf"{name}: cannot decode .*pylibjpeg.*pip install 'diffmic\[dicom\]'"):
            pixels_of(shipped(name))
        return
    np.testing.assert_array_equal(pixels_of(shipped(name)), pixels_of(shipped("SC_rgb_rle.dcm")))


def test_a_file_no_installed_handler_decodes_names_the_handlers():
    """JPEG-lossy.dcm: 12-bit JPEG Extended; Pillow cannot decode it (and pylibjpeg rejects this file):
    the message names the file and the transfer syntax, and what each handler said."""
    with pytest.raises(DataError) as info:
        pixels_of(shipped("JPEG-lossy.dcm"))
    text = str(info.value)
    assert "JPEG-lossy.dcm: cannot decode the DICOM pixel data (transfer syntax JPEG Extended" in text
    assert "pillow" in text.lower()


# ------------------------------------------------------------------------------ loaders and the cache


def test_class_folders_and_csv_lists_read_dicom(tmp_path):
    from diffmic.data.sources import IMAGE_EXTENSIONS, load_csv_manifest, load_image_folder

    assert set(DICOM_EXTENSIONS) <= set(IMAGE_EXTENSIONS)
    ramp = np.arange(64, dtype=np.uint8).reshape(8, 8)
    write(tmp_path / "f" / "a" / "x.dcm", dicom_bytes(ramp))
    write(tmp_path / "f" / "b" / "y.DCM", dicom_bytes(ramp.T.copy()))
    idx = load_image_folder(tmp_path / "f")["all"]
    assert sorted(r.id for r in idx.records) == ["a/x.dcm", "b/y.DCM"]
    (tmp_path / "list.csv").write_text("path,label\nf/a/x.dcm,a\nf/b/y.DCM,b\n")
    idx = load_csv_manifest(tmp_path / "list.csv")["all"]
    assert [r.id for r in idx.records] == ["f/a/x.dcm", "f/b/y.DCM"]
    from diffmic.data.checks import check_dataset

    report = check_dataset(idx, allow_empty_classes=True, duplicate_content="off")
    assert report.ok, report.summary()
    assert dict(report.modes) == {"L": 2}


def test_the_cache_key_follows_the_dicom_reader_version(tmp_path, monkeypatch):
    import diffmic.data.cache as cache
    from diffmic.data.sources import load_image_folder

    write(tmp_path / "d" / "a" / "x.dcm", dicom_bytes(np.full((8, 8), 5, np.uint8)))
    from PIL import Image

    (tmp_path / "p" / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 5, np.uint8)).save(tmp_path / "p" / "a" / "x.png")
    dcm, png = (load_image_folder(tmp_path / s)["all"] for s in ("d", "p"))
    before = cache.DecodedCache.key(dcm, 32), cache.DecodedCache.key(png, 32)
    monkeypatch.setattr(cache, "DICOM_READER_VERSION", cache.DICOM_READER_VERSION + 1)
    after = cache.DecodedCache.key(dcm, 32), cache.DecodedCache.key(png, 32)
    assert before[0] != after[0]  # DICOM pixels of another reader version: another cache file
    assert before[1] == after[1]  # other images keep their caches


# ------------------------------------------------------------------------------ patient identifiers


def dicom_class_folder(root: Path, per_class: int = 12, size: int = 40) -> Path:
    """``root/{dark,bright}/<class><i>.dcm``: 12-bit grey DICOM (window 2048 / 4096) with noise around
    800 (dark) or 3000 (bright), every file carrying the identifiers of :data:`PATIENT`."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "bright")):
        for i in range(per_class):
            px = np.clip(rng.normal(800 + 2200 * c, 300, (size, size)), 0, 4095).astype(np.uint16)
            write(root / name / f"{name}{i}.dcm", dicom_bytes(px, bits_stored=12, center=2048, width=4096))
    return root


def _post(url: str, name: str, data: bytes) -> str:
    import urllib.request
    import uuid

    b = uuid.uuid4().hex
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
            "Content-Type: application/dicom\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{b}--\r\n".encode()
    )
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.read().decode()


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_patient_identifiers_are_never_written(tmp_path, capsys):
    """fit, test, predict (CSV and explanations), report and a serve upload on DICOM files holding a
    patient's name, id, dates, accession number and institution: no byte of anything diffmic writes
    (run folder, logs, checkpoints, cache, CSV, PNGs, report) nor its output or the web page holds any
    of them. Record ids are the file paths."""
    import threading

    from diffmic.cli import main
    from diffmic.inference import Predictor
    from diffmic.inference.serve import make_server

    from _helpers import tiny_fit_args

    data = dicom_class_folder(tmp_path / "data")
    run, cache, out = tmp_path / "run", tmp_path / "cache", tmp_path / "out"
    assert main(tiny_fit_args(data, run, cache)) == 0
    assert main(["test", "--run", str(run)]) == 0
    preds, explain = out / "preds.csv", out / "explain"
    assert main(["predict", "--run", str(run), str(data), "--output", str(preds), "--explain", str(explain)]) == 0
    assert main(["report", str(run)]) == 0
    predictor = Predictor.load(run)
    server = make_server(predictor, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = _post(
            f"http://127.0.0.1:{server.server_address[1]}/", "scan.dcm", (data / "bright" / "bright0.dcm").read_bytes()
        )
    finally:
        server.shutdown()
        server.server_close()
    assert "id='pred-label'" in page and "scan.dcm" in page  # the upload was classified, under its file name
    import csv

    rows = list(csv.DictReader(run.joinpath("predictions.csv").open()))
    assert rows and all(r["id"].endswith(".dcm") and r["id"].split("/")[0] in ("dark", "bright") for r in rows)
    captured = capsys.readouterr()
    texts = {"stdout": captured.out.encode(), "stderr": captured.err.encode(), "page": page.encode()}
    files = [p for d in (run, cache, out) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "report.html" for p in files) and any(p.suffix == ".png" for p in explain.rglob("*"))
    texts.update({str(p): p.read_bytes() for p in files})
    needles = [v.lower().encode() for v in PATIENT.values()] + [
        part.lower().encode() for v in PATIENT.values() for part in v.split("^") if len(part) >= 6
    ]
    source = (data / "dark" / "dark0.dcm").read_bytes().lower()
    assert all(n in source for n in needles)  # the search finds them where they are
    leaks = [(where, n.decode()) for where, blob in texts.items() for n in needles if n in blob.lower()]
    assert not leaks, leaks
    assert len(files) > 10  # the check saw the run's files
