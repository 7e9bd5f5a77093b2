"""``diffmic serve``: a small web page for a trained model, on the standard library alone.

Upload an image; the page shows the predicted class, the class probabilities, the uncertainty
(probability of the predicted class, agreement of the K reverse samples) with the referral flag,
and the DCG saliency map of the predicted class with the regions of interest (the PNG written by
:meth:`Predictor.save_explanation`).

Why no Gradio: the page needs one form and one result view; :mod:`http.server` does that with no
download, works offline, and is tested end to end in headless Chromium. Gradio pulls in a web
framework, a front-end bundle and network calls at start-up for the same page.

The server binds 127.0.0.1 by default (this machine only). It is a demo for one user, not a
hardened public service: put it behind a real web server before exposing it. Bad uploads (not an
image, corrupt, larger than ``max_bytes``, too many pixels) get a message on the page with HTTP
400/413 and the server keeps serving.

Each upload's sampling noise is seeded as :meth:`Predictor.predict` seeds the same file (by its
decoded pixels where the Predictor does that, else by the name, as ``diffmic predict NAME`` run in
the file's folder), so the page and ``diffmic predict`` give the same numbers.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import html
import inspect
import re
import tempfile
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import cast

from diffmic.inference.predictor import Prediction, Predictor
from diffmic.metrics import referral_rule

DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_QUEUE = 4  # uploads that may wait while one is classified; more are answered "busy" (503)
RETRY_AFTER_S = 5
_DRAIN_LIMIT = 1024**3  # a body larger than this is not even read: the connection is closed


class UploadError(ValueError):
    """An upload that cannot be classified; the message is shown on the page."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def safe_name(filename: str) -> str:
    """The upload's base name with only ``[A-Za-z0-9._-]`` kept (never a path)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".")
    return base[:120] or "upload"


def parse_upload(content_type: str, body: bytes) -> tuple[str, bytes]:
    """The ``(filename, bytes)`` of the ``image`` field of a ``multipart/form-data`` body."""
    if not content_type.lower().startswith("multipart/form-data"):
        raise UploadError("send the image as a multipart/form-data upload (the form on this page)")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body
    )
    if not msg.is_multipart():
        raise UploadError("the upload is not a valid multipart/form-data body")
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "image":
            data = part.get_payload(decode=True)  # bytes for a leaf part (None for a nested multipart)
            name = part.get_filename() or "upload"
            if not isinstance(data, bytes) or not data:
                raise UploadError("no file was chosen, or the file is empty: choose an image file")
            return name, data
    raise UploadError("no image in the upload: choose a file in the form")


def classify_upload(predictor: Predictor, name: str, data: bytes, workdir: Path) -> tuple[Prediction, bytes]:
    """Decode, check and classify one uploaded image; returns the prediction and the explanation PNG.

    A file that is not a readable image raises :class:`UploadError` naming the upload."""
    from diffmic.data.checks import DataError
    from diffmic.data.datamodule import ImagePathsDataset

    name = safe_name(name)
    path = workdir / name
    path.write_bytes(data)
    ds = ImagePathsDataset([path], image_size=predictor.cfg.data.image_size, in_chans=predictor.cfg.data.in_chans)
    try:
        x = ds[0]["image"][None]
    except DataError as exc:
        raise UploadError(
            f"'{name}' is not an image this server can read: "
            f"{str(exc).replace(str(path), name)}. Upload a PNG, JPEG, BMP, TIFF, WebP or DICOM file."
        ) from exc
    if "seed_keys" in inspect.signature(predictor.predict_tensor).parameters:
        # this Predictor seeds the sampling noise by the decoded pixels: predict() does it
        result = predictor.predict([path])[0]
        result.id = name
    else:  # it seeds by the path as given: use the upload's name, as `diffmic predict NAME` would
        result = predictor.predict_tensor(x, [name])[0]
    png = predictor.save_explanation(path, result, workdir / "explanation.png").read_bytes()
    return result, png


# ------------------------------------------------------------------------------------------ page

_STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:1.5rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem} .note{color:#666;font-size:.85rem}
.error{background:#fde8e8;border:1px solid #e0a0a0;padding:.6rem 1rem;border-radius:4px}
.refer{background:#fff3cd;border:1px solid #e0c060;padding:.4rem .8rem;border-radius:4px;display:inline-block}
.ok{background:#e6f4ea;border:1px solid #8cc09c;padding:.4rem .8rem;border-radius:4px;display:inline-block}
table{border-collapse:collapse} td,th{padding:.2rem .6rem;text-align:left}
.bar{background:#4a7fd0;height:.8rem} #pred-label{font-size:1.6rem;font-weight:bold}
img{max-width:100%;border:1px solid #ccc}
"""


