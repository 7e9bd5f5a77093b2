"""Issue 21.3: a model folder (``diffmic export``) is untrusted input. Every hostile folder is refused
with :class:`ExportError` (CLI exit 2) naming the file and key, before anything is built or allocated;
a good folder still loads and predicts exactly like its checkpoint."""

from __future__ import annotations

import functools
import hashlib
import json
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.cli import main
from diffmic.inference import Predictor
from diffmic.inference.export import ExportError, export_model, is_model_folder, load_model_folder

from _helpers import TINY_MODEL, one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["dark", "bright"]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A model folder exported from an untrained tiny model's checkpoint (no training needed)."""
    from diffmic.config import load_config
    from diffmic.training.module import DiffMICModule

    tmp = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    cfg = load_config("cpu_v1", [*TINY_MODEL, "data.image_size=32", "model.pretrained=false", "eval.steps=3"])
    module = DiffMICModule(cfg.to_dict(), 2, CLASSES)
    ckpt = tmp / "run" / "checkpoints" / "best.ckpt"
    ckpt.parent.mkdir(parents=True)
    hp = {"config": cfg.to_dict(), "num_classes": 2, "class_names": CLASSES}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hp}, ckpt)
    return export_model(ckpt=ckpt, out=tmp / "model")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("imgs")
    out = []
    for i, v in enumerate((60, 190, 120)):
        p = folder / f"img{i}.png"
        Image.fromarray(np.full((40, 36), v, dtype=np.uint8)).save(p)
        out.append(p)
    return out


# ------------------------------------------------------------------------------------ tampering


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit_config(folder: Path, fn, replace: bool = False) -> None:
    """``fn`` edits config.json's object in place (or, with ``replace``, returns what to write instead)."""
    cfg = folder / "config.json"
    meta = json.loads(cfg.read_text())
    out = fn(meta)
    cfg.write_text(json.dumps(out if replace else meta))


def _weights(folder: Path, data: bytes) -> None:
    """Replace the weights and, as an attacker would, the SHA-256 that config.json holds for them."""
    (folder / "model.safetensors").write_bytes(data)
    _edit_config(folder, lambda m: m.__setitem__("weights_sha256", hashlib.sha256(data).hexdigest()))


def _split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def _first_weight(header: dict) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32" and len(v["shape"]) == 2)


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _safetensors(state: dict) -> bytes:
    from safetensors.torch import save

    return save(state)


def _huge(f: Path) -> None:
    def edit(m):
        m["architecture"]["hidden_dim"] = 200_000
        m["config"]["model"]["hidden_dim"] = 200_000

    _edit_config(f, edit)


def _huge_arch_only(f: Path) -> None:
    _edit_config(f, lambda m: m["architecture"].__setitem__("hidden_dim", 200_000))


def _pickle(f: Path) -> None:
    _weights(f, pickle.dumps({k: v.numpy() for k, v in _state(f).items()}, protocol=4))


def _torch_save(f: Path) -> None:
    import io

    buf = io.BytesIO()
    torch.save(_state(f), buf)
    _weights(f, buf.getvalue())


