"""Finding photo files: the one rule every command uses.

The rule:

- A photo is a file whose extension is one of :data:`IMAGE_EXTENSIONS` (any case: ``.jpg``, ``.jfif``, ``.png``,
  ``.heic``, ...), or a file with no extension (``IMG_0006``, as phone and chat exports save them) whose first bytes
  are a photo format's (:func:`sniff_photo_format`: a few bytes read, several files at once, nothing decoded). Any
  other file is not read, a photo's name with something after its extension included (:func:`is_photo_copy_name`:
  ``IMG_1.JPG_original``, the backup exiftool leaves beside a photo it edits, ``x.jpg~``, ``x.jpeg.1``): a copy,
  not read twice.
- Inside a folder the search is recursive and sorted by relative path. Names starting with ``.`` are
  skipped, files and folders alike (``.DS_Store``, ``.thumbnails/``, editors' and sync tools' hidden files), and so
  is ``__MACOSX`` (:data:`MACOS_ZIP_FOLDER`: the metadata a zip made on a Mac holds, ``._`` files, no photo).
- Symbolic links to files and to folders are followed (a class folder may be a link to another disk);
  each real folder is visited once, so a link loop cannot recurse for ever, and a link to the folder it is in or to
  one above it (``loop -> ..``) is not followed: skipped as a loop, named (from a class folder it would read the
  other classes' photos under this one's name). A link to a file the same search finds comes after that file,
  whatever their names: the file is the one stored, the link its duplicate. A link whose target is
  missing is not a photo (nor reported, when its name is another kind of file's: ``notes.txt``).
- Nothing is skipped silently: a link whose target is missing (or a loop), a folder that cannot be listed and
  a photo-named entry that is not a regular file are returned as *skipped*, with the reason
  (:func:`scan_photos`); :func:`find_photos` logs one warning naming how many and the first few. The visible
  files that are not photos (``notes.txt``, ``IMG_0006.xyz``, a sidecar ``.xmp``) are returned as *not photos*,
  for the caller to count and name (:func:`not_photos_warning`; hidden files are skipped by the rule, unnamed).
- A path named explicitly (a command-line argument) is taken as given, hidden or not: a file is a photo
  whatever its name; a folder is searched by the rule above. A missing path, or a folder without photos,
  is reported with the reason (the files it holds, none a photo, named) and the other arguments are still used;
  the files inside a folder argument that are not photos are named in one warning.

The same search finds other files by their names (:func:`scan_files`: webdataset shards, ``index.streamed``),
and their skipped entries are reported the same way.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from index.text import printable

logger = logging.getLogger(__name__)

#: The folder a zip made on a Mac holds beside its content (its ``._`` metadata files, no photo): hidden like a
#: name starting with ``.`` (:func:`is_hidden`), never a class folder.
MACOS_ZIP_FOLDER = "__MACOSX"
#: How many skipped paths a warning names (the rest are counted).
SKIPPED_SHOWN = 5
#: What to do about skipped entries (said once, with them: :func:`skipped_summary`), when none of the kinds below
#: is among them (a file that cannot be read).
SKIPPED_ADVICE = ("To use them: mount the disk a broken link points to, or fix the link, or make the folder "
                  "readable; to silence this, remove them. Then run again.")
#: The start of the reason of an entry that is no folder and no regular file (a device, a pipe, a socket).
NOT_REGULAR = "not a regular file"
#: The start of the reason of a link back to a folder above it (:func:`scan_files`).
LINK_LOOP = "symbolic link loop"
#: What to do about a device or a pipe, and about a link loop, among skipped entries (:func:`skipped_advice`).
_NOT_REGULAR_ADVICE = "put the photo file itself where a device or a pipe stands"
_LOOP_ADVICE = "fix or remove a link loop (a folder it leads back to is searched once)"
#: An entry a search could not read, and why: ``(path, reason)``.
Skipped = tuple[Path, str]

#: The formats photos are accepted in (Pillow's names; ``retrieval.images`` decodes only these) and their file
#: extensions, the first one what a kept upload of that format is named with.
PHOTO_FORMATS: dict[str, tuple[str, ...]] = {
    "JPEG": (".jpg", ".jpeg", ".jfif", ".jpe", ".jif", ".pjpeg", ".pjp"),  # .jfif: what Windows and browsers save
    "MPO": (".jpg", ".mpo"), "PNG": (".png",), "WEBP": (".webp",),
    "HEIF": (".heic", ".heif"), "AVIF": (".avif",), "TIFF": (".tif", ".tiff"), "BMP": (".bmp",), "GIF": (".gif",),
    "PPM": (".ppm",),
}
IMAGE_EXTENSIONS = frozenset(ext for exts in PHOTO_FORMATS.values() for ext in exts)
#: The accepted formats in words, for messages.
PHOTO_FORMAT_WORDS = "JPEG, PNG, WebP, HEIC, AVIF, TIFF, BMP, GIF or PPM"
#: No photo is taken with more pixels than this as stored (decompression-bomb guard): 16,000 x 16,000, whatever
#: limit is asked for (a larger one counts as this) and whatever its decode would cost (a JPEG decoded at reduced
#: scale included). The largest phone photos (200 MP) are under it.
DEFAULT_MAX_PIXELS = 256_000_000
#: The default of the most pixels one photo may decode to (``retrieval.images.MAX_PIXELS_ENV``): an 8-bit colour
#: photo costs about 4 MiB of memory a megapixel while a decode thread holds it (docs/api.md, "Limits and errors":
#: 5 x 49 MP PNGs on 4 threads peaked at 791 MiB; one 100 MP PNG alone took 386 MiB more), so ~200 MiB a thread at
#: 50 MP, where 256 MP cost ~1 GB a thread. A JPEG counts at the reduced scale it is decoded at (a 200 MP phone
#: photo: ~3 MP). Both limits are defined here, not in retrieval.images (which re-exports them), so that the command
#: line reads them without importing Pillow's plugins (pillow-heif) at start-up.
PHOTO_MAX_PIXELS = 50_000_000
#: What to do about files that are not photos (said once, with them: :func:`not_photos_warning`).
NOT_PHOTO_ADVICE = ("A photo among them is read once its name ends in its format's extension (.jpg, .png, .webp, "
                    ".heic, ...) or has no extension")
#: Bytes read from a file without an extension to tell whether it is a photo (:func:`sniff_photo_format`).
SNIFF_BYTES = 32
#: Threads that read the first bytes of files without an extension at once (:func:`sniff_files`): on a network
#: mount each read waits for a round trip, and these waits overlap.
SNIFF_THREADS = 8
#: Files without an extension over which :func:`sniff_files` shows a progress bar while it reads them (when asked).
SNIFF_BAR_FILES = 100
#: ISO base media (``ftyp``) brands of HEIF and AVIF photos (not of videos: ``isom``, ``mp42``, ``qt``).
_HEIF_BRANDS = {b"heic": "HEIF", b"heix": "HEIF", b"hevc": "HEIF", b"hevx": "HEIF", b"heim": "HEIF",
                b"heis": "HEIF", b"hevm": "HEIF", b"hevs": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF",
                b"avif": "AVIF", b"avis": "AVIF"}
#: BMP info-header sizes (the Windows and OS/2 versions Pillow reads).
_BMP_HEADERS = {12, 16, 40, 52, 56, 64, 108, 124}


def is_hidden(name: str) -> bool:
    """Whether the search skips the entry ``name`` unsaid: a name starting with ``.``, or :data:`MACOS_ZIP_FOLDER`."""
    return name.startswith(".") or name == MACOS_ZIP_FOLDER


def _file_suffix(name: str) -> bool:
    """Whether ``name`` ends in a file extension (``notes.txt``), not a name a folder may carry (``Naja sp.``,
    ``Crotalus v. viridis``, ``Dendroaspis viridis``)."""
    return re.fullmatch(r"\.[A-Za-z0-9]{1,5}", Path(name).suffix) is not None


def is_photo_name(name: str) -> bool:
    """True for a visible file name with a photo extension."""
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS


def has_extension(name: str) -> bool:
    """Whether ``name`` ends in a file-type extension (``notes.txt``, ``x.jfif``), not in none (``IMG_0006``) nor in
    what only looks like one (``Naja sp. 3``, ``WhatsApp Image 2024-05-01 at 10.23.45``): a file without one is
    read by its content (:func:`sniff_photo_format`)."""
    return re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]{0,4}", Path(name).suffix) is not None


#: A photo's extension with something other than a letter after it, anywhere in a name (:func:`is_photo_copy_name`).
_PHOTO_EXTENSION_WITH_TAIL = re.compile(
    r"\.(?:" + "|".join(sorted((ext[1:] for ext in IMAGE_EXTENSIONS), key=len, reverse=True)) + r")[^A-Za-z]", re.I)


def is_photo_copy_name(name: str) -> bool:
    """Whether ``name`` is a photo's name with something after its extension: a backup or copy of a photo
    (``IMG_1.JPG_original``, which exiftool leaves beside each photo it edits; ``x.jpg~``; ``x.jpeg.1``), not a photo
    to read (the same pixels again, under other bytes) nor a name without an extension to sniff."""
    return not is_photo_name(name) and _PHOTO_EXTENSION_WITH_TAIL.search(name) is not None


def read_by_content(name: str) -> bool:
    """Whether a file named ``name`` that has no photo's extension is told a photo or not by its first bytes
    (:func:`sniff_photo_format`): a name without an extension (``IMG_0006``, ``WhatsApp Image ... at 10.23.45``),
    not another file type's (``notes.txt``) nor a photo's copy (:func:`is_photo_copy_name`)."""
    return not has_extension(name) and not is_photo_copy_name(name)


def sniff_photo_format(head: bytes) -> str | None:
    """The photo format (a :data:`PHOTO_FORMATS` name) that a file's first bytes (:data:`SNIFF_BYTES` suffice)
    announce, None for any other kind of file: its signature only, nothing decoded (a damaged photo is found so,
    and reported when it is decoded)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return _HEIF_BRANDS[head[8:12]]
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_HEADERS:
        return "BMP"
    if re.match(rb"P[1-6]\s", head):
        return "PPM"
    return None


