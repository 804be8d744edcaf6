"""The one photo finder (index.photos): hidden files, symbolic links, bad command-line arguments."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from index.photos import expand_photo_args, find_photos, require_photos


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_find_photos_skips_hidden_follows_links_once_and_drops_dangling(tmp_path):
    root = tmp_path / "root"
    a = _touch(root / "a" / "1.JPG")
    _touch(root / "a" / "notes.txt")
    _touch(root / "a" / ".hidden.jpg")
    _touch(root / ".cache" / "2.jpg")
    other = _touch(tmp_path / "elsewhere" / "3.png")
    os.symlink(other.parent, root / "linked")  # a class folder that is a link
    os.symlink(root, root / "a" / "loop")  # a link loop must not recurse for ever
    os.symlink(tmp_path / "missing.jpg", root / "a" / "dangling.jpg")
    os.symlink(other, root / "b.png")  # a link to a file
    found = [p.relative_to(root).as_posix() for p in find_photos(root)]
    assert found == ["a/1.JPG", "b.png", "linked/3.png"]
    assert a in find_photos(root)
    assert find_photos(tmp_path / "empty_or_missing") == []


def test_expand_photo_args_reports_bad_arguments_and_keeps_the_rest(tmp_path):
    good = _touch(tmp_path / "ok.jpg")
    hidden = _touch(tmp_path / ".named-explicitly.jpg")  # named on the command line: taken as given
    folder = tmp_path / "photos"
    inside = _touch(folder / "x.webp")
    (tmp_path / "dir.jpg").mkdir()  # a folder named like a photo, with nothing inside
    os.symlink(tmp_path / "gone.jpg", tmp_path / "dangling.jpg")
    got = expand_photo_args([good, tmp_path / "dir.jpg", tmp_path / "dangling.jpg", hidden, folder,
                             tmp_path / "nope.jpg"])
    assert got.photos == [good, hidden, inside]
    reasons = dict(got.problems)
    assert reasons[str(tmp_path / "dir.jpg")].startswith("folder holds no photos")
    assert reasons[str(tmp_path / "dangling.jpg")].startswith("broken symbolic link")
    assert reasons[str(tmp_path / "nope.jpg")] == "does not exist"
    with pytest.raises(ValueError, match="no photos to read .*does not exist"):
        require_photos([tmp_path / "nope.jpg"])
