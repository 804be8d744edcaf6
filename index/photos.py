"""Finding photo files: the one rule every command uses.

The rule:

- A photo is a file whose extension is one of :data:`IMAGE_EXTENSIONS` (any case).
- Inside a folder the search is recursive and sorted by relative path. Names starting with ``.`` are
  skipped, files and folders alike (``.DS_Store``, ``.thumbnails/``, editors' and sync tools' hidden files).
- Symbolic links to files and to folders are followed (a class folder may be a link to another disk);
  each real folder is visited once, so a link loop cannot recurse for ever. A link whose target is
  missing is not a photo (nor reported, when its name is another kind of file's: ``notes.txt``).
- Nothing is skipped silently: a link whose target is missing (or a loop), a folder that cannot be listed and
  a photo-named entry that is not a regular file are returned as *skipped*, with the reason
  (:func:`scan_photos`); :func:`find_photos` logs one warning naming how many and the first few.
- A path named explicitly (a command-line argument) is taken as given, hidden or not: a file is a photo
  whatever its name; a folder is searched by the rule above. A missing path, or a folder without photos,
  is reported with the reason and the other arguments are still used.

The same search finds other files by their names (:func:`scan_files`: webdataset shards, ``index.streamed``),
and their skipped entries are reported the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: How many skipped paths a warning names (the rest are counted).
SKIPPED_SHOWN = 5
#: What to do about skipped entries (said once, with them: :func:`skipped_summary`).
SKIPPED_ADVICE = ("To use them: mount the disk a broken link points to, or fix the link, or make the folder "
                  "readable; to silence this, remove them. Then run again.")
#: An entry a search could not read, and why: ``(path, reason)``.
Skipped = tuple[Path, str]

#: The formats photos are accepted in (Pillow's names; ``retrieval.images`` decodes only these) and their file
#: extensions, the first one what a kept upload of that format is named with.
PHOTO_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".mpo"), "PNG": (".png",), "WEBP": (".webp",),
    "HEIF": (".heic", ".heif"), "AVIF": (".avif",), "TIFF": (".tif", ".tiff"), "BMP": (".bmp",), "GIF": (".gif",),
    "PPM": (".ppm",),
}
IMAGE_EXTENSIONS = frozenset(ext for exts in PHOTO_FORMATS.values() for ext in exts)


def _file_suffix(name: str) -> bool:
    """Whether ``name`` ends in a file extension (``notes.txt``), not a name a folder may carry (``Naja sp.``,
    ``Crotalus v. viridis``, ``Dendroaspis viridis``)."""
    return re.fullmatch(r"\.[A-Za-z0-9]{1,5}", Path(name).suffix) is not None


def is_photo_name(name: str) -> bool:
    """True for a visible file name with a photo extension."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def entry_problem(path: Path) -> str:
    """Why ``path``, an entry that is neither a folder nor a regular file once links are followed, cannot be read."""
    try:
        os.stat(path)
    except OSError as exc:
        if path.is_symlink():
            if exc.errno == errno.ELOOP:
                return "symbolic link loop (it never reaches a file)"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return "broken symbolic link (its target does not exist)"
        if exc.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({exc.strerror or exc})"
    return "not a regular file or folder"


@dataclass
class PhotoScan:
    """What a folder holds: its photos, and the entries skipped because they cannot be read (with why)."""

    photos: list[Path] = field(default_factory=list)  # sorted by relative path
    skipped: list[Skipped] = field(default_factory=list)  # (path, reason), in the order met


def scan_photos(folder: str | Path) -> PhotoScan:
    """Photo files under ``folder`` by the module's rule, and what was skipped (logs nothing; [] when missing).

    Skipped: broken symbolic links with a photo's name or a name without a file extension (a broken link to a
    class folder; ``notes.txt`` would not have been read either way, so its broken link is not), photo-named
    entries that are not regular files, and folders that cannot be listed.
    """
    root = Path(folder)
    photos, skipped = scan_files(root, is_photo_name)
    return PhotoScan(sorted(photos, key=lambda p: p.relative_to(root).as_posix()), skipped)


