"""The one photo finder (index.photos): hidden files, symbolic links, bad command-line arguments."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from index.photos import expand_photo_args, find_photos, scan_photos


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
    from api.cli._common import photo_args  # what the commands taking photos call

    with pytest.raises(ValueError, match="no photos to read: .*nope.jpg: does not exist"):
        photo_args([str(tmp_path / "nope.jpg")], report=False)


def test_skipped_entries_are_returned_and_logged_never_dropped_silently(tmp_path, caplog, monkeypatch):
    """A broken link (to a photo or to a class folder), a link loop and a folder that cannot be listed are
    skipped with the reason, and find_photos logs one warning naming how many and the first few."""
    root = tmp_path / "root"
    _touch(root / "a" / "1.jpg")
    os.symlink(tmp_path / "missing.jpg", root / "a" / "dangling.jpg")
    os.symlink(tmp_path / "unplugged-disk", root / "Naja haje")  # a class folder whose disk is not mounted
    os.symlink(root / "a" / "self.png", root / "a" / "self.png")  # points at itself
    os.symlink(tmp_path / "gone", root / "a" / ".hidden-dangling.jpg")  # hidden: skipped by rule, not reported
    locked = root / "locked"
    _touch(locked / "2.jpg")
    real_scandir = os.scandir

    def scandir(path=".", *args):  # as for a folder without read permission (tests may run as root)
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path, *args)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_photos(root)
    reasons = {p.relative_to(root).as_posix(): why for p, why in scan.skipped}
    assert [p.relative_to(root).as_posix() for p in scan.photos] == ["a/1.jpg"]
    assert reasons["a/dangling.jpg"].startswith("broken symbolic link")
    assert reasons["Naja haje"].startswith("broken symbolic link")
    assert reasons["a/self.png"].startswith("symbolic link loop")
    assert reasons["locked"] == "folder cannot be listed (Permission denied)"
    assert len(reasons) == 4  # the hidden link is skipped by the rule, not reported
    caplog.set_level(logging.WARNING, logger="index.photos")
    assert find_photos(root) == scan.photos
    warned = [r.getMessage() for r in caplog.records if r.name == "index.photos"]
    assert len(warned) == 1 and warned[0].startswith(f"4 entries under {root} skipped, not read as photos")
    assert "dangling.jpg: broken symbolic link" in warned[0] and "Naja haje" in warned[0]
    assert warned[0].endswith("To use them: mount the disk a broken link points to, or fix the link, or make the folder "
                              "readable; fix or remove a link loop (a folder it leads back to is searched once); to "
                              "silence this, remove them. Then run again.")  # what to do, said once


def test_expand_photo_args_reports_what_it_skipped_inside_a_folder(tmp_path):
    folder = tmp_path / "photos"
    good = _touch(folder / "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    got = expand_photo_args([folder])
    assert got.photos == [good]
    assert got.problems == [(str(folder / "dangling.jpg"), "broken symbolic link (its target does not exist)")]
    assert got.skipped == got.problems and got.bad_args == []


def test_an_entry_inside_a_folder_spelled_as_another_argument_is_told_apart_from_it(tmp_path):
    """The folder's broken link named again as an argument of its own: one problem of an argument, one of an entry
    inside a folder argument (not two of arguments because the names are the same)."""
    from api.cli._common import photo_args

    folder = tmp_path / "photos"
    good = _touch(folder / "ok.jpg")
    os.symlink(tmp_path / "gone.jpg", folder / "dangling.jpg")
    broken = (str(folder / "dangling.jpg"), "broken symbolic link (its target does not exist)")
    got = expand_photo_args([folder, folder / "dangling.jpg"])
    assert got.bad_args == [broken] and got.skipped == [broken] and got.problems == [broken, broken]
    assert photo_args([str(folder), str(folder / "dangling.jpg")], report=False) == ([good], [broken], [broken])


def test_a_broken_link_named_as_another_kind_of_file_is_not_an_unreadable_photo(tmp_path):
    """notes.txt -> missing would never have been read as a photo, yet it made `identify DIR` exit 1 and `clean`
    list it as unreadable; a broken link without an extension may be a class folder's, and is still reported."""
    folder = tmp_path / "photos"
    good = _touch(folder / "a.jpg")
    for name in ("notes.txt", "manual.pdf", "Naja sp.", "Crotalus v. viridis", "Dendroaspis viridis"):
        os.symlink(tmp_path / "missing", folder / name)
    got = expand_photo_args([folder])
    assert got.photos == [good]
    assert sorted(Path(p).name for p, _ in got.problems) == ["Crotalus v. viridis", "Dendroaspis viridis", "Naja sp."]


