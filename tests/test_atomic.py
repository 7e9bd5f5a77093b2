"""diffmic.atomic: the one atomic writer (a temporary name beside the target, renamed over it)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from diffmic import atomic
from diffmic.atomic import atomic_path, atomic_write_bytes, atomic_write_text, fresh_temp_name

SRC = Path(__file__).parents[1] / "src" / "diffmic"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_old_content_leaves_no_temporary_file_and_raises(tmp_path, exc):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    seen = []
    with pytest.raises(type(exc)) as info:
        with atomic_path(target) as tmp, open(tmp, "x") as fh:
            fh.write("half of the new con")
            seen.append(tmp)
            raise exc
    assert info.value is exc  # the writer's own exception, not swallowed nor replaced
    assert target.read_text() == "old"
    assert not seen[0].exists()
    assert _names(tmp_path) == ["metrics.json"]


def test_a_successful_write_replaces_the_file_and_the_temporary_file_is_beside_it(tmp_path):
    target = tmp_path / "sub" / "table.csv"
    target.parent.mkdir()
    target.write_text("old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        assert tmp.name.startswith(".") and tmp.suffix == ".csv"  # hidden; the suffix kept (matplotlib)
        tmp.write_text("new")
        assert target.read_text() == "old"  # a reader sees the old file until the rename
    assert target.read_text() == "new"
    assert _names(target.parent) == ["table.csv"]
    assert _names(tmp_path) == ["sub"]


def test_two_interleaved_writers_end_with_one_complete_content_never_a_mix(tmp_path):
    target = tmp_path / "record.json"
    a_text, b_text = "A" * 5000, "B" * 7000
    a, b = atomic_path(target), atomic_path(target)
    ta, tb = a.__enter__(), b.__enter__()
    assert ta != tb  # each writer its own temporary file
    with open(ta, "x") as fa, open(tb, "x") as fb:
        for i in range(0, 7000, 1000):  # chunks written alternately
            fa.write(a_text[i : i + 1000])
            fb.write(b_text[i : i + 1000])
    b.__exit__(None, None, None)
    assert target.read_text() == b_text
    a.__exit__(None, None, None)
    assert target.read_text() == a_text  # the last complete write wins, whole
    assert _names(tmp_path) == ["record.json"]


def test_a_failing_writer_next_to_a_successful_one_leaves_the_successful_content(tmp_path):
    target = tmp_path / "record.json"
    good, bad = atomic_path(target), atomic_path(target)
    tg, tb = good.__enter__(), bad.__enter__()
    tg.write_text("complete")
    tb.write_text("partial")
    good.__exit__(None, None, None)
    # the writer fails: __exit__ returning False means the exception is not swallowed
    assert bad.__exit__(OSError, OSError("no space left"), None) is False
    assert target.read_text() == "complete"
    assert _names(tmp_path) == ["record.json"]


def test_a_temporary_folder_is_renamed_into_place_or_removed_on_failure(tmp_path):
    final = tmp_path / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=tmp_path))
    with atomic_path(final, tmp=tmp) as t:
        (t / "weights").write_bytes(b"\1\2")
    assert (final / "weights").read_bytes() == b"\1\2" and not tmp.exists()
    tmp2 = Path(tempfile.mkdtemp(prefix=".other.tmp-", dir=tmp_path))
    with pytest.raises(ValueError, match="bad"):
        with atomic_path(tmp_path / "other", tmp=tmp2) as t:
            (t / "a" / "b").parent.mkdir()
            (t / "a" / "b").write_text("x")
            raise ValueError("bad")
    assert _names(tmp_path) == ["model"]


def test_a_given_temporary_name_must_be_in_the_targets_folder(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="not in the folder"):
        with atomic_path(tmp_path / "x.json", tmp=tmp_path / "a" / "x.tmp"):
            pytest.fail("the block must not run")


def test_the_text_and_bytes_helpers_write_exactly_the_content(tmp_path):
    text = "héllo\nwörld ✓\n"
    assert atomic_write_text(tmp_path / "t.txt", text) == tmp_path / "t.txt"
    assert (tmp_path / "t.txt").read_bytes() == text.encode("utf-8")
    data = bytes(range(256)) * 3
    atomic_write_bytes(tmp_path / "b.bin", data)
    assert (tmp_path / "b.bin").read_bytes() == data
    atomic_write_text(tmp_path / "t.txt", "second")  # replaces
    assert (tmp_path / "t.txt").read_text() == "second"
    assert _names(tmp_path) == ["b.bin", "t.txt"]


def test_a_fresh_temporary_name_never_is_an_existing_file(tmp_path, monkeypatch):
    """The random part is redrawn while the name exists: a file of the user's that happens to
    have the first drawn name is neither written over nor removed."""
    target = tmp_path / "report.html"

    class _Fixed:
        def __init__(self, h):
            self.hex = h

    draws = iter([_Fixed("a" * 32), _Fixed("b" * 32)])
    monkeypatch.setattr(atomic.uuid, "uuid4", lambda: next(draws))
    users = tmp_path / f".report.html.{'a' * 12}.tmp.html"
    users.write_text("the user's file")
    assert fresh_temp_name(target) == tmp_path / f".report.html.{'b' * 12}.tmp.html"
    draws = iter([_Fixed("a" * 32), _Fixed("c" * 32)])
    atomic_write_text(target, "<html>")
    assert users.read_text() == "the user's file"
    assert target.read_text() == "<html>"


def test_no_hand_written_copy_of_the_atomic_write_is_left_in_the_package():
    """Every ``os.replace`` of the package is the helper's, except the two that are not atomic
    writes of a new file: the resumable ``.part`` of a download (kept across failures on purpose)
    and the rename of a resumed run's CSV log."""
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        text = path.read_text()
        n = len(re.findall(r"os\.replace\(|\.replace\((?:tmp|path)\b|\.rename\(", text))
        if n:
            found[str(path.relative_to(SRC))] = n
    assert found == {"atomic.py": 1, "data/download.py": 1, "training/run.py": 1}, found


def test_a_relative_target_accepts_the_absolute_name_mkstemp_gives_for_its_folder(tmp_path, monkeypatch):
    """`make demo` writes into the relative folder runs/demo; tempfile.mkstemp returns an absolute
    name even for a relative folder, and the two name the same folder."""
    monkeypatch.chdir(tmp_path)
    Path("runs/demo").mkdir(parents=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir="runs/demo")
    with atomic_path("runs/demo/manifest.json", tmp=tmp), open(fd, "w") as fh:
        fh.write("{}")
    assert (tmp_path / "runs/demo/manifest.json").read_text() == "{}"
    assert _names(tmp_path / "runs/demo") == ["manifest.json"]
    # a relative temporary name elsewhere is still refused
    Path("runs/other").mkdir()
    with pytest.raises(ValueError, match="not in the folder"):
        with atomic_path("runs/demo/x.json", tmp="runs/other/x.tmp"):
            pass