def scan_files(folder: str | Path, wanted: Callable[[str], bool]) -> tuple[list[Path], list[Skipped]]:
    """(files, skipped): the files under ``folder`` whose visible name ``wanted`` accepts, by the module's rule, in
    the order met, and the entries skipped with why, as :func:`scan_photos` skips them (logs nothing)."""
    root = Path(folder)
    files: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[tuple[int, int]] = set()

    def unlistable(exc: OSError) -> None:
        where = Path(exc.filename) if exc.filename else root
        if where == root and isinstance(exc, FileNotFoundError):
            return  # a missing folder holds no photos: callers say so
        skipped.append((where, f"folder cannot be listed ({exc.strerror or exc})"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError as exc:
            unlistable(exc)
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: already searched
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:  # os.walk lists here what is not a folder once links are followed
            path = Path(dirpath) / name
            if name.startswith("."):
                continue
            if path.is_file():  # follows links
                if wanted(name):
                    files.append(path)
            elif wanted(name) or (path.is_symlink() and not _file_suffix(name)):
                skipped.append((path, entry_problem(path)))
    return files, skipped


def first_few(items: Sequence[object], sep: str = ", ") -> str:
    """The first :data:`SKIPPED_SHOWN` items joined by ``sep``, and how many more: one line however many."""
    shown = sep.join(str(item) for item in items[:SKIPPED_SHOWN])
    return shown + (f"{sep}... ({len(items) - SKIPPED_SHOWN} more)" if len(items) > SKIPPED_SHOWN else "")


def skipped_text(skipped: Sequence[Skipped]) -> str:
    """The first few skipped entries with their reasons, and how many more: one line."""
    return first_few([f"{p}: {why}" for p, why in skipped], "; ")


def skipped_summary(skipped: Sequence[Skipped], where: str | Path, what: str = "photos") -> str:
    """The one report of entries skipped under ``where``: how many, the first few with their reasons (``what``:
    what they were not read as), and what to do about them."""
    n = len(skipped)
    return (f"{n} entr{'y' if n == 1 else 'ies'} under {where} skipped, not read as {what}: {skipped_text(skipped)}. "
            f"{SKIPPED_ADVICE}")


def warn_skipped(skipped: Sequence[Skipped], where: str | Path, what: str = "photos") -> None:
    """One warning for the entries skipped under ``where`` (:func:`skipped_summary`); nothing when there is none."""
    if skipped:
        logger.warning("%s", skipped_summary(skipped, where, what))


def find_photos(folder: str | Path) -> list[Path]:
    """Photo files under ``folder`` by the module's rule, sorted by relative path ([] when none); what had to be
    skipped is logged (:func:`warn_skipped`)."""
    scan = scan_photos(folder)
    warn_skipped(scan.skipped, folder)
    return scan.photos


@dataclass
class PhotoArgs:
    """Photos named on a command line: what was found, and what could not be used (with why)."""

    photos: list[Path] = field(default_factory=list)  # in argument order; folders expanded
    problems: list[tuple[str, str]] = field(default_factory=list)  # (argument, reason)


def expand_photo_args(paths: Iterable[str | Path]) -> PhotoArgs:
    """Files as given, folders expanded to the photos inside; bad arguments, and entries inside a folder that had
    to be skipped, reported in ``problems``, never fatal."""
    out = PhotoArgs()
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            scan = scan_photos(p)
            out.photos.extend(scan.photos)
            out.problems.extend((str(path), why) for path, why in scan.skipped)
            if not scan.photos:
                out.problems.append((str(p), f"folder holds no photos ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
        elif p.is_file():
            out.photos.append(p)
        else:
            out.problems.append((str(p), entry_problem(p)))
    return out
