"""Lesion hit rates on synthetic masks, against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from diffmic.trust.lesions import (
    boxes_to_original,
    crop_box,
    lesion_hits,
    saliency_to_original,
)


def test_geometry_maps_input_pixels_to_the_centred_square():
    assert crop_box(200, 150) == (25, 0, 150)
    # input 64 px of a 200x150 image: the box (0, 0, 32, 32) covers the top-left 75x75 of the crop
    assert boxes_to_original([[0, 0, 32, 32]], 200, 150, 64) == [[0.0, 25.0, 75.0, 100.0]]
    sal, crop = saliency_to_original(np.ones((4, 4)), 200, 150)
    assert sal.shape == (150, 150) and crop == (25, 0, 150)


def test_hit_rates_on_a_synthetic_mask():
    # 12 x 10 image, crop = columns 1..10 (10 x 10); lesion = left half of the crop (cols 1..5)
    mask = np.zeros((10, 12), dtype=bool)
    mask[:, 1:6] = True
    crop = crop_box(12, 10)
    assert crop == (1, 0, 10)
    sal = np.zeros((10, 10))
    sal[3, 2] = 1.0  # peak on the lesion (crop col 2 = image col 3)
    boxes = [[0, 1, 2, 3], [4, 7, 6, 9]]  # image coords: first wholly on the lesion, second off
    r = lesion_hits(mask, boxes, sal, crop, tolerance=1)
    assert r["lesion_share"] == pytest.approx(0.5)
    assert r["roi_overlap"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert r["roi_center_hit"] == pytest.approx(0.5)
    # a 2x2 box at a random x0 in 0..8: fully on for x0 <= 3, half for x0 = 4, off after -> 4.5/9
    assert r["roi_overlap_random"] == pytest.approx(0.5)
    # centres (column x0) on the lesion for x0 = 0..4 of 9 positions
    assert r["roi_center_hit_random"] == pytest.approx(5 / 9)
    assert r["peak_hit"] == 1.0 and r["peak_hit_random"] == pytest.approx(0.5)
    assert r["pointing_hit"] == 1.0
    assert r["energy_on_lesion"] == pytest.approx(1.0)
    sal2 = np.zeros((10, 10))
    sal2[3, 5] = 1.0  # one column right of the lesion edge (crop col 4): a miss, a pointing hit at tolerance 1
    r2 = lesion_hits(mask, boxes, sal2, crop, tolerance=1)
    assert r2["peak_hit"] == 0.0 and r2["pointing_hit"] == 1.0
    # the dilated lesion covers crop columns 0..5: 6/10
    assert r2["pointing_hit_random"] == pytest.approx(0.6)
    sal3 = np.zeros((10, 10))
    sal3[3, 8] = 1.0
    assert lesion_hits(mask, boxes, sal3, crop, tolerance=1)["pointing_hit"] == 0.0
