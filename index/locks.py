"""A lock across processes on a gallery's write path (``DIR/.write.lock``, ``fcntl.flock``).

Readers never take it (they read LanceDB's committed versions), except an open that finds the store's table
missing or half-created: it makes the table under the lock (and, on S3, the store's lease). Writers hold it
for the few steps that must not interleave between processes: re-checking duplicates against the latest
version, reserving ids, committing the rows, and saving the derived vector index. Embedding photos happens
outside it, in a server's write too: the server embeds its uploads first, holding neither its turn nor the lock, then
waits for both together, one deadline (``SPECIESID_WRITE_WAIT_S``) bounding that wait (``api.service``).

``flock`` locks belong to an open file description: a process killed while holding the lock releases it
at once (the kernel closes its files), so a crashed writer never blocks the gallery. The lock is also
re-entrant within a process (a thread lock guards the file lock), so nested writes do not deadlock.

A gallery whose store is on S3 is written from other machines too: its lock also holds the store's write lease
(:mod:`index.lease`, ``remote``), taken after the ``flock`` and released before it, at the outermost hold that
asks for it. A hold with ``local=True`` (steps that write only the folder's own files: the derived index, the
probe's whitening, gallery.json, a kept upload) takes the ``flock`` only; a store write nested in it takes the
lease itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from index.lease import S3Lease

logger = logging.getLogger(__name__)

#: Seconds a writer waits for another (this lock's holder, and on S3 the store's lease) before its TimeoutError, unless
#: :data:`WAIT_ENV` says otherwise; a server sets its own (``api.settings``: ``write_wait_s``).
WRITE_WAIT_S = 600.0
#: The variable that sets :data:`WRITE_WAIT_S` for every writer (the command line's too; the server reads it itself).
WAIT_ENV = "SPECIESID_WRITE_WAIT_S"
#: Seconds of waiting after which a writer says, once, whom it waits for.
WARN_AFTER_S = 2.0


def seconds_setting(name: str, raw: str | float, *, least: float, default: float, what: str) -> float:
    """The value ``raw`` of variable ``name`` as seconds: a finite number from ``least`` up to
    ``threading.TIMEOUT_MAX`` (the longest wait Python's locks and events accept). Anything else (``abc``, ``nan``,
    ``inf``, too small) is a ValueError naming the variable, its value and what to set (``what``)."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and least <= value <= threading.TIMEOUT_MAX):
        shown = raw.strip() if isinstance(raw, str) else raw
        raise ValueError(f"{name}={shown} is not a number of seconds from {least:g} to {threading.TIMEOUT_MAX:.0f}: "
                         f"set it to {what} (default {default:g}), or unset it")
    return value


def parse_wait(raw: str | float) -> float:
    """:data:`WAIT_ENV`'s value as seconds (0 or more, finite): the one parser of that variable, the server's
    settings' and the command line's. A ValueError names the variable and what to set."""
    return seconds_setting(WAIT_ENV, raw, least=0.0, default=WRITE_WAIT_S,
                           what="how long a writer waits for another (0: not at all)")


def env_seconds(name: str, parse: Callable[[str], float], default: float) -> float:
    """Variable ``name`` parsed by ``parse`` when set (not blank), else ``default``."""
    raw = os.environ.get(name, "").strip()
    return parse(raw) if raw else default


def default_wait() -> float:
    """Seconds a writer waits for another: :data:`WAIT_ENV` when set (:func:`parse_wait`), else
    :data:`WRITE_WAIT_S`."""
    return env_seconds(WAIT_ENV, parse_wait, WRITE_WAIT_S)


def _holder_record(fd: int) -> dict[str, Any] | None:
    """The record (host, pid, since) the holder of the lock file open on ``fd`` wrote, or None when it holds nothing
    readable (a holder of an earlier version; a released lock, whose record its holder cleared)."""
    try:
        holder = json.loads(os.pread(fd, 512, 0) or b"{}")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and "pid" in holder else None


def _lock_holder(fd: int) -> str:
    """Who holds the lock file open on ``fd``, as its holder wrote it (host, pid, since), or '' when it wrote nothing
    readable."""
    if (holder := _holder_record(fd)) is None:
        return ""
    return f"held by host {holder.get('host', '?')}, pid {holder['pid']}, since {holder.get('since', '?')}"


