"""Finding photo files: the one rule every command uses.

The rule:

- A photo is a file whose extension is one of :data:`IMAGE_EXTENSIONS` (any case).
- Inside a folder the search is recursive and sorted by relative path. Names starting with ``.`` are
  skipped, files and folders alike (``.DS_Store``, ``.thumbnails/``, editors' and sync tools' hidden files).
- Symbolic links to files and to folders are followed (a class folder may be a link to another disk);
  each real folder is visited once, so a link loop cannot recurse for ever. A link whose target is
  missing is not a photo.
- A path named explicitly (a command-line argument) is taken as given, hidden or not: a file is a photo
  whatever its name; a folder is searched by the rule above. A missing path, or a folder without photos,
  is reported with the reason and the other arguments are still used.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: The formats photos are accepted in (Pillow's names; ``retrieval.images`` decodes only these) and their file
#: extensions, the first one what a kept upload of that format is named with.
PHOTO_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg"), "MPO": (".jpg", ".mpo"), "PNG": (".png",), "WEBP": (".webp",),
    "HEIF": (".heic", ".heif"), "AVIF": (".avif",), "TIFF": (".tif", ".tiff"), "BMP": (".bmp",), "GIF": (".gif",),
    "PPM": (".ppm",),
}
IMAGE_EXTENSIONS = frozenset(ext for exts in PHOTO_FORMATS.values() for ext in exts)


def is_photo_name(name: str) -> bool:
    """True for a visible file name with a photo extension."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def find_photos(folder: str | Path) -> list[Path]:
    """Photo files under ``folder`` by the module's rule, sorted by relative path ([] when none)."""
    root = Path(folder)
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link: already searched
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if is_photo_name(name) and path.is_file():  # is_file follows links: dangling ones are dropped
                found.append(path)
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return found


@dataclass
class PhotoArgs:
    """Photos named on a command line: what was found, and what could not be used (with why)."""

    photos: list[Path] = field(default_factory=list)  # in argument order; folders expanded
    problems: list[tuple[str, str]] = field(default_factory=list)  # (argument, reason)


def expand_photo_args(paths: Iterable[str | Path]) -> PhotoArgs:
    """Files as given, folders expanded to the photos inside; bad arguments reported, never fatal."""
    out = PhotoArgs()
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            found = find_photos(p)
            if found:
                out.photos.extend(found)
            else:
                out.problems.append((str(p), f"folder holds no photos ({', '.join(sorted(IMAGE_EXTENSIONS))})"))
        elif p.is_file():
            out.photos.append(p)
        elif p.is_symlink():
            out.problems.append((str(p), "broken symbolic link (its target does not exist)"))
        elif p.exists():
            out.problems.append((str(p), "not a regular file or folder"))
        else:
            out.problems.append((str(p), "does not exist"))
    return out


def require_photos(paths: Sequence[str | Path]) -> PhotoArgs:
    """:func:`expand_photo_args`, but ``ValueError`` when not a single photo was found (saying why)."""
    got = expand_photo_args(paths)
    if not got.photos:
        why = "; ".join(f"{arg}: {reason}" for arg, reason in got.problems) or "no paths given"
        raise ValueError(f"no photos to read ({why})")
    return got