def _page(body: str, model_info: str) -> bytes:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>diffmic</title>"
        f"<style>{_STYLE}</style></head><body><h1>DiffMIC: classify an image</h1>"
        f"<p class='note'>{model_info}</p>"
        "<form method='post' action='/' enctype='multipart/form-data'>"
        "<input type='file' id='image' name='image' accept='image/*,.dcm,.dicom,application/dicom'> "
        "<button type='submit' id='submit'>Classify</button></form>"
        f"{body}"
        "<p class='note'>A research demo, not a medical device. Uploaded images are processed in "
        "memory and a temporary folder, and deleted after the answer.</p></body></html>"
    ).encode()


def render_result(result: Prediction, png: bytes, refer_threshold: float, rule: str = "", ood_rule: str = "") -> str:
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(k)}</td><td>{p:.3f}</td><td><div class='bar' style='width:{max(1, round(200 * p))}px'>"
        f"</div></td></tr>"
        for k, p in sorted(result.probs.items(), key=lambda kv: -kv[1])
    )
    if result.ood:  # referred whatever its confidence
        flag = (
            "<p id='refer' class='refer'>REFER to a clinician: this image does not look like the training "
            f"data (out-of-distribution score {result.ood_score:.4g})</p>"
        )
    elif result.refer:
        # the threshold as the rule states it (3 decimals; more where the two would read the same)
        d = 3 if round(result.confidence, 3) != round(refer_threshold, 3) else 6
        if result.confidence < refer_threshold:
            why = f"probability {result.confidence:.{d}f} is below {refer_threshold:.{d}f}"
        elif result.agreement is not None:
            why = f"only {result.agreement:.0%} of the reverse samples agree on the class"
        else:
            why = "the referral rule below applies"
        flag = f"<p id='refer' class='refer'>REFER to a clinician: {why}</p>"
    else:
        flag = "<p id='refer' class='ok'>Not referred: the referral rule below does not apply to this image</p>"
    flag += f"<p class='note' id='referral-rule'>referral rule: {e(rule)}</p>"
    if ood_rule:
        flag += f"<p class='note' id='ood-rule'>out-of-distribution flag: {e(ood_rule)}</p>"
    rois = ""
    if result.roi_boxes:
        items = "".join(
            f"<li>y {b[0]}–{b[2]}, x {b[1]}–{b[3]} (attention {a:.2f})</li>"
            for b, a in zip(result.roi_boxes, result.roi_attention or [0.0] * len(result.roi_boxes))
        )
        rois = f"<h3>Regions of interest (pixels of the network input)</h3><ul id='rois'>{items}</ul>"
    img = base64.b64encode(png).decode("ascii")
    readout = (
        "fast read-out: no reverse samples drawn (no sample agreement, spread or t-test)"
        if result.agreement is None or result.spread is None
        else f"sample agreement <span id='agreement'>{result.agreement:.2f}</span>, spread {result.spread:.3f}"
    )
    return (
        f"<div id='result'><h2>Result for <span id='filename'>{e(result.id)}</span></h2>"
        f"<p>Predicted class: <span id='pred-label'>{e(result.label)}</span></p>"
        f"<p>probability <span id='confidence'>{result.confidence:.3f}</span>, "
        f"{readout}, entropy {result.entropy:.3f}</p>{flag}"
        f"<h3>Class probabilities</h3><table id='probs'><tr><th>class</th><th>p</th><th></th></tr>{rows}</table>"
        f"<h3>Saliency map and regions</h3><img id='overlay' alt='input with regions of interest, and the "
        f"DCG saliency map of the predicted class' src='data:image/png;base64,{img}'>{rois}</div>"
    )