#: Where Linux lists every file lock held now (one line a lock: ``N: FLOCK  ADVISORY  WRITE PID MAJ:MIN:INODE ...``).
PROC_LOCKS = Path("/proc/locks")


def _flocked(st: os.stat_result, proc_locks: Path = PROC_LOCKS) -> bool | None:
    """Whether a ``flock`` is held on the file of ``st``, read from ``proc_locks`` (Linux) without taking any lock:
    True for a held one on that device and inode (a waiter's ``->`` line is no hold), False when no line names the
    inode, None when it cannot be told (no such file, unreadable, or the inode named on another device: a file
    system whose device numbers differ there, btrfs, overlayfs)."""
    try:
        lines = proc_locks.read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    named = False
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != "FLOCK":  # not a flock, or a waiter's line ("N: -> FLOCK ...")
            continue
        dev_major, dev_minor, inode = (fields[5].split(":") + ["", "", ""])[:3]
        if inode != str(st.st_ino):
            continue
        try:
            if f"{int(dev_major, 16):02x}:{int(dev_minor, 16):02x}" == device:
                return True
        except ValueError:
            pass
        named = True
    return None if named else False


def look(path: str | Path) -> dict[str, Any]:
    """Whether a writer holds the lock file at ``path`` now, for ``index info``: ``{"file", "held", "holder"}``,
    ``holder`` its record (host, pid, since; None when not held or not recorded). On Linux it reads
    :data:`PROC_LOCKS` and takes no lock, so no writer's try can meet it; its "not held" is believed only when the
    file holds no holder record (a holder in another pid namespace or on another host is not listed there).
    Elsewhere (or when that cannot tell) a shared ``flock`` tried without waiting and let go at once: a writer
    waiting for the lock then only tries again, but one set not to wait (a wait of 0 s) whose one try falls in that
    instant fails as if busy. Nothing is written.
    ``held`` is None when it cannot be told (the file unreadable, a system without ``flock``)."""
    status: dict[str, Any] = {"file": str(path), "held": False, "holder": None}
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # no writer ever took it
        return status
    except OSError:
        return status | {"held": None}
    try:
        held = _flocked(os.fstat(fd))
        if held is False and _holder_record(fd) is not None:  # a holder /proc/locks may not show: another pid
            held = None  # namespace's (a container beside), another host's (NFS); or a killed one: the try tells
        if held is not None:
            return status | {"held": True, "holder": _holder_record(fd)} if held else status
        if fcntl is None:  # pragma: no cover
            return status | {"held": None}
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return status | {"held": True, "holder": _holder_record(fd)}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return status
    finally:
        os.close(fd)


def _still_there(fd: int, path: Path) -> bool:
    """Whether the file open on ``fd`` is still the one at ``path`` (not unlinked, nor replaced)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per gallery (the thread lock still holds)
    fcntl = None  # type: ignore[assignment]


class WriterBusy(TimeoutError):
    """A wait given up on another writer's hold: ``held`` names what it held, this gallery's write lock (another
    process) or, on S3, the gallery store's write lease (:mod:`index.lease`). A TimeoutError of another kind (a
    server's own queue of writes) is not one."""

    def __init__(self, message: str, held: str = "this gallery's write lock") -> None:
        super().__init__(message)
        self.held = held


class WaitGivenUp(Exception):  # noqa: N818 - a wait given up, not an error of the lock
    """A wait for the write lock given up because its ``give_up`` said so (a server stopping): nothing was
    written, nothing is held."""


#: Seconds between two looks at ``give_up`` while a hold waits on another thread of this process.
GIVE_UP_POLL_S = 0.05


