"""Models on the Hugging Face Hub (issue 26.4), without the network: a tiny exported model folder is
laid out as the Hub cache lays out a download (``models--org--name/refs/<branch>``,
``snapshots/<commit>/...``), huggingface_hub runs in offline mode, and ``Predictor.from_pretrained`` /
``diffmic predict --model`` load it (revision pinning, the SHA-256 check kept); a model that is not
cached is a clear error (exit 2). ``diffmic export --push-to-hub`` is tested with a stand-in for
``HfApi`` that records what would be uploaded; the upload, laid out as a cache, loads again."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.cli import main
from diffmic.inference import Predictor
from diffmic.inference.export import ExportError

from _helpers import ONE_THREAD_ENV, TINY_MODEL  # noqa: E402
from conftest import write_synthetic_npz

if os.environ.get("CI", "").lower() == "true":  # the hub extra is installed in CI: missing = failure
    import huggingface_hub as hub
else:
    hub = pytest.importorskip("huggingface_hub")
pytestmark = pytest.mark.usefixtures("one_thread")

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """Every test runs with the Hub in offline mode and an empty cache of its own: nothing can reach the
    network (huggingface_hub raises before any request)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    x = np.load(write_synthetic_npz(tmp / "tiny.npz", {"train": 24, "val": 8, "test": 8}))["test_images"]
    run = tmp / "run"
    over = [
        "data.dataset=medmnist",
        f"data.root={tmp / 'tiny.npz'}",
        "data.image_size=32",
        "data.batch_size=12",
        "model.crop_size=8",
        *TINY_MODEL,
        f"data.cache_dir={tmp / 'cache'}",
        "model.dcg_output_stride=8",
        "model.variant=basic",
        "train.epochs=1",
        f"run.dir={run}",
    ]
    assert main(["fit", "--config", "cpu_v1", *over]) == 0
    assert main(["export", "--run", str(run), "--out", str(tmp / "model")]) == 0
    images = []
    for i in range(3):
        p = tmp / "images" / f"img{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(x[i]).save(p)
        images.append(p)
    return tmp / "model", images


