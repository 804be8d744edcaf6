"""Where a reference photo's bytes come from: a file, or one member of a tar shard (webdataset).

A record's ``path`` names a file, or ``SHARD#MEMBER`` for a photo inside a tar shard
(``/data/tol/shard-000001.tar#3f2a….jpg``): that is also the stored ``source_path``, so thumbnails and
evidence read it back the same way. A file that exists under the whole name wins (a file may contain
``#``). Uncompressed shards are read by offset (their member table is read once per process and kept for
the last few shards); compressed shards work but are decompressed from the start for every read.
"""

from __future__ import annotations

import logging
import os
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


def read_member(shard: str, member: str) -> bytes:
    """The bytes of ``member`` in tar ``shard`` (OSError when missing)."""
    if shard.endswith(".tar"):
        try:
            table = _member_table(shard)
        except tarfile.TarError as exc:
            raise OSError(f"{shard} is not a readable tar file ({exc})") from exc
        found = table.get(member)
        if found is None:
            raise FileNotFoundError(f"no member {member!r} in {shard}")
        offset, size = found
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
            return fh.read()
    except KeyError:
        raise FileNotFoundError(f"no member {member!r} in {shard}") from None
    except tarfile.TarError as exc:
        raise OSError(f"{shard} is not a readable tar file ({exc})") from exc


def read_source(source: str | Path) -> bytes:
    """The bytes of a photo: a file, or a ``SHARD#MEMBER`` (OSError when it cannot be read)."""
    try:
        return Path(source).read_bytes()
    except FileNotFoundError:
        parts = split_locator(source)
        if parts is None or not os.path.isfile(parts[0]):
            raise
        return read_member(*parts)
