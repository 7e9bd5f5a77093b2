"""Out-of-distribution flag (issue 25 §3): the scores against hand formulas and scipy, the threshold
against the hand-worked finite-sample rule and simulated exchangeable data, and, on a tiny trained
run, the flag in `test`, `predict`, the Predictor, the web page and the exported folder (a flagged
image is referred whatever its confidence), and an old checkpoint without the flag."""

from __future__ import annotations

import copy
import csv
import json
import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from diffmic.cli import main
from diffmic.trust.ood import (
    NOT_STORED,
    OODInputs,
    candidate_scores,
    check_ood,
    decode_array,
    encode_array,
    energy_score,
    fit_mahalanobis,
    fit_threshold,
    flags,
    mahalanobis_score,
    max_logit_score,
    msp_score,
    resolve_score,
    score_problem,
)

from _helpers import (
    one_thread,  # noqa: F401
    tiny_fit_args,
)
from conftest import DARK_BRIGHT, write_synthetic_folder

# ------------------------------------------------------------------------------ scores (no model)


def test_energy_max_logit_and_msp_by_hand():
    z = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])
    # logsumexp: log(1 + 3) = log 4; log(2 e^2) = 2 + log 2
    assert energy_score(z).tolist() == pytest.approx([-math.log(4.0), -(2 + math.log(2.0))])
    assert energy_score(z, temperature=2.0)[0].item() == pytest.approx(-2 * math.log(1 + math.sqrt(3)))
    assert max_logit_score(z).tolist() == pytest.approx([-math.log(3.0), -2.0])
    assert msp_score(z).tolist() == pytest.approx([-0.75, -0.5])
    s = candidate_scores(OODInputs(logits=z, spread=torch.tensor([0.1, 0.3])))
    assert set(s) == {"energy", "max_logit", "msp", "spread"}  # no Mahalanobis without its statistics
    assert s["spread"].tolist() == pytest.approx([0.1, 0.3])


def test_threshold_is_the_finite_sample_quantile_worked_by_hand():
    scores = torch.tensor([7.0, 3, 19, 11, 1, 15, 5, 13, 9, 17, 2, 4, 6, 8, 10, 12, 14, 16, 18])  # 1..19
    # n = 19, rate 0.05: k = ceil(20 * 0.95) = 19 -> the largest, 19: no validation image is flagged
    assert fit_threshold(scores, 0.05) == 19.0
    # rate 0.10: k = ceil(20 * 0.9) = 18 -> 18; rate 0.25: k = ceil(15) = 15 -> 15
    assert fit_threshold(scores, 0.10) == 18.0
    assert fit_threshold(scores, 0.25) == 15.0
    assert flags(torch.tensor([17.0, 18.0, 18.5, 30.0]), 18.0).tolist() == [False, False, True, True]
    # n = 10 at rate 0.05: k = ceil(11 * 0.95) = 11 > 10 -> no threshold can promise 5 %: never flag
    assert fit_threshold(torch.arange(10.0), 0.05) is None
    assert not flags(torch.tensor([1e9]), None).any()
    with pytest.raises(ValueError, match="false flag rate"):
        fit_threshold(scores, 0.0)
    with pytest.raises(ValueError, match="finite"):
        fit_threshold(torch.tensor([1.0, float("nan")]), 0.1)


def test_false_flag_rate_holds_on_exchangeable_data():
    """n = 99 validation scores, rate 0.1: tau is the 90th of 99, so a new exchangeable score exceeds it
    with probability exactly 1 - 90/100 = 0.10 (continuous scores); 4000 simulated splits."""
    g = torch.Generator().manual_seed(0)
    val = torch.randn(4000, 99, generator=g)
    new = torch.randn(4000, 50, generator=g)
    rates = [flags(new[i], fit_threshold(val[i], 0.1)).double().mean() for i in range(4000)]
    mean = float(torch.stack(rates).mean())
    assert mean == pytest.approx(0.10, abs=0.006)  # the Monte-Carlo error is about 0.0015


