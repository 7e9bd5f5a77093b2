"""The real-data guard: skipped on a developer's machine, a failure in CI (CI=true)."""

from __future__ import annotations

import pytest

from _helpers import need


def test_missing_real_data_skips_locally_and_fails_in_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="real data not available"):
        need("no-such-data-set")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="real data not available in CI"):
        need("no-such-data-set")
