"""The gallery folder's marks of builds (and adds) that have not finished, and what readers say of them.

A partial gallery answers queries like a whole one, yet an interrupted build (Ctrl-C, a crash, a kill) leaves out
whole species: dataset folders are read in order. So a build marks the folder before its first photo
(:func:`building`) with a mark of its own, ``build-marks/<build id>.json``: ``running``, with its host, pid, start,
what it builds (``key``: the dataset, its root and metadata file) and which photos (``photos``: a digest of their
sorted paths, when listed up front). When it ends with an error or a Ctrl-C its mark says ``interrupted``; a mark
left ``running`` by a process that is gone (killed, the machine restarted) reads as interrupted too. An add
(``references add``) marks the folder the same way, with a mark of kind ``add`` (:func:`adding`), from just before
its first commit of rows whenever the gallery may come to hold part of it: an add that commits more than once (more
photos than one commit takes), or one cut by Ctrl-C after it kept photos. An add of one commit is all there or not
at all, whatever is killed when: it needs no mark (an API add is one commit). Every write is atomic
(``index.atomic``); each build or add writes only its own file, so two of them into one folder never overwrite each
other's mark.

Which marks a build clears when it completes (:func:`building`), besides its own, the rule: an unfinished mark
``A`` (interrupted, or running by a process that is gone) is cleared by a build ``B`` that completes when B covered
A's photos, read as: the same ``key`` (the same dataset, root and metadata file; for an add, the same species), and

- A had ended before B scanned its dataset (B took it up: B scanned the dataset as it is now, after A; a photo
  removed from the dataset meanwhile is not wanted): A's mark was unfinished both in the marks read before B's scan
  (:func:`unfinished_ids`, passed as ``building(before=...)``) and when B was marked, or
- A ended while B ran, and both listed the same photos (the same ``photos`` digest: B's scan holds exactly A's).

Anything else keeps A's mark: a build of another dataset, one still running, one killed while B ran on a dataset
whose photos changed between the two scans, or a Ray build's (which streams its photos, so lists none up front),
until the same command is run again after it. A mark of the old layout (one ``build.json`` per folder, no key) is
read as before and cleared by any build that completes after it ended (the old rule). An add's mark that did not
finish is cleared by an add that completes with the same species and the same photos (the same command run again;
while that one runs, readers say it runs). To forget a mark whose dataset is gone for good, delete its file.

Readers (``index info``, ``identify``, ``evaluate``, the server's answers and ``/readyz``) ask :func:`build_note`:
"" when no build or add is unfinished, else the line to show.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from index.atomic import fsync_dir, is_leftover, remove_leftovers, write_json_atomic
from index.interrupts import held_interrupt
from index.layout import GalleryLayout

logger = logging.getLogger(__name__)

#: What readers say while a mark that names no dataset stands (the old layout's, or a build marked with no ``key``):
#: the build ended before its last photo. A mark with a key names its build: :func:`interrupted_note`.
INTERRUPTED_NOTE = "the last build into this gallery was interrupted: run it again to add the rest"


#: What readers say of a gallery that holds no row, no mark, and records no writer that ever committed one: a build
#: killed after it made the table, before it marked the folder (or one that could use none of its photos).
NEVER_STORED_NOTE = ("no photo was ever stored in this gallery: the build that made it was interrupted before its "
                     "first photo: run it again to add them")


def interrupted_note(key: dict[str, Any] | None, after: str | None = None, *, api: bool = False) -> str:
    """What readers say while the mark of a build of ``key`` (:func:`dataset_key`) that was cut short stands: the
    build named (its root and ``--dataset``, ``--metadata``: the command to run again), or, for a build cut short
    once every photo was committed, the step it was in (``after``). ``api``: for an HTTP client, no server path."""
    if not isinstance(key, dict) or not key.get("dataset"):
        return f"the last build into this gallery was interrupted while {after}: run it again to finish" if after \
            else INTERRUPTED_NOTE
    if api:
        what = f"a build of a {key['dataset']} dataset"
    else:
        flags = f"--dataset {key['dataset']}" + (f" --metadata {key['metadata']}" if key.get("metadata") else "")
        what = f"a build of {key.get('root')} ({flags})"
    if after:
        return f"{what} into this gallery was interrupted while {after}: run it again to finish"
    return f"{what} into this gallery was interrupted: run it again to add the rest"


def add_note(species: str) -> str:
    """What readers say while an add of photos of ``species`` that was cut short has not been run again."""
    return f"an add of photos of {species} to this gallery was interrupted: run it again to add the rest"


def dataset_key(dataset: str, root: str | Path, metadata: str | Path | None = None) -> dict[str, str | None]:
    """What a build builds, as its mark records it: the dataset kind, its root and metadata file (made absolute)."""

    def where(path: str | Path | None) -> str | None:
        if path is None:
            return None
        text = str(path)
        return text if "://" in text else os.path.abspath(text)

    return {"dataset": dataset, "root": where(root), "metadata": where(metadata)}


def photos_digest(sources: Iterable[str]) -> str:
    """A digest of a set of photos (their source paths as the store records them, in any order, repeats once)."""
    h = hashlib.sha256()
    for text in sorted(set(sources)):
        h.update(text.encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def _read(path: Path) -> dict[str, Any] | None:
    try:
        mark = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        logger.info("the build mark %s was not read: %s", path, exc)
        return None
    return mark if isinstance(mark, dict) else None


def marks(root: str | Path) -> list[tuple[Path, dict[str, Any]]]:
    """The folder's marks, ``(file, mark)``: the old layout's ``build.json`` first, then ``build-marks/`` by name
    (a mark that cannot be read is logged and left out, never raised: a note must not fail a query)."""
    layout = GalleryLayout(Path(root))
    found = []
    if (legacy := _read(layout.build_mark)) is not None:
        found.append((layout.build_mark, legacy))
    try:
        names = sorted(e.name for e in os.scandir(layout.build_marks)  # never a write's temporary file
                       if e.name.endswith(".json") and not is_leftover(e.name))
    except (FileNotFoundError, NotADirectoryError):
        return found
    except OSError as exc:
        logger.info("the build marks of %s were not listed: %s", root, exc)
        return found
    for name in names:
        if (mark := _read(layout.build_marks / name)) is not None:
            found.append((layout.build_marks / name, mark))
    return found


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


def _live(mark: dict[str, Any]) -> bool:
    """Whether ``mark`` is a build running now (``running``, its process alive)."""
    return mark.get("state") == "running" and _alive(mark)


def _mark_id(mark: dict[str, Any]) -> str:
    """A mark's id (``"legacy"`` for the old layout's ``build.json``, which has none)."""
    return mark.get("id", "legacy")


def _unfinished(found: list[dict[str, Any]], live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Of ``found`` marks, those of builds (or adds) that did not finish and that no build running now (``live``:
    those of ``found`` that are, :func:`_live`) takes up."""
    resumed = {i for m in live for i in m.get("resumes", ())}
    return [m for m in found if not any(m is x for x in live) and _mark_id(m) not in resumed]