class WriteLock:
    """Exclusive, re-entrant write lock of one gallery, across threads and processes."""

    def __init__(self, path: str | Path, *, timeout: float | None = None) -> None:
        self.path = Path(path)
        self._timeout = timeout  # None: SPECIESID_WRITE_WAIT_S, read at each hold (a reader never needs it)
        self.waited_s = 0.0  # seconds this process's holds spent waiting for other writers, all together
        self.lease_s = 0.0  # seconds they spent taking the store's lease, its own round trips (no other writer's)
        self._thread_lock = threading.RLock()
        self._depth = 0
        self._fd: int | None = None
        self.remote: S3Lease | None = None  # the store's write lease, when the store is on S3 (index.lease)

    @property
    def timeout(self) -> float:
        """Seconds a hold waits for another writer before giving up: the lock's own, else :func:`default_wait`."""
        return default_wait() if self._timeout is None else self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        """Set the lock's own wait (None: :func:`default_wait` again)."""
        self._timeout = value

    @contextlib.contextmanager
    def hold(self, timeout: float | None = None, *, local: bool = False,
             give_up: Callable[[], bool] | None = None) -> Iterator[None]:
        """Hold the lock for the ``with`` block (waits for other writers, threads of this process included;
        TimeoutError after ``timeout`` seconds, the lock's own by default; 0: do not wait at all). With a
        ``remote`` lease the store's lease is held too, unless ``local`` (the folder's own files only). The time
        spent waiting for other writers (another thread's hold, another process's ``flock``, the lease while another
        writer holds it) is added to :attr:`waited_s`; the rest of taking the lease (its own S3 round trips: no
        other writer's) to :attr:`lease_s`. ``give_up``: looked at between the tries of every wait; true, the wait
        ends in :class:`WaitGivenUp`, nothing held."""
        wait = self.timeout if timeout is None else timeout
        start = time.monotonic()
        waited = 0.0  # for other writers: threads of this process, processes (the flock), the lease's other holder
        if not self._thread_lock.acquire(blocking=False):
            if not (wait > 0 and self._wait_thread_lock(start + wait, give_up)):
                raise TimeoutError(f"another thread of this process is writing this gallery (lock {self.path})")
            waited = time.monotonic() - start
        try:
            try:  # the flock released whatever comes once it is taken (a Ctrl-C just after included)
                if self._depth == 0:
                    waited += self._acquire(wait) if give_up is None else self._acquire(wait, give_up)
                lease = None if local else self.remote
                took = lease is not None and not lease.held
                try:
                    if took:
                        taking = time.monotonic()
                        for_holder = lease.acquire(max(wait - (taking - start), 0.0), waited=waited,
                                                   give_up=give_up)
                        waited += for_holder
                        self.lease_s += time.monotonic() - taking - for_holder
                    self.waited_s += waited
                    self._depth += 1
                    try:
                        yield
                    finally:
                        self._depth -= 1
                finally:
                    if took and lease.held:  # also after an interrupt that came once the lease was taken
                        lease.release()
            finally:
                if self._depth == 0:
                    self._release()  # nothing when the flock was not taken
        finally:
            self._thread_lock.release()

    @property
    def held_lease(self) -> S3Lease | None:
        """The store's lease while this process holds it (None: no lease, or not held)."""
        return self.remote if self.remote is not None and self.remote.held else None

    def check(self) -> None:
        """Before a commit: the store's lease, when one is held, is still this writer's (LeaseLostError if not)."""
        if (lease := self.held_lease) is not None:
            lease.check()

    def _wait_thread_lock(self, deadline: float, give_up: Callable[[], bool] | None) -> bool:
        """Wait for the thread lock until ``deadline`` (time.monotonic()); True once taken. With ``give_up``, it is
        looked at every :data:`GIVE_UP_POLL_S`: true raises :class:`WaitGivenUp`."""
        while True:
            left = deadline - time.monotonic()
            if give_up is None:
                return left > 0 and self._thread_lock.acquire(timeout=left)
            if give_up():
                raise WaitGivenUp(f"the wait for this gallery's write lock was given up (lock {self.path})")
            if left <= 0:
                return False
            if self._thread_lock.acquire(timeout=min(left, GIVE_UP_POLL_S)):
                return True

    def _acquire(self, timeout: float, give_up: Callable[[], bool] | None = None) -> float:
        """Take the ``flock``, waiting up to ``timeout`` seconds for another process holding it (0: one try); the
        seconds spent waiting for it (0.0 when the first try took it). :class:`WriterBusy` names the holder. Once
        taken, it is :attr:`_fd`'s (released by :meth:`hold` whatever comes next, a Ctrl-C included); an exception
        before that closes the file, and with it the ``flock`` if the try had taken it."""
        fd = _open_lock(self.path)
        if fcntl is None:  # pragma: no cover
            self._fd = fd
            return 0.0
        start = time.monotonic()
        busy_since: float | None = None  # when a try first found another process holding it
        warned = False
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if not _still_there(fd, self.path):  # removed by its holder meanwhile (a create that failed
                        os.close(fd)  # removes the folder it made): a lock on it locks nothing; the path's is taken
                        fd = -1
                        fd = _open_lock(self.path)
                        continue
                    self._fd = fd
                    self._sign(fd)
                    return 0.0 if busy_since is None else time.monotonic() - busy_since
                except BlockingIOError:
                    now = time.monotonic()
                    busy_since = now if busy_since is None else busy_since
                    waited = now - start
                    if waited >= timeout:
                        holder = _lock_holder(fd) or "its holder not recorded"
                        raise WriterBusy(_busy_message(self.path, holder, timeout)) from None
                    if waited > WARN_AFTER_S and not warned:
                        holder = _lock_holder(fd) or "its holder not recorded"
                        logger.warning("waiting up to %.0f s in all for another process writing this gallery (%s; "
                                       "lock %s); %s sets how long a writer waits", timeout, holder, self.path,
                                       WAIT_ENV)
                        warned = True
                    if give_up is not None and give_up():
                        raise WaitGivenUp("the wait for this gallery's write lock was given up "
                                          f"(lock {self.path})") from None
                    time.sleep(0.02)
        except BaseException:  # a timeout, or a Ctrl-C: the file closed (its flock, if this try took it, goes too)
            if fd >= 0 and fd != self._fd:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise

    @staticmethod
    def _sign(fd: int) -> None:
        """Write this holder (host, pid, since) into the lock file, for the writers that wait on it to name (the
        lock is the ``flock``, never the file's text: a failure to write it changes nothing)."""
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(holder).encode(), 0)

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):  # the record goes with the hold (a killed holder's stays: the flock
                os.ftruncate(fd, 0)  # is what counts, and the next holder writes its own)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


