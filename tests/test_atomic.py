"""index.atomic: a write that fails half-way leaves the old file (or folder) as it was and nothing beside it, and
readers never see the half-written one (walk s55 M14, M15: neither was tested)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from index.atomic import atomic_directory, atomic_write, is_leftover

OLD = '{"old": true}\n'


def _half_then(error: BaseException, seen: list[str]):
    """A writer that writes half a JSON file, records what a reader of the target sees then, and raises ``error``."""

    def write(tmp: Path) -> None:
        tmp.write_text('{"new": [1, 2, ', encoding="utf-8")
        target = tmp.parent / "gallery.json"
        seen.append(target.read_text(encoding="utf-8") if target.exists() else "<missing>")
        raise error

    return write


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
def test_a_write_failing_half_way_keeps_the_old_file_and_leaves_nothing_behind(tmp_path, error):
    path = tmp_path / "gallery.json"
    atomic_write(path, OLD)
    seen: list[str] = []
    with pytest.raises(type(error)):
        atomic_write(path, _half_then(error, seen))
    assert seen == [OLD]  # mid-write, a reader of the target saw the old file whole, not the half-written one
    assert path.read_text(encoding="utf-8") == OLD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.json"]


def test_a_write_goes_to_a_hidden_temporary_file_then_replaces_the_target(tmp_path):
    path = tmp_path / "gallery.json"
    atomic_write(path, OLD)
    given: list[Path] = []

    def write(tmp: Path) -> None:
        given.append(tmp)
        tmp.write_text(json.dumps({"new": True}), encoding="utf-8")
        assert path.read_text(encoding="utf-8") == OLD  # not yet replaced

    assert atomic_write(path, write) == path
    (tmp,) = given
    assert tmp.parent == tmp_path and tmp.suffix == ".json" and is_leftover(tmp.name), tmp  # remove_leftovers' name
    assert json.loads(path.read_text(encoding="utf-8")) == {"new": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery.json"]


def test_a_folder_failing_half_way_keeps_the_old_folder_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "export"
    with atomic_directory(path) as tmp:
        (tmp / "model.bin").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_directory(path) as tmp:
        (tmp / "model.bin").write_bytes(b"ne")
        raise OSError("disk full")
    assert [p.name for p in path.iterdir()] == ["model.bin"] and (path / "model.bin").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