def _found_and_live(root: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(the marks in ``root``, those of builds running now): each mark's process looked up once."""
    found = [m for _, m in marks(root)]
    return found, [m for m in found if _live(m)]


def any_running(root: str | Path) -> bool:
    """Whether a build or add into ``root`` is marked running by a process that is alive (or may be: another
    host's)."""
    return bool(_found_and_live(root)[1])


def unfinished_ids(root: str | Path) -> set[str]:
    """The ids of the marks in ``root`` of builds (or adds) that did not finish and that no build running now takes
    up (``"legacy"`` for the old layout's): read before a build scans its dataset, what it may take up
    (:func:`building`'s ``before``)."""
    return {_mark_id(m) for m in _unfinished(*_found_and_live(root))}


def _note(mark: dict[str, Any], api: bool = False) -> str:
    if mark.get("kind") == "add":
        return add_note(str(mark.get("species")))
    # "after": every photo committed; the index (or the cleaning) was not finished
    return interrupted_note(mark.get("key"), mark.get("after"), api=api)


def _never_stored(root: str | Path) -> bool:
    """Whether ``root``'s ``gallery.json`` records that no writer ever committed a row (``embedded_by`` empty: each
    writer records itself there before its first commit; a gallery of an older speciesid has no such key)."""
    try:
        info = json.loads(GalleryLayout(Path(root)).info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("embedded_by") == []


def build_status(root: str | Path, *, api: bool = False, references: int | None = None) -> dict[str, str]:
    """``{"state", "note"}`` of the builds into ``root``: ``complete`` (none unfinished; note ""), ``interrupted``
    (one or more did not finish and were not covered since: their notes, builds' first, each naming its build
    (:func:`interrupted_note`; :data:`INTERRUPTED_NOTE` for a mark that names none), for one cut short once every
    photo was committed the step it was in and "run it again to finish"; an add's, naming its species) or
    ``running`` (a build runs now: its species may not all be in yet). ``api``: worded for an HTTP client, who may
    hold no key (``/readyz``): the running build's pid and host are left out. ``references``: how many the gallery
    holds, excluded ones included, when the caller knows: 0 in a gallery no row was ever committed to
    (:func:`_never_stored`) and whose folder never held a mark (no ``build-marks/``: every build or add that marked
    it leaves the folder, a Ray build's too, which records no embedding, and one that could use none of its photos)
    is a build killed after it made the table, before it marked the folder, read as interrupted
    (:data:`NEVER_STORED_NOTE`)."""
    found, live = _found_and_live(root)
    if unfinished := _unfinished(found, live):
        ordered = sorted((m.get("kind") == "add", "id" in m and bool(m.get("key")), str(m.get("started")),
                          _note(m, api)) for m in unfinished)  # builds first, the old wording first; by start
        notes = list(dict.fromkeys(note for *_, note in ordered))
        return {"state": "interrupted", "note": "; ".join(notes)}
    if live:
        return {"state": "running", "note": _running_note(live[0], api)}
    if references == 0 and not found and not GalleryLayout(Path(root)).build_marks.exists() and _never_stored(root):
        return {"state": "interrupted", "note": NEVER_STORED_NOTE}
    return {"state": "complete", "note": ""}


def _running_note(mark: dict[str, Any], api: bool) -> str:
    """What readers say while the build (or add) of ``mark`` runs; ``api``: no pid or host."""
    where = "" if api else f"pid {mark.get('pid')} on {mark.get('host')}, "
    if mark.get("kind") == "add":
        return (f"an add of photos of {mark.get('species')} to this gallery is running ({where}since "
                f"{mark.get('started')}): until it ends, some of its photos may not be in the gallery yet")
    return (f"a build into this gallery is running ({where}since {mark.get('started')}): until it ends, some of its "
            "species may not be in the gallery yet")


def build_note(root: str | Path, *, api: bool = False) -> str:
    """The line readers show while a build (or add) into ``root`` has not finished (:func:`build_status`'s note,
    ``api``: worded for an HTTP client); "" when none is."""
    return build_status(root, api=api)["note"]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _new_mark(state: str, key: dict[str, Any] | None, photos: str | None, **extra: Any) -> dict[str, Any]:
    host = socket.gethostname()
    started = _now()
    safe = re.sub(r"[^A-Za-z0-9.-]", "_", host)[:40]
    stamp = started.replace(":", "").replace("+0000", "Z").replace("-", "")
    mark = {"id": f"{stamp}-{safe}-{os.getpid()}-{secrets.token_hex(4)}", "state": state, "host": host,
            "pid": os.getpid(), "started": started, "key": key, "photos": photos}
    mark.update(extra)
    return mark


def _put(root: Path, mark: dict[str, Any]) -> Path:
    path = GalleryLayout(root).build_marks / f"{mark['id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, mark)
    return path


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    fsync_dir(path.parent)
    return True


def _covered(mark: dict[str, Any], key: dict[str, Any] | None, photos: str | None, taken_up: set[str]) -> bool:
    """Whether a completed build (or add) of ``key`` over ``photos`` covered the unfinished ``mark`` (the module's
    rule); ``taken_up``: the marks already unfinished when it started."""
    if _mark_id(mark) == "legacy":  # the old layout: any build that completes after it ended (the old rule)
        return "legacy" in taken_up
    if mark.get("key") != key:
        return False
    return mark["id"] in taken_up or (photos is not None and mark.get("photos") == photos)


def clear_covered(root: str | Path, key: dict[str, Any] | None, photos: str | None, *,
                  taken_up: Iterable[str] = ()) -> int:
    """Remove the unfinished marks a build (or add) of ``key`` over ``photos`` that completed covered (the module's
    rule; ``taken_up``: the ids of the marks unfinished when it started, ``"legacy"`` for ``build.json``); returns
    how many. A completed add calls it with ``{"add": species}``."""
    taken = set(taken_up)
    cleared = 0
    for path, mark in marks(root):
        if not _live(mark) and _covered(mark, key, photos, taken):
            cleared += _remove(path)
            logger.info("the build mark %s (%s, since %s) is covered by this build: removed", path.name,
                        mark.get("state"), mark.get("started"))
    return cleared


def mark_interrupted(root: str | Path, key: dict[str, Any] | None, photos: str | None, **extra: Any) -> Path | None:
    """Leave an ``interrupted`` mark in ``root`` (of an add: ``kind="add"``, ``species=...``; an add marks itself
    with :func:`adding`); its file, or None when it could not be written (logged: the mark must not hide the
    interrupt)."""
    try:
        return _put(Path(root), _new_mark("interrupted", key, photos, **extra))
    except (Exception, KeyboardInterrupt) as failed:  # noqa: BLE001 - a second Ctrl-C, a full disk
        logger.warning("the mark of the interrupted work in %s was not written: %s", root, failed)
        return None


@contextlib.contextmanager
def building(root: str | Path, *, key: dict[str, Any] | None = None, photos: str | None = None,
             before: Iterable[str] | None = None) -> Iterator[dict[str, Any] | None]:
    """Mark ``root`` as being built (of ``key`` over ``photos``: :func:`dataset_key`, :func:`photos_digest`) for
    the block; yields the last unfinished mark this build takes up (one of the same key, or of the old layout),
    None when there is none (this build is no resume): while it runs, readers say those run again (``running``).
    The block ending normally removes the unfinished marks this build covered (the module's rule), then its own;
    other builds' marks are left as they are. ``before``: :func:`unfinished_ids` read before this build scanned its
    dataset; only those marks are taken up (one cut short between the scan and this call may hold a photo the scan
    missed); None: every unfinished one at this call (a scan made in the block). An exception (Ctrl-C
    included) leaves this build's mark ``interrupted``, with the step named by the exception's ``after`` attribute
    when it has one (``retrieval.pipeline.ReferencesInterrupted``)."""
    root = Path(root)
    for left in remove_leftovers(GalleryLayout(root).build_marks):  # a mark's write killed (a second Ctrl-C)
        logger.info("removed %s, left by an interrupted write of a build mark", left.name)
    found, live = _found_and_live(root)  # read once: what earlier builds left, and builds running now
    scanned_after = None if before is None else set(before)
    taken_up = {_mark_id(m): m for m in found
                if not any(m is x for x in live) and ("id" not in m or m.get("key") == key)
                and (scanned_after is None or _mark_id(m) in scanned_after)}
    for other in live:
        logger.info("another %s into %s is running (pid %s on %s, since %s): its mark is kept",
                    "add" if other.get("kind") == "add" else "build", root, other.get("pid"), other.get("host"),
                    other.get("started"))
    mine = _new_mark("running", key, photos, resumes=sorted(taken_up))  # readers say those run again now
    path = _put(root, mine)
    try:
        yield list(taken_up.values())[-1] if taken_up else None
    except BaseException as exc:
        try:
            after = getattr(exc, "after", None)
            _put(root, mine | {"state": "interrupted", "ended": _now()} | ({"after": after} if after else {}))
        except (Exception, KeyboardInterrupt) as failed:  # noqa: BLE001 - the mark must not hide the interrupt
            logger.warning("the build mark of %s was not updated: %s", root, failed)  # "running" by a dead pid:
        raise  # read as interrupted all the same
    with held_interrupt():  # the build is done: a Ctrl-C now does not leave its mark behind (raised after)
        clear_covered(root, key, photos, taken_up=taken_up)  # first: never seen unfinished with no build on them
        _remove(path)


@contextlib.contextmanager
def adding(root: str | Path, species: str, photos: str | None) -> Iterator[Callable[..., None]]:
    """An add of photos of ``species`` (``photos``: :func:`photos_digest` of their paths) into ``root``, for the
    block. Yields ``mark(**extra)``, which the add calls just before its first commit of rows when the gallery may
    come to hold part of it (an add that commits more than once), or when it was cut short after it kept photos
    (``added=N``): the first call writes the add's ``running`` mark (with ``extra``), which a kill from then on
    leaves behind, read as interrupted (:func:`build_status`); an add that never calls it writes no mark. The block
    ending normally removes the marks of earlier adds of the same species and photos that did not finish (covered),
    then its own; an exception leaves its mark, if written, ``interrupted``. While it runs, the earlier marks it
    covers read as taken up (``resumes``)."""
    root = Path(root)
    key = {"add": species}
    mine: dict[str, Any] = {}  # the mark, once written

    def mark(**extra: Any) -> None:
        if mine:
            mine.update(extra)  # written when the add ends (an interrupt: "added")
            return
        found, live = _found_and_live(root)
        resumes = sorted(_mark_id(m) for m in _unfinished(found, live)
                         if m.get("key") == key and photos is not None and m.get("photos") == photos)
        made = _new_mark("running", key, photos, kind="add", species=species, resumes=resumes, **extra)
        _put(root, made)
        mine.update(made)

    try:
        yield mark
    except BaseException:
        if mine:
            try:
                _put(root, mine | {"state": "interrupted", "ended": _now()})
            except (Exception, KeyboardInterrupt) as failed:  # noqa: BLE001 - the mark must not hide the interrupt
                logger.warning("the mark of the add into %s was not updated: %s", root, failed)  # "running" by a
        raise  # dead pid: read as interrupted all the same
    with held_interrupt():  # the add is done: a Ctrl-C now does not leave its mark behind (raised after)
        clear_covered(root, key, photos)  # first: never seen unfinished with no add on them
        if mine:
            _remove(GalleryLayout(root).build_marks / f"{mine['id']}.json")
