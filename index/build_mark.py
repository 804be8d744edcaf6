"""The gallery folder's mark of a build that has not finished (``build.json``), and what readers say of it.

A partial gallery answers queries like a whole one, yet an interrupted build (Ctrl-C, a crash, a kill) leaves out
whole species: dataset folders are read in order. So a build marks the folder before its first photo
(:func:`building`), as ``running`` with its host and pid; when it ends with an error or a Ctrl-C the mark says
``interrupted``; when it completes the mark is removed (when still its own: :func:`building` on two builds into
one folder). A mark left ``running`` by a process that is gone (killed,
the machine restarted) reads as interrupted too. Every write is atomic (``index.atomic``).

Readers (``index info``, ``identify``, ``evaluate``, the server's answers and ``/readyz``) ask :func:`build_note`:
"" when the last build into the folder completed (or none was marked), else the line to show.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from index.atomic import fsync_dir, write_json_atomic
from index.layout import GalleryLayout

logger = logging.getLogger(__name__)

#: What readers say while the mark stands (the build ended before its last photo, or before the index was finished).
INTERRUPTED_NOTE = "the last build into this gallery was interrupted: run it again to add the rest"


def read_mark(root: str | Path) -> dict[str, Any] | None:
    """The folder's build mark (``state``: running or interrupted; ``host``, ``pid``, ``started``, and once
    interrupted ``after``: the step it was in, if every photo was committed); None when there is none (or it cannot
    be read: logged, never raised, since a note must not fail a query)."""
    path = GalleryLayout(Path(root)).build_mark
    try:
        mark = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.info("the build mark %s was not read: %s", path, exc)
        return None
    return mark if isinstance(mark, dict) else None


def _alive(mark: dict[str, Any]) -> bool:
    """Whether the build that wrote a ``running`` mark still runs: its pid is alive on this host (another host's
    build cannot be looked at from here: taken as running)."""
    if mark.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(mark.get("pid", -1)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True  # a live process of another user, or a mark that names none readable: not called dead
    return True


def interrupted(root: str | Path) -> dict[str, Any] | None:
    """The mark of a build into ``root`` that did not finish (interrupted, or ``running`` by a process that is
    gone); None when the last build completed or one is running now."""
    mark = read_mark(root)
    return None if mark is None or _live(mark) else mark


def _live(mark: dict[str, Any]) -> bool:
    """Whether ``mark`` is a build running now (``running``, its process alive)."""
    return mark.get("state") == "running" and _alive(mark)


def build_status(root: str | Path, *, api: bool = False) -> dict[str, str]:
    """``{"state", "note"}`` of the last build into ``root``: ``complete`` (or none marked; note ""), ``running``
    (a build runs now: its species may not all be in yet) or ``interrupted`` (:data:`INTERRUPTED_NOTE`, or for one
    cut short once every photo was committed, the step it was in and "run it again to finish"). ``api``: worded for
    an HTTP client, who may hold no key (``/readyz``): the running build's pid and host are left out."""
    mark = read_mark(root)
    if mark is None:
        return {"state": "complete", "note": ""}
    if mark.get("state") == "running" and _alive(mark):
        where = "" if api else f"pid {mark.get('pid')} on {mark.get('host')}, "
        return {"state": "running",
                "note": f"a build into this gallery is running ({where}since {mark.get('started')}): until it "
                        "ends, some of its species may not be in the gallery yet"}
    if after := mark.get("after"):  # every photo committed; the index (or the cleaning) was not finished
        return {"state": "interrupted",
                "note": f"the last build into this gallery was interrupted while {after}: run it again to finish"}
    return {"state": "interrupted", "note": INTERRUPTED_NOTE}


def build_note(root: str | Path, *, api: bool = False) -> str:
    """The line readers show while the last build into ``root`` has not finished (:func:`build_status`'s note,
    ``api``: worded for an HTTP client); "" when it completed."""
    return build_status(root, api=api)["note"]


def _write(root: Path, state: str, started: str, after: str | None = None) -> dict[str, Any]:
    mark = {"state": state, "host": socket.gethostname(), "pid": os.getpid(), "started": started}
    if after:
        mark["after"] = after
    write_json_atomic(GalleryLayout(root).build_mark, mark)
    return mark


def _same_build(a: dict[str, Any] | None, b: dict[str, Any]) -> bool:
    """Whether mark ``a`` is the one build ``b`` wrote (same host, pid and start)."""
    return a is not None and all(a.get(key) == b[key] for key in ("host", "pid", "started"))


def clear(root: str | Path) -> bool:
    """Remove the folder's build mark (a build into it completed); returns whether there was one."""
    path = GalleryLayout(Path(root)).build_mark
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


@contextlib.contextmanager
def building(root: str | Path) -> Iterator[dict[str, Any] | None]:
    """Mark ``root`` as being built for the block; yields the mark of an earlier build that did not finish (None
    when there was none: this build is no resume). The block ending normally removes the mark, when it is still
    this build's: another build's mark that replaced it is kept, and the ``running`` mark of another build this one
    replaced is written back while that build still runs (two builds into one folder: one completing does not
    hide the other's interruption). An exception (Ctrl-C included) leaves it ``interrupted``, even over another
    build's mark (the gallery lacks this build's rest), with the step named by the exception's ``after``
    attribute when it has one (``retrieval.pipeline.ReferencesInterrupted``)."""
    root = Path(root)
    before = read_mark(root)  # read once: what an earlier build left, or a build running now
    other = before if before is not None and _live(before) else None
    earlier = before if before is not None and other is None else None
    if other is not None:
        logger.info("another build into %s is running (pid %s on %s, since %s): its mark is written back if this "
                    "one completes first", root, other.get("pid"), other.get("host"), other.get("started"))
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    mine = _write(root, "running", started)
    try:
        yield earlier
    except BaseException as exc:
        try:
            _write(root, "interrupted", started, getattr(exc, "after", None))
        except (Exception, KeyboardInterrupt) as failed:  # noqa: BLE001 - the mark must not hide the interrupt
            logger.warning("the build mark of %s was not updated: %s", root, failed)  # "running" by a dead pid:
        raise  # read as interrupted all the same
    now = read_mark(root)
    if now is not None and not _same_build(now, mine):
        logger.info("the build mark of %s is another build's (%s, pid %s on %s, since %s): kept", root,
                    now.get("state"), now.get("pid"), now.get("host"), now.get("started"))
    elif other is not None and _alive(other):
        write_json_atomic(GalleryLayout(root).build_mark, other)
        logger.info("another build into %s still runs (pid %s on %s): its mark is written back", root,
                    other.get("pid"), other.get("host"))
    else:
        clear(root)
