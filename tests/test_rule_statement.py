"""Every place that states the referral rule states the one that is applied (issue 25.5): the
threshold stored with the calibration is changed, and ``diffmic test`` / ``report``, ``predict``,
the Predictor, the ``serve`` page and the exported model card all state it, in the words of one
function (:func:`diffmic.trust.evaluate.applied_rule`), and refer by it."""

from __future__ import annotations

import csv
import html
import json
import threading
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

from diffmic.cli import main

from _helpers import TINY_MODEL, one_thread  # noqa: F401
from conftest import DISCS, write_synthetic_folder

THRESHOLD = 0.6173  # no fit gives this value by chance: each place must have read it


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread) -> Path:  # noqa: F811
    """A tiny 3-class run, calibrated, whose stored referral threshold is then set to THRESHOLD."""
    tmp = tmp_path_factory.mktemp("rule")
    root = tmp / "imgs"
    write_synthetic_folder(root, (24, 24, 24), 32, ("red", "green", "blue"), stem="{name}_{i:03d}", seed=0, **DISCS)
    run = tmp / "run"
    args = ["data.image_size=32", "data.batch_size=16", *TINY_MODEL, "data.dataset=folder", f"data.root={root}"]
    args += ["data.split=random", "data.test_fraction=0.3", "data.val_fraction=0.3", f"run.dir={run}"]
    args += ["train.epochs=1", "train.dcg_warmup_epochs=1", "eval.num_samples=4", "eval.bootstrap_resamples=20"]
    assert main(["fit", "--config", "cpu_v1", *args]) == 0
    assert main(["calibrate", "--run", str(run)]) == 0
    from diffmic.training.checkpoint import store_calibration

    ckpt = run / "checkpoints" / "best.ckpt"
    calib = torch.load(ckpt, map_location="cpu", weights_only=False)["diffmic_calibration"]
    assert abs(calib["referral"]["threshold"] - THRESHOLD) > 1e-3
    calib["referral"]["threshold"] = THRESHOLD
    store_calibration(ckpt, calib)
    return run


def _rule(run: Path) -> str:
    from diffmic.trust.evaluate import applied_rule

    calib = torch.load(run / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    return applied_rule(calib["diffmic_calibration"])


def test_the_rule_in_words_names_the_stored_threshold(run):
    rule = _rule(run)
    assert "calibrated probability for its predicted class is below 0.617" in rule
    assert "validation images" in rule and "0.5" not in rule.split("(")[0]


def test_test_and_report_state_and_apply_the_stored_rule(run):
    assert main(["test", "--run", str(run)]) == 0
    m = json.loads((run / "test_metrics.json").read_text())
    rule = _rule(run)
    assert m["referral"]["rule"] == rule and m["referral"]["threshold"] == THRESHOLD
    with open(run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:  # referred exactly by the stated rule (and the out-of-distribution flag, when set)
        want = float(r["confidence"]) < THRESHOLD or r.get("ood") == "1"
        assert (r["refer"] == "1") == want
    assert main(["report", str(run), "--max-images", "12", "--gallery", "1"]) == 0
    page = (run / "report.html").read_text()
    assert html.escape(rule, quote=True) in page


def test_predict_and_the_predictor_state_the_stored_rule(run, capsys):
    from diffmic.inference.predictor import Predictor

    rule = _rule(run)
    p = Predictor.load(run)
    assert p.referral_rule == rule and p.refer_threshold == THRESHOLD
    img = next((run.parent / "imgs" / "red").glob("*.png"))
    res = p.predict([str(img)])[0]
    assert res.refer == (res.confidence < THRESHOLD or bool(res.ood))
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(img)]) == 0
    assert f"referral rule: {rule}" in capsys.readouterr().err


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    b = uuid.uuid4().hex
    head = f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
    head += "Content-Type: image/png\r\n\r\n"
    return head.encode() + data + f"\r\n--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def test_the_web_page_states_the_stored_rule_and_refers_by_it(run):
    from diffmic.inference.predictor import Predictor
    from diffmic.inference.serve import make_server

    rule = _rule(run)
    p = Predictor.load(run)
    srv = make_server(p, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        pages = []
        for img in sorted((run.parent / "imgs").glob("*/*_00[0-5].png")):
            body, ctype = _multipart(img.name, img.read_bytes())
            url = f"http://127.0.0.1:{srv.server_address[1]}/"
            req = urllib.request.Request(url, data=body, headers={"Content-Type": ctype}, method="POST")
            with urllib.request.urlopen(req, timeout=120) as r:
                pages.append(r.read().decode())
    finally:
        srv.shutdown()
        srv.server_close()
    for page in pages:
        assert f"referral rule: {html.escape(rule)}</p>" in page
        assert "below 0.5 " not in page and "samples disagree" not in page
    # an image referred for its probability is explained with the stored threshold
    referred = [pg for pg in pages if "REFER to a clinician: probability" in pg]
    assert all("is below 0.617" in pg for pg in referred)
    from diffmic.inference.predictor import Prediction
    from diffmic.inference.serve import render_result

    low = Prediction("x", "red", 0, {"red": 0.55, "green": 0.45}, 0.55, 1.0, 0.0, 0.7, True)
    assert "REFER to a clinician: probability 0.550 is below 0.617" in render_result(low, b"", p.refer_threshold)


def test_the_model_card_states_the_stored_rule_in_words(run, tmp_path):
    out = tmp_path / "model"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    assert f"Referral rule: {_rule(run)}." in card
    assert "below confidence 0.5" not in card and "samples disagree" not in card
    calib_line = next(line for line in card.splitlines() if line.startswith("Calibration: "))
    assert "{" not in calib_line and "validation images" in calib_line  # words, not raw JSON
    from diffmic.inference.predictor import Predictor

    assert Predictor.load(out).referral_rule == _rule(run)


def test_an_exported_calibration_that_cannot_be_applied_is_refused_naming_the_key(run, tmp_path):
    from diffmic.inference.export import ExportError, load_model_folder

    out = tmp_path / "model"
    assert main(["export", "--run", str(run), "--out", str(out)]) == 0
    meta = json.loads((out / "config.json").read_text())
    for key, value, msg in (
        ("referral", {"threshold": "low"}, r"calibration\.referral\.threshold must be a number in \[0, 1\]"),
        ("temperature", -1, r"calibration\.temperature must be a positive number"),
        ("conformal", {**meta["calibration"]["conformal"], "qhat_per_class": [1]}, r"calibration\.conformal\.qhat_per"),
    ):
        bad = json.loads(json.dumps(meta))
        bad["calibration"][key] = value
        (out / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ExportError, match=msg):
            load_model_folder(out)