def _gaussian_features(n: int, d: int, classes: int, seed: int):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / math.sqrt(d)
    cov = A @ A.T + 0.5 * np.eye(d)
    means = rng.normal(0, 3, size=(classes, d))
    y = rng.integers(0, classes, n)
    f = means[y] + rng.multivariate_normal(np.zeros(d), cov, size=n)
    return f, y, means, cov


def test_mahalanobis_distance_equals_scipy_on_given_statistics():
    from scipy.spatial.distance import mahalanobis

    _, _, means, cov = _gaussian_features(10, 6, 3, seed=1)
    lam, U = np.linalg.eigh(cov)
    W = (U / np.sqrt(lam)).T
    params = {"whiten": encode_array(W), "means": encode_array(means @ W.T)}
    x = np.random.default_rng(2).normal(0, 4, size=(25, 6))
    VI = np.linalg.inv(cov)
    want = [min(mahalanobis(v, m, VI) ** 2 for m in means) for v in x]
    got = mahalanobis_score(torch.tensor(x), params)
    assert got.numpy() == pytest.approx(np.array(want), rel=1e-4)  # float32 storage


def test_fitted_mahalanobis_uses_class_means_and_the_shrunk_shared_covariance():
    from scipy.spatial.distance import mahalanobis
    from sklearn.covariance import LedoitWolf

    f, y, true_means, true_cov = _gaussian_features(4000, 5, 3, seed=3)
    params = fit_mahalanobis(torch.tensor(f), torch.tensor(y))
    assert params["classes"] == [0, 1, 2] and params["dim"] == 5 and params["rank"] == 5
    means = np.stack([f[y == c].mean(0) for c in range(3)])
    cov = LedoitWolf(assume_centered=True).fit(f - means[y]).covariance_
    assert params["shrinkage"] < 0.05  # 4000 images in 5 dimensions: hardly shrunk
    assert np.abs(cov - true_cov).max() < 0.1 * np.abs(true_cov).max()
    x = np.random.default_rng(4).normal(0, 5, size=(20, 5))
    VI = np.linalg.inv(cov)
    want = [min(mahalanobis(v, m, VI) ** 2 for m in means) for v in x]
    assert mahalanobis_score(torch.tensor(x), params).numpy() == pytest.approx(np.array(want), rel=1e-4)
    # far from every class mean scores higher than the training images themselves
    s_in = mahalanobis_score(torch.tensor(f[:200]), params)
    assert float(s_in.mean()) == pytest.approx(5.0, rel=0.15)  # E chi2(5) = 5
    assert (mahalanobis_score(torch.tensor(f[:200] + 50.0), params) > s_in.max()).all()


def test_a_capped_whitening_is_the_distance_in_the_leading_principal_directions():
    f, y, _, _ = _gaussian_features(3000, 6, 2, seed=5)
    params = fit_mahalanobis(torch.tensor(f), torch.tensor(y), max_values=6 * 3)  # k = 18 // 6 = 3 of 6
    assert params["rank"] == 3
    from sklearn.covariance import LedoitWolf

    means = np.stack([f[y == c].mean(0) for c in range(2)])
    lam, U = np.linalg.eigh(LedoitWolf(assume_centered=True).fit(f - means[y]).covariance_)
    U3, lam3 = U[:, -3:], lam[-3:]
    x = np.random.default_rng(6).normal(0, 3, size=(10, 6))
    want = [min((((v - m) @ U3) ** 2 / lam3).sum() for m in means) for v in x]
    assert mahalanobis_score(torch.tensor(x), params).numpy() == pytest.approx(np.array(want), rel=1e-4)


