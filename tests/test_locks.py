"""index.locks.WriteLock, with no gallery: a nested hold keeps the cross-process flock until the outermost block
ends, and a lock file its holder removed or replaced is locked again at its path (walk s55 M17, M18: neither was
tested). Another process is stood in for by another open of the lock file: flock locks belong to the open file."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from index.locks import WriteLock, WriterBusy

fcntl = pytest.importorskip("fcntl", reason="the write lock's flock is POSIX only")


def _locked_elsewhere(path: Path) -> bool:
    """Whether another writer (an open of its own of ``path``, as another process has) would find the lock held."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # its flock, when it took one, goes with it
    return False


def test_a_nested_hold_keeps_the_lock_until_the_outermost_block_ends(tmp_path):
    """Adds run inside ``with gallery.writing():`` (retrieval.workflows, api.service): the inner write's end once
    could release the flock while the outer block still wrote, letting another process's writer in."""
    path = tmp_path / "write.lock"
    lock = WriteLock(path)
    assert not _locked_elsewhere(path)
    with lock.hold(timeout=0):
        with lock.hold(timeout=0):
            assert _locked_elsewhere(path)
        assert _locked_elsewhere(path)  # the inner block's end released nothing
    assert not _locked_elsewhere(path)


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_lock_file_removed_or_replaced_while_waiting_is_locked_again_at_its_path(tmp_path, how):
    """A writer waiting on a lock file its holder then removes (a create that failed removes its folder) or
    replaces would hold a flock on a file no longer at the path, locking nothing: it locks the path's file."""
    path = tmp_path / "write.lock"
    holder = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    looks = []

    def meanwhile() -> bool:  # looked at after a try found the lock held: the waiter holds the old file open
        if not looks:
            if how == "removed":
                path.unlink()
            else:
                (tmp_path / "new.lock").write_text("")
                os.replace(tmp_path / "new.lock", path)
            os.close(holder)  # the holder goes: the old file's flock is free
        looks.append(True)
        return False

    with WriteLock(path).hold(timeout=10, give_up=meanwhile):
        assert looks and path.exists()
        assert _locked_elsewhere(path)  # the file at the path is the one held
    assert not _locked_elsewhere(path)


READ_ONLY = ("the gallery folder {dir} is read-only for this user ({why}: its write lock .write.lock cannot be "
             "opened): reading it works; to write, get write access to the folder or work on a writable copy of the "
             "gallery")