# ---------------------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    """One thread per connection; a long listen backlog, so that a burst of uploads reaches the
    handler (which answers each: a result, an error, or "busy") instead of being reset by the kernel."""

    daemon_threads = True
    request_queue_size = 128

    def diffmic_uploads(self) -> int:  # set by make_server: uploads being classified or waiting
        return 0


def make_server(
    predictor: Predictor,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_bytes: int = DEFAULT_MAX_BYTES,
    model_info: str = "",
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> ThreadingHTTPServer:
    """An HTTP server (not yet serving) for ``predictor``; ``port=0`` picks a free port.

    Uploads are classified one at a time; up to ``max_queue`` more wait for their turn, and any
    beyond that are answered at once with HTTP 503 and ``Retry-After`` (and a line in the log)."""
    if int(max_queue) < 0:
        raise ValueError(f"max_queue must be >= 0, got {max_queue}")
    lock = threading.Lock()  # one prediction at a time: the model and matplotlib are shared
    slots = threading.BoundedSemaphore(int(max_queue) + 1)  # the one classified + those waiting
    in_flight = [0]
    count_lock = threading.Lock()
    info = html.escape(model_info or f"classes: {', '.join(predictor.class_names)}")
    # the rule the Predictor applies (the threshold fitted on validation when calibrated), stated once
    refer_threshold = float(getattr(predictor, "refer_threshold", predictor.cfg.eval.refer_threshold))
    model = getattr(predictor.module, "model", None)
    draws = (model is None or model.uses_diffusion) and not getattr(predictor, "fast", False)
    k = int(predictor.cfg.eval.num_samples) if draws else None
    rule = getattr(predictor, "referral_rule", None) or referral_rule(refer_threshold, k)
    ood_rule = getattr(predictor, "ood_rule", None) or ""

    class Handler(BaseHTTPRequestHandler):
        server_version = "diffmic"
        timeout = 120  # seconds a client may stall one read or write (a stalled upload ends, logged)

        def log_message(self, fmt, *args):  # one short line per request on stderr
            super().log_message(fmt, *args)

        def _send(self, status: HTTPStatus, body: bytes, ctype: str = "text/html; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path in ("/", "/index.html"):
                self._send(HTTPStatus.OK, _page("", info))
            elif self.path == "/health":
                self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
            else:
                self._send(HTTPStatus.NOT_FOUND, _page("<p id='error' class='error'>No such page.</p>", info))

        def _error(self, exc: UploadError) -> None:
            self._send(exc.status, _page(f"<p id='error' class='error'>{html.escape(str(exc))}</p>", info))

        def _busy(self) -> None:
            body = (
                f"busy: {max_queue + 1} uploads are already being classified or waiting; "
                f"try again in {RETRY_AFTER_S} seconds\n"
            ).encode()
            self.send_response(HTTPStatus.SERVICE_UNAVAILABLE)
            self.send_header("Retry-After", str(RETRY_AFTER_S))
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            """Every upload gets an HTTP answer: the result, a 4xx message, 503 busy, or 500 (logged)."""
            self._answered = False
            try:
                self._post()
            except Exception:
                self.log_error("an upload failed inside the server:\n%s", traceback.format_exc().rstrip())
                self.close_connection = True
                if self._answered:  # the answer had begun: closing the connection is all that is left
                    return
                self._send(
                    HTTPStatus.INTERNAL_SERVER_ERROR,
                    _page(
                        "<p id='error' class='error'>the server could not classify this upload (an internal "
                        "error, written to the server's log); try another image or restart the server.</p>",
                        info,
                    ),
                )

        def send_response(self, *a, **k) -> None:
            self._answered = True
            super().send_response(*a, **k)

        def _post(self) -> None:
            from diffmic.data.checks import DataError

            try:
                length = int(self.headers.get("Content-Length") or -1)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                return self._error(UploadError("the upload has no Content-Length", HTTPStatus.LENGTH_REQUIRED))
            if length > max_bytes:
                self._drain(length)
                return self._error(
                    UploadError(
                        f"the file is too large ({length / 1e6:.1f} MB); this server accepts up to "
                        f"{max_bytes / 1e6:.1f} MB (diffmic serve --max-mb)",
                        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                    )
                )
            body = self.rfile.read(length)
            if not slots.acquire(blocking=False):
                self.log_message(
                    "busy: answered 503 to an upload (%d already being classified or waiting; --max-queue %d)",
                    max_queue + 1,
                    max_queue,
                )
                return self._busy()
            with count_lock:
                in_flight[0] += 1
            try:
                name, data = parse_upload(self.headers.get("Content-Type", ""), body)
                with lock, tempfile.TemporaryDirectory(prefix="diffmic-serve-") as tmp:
                    try:
                        result, png = classify_upload(predictor, name, data, Path(tmp))
                    except DataError as exc:  # an image the data layer refuses (size, shape, ...)
                        msg = str(exc).replace(str(Path(tmp)) + "/", "")
                        raise UploadError(f"'{safe_name(name)}' cannot be classified: {msg}") from exc
            except UploadError as exc:
                return self._error(exc)
            finally:
                with count_lock:
                    in_flight[0] -= 1
                slots.release()
            self._send(HTTPStatus.OK, _page(render_result(result, png, refer_threshold, rule, ood_rule), info))

        def _drain(self, length: int) -> None:
            """Read and drop an over-large body so that the browser sees the answer, not a reset."""
            if length > _DRAIN_LIMIT:
                self.close_connection = True
                return
            left = length
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)

    server = _Server((host, port), Handler)
    server.diffmic_uploads = lambda: in_flight[0]  # type: ignore[method-assign]
    return server


def load_predictor(
    run: str | None, ckpt: str | None, eval_overrides: dict, backend: str = "torch", fast: bool = False
) -> tuple[Predictor, str]:
    """The predictor for ``--run`` (a run folder, a checkpoint file, or a model folder written by
    ``diffmic export``: :meth:`Predictor.load`) or ``--ckpt``; and a one-line description.
    ``backend="onnx"``: a model folder's ONNX graphs with ONNX Runtime (:meth:`Predictor.load`);
    ``fast``: no reverse samples (:meth:`Predictor.set_fast`)."""
    from diffmic.config import ConfigError

    source = ckpt or run
    if not source:
        raise ConfigError("serve needs --run RUN (a run folder or a checkpoint file) or --ckpt FILE")
    target = Path(source)
    if not target.exists():
        raise FileNotFoundError(f"'{target}' does not exist: pass a trained run folder or a checkpoint file")
    if ckpt:
        if backend != "torch":
            raise ConfigError("--backend onnx serves an exported model folder (--run FOLDER), not --ckpt")
        return Predictor.from_checkpoint(target, fast=fast, **eval_overrides), f"checkpoint {target}"
    kind = "checkpoint" if target.is_file() else "model folder" if (target / "config.json").is_file() else "run"
    described = f"{kind} {target}" + (" (ONNX Runtime)" if backend == "onnx" else "")
    return Predictor.load(target, backend=backend, fast=fast, **eval_overrides), described


def serve_main(args) -> int:
    """``diffmic serve``: load the model, print the address, serve until Ctrl-C."""
    import sys

    from diffmic.config import ConfigError, parse_value

    eval_over = {}
    for item in args.overrides:
        key, _, value = item.partition("=")
        if not key.startswith("eval.") or not value:
            raise ConfigError(f"serve accepts eval.* overrides only (eval.key=value), got '{item}'")
        eval_over[key.split(".", 1)[1]] = parse_value(key, value)
    if args.max_mb <= 0:
        raise ConfigError(f"--max-mb must be positive, got {args.max_mb}")
    max_queue = getattr(args, "max_queue", DEFAULT_MAX_QUEUE)
    if max_queue < 0:
        raise ConfigError(f"--max-queue must be 0 or more, got {max_queue}")
    predictor, what = load_predictor(
        args.run, args.ckpt, eval_over, getattr(args, "backend", "torch"), bool(getattr(args, "fast", False))
    )
    if predictor.fast:
        what += " (fast: no reverse samples)"
    try:
        server = make_server(
            predictor,
            args.host,
            args.port,
            int(args.max_mb * 1e6),
            model_info=f"{what}; classes: {', '.join(predictor.class_names)}",
            max_queue=max_queue,
        )
    except OSError as exc:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {exc}. Choose another --port.") from exc
    # a TCP server's address: (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6
    host, port = cast(tuple[str, int], server.server_address[:2])
    print(f"serving {what} on http://{host}:{port}/ (Ctrl-C to stop)", flush=True)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print("warning: listening beyond this machine; this demo has no authentication", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
