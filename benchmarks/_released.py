"""The released DiffMIC algorithm, re-implemented on top of the library modules, as the benchmark baseline.

Written from the behaviour described in ``shared/reference/original-implementation.md`` (§2.2, §3.1, §4.1);
no code is copied from any repository. Numerically it computes the same thing as the library (same modules,
same weights), but with the released code's *costs*:

* ``released_dcg_forward``: the DCG forward with the released ROI path — greedy top-K (K sequential
  argmax + mask steps), the positions moved to the host with ``.cpu().numpy()`` (a device sync), crops cut
  in a Python loop over B×K into a freshly allocated buffer, and the crops copied to the host once more
  (the released ``self.patches = crops.data.cpu().numpy()``, never used).
* ``released_reverse``: inference as the released ``test()`` does it — the DCG twice per batch (once for μ
  and once again in the redundant ``if not noise_prior:`` block), then the truncated ancestral chain with the
  full network (image encoder + denoiser) re-run on the raw images at every one of the n steps.
* ``released_train_step``: the released training step — DCG priors in eval mode *with autograd* (the
  diffusion loss back-propagates through the whole DCG; those gradients are thrown away by the DCG
  optimiser's ``zero_grad``), three full network calls that each re-run the image encoder, Adam with
  gradient clipping at 1.0, then one DCG cross-entropy step in train mode.

The library's own step, which the benchmarks compare with these, is not re-implemented here: they run
``diffmic.training.step.PlainStep`` (``train_step`` with ``build_optimizers``' optimisers, the step
``diffmic fit`` runs).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from diffmic.diffusion.process import posterior_mean_variance, predict_y0_from_eps, q_sample
from diffmic.losses import diffusion_loss, guidance_ce
from diffmic.nn.guidance import DCG, GuidanceOutput, grid_shape

__all__ = ["released_dcg_forward", "released_reverse", "released_train_step"]


def _released_select(saliency: Tensor, grid_hw: tuple[int, int], k: int, eps: float = 1e-6) -> Tensor:
    """Greedy top-K cell selection: K rounds of (argmax over the flattened map, mask the winner).

    Selection map = Σ_c minmax(S_c) per image (range clamped at ``eps`` like the library, so a constant
    channel gives zeros rather than the released code's NaN). Returns ``[B, K]`` cell indices (on device).
    """
    gh, gw = grid_hw
    s = saliency.detach().float()
    if tuple(s.shape[-2:]) != (gh, gw):  # only needed off the released 224 px / 7×7 geometry
        s = F.interpolate(s, size=(gh, gw), mode="bilinear", align_corners=False)
    flat = s.flatten(2)
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    sel = ((flat - lo) / (hi - lo).clamp_min(eps)).sum(1)  # [B, gh*gw]
    kk = max(1, min(int(k), gh * gw))
    masked = sel.clone()
    picks = []
    for _ in range(kk):
        idx = masked.argmax(dim=1)  # first index on ties, like the released argmax
        picks.append(idx)
        masked.scatter_(1, idx.unsqueeze(1), float("-inf"))
    return torch.stack(picks, dim=1)


def released_dcg_forward(dcg: DCG, x: Tensor) -> GuidanceOutput:
    """DCG forward with the released ROI path (per-sample host syncs, Python crop loop over B×K).

    Uses the library DCG's own streams and weights, so the outputs equal ``dcg(x)`` (up to the order of the
    K ROIs on exact ties, which the permutation-invariant attention pooling does not see).
    """
    z_g, sal = dcg.global_stream(x)
    b, _, h, w = x.shape
    s = int(dcg.crop_size)
    gh, gw = grid_shape(h, w, s)
    idx = _released_select(sal, (gh, gw), dcg.num_rois)
    pos = idx.cpu().numpy()  # released: positions to NumPy (host sync)
    k = pos.shape[1]
    first = dcg.roi_channels == "first"
    c_out = 1 if first else x.shape[1]
    crops = torch.empty(b, k, c_out, s, s, device=x.device, dtype=x.dtype)
    for i in range(b):  # released: Python loop over B×K, one small copy per crop
        for j in range(k):
            r, c = divmod(int(pos[i, j]), gw)
            y0 = int(round(r / gh * (gh * s)))  # CAM cell -> upper-left pixel (= r·s)
            x0 = int(round(c / gw * (gw * s)))
            src = x[i, :1] if first else x[i]
            crops[i, j] = src[:, y0 : y0 + s, x0 : x0 + s]
    if first:
        crops = crops.expand(-1, -1, 3, -1, -1)
    _patches = crops.detach().cpu().numpy()  # released: `self.patches = crops.data.cpu().numpy()` (unused)
    del _patches
    z_l, a = dcg.local_stream(crops)
    rows, cols = idx // gw, idx % gw
    boxes = torch.stack((rows * s, cols * s, rows * s + s, cols * s + s), dim=-1)
    return GuidanceOutput(z_g, z_l, 0.5 * (z_g + z_l), sal, boxes, a)


@torch.no_grad()
def released_reverse(model: Any, schedule: Any, x: Tensor, steps: int, noise: Tensor) -> tuple[Tensor, Tensor]:
    """Released ``test()`` for one batch with the truncated ancestral sampler (``test_timesteps = steps``).

    ``noise``: ``[steps, B, C]`` — row 0 is the start draw y = μ + z, row i the draw of the i-th update, the
    same layout as :func:`diffmic.diffusion.samplers.sample_truncated`. Returns ``(y0 [B, C], μ [B, C])``.
    """
    b = x.shape[0]
    g = released_dcg_forward(model.dcg, x)
    mu = model.priors(g, b, x.device, x.dtype).fused
    # released: the `if not noise_prior:` block runs the DCG again and recomputes the same prior
    g = released_dcg_forward(model.dcg, x)
    mu = model.priors(g, b, x.device, x.dtype).fused
    guidance = mu if model.uses_guidance else None
    y = mu + noise[0]
    for i, t in enumerate(range(steps - 1, 0, -1)):  # t = n−1 … 1
        tt = torch.full((b,), t, dtype=torch.long).to(x.device)  # released: host tensor moved every step
        eps = model.eps(model.encode(x), y, tt, guidance)  # full network on the raw images, every step
        y0_hat = predict_y0_from_eps(schedule, y, tt, mu, eps)
        mean, var = posterior_mean_variance(schedule, y0_hat, y, tt, mu)
        y = mean + var.clamp(min=0).sqrt() * noise[i + 1]
    tt = torch.zeros(b, dtype=torch.long).to(x.device)  # t = 0: noise-free read-out
    eps = model.eps(model.encode(x), y, tt, guidance)
    return predict_y0_from_eps(schedule, y, tt, mu, eps), mu


def _clip_and_step(opt: torch.optim.Optimizer, params: list, loss: Tensor, clip: float | None) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def released_train_step(
    model: Any,
    opt: torch.optim.Optimizer,
    opt_dcg: torch.optim.Optimizer,
    schedule: Any,
    x: Tensor,
    y: Tensor,
    t: Tensor,
    eps: Tensor,
    mmd_weight: float = 0.5,
    clip: float = 1.0,
) -> dict[str, float]:
    """One released training step (see module docstring). Returns the loss values (floats)."""
    b, c = x.shape[0], model.num_classes
    model.train()
    model.dcg.eval()
    g = released_dcg_forward(model.dcg, x)  # WITH autograd: graph through both DCG backbones
    pri = model.priors(g, b, x.device, x.dtype)
    y0 = F.one_hot(y, c).to(x.dtype)
    # three full network calls, each re-running the image encoder on the same images
    eps_f = model.eps(model.encode(x), q_sample(schedule, y0, t, pri.fused, eps), t, pri.fused)
    eps_g = model.eps(model.encode(x), q_sample(schedule, y0, t, pri.global_, eps), t, pri.global_)
    eps_l = model.eps(model.encode(x), q_sample(schedule, y0, t, pri.local, eps), t, pri.local)
    losses = diffusion_loss(eps, eps_f, eps_g, eps_l, mmd_weight=mmd_weight)
    _clip_and_step(opt, opt.param_groups[0]["params"], losses["loss"], clip)  # back-props into the DCG too
    # DCG step: its zero_grad discards the DCG gradients the diffusion backward just computed
    model.dcg.train()
    gd = released_dcg_forward(model.dcg, x)
    ce = guidance_ce(gd.z_fused, gd.z_global, gd.z_local, y)
    _clip_and_step(opt_dcg, opt_dcg.param_groups[0]["params"], ce, None)
    out = {k: float(v.detach()) for k, v in losses.items()}
    out["dcg_ce"] = float(ce.detach())
    return out
