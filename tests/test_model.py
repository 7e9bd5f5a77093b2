"""DiffMIC model: variants, priors, parameter count, backbones, hparams rebuild."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffmic.nn import VARIANTS, DiffMIC, GuidanceOutput

TINY = dict(
    encoder="resnet10_tiny",
    hidden_dim=32,
    num_timesteps=50,
    dcg_global="resnet10_tiny",
    dcg_local="resnet10_tiny",
    crop_size=16,
)


def _step(model: DiffMIC, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One training-style forward returning a scalar loss."""
    if not model.uses_diffusion:
        return F.cross_entropy(model.classify(x), y)
    b, c = x.shape[0], model.num_classes
    feat = model.encode(x)
    g = model.guide(x)
    with torch.no_grad():
        pri = (
            model.priors(g, b, x.device, x.dtype)
            if g is None
            else model.priors(GuidanceOutput(*(v.detach() for v in g)), b, x.device, x.dtype)
        )
    t = torch.randint(0, model.num_timesteps, (b,))
    y0 = F.one_hot(y, c).float()
    noise = torch.randn(b, c)
    y_t = y0 + noise + pri.fused  # shape-level stand-in for q_sample
    loss = F.mse_loss(model.eps(feat, y_t, t, pri.fused), noise)
    if model.uses_mmd:
        loss = (
            loss + model.eps(feat, y_t, t, pri.global_).pow(2).mean() + model.eps(feat, y_t, t, pri.local).pow(2).mean()
        )
    if g is not None:
        loss = loss + F.cross_entropy(g.z_fused, y)
    return loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_variants_forward_backward(variant: str) -> None:
    torch.manual_seed(0)
    model = DiffMIC(3, variant=variant, **TINY)
    assert model.uses_diffusion == (variant != "basic")
    assert model.uses_dcg == (variant in ("C2", "full"))
    assert model.uses_mmd == (variant == "full")
    assert (model.dcg is not None) == model.uses_dcg
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 1])
    loss = _step(model, x, y)
    assert torch.isfinite(loss)
    loss.backward()
    if variant == "basic":
        assert model.classifier.weight.grad is not None
        with pytest.raises(RuntimeError):
            model.eps(torch.randn(4, 32), torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    else:
        assert all(p.grad is not None for p in model.denoiser.parameters())
        assert model.image_embedding.proj.weight.grad is not None
        assert model.denoiser.use_guidance == model.uses_dcg
        with pytest.raises(RuntimeError):
            model.classify(x)
    if model.dcg is not None:
        assert model.dcg.saliency_head.weight.grad is not None
    for p in model.parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("encoder", ["resnet18", "resnet10_tiny", "timm:resnet10t", "tv:mobilenet_v3_small"])
def test_backbones(encoder: str) -> None:
    torch.manual_seed(0)
    model = DiffMIC(
        3,
        variant="full",
        **{**TINY, "encoder": encoder, "dcg_global": encoder, "dcg_local": "resnet10_tiny", "num_rois": 3},
    )
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    loss = _step(model, x, y)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.denoiser.out.weight.grad is not None


def test_priors() -> None:
    torch.manual_seed(0)
    g = GuidanceOutput(
        torch.randn(2, 3),
        torch.randn(2, 3),
        torch.zeros(2, 3),
        torch.zeros(2, 3, 1, 1),
        torch.zeros(2, 1, 4, dtype=torch.long),
        torch.ones(2, 1),
    )
    m = DiffMIC(3, variant="C2", **TINY)
    p = m.priors(g, 2, None, torch.float32)
    torch.testing.assert_close(p.fused, torch.softmax(0.5 * (g.z_global + g.z_local), -1))
    torch.testing.assert_close(p.global_, torch.softmax(g.z_global, -1))
    torch.testing.assert_close(p.local, torch.softmax(g.z_local, -1))
    m = DiffMIC(3, variant="full", prior="sum_probs", **TINY)
    torch.testing.assert_close(m.priors(g, 2).fused, p.global_ + p.local)
    # prior=zero is the released --noise_prior: only the fused prior MEAN is 0; the fused guidance
    # vector stays softmax(½(z_g + z_l)) and the global / local branches are unchanged
    m = DiffMIC(3, variant="full", prior="zero", **TINY)
    z = m.priors(g, 2)
    assert torch.count_nonzero(z.fused) == 0
    torch.testing.assert_close(z.guidance, torch.softmax(0.5 * (g.z_global + g.z_local), -1))
    torch.testing.assert_close(z.global_, torch.softmax(g.z_global, -1))
    torch.testing.assert_close(z.local, torch.softmax(g.z_local, -1))
    gf, gg, gl = m.branch_guidance(z)
    assert gf is z.guidance and gg is z.global_ and gl is z.local
    c1 = DiffMIC(3, variant="C1", **TINY)
    assert c1.guide(torch.randn(2, 3, 32, 32)) is None
    z = c1.priors(None, 2, torch.device("cpu"), torch.float64)
    assert z.fused.shape == (2, 3) and z.fused.dtype == torch.float64 and torch.count_nonzero(z.fused) == 0


def test_paper_denoiser_input_is_yt_and_both_dcg_vectors() -> None:
    """model.denoiser_input=paper: the first layer reads [y_t, ŷ_g, ŷ_l] (3C) in every branch;
    its weights act on exactly those columns (checked by a hand-built first-layer product)."""
    torch.manual_seed(0)
    g = GuidanceOutput(
        torch.randn(2, 3),
        torch.randn(2, 3),
        torch.zeros(2, 3),
        torch.zeros(2, 3, 1, 1),
        torch.zeros(2, 1, 4, dtype=torch.long),
        torch.ones(2, 1),
    )
    m = DiffMIC(3, variant="full", denoiser_input="paper", **TINY).eval()
    assert m.denoiser.layers[0].lin.in_features == 9 and m.hparams["denoiser_input"] == "paper"
    pri = m.priors(g, 2)
    want = torch.cat((torch.softmax(g.z_global, -1), torch.softmax(g.z_local, -1)), -1)
    torch.testing.assert_close(pri.guidance, want)
    assert all(v is pri.guidance for v in m.branch_guidance(pri))
    y_t, t = torch.randn(2, 3), torch.tensor([3, 7])
    layer = m.denoiser.layers[0]
    by_hand = (torch.cat((y_t, want), -1) @ layer.lin.weight.T + layer.lin.bias) * layer.embed.weight[t]
    torch.testing.assert_close(layer(torch.cat((y_t, pri.guidance), -1), t), by_hand)
    out = m.eps(torch.randn(2, 32), y_t, t, pri.guidance)
    assert out.shape == (2, 3)
    # the released form stays 2C and ignores ŷ_l in the fused branch
    r = DiffMIC(3, variant="full", **TINY)
    assert r.denoiser.layers[0].lin.in_features == 6 and "denoiser_input" not in r.hparams
    with pytest.raises(ValueError, match="denoiser_input"):
        DiffMIC(3, denoiser_input="eq3", **TINY)


def test_hparams_rebuild() -> None:
    m = DiffMIC(3, variant="full", roi_channels="first", prior="mean_probs", **TINY)
    m2 = DiffMIC(**m.hparams)
    m2.load_state_dict(m.state_dict(), strict=True)
    assert m2.hparams == m.hparams and m2.dcg.roi_channels == "first"


def test_hparams_are_the_call_arguments_in_signature_order_with_defaults(tmp_path) -> None:
    """Positional or keyword, every argument is recorded once, in signature order, normalised (paths as
    strings, ints); the arguments added later (denoiser_input, encoder_kwargs, freeze_stride) only
    when set, so the hparams of older checkpoints keep their keys."""
    m = DiffMIC(3, "C1", "resnet10_tiny", 16, 2, num_timesteps=50.0, encoder_weights=None, freeze_stride=0)
    assert list(m.hparams.items()) == [
        ("num_classes", 3),
        ("variant", "C1"),
        ("encoder", "resnet10_tiny"),
        ("hidden_dim", 16),
        ("num_layers", 2),
        ("num_timesteps", 50),
        ("dcg_global", "resnet18"),
        ("dcg_local", "resnet18"),
        ("num_rois", 6),
        ("crop_size", 32),
        ("roi_channels", "rgb"),
        ("prior", "softmax_mean_logits"),
        ("in_chans", 3),
        ("encoder_weights", None),
        ("dcg_weights", None),
        ("pretrained", None),
        ("dcg_output_stride", 32),
        ("roi_select", "sum"),
    ]
    assert type(m.hparams["num_timesteps"]) is int
    m = DiffMIC(2, "basic", "resnet10_tiny", encoder_kwargs={}, denoiser_input="paper", freeze_stride=8)
    assert m.hparams["denoiser_input"] == "paper" and m.hparams["freeze_stride"] == 8
    assert "encoder_kwargs" not in m.hparams
    dcg = DiffMIC(2, "dcg", dcg_global="resnet10_tiny", dcg_local="resnet10_tiny", dcg_weights=(None, None))
    assert dcg.hparams["dcg_weights"] == (None, None) and dcg.image_embedding is None and dcg.dcg is not None
    weights = tmp_path / "w.pth"
    torch.save(m.encoder.state_dict(), weights)
    assert DiffMIC(2, "basic", "resnet10_tiny", encoder_weights=weights).hparams["encoder_weights"] == str(weights)


def test_validation_errors() -> None:
    with pytest.raises(ValueError, match="variant"):
        DiffMIC(3, variant="C3", **TINY)
    with pytest.raises(ValueError, match="prior"):
        DiffMIC(3, prior="median", **TINY)
    with pytest.raises(ValueError, match="roi_channels"):
        DiffMIC(3, roi_channels="red", **TINY)


def test_default_parameter_count() -> None:
    """Released ConditionalModel for C=7: ResNet-18 ρ + 6144-wide 3-layer MLP ≈ 108.5 M parameters."""
    m = DiffMIC(7, variant="full")
    n = sum(p.numel() for p in m.image_embedding.parameters()) + sum(p.numel() for p in m.denoiser.parameters())
    assert abs(n - 108.5e6) / 108.5e6 < 0.005
    trunk = sum(p.numel() for p in m.image_embedding.encoder.parameters())
    assert abs(trunk - 11.18e6) / 11.18e6 < 0.005
    assert m.image_embedding.proj.weight.shape == (6144, 512)
    assert [layer.embed.weight.shape for layer in m.denoiser.layers] == [(1001, 6144)] * 3
