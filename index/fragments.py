"""Rows written by workers, committed by one process: Lance fragments + one Append commit.

Workers (Ray tasks, on any machine that reaches the store) write their rows as Lance data files with
:func:`write_fragments`, which returns the fragments' metadata as JSON text; nothing is visible yet. The
driver commits all of them at once with :func:`commit_fragments` (one new table version: all or nothing).
Fragments of a run that dies before its commit are never seen. Their data files are removed by the driver
(:class:`PendingFiles`): the files its workers reported are journalled in the gallery folder until the commit;
a chunk that fails removes them at once, a driver killed (SIGKILL) leaves the journal, which the next Ray
build into the gallery finds and acts on. Only files named in a journal are ever removed, and none that a
version committed since references. Files of a write task still running when its chunk died were never
reported: they go with Lance's cleanup of old versions. Needs ``pylance`` (the ``ray`` extra); LanceDB alone
cannot write detached fragments.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

logger = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: journals are kept but never swept while a build may run
    fcntl = None  # type: ignore[assignment]

#: Journal files of chunks not committed yet, in the gallery folder: ``.uncommitted-<uuid>.json``.
JOURNAL_GLOB = ".uncommitted-*.json"


def _lance():
    try:
        import lance
    except ImportError as exc:  # pragma: no cover - the base install has no pylance
        raise ImportError("writing fragments needs pylance: pip install 'speciesid[ray]'") from exc
    return lance


def write_fragments(table: pa.Table, uri: str, options: dict[str, str] | None = None) -> list[str]:
    """Write ``table``'s rows as fragment files of the Lance dataset ``uri``; their metadata as JSON text."""
    if table.num_rows == 0:
        return []
    lance = _lance()
    frags = lance.fragment.write_fragments(table, uri, schema=table.schema, storage_options=options or None)
    return [json.dumps(f.to_json()) for f in frags]


def commit_fragments(uri: str, fragments: Sequence[str], read_version: int, options: dict[str, str] | None = None) -> int:
    """Append the fragments to dataset ``uri`` in one commit; returns the new version."""
    lance = _lance()
    frags = [lance.FragmentMetadata.from_json(f) for f in fragments]
    ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=read_version,
                                   storage_options=options or None)
    logger.info("committed %d fragment(s) to %s as version %d", len(frags), uri, ds.version)
    return int(ds.version)


def fragment_files(fragments: Sequence[str]) -> list[str]:
    """The data files (``data/NAME``, relative to the dataset) of fragments from :func:`write_fragments`."""
    return [f"data/{f['path']}" for text in fragments for f in json.loads(text).get("files", [])]


def remove_uncommitted(uri: str, files: Sequence[str], since: int, options: dict[str, str] | None = None) -> int:
    """Delete ``files`` (data files written for a commit that did not happen) unless a version of ``uri`` after
    ``since`` (the version the writes began from) references one of them: then none is deleted (the commit
    did happen). Returns how many were deleted."""
    if not files:
        return 0
    lance = _lance()
    ds = lance.dataset(uri, storage_options=options or None)
    later = [int(v["version"]) for v in ds.versions() if int(v["version"]) > since]
    mine = set(files)
    for version in later:
        view = ds.checkout_version(version)
        if mine & {f"data/{f.path}" for frag in view.get_fragments() for f in frag.metadata.files}:
            logger.info("%d data file(s) of %s are committed (version %d): kept", len(mine), uri, version)
            return 0
    session = ds.new_file_session()
    removed = 0
    for name in mine:
        try:
            if session.contains(name):
                session.delete_file(name)
                removed += 1
        except OSError as exc:  # one that cannot be deleted stays for Lance's cleanup
            logger.warning("could not remove the uncommitted file %s/%s: %s", uri, name, exc)
    return removed


class PendingFiles:
    """A journal of the data files a chunk's workers wrote, held (``flock``) by the driver until the commit.

    ``add`` appends the files of each write as it is reported (one JSON line each; a line cut by a crash is
    ignored), ``committed`` deletes the journal, ``abandon`` deletes the files and the journal. A driver
    killed before either leaves the journal unlocked; :func:`sweep_pending` acts on it later.
    """

    def __init__(self, folder: str | Path, uri: str, since: int, options: dict[str, str] | None = None) -> None:
        self.path = Path(folder) / f".uncommitted-{uuid.uuid4().hex}.json"
        self.uri, self.since, self.options = uri, since, options
        self.files: list[str] = []
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self._append({"uri": uri, "since": since})

    def _append(self, entry: dict) -> None:
        if self._fd is not None:
            os.write(self._fd, (json.dumps(entry) + "\n").encode())

    def add(self, fragments: Sequence[str]) -> None:
        """Journal the data files of these (uncommitted) fragments."""
        files = fragment_files(fragments)
        if files:
            self.files += files
            self._append({"files": files})

    def committed(self) -> None:
        """The commit happened: the journal goes, the files stay."""
        self._close()

    def abandon(self) -> int:
        """The commit did not happen: delete the journalled files (:func:`remove_uncommitted`), then the journal;
        returns how many files were deleted."""
        try:
            removed = remove_uncommitted(self.uri, self.files, self.since, self.options)
        finally:
            self._close()
        if removed:
            logger.info("removed the %d data file(s) of a chunk that was not committed", removed)
        return removed

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: a sweeper never reads a half-removed journal
        finally:
            os.close(fd)


def _read_journal(text: str) -> tuple[str | None, int, list[str]]:
    uri, since, files = None, -1, []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # the line a crash cut short
            continue
        uri = entry.get("uri", uri)
        since = int(entry.get("since", since))
        files += entry.get("files", [])
    return uri, since, files


def sweep_pending(folder: str | Path, uri: str, options: dict[str, str] | None = None) -> int:
    """Act on the journals of drivers killed before their commit (unlocked ones; a running build holds its
    own): delete the data files they name that no later version references. Returns how many were deleted."""
    removed = 0
    for path in sorted(Path(folder).glob(JOURNAL_GLOB)):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:  # committed or swept meanwhile
            continue
        try:
            if fcntl is None:  # pragma: no cover - cannot tell a running build from a dead one
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # a build still running
                continue
            if not path.exists():  # removed by its driver between our open and lock
                continue
            text = os.pread(fd, max(os.fstat(fd).st_size, 1), 0).decode(errors="replace")
            j_uri, since, files = _read_journal(text)
            if j_uri != uri:
                logger.warning("%s names another store (%s), not %s: left alone", path, j_uri, uri)
                continue
            removed += remove_uncommitted(uri, files, since, options)
            path.unlink(missing_ok=True)
        finally:
            os.close(fd)
    if removed:
        logger.info("removed %d data file(s) of chunks never committed (a build killed earlier)", removed)
    return removed
