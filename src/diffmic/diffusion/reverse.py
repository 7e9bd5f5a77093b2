"""Reverse diffusion for a batch of images: encoders once per image, K samples batched.

``reverse_sample`` is the fast path (image features and DCG priors computed once, the K samples
per image run as one batch through the small denoiser). ``reencode=True`` is the released code's
algorithm (the image encoder runs again at every reverse step) and exists as the reference that
tests and benchmarks compare against; both give the same result for the same noise.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from diffmic.diffusion import samplers
from diffmic.diffusion.schedule import NoiseSchedule


@dataclass
class ReverseOutput:
    y0: Tensor  # [B,K,C] final samples
    prior: Tensor  # [B,C] prior mean mu used by the reverse chain
    guidance: object  # GuidanceOutput | None (saliency, ROIs, DCG logits)
    trajectory: Optional[list[Tensor]] = None  # each [B,K,C]
    point: Optional[Tensor] = None  # [B,C] deterministic read-out (point_steps > 0), else None
    feat: Optional[Tensor] = None  # [B,D] image features rho(x), once per image (None with reencode)


def image_seed(image_id: str, seed: int) -> int:
    """A stable per-image seed: the same image gets the same noise whatever the batch."""
    return (zlib.crc32(str(image_id).encode("utf-8")) * 1_000_003 + int(seed)) % (2**63 - 1)


def per_image_noise(
    ids: Sequence[str],
    seed: int,
    num_draws: int,
    num_samples: int,
    num_classes: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Noise for the sampler, ``[num_draws, B*K, C]``, drawn per image from its own generator.

    Row ``b*K + k`` holds sample ``k`` of image ``b``. Generated on the CPU (bit-identical on every
    device) and moved once per batch, outside the reverse loop.
    """
    chunks = []
    for image_id in ids:
        g = torch.Generator().manual_seed(image_seed(image_id, seed))
        chunks.append(torch.randn(num_draws, num_samples, num_classes, generator=g, dtype=torch.float64))
    noise = torch.stack(chunks, 1).reshape(num_draws, len(ids) * num_samples, num_classes)
    return noise.to(device=device, dtype=dtype)


