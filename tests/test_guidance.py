"""DCG: ROI selection / cropping on hand-built maps, gated attention, global stream."""

from __future__ import annotations

import pytest
import torch

from diffmic.nn.guidance import DCG, GatedAttention, crop_rois, grid_shape, select_rois


def _image(b: int = 2, c: int = 3, h: int = 64, w: int = 64) -> torch.Tensor:
    return torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)


def test_select_rois_hand_built() -> None:
    sal = torch.zeros(2, 2, 4, 4)
    # image 0: class 0 peaks at (1,2) then (3,0); class 1 peaks at (0,0)
    sal[0, 0, 1, 2], sal[0, 0, 3, 0] = 10.0, 5.0
    sal[0, 1, 0, 0] = 3.0
    sal[0, 1, 2, 3] = 1.5
    # image 1: (3,3) = 1 + 0.5, (0,1) = 0 + 1, (2,2) = 0.5 + 0, rest 0
    sal[1, 0, 3, 3], sal[1, 1, 0, 1] = 2.0, 7.0
    sal[1, 0, 2, 2], sal[1, 1, 3, 3] = 1.0, 3.5
    sel = select_rois(sal, (4, 4), 4)
    # image 0 scores: (1,2)=1, (0,0)=1, (3,0)=0.5, (2,3)=0.5 -> ties keep value order
    assert set(sel.cell_idx[0, :2].tolist()) == {1 * 4 + 2, 0}
    assert set(sel.cell_idx[0, 2:].tolist()) == {3 * 4 + 0, 2 * 4 + 3}
    assert sel.cell_idx[1, :3].tolist() == [15, 1, 10]
    assert torch.all(sel.scores[:, :-1] >= sel.scores[:, 1:])
    torch.testing.assert_close(sel.scores[1, :3], torch.tensor([1.5, 1.0, 0.5]))
    assert sel.selection_map.shape == (2, 4, 4)


def test_select_rois_strict_order() -> None:
    sal = torch.tensor([[[[0.0, 3.0, 1.0], [9.0, 2.0, 4.0]]]])  # [1,1,2,3]
    sel = select_rois(sal, (2, 3), 6)
    assert sel.cell_idx[0].tolist() == [3, 5, 1, 4, 2, 0]


def test_select_rois_constant_channel_no_nan_and_clamp() -> None:
    sal = torch.zeros(1, 3, 2, 2)
    sal[0, 1] = 5.0  # constant channel
    sal[0, 2, 1, 1] = 1.0
    sel = select_rois(sal, (2, 2), 10)
    assert not torch.isnan(sel.selection_map).any()
    assert sel.cell_idx.shape == (1, 4)  # K clamped to g_h*g_w
    assert sel.cell_idx[0, 0].item() == 3


def test_select_rois_resizes_to_grid() -> None:
    sal = torch.zeros(1, 1, 2, 2)
    sal[0, 0, 1, 1] = 1.0
    sel = select_rois(sal, (4, 4), 1)
    assert sel.selection_map.shape == (1, 4, 4)
    assert sel.cell_idx[0, 0].item() == 15  # bottom-right corner stays hottest


def test_224_geometry() -> None:
    assert grid_shape(224, 224, 32) == (7, 7)
    with pytest.raises(ValueError):
        grid_shape(16, 64, 32)
    dcg = DCG(3, "resnet10_tiny", "resnet10_tiny", num_rois=6, crop_size=32).eval()
    with torch.no_grad():
        out = dcg(torch.randn(1, 3, 224, 224))
    assert out.saliency.shape == (1, 3, 7, 7)
    boxes = out.roi_boxes[0]
    assert boxes.shape == (6, 4)
    assert torch.all(boxes % 32 == 0) and torch.all(boxes[:, 2:] - boxes[:, :2] == 32)
    assert boxes.max() <= 224 and boxes.min() >= 0
    assert len({tuple(b) for b in boxes.tolist()}) == 6  # distinct cells


@pytest.mark.parametrize("channels", ["rgb", "first"])
def test_crop_rois_blocks(channels: str) -> None:
    x = _image(2, 3, 48, 64)  # grid 3x4 of 16 px cells
    idx = torch.tensor([[0, 6, 11], [3, 4, 9]])
    crops, boxes = crop_rois(x, idx, 16, (3, 4), channels)
    assert crops.shape == (2, 3, 3, 16, 16)
    for b in range(2):
        for k in range(3):
            r, c = divmod(int(idx[b, k]), 4)
            block = x[b, :, 16 * r : 16 * r + 16, 16 * c : 16 * c + 16]
            if channels == "first":
                block = block[:1].expand(3, -1, -1)
            assert torch.equal(crops[b, k], block)
            assert boxes[b, k].tolist() == [16 * r, 16 * c, 16 * r + 16, 16 * c + 16]


def test_crop_rois_single_channel_input() -> None:
    x = _image(1, 1, 32, 32)
    crops, _ = crop_rois(x, torch.tensor([[3]]), 16, (2, 2), "rgb")
    assert crops.shape == (1, 1, 1, 16, 16)
    crops, _ = crop_rois(x, torch.tensor([[3]]), 16, (2, 2), "first")
    assert crops.shape == (1, 1, 3, 16, 16)
    with pytest.raises(ValueError):
        crop_rois(x, torch.tensor([[0]]), 16, (2, 2), "green")


def test_gated_attention() -> None:
    torch.manual_seed(0)
    att = GatedAttention(8, 4)
    h = torch.randn(3, 5, 8)
    z, a = att(h)
    assert a.shape == (3, 5) and z.shape == (3, 8)
    torch.testing.assert_close(a.sum(1), torch.ones(3))
    torch.testing.assert_close(z, (a.unsqueeze(-1) * h).sum(1))
    assert all(m.bias is None for m in (att.V, att.U, att.w))


@pytest.mark.parametrize("roi_channels", ["rgb", "first"])
def test_dcg_forward(roi_channels: str) -> None:
    torch.manual_seed(0)
    dcg = DCG(4, "resnet10_tiny", "resnet10_tiny", num_rois=6, crop_size=16, roi_channels=roi_channels)
    x = torch.randn(3, 3, 64, 64)
    out = dcg(x)
    assert out.z_global.shape == out.z_local.shape == out.z_fused.shape == (3, 4)
    torch.testing.assert_close(out.z_global, out.saliency.mean(dim=(2, 3)))
    torch.testing.assert_close(out.z_fused, 0.5 * (out.z_global + out.z_local))
    assert out.roi_boxes.shape == (3, 6, 4) and out.roi_attention.shape == (3, 6)
    torch.testing.assert_close(out.roi_attention.sum(1), torch.ones(3))
    out.z_fused.sum().backward()
    assert dcg.saliency_head.weight.grad is not None
    assert dcg.local_head.weight.grad is not None
    assert all(p.grad is not None for p in dcg.local_encoder.parameters())


def test_dcg_rejects_bad_roi_channels() -> None:
    with pytest.raises(ValueError, match="roi_channels"):
        DCG(2, "resnet10_tiny", "resnet10_tiny", roi_channels="red")
