"""Encoder registry: names, shapes, in_chans, local weights loading and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from diffmic.nn.encoders import available_encoders, create_encoder, register_encoder, timm_encoder_kwargs


@pytest.mark.parametrize(
    "name", ["resnet10_tiny", "resnet18", "mobilenet_v3_small", "tv:mobilenet_v3_small", "timm:resnet10t"]
)
@pytest.mark.parametrize("spatial", [False, True])
def test_shapes(name: str, spatial: bool) -> None:
    enc = create_encoder(name, spatial=spatial)
    y = enc(torch.randn(2, 3, 64, 64))
    if spatial:
        assert y.dim() == 4 and y.shape[:2] == (2, enc.out_dim)
    else:
        assert y.shape == (2, enc.out_dim)


def test_pooled_is_mean_of_spatial() -> None:
    torch.manual_seed(0)
    pooled = create_encoder("resnet10_tiny").eval()
    spatial = create_encoder("resnet10_tiny", spatial=True).eval()
    spatial.load_state_dict(pooled.state_dict())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(pooled(x), spatial(x).mean(dim=(2, 3)))


def test_known_out_dims() -> None:
    assert create_encoder("resnet18").out_dim == 512
    assert create_encoder("resnet10").out_dim == 512
    assert create_encoder("resnet10_tiny").out_dim == 128


@pytest.mark.parametrize("name", ["resnet10_tiny", "timm:resnet10t", "tv:mobilenet_v3_small"])
def test_in_chans(name: str) -> None:
    enc = create_encoder(name, in_chans=1)
    assert enc(torch.randn(2, 1, 32, 32)).shape == (2, enc.out_dim)


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="resnet18"):
        create_encoder("no_such_net")
    with pytest.raises(ValueError, match="torchvision"):
        create_encoder("tv:no_such_net")
    with pytest.raises(ValueError, match="timm"):
        create_encoder("timm:no_such_net")


def test_register_encoder() -> None:
    @register_encoder("_test_dummy")
    def _dummy(in_chans: int, spatial: bool) -> nn.Module:
        return create_encoder("resnet10_tiny", in_chans=in_chans, spatial=spatial)

    assert "_test_dummy" in available_encoders()
    assert create_encoder("_test_dummy").out_dim == 128
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("_test_dummy")(_dummy)


@pytest.mark.parametrize("name", ["resnet10_tiny", "timm:resnet10t"])
def test_weights_round_trip(tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    src = create_encoder(name).eval()
    path = tmp_path / "enc.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = create_encoder(name, weights_path=path).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_native_torchvision_checkpoint_with_prefix_and_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = tvm.resnet18().eval()
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    enc = create_encoder("resnet18", weights_path=path).eval()
    ref.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), ref(x))
    # 3-channel stem weights adapt to a 1-channel input (summed over RGB)
    enc1 = create_encoder("resnet18", in_chans=1, weights_path=path)
    torch.testing.assert_close(enc1.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))


def test_weights_errors(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        create_encoder("resnet10_tiny", weights_path=missing)
    wrong = tmp_path / "wrong.pt"
    torch.save(create_encoder("resnet10").state_dict(), wrong)
    with pytest.raises(RuntimeError, match="wrong.pt"):
        create_encoder("resnet10_tiny", weights_path=wrong)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pt"):
        create_encoder("resnet10_tiny", weights_path=garbage)


# ------------------------------------------------------------------ timm kwargs (transformer baselines)

VIT = "timm:vit_tiny_patch16_224"


def test_timm_kwargs_reach_the_model() -> None:
    enc = create_encoder(VIT, kwargs={"img_size": 32, "patch_size": 8})
    vit = enc.model
    assert tuple(vit.patch_embed.patch_size) == (8, 8)
    assert tuple(vit.patch_embed.grid_size) == (4, 4)
    assert vit.pos_embed.shape[1] == 4 * 4 + vit.num_prefix_tokens  # the 4x4 grid (+ class token)
    assert enc(torch.randn(2, 3, 32, 32)).shape == (2, enc.out_dim)
    with pytest.raises(ValueError, match="does not take encoder kwargs"):
        create_encoder(VIT, kwargs={"no_such_argument": 1})
    with pytest.raises(ValueError, match="only apply to timm encoders"):
        create_encoder("resnet10_tiny", kwargs={"img_size": 32})
    with pytest.raises(ValueError, match="may not set in_chans"):
        create_encoder(VIT, kwargs={"in_chans": 1})


def test_img_size_follows_the_image_size_for_fixed_size_timm_models() -> None:
    assert timm_encoder_kwargs(VIT, {"patch_size": 8}, 48) == {"patch_size": 8, "img_size": 48}
    assert timm_encoder_kwargs(VIT, {"img_size": 32}, 48) == {"img_size": 32}  # given wins
    assert timm_encoder_kwargs("timm:swin_tiny_patch4_window7_224", {}, 64)["img_size"] == 64
    assert timm_encoder_kwargs("timm:pvt_v2_b0", {}, 64) == {}  # any input size: no img_size argument
    assert timm_encoder_kwargs("timm:resnet10t", None, 64) == {}
    assert timm_encoder_kwargs("resnet18", None, 64) == {}

    from diffmic.config import load_config
    from diffmic.training.module import build_model

    cfg = load_config(None, ["model.variant=basic", f"model.encoder={VIT}", "model.encoder_kwargs={patch_size: 8}"])
    cfg.data.image_size = 48  # a 6x6 token grid
    m = build_model(cfg, 3)
    assert m.hparams["encoder_kwargs"] == {"patch_size": 8, "img_size": 48}
    assert tuple(m.encoder.model.patch_embed.grid_size) == (6, 6)
    assert m.classify(torch.randn(2, 3, 48, 48)).shape == (2, 3)


@pytest.mark.parametrize(
    "value, match",
    [
        ("3", "expected a mapping"),
        ("[8, 8]", "expected a mapping"),
        ("{1: 8}", "keys must be argument names"),
        ("{num_classes: 5}", "may not set num_classes"),
    ],
)
def test_bad_encoder_kwargs_name_the_key(value: str, match: str) -> None:
    from diffmic.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"model\.encoder_kwargs.*{match}"):
        load_config(None, [f"model.encoder={VIT}", f"model.encoder_kwargs={value}"])


def test_timm_vit_basic_checkpoint_round_trip(tmp_path: Path) -> None:
    from diffmic.config import load_config
    from diffmic.training.checkpoint import load_module
    from diffmic.training.module import DiffMICModule

    over = [
        "model.variant=basic",
        f"model.encoder={VIT}",
        "model.encoder_kwargs={patch_size: 8}",
        "data.image_size=32",
        "train.use_ema=false",
    ]
    cfg = load_config(None, over)
    torch.manual_seed(0)
    module = DiffMICModule(cfg.to_dict(), 3, ["a", "b", "c"]).eval()
    path = tmp_path / "vit.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    torch.manual_seed(1)
    loaded = load_module(path)
    vit = loaded.model.encoder.model
    assert vit.pos_embed.shape == module.model.encoder.model.pos_embed.shape == (1, 17, 192)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.classify(x), module.model.classify(x), rtol=0, atol=0)
    assert loaded.model.hparams["encoder_kwargs"] == {"patch_size": 8, "img_size": 32}
    # an exported model folder rebuilds from the hparams alone (DiffMIC(**architecture))
    from diffmic.nn.diffmic import DiffMIC

    rebuilt = DiffMIC(**loaded.model.hparams).eval()
    rebuilt.load_state_dict(loaded.model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.classify(x), module.model.classify(x), rtol=0, atol=0)
