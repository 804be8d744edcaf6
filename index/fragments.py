"""Rows written by workers, committed by one process: Lance fragments + one Append commit.

Workers (Ray tasks, on any machine that reaches the store) write their rows as Lance data files with
:func:`write_fragments`, which returns the fragments' metadata as JSON text; nothing is visible yet. The driver
commits all of them at once with :func:`commit_fragments` (one new table version: all or nothing). Fragments of
a run that dies before its commit are never seen. Their data files are removed by the driver
(:class:`PendingFiles`): the files its workers reported are journalled in the gallery folder until the commit; a
chunk that fails removes them at once, a driver killed (SIGKILL) leaves the journal, which the next Ray build
into the gallery on the same machine finds and acts on once that driver is gone (a journal from another machine, in a
copied folder, is left alone: that build may still run). Only files named in a journal are ever removed, and
none that a version committed since references. The removal runs outside the write lock and the store's lease:
the files are in no version, so no writer reads them. Files of a write task still running when its chunk died
were never reported: they go with Lance's cleanup of old versions. Needs ``pylance`` (a dependency of speciesid,
imported on first use: :func:`index.store.import_lance`); LanceDB alone cannot write detached fragments.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import string
import types
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from index.layout import JOURNAL_GLOB, JOURNAL_PREFIX, JOURNAL_SUFFIX

logger = logging.getLogger(__name__)

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: journals are kept but never swept while a build may run
    fcntl = None  # type: ignore[assignment]

#: How many of a store's versions an uncommitted file is checked against at most (see remove_uncommitted).
CHECK_VERSIONS = 50


def _lance() -> types.ModuleType:  # lance imported on first use
    from index.store import import_lance

    return import_lance()


def write_fragments(table: pa.Table, uri: str, options: dict[str, str] | None = None) -> list[str]:
    """Write ``table``'s rows as fragment files of the Lance dataset ``uri``; their metadata as JSON text."""
    if table.num_rows == 0:
        return []
    lance = _lance()
    frags = lance.fragment.write_fragments(table, uri, schema=table.schema, storage_options=options or None)
    return [json.dumps(f.to_json()) for f in frags]


def commit_fragments(uri: str, fragments: Sequence[str], read_version: int,
                     options: dict[str, str] | None = None) -> int:
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


def _committed_files(view: Any) -> set[str]:
    return {f"data/{f.path}" for frag in view.get_fragments() for f in frag.metadata.files}


def remove_uncommitted(uri: str, files: Sequence[str], since: int, options: dict[str, str] | None = None, *,
                       limit: int = CHECK_VERSIONS) -> int:
    """Delete ``files`` (data files written for a commit that did not happen) unless a version of ``uri`` after
    ``since`` (the version the writes began from) references one of them: then none is deleted (the commit
    did happen). Returns how many were deleted; raises when that could not be decided (the caller keeps its
    journal, for a later try).

    The files can only be referenced by their chunk's one Append commit, and by the versions after it until a
    compaction rewrites them. So the versions are read newest first, only while the files still exist: the
    latest one (a commit that happened, the common case of a journal left behind), back to ``since``. A version
    already cleaned up ends the walk (Lance's cleanup removed the older ones too, and files only they
    referenced). More than ``limit`` versions to read: the files are kept for Lance's cleanup (it removes data
    files no version references), which bounds the cost of a store with many versions since."""
    if not files:
        return 0
    lance = _lance()
    ds = lance.dataset(uri, storage_options=options or None)
    session = ds.new_file_session()
    mine = {name for name in dict.fromkeys(files) if session.contains(name)}
    if not mine:
        return 0  # removed already (an earlier try, a compaction's cleanup)
    latest = int(ds.version)
    for read, version in enumerate(range(latest, since, -1)):
        if read >= limit:
            logger.warning("%d data file(s) of %s not checked against its %d versions since %d (%d read): kept "
                           "for Lance's cleanup of unreferenced files", len(mine), uri, latest - since, since, limit)
            return 0
        try:
            view = ds if version == latest else ds.checkout_version(version)
        except OSError as exc:
            if "not found" not in str(exc).lower():
                raise
            break  # cleaned up, and every version before it
        if mine & _committed_files(view):
            logger.info("%d data file(s) of %s are committed (version %d): kept", len(mine), uri, version)
            return 0
    removed = 0
    for name in mine:
        try:
            session.delete_file(name)
            removed += 1
        except OSError as exc:  # one that cannot be deleted stays for Lance's cleanup
            logger.warning("could not remove the uncommitted file %s/%s: %s", uri, name, exc)
    return removed


