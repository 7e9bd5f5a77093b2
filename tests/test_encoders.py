"""Encoder registry: names, shapes, in_chans, local weights loading and error messages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from diffmic.nn.encoders import available_encoders, create_encoder, register_encoder


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
