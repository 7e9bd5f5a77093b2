"""``diffmic serve``: the web page classifies an upload exactly as the Predictor does, and bad
uploads get a message while the server keeps serving. HTTP-level tests run everywhere; the
browser test drives headless Chromium (skipped without it, unless CI=true)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from diffmic.cli import main
from diffmic.inference import Predictor
from diffmic.inference.serve import make_server, parse_upload, safe_name

from _helpers import ONE_THREAD_ENV, one_thread, tiny_fit_args  # noqa: F401
from conftest import DARK_BRIGHT, write_synthetic_folder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained on generated dark/bright images: (run folder, image folder)."""
    tmp = tmp_path_factory.mktemp("serve")
    data = write_synthetic_folder(tmp / "data", (16, 16), 40, **DARK_BRIGHT)
    run = tmp / "run"
    assert main(tiny_fit_args(data, run, tmp / "cache")) == 0
    return run, data


@pytest.fixture(scope="module")
def server(trained):
    """The page served in this process on a free port, for HTTP-level tests."""
    run, _ = trained
    predictor = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt")
    srv = make_server(predictor, "127.0.0.1", 0, max_bytes=200_000)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()


def _multipart(name: str, data: bytes, field: str = "image") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def _post(url: str, name: str, data: bytes, field: str = "image") -> tuple[int, str]:
    body, ctype = _multipart(name, data, field)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _span(page: str, id_: str) -> str:
    m = re.search(rf"id='{id_}'[^>]*>([^<]*)<", page)
    assert m, page[:2000]
    return m.group(1)


def _probs(page: str) -> dict[str, float]:
    table = page.split("id='probs'", 1)[1].split("</table>", 1)[0]
    return {k: float(v) for k, v in re.findall(r"<tr><td>([^<]+)</td><td>([0-9.]+)</td>", table)}


def test_upload_is_classified_as_the_predictor_does(trained, server, monkeypatch):
    run, data = trained
    img = data / "bright" / "bright3.png"
    status, page = _post(server, img.name, img.read_bytes())
    assert status == 200
    # the Predictor on the same file, given by the same name (the name seeds the sampling noise)
    monkeypatch.chdir(img.parent)
    ref = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt").predict([img.name])[0]
    assert _span(page, "pred-label") == ref.label
    assert _span(page, "filename") == img.name
    shown = _probs(page)
    assert shown.keys() == ref.probs.keys()
    assert all(abs(shown[k] - ref.probs[k]) <= 5e-4 for k in shown), (shown, ref.probs)
    assert float(_span(page, "confidence")) == pytest.approx(ref.confidence, abs=5e-4)
    assert ("REFER" in _span(page, "refer")) == ref.refer
    assert "data:image/png;base64,iVBORw0KGgo" in page  # the overlay is an embedded PNG
    assert page.count("<li>y ") == len(ref.roi_boxes)