def _image(path: Path, fmt: str = "JPEG") -> Path:
    """A real 40x40 photo of format ``fmt`` at ``path`` (whatever its name says)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 40), (9, 200, 9)).save(path, format=fmt)
    return path


def test_jpeg_aliases_and_photos_without_an_extension_are_photos_and_the_rest_is_named(tmp_path, caplog,
                                                                                        monkeypatch):
    """Walkthrough s48 #1: x.jfif (and the other JPEG extensions) and a phone export without an extension were dropped
    from folders without a word. They are photos now (the extensionless one by its first bytes: only such files are
    opened); hidden files stay unread and unnamed; a visible file that is not a photo is named in one warning."""
    import index.photos as photos_mod

    odd = tmp_path / "odd"
    want = [_image(odd / name) for name in ("IMG_0006", "WhatsApp Image at 10.23.45", "a.jpe", "b.jif", "c.pjpeg",
                                             "d.pjp", "x.jfif", "y.JPEG")]
    want.append(_image(odd / "IMG_0008", "PNG"))
    _image(odd / "IMG_0007.xyz")  # a photo under an extension no photo has: not opened, named
    (odd / "notes.txt").write_text("the snake bit at 10:20")
    (odd / "README").write_text("an extensionless file that is not a photo")
    (odd / "IMG_0006.xmp").write_text("<x:xmpmeta/>")  # a sidecar
    (odd / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    _image(odd / ".thumbnails" / "t.jpg")
    opened: list[str] = []
    sniff = photos_mod._sniff_file
    monkeypatch.setattr(photos_mod, "_sniff_file", lambda p: opened.append(p.name) or sniff(p))
    scan = scan_photos(odd)
    assert scan.photos == sorted(want) and scan.skipped == []
    assert [p.name for p in scan.not_photos] == ["IMG_0006.xmp", "IMG_0007.xyz", "README", "notes.txt"]
    assert sorted(opened) == ["IMG_0006", "IMG_0008", "README", "WhatsApp Image at 10.23.45"]  # extensionless only
    caplog.set_level(logging.WARNING, logger="index.photos")
    got = expand_photo_args([odd])
    assert got.photos == sorted(want) and got.problems == [] and got.not_photos == scan.not_photos
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "index.photos"]
    assert warned.startswith(f"skipped 4 files that are not photos under {odd}: IMG_0006.xmp, IMG_0007.xyz, README, "
                             "notes.txt. A photo among them is read once its name ends in its format's extension "
                             "(.jpg"), warned
    caplog.clear()
    other = tmp_path / "other"
    _image(other / "z.jpg")
    (other / "z.txt").write_text("z")
    assert expand_photo_args([odd, other]).photos == [*sorted(want), other / "z.jpg"]
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "index.photos"]
    assert warned.startswith(f"skipped 5 files that are not photos under the folders given: {odd / 'IMG_0006.xmp'}, "
                             f"{odd / 'IMG_0007.xyz'}, {odd / 'README'}, {odd / 'notes.txt'}, {other / 'z.txt'}. "), warned


def test_a_folder_of_files_none_a_photo_names_them(tmp_path, caplog):
    """Walkthrough s48 #1: a folder whose files are all something else says how many it holds and names them,
    past the first few by extension; an empty folder says it holds no file at all."""
    folder = tmp_path / "Naja samarensis"
    for i in range(7):
        (folder / f"IMG_{i}.xyz").parent.mkdir(exist_ok=True)
        (folder / f"IMG_{i}.xyz").write_bytes(b"x")
    (folder / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".DS_Store").write_bytes(b"x")
    got = expand_photo_args([folder, tmp_path / "empty"])
    assert got.photos == [] and got.not_photos == []
    reasons = dict(got.problems)
    assert reasons[str(folder)].startswith("folder holds 8 files, none a photo: IMG_0.xyz, IMG_1.xyz, IMG_2.xyz, "
                                           "IMG_3.xyz, IMG_4.xyz, ... (3 more) (7 .xyz, 1 .txt). A photo among"), reasons
    assert reasons[str(tmp_path / "empty")] == "folder holds no photos: no file in it (hidden ones aside)"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "PPM", "AVIF", "HEIF", "MPO"])
def test_a_photos_first_bytes_name_its_format(tmp_path, fmt):
    """What the first bytes of a photo of every accepted format say, read as a file without an extension is."""
    from index.photos import SNIFF_BYTES, sniff_photo_format

    if fmt == "HEIF":
        pytest.importorskip("pillow_heif").register_heif_opener()
    path = _image(tmp_path / "photo", fmt)
    assert sniff_photo_format(path.read_bytes()[:SNIFF_BYTES]) == ("JPEG" if fmt == "MPO" else fmt)


@pytest.mark.parametrize("head", [b"", b"this is a text file", b"BM is not a bitmap here", b"{\"json\": 1}",
                                  b"\0\0\0\x20ftypisom\0\0\x02\0isomiso2", b"%PDF-1.7\n", b"PK\x03\x04"])
def test_other_files_first_bytes_are_no_photos(head):
    from index.photos import sniff_photo_format

    assert sniff_photo_format(head) is None


def test_a_photos_backup_or_copy_with_a_tail_after_its_extension_is_not_a_photo(tmp_path, caplog, monkeypatch):
    """Review s48 #5: ``IMG_1.JPG_original`` (what exiftool leaves beside each photo it edits), ``x.jpg~`` and
    ``x.jpeg.1`` were taken as files without an extension, sniffed, and added as photos: near-copies doubled in the
    gallery. They are named as not photos, never opened; a name truly without an extension is still sniffed."""
    import index.photos as photos_mod
    from index.photos import is_photo_file

    folder = tmp_path / "Naja naja"
    want = [_image(folder / name) for name in ("IMG_1.JPG", "IMG_0006", "WhatsApp Image at 10.23.45")]
    copies = [_image(folder / name) for name in ("IMG_1.JPG_original", "x.jpg~", "x.jpeg.1", "y.png.part")]
    opened: list[str] = []
    sniff = photos_mod._sniff_file
    monkeypatch.setattr(photos_mod, "_sniff_file", lambda p: opened.append(p.name) or sniff(p))
    scan = scan_photos(folder)
    assert scan.photos == sorted(want) and scan.skipped == []
    assert scan.not_photos == sorted(copies)
    assert sorted(opened) == ["IMG_0006", "WhatsApp Image at 10.23.45"]
    assert [is_photo_file(p) for p in copies] == [False] * 4  # a dataset's split detection reads them so too
    assert all(is_photo_file(p) for p in want)
    caplog.set_level(logging.WARNING, logger="index.photos")
    assert expand_photo_args([folder]).photos == sorted(want)
    (warned,) = [r.getMessage() for r in caplog.records if r.name == "index.photos"]
    assert warned.startswith(f"skipped 4 files that are not photos under {folder}: IMG_1.JPG_original, x.jpeg.1, "
                             "x.jpg~, y.png.part. "), warned


def test_files_without_an_extension_are_read_several_at_once_with_the_serial_result_in_order(tmp_path, monkeypatch,
                                                                                            capsys):
    """Stop 48's note: extensionless files were sniffed one by one before the bar (slow on a network mount with very
    many of them). They are read by several threads at once (the reads here end out of order), with a bar when asked,
    and the scan is the serial one, order included (photos, not photos, unreadable files)."""
    import random
    import threading
    import time

    import index.photos as photos_mod

    root = tmp_path / "export"
    kinds = ["JPEG", "PNG", None, "unreadable"]
    n = photos_mod.SNIFF_BAR_FILES + 20  # over the bar's threshold
    for i in range(n):
        kind = kinds[i % 4]
        path = root / f"sub{i % 3}" / f"IMG {i:04d}"
        if kind is None:
            _touch(path)
        else:
            _image(path, kind if kind != "unreadable" else "JPEG")
    _image(root / "a.jpg")
    (root / "notes.txt").write_text("n")
    sniff = photos_mod._sniff_file
    rng = random.Random(0)
    threads: set[str] = set()

    def slow_sniff(path: Path):
        threads.add(threading.current_thread().name)
        time.sleep(rng.random() / 500)  # reads end out of order
        if int(path.name.split()[-1]) % 4 == 3:
            raise PermissionError(13, "Permission denied", str(path))
        return sniff(path)

    monkeypatch.setattr(photos_mod, "_sniff_file", slow_sniff)
    monkeypatch.setattr(photos_mod, "SNIFF_THREADS", 1)
    serial = scan_photos(root, progress=True)
    assert threads == {threading.current_thread().name} and capsys.readouterr().err == ""
    monkeypatch.setattr(photos_mod, "SNIFF_THREADS", 8)
    threads.clear()
    parallel = scan_photos(root, progress=True)
    assert len(threads) > 1 and threading.current_thread().name not in threads
    assert "reading files without an extension" in capsys.readouterr().err  # the bar, over SNIFF_BAR_FILES files
    assert parallel == serial
    of_kind = [len(range(k, n, 4)) for k in range(4)]  # files of each of kinds (i % 4)
    # a.jpg a photo too, notes.txt not one too; the unreadable ones are the sniff's PermissionError (i % 4 == 3)
    assert len(serial.photos) == of_kind[0] + of_kind[1] + 1 and len(serial.skipped) == of_kind[3]
    assert len(serial.not_photos) == of_kind[2] + 1
    assert [p.name for p, _ in parallel.skipped] == [p.name for p, _ in serial.skipped]  # the order met
    assert parallel.skipped[0][1] == "cannot be read to tell whether it is a photo (Permission denied)"
    assert scan_photos(root) == serial and capsys.readouterr().err == ""  # no bar unless asked