def _lay_out(cache: Path, repo: str, commit: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> Path:
    """``folder`` as huggingface_hub caches a download of ``repo`` at ``commit``."""
    storage = cache / f"models--{repo.replace('/', '--')}"
    snap = storage / "snapshots" / commit
    shutil.copytree(folder, snap)
    for ref in refs:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return snap


def _tampered(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    w = dest / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0x01  # one bit of the last weight: the size and header still match
    w.write_bytes(bytes(data))
    return dest


def _probs(results) -> np.ndarray:
    return np.array([[r.probs[k] for k in sorted(r.probs)] for r in results])


def test_from_pretrained_loads_the_cached_snapshot_offline_with_revision_pinning(exported, offline, tmp_path):
    folder, images = exported
    _lay_out(offline, "org/tiny", COMMIT_A, folder, refs=("v1",))
    _lay_out(offline, "org/tiny", COMMIT_B, _tampered(folder, tmp_path / "bad"), refs=("main",))
    want = _probs(Predictor.load(folder, device="cpu").predict(images))
    for revision in (COMMIT_A, "v1"):  # a commit, or a tag that points at it
        p = Predictor.from_pretrained("org/tiny", revision, device="cpu")
        assert np.array_equal(_probs(p.predict(images)), want)
    # main points at a snapshot whose weights were changed: the folder's SHA-256 check refuses it
    with pytest.raises(ExportError, match="SHA-256 differs"):
        Predictor.from_pretrained("org/tiny", device="cpu")
    # a local folder loads the same way (and takes no revision)
    assert np.array_equal(_probs(Predictor.from_pretrained(folder, device="cpu").predict(images)), want)
    with pytest.raises(ExportError, match="applies to Hub models only"):
        Predictor.from_pretrained(folder, "v1")
    with pytest.raises(ExportError, match="neither a local model folder nor a Hugging Face Hub model id"):
        Predictor.from_pretrained("no such/folder/here")


def test_predict_with_a_hub_model_id_writes_what_the_local_folder_gives(exported, offline, tmp_path, capsys):
    folder, images = exported
    _lay_out(offline, "org/tiny", COMMIT_A, folder)
    a, b = tmp_path / "hub.csv", tmp_path / "local.csv"
    assert main(["predict", "--model", "org/tiny", "--output", str(a), *map(str, images)]) == 0
    assert main(["predict", "--run", str(folder), "--output", str(b), *map(str, images)]) == 0
    assert list(csv.DictReader(open(a))) == list(csv.DictReader(open(b)))
    assert main(["predict", "--model", "org/tiny", "--revision", "nope", str(images[0])]) == 2
    err = capsys.readouterr().err
    assert "diffmic predict: error: the model 'org/tiny' at revision 'nope' is not in the Hugging Face cache" in err
    assert main(["predict", "--model", "org/tiny", "--run", str(folder), str(images[0])]) == 2
    assert "predict takes one model" in capsys.readouterr().err


def test_a_model_that_is_not_cached_offline_is_a_clear_error(exported, offline):
    folder, images = exported
    with pytest.raises(ExportError, match=r"'org/missing' is not in the Hugging Face cache .* offline mode is on"):
        Predictor.from_pretrained("org/missing")
    # the command line, in a fresh process configured by the environment only
    env = {**ONE_THREAD_ENV, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(offline)}
    proc = subprocess.run(
        [sys.executable, "-m", "diffmic.cli", "predict", "--model", "org/missing", str(images[0])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("diffmic predict: error: the model 'org/missing' is not in the Hugging Face cache")
    assert "Traceback" not in proc.stderr


class FakeApi:
    """Records what ``push_to_hub`` would send (the staged folder is copied before it is removed)."""

    def __init__(self, token=None):
        self.calls: list[tuple[str, dict]] = []
        self.files: dict[str, bytes] = {}

    def create_repo(self, **kw):
        self.calls.append(("create_repo", kw))
        return f"https://huggingface.co/{kw['repo_id']}"

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))
        self.files = {p.name: p.read_bytes() for p in Path(kw["folder_path"]).iterdir()}

        class Info:
            commit_url = f"https://huggingface.co/{kw['repo_id']}/commit/{COMMIT_A}"

        return Info()


def test_export_push_to_hub_uploads_the_folder_with_its_card(exported, offline, tmp_path, monkeypatch, capsys):
    folder, images = exported
    api = FakeApi()
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    run = folder.parent / "run"
    out = tmp_path / "model"
    assert main(["export", "--run", str(run), "--out", str(out), "--push-to-hub", "org/tiny", "--private"]) == 0
    assert (
        f"pushed it to the Hugging Face Hub: https://huggingface.co/org/tiny/commit/{COMMIT_A}"
        in capsys.readouterr().out
    )
    assert [c[0] for c in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "org/tiny", "repo_type": "model", "private": True, "exist_ok": True}
    assert api.calls[1][1]["repo_id"] == "org/tiny" and api.calls[1][1]["repo_type"] == "model"
    assert sorted(api.files) == ["MODEL_CARD.md", "README.md", "config.json", "model.safetensors"]
    for name in ("MODEL_CARD.md", "config.json", "model.safetensors"):
        assert api.files[name] == (out / name).read_bytes()
    readme = api.files["README.md"].decode()
    assert readme.startswith("---\nlibrary_name: diffmic\n") and "- medical-imaging" in readme
    assert (out / "MODEL_CARD.md").read_text().strip() in readme and 'Predictor.from_pretrained("org/tiny")' in readme
    assert sorted(p.name for p in out.iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    # what was uploaded, cached as a download would be, loads and predicts like the local folder
    upload = tmp_path / "uploaded"
    upload.mkdir()
    for name, data in api.files.items():
        (upload / name).write_bytes(data)
    _lay_out(offline, "org/tiny", COMMIT_A, upload)
    got = _probs(Predictor.from_pretrained("org/tiny", device="cpu").predict(images))
    assert np.array_equal(got, _probs(Predictor.load(out, device="cpu").predict(images)))


def test_push_refuses_a_damaged_folder_and_a_bad_id_before_uploading(exported, tmp_path, monkeypatch, capsys):
    from diffmic.inference.hub import push_to_hub

    folder, _ = exported
    api = FakeApi()
    with pytest.raises(ExportError, match="SHA-256 differs"):
        push_to_hub(_tampered(folder, tmp_path / "bad"), "org/tiny", api=api)
    with pytest.raises(ExportError, match="not a Hub model id"):
        push_to_hub(folder, "../etc", api=api)
    assert api.calls == []
    monkeypatch.setattr(hub, "HfApi", lambda token=None: api)
    out = tmp_path / "never"
    assert main(["export", "--run", str(folder.parent / "run"), "--out", str(out), "--push-to-hub", "a/b/c"]) == 2
    assert "not a Hub model id" in capsys.readouterr().err and not out.exists() and api.calls == []