def test_stored_arrays_round_trip_and_bad_ones_are_refused():
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    assert np.array_equal(decode_array(encode_array(a)), a)
    d = encode_array(a)
    with pytest.raises(ValueError, match=r"x.base64 must encode 48 bytes"):
        decode_array({**d, "base64": d["base64"][:-4]}, "x")
    with pytest.raises(ValueError, match=r"x.shape must be two positive whole numbers"):
        decode_array({**d, "shape": [3, -4]}, "x")
    with pytest.raises(ValueError, match="non-finite"):
        decode_array(encode_array(np.array([[np.inf, 1.0]])), "x")
    f, y, _, _ = _gaussian_features(200, 4, 2, seed=7)
    ood = {
        "score": "mahalanobis",
        "threshold": 3.0,
        "false_flag_rate": 0.05,
        "mahalanobis": fit_mahalanobis(torch.tensor(f), torch.tensor(y)),
    }
    check_ood(ood, num_classes=2, feature_dim=4)
    check_ood({"score": None})  # a flag switched off
    bad = [
        ({**ood, "score": "psychic"}, r"^\.score must be one of"),
        ({**ood, "threshold": "3"}, r"^\.threshold must be a finite number or null"),
        ({**ood, "false_flag_rate": 1.5}, r"^\.false_flag_rate must be a number in \(0, 1\)"),
        ({k: v for k, v in ood.items() if k != "mahalanobis"}, r"^\.mahalanobis is missing"),
        (
            {**ood, "mahalanobis": {**ood["mahalanobis"], "classes": [0, 7]}},
            r"^\.mahalanobis\.classes names a class >= 2",
        ),
        ({**ood, "mahalanobis": {**ood["mahalanobis"], "whiten": "x"}}, r"^\.mahalanobis\.whiten: expected"),
    ]
    for value, match in bad:
        with pytest.raises(ValueError, match=match):
            check_ood(value, num_classes=2)
    with pytest.raises(ValueError, match=r"whiten is for 4-dimensional features, the model gives 8"):
        check_ood(ood, feature_dim=8)


def test_auto_picks_the_first_score_the_model_has():
    assert resolve_score("none", "full", 8) is None
    assert resolve_score("energy", "full", 8) == "energy"
    # the first of mahalanobis, energy, spread the model has: the DCG alone has no image features
    assert resolve_score("auto", "full", 8) == "mahalanobis"
    assert resolve_score("auto", "dcg", 1) == "energy"
    for variant, k in (("full", 8), ("C1", 8), ("C2", 1), ("basic", 1), ("dcg", 1)):
        picked = resolve_score("auto", variant, k)
        assert picked is not None and score_problem(picked, variant, k) is None, (variant, picked)
    assert "C1 has no DCG logits" in score_problem("energy", "C1", 8)
    assert "no image features" in score_problem("mahalanobis", "dcg", 1)
    assert "K >= 2" in score_problem("spread", "full", 1)


@pytest.mark.parametrize("variant", ["basic", "dcg"])
def test_classifier_variants_give_the_logits_of_classify_and_their_features(variant):
    from diffmic.nn.diffmic import DiffMIC
    from diffmic.trust.ood import classifier_outputs

    torch.manual_seed(0)
    m = DiffMIC(3, variant, "resnet10_tiny", hidden_dim=16, dcg_global="resnet10_tiny", dcg_local="resnet10_tiny")
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feat, g = classifier_outputs(m, x)
        assert torch.allclose(logits, m.classify(x), atol=1e-6)
        if variant == "basic":  # the backbone's features, which the head maps to the logits
            assert feat is not None and torch.allclose(feat, m.encode(x)) and g is None
        else:  # the DCG alone has no rho(x): no Mahalanobis score
            assert feat is None and torch.equal(g.z_fused, logits)
    assert resolve_score("auto", variant, 1) == ("mahalanobis" if variant == "basic" else "energy")


# ------------------------------------------------------------------------- on a tiny trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):  # noqa: F811
    tmp = tmp_path_factory.mktemp("ood")
    data = write_synthetic_folder(tmp / "data", (30, 30), 40, **DARK_BRIGHT)
    r = tmp / "run"
    args = tiny_fit_args(data, r, tmp / "cache") + ["eval.num_samples=4", "eval.bootstrap_resamples=20"]
    assert main(args) == 0
    assert main(["test", "--run", str(r)]) == 0
    return r, data


