"""Package metadata a user depends on: version, licence text, changelog."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffmic import __version__
from diffmic.cli import main

ROOT = Path(__file__).parents[1]


def test_version_flag_matches_pyproject(capsys):
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == __version__
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"diffmic {__version__}"


def test_licence_is_the_full_apache_text_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "9. Accepting Warranty or Additional Liability." in text  # the last of the nine sections
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]


def test_changelog_has_a_section_for_this_version():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert f"## [{__version__}]" in text and "## [Unreleased]" in text