def is_photo_file(path: Path) -> bool:
    """Whether ``path``, a regular file found in a folder, is a photo by the module's rule (visible; a photo's
    extension, or none and a photo's first bytes); False when it cannot be read."""
    name = path.name
    if name.startswith("."):
        return False
    if is_photo_name(name):
        return True
    if not read_by_content(name):
        return False
    try:
        return _sniff_file(path) is not None
    except OSError:
        return False


def _sniff_file(path: Path) -> str | None:
    """:func:`sniff_photo_format` of the file at ``path`` (OSError when it cannot be read)."""
    with open(path, "rb") as fh:
        return sniff_photo_format(fh.read(SNIFF_BYTES))


def sniff_files(paths: Sequence[Path], *, progress: bool = False) -> list[str | None | OSError]:
    """Per file of ``paths``, in their order: its photo format (:func:`sniff_photo_format`), None when it is not a
    photo, or the OSError that kept it from being read. Read by up to :data:`SNIFF_THREADS` threads at once;
    ``progress``: a bar while more than :data:`SNIFF_BAR_FILES` are read. A Ctrl-C drops the reads not started."""

    def sniff(path: Path) -> str | None | OSError:
        try:
            return _sniff_file(path)
        except OSError as exc:
            return exc

    if len(paths) < 2 or SNIFF_THREADS < 2:
        return [sniff(p) for p in paths]
    from tqdm import tqdm

    pool = ThreadPoolExecutor(min(SNIFF_THREADS, len(paths)), thread_name_prefix="speciesid-sniff")
    out: list[str | None | OSError] = []
    try:
        with tqdm(total=len(paths), desc="reading files without an extension", unit="file",
                  disable=not progress or len(paths) <= SNIFF_BAR_FILES) as bar:
            for found in pool.map(sniff, paths):  # in the order of paths, whichever read ends first
                out.append(found)
                bar.update()
    finally:
        pool.shutdown(cancel_futures=True)
    return out


