"""ConditionalLinear, ImageEmbedding and ConditionalDenoiser."""

from __future__ import annotations

import pytest
import torch

from diffmic.nn.denoiser import ConditionalDenoiser, ConditionalLinear, ImageEmbedding


def test_conditional_linear() -> None:
    torch.manual_seed(0)
    cl = ConditionalLinear(5, 7, num_timesteps=20)
    assert cl.embed.weight.shape == (21, 7)
    w = cl.embed.weight
    assert w.min() >= 0.0 and w.max() <= 1.0
    x, t = torch.randn(4, 5), torch.tensor([0, 3, 19, 20])
    torch.testing.assert_close(cl(x, t), (x @ cl.lin.weight.T + cl.lin.bias) * w[t])


def test_image_embedding() -> None:
    emb = ImageEmbedding("resnet10_tiny", 32)
    assert isinstance(emb.norm, torch.nn.BatchNorm1d) and emb.proj.in_features == 128
    assert emb(torch.randn(3, 3, 32, 32)).shape == (3, 32)


@pytest.mark.parametrize("use_guidance", [True, False])
def test_denoiser_shapes_and_grads(use_guidance: bool) -> None:
    torch.manual_seed(0)
    c, h = 5, 16
    net = ConditionalDenoiser(c, hidden_dim=h, num_layers=3, num_timesteps=50, use_guidance=use_guidance)
    assert net.layers[0].lin.in_features == (2 * c if use_guidance else c)
    assert len(net.layers) == 3 and net.layers[1].lin.in_features == h
    feat, y_t, t = torch.randn(4, h, requires_grad=True), torch.randn(4, c), torch.randint(0, 50, (4,))
    g = torch.softmax(torch.randn(4, c), -1) if use_guidance else None
    eps = net(feat, y_t, t, g)
    assert eps.shape == (4, c) and torch.isfinite(eps).all()
    eps.pow(2).mean().backward()
    assert feat.grad is not None
    assert all(p.grad is not None for p in net.parameters())


def test_denoiser_requires_guidance() -> None:
    net = ConditionalDenoiser(3, hidden_dim=8, num_timesteps=10)
    with pytest.raises(ValueError, match="guidance"):
        net(torch.randn(2, 8), torch.randn(2, 3), torch.zeros(2, dtype=torch.long), None)


def test_image_feature_enters_by_hadamard_after_first_layer() -> None:
    # With feat = 0 the first block is zeroed, so in eval mode eps cannot depend on y_t or guidance.
    torch.manual_seed(0)
    net = ConditionalDenoiser(3, hidden_dim=8, num_layers=3, num_timesteps=10).eval()
    feat, t = torch.zeros(2, 8), torch.tensor([1, 1])
    a = net(feat, torch.randn(2, 3), t, torch.rand(2, 3))
    b = net(feat, torch.randn(2, 3), t, torch.rand(2, 3))
    torch.testing.assert_close(a, b)
    c = net(torch.ones(2, 8), torch.randn(2, 3), t, torch.rand(2, 3))
    assert not torch.allclose(a, c)


def test_time_conditioning_matters() -> None:
    torch.manual_seed(0)
    net = ConditionalDenoiser(3, hidden_dim=8, num_timesteps=10).eval()
    feat, y, g = torch.randn(1, 8).expand(2, 8), torch.randn(1, 3).expand(2, 3), torch.rand(1, 3).expand(2, 3)
    out = net(feat, y, torch.tensor([0, 9]), g)
    assert not torch.allclose(out[0], out[1])


def test_default_denoiser_size() -> None:
    net = ConditionalDenoiser(7)
    assert net.hidden_dim == 6144 and len(net.layers) == 3
    assert all(layer.embed.weight.shape == (1001, 6144) for layer in net.layers)
    n = sum(p.numel() for p in net.parameters())
    # lin1 (14->6144), lin2/lin3 (6144^2 + b), 3 time tables, 3 BN, out (6144->7)
    expected = (14 * 6144 + 6144) + 2 * (6144 * 6144 + 6144) + 3 * 1001 * 6144 + 3 * 2 * 6144 + (6144 * 7 + 7)
    assert n == expected


@pytest.mark.parametrize("shared_feat", [True, False])
def test_grouped_call_equals_separate_calls(shared_feat: bool) -> None:
    """groups=3 (the training step's fused/global/local branches in one pass) gives the outputs,
    parameter gradients and BatchNorm running statistics of three separate calls made in order."""
    torch.manual_seed(0)
    c, h, b = 4, 32, 6
    ref = ConditionalDenoiser(c, hidden_dim=h, num_layers=3, num_timesteps=30).double().train()
    grp = ConditionalDenoiser(c, hidden_dim=h, num_layers=3, num_timesteps=30).double().train()
    grp.load_state_dict(ref.state_dict())
    feat = torch.randn(b, h, dtype=torch.float64)
    ys = [torch.randn(b, c, dtype=torch.float64) for _ in range(3)]
    gs = [torch.softmax(torch.randn(b, c, dtype=torch.float64), -1) for _ in range(3)]
    t = torch.randint(0, 30, (b,))
    w = torch.randn(3, b, c, dtype=torch.float64)  # a different weight per branch in the loss

    f1 = feat.clone().requires_grad_()
    outs = [ref(f1, ys[i], t, gs[i]) for i in range(3)]
    sum((o * w[i]).sum() for i, o in enumerate(outs)).backward()

    f2 = feat.clone().requires_grad_()
    fin = f2 if shared_feat else f2.repeat(3, 1)
    out = grp(fin, torch.cat(ys), t.repeat(3), torch.cat(gs), groups=3)
    (out * w.reshape(3 * b, c)).sum().backward()

    torch.testing.assert_close(out, torch.cat(outs))
    torch.testing.assert_close(f2.grad, f1.grad)
    for (name, p), q in zip(ref.named_parameters(), grp.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, x), y in zip(ref.named_buffers(), grp.buffers()):
        torch.testing.assert_close(y, x, msg=name)  # running mean/var updated 3x, num_batches_tracked 3
    assert int(grp.norms[0].num_batches_tracked) == 3
    # in eval mode BN is per row, so the grouped call is the plain call
    ref.eval(), grp.eval()
    y_all, g_all = torch.cat(ys), torch.cat(gs)
    torch.testing.assert_close(
        grp(f2, y_all, t.repeat(3), g_all, groups=3), ref(feat.repeat(3, 1), y_all, t.repeat(3), g_all)
    )
    with pytest.raises(ValueError, match="groups=4"):
        grp(feat, y_all, t.repeat(3), g_all, groups=4)