@torch.no_grad()
def reverse_sample(
    model,
    schedule: NoiseSchedule,
    x: Tensor,
    *,
    sampler: str = "ddim",
    steps: Optional[int] = 10,
    eta: float = 0.0,
    start: str = "noise",
    t_start: Optional[int] = None,
    num_samples: int = 1,
    ids: Optional[Sequence[str]] = None,
    seed: int = 0,
    generator: Optional[torch.Generator] = None,
    noise: Optional[Tensor] = None,
    reencode: bool = False,
    return_trajectory: bool = False,
    point_steps: int = 0,
    guide: Optional[Callable[[Tensor], object]] = None,
    draw_samples: bool = True,
) -> ReverseOutput:
    """Classify a batch ``x [B,3,H,W]`` by reverse diffusion over the label vector.

    With ``ids`` given, each image draws its noise from its own seeded generator, so its prediction
    does not depend on batch size or order. Otherwise ``noise`` or ``generator`` is used.
    ``start`` and ``t_start`` (first timestep, default T-1) apply to the samplers that take a start
    (``SamplerSpec.takes_start``: ``"ddim"``, ``"dpmpp2m"``); the ancestral ``"ddpm"`` /
    ``"truncated"`` chains ignore them.

    ``point_steps = n > 0`` also computes ``point`` ``[B,C]``: the deterministic read-out, DDIM
    (η = 0) started at the prior mean μ and integrated in n network calls from the first timestep
    of the sampler's window (``t_start`` for the ODE samplers, ``steps − 1`` for the truncated chain,
    T − 1 for the full chain; at most one call per timestep of the window) to t = 0, from the same
    encoder pass: a noise-free estimate of the
    samples' mean (docs/performance.md). The K samples are still drawn, for the uncertainty.

    ``guide``: where the DCG outputs come from (default ``model.guide``; e.g. the average of a
    cross-fitted model's fold DCGs, ``eval.prior_source=folds``).

    ``draw_samples=False`` (the fast path, ``diffmic predict --fast``): only the point read-out is
    computed (``point_steps`` must be > 0); the K chains are not run, and ``y0`` is the point read-out
    as the one "sample" ``[B,1,C]``. The point equals the one ``draw_samples=True`` gives.
    """
    if not draw_samples and not (point_steps and int(point_steps) > 0):
        raise ValueError(
            "draw_samples=False needs the point read-out (point_steps > 0): without the samples there is no prediction"
        )
    B = x.shape[0]
    K = num_samples if draw_samples else 1
    guidance = (guide or model.guide)(x)
    priors = model.priors(guidance, B, x.device, x.dtype if x.is_floating_point() else torch.float32)
    mu = priors.fused  # [B,C]
    C = mu.shape[-1]
    mu_k = mu.repeat_interleave(K, 0)
    guide_k = priors.guidance.repeat_interleave(K, 0) if model.uses_guidance else None
    spec = samplers.get_sampler(sampler)
    if spec.full_chain:
        steps = None  # the full chain always runs all T steps
    point_t = spec.first_timestep(schedule.num_timesteps, steps, t_start)
    if not spec.takes_start:
        # start / t_start configure the ODE samplers (eval.start, eval.t_start); the released
        # ancestral chains always start from mu + z, so `eval.sampler=truncated` alone switches back
        start, t_start = "noise", None
    if noise is None and ids is not None and draw_samples:
        draws = samplers.num_noise_draws(sampler, schedule.num_timesteps, steps, eta)
        noise = per_image_noise(list(ids), seed, draws, K, C, mu.device, mu.dtype)
    feat = None
    if not draw_samples:
        feat = model.encode(x)
        only = _point_readout(
            model, schedule, feat, mu, priors.guidance if model.uses_guidance else None, point_steps, point_t
        )
        return ReverseOutput(only[:, None, :], mu, guidance, None, only, feat)
    if reencode:
        x_k = x.repeat_interleave(K, 0)

        def eps_fn(y_t: Tensor, t: Tensor) -> Tensor:
            return model.eps(model.encode(x_k), y_t, t, guide_k)
    else:
        feat = model.encode(x)
        feat_k = feat.repeat_interleave(K, 0)

        def eps_fn(y_t: Tensor, t: Tensor) -> Tensor:
            return model.eps(feat_k, y_t, t, guide_k)

    out = samplers.sample(
        sampler,
        eps_fn,
        schedule,
        mu_k,
        steps=steps,
        eta=eta,
        start=start,
        t_start=t_start,
        generator=generator,
        noise=noise,
        return_trajectory=return_trajectory,
    )
    traj = [s.view(B, K, C) for s in out.trajectory] if out.trajectory is not None else None
    point: Optional[Tensor] = None
    if point_steps and int(point_steps) > 0:
        feat1 = feat_k[::K] if not reencode else model.encode(x)
        guide1 = priors.guidance if model.uses_guidance else None
        point = _point_readout(model, schedule, feat1, mu, guide1, point_steps, point_t)
    return ReverseOutput(out.y0.view(B, K, C), mu, guidance, traj, point, feat)


def _point_readout(
    model, schedule: NoiseSchedule, feat: Tensor, mu: Tensor, guide: Optional[Tensor], point_steps: int, point_t: int
) -> Tensor:
    """The deterministic read-out ``[B,C]``: DDIM (η = 0) from the prior mean ``mu`` at ``point_t``
    to t = 0 in ``point_steps`` calls (one per timestep where the window is shorter)."""
    return samplers.sample(
        "ddim",
        lambda y_t, t: model.eps(feat, y_t, t, guide),
        schedule,
        mu,
        steps=min(int(point_steps), point_t + 1),  # a window shorter than point_steps: one call per step
        eta=0.0,
        start="mean",
        t_start=point_t,
    ).y0