def entry_problem(path: Path) -> str:
    """Why ``path``, an entry that is neither a folder nor a regular file once links are followed, cannot be read."""
    try:
        os.stat(path)
    except OSError as exc:
        if path.is_symlink():
            if exc.errno == errno.ELOOP:
                return f"{LINK_LOOP} (it never reaches a file)"
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return "broken symbolic link (its target does not exist)"
        if exc.errno == errno.ENOENT:
            return "does not exist"
        return f"cannot be read ({exc.strerror or exc})"
    from index.sources import not_regular_reason  # index.sources imports this module lazily too

    try:
        return not_regular_reason(os.stat(path).st_mode)  # "not a regular file (a named pipe (FIFO)): ..."
    except OSError as exc:  # gone since
        return f"cannot be read ({exc.strerror or exc})"


@dataclass
class PhotoScan:
    """What a folder holds: its photos, and the entries skipped because they cannot be read (with why)."""

    photos: list[Path] = field(default_factory=list)  # sorted by relative path
    skipped: list[Skipped] = field(default_factory=list)  # (path, reason), in the order met
    not_photos: list[Path] = field(default_factory=list)  # visible files that are not photos, sorted likewise


def scan_photos(folder: str | Path, *, progress: bool = False) -> PhotoScan:
    """Photo files under ``folder`` by the module's rule, what was skipped, and the visible files that are not photos
    (logs nothing; all empty when the folder is missing). Only the files without an extension are opened (a few
    bytes each, several at once: :func:`sniff_files`, with its bar when ``progress``).

    Skipped: broken symbolic links with a photo's name or a name without a file extension (a broken link to a
    class folder; ``notes.txt`` would not have been read either way, so its broken link is not), photo-named
    entries that are not regular files, folders that cannot be listed, and files without an extension that cannot
    be opened to tell.
    """
    root = Path(folder)
    others: list[Path] = []
    photos, skipped = scan_files(root, is_photo_name, others)
    not_photos: list[Path] = [path for path in others if not read_by_content(path.name)]
    unnamed = [path for path in others if read_by_content(path.name)]
    for path, found in zip(unnamed, sniff_files(unnamed, progress=progress), strict=True):
        if isinstance(found, OSError):
            skipped.append((path, f"cannot be read to tell whether it is a photo ({found.strerror or found})"))
        else:
            (photos if found else not_photos).append(path)

    def key(p: Path) -> str:
        return p.relative_to(root).as_posix()

    return PhotoScan(_files_before_their_links(sorted(photos, key=key), root), skipped, sorted(not_photos, key=key))


