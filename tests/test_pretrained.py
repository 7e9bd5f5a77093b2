"""`model.pretrained`: local torchvision/timm state dicts (.pth, .safetensors, folders), torchvision's
cache for `true`, clear errors offline and for files that do not fit the backbone."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffmic.cli import main
from diffmic.config import load_config
from diffmic.nn.diffmic import DiffMIC
from diffmic.nn.encoders import WeightsError, create_encoder, small_resnet
from diffmic.training.module import build_model

from _helpers import TINY_MODEL


def _reference_state(seed: int = 3, width: int = 16) -> dict[str, torch.Tensor]:
    """A torchvision-style ResNet-10 state dict (with its fc head), built independently of the registry:
    the same module layout from torchvision's BasicBlock, random weights."""
    torch.manual_seed(seed)
    enc = small_resnet(width=width)
    sd = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in enc.state_dict().items()}
    sd["fc.weight"] = torch.randn(1000, 8 * width)  # the classifier head a torchvision file has
    sd["fc.bias"] = torch.randn(1000)
    return sd


def _same(module: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return all(torch.equal(own[k], v) for k, v in sd.items() if k in own) and {
        k for k in sd if not k.startswith("fc.")
    } == set(own)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_file_is_loaded_into_every_backbone(tmp_path, suffix):
    sd = _reference_state()
    f = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, f)  # DDP-style container
    else:
        save_file(sd, str(f))
    m = DiffMIC(
        2,
        encoder="resnet10_tiny",
        dcg_global="resnet10_tiny",
        dcg_local="resnet10_tiny",
        hidden_dim=16,
        pretrained=str(f),
    )
    assert _same(m.image_embedding.encoder, sd)
    assert _same(m.dcg.global_encoder, sd)
    assert _same(m.dcg.local_encoder, sd)
    # the rest of the network stays randomly initialised
    assert not torch.equal(m.denoiser.state_dict()[next(iter(m.denoiser.state_dict()))], torch.zeros(1))


def test_config_key_reaches_the_model_and_specific_files_win(tmp_path):
    sd, other = _reference_state(1), _reference_state(2)
    f, g = tmp_path / "a.safetensors", tmp_path / "b.pth"
    save_file(sd, str(f))
    torch.save(other, g)
    cfg = load_config("cpu_v1", [*TINY_MODEL, f"model.pretrained={f}", f"model.encoder_weights={g}"])
    m = build_model(cfg, 3)
    assert _same(m.image_embedding.encoder, other)  # model.encoder_weights wins for rho(x)
    assert _same(m.dcg.global_encoder, sd) and _same(m.dcg.local_encoder, sd)
    # one-channel input: the 3-channel stem is summed over RGB (timm convention)
    enc = create_encoder("resnet10_tiny", in_chans=1, pretrained=f)
    assert torch.allclose(enc.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))


def test_folder_lookup_by_backbone_name(tmp_path):
    sd = _reference_state()
    torch.save(sd, tmp_path / "resnet10_tiny-0123abcd.pth")  # torch hub cache naming
    assert _same(create_encoder("resnet10_tiny", pretrained=tmp_path), sd)
    with pytest.raises(WeightsError, match=r"no weights for backbone 'resnet18'.*resnet18\.safetensors"):
        create_encoder("resnet18", pretrained=tmp_path)


def test_file_that_does_not_fit_names_the_keys(tmp_path):
    wrong_width = tmp_path / "w8.pth"
    torch.save(_reference_state(width=8), wrong_width)
    with pytest.raises(
        WeightsError,
        match=r"w8\.pth.*shape mismatches: bn1\.bias \(file \(8,\), "
        r"model \(16,\)\).*\(60 in all\)",
    ):
        create_encoder("resnet10_tiny", pretrained=wrong_width)
    sd = _reference_state()
    del sd["layer4.0.conv2.weight"]
    sd["extra.block.weight"] = torch.zeros(3)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(WeightsError) as ei:
        create_encoder("resnet10_tiny", pretrained=bad)
    msg = str(ei.value)
    assert "missing keys: layer4.0.conv2.weight" in msg and "unexpected keys: extra.block.weight" in msg
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_encoder("resnet10_tiny", pretrained=tmp_path / "nope.pth")


def test_true_without_published_weights_is_a_clear_error():
    with pytest.raises(WeightsError, match="resnet10_tiny' has no published ImageNet weights"):
        create_encoder("resnet10_tiny", pretrained=True)


@pytest.fixture
def hub_dir(tmp_path):
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(old)


def test_true_uses_torchvision_cache_and_fails_offline_with_instructions(hub_dir, monkeypatch):
    from torchvision.models import ResNet18_Weights

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    name = Path(ResNet18_Weights.DEFAULT.url).name  # resnet18-<hash>.pth
    with pytest.raises(WeightsError) as ei:
        create_encoder("resnet18", pretrained=True)
    msg = str(ei.value)
    assert ResNet18_Weights.DEFAULT.url in msg and str(hub_dir / "checkpoints" / name) in msg
    assert "model.pretrained=false" in msg
    # the file in torchvision's cache: `true` works offline, exactly these weights
    from torchvision.models import resnet18

    torch.manual_seed(0)
    sd = resnet18().state_dict()
    (hub_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    torch.save(sd, hub_dir / "checkpoints" / name)
    enc = create_encoder("resnet18", pretrained=True)
    assert torch.equal(enc.layer3[1].conv2.weight, sd["layer3.1.conv2.weight"])
    assert torch.equal(enc.bn1.running_var, sd["bn1.running_var"])


def test_fit_with_a_bad_file_exits_2_naming_the_keys(tmp_path, capsys):
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            # distinct pixels per class: identical images in two splits are an error (leakage)
            Image.fromarray(np.full((16, 16, 3), 40 * i + (7 if c == "b" else 0), dtype=np.uint8)).save(
                root / c / f"{i}.png"
            )
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(2, 2), "conv9.weight": torch.zeros(1)}, bad)
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            *TINY_MODEL,
            "data.dataset=folder",
            f"data.root={root}",
            "data.split=random",
            "data.test_fraction=0.5",
            "data.val_fraction=0",
            "data.image_size=32",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"model.pretrained={bad}",
            f"run.dir={tmp_path / 'run'}",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "bad.pth" in err and "unexpected keys: conv9.weight" in err and "missing keys: bn1.bias" in err
