"""Expected values from somewhere other than the code under test: hand-worked DDIM (0 < η < 1),
the sample read-out, the EMA warm-up, the inference sampler pinned to the pure samplers with
μ = the fused prior written out by hand, the DCG crops against its own saliency map, and the
paper/released switches (model.prior=zero, train.exact_dcg_priors, model.denoiser_input)."""

from __future__ import annotations

import math

import pytest
import torch

from diffmic.diffusion import samplers
from diffmic.diffusion.reverse import reverse_sample
from diffmic.diffusion.schedule import NoiseSchedule
from diffmic.metrics import readout
from diffmic.nn.diffmic import DiffMIC

TINY = dict(
    encoder="resnet10_tiny",
    hidden_dim=16,
    num_layers=2,
    dcg_global="resnet10_tiny",
    dcg_local="resnet10_tiny",
    num_rois=3,
    crop_size=32,
)


# ----------------------------------------------------------------------------------- DDIM, η = 0.5
def test_ddim_eta_half_two_steps_by_hand():
    """Two DDIM steps at η = 0.5 (Song et al. 2021, Eq. 12/16) on the residual r = y − μ, with a
    linear ε-network; every coefficient written out from ᾱ."""
    sched = NoiseSchedule.build("linear", 20, beta_start=1e-3, beta_end=0.2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    mu = torch.softmax(torch.randn(3, 2, generator=g, dtype=torch.float64), -1)
    noise = torch.randn(2, 3, 2, generator=g, dtype=torch.float64)  # start draw + one step draw

    def net(y, t):
        return 0.3 * y - 0.01 * t[:, None].double()

    out = samplers.sample_ddim(net, sched, mu, 2, 0.5, noise=noise)
    ab = sched.alphas_cumprod
    t1, t0 = 19, 0
    a1, a0 = float(ab[t1]), float(ab[t0])
    r = noise[0]
    e = net(r + mu, torch.full((3,), t1))
    r0 = (r - math.sqrt(1 - a1) * e) / math.sqrt(a1)
    sigma = 0.5 * math.sqrt((1 - a0) / (1 - a1)) * math.sqrt(1 - a1 / a0)
    r = math.sqrt(a0) * r0 + math.sqrt(1 - a0 - sigma**2) * e + sigma * noise[1]
    e = net(r + mu, torch.zeros(3, dtype=torch.long))
    r0 = (r - math.sqrt(1 - a0) * e) / math.sqrt(a0)
    torch.testing.assert_close(out.y0, r0 + mu, rtol=0, atol=1e-12)
    assert 0 < sigma < math.sqrt(1 - a0)  # a genuinely stochastic step, not η = 0 or 1


# --------------------------------------------------------------------------------------- read-out
def test_readout_by_hand():
    """K = 3 samples for one image, C = 2: every output from scalar arithmetic."""
    y0 = torch.tensor([[[1.0, 0.0], [0.8, 0.4], [0.2, 0.9]]], dtype=torch.float64)
    m0, m1 = (1.0 + 0.8 + 0.2) / 3, (0.0 + 0.4 + 0.9) / 3
    p0 = 1 / (1 + math.exp(-(m0 - m1) / 0.2))  # softmax of the mean at temperature 0.2

    def pstd(v):
        m = sum(v) / len(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    spread = (pstd([1.0, 0.8, 0.2]) + pstd([0.0, 0.4, 0.9])) / 2
    r = readout(y0, "mean", 0.2)
    assert r.probs[0].tolist() == pytest.approx([p0, 1 - p0], abs=1e-12)
    assert int(r.pred) == 0 and float(r.confidence) == pytest.approx(p0)
    assert float(r.agreement) == pytest.approx(2 / 3)  # sample argmaxes 0, 0, 1
    assert float(r.spread) == pytest.approx(spread)
    assert float(r.entropy) == pytest.approx(-(p0 * math.log(p0) + (1 - p0) * math.log(1 - p0)))
    # temperature 1: softmax of the raw mean
    assert float(readout(y0, "mean", 1.0).probs[0, 0]) == pytest.approx(1 / (1 + math.exp(-(m0 - m1))))
    v = readout(y0, "vote", 0.2)
    assert v.probs[0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert float(v.entropy) == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    one = readout(y0[:, :1], "mean", 0.2)  # K = 1: no spread, agreement 1
    assert float(one.spread) == 0 and float(one.agreement) == 1


# -------------------------------------------------------------------------------------------- EMA
def test_ema_warmup_formula_by_hand():
    """AveragedModel with ema_avg_fn: the first update copies, the n-th after it uses
    d = min(decay, (1 + n) / (10 + n))."""
    from torch.optim.swa_utils import AveragedModel

    from diffmic.training.callbacks import ema_avg_fn

    lin = torch.nn.Linear(1, 1, bias=False)
    ema = AveragedModel(lin, avg_fn=ema_avg_fn(0.5), use_buffers=True)
    values = [2.0, 4.0, -1.0, 3.0, 10.0]
    want = None
    for n, v in enumerate(values):
        with torch.no_grad():
            lin.weight.fill_(v)
        ema.update_parameters(lin)
        if want is None:
            want = v
        else:
            d = min(0.5, (1 + n) / (10 + n))  # n models averaged before this update
            want = want + (v - want) * (1 - d)
        assert float(ema.module.weight) == pytest.approx(want), n
    # the warm-up matters here: a constant decay of 0.5 from the first update on gives another value
    fixed = values[0]
    for v in values[1:]:
        fixed = fixed + (v - fixed) * 0.5
    assert float(ema.module.weight) != pytest.approx(fixed, abs=1e-3)


# ---------------------------------------------------- inference sampler = pure samplers with μ fused
@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiffMIC(3, variant="full", num_timesteps=50, **TINY)
    with torch.no_grad():
        m.train()
        m.guide(torch.randn(4, 3, 128, 128))
        m.encode(torch.randn(4, 3, 128, 128))
    return m.eval()


@pytest.mark.parametrize("prior", ["softmax_mean_logits", "zero"])
@pytest.mark.parametrize("sampler, steps, eta", [("ddim", 4, 0.5), ("truncated", 6, 0.0), ("ddpm", None, 0.0)])
def test_reverse_sample_is_the_pure_sampler_with_the_fused_prior(model, prior, sampler, steps, eta):
    """reverse_sample(model, x) == samplers.sample(eps, μ) with μ = softmax(½(z_g + z_l)) written
    out here (0 for prior=zero, the guidance vector staying softmax(½(z_g + z_l))), ε from the
    denoiser on ρ(x), the same noise."""
    model.prior = prior
    try:
        sched = NoiseSchedule.build("linear", 50)
        x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
        K, C = 2, 3
        draws = samplers.num_noise_draws(sampler, 50, steps, eta)
        noise = torch.randn(draws, 2 * K, C, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            got = reverse_sample(model, sched, x, sampler=sampler, steps=steps, eta=eta, num_samples=K, noise=noise)
            g = model.dcg(x)
            fused = torch.softmax(0.5 * (g.z_global + g.z_local), -1)
            mu = torch.zeros_like(fused) if prior == "zero" else fused
            feat = model.image_embedding(x).repeat_interleave(K, 0)
            guide = fused.repeat_interleave(K, 0)
            want = samplers.sample(
                sampler,
                lambda y, t: model.denoiser(feat, y, t, guide),
                sched,
                mu.repeat_interleave(K, 0),
                steps=steps,
                eta=eta,
                noise=noise,
            )
        torch.testing.assert_close(got.prior, mu)
        torch.testing.assert_close(got.y0, want.y0.view(2, K, C), rtol=1e-5, atol=1e-6)
    finally:
        model.prior = "softmax_mean_logits"


# ------------------------------------------------------------------- DCG crops its own saliency
def test_dcg_crops_the_cells_its_saliency_selects(model, monkeypatch):
    """At 128 px with 32 px cells the 4x4 saliency map is the ROI grid: the K cells with the
    largest sum over classes of the min-max-normalised saliency are cropped, and the local stream
    receives exactly those pixels."""
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    seen = {}
    real = model.dcg.local_stream

    def spy(crops):
        seen["crops"] = crops.clone()
        return real(crops)

    monkeypatch.setattr(model.dcg, "local_stream", spy)
    with torch.no_grad():
        g = model.dcg(x)
    sal = g.saliency  # [B, C, 4, 4]
    assert sal.shape[-2:] == (4, 4)
    for b in range(2):
        score = torch.zeros(4, 4)
        for c in range(sal.shape[1]):
            s = sal[b, c]
            score += (s - s.min()) / (s.max() - s.min())
        cells = sorted(range(16), key=lambda i: -float(score.flatten()[i]))[:3]
        boxes = [[(i // 4) * 32, (i % 4) * 32, (i // 4) * 32 + 32, (i % 4) * 32 + 32] for i in cells]
        assert g.roi_boxes[b].tolist() == boxes
        for k, (y0, x0, y1, x1) in enumerate(boxes):
            assert torch.equal(seen["crops"][b, k], x[b, :, y0:y1, x0:x1])


# ------------------------------------------------------------------------------ training switches
def _fit_counting_dcg_passes(tmp_path, synth_npz, monkeypatch, *over):
    """A tiny fit (1 warm-up + 1 joint epoch, 2 batches each); returns the DCG forward passes per
    training step, and the DCG's first BatchNorm batch count."""
    from diffmic.config import load_config
    from diffmic.nn.guidance import DCG
    from diffmic.training.checkpoint import read_checkpoint
    from diffmic.training.module import DiffMICModule
    from diffmic.training.run import fit

    from _helpers import TINY_MODEL

    calls = {"n": 0, "steps": []}
    real_forward, real_step = DCG.forward, DiffMICModule.training_step

    def forward(self, x):
        calls["n"] += 1
        return real_forward(self, x)

    def step(self, batch, idx):
        calls["n"] = 0
        real_step(self, batch, idx)
        calls["steps"].append(("warmup" if self.in_dcg_warmup else "joint", calls["n"]))

    monkeypatch.setattr(DCG, "forward", forward)
    monkeypatch.setattr(DiffMICModule, "training_step", step)
    cfg = load_config(
        "cpu_v1",
        [
            "data.dataset=medmnist",
            f"data.root={synth_npz}",
            "data.image_size=32",
            "data.batch_size=8",
            *TINY_MODEL,
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            "train.limit_train_batches=2",
            "train.limit_val_batches=1",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"run.dir={tmp_path / 'run'}",
            *over,
        ],
    )
    fit(cfg)
    sd = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    bn = sorted(k for k in sd if k.startswith("model.dcg.") and k.endswith("num_batches_tracked"))[0]
    return calls["steps"], int(sd[bn])


@pytest.mark.slow
@pytest.mark.parametrize("exact, joint_passes", [(True, 2), (False, 1)])
def test_exact_dcg_priors_false_saves_a_dcg_pass(tmp_path, synth_npz, monkeypatch, exact, joint_passes):
    steps, bn_batches = _fit_counting_dcg_passes(
        tmp_path, synth_npz, monkeypatch, f"train.exact_dcg_priors={str(exact).lower()}"
    )
    assert steps == [("warmup", 1)] * 2 + [("joint", joint_passes)] * 2
    # one train-mode (BN-updating) DCG pass per step either way: 2 warm-up + 2 joint steps
    assert bn_batches == 4


@pytest.mark.slow
def test_paper_denoiser_input_trains_and_is_saved(tmp_path, synth_npz, monkeypatch):
    from diffmic.training.checkpoint import load_module

    steps, _ = _fit_counting_dcg_passes(
        tmp_path, synth_npz, monkeypatch, "model.denoiser_input=paper", "model.prior=zero"
    )
    assert [s for s, _ in steps] == ["warmup"] * 2 + ["joint"] * 2
    m = load_module(tmp_path / "run" / "checkpoints" / "last.ckpt").model
    assert m.denoiser_input == "paper" and m.prior == "zero"
    assert m.denoiser.layers[0].lin.in_features == 3 * m.num_classes


@pytest.mark.parametrize(
    "over, fused",
    [([], True), (["train.fused_adam=false"], None), (["train.precision=bf16-mixed"], None)],
)
def test_fused_adam_switch(over, fused):
    """Fused Adam by default (same update rule, one kernel); off on request, and under mixed
    precision, where Lightning refuses to clip a fused optimiser's gradients."""
    from diffmic.config import load_config
    from diffmic.training.module import DiffMICModule

    from _helpers import TINY_MODEL

    cfg = load_config("cpu_v1", [*TINY_MODEL, *over])
    opts = DiffMICModule(cfg.to_dict(), 3, ["a", "b", "c"]).configure_optimizers()
    assert len(opts) == 2  # rho(x) + denoiser, and the DCG
    assert [o.defaults.get("fused") for o in opts] == [fused, fused]


def test_fused_adam_matches_for_each_adam():
    """The fused kernel applies the same Adam / AMSGrad update as the for-each one (to rounding)."""
    torch.manual_seed(0)
    for amsgrad in (False, True):
        p1 = [torch.randn(50, 7, requires_grad=True), torch.randn(7, requires_grad=True)]
        p2 = [p.detach().clone().requires_grad_() for p in p1]
        o1 = torch.optim.Adam(p1, lr=1e-2, amsgrad=amsgrad, foreach=True)
        o2 = torch.optim.Adam(p2, lr=1e-2, amsgrad=amsgrad, fused=True)
        for _ in range(5):
            g = [torch.randn_like(p) for p in p1]
            for ps, o in ((p1, o1), (p2, o2)):
                for p, gi in zip(ps, g):
                    p.grad = gi.clone()
                o.step()
        for a, b in zip(p1, p2):
            torch.testing.assert_close(a, b)
