"""Where a reference photo's bytes come from: a file, or one member of a tar shard (webdataset).

A record's ``path`` names a file, or ``SHARD#MEMBER`` for a photo inside a tar shard
(``/data/tol/shard-000001.tar#3f2a….jpg``): that is also the stored ``source_path``, so thumbnails and
evidence read it back the same way. A file that exists under the whole name wins (a file may contain
``#``). Uncompressed shards are read by offset (their member table is read once per process and kept for
the last few shards); compressed shards work but are decompressed from the start for every read.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path

logger = logging.getLogger(__name__)

#: Separates a shard from the member inside it in a source locator.
MEMBER_SEP = "#"
#: Shard file endings recognised in a locator.
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
#: Member tables kept per process.
_CACHED_SHARDS = 16
#: Bytes in the MB that every size limit and size is said in (``SPECIESID_MAX_UPLOAD_MB``, the 413s, this module's).
MB = 1024 * 1024
#: The most bytes a photo file is read with (:func:`read_source`): a bigger one is refused from its size, without
#: being read (a video or a disk image named as a photo). Generous: an 8-bit RGB photo at the largest pixel count any
#: command decodes (``index.photos.DEFAULT_MAX_PIXELS``, 256 MP) is under it only when compressed, as every
#: camera's and phone's JPEG, HEIC or PNG is; an uncompressed TIFF that large is refused (convert it first).
MAX_PHOTO_BYTES = 256 * MB
#: Bytes read to tell a photo from another file by its signature (``index.photos.SNIFF_BYTES``).
_HEAD_BYTES = 32

_lock = threading.Lock()
_tables: OrderedDict[tuple[str, int, int], dict[str, tuple[int, int]]] = OrderedDict()


def absolute_path(path: str | Path | None) -> str | None:
    """A folder or file setting as recorded and compared: absolute, ``~`` expanded, links resolved, so that
    ``photos/``, ``./photos`` and the full path name one folder; None and "" as they are, a URI (``s3://...``) as
    written."""
    if path is None or path == "":
        return None if path is None else ""
    text = os.fspath(path)
    if "://" in text:
        return text
    return str(Path(text).expanduser().resolve())


def member_locator(shard: str | Path, member: str) -> str:
    """The locator of ``member`` inside ``shard``."""
    return f"{shard}{MEMBER_SEP}{member}"


def split_locator(source: str | Path) -> tuple[str, str] | None:
    """``SHARD#MEMBER`` -> (shard, member); None when ``source`` does not name a shard member."""
    text = os.fspath(source)
    for suffix in SHARD_SUFFIXES:
        cut = text.find(suffix + MEMBER_SEP)
        if cut >= 0:
            end = cut + len(suffix)
            return text[:end], text[end + 1 :]
    return None


def _member_table(shard: str) -> dict[str, tuple[int, int]]:
    """member name -> (data offset, size) of an uncompressed tar, read once per process (LRU)."""
    st = os.stat(shard)
    key = (shard, st.st_mtime_ns, st.st_size)
    with _lock:
        table = _tables.get(key)
        if table is not None:
            _tables.move_to_end(key)
            return table
    table = {}
    with tarfile.open(shard, "r:") as tar:
        try:
            for info in tar:
                if info.isfile():
                    table[info.name] = (info.offset_data, info.size)
        except tarfile.TarError:  # a shard cut short: the members before the cut are whole (the listing keeps them)
            if not table:
                raise
    with _lock:
        _tables[key] = table
        while len(_tables) > _CACHED_SHARDS:
            _tables.popitem(last=False)
    return table


def remember_members(shard: str, table: dict[str, tuple[int, int]]) -> None:
    """Keep a member table read elsewhere (a dataset listing) so reads of this shard need no second scan."""
    st = os.stat(shard)
    with _lock:
        _tables[(shard, st.st_mtime_ns, st.st_size)] = table
        while len(_tables) > _CACHED_SHARDS:
            _tables.popitem(last=False)


def read_member(shard: str, member: str, *, limit: int = MAX_PHOTO_BYTES, setting: str | None = None) -> bytes:
    """The bytes of ``member`` in tar ``shard`` (OSError when missing; :class:`PhotoTooLarge` over ``limit`` bytes,
    unread)."""
    if shard.endswith(".tar"):
        try:
            table = _member_table(shard)
        except tarfile.TarError as exc:
            raise OSError(f"{shard} is not a readable tar file ({exc})") from exc
        found = table.get(member)
        if found is None:
            raise FileNotFoundError(f"no member {member!r} in {shard}")
        offset, size = found
        if size > limit:
            raise PhotoTooLarge(member_locator(shard, member), too_large_reason(size, limit, setting))
        with open(shard, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        if len(data) != size:
            raise OSError(f"{shard} is truncated at member {member!r}")
        return data
    try:
        with tarfile.open(shard, "r:*") as tar:
            fh = tar.extractfile(member)
            if fh is None:
                raise FileNotFoundError(f"{member!r} in {shard} is not a file")
            data = fh.read(limit + 1)
            if len(data) > limit:
                raise PhotoTooLarge(member_locator(shard, member), too_large_reason(len(data), limit, setting))
            return data
    except KeyError:
        raise FileNotFoundError(f"no member {member!r} in {shard}") from None
    except tarfile.TarError as exc:
        raise OSError(f"{shard} is not a readable tar file ({exc})") from exc


def megabytes(size: float) -> str:
    """A size in bytes as every message says it: in the MB (:data:`MB`) that the limits are set in (``62914560`` ->
    ``60.0 MB``)."""
    return f"{size / MB:,.1f} MB"


class SourceRefused(OSError):
    """A photo file refused before it is read (whole): not a regular file, over the byte limit, or not a photo by
    its first bytes. An OSError, so every reader that reports an unreadable photo reports it; ``reason`` is what to
    say about the photo (after its name)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(errno.EINVAL, reason, os.fspath(path))
        self.reason = reason


class NotRegularFile(SourceRefused):
    """The path is a device, a pipe (FIFO) or a socket, or a link to one: never opened for reading."""


class PhotoTooLarge(SourceRefused):
    """A photo file over the byte limit (:data:`MAX_PHOTO_BYTES`, or the caller's)."""


class NotAPhotoFile(SourceRefused):
    """A file over the byte limit whose first bytes are no photo format's: said so rather than "too large"."""


def not_regular_reason(mode: int) -> str:
    """Why a file of ``mode`` (``os.stat``'s ``st_mode``) is refused as a photo."""
    kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a folder" if stat.S_ISDIR(mode) else "not a file")
    return f"not a regular file ({kind}): a photo is read from a regular file only"


def too_large_reason(size: int, limit: int, setting: str | None = None) -> str:
    """Why a photo file of ``size`` bytes is refused over ``limit`` (``setting``: the variable that sets it)."""
    where = f" ({setting})" if setting else " (a video or a disk image named as a photo? convert a huge TIFF first)"
    return f"too large: {megabytes(size)}, over the {megabytes(limit)} a photo file may have{where}"


def _read_file(path: str | Path, limit: int, setting: str | None) -> bytes:
    """The bytes of the regular file at ``path``, refused without being read past its first bytes when it is not
    one (a link to ``/dev/zero``, a FIFO: never opened for reading, nor blocked on when swapped in after the
    ``stat``) or is over ``limit`` bytes (then read :data:`_HEAD_BYTES` only, to say "not a photo" of a video named
    ``.jpg``). A file that grows past ``limit`` while read is refused too: never more than ``limit + 1`` bytes."""
    from index.photos import PHOTO_FORMAT_WORDS, sniff_photo_format  # index.photos: no import of this module

    st = os.stat(path)  # FileNotFoundError: the caller tries a shard member
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(path, not_regular_reason(st.st_mode))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    with open(fd, "rb", closefd=True) as fh:
        st = os.fstat(fh.fileno())  # the file opened: a FIFO swapped in after the stat is refused here, unread
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(path, not_regular_reason(st.st_mode))
        if st.st_size > limit:
            if sniff_photo_format(fh.read(_HEAD_BYTES)) is None:
                raise NotAPhotoFile(path, f"not a photo: its content is not {PHOTO_FORMAT_WORDS} (told from its "
                                    f"first bytes; its {megabytes(st.st_size)} were not read)")
            raise PhotoTooLarge(path, too_large_reason(st.st_size, limit, setting))
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise PhotoTooLarge(path, too_large_reason(len(data), limit, setting))
    return data


def read_source(source: str | Path, *, limit: int | None = None, setting: str | None = None) -> bytes:
    """The bytes of a photo: a file, or a ``SHARD#MEMBER`` (OSError when it cannot be read). A file that is not a
    regular one (a device, a FIFO) or has over ``limit`` bytes is refused without being read
    (:class:`SourceRefused`, an OSError; ``setting``: the variable that sets ``limit``, named in the refusal;
    ``limit`` None: :data:`MAX_PHOTO_BYTES`)."""
    limit = MAX_PHOTO_BYTES if limit is None else limit
    try:
        return _read_file(source, limit, setting)
    except FileNotFoundError:
        parts = split_locator(source)
        if parts is None or not os.path.isfile(parts[0]):
            raise
        return read_member(*parts, limit=limit, setting=setting)