def _ckpt(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_test_stores_the_flag_and_refers_flagged_images(run):
    r, _ = run
    m = json.loads((r / "test_metrics.json").read_text())
    stored = _ckpt(r)["diffmic_calibration"]["ood"]
    assert stored["score"] == resolve_score("auto", "full", 4)
    assert stored["fitted_on"] == "val" and stored["false_flag_rate"] == 0.05
    if stored["score"] == "mahalanobis":
        assert stored["mahalanobis"]["fitted_on"] == "train"
        check_ood(stored, num_classes=2, feature_dim=64)
    ood = m["ood"]
    assert ood["score"] == stored["score"] and ood["threshold"] == stored["threshold"]
    assert "whiten" not in json.dumps(ood)  # test_metrics.json holds no matrices
    with open(r / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    flagged = [int(x["ood"]) for x in rows]
    assert ood["flagged"] == sum(flagged) and ood["flagged_fraction"] == pytest.approx(np.mean(flagged))
    thr = stored["threshold"]
    for x in rows:
        assert int(x["ood"]) == int(thr is not None and float(x["ood_score"]) > thr)
        if int(x["ood"]):
            assert int(x["refer"]) == 1
    assert "lesions" not in m  # a folder data set has no lesion masks


def _with_calibration(run_dir: Path, dest: Path, edit) -> Path:
    from diffmic.training.checkpoint import store_calibration

    dest.mkdir(parents=True, exist_ok=True)
    p = dest / "model.ckpt"
    shutil.copy(run_dir / "checkpoints" / "best.ckpt", p)
    calib = copy.deepcopy(_ckpt(run_dir)["diffmic_calibration"])
    edit(calib)
    store_calibration(p, calib)
    return p


def _all_flagged(calib: dict) -> None:
    calib["referral"]["threshold"] = 0.0  # the confidence alone refers nothing
    calib["ood"]["threshold"] = -1e300  # every image is flagged


def _none_flagged(calib: dict) -> None:
    calib["referral"]["threshold"] = 0.0
    calib["ood"]["threshold"] = 1e300


def _post(url: str, path: Path) -> str:
    import urllib.request
    import uuid

    b = uuid.uuid4().hex
    body = (
        (
            f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{b}--\r\n".encode()
    )
    req = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={b}"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return resp.read().decode()


def _page(predictor, image: Path) -> str:
    from diffmic.inference.serve import make_server

    srv = make_server(predictor, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        return _post(f"http://127.0.0.1:{srv.server_address[1]}/", image)
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.slow
def test_a_flagged_image_is_referred_whatever_its_confidence(run, tmp_path, capsys):
    from diffmic.inference import Predictor

    r, data = run
    images = sorted((data / "bright").glob("*.png"))[:3] + sorted((data / "dark").glob("*.png"))[:3]
    for edit, flagged in ((_all_flagged, True), (_none_flagged, False)):
        ck = _with_calibration(r, tmp_path / edit.__name__, edit)
        # predict (CSV)
        out = tmp_path / f"{edit.__name__}.csv"
        assert main(["predict", "--ckpt", str(ck), *map(str, images), "--output", str(out)]) == 0
        with open(out, newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert [int(x["ood"]) for x in rows] == [int(flagged)] * len(images)
        assert [int(x["refer"]) for x in rows] == [int(flagged)] * len(images)
        # the Predictor
        p = Predictor.from_checkpoint(ck)
        res = p.predict(images)
        assert all(x.ood is flagged and x.refer is flagged for x in res)
        # the web page
        page = _page(p, images[0])
        assert ("does not look like the training" in page.split("id='refer'")[1][:300]) is flagged
        assert "id='ood-rule'" in page
        # the exported folder
        folder = tmp_path / f"export_{edit.__name__}"
        assert main(["export", "--ckpt", str(ck), "--out", str(folder)]) == 0
        q = Predictor.load(folder)
        assert all(x.ood is flagged and x.refer is flagged for x in q.predict(images))
        assert "Out-of-distribution flag:" in (folder / "MODEL_CARD.md").read_text()
        assert "base64" not in (folder / "MODEL_CARD.md").read_text()
    capsys.readouterr()


@pytest.mark.slow
def test_an_exported_folder_with_a_bad_flag_is_refused(run, tmp_path, capsys):
    from diffmic.inference.export import ExportError, load_model_folder

    r, data = run
    folder = tmp_path / "model"
    assert main(["export", "--run", str(r), "--out", str(folder)]) == 0
    meta = json.loads((folder / "config.json").read_text())
    good = copy.deepcopy(meta)
    meta["calibration"]["ood"]["threshold"] = "high"
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"calibration\.ood\.threshold must be a finite number or null"):
        load_model_folder(folder)
    meta = copy.deepcopy(good)
    meta["calibration"]["ood"]["false_flag_rate"] = 0
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"calibration\.ood\.false_flag_rate"):
        load_model_folder(folder)
    if good["calibration"]["ood"]["score"] == "mahalanobis":
        meta = copy.deepcopy(good)
        meta["calibration"]["ood"]["mahalanobis"]["whiten"]["base64"] = "AAAA"
        (folder / "config.json").write_text(json.dumps(meta))
        with pytest.raises(ExportError, match=r"calibration\.ood\.mahalanobis\.whiten\.base64 must encode"):
            load_model_folder(folder)
    # the Predictor ignores nothing: the CLI exits 2 with one line
    assert main(["predict", "--run", str(folder), str(sorted((data / "dark").glob("*.png"))[0])]) == 2
    assert "calibration.ood" in capsys.readouterr().err


@pytest.mark.slow
def test_an_old_checkpoint_without_the_flag_still_loads_and_says_so(run, tmp_path, capsys):
    from diffmic.inference import Predictor

    r, data = run
    ck = _with_calibration(r, tmp_path / "old", lambda c: c.pop("ood"))
    p = Predictor.from_checkpoint(ck)
    assert p.ood_rule == NOT_STORED
    res = p.predict(sorted((data / "dark").glob("*.png"))[:2])
    assert all(x.ood is None for x in res)
    assert "ood" not in res[0].as_row()
    capsys.readouterr()
    assert main(["predict", "--ckpt", str(ck), str(sorted((data / "dark").glob("*.png"))[0])]) == 0
    assert NOT_STORED in capsys.readouterr().err
    assert NOT_STORED in _page(p, sorted((data / "dark").glob("*.png"))[0])
    folder = tmp_path / "old_model"
    assert main(["export", "--ckpt", str(ck), "--out", str(folder)]) == 0
    assert Predictor.load(folder).ood_rule == NOT_STORED
    assert NOT_STORED in (folder / "MODEL_CARD.md").read_text()


def test_the_report_panel_escapes_and_counts():
    from diffmic.inference.explain import _ood_panel

    tm = {
        "num_images": 10,
        "ood": {
            "score": "<img src=x>",
            "threshold": 2.5,
            "fitted_on": "val",
            "num_images": 40,
            "false_flag_rate": 0.05,
            "flagged": 3,
            "flagged_fraction": 0.3,
            "accuracy_flagged": 0.5,
            "accuracy_not_flagged": 0.875,
            "rule": "a <b>rule</b>",
        },
    }
    page = _ood_panel(tm)
    assert "<img" not in page and "&lt;img src=x&gt;" in page and "<b>" not in page
    assert "3 of 10 (30.0%)" in page and "0.500 / 0.875" in page and ">2.5<" in page
    assert "&lt;x&gt;" in _ood_panel({"ood": {"score": None, "rule": "<x>"}})
    assert NOT_STORED in _ood_panel({})  # a test_metrics.json without the block


@pytest.mark.slow
def test_the_report_shows_the_flag(run):
    r, _ = run
    assert main(["report", str(r)]) == 0
    page = (r / "report.html").read_text()
    panel = page.split("id='ood'", 1)[1].split("class='panel'", 1)[0]
    m = json.loads((r / "test_metrics.json").read_text())
    assert f"{m['ood']['flagged']} of {m['num_images']}" in panel