def _boot_id() -> str | None:
    """This boot of the machine (Linux), or None."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux ``/proc/PID/stat``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of the line, the 20th after the name


#: Where a machine's identity is kept (systemd's, then D-Bus's): unlike the hostname, it differs between machines.
MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def _machine_id() -> str | None:
    """This machine's identity (:data:`MACHINE_ID_FILES`), or None when it has none. Text that is not hex (systemd's
    ``uninitialized`` of an image not booted yet) is no id: machines made from one image would share it."""
    for name in MACHINE_ID_FILES:
        try:
            text = Path(name).read_text().strip()
        except OSError:
            continue
        if text and all(c in string.hexdigits for c in text):
            return text
        if text:
            logger.debug("%s holds %r, not a machine id: ignored", name, text[:40])
    return None


def _boot_time() -> float | None:
    """When this machine booted, in seconds since the epoch (Linux ``/proc/stat`` btime), or None."""
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (Linux ``/proc/self/ns/pid``, e.g. ``pid:[4026531836]``), or None."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _owner() -> dict[str, Any]:
    """Who writes a journal: this host and machine, boot, pid namespace and process (with its start time, against a
    reused pid)."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "machine": _machine_id(), "boot": _boot_id(), "pidns": _pid_namespace(),
            "pid": pid, "started": _start_time(pid)}


def _writer_state(head: dict[str, Any], name: str, modified: float | None = None) -> str:
    """Whether the process that wrote a journal (whose lock is free) is ``gone``, may still ``run``, ran on
    ``another`` machine, or cannot be told apart from a running one (``unknown``).

    Hostnames repeat (cloned VMs, containers given one hostname), so only a journal whose machine id
    (:data:`MACHINE_ID_FILES`) equals this machine's is judged: written on a boot before this one, its writer is
    gone; on this boot, in another pid namespace (another container on this kernel), it is another's; in this one,
    the pid and its start time tell. Machine ids are copied too (cloned VMs, images that bake one in), so another
    boot means an earlier one only when the journal was last written (``modified``, seconds since the epoch) before
    this machine booted; otherwise it is another's. A journal without a machine id (none recorded, or this machine
    has none) is another's. One written without /proc (no boot id, no start time) is ``unknown``: its pid may be
    reused."""
    machine = _machine_id()
    if head.get("host") != socket.gethostname() or not machine or head.get("machine") != machine:
        return "another"
    pid = head.get("pid")
    if not isinstance(pid, int):
        return "another"
    boot = _boot_id()
    if not head.get("boot") or not boot:
        return "unknown"
    if head["boot"] != boot:
        booted = _boot_time()
        if modified is None or booted is None or modified >= booted:
            return "another"  # written since this boot: a machine with a copy of this machine's id
        return "gone"  # this machine restarted since
    if head.get("pidns") != _pid_namespace():
        return "another"  # another container on this kernel: its pids are not ours to check
    if pid == os.getpid():
        return "run" if name in _LIVE else "gone"  # a copy of a journal this process holds elsewhere: in use
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "gone"
    except PermissionError:  # another user's process
        pass
    started = _start_time(pid)
    if head.get("started") and started and started != head["started"]:
        return "gone"  # the pid was given to a new process
    return "run"


#: Journal names this process holds open (a copied folder carries the same names).
_LIVE: set[str] = set()