def _refuse_lock_files(monkeypatch, code: int) -> None:
    """os.open of a gallery's lock file fails with ``code``, as on a read-only mount (root ignores file modes)."""
    real = os.open

    def refusing(path, *args, **kwargs):
        if str(path).endswith(".write.lock"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_gallery_folder_is_said_in_one_line_not_as_a_raw_errno(tmp_path, capsys, monkeypatch, code):
    """Walk chaos #5: an add to a gallery on a read-only mount failed with '[Errno 30] Read-only file system:
    '.../.write.lock''. It now says the folder is read-only for this user and what to do."""
    from _cli_support import ENCODER, _photo, _run, folder_gallery

    index = folder_gallery(tmp_path, capsys, ("Natrix maura",))
    with monkeypatch.context() as patch:
        _refuse_lock_files(patch, code)
        with pytest.raises(PermissionError) as raised:
            with WriteLock(tmp_path / "g" / ".write.lock").hold():
                pass
        assert str(raised.value) == READ_ONLY.format(dir=index, why=os.strerror(code)) and raised.value.errno == code
        got = _run(capsys, "references", "add", "--index", index, "--species", "Natrix maura",
                   _photo(tmp_path / "new" / "a.png", 70), *ENCODER, "-q")
    assert got[0] == 2 and got[2] == f"speciesid: error: {READ_ONLY.format(dir=index, why=os.strerror(code))}\n", got


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_a_folder_without_write_permission_is_said_read_only(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=r"^the gallery folder .* is read-only for this user \(Permission "
                                                  r"denied: its write lock"):
            with WriteLock(folder / ".write.lock").hold():
                pass
    finally:
        folder.chmod(0o755)


def test_a_wait_given_up_on_another_process_is_a_writer_busy_naming_the_lock(tmp_path):
    """Re-read chaos #3: the server answered every TimeoutError (its own queue of writes too) as "another writer
    holds this gallery's write lock". A wait given up on another process's flock raises WriterBusy, which says what
    was held; a TimeoutError of another kind is not one."""
    path = tmp_path / ".write.lock"
    path.touch()
    holder = os.open(path, os.O_RDWR)  # another process's open file
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(WriterBusy, match="another process is writing this gallery") as refused:
            with WriteLock(path).hold(timeout=0):
                pass
    finally:
        os.close(holder)
    assert isinstance(refused.value, TimeoutError) and refused.value.held == "this gallery's write lock"


@pytest.mark.skipif(not Path("/proc/locks").is_file(), reason="/proc/locks is Linux's")
def test_index_infos_look_at_the_lock_takes_none_a_writer_set_not_to_wait_could_meet(tmp_path, monkeypatch):
    """Re-read chaos #4: look (``index info``'s write_lock) took a shared flock for an instant, and a writer set not
    to wait (SPECIESID_WRITE_WAIT_S=0, a reader saving a repaired index) whose one try fell in it failed as busy. On
    Linux it reads /proc/locks: no flock taken, so a writer trying at that instant takes the lock."""
    import index.locks as locks

    path = tmp_path / ".write.lock"
    path.touch()
    met: list[str] = []
    real = fcntl.flock

    class Fcntl:  # the writer's one try lands in any lock look takes
        LOCK_SH, LOCK_EX, LOCK_NB, LOCK_UN = fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_NB, fcntl.LOCK_UN

        @staticmethod
        def flock(fd: int, op: int) -> None:
            real(fd, op)
            if op & fcntl.LOCK_SH:
                try:
                    with WriteLock(path).hold(timeout=0):
                        met.append("took it")
                except WriterBusy as exc:
                    met.append(str(exc))

    monkeypatch.setattr(locks, "fcntl", Fcntl)
    assert locks.look(path) == {"file": str(path), "held": False, "holder": None}
    assert met == [], met
    monkeypatch.setattr(locks, "fcntl", fcntl)
    holder = os.open(path, os.O_RDWR)  # another process's hold: seen from /proc/locks
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(locks, "fcntl", Fcntl)
        assert locks.look(path)["held"] is True and met == [], met
    finally:
        os.close(holder)


def test_proc_locks_lines_are_read_as_holds_only_for_the_files_device_and_inode(tmp_path):
    """A waiter's line is no hold; the inode named on another device cannot be told (None: the flock try then)."""
    from index.locks import _flocked

    st = os.stat(tmp_path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}"
    proc = tmp_path / "locks"
    for text, held in [(f"1: FLOCK  ADVISORY  WRITE 7 {dev}:{st.st_ino} 0 EOF\n", True),
                       (f"1: FLOCK  ADVISORY  WRITE 7 {dev}:{st.st_ino + 1} 0 EOF\n", False),
                       (f"1: POSIX  ADVISORY  WRITE 7 {dev}:{st.st_ino} 0 EOF\n", False),
                       (f"1: -> FLOCK  ADVISORY  WRITE 7 {dev}:{st.st_ino} 0 EOF\n", False),
                       (f"1: FLOCK  ADVISORY  WRITE 7 ab:cd:{st.st_ino} 0 EOF\n", None)]:
        proc.write_text(text)
        assert _flocked(st, proc) is held, text
    assert _flocked(st, tmp_path / "none") is None


def test_index_infos_look_tries_the_lock_when_proc_locks_shows_none_but_a_holder_record_is_there(tmp_path,
                                                                                                 monkeypatch):
    """Re-read 4 #6: /proc/locks leaves out a hold it cannot attribute (a writer in another container's pid
    namespace, on another host of an NFS folder), and look said "not held" from it. Now its "not held" is believed
    only when the lock file has no holder record; with one, the non-blocking try decides: held by the hidden
    writer, not held once that writer is gone (a killed one's record left)."""
    import json

    import index.locks as locks

    path = tmp_path / ".write.lock"
    path.write_text(json.dumps({"host": "other-container", "pid": 7, "since": "2026-12-07T21:00:00"}))
    monkeypatch.setattr(locks, "_flocked", lambda st, proc_locks=None: False)  # /proc/locks names no hold
    holder = os.open(path, os.O_RDWR)  # the hidden writer's hold
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        seen = locks.look(path)
        assert seen["held"] is True and seen["holder"]["host"] == "other-container", seen
    finally:
        os.close(holder)
    assert locks.look(path) == {"file": str(path), "held": False, "holder": None}
    path.write_text("")  # released: its record cleared, /proc/locks believed (no lock taken)
    monkeypatch.setattr(locks, "fcntl", None)
    assert locks.look(path) == {"file": str(path), "held": False, "holder": None}