def _files_before_their_links(photos: list[Path], root: Path) -> list[Path]:
    """``photos`` (found under ``root``) in their order, but a symbolic link to another of them, a file reached
    through no link, after it: of the two (the same bytes), the file is read first, so the one stored, and the link
    is the duplicate (removing the link later loses nothing)."""
    links = [p for p in photos if _is(p.is_symlink)]
    if not links:
        return photos
    real_root, linked = os.path.realpath(root), set(links)
    files = {os.path.join(real_root, p.relative_to(root)) for p in photos if p not in linked}
    files &= {os.path.realpath(p) for p in photos if p not in linked}  # reached through no link: its own real path
    later = {p for p in links if os.path.realpath(p) in files}
    return [p for p in photos if p not in later] + [p for p in photos if p in later]


def scan_files(folder: str | Path, wanted: Callable[[str], bool],
               others: list[Path] | None = None) -> tuple[list[Path], list[Skipped]]:
    """(files, skipped): the files under ``folder`` whose visible name ``wanted`` accepts, by the module's rule, in
    the order met, and the entries skipped with why, as :func:`scan_photos` skips them (logs nothing). ``others``
    gets the visible regular files ``wanted`` refuses. Each folder is listed once (``os.scandir``: no ``stat`` per
    file but for links)."""
    root = Path(folder)
    files: list[Path] = []
    skipped: list[Skipped] = []
    seen: set[tuple[int, int]] = set()

    def unlistable(exc: OSError, where: Path) -> None:
        where = Path(exc.filename) if exc.filename else where
        if where == root and isinstance(exc, FileNotFoundError):
            return  # a missing folder holds no photos: callers say so
        skipped.append((where, f"folder cannot be listed ({exc.strerror or exc})"))

    stack = [root]
    while stack:
        here = stack.pop()
        try:
            st = os.stat(here)
            key = (st.st_dev, st.st_ino)
            if key in seen:  # reached again through a second link: already searched
                continue
            seen.add(key)
            with os.scandir(here) as listing:
                entries = list(listing)
        except OSError as exc:
            unlistable(exc, here)
            continue
        folders: list[Path] = []
        for entry in entries:
            name = entry.name
            if is_hidden(name):
                continue
            path = here / name
            if _is(entry.is_dir):  # follows links
                if entry.is_symlink() and _leads_above(path):  # loop -> ..: said, not followed
                    skipped.append((path, f"{LINK_LOOP} (it leads back to a folder above it, which is not searched "
                                    "again through it)"))
                else:
                    folders.append(path)
            elif _is(entry.is_file):  # follows links
                if wanted(name):
                    files.append(path)
                elif others is not None:
                    others.append(path)
            elif wanted(name) or (entry.is_symlink() and not _file_suffix(name) and not is_photo_copy_name(name)):
                skipped.append((path, entry_problem(path)))
        stack.extend(reversed(folders))  # searched in the order listed, each before the next
    return files, skipped