#: errno values of a lock file that cannot be opened for writing because the folder is not writable by this user.
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def _open_lock(path: Path) -> int:
    """Open (made if missing, its folder too) the lock file at ``path`` for writing; a folder this user cannot write
    (a read-only mount, no write permission) is a PermissionError saying so and what to do, in one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        if exc.errno not in _NOT_WRITABLE:
            raise
        refused = PermissionError(
            f"the gallery folder {path.parent} is read-only for this user ({os.strerror(exc.errno)}: its write lock "
            f"{path.name} cannot be opened): reading it works; to write, get write access to the folder or work on "
            "a writable copy of the gallery")
        refused.errno = exc.errno
        raise refused from exc


def _busy_message(path: Path, holder: str, timeout: float) -> str:
    """The error of a writer that gave up on another process's hold of the lock at ``path`` after ``timeout``
    seconds (0: it was set not to wait at all), naming the holder (``holder``: :func:`_lock_holder`'s text)."""
    if timeout > 0:
        shown = f"{timeout:.0f}" if timeout >= 10 else f"{timeout:.1f}".rstrip("0").rstrip(".")
        how = f"this one waited {shown} s"
    else:
        how = "this one was set not to wait for it (a wait of 0 s)"
    return (f"another process is writing this gallery ({holder}; lock {path}); {how}: try again when it is "
            f"done ({WAIT_ENV} sets how long a writer waits)")


_LOCKS: dict[Path, WriteLock] = {}
_LOCKS_GUARD = threading.Lock()


def write_lock(path: str | Path) -> WriteLock:
    """This process's one :class:`WriteLock` of a lock file: every object that writes a gallery (two ``Gallery``
    objects of one folder, a ``Gallery.create`` and the gallery it makes) shares it, so holding it in one and
    writing through another is re-entrance, not two ``flock``s of one process blocking each other."""
    key = Path(os.path.realpath(path))  # one gallery reached by two paths (a symbolic link) is one lock
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = WriteLock(key)
        return lock


if hasattr(os, "register_at_fork"):  # a forked child holds none of its parent's locks
    os.register_at_fork(after_in_child=_LOCKS.clear)
