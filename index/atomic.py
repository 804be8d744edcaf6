"""Atomic file writes: the one helper every writer of the project uses.

A write goes to a temporary file beside the target, is flushed and fsynced, replaces the target with
``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced so the rename itself survives a
power cut. Readers therefore see the old file or the new one, never half of one; a crash leaves at most a
hidden ``.NAME.*.tmp`` file, which is removed when the write fails in-process (and by
:func:`remove_leftovers` when the process was killed). :func:`atomic_directory` does the same for a whole folder
(an exported model).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def fsync_dir(directory: str | Path) -> None:
    """fsync a folder so a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], Any] | bytes | str) -> Path:
    """Write ``path`` atomically and durably; returns it.

    ``write`` is the content (``bytes`` or ``str``, UTF-8) or a callable that writes a file at the temporary
    path it is given (``np.save``, ``torch.save``, ``faiss.write_index``, ``fig.savefig`` ...). The temporary
    file keeps its exact name: callers whose writer appends a suffix must pass a path that already has it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp: the file gets the umask's permissions, like any other file the user writes
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        if isinstance(write, bytes):
            tmp.write_bytes(write)
        elif isinstance(write, str):
            tmp.write_text(write, encoding="utf-8")
        else:
            write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_json_atomic(
    path: str | Path, data: Any, *, indent: int = 2, sort_keys: bool = True, allow_nan: bool = True
) -> Path:
    """JSON through :func:`atomic_write` (serialised first, so a bad value never touches the disk)."""
    return atomic_write(path, json.dumps(data, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Build a folder whole, then put it at ``path`` (replacing what was there); yields the temporary folder.

    The folder is written beside the target under a hidden temporary name and renamed into place only when
    the block ends without an error, so readers never see half of one. A folder already at ``path`` is first
    renamed aside, then removed (for that instant there is none: readers must treat a missing folder as a
    cache miss). When another process puts its own folder at ``path`` in the meantime, the last one wins.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as fh:
                    os.fsync(fh.fileno())
        fsync_dir(tmp)
        old = path.with_name(f".{path.name}.{uuid.uuid4().hex}.old")
        try:
            os.replace(path, old)
        except FileNotFoundError:
            old = None
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)


#: The temporary names of :func:`atomic_write` and :func:`atomic_directory` (``.NAME.<32 hex>.tmp[.suffix]``, and
#: ``.old`` for a folder renamed aside).
_LEFTOVER = re.compile(r"^\..+\.[0-9a-f]{32}\.(tmp|old)(\.[^/]*)?$")


def is_leftover(name: str) -> bool:
    """Whether ``name`` is a temporary name of :func:`atomic_write` or :func:`atomic_directory`."""
    return bool(_LEFTOVER.match(name))


def remove_leftovers(folder: str | Path, *, older_than_s: float = 600.0) -> list[Path]:
    """Remove what writes killed mid-way left in ``folder`` (temporary files and folders of this module, untouched
    for ``older_than_s`` seconds: a write in progress is never that old); returns what was removed. Call it where
    no write of the folder can be in progress, e.g. under a gallery's write lock."""
    removed = []
    now = time.time()
    try:
        children = list(Path(folder).iterdir())
    except OSError:
        return removed
    for child in children:
        if not is_leftover(child.name):
            continue
        with contextlib.suppress(OSError):
            if now - child.lstat().st_mtime < older_than_s:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
            removed.append(child)
    return removed