@pytest.mark.parametrize("case", ["text", "corrupt", "truncated", "empty", "huge", "wrong_field", "not_multipart"])
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(trained, server, case):
    _, data = trained
    good = (data / "dark" / "dark1.png").read_bytes()
    if case == "not_multipart":
        req = urllib.request.Request(
            server, data=b"x=1", method="POST", headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=60)
        status, page = err.value.code, err.value.read().decode()
    else:
        name, blob, field = {
            "text": ("notes.png", b"these are notes, not pixels\n" * 10, "image"),
            "corrupt": ("c.png", good[:40] + bytes(range(256)) * 4, "image"),
            "truncated": ("t.png", good[: len(good) // 2], "image"),
            "empty": ("e.png", b"", "image"),
            "huge": ("big.png", os.urandom(300_000), "image"),
            "wrong_field": ("dark1.png", good, "file"),
        }[case]
        status, page = _post(server, name, blob, field)
    expected = {
        "text": (400, "is not an image this server can read"),
        "corrupt": (400, "is not an image this server can read"),
        "truncated": (400, "truncated image"),
        "empty": (400, "the file is empty"),
        "huge": (413, "the file is too large (0.3 MB); this server accepts up to 0.2 MB"),
        "wrong_field": (400, "no image in the upload"),
        "not_multipart": (400, "multipart/form-data"),
    }[case]
    assert status == expected[0]
    assert expected[1] in _span(page, "error").replace("&#x27;", "'")
    status, page = _post(server, "dark1.png", good)  # still serving
    assert status == 200 and _span(page, "pred-label") in ("dark", "bright")


def test_upload_names_cannot_escape_the_work_folder():
    assert safe_name("../../etc/passwd") == "passwd"
    assert safe_name("C:\\Users\\x\\..\\lesion 1.jpg") == "lesion_1.jpg"
    assert safe_name("..") == "upload" and safe_name("") == "upload"
    body, ctype = _multipart("../a.png", b"123")
    assert parse_upload(ctype, body) == ("../a.png", b"123")


def test_serve_cli_errors_are_clear(tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve"]) == 2
    assert "serve needs --run" in capsys.readouterr().err


# ---------------------------------------------------------------------------- headless Chromium

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--window-size=1000,1500",
]


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or (
        "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").exists() else None
    )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        webdriver = None
    if not (chromium and driver and webdriver):
        why = f"headless browser test needs chromium ({chromium}), chromedriver ({driver}) and selenium"
        if os.environ.get("CI") == "true":
            pytest.fail(why + " (CI=true: install them, see docs/serving.md)")
        pytest.skip(why)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for f in CHROMIUM_FLAGS:
        opts.add_argument(f)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture
def cli_server(trained, tmp_path):
    """`diffmic serve --run RUN --port 0 --max-mb 0.2` in its own process; yields its URL."""
    run, _ = trained
    log = tmp_path / "serve.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffmic.cli", "serve", "--run", str(run), "--port", "0", "--max-mb", "0.2"],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=ONE_THREAD_ENV,
        )
    try:
        url = None
        for _ in range(1200):  # the model loads in seconds; a busy machine can take a minute
            m = re.search(r"on (http://127\.0\.0\.1:\d+/)", log.read_text())
            if m:
                url = m.group(1)
                break
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert url, log.read_text()
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_browser_upload_shows_the_predictors_class_and_survives_bad_files(trained, cli_server, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run, data = trained
    driver = _browser()
    try:

        def upload(path: Path) -> str:
            driver.get(cli_server)
            driver.find_element(By.ID, "image").send_keys(str(path))
            driver.find_element(By.ID, "submit").click()
            WebDriverWait(driver, 180).until(
                lambda d: d.find_elements(By.ID, "pred-label") or d.find_elements(By.ID, "error")
            )
            errors = driver.find_elements(By.ID, "error")
            return errors[0].text if errors else ""

        img = data / "dark" / "dark5.png"
        assert upload(img) == ""
        label = driver.find_element(By.ID, "pred-label").text
        overlay = driver.find_element(By.ID, "overlay")
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", overlay) > 100
        shot = tmp_path / "serve_result.png"
        driver.save_screenshot(str(shot))
        if os.environ.get("DIFFMIC_SCREENSHOT_DIR"):  # to look at it: DIFFMIC_SCREENSHOT_DIR=/tmp pytest ...
            shutil.copy(shot, Path(os.environ["DIFFMIC_SCREENSHOT_DIR"]) / shot.name)
        assert shot.stat().st_size > 10_000
        monkeypatch.chdir(img.parent)
        ref = Predictor.from_checkpoint(run / "checkpoints" / "best.ckpt").predict([img.name])[0]
        assert label == ref.label
        assert ("REFER" in driver.find_element(By.ID, "refer").text) == ref.refer

        bad = tmp_path / "notes.txt"
        bad.write_text("not an image\n" * 20)
        assert "is not an image this server can read" in upload(bad)
        huge = tmp_path / "huge.png"
        huge.write_bytes(os.urandom(300_000))
        assert "too large" in upload(huge)
        driver.save_screenshot(str(tmp_path / "serve_error.png"))
        if os.environ.get("DIFFMIC_SCREENSHOT_DIR"):
            shutil.copy(tmp_path / "serve_error.png", Path(os.environ["DIFFMIC_SCREENSHOT_DIR"]) / "serve_error.png")
        assert upload(img) == "" and driver.find_element(By.ID, "pred-label").text == ref.label  # still serving
    finally:
        driver.quit()


def _serve_once(predictor, img: Path) -> tuple[int, str]:
    """Serve ``predictor`` on a free port, upload ``img`` once, stop: (HTTP status, page)."""
    srv = make_server(predictor, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        return _post(f"http://127.0.0.1:{srv.server_address[1]}/", img.name, img.read_bytes())
    finally:
        srv.shutdown()
        srv.server_close()


def test_serves_an_exported_model_folder(trained, tmp_path, monkeypatch):
    """`diffmic serve --run MODEL_FOLDER` (written by `diffmic export`) answers as the Predictor
    loaded from that folder does."""
    from diffmic.inference.serve import load_predictor

    run, data = trained
    folder = tmp_path / "model"
    assert main(["export", "--run", str(run), "--out", str(folder)]) == 0
    predictor, what = load_predictor(str(folder), None, {})
    assert what == f"model folder {folder}"
    img = data / "bright" / "bright2.png"
    status, page = _serve_once(predictor, img)
    assert status == 200
    monkeypatch.chdir(img.parent)
    ref = Predictor.load(folder).predict([img.name])[0]
    assert _span(page, "pred-label") == ref.label
    assert all(abs(v - ref.probs[k]) <= 5e-4 for k, v in _probs(page).items())


@pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime") is None and os.environ.get("CI", "").lower() != "true",
    reason="onnxruntime not installed (pip install 'diffmic[onnx]'); required when CI=true",
)
def test_serves_a_model_folder_with_onnx_runtime(trained, tmp_path, monkeypatch):
    """`diffmic serve --run MODEL_FOLDER --backend onnx` answers as the ONNX-backed Predictor of that
    folder; `--backend onnx` with `--ckpt` is refused (ONNX graphs live in an exported folder)."""
    from diffmic.config import ConfigError
    from diffmic.inference.serve import load_predictor

    run, data = trained
    folder = tmp_path / "model"
    assert main(["export", "--run", str(run), "--out", str(folder), "--onnx"]) == 0
    predictor, what = load_predictor(str(folder), None, {}, backend="onnx")
    assert what == f"model folder {folder} (ONNX Runtime)"
    assert type(predictor.module.model).__name__ == "OnnxNetwork"
    img = data / "dark" / "dark1.png"
    status, page = _serve_once(predictor, img)
    assert status == 200
    monkeypatch.chdir(img.parent)
    ref = Predictor.load(folder, backend="onnx").predict([img.name])[0]
    assert _span(page, "pred-label") == ref.label
    assert all(abs(v - ref.probs[k]) <= 5e-4 for k, v in _probs(page).items())
    with pytest.raises(ConfigError, match="not --ckpt"):
        load_predictor(None, str(run / "checkpoints" / "best.ckpt"), {}, backend="onnx")


# ------------------------------------------------ issue 21.12: a bounded queue, and always an answer


def _stub_predictor():
    """What make_server reads from a Predictor (the classification itself is monkeypatched)."""
    from types import SimpleNamespace

    ev = SimpleNamespace(refer_threshold=0.5, num_samples=1)
    return SimpleNamespace(
        class_names=["dark", "bright"], cfg=SimpleNamespace(eval=ev), module=SimpleNamespace(model=None)
    )


def _stub_result(name: str):
    from diffmic.inference.predictor import Prediction

    res = Prediction(
        id=name,
        label="dark",
        label_index=0,
        probs={"dark": 0.9, "bright": 0.1},
        confidence=0.9,
        agreement=1.0,
        spread=0.0,
        entropy=0.3,
        refer=False,
    )
    return res, b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def stub_server(monkeypatch):
    """A server for a stub predictor; ``classify`` (set by the test) replaces classify_upload."""
    import diffmic.inference.serve as serve_mod

    state = {"classify": lambda name, data: _stub_result(name)}
    monkeypatch.setattr(serve_mod, "classify_upload", lambda p, name, data, workdir: state["classify"](name, data))
    servers = []

    def start(**kw):
        srv = make_server(_stub_predictor(), "127.0.0.1", 0, **kw)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, f"http://127.0.0.1:{srv.server_address[1]}/"

    yield state, start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def _post_full(url: str, name: str, data: bytes) -> tuple[int, str, dict]:
    body, ctype = _multipart(name, data)
    req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), dict(e.headers)