def _leads_above(link: Path) -> bool:
    """Whether the folder link ``link`` leads to the folder it is in or to one above it (``loop -> ..``): following
    it would search that folder again, inside itself (from a class folder: the other classes' photos under this
    one's name)."""
    try:
        target, here = os.path.realpath(link), os.path.realpath(link.parent)
    except (OSError, ValueError):
        return False
    return here == target or here.startswith(target.rstrip(os.sep) + os.sep)


def _is(check: Callable[[], bool]) -> bool:
    """A ``DirEntry`` check, False when it cannot be answered (the entry is reported by its other checks)."""
    try:
        return check()
    except OSError:
        return False


def not_photos_text(paths: Sequence[Path], root: str | Path | None = None) -> str:
    """Files that are not photos as a warning names them (``a.txt, b.xyz, README``): the first few (relative to
    ``root`` when given), and past them how many there are of each extension (one line however many)."""
    names = [p.relative_to(root).as_posix() if root is not None else str(p) for p in paths]
    text = first_few(names)  # as they are: escaped where people's output prints them (the CLI), kept in JSON
    if len(paths) > SKIPPED_SHOWN:
        kinds = Counter("no extension" if read_by_content(Path(n).name) else Path(n).suffix.lower() for n in names)
        text += " (" + ", ".join(f"{n} {kind}" for kind, n in kinds.most_common()) + ")"
    return text


def not_photos_warning(paths: Sequence[Path], where: str | Path, root: str | Path | None = None) -> str:
    """The one line about files under ``where`` skipped because they are not photos: how many, the first few
    (:func:`not_photos_text`), and what to do about a photo among them."""
    n = len(paths)
    what = "file that is not a photo" if n == 1 else "files that are not photos"
    return f"skipped {n} {what} under {printable(where)}: {not_photos_text(paths, root)}. {NOT_PHOTO_ADVICE}"


def first_few(items: Sequence[object], sep: str = ", ") -> str:
    """The first :data:`SKIPPED_SHOWN` items joined by ``sep``, and how many more: one line however many."""
    shown = sep.join(str(item) for item in items[:SKIPPED_SHOWN])
    return shown + (f"{sep}... ({len(items) - SKIPPED_SHOWN} more)" if len(items) > SKIPPED_SHOWN else "")


def skipped_text(skipped: Sequence[Skipped]) -> str:
    """The first few skipped entries with their reasons, and how many more: one line."""
    return first_few([f"{printable(p)}: {printable(why)}" for p, why in skipped], "; ")


def skipped_summary(skipped: Sequence[Skipped], where: str | Path, what: str = "photos") -> str:
    """The one report of entries skipped under ``where``: how many, the first few with their reasons (``what``:
    what they were not read as), and what to do about them."""
    n = len(skipped)
    return (f"{n} entr{'y' if n == 1 else 'ies'} under {printable(where)} skipped, not read as {what}: "
            f"{skipped_text(skipped)}. {skipped_advice(skipped)}")