class PendingFiles:
    """A journal of the data files a chunk's workers wrote, held (``flock``) by the driver until the commit.

    Its first line names the store, the version the writes began from and the driver (host, machine id, boot, pid
    namespace, pid and its start time). ``add`` appends the files of each write as it is reported (one JSON line
    each; a line cut by a crash is ignored), ``committed`` deletes the journal, ``abandon`` deletes the files and
    the journal (the journal stays when the files could not be removed). A driver killed before either leaves the
    journal unlocked; :func:`sweep_pending` acts on it later, on the same machine, once that driver is gone.
    """

    def __init__(self, folder: str | Path, uri: str, since: int, options: dict[str, str] | None = None) -> None:
        self.path = Path(folder) / f"{JOURNAL_PREFIX}{uuid.uuid4().hex}{JOURNAL_SUFFIX}"
        self.uri, self.since, self.options = uri, since, options
        self.files: list[str] = []
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        _LIVE.add(self.path.name)
        try:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            self._append({"uri": uri, "since": since, **_owner()})
        except BaseException:  # no empty, unlocked journal left for every later sweep to warn about
            self._close()
            raise

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
        returns how many files were deleted. When removing them fails, the journal stays (unlocked) and the
        error is raised: the next Ray build into the gallery removes them."""
        try:
            removed = remove_uncommitted(self.uri, self.files, self.since, self.options)
        except BaseException:
            self._close(keep=True)
            raise
        self._close()
        if removed:
            logger.info("removed the %d data file(s) of a chunk that was not committed", removed)
        return removed

    def _close(self, *, keep: bool = False) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            if not keep:  # unlinked while still locked: a sweeper never reads a half-removed journal
                self.path.unlink(missing_ok=True)
        finally:
            _LIVE.discard(self.path.name)
            os.close(fd)


def _read_journal(text: str) -> tuple[dict[str, Any], list[str]]:
    """(the journal's first entry: store, version, driver; the files it names)."""
    head: dict[str, Any] = {}
    files: list[str] = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:  # the line a crash cut short
            continue
        if not isinstance(entry, dict):
            continue
        if "uri" in entry and not head:
            head = entry
        files += entry.get("files", [])
    return head, files


def list_journals(folder: str | Path) -> list[dict[str, Any]]:
    """The Ray build journals left in a gallery folder (read only; none is acted on), for people to see: per journal
    its ``file``, the ``store`` it names, the driver's ``host`` and ``pid``, ``modified`` (ISO time), the data
    ``files`` it names, and ``driver``: ``running`` (its lock is held), ``gone`` (killed: the next Ray build on this
    machine sweeps it), ``another machine`` or ``unknown`` (left alone by builds: removed by hand, as
    docs/scale.md says, once no build runs)."""
    import datetime as dt

    found: list[dict[str, Any]] = []
    for path in sorted(Path(folder).glob(JOURNAL_GLOB)):
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # committed or swept meanwhile
            continue
        try:
            running = False
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                except BlockingIOError:
                    running = True
            stat = os.fstat(fd)
            head, files = _read_journal(os.pread(fd, max(stat.st_size, 1), 0).decode(errors="replace"))
        finally:
            os.close(fd)
        state = "running" if running else _writer_state(head, path.name, stat.st_mtime)
        found.append({"file": path.name, "store": head.get("uri"), "host": head.get("host"), "pid": head.get("pid"),
                      "modified": dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc).isoformat(
                          timespec="seconds"),
                      "files": len(files), "driver": {"run": "running", "another": "another machine"}.get(state, state)})
    return found


def sweep_pending(folder: str | Path, uri: str, options: dict[str, str] | None = None) -> int:
    """Act on the journals of drivers killed before their commit: delete the data files they name that no later
    version references. Returns how many were deleted.

    Only a journal whose lock is free, written on this machine (its machine id, not only its hostname) by a process
    that is gone, is acted on (:func:`_writer_state`). One written on another machine (a copied gallery folder
    carries the journals of builds that may still run there, writing the same S3 store), or one whose writer
    cannot be told apart from a running process, is left alone, with a note saying how to remove it by hand. A
    journal that cannot be acted on now (the store unreachable) is left for the next build, with a warning: it
    never stops this one."""
    removed = 0
    for path in sorted(Path(folder).glob(JOURNAL_GLOB)):
        try:
            removed += _sweep_one(path, uri, options)
        except Exception as exc:  # noqa: BLE001 - cleanup of an earlier build: never the reason this one fails
            logger.warning("left %s for a later build: %s", path, exc)
    if removed:
        logger.info("removed %d data file(s) of chunks never committed (a build killed earlier)", removed)
    return removed


def _sweep_one(path: Path, uri: str, options: dict[str, str] | None) -> int:
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:  # committed or swept meanwhile
        return 0
    try:
        if fcntl is None:  # pragma: no cover - cannot tell a running build from a dead one
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a build still running
            return 0
        if not path.exists():  # removed by its driver between our open and lock
            return 0
        text = os.pread(fd, max(os.fstat(fd).st_size, 1), 0).decode(errors="replace")
        head, files = _read_journal(text)
        if head.get("uri") != uri:
            logger.warning("%s names another store (%s), not %s: left alone", path, head.get("uri"), uri)
            return 0
        state = _writer_state(head, path.name, os.fstat(fd).st_mtime)
        if state == "another":
            logger.info("%s was written by a build on host %s (pid %s), on another machine or container (or one "
                        "without a machine id, %s, or one sharing this machine's id, written since this boot): left "
                        "alone, as it may still run there and commit the files it names. Once that build is over, "
                        "delete it by hand (rm '%s'); files it names that were never committed go with Lance's "
                        "cleanup of old versions", path, head.get("host", "unknown"),
                        head.get("pid", "?"), " or ".join(MACHINE_ID_FILES), path)
            return 0
        if state == "unknown":
            logger.info("%s was written by pid %s on this machine without /proc (no boot id recorded, or none "
                        "readable now): whether that build still runs cannot be told, so it is left alone. Once "
                        "no build runs into this gallery, delete it by hand (rm '%s'); files it names that were "
                        "never committed go with Lance's cleanup of old versions", path, head.get("pid", "?"), path)
            return 0
        if state == "run":
            logger.info("%s belongs to a build still running on this host (pid %s): left alone", path,
                        head.get("pid"))
            return 0
        removed = remove_uncommitted(uri, files, int(head.get("since", -1)), options)
        path.unlink(missing_ok=True)
        return removed
    finally:
        os.close(fd)