def test_a_full_queue_answers_busy_with_retry_after_and_logs_it(stub_server, capsys):
    state, start = stub_server
    entered, release = threading.Event(), threading.Event()

    def slow(name, data):
        entered.set()
        assert release.wait(120)
        return _stub_result(name)

    state["classify"] = slow
    srv, url = start(max_queue=1)  # one upload classified, one waiting, the next is refused
    answers: dict[str, tuple] = {}

    def upload(tag):
        answers[tag] = _post_full(url, f"{tag}.png", b"pixels")

    a = threading.Thread(target=upload, args=("a",))
    a.start()
    assert entered.wait(120)
    b = threading.Thread(target=upload, args=("b",))
    b.start()
    for _ in range(12000):  # until b holds its place in the queue (a is being classified)
        if srv.diffmic_uploads() == 2:
            break
        time.sleep(0.01)
    assert srv.diffmic_uploads() == 2
    status, text, headers = _post_full(url, "c.png", b"pixels")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "busy" in text and "try again" in text
    release.set()
    a.join(120)
    b.join(120)
    assert answers["a"][0] == 200 and answers["b"][0] == 200
    assert "busy" in capsys.readouterr().err  # the refusal is logged
    assert _post_full(url, "d.png", b"pixels")[0] == 200  # and the server serves on


