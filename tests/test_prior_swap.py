"""``train.prior_swap``: a share of the training draws takes another image's priors."""

from __future__ import annotations

import torch

from diffmic.nn.diffmic import Priors
from diffmic.training.module import swap_priors


def _priors(images: int, draws: int, C: int = 3) -> Priors:
    # row i of image b holds the value b in every field (and the draw slot in the last column)
    img = torch.arange(images).repeat_interleave(draws).float()
    slot = torch.arange(draws).repeat(images).float()
    base = torch.stack([img] * (C - 1) + [slot], 1)
    return Priors(base.clone(), base + 100, base + 200, base + 300)


def test_share_zero_and_single_image_are_identity():
    pri = _priors(4, 3)
    out, mask = swap_priors(pri, 0.0, 4, 3)
    assert not mask.any() and all(torch.equal(a, b) for a, b in zip(out, pri))
    one = _priors(1, 5)
    out, mask = swap_priors(one, 0.9, 1, 5)
    assert not mask.any() and all(torch.equal(a, b) for a, b in zip(out, one))


def test_swapped_rows_take_another_image_same_slot_all_fields():
    torch.manual_seed(0)
    images, draws = 6, 4
    pri = _priors(images, draws)
    out, mask = swap_priors(pri, 0.5, images, draws)
    own = torch.arange(images).repeat_interleave(draws).float()
    src_img = out.fused[:, 0]
    # swapped rows come from a different image, kept rows from their own
    assert torch.equal(src_img != own, mask)
    # the draw slot is kept, so a swapped row copies a real row of the batch
    assert torch.equal(out.fused[:, -1], pri.fused[:, -1])
    # every field is taken from the same source row
    for k, off in ((1, 100), (2, 200), (3, 300)):
        assert torch.equal(out[k], out.fused + off)


def test_swap_share_and_uniform_source():
    torch.manual_seed(1)
    images, draws, share = 5, 8, 0.3
    pri = _priors(images, draws)
    n_rows, hits, counts = 0, 0, torch.zeros(images, images)
    for _ in range(400):
        out, mask = swap_priors(pri, share, images, draws)
        n_rows += mask.numel()
        hits += int(mask.sum())
        own = torch.arange(images).repeat_interleave(draws)
        src = out.fused[:, 0].long()
        for o, s_ in zip(own[mask], src[mask]):
            counts[o, s_] += 1
    # binomial: 16,000 rows at p = 0.3 -> SD 0.0036; 5 SD
    assert abs(hits / n_rows - share) < 0.018
    assert counts.diagonal().sum() == 0
    # each of the 4 other images is the source about a quarter of the time
    frac = counts / counts.sum(1, keepdim=True)
    off = frac[~torch.eye(images, dtype=torch.bool)]
    assert (off - 0.25).abs().max() < 0.05