def _truncated(f: Path) -> None:
    data = (f / "model.safetensors").read_bytes()
    _weights(f, data[: len(data) // 2])


def _lying_shape(f: Path) -> None:
    header, body = _split((f / "model.safetensors").read_bytes())
    k = _first_weight(header)
    header[k]["shape"] = [s * 1000 for s in header[k]["shape"]]  # offsets left as they are
    _weights(f, _join(header, body))


def _lying_offsets(f: Path) -> None:
    header, body = _split((f / "model.safetensors").read_bytes())
    k = _first_weight(header)
    b, e = header[k]["data_offsets"]
    header[k]["data_offsets"] = [b + 10**12, e + 10**12]
    _weights(f, _join(header, body))


def _overlapping_offsets(f: Path) -> None:
    header, body = _split((f / "model.safetensors").read_bytes())
    entries = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    b = entries[1][1]
    n = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    header[b]["data_offsets"] = [0, n]  # b now reads a's bytes
    _weights(f, _join(header, body))


def _header_length(f: Path) -> None:
    data = (f / "model.safetensors").read_bytes()
    _weights(f, struct.pack("<Q", 2**60) + data[8:])


def _wrong_shape(f: Path) -> None:
    state = _state(f)
    k = next(k for k, v in state.items() if v.ndim == 2)
    state[k] = torch.zeros(state[k].shape[0] + 1, state[k].shape[1])
    _weights(f, _safetensors(state))


def _missing_tensor(f: Path) -> None:
    state = _state(f)
    state.pop(sorted(state)[0])
    _weights(f, _safetensors(state))


def _extra_tensor(f: Path) -> None:
    state = _state(f)
    state["evil.extra"] = torch.zeros(3)
    _weights(f, _safetensors(state))


def _wrong_dtype(f: Path) -> None:
    state = _state(f)
    k = next(k for k, v in state.items() if v.dtype == torch.float32)
    state[k] = state[k].double()
    _weights(f, _safetensors(state))


def _missing_key(f: Path) -> None:
    _edit_config(f, lambda m: m.pop("architecture"))


def _mistyped_class_names(f: Path) -> None:
    _edit_config(f, lambda m: m.__setitem__("class_names", "dark,bright"))


def _mistyped_architecture(f: Path) -> None:
    _edit_config(f, lambda m: m["architecture"].__setitem__("hidden_dim", "64"))


def _mistyped_version(f: Path) -> None:
    _edit_config(f, lambda m: m.__setitem__("format_version", "one"))


def _unknown_architecture_key(f: Path) -> None:
    _edit_config(f, lambda m: m["architecture"].__setitem__("evil_kwarg", 1))


def _list(f: Path) -> None:
    _edit_config(f, lambda m: [m], replace=True)


def _not_json(f: Path) -> None:
    (f / "config.json").write_text('{"format": "diffmic-model", ')


def _duplicate_classes(f: Path) -> None:
    _edit_config(f, lambda m: m.__setitem__("class_names", ["dark", "dark"]))


def _class_count(f: Path) -> None:
    _edit_config(f, lambda m: m.__setitem__("class_names", ["dark", "bright", "grey"]))


def _config_section(f: Path) -> None:
    _edit_config(f, lambda m: m.__setitem__("config", ["model"]))


def _calibration(f: Path) -> None:
    _edit_config(f, lambda m: m.__setitem__("calibration", "temperature=2"))


# case -> (tamper, words the message must hold)
CASES = {
    "huge_hidden_dim": (_huge, ["config.json", "GiB", "nothing was allocated"]),
    "huge_hidden_dim_architecture_only": (_huge_arch_only, ["config.json", "architecture.hidden_dim", "200000"]),
    "pickle_instead_of_safetensors": (_pickle, ["model.safetensors", "not a safetensors file", "pickle"]),
    "torch_save_instead_of_safetensors": (_torch_save, ["model.safetensors", "not a safetensors file", "zip"]),
    "truncated": (_truncated, ["model.safetensors", "truncated"]),
    "header_lies_about_shape": (_lying_shape, ["model.safetensors", "shape"]),
    "header_lies_about_offsets": (_lying_offsets, ["model.safetensors", "truncated"]),
    "header_overlapping_offsets": (_overlapping_offsets, ["model.safetensors", "overlap"]),
    "header_length": (_header_length, ["model.safetensors", "not a safetensors file"]),
    "tensor_shape_differs_from_config": (_wrong_shape, ["model.safetensors", "shape", "config.json"]),
    "missing_tensor": (_missing_tensor, ["model.safetensors", "missing"]),
    "unexpected_tensor": (_extra_tensor, ["model.safetensors", "evil.extra"]),
    "tensor_dtype": (_wrong_dtype, ["model.safetensors", "F64"]),
    "missing_key": (_missing_key, ["config.json", "'architecture'"]),
    "mistyped_class_names": (_mistyped_class_names, ["config.json", "class_names"]),
    "mistyped_architecture_value": (_mistyped_architecture, ["config.json", "architecture.hidden_dim"]),
    "mistyped_format_version": (_mistyped_version, ["config.json", "format_version"]),
    "unknown_architecture_key": (_unknown_architecture_key, ["config.json", "evil_kwarg"]),
    "list_instead_of_object": (_list, ["config.json", "JSON object", "list"]),
    "not_json": (_not_json, ["config.json", "not valid JSON"]),
    "duplicate_class_names": (_duplicate_classes, ["config.json", "class_names", "'dark'", "twice"]),
    "class_count": (_class_count, ["config.json", "class_names", "num_classes"]),
    "config_not_an_object": (_config_section, ["config.json", "'config'"]),
    "calibration_not_an_object": (_calibration, ["config.json", "'calibration'"]),
}


def _hostile(good: Path, tmp_path: Path, case: str) -> Path:
    folder = tmp_path / case
    shutil.copytree(good, folder)
    CASES[case][0](folder)
    return folder


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_model_folder_is_refused_before_anything_is_built(good, tmp_path, monkeypatch, case):
    import diffmic.nn.diffmic as nn_diffmic

    folder = _hostile(good, tmp_path, case)
    assert is_model_folder(folder)  # recognised as a model folder, so its own error is given
    built = []
    real_init = nn_diffmic.DiffMIC.__init__

    @functools.wraps(real_init)  # keeps DiffMIC's signature (the loader reads it)
    def spy(self, *a, **k):  # records every DiffMIC built on a real (not meta) device
        real_init(self, *a, **k)
        if any(p.device.type != "meta" for p in self.parameters()):
            built.append(k.get("hidden_dim"))

    monkeypatch.setattr(nn_diffmic.DiffMIC, "__init__", spy)
    with pytest.raises(ExportError) as ei:
        load_model_folder(folder)
    msg = str(ei.value)
    for word in CASES[case][1]:
        assert word in msg, (word, msg)
    assert str(folder) in msg  # the file is named with its path
    assert built == []  # refused before the real model was built (nothing allocated)


@pytest.mark.parametrize(
    "case", ["huge_hidden_dim", "pickle_instead_of_safetensors", "list_instead_of_object", "duplicate_class_names"]
)
def test_predict_with_a_hostile_model_folder_exits_2_without_traceback(good, images, tmp_path, capsys, case):
    folder = _hostile(good, tmp_path, case)
    rc = main(["predict", "--run", str(folder), str(images[0])])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("diffmic predict: error: ") and str(folder) in err


def test_good_folder_still_loads_and_predicts_like_its_checkpoint(good, images):
    ckpt = good.parent / "run" / "checkpoints" / "best.ckpt"
    ref = Predictor.from_checkpoint(ckpt, device="cpu").predict(images)
    got = Predictor.load(good, device="cpu").predict(images)
    assert [r.label for r in got] == [r.label for r in ref]
    for a, b in zip(ref, got):
        assert np.allclose(list(a.probs.values()), list(b.probs.values()), atol=1e-6)
    assert load_model_folder(good).class_names == CLASSES


# ----------------------------------------------------------------------- issue 21.12: export --out


@pytest.mark.parametrize("target", ["empty_folder", "missing"])
def test_export_never_writes_through_a_symlinked_out_folder(good, tmp_path, capsys, target):
    ckpt = good.parent / "run" / "checkpoints" / "best.ckpt"
    elsewhere = tmp_path / "elsewhere"
    if target == "empty_folder":
        elsewhere.mkdir()
    link = tmp_path / "out"
    link.symlink_to(elsewhere, target_is_directory=True)
    rc = main(["export", "--ckpt", str(ckpt), "--out", str(link)])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("diffmic export: error: ") and "symbolic link" in err and str(link) in err
    assert link.is_symlink()  # left as it was
    assert (sorted(elsewhere.iterdir()) == []) if target == "empty_folder" else not elsewhere.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out"] + (["elsewhere"] if elsewhere.exists() else []))


def test_export_never_removes_a_temporary_folder_it_did_not_create(good, tmp_path):
    import os

    ckpt = good.parent / "run" / "checkpoints" / "best.ckpt"
    stale = tmp_path / f".m.tmp-{os.getpid()}"
    stale.mkdir()
    (stale / "notes.txt").write_text("mine")
    out = export_model(ckpt=ckpt, out=tmp_path / "m")
    assert (stale / "notes.txt").read_text() == "mine"
    assert is_model_folder(out) and load_model_folder(out).class_names == CLASSES