def test_twenty_concurrent_uploads_all_get_an_http_answer(stub_server):
    state, start = stub_server
    gate = threading.Barrier(20, timeout=120)
    srv, url = start(max_queue=4)
    answers: list = []

    def upload(i):
        try:
            gate.wait()
            answers.append(_post_full(url, f"{i}.png", b"pixels")[0])
        except Exception as exc:  # a reset or an empty reply: the failure this test is about
            answers.append(repr(exc))

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(answers) == 20 and all(a in (200, 503) for a in answers), answers


@pytest.mark.parametrize("kind", ["internal", "data"])
def test_an_upload_that_fails_inside_the_handler_gets_an_http_error(stub_server, capsys, kind):
    from diffmic.data.checks import DataError

    state, start = stub_server

    def fail(name, data):
        if kind == "internal":
            raise RuntimeError("boom in the model")
        raise DataError(f"{name}: 4x20000 pixels is too elongated to classify")

    state["classify"] = fail
    _, url = start()
    status, page, _ = _post_full(url, "x.png", b"pixels")
    if kind == "internal":
        assert status == 500 and "could not classify" in _span(page, "error")
        assert "boom in the model" in capsys.readouterr().err  # the traceback is logged
    else:
        assert status == 400 and "too elongated" in _span(page, "error")
    state["classify"] = lambda name, data: _stub_result(name)
    assert _post_full(url, "y.png", b"pixels")[0] == 200  # still serving


def test_serve_cli_refuses_a_negative_queue(tmp_path, capsys):
    assert main(["serve", "--run", str(tmp_path), "--max-queue", "-1"]) == 2
    assert "--max-queue must be 0 or more" in capsys.readouterr().err
