"""Atomic file writes: the one helper every writer of the project uses.

A write goes to a temporary file beside the target, is flushed and fsynced, replaces the target with
``os.replace`` (atomic on POSIX and Windows), and the folder is fsynced so the rename itself survives a
power cut. Readers therefore see the old file or the new one, never half of one; a crash leaves at most a
hidden ``.NAME.*.tmp`` file, which is removed when the write fails in-process. :func:`atomic_directory` does
the same for a whole folder (an exported model).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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
