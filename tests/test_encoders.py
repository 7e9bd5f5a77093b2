"""Encoder registry: names, shapes, in_chans, local weights loading, error messages, and the timm-built
encoders against the construction they replaced."""

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


def test_a_registered_factory_must_return_an_encoder() -> None:
    register_encoder("_test_not_an_encoder")(lambda in_chans, spatial: nn.Conv2d(in_chans, 4, 1))
    with pytest.raises(TypeError, match="returned a Conv2d, not a diffmic.nn.encoders.Encoder"):
        create_encoder("_test_not_an_encoder")


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


# --------------------------------------------------------------------------------------------------
# The timm-built registered encoders against the construction they replaced (same seed, same weights)
# --------------------------------------------------------------------------------------------------


class _HandWrittenResNet(nn.Module):
    """diffmic's ResNet before the registry used timm (the oracle): BasicBlock stages of ``width * 2**i``
    channels, torchvision key names and initialisation, a 1000-class head."""

    def __init__(self, width: int, layers=(1, 1, 1, 1)) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, (n, mult) in enumerate(zip(layers, (1, 2, 4, 8))):
            planes, stride = width * mult, (1 if i == 0 else 2)
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(
                    nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(planes)
                )
            blocks = [BasicBlock(inplanes, planes, stride, down)]
            blocks += [BasicBlock(planes, planes) for _ in range(n - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.fc = nn.Linear(inplanes, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def _old_construction(name: str, in_chans: int) -> nn.Module:
    """The network the registered name was built from before (torchvision's, or the hand-written ResNet),
    with the stem replaced for ``in_chans != 3`` after construction, as the old code did."""
    if name == "resnet10_tiny":
        ref: nn.Module = _HandWrittenResNet(16)
    elif name == "resnet10":
        ref = _HandWrittenResNet(64)
    else:
        ref = tvm.get_model(name, weights=None)
    if in_chans != 3:
        stem = ref.features.conv0 if name == "densenet121" else ref.conv1
        new = nn.Conv2d(in_chans, stem.out_channels, 7, stride=2, padding=3, bias=False)
        if name == "densenet121":
            ref.features.conv0 = new
        else:
            ref.conv1 = new
    return ref


def _old_features(ref: nn.Module, name: str, x: torch.Tensor, spatial: bool) -> torch.Tensor:
    if name == "densenet121":
        f = torch.relu(ref.features(x))
    else:
        f = x
        for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            f = getattr(ref, n)(f)
    return f if spatial else f.mean(dim=(2, 3))


@pytest.mark.parametrize(
    ("name", "in_chans", "spatial"),
    [
        ("resnet10_tiny", 3, True),
        ("resnet10_tiny", 1, False),
        ("resnet10", 3, False),
        ("resnet18", 1, True),
        ("resnet34", 3, False),
        ("resnet50", 3, True),
        ("densenet121", 3, False),
        ("densenet121", 2, True),
    ],
)
def test_timm_built_encoders_draw_and_compute_what_the_old_construction_did(name, in_chans, spatial, one_thread):
    """Same seed: the same initial weights under the same keys and the same random stream afterwards;
    an old-format state dict loaded into the new encoder gives the old features."""
    torch.manual_seed(7)
    ref = _old_construction(name, in_chans).eval()
    after_old = torch.rand(4)
    torch.manual_seed(7)
    enc = create_encoder(name, in_chans=in_chans, spatial=spatial).eval()
    assert torch.equal(torch.rand(4), after_old)
    old_sd = {k: v for k, v in ref.state_dict().items() if not k.startswith(("fc.", "classifier."))}
    new_sd = enc.state_dict()
    assert list(new_sd) == list(old_sd)
    assert all(torch.equal(new_sd[k], old_sd[k]) for k in old_sd)
    # trained-looking weights (not the initial ones): perturb every tensor, load the old format, compare
    g = torch.Generator().manual_seed(1)
    trained = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in old_sd.items()
    }
    ref.load_state_dict(trained, strict=False)
    enc.load_state_dict(trained, strict=True)
    x = torch.randn(2, in_chans, 64, 64, generator=g)
    with torch.no_grad():
        want, got = _old_features(ref, name, x, spatial), enc(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_a_narrow_resnet_at_a_reduced_output_stride_computes_what_the_old_one_did(output_stride, one_thread):
    """The DCG's global stream (model.dcg_output_stride): strides removed without dilation, as before."""
    from diffmic.nn.encoders import set_output_stride, small_resnet

    torch.manual_seed(3)
    ref = set_output_stride(_HandWrittenResNet(2), output_stride).eval()
    torch.manual_seed(3)
    enc = set_output_stride(small_resnet(3, spatial=True, width=2), output_stride).eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(enc.state_dict()[k], sd[k]) for k in sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, got = _old_features(ref, "resnet10", x, spatial=True), enc(x)
    assert got.shape[-1] == 64 // output_stride
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_freeze_stride_on_a_timm_built_resnet_freezes_the_early_layers_only(one_thread):
    enc = create_encoder("resnet10_tiny", freeze_stride=8)
    assert enc._frozen_names == ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
    enc.train()
    assert not any(p.requires_grad for p in enc.layer2.parameters()) and not enc.layer2.training
    assert all(p.requires_grad for p in enc.layer3.parameters()) and enc.layer3.training
    before = enc.bn1.running_mean.clone()
    enc(torch.randn(2, 3, 32, 32))
    assert torch.equal(enc.bn1.running_mean, before)  # frozen batch norms keep their statistics


@pytest.mark.parametrize(
    ("name", "head"),
    [
        ("tv:shufflenet_v2_x0_5", "fc"),
        ("tv:mnasnet0_5", "classifier"),
        ("tv:regnet_y_400mf", "fc"),
        ("tv:densenet121", "classifier"),
        ("convnext_tiny", "classifier.2"),
    ],
)
def test_a_torchvision_family_pools_what_its_own_forward_feeds_the_classifier(name, head, one_thread):
    """The trunk table (_tv_layouts()) against torchvision's forward with the last Linear removed."""
    torch.manual_seed(5)
    enc = create_encoder(name).eval()
    torch.manual_seed(5)
    ref = tvm.get_model(name.removeprefix("tv:"), weights=None).eval()
    own, theirs = enc.state_dict(), ref.state_dict()
    assert set(theirs) - set(own) == {k for k in theirs if k.startswith(head.split(".")[0] + ".")} - set(own)
    assert all(torch.equal(v, theirs[k]) for k, v in own.items())
    parent, _, leaf = head.rpartition(".")
    setattr(ref.get_submodule(parent) if parent else ref, leaf, nn.Identity())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), rtol=1e-5, atol=1e-5)