def skipped_advice(skipped: Sequence[Skipped]) -> str:
    """What to do about ``skipped`` entries: :data:`SKIPPED_ADVICE` (a broken link, a folder that cannot be listed),
    with or in place of what to do about a device or a pipe, or a link loop, when they are among them."""
    reasons = [why for _, why in skipped]
    todo = [] if all(why.startswith((NOT_REGULAR, LINK_LOOP)) for why in reasons) else [
        SKIPPED_ADVICE.split("; to silence")[0].removeprefix("To use them: ")]
    todo += [_NOT_REGULAR_ADVICE] if any(why.startswith(NOT_REGULAR) for why in reasons) else []
    todo += [_LOOP_ADVICE] if any(why.startswith(LINK_LOOP) for why in reasons) else []
    return f"To use them: {'; '.join(todo)}; to silence this, remove them. Then run again."


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
    problems: list[tuple[str, str]] = field(default_factory=list)  # (argument or entry, reason): all, as met
    not_photos: list[Path] = field(default_factory=list)  # files inside folders with photos that are not photos
    bad_args: list[tuple[str, str]] = field(default_factory=list)  # of problems, the arguments' (named as given)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # of problems, the entries inside folder arguments

    def problem(self, name: str, reason: str, *, inside: bool) -> None:
        """Record a problem: of an argument, or (``inside``) of an entry inside a folder argument."""
        self.problems.append((name, reason))
        (self.skipped if inside else self.bad_args).append((name, reason))


def _unread_text(skipped: Sequence[Skipped]) -> str:
    """Why a folder whose only entries were skipped holds no photos: those that could be photos cannot be read; a
    link loop (a link back to a folder above it, never a photo) is said to be one."""
    loops = sum(why.startswith(LINK_LOOP) for _, why in skipped)
    unread = len(skipped) - loops
    said = [f"{'its one entry' if unread == 1 else f'its {unread} entries'} that could be one cannot be read (each "
            "named with why: not a regular file, a broken link, ...)"] if unread else []
    if loops:
        what = "a link loop" if loops == 1 else f"{loops} link loops"
        if unread:
            lead = f"besides, {what}"
        else:
            lead = f"its only entry is {what}" if loops == 1 else f"its only entries are {what}"
        said.append(f"{lead} (a link back to a folder above it, which is not searched again through it)")
    return "; ".join(said)


def _special_entries(folder: Path) -> list[Path]:
    """The visible entries of ``folder`` (not below it) that are neither folders nor regular files once links are
    followed (a pipe, a device, a socket), none opened."""
    try:
        with os.scandir(folder) as listing:
            return sorted(Path(e.path) for e in listing
                          if not is_hidden(e.name) and not _is(e.is_dir) and not _is(e.is_file)
                          and os.path.exists(e.path))
    except OSError:
        return []


def expand_photo_args(paths: Iterable[str | Path], *, progress: bool = False) -> PhotoArgs:
    """Files as given, folders expanded to the photos inside; bad arguments, and entries inside a folder that had
    to be skipped, reported in ``problems`` (and told apart: ``bad_args``, ``skipped``), never fatal. The files inside folders that are not photos are in
    ``not_photos`` and logged in one warning (:func:`not_photos_warning`); a folder none of whose files is a photo
    is a problem naming them. ``progress``: a bar while many files without an extension are read
    (:func:`sniff_files`)."""
    out = PhotoArgs()
    holding: list[str] = []  # the folders with files that are not photos beside their photos
    for arg in paths:
        p = Path(arg)
        if p.is_dir():
            scan = scan_photos(p, progress=progress)
            out.photos.extend(scan.photos)
            for path, why in scan.skipped:
                out.problem(str(path), why, inside=True)
            if scan.photos:
                out.not_photos.extend(scan.not_photos)
                holding += [str(p)] if scan.not_photos else []
            elif scan.not_photos:
                n = len(scan.not_photos)
                out.problem(str(p), f"folder holds {n} file{'s' if n > 1 else ''}, none a photo: "
                            f"{not_photos_text(scan.not_photos, p)}. {NOT_PHOTO_ADVICE}", inside=False)
            elif scan.skipped:  # a pipe, a device, a broken link named as a photo, a link loop: each named with why
                out.problem(str(p), f"folder holds no photos: {_unread_text(scan.skipped)}", inside=False)
            elif special := _special_entries(p):
                out.problem(str(p), f"folder holds no photos: only entries that are not regular files (a device, a "
                            f"pipe, a socket): {first_few([e.name for e in special])}", inside=False)
            else:
                out.problem(str(p), "folder holds no photos: no file in it (hidden ones aside)", inside=False)
        elif p.is_file():
            out.photos.append(p)
        else:
            out.problem(str(p), entry_problem(p), inside=False)
    if out.not_photos:  # named within their folder when there is one, else as found
        where = holding[0] if len(holding) == 1 else "the folders given"
        logger.warning("%s", not_photos_warning(out.not_photos, where, holding[0] if len(holding) == 1 else None))
    return out
