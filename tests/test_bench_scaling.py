"""benchmarks/bench_scaling.py: the pure helpers its conclusions rest on (no timing here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bs():
    sys.path.insert(0, str(BENCH))  # bench_scaling imports _common from its own folder
    try:
        spec = importlib.util.spec_from_file_location("bench_scaling", BENCH / "bench_scaling.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.path.remove(str(BENCH))


def test_power_fit_recovers_exponent(bs):
    sizes = [64, 96, 128, 160, 224]
    assert bs.power_fit(sizes, [3.0 * s**2 for s in sizes]) == pytest.approx(2.0, abs=1e-6)
    assert bs.power_fit([1, 4, 16, 64], [5.0 / b for b in [1, 4, 16, 64]]) == pytest.approx(-1.0, abs=1e-6)
    assert bs.power_fit([2, 7, 20, 100], [1.5] * 4) == pytest.approx(0.0, abs=1e-9)
    assert bs.power_fit([224], [1.0]) is None  # one point: no fit
    assert bs.power_fit([1, 2], [0.0, 1.0]) is None  # a non-positive value is dropped, one point left


def test_cache_bytes_is_n_s2_3(bs):
    # HAM10000 at 224 px: 10,015 * 224 * 224 * 3 bytes (1.51 GB, a computed cache size)
    assert bs.cache_bytes(10_015, 224) == 1_507_537_920
    assert bs.cache_bytes(bs.HAM10000_N, 64) == 10_015 * 64 * 64 * 3


def test_timed_calls_cap(bs):
    assert bs.timed_calls(3, 0, 64) == 3  # no cap
    assert bs.timed_calls(3, 48, 16) == 3
    assert bs.timed_calls(3, 48, 32) == 2
    assert bs.timed_calls(3, 48, 64) == 1
