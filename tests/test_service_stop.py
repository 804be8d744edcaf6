"""A server's writes at its stop (:meth:`api.service.SpeciesService.close`, stop 54's re-read, findings 4 and 7): a
write queued behind the one in progress ran after close() began (200 of 200 trials), and close() waited for a write
still waiting for the gallery's lock (up to SPECIESID_WRITE_WAIT_S past the grace). Now only a write holding the
gallery's lock (in its commit) is waited for; the others are refused (503, nothing written).

A service of a stand-in gallery whose write lock is a real :class:`index.locks.WriteLock`; events, no clock.
"""

from __future__ import annotations

import logging
import threading
from unittest import mock

import pytest

from api.service import STOPPING, SpeciesService, Stopping
from api.settings import Settings
from index.locks import WriteLock


class _Said(logging.Handler):
    """Sets ``event`` when a record holding ``text`` is logged."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.event = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def _service(tmp_path, write_wait_s: float = 30) -> tuple[SpeciesService, WriteLock]:
    """A service whose gallery's ``writing()`` holds a real write lock (its folder's flock)."""
    lock = WriteLock(tmp_path / ".write.lock")
    gallery = mock.MagicMock()
    gallery.reading_stale = False
    gallery.writing.side_effect = lambda *, local=False, wait=None, give_up=None: lock.hold(
        write_wait_s if wait is None else wait, local=local, give_up=give_up)
    identifier = mock.MagicMock()
    identifier.gallery = gallery
    with mock.patch("api.service.unused_uploads", return_value={"unused": 0}):
        service = SpeciesService(Settings(_env_file=None, write_wait_s=write_wait_s), identifier=identifier)
    return service, lock


def _write(service: SpeciesService, wrote: list[str], errors: list[BaseException], name: str,
           inside: threading.Event | None = None, go: threading.Event | None = None) -> None:
    """One write through ``service._writing()``: ``name`` in ``wrote`` when its body ran, its error in ``errors``."""
    try:
        with service._writing():  # noqa: SLF001 - the service's own write turn, as its routes take it
            wrote.append(name)
            if inside is not None:
                inside.set()
            if go is not None:
                go.wait(60)
    except BaseException as exc:  # noqa: BLE001 - kept for the test to look at
        errors.append(exc)


def test_a_write_queued_behind_the_one_in_progress_is_refused_once_close_begins(tmp_path):
    service, _ = _service(tmp_path)
    wrote: list[str] = []
    errors: list[BaseException] = []
    inside, go = threading.Event(), threading.Event()
    first = threading.Thread(target=_write, args=(service, wrote, errors, "first", inside, go))
    first.start()
    assert inside.wait(60)  # the first write holds the gallery's lock, in its commit

    queued_tries = threading.Event()
    turn = service._write_lock  # noqa: SLF001

    class Turn:  # this server's turn, saying when the queued write has tried it
        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            queued_tries.set()
            return turn.acquire(blocking, timeout)

        def release(self) -> None:
            turn.release()

        def locked(self) -> bool:
            return turn.locked()

    service._write_lock = Turn()  # noqa: SLF001
    second = threading.Thread(target=_write, args=(service, wrote, errors, "queued"))
    second.start()
    assert queued_tries.wait(60)  # queued behind the first

    said = _Said("waiting for this server's write in progress")
    logging.getLogger("api.service").addHandler(said)
    try:
        closing = threading.Thread(target=service.close)
        closing.start()
        assert said.event.wait(60)  # close() began and waits for the first write's commit
    finally:
        logging.getLogger("api.service").removeHandler(said)
    go.set()  # the first write ends
    for t in (first, closing, second):
        t.join(60)
    assert wrote == ["first"]  # the queued write never ran
    assert len(errors) == 1 and isinstance(errors[0], Stopping) and str(errors[0]) == STOPPING


def test_close_does_not_wait_for_a_write_still_waiting_for_the_gallerys_lock(tmp_path):
    service, lock = _service(tmp_path, write_wait_s=5)
    waiting = threading.Event()
    real_acquire = lock._acquire  # noqa: SLF001

    def acquire(timeout: float, give_up=None) -> float:
        waiting.set()  # the write reached the gallery's lock, which another process holds
        return real_acquire(timeout, give_up)

    lock._acquire = acquire  # noqa: SLF001
    wrote: list[str] = []
    errors: list[BaseException] = []
    other = WriteLock(tmp_path / ".write.lock")  # another process's writer: its own open file, its flock
    with other.hold(0):
        writer = threading.Thread(target=_write, args=(service, wrote, errors, "waiting"))
        writer.start()
        assert waiting.wait(60)
        service.close()  # returns while the other writer still holds the lock
        writer.join(60)
        assert not writer.is_alive()  # refused while the other writer still holds the lock
    assert wrote == []
    assert len(errors) == 1 and isinstance(errors[0], Stopping) and str(errors[0]) == STOPPING


def test_a_write_after_close_is_refused(tmp_path):
    service, _ = _service(tmp_path)
    service.close()
    with pytest.raises(Stopping, match="the server is stopping: nothing of this request was written"):
        with service._writing():  # noqa: SLF001
            pass


def test_a_write_whose_stop_began_after_it_took_the_gallerys_lock_is_refused_before_its_commit(tmp_path):
    """close() began after the write took its turn and the gallery's lock but before it committed: refused there
    (under the state lock close() sets the stop under), so no write starts committing once the stop began (the
    grace limit could cut it half-way)."""
    import contextlib

    service, _ = _service(tmp_path)

    @contextlib.contextmanager
    def writing(*, local=False, wait=None, give_up=None):
        service.close()  # the stop begins while the write holds the gallery's lock, before it commits
        yield

    service.gallery.writing.side_effect = writing
    wrote: list[str] = []
    with pytest.raises(Stopping, match="the server is stopping: nothing of this request was written"):
        with service._writing():  # noqa: SLF001
            wrote.append("late")
    assert wrote == [] and not service._committing  # noqa: SLF001
    assert not service._write_lock.locked()  # noqa: SLF001 - the turn is given back


def test_a_write_whose_stop_began_while_it_waited_for_its_turn_never_reaches_the_gallerys_lock(tmp_path):
    """The stop began while the write waited for this server's turn, and the turn then came: refused at once, the
    gallery's lock (another process's writers, the S3 lease) never asked for."""
    service, _ = _service(tmp_path)
    turn = service._write_lock  # noqa: SLF001

    class Turn:  # the turn comes just as close() has begun
        def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
            service._stopping = True  # noqa: SLF001 - as close() sets it
            return turn.acquire(blocking, timeout)

        def release(self) -> None:
            turn.release()

    service._write_lock = Turn()  # noqa: SLF001
    with pytest.raises(Stopping, match="the server is stopping: nothing of this request was written"):
        with service._writing():  # noqa: SLF001
            pass
    assert service.gallery.writing.call_count == 0
    assert not turn.locked()


def test_a_set_venom_committing_at_close_finishes_and_one_queued_behind_it_is_refused(tmp_path):
    """s56 re-read api #12: close() names a set-venom among the writes it waits for; no test put one through a stop.
    One in its commit when close() begins is finished (its answer returned), a second, queued, is refused."""
    service, _ = _service(tmp_path)
    inside, go = threading.Event(), threading.Event()
    wrote: list[str] = []

    def set_venom(gallery, name, venomous, **kwargs):  # the library's edit, held in its commit until close() waits
        wrote.append(name)
        inside.set()
        go.wait(60)
        return mock.Mock(species=name)

    done: list[object] = []

    def put(name: str) -> None:
        try:
            done.append(service.set_venomous(name, True)[0])
        except BaseException as exc:  # noqa: BLE001 - kept for the test to look at
            done.append(exc)

    with mock.patch("api.service.workflows.check_species_venomous"), \
            mock.patch("api.service.workflows.set_species_venomous", side_effect=set_venom), \
            mock.patch.object(SpeciesService, "get_species", return_value=None):
        first = threading.Thread(target=put, args=("Bufo bufo",))
        first.start()
        assert inside.wait(60)
        queued = threading.Thread(target=put, args=("Naja nova",))
        queued.start()
        said = _Said("waiting for this server's write in progress")
        logging.getLogger("api.service").addHandler(said)
        try:
            closing = threading.Thread(target=service.close)
            closing.start()
            assert said.event.wait(60)
        finally:
            logging.getLogger("api.service").removeHandler(said)
        go.set()
        for t in (first, closing, queued):
            t.join(60)
    assert wrote == ["Bufo bufo"]
    assert [d.species for d in done if not isinstance(d, BaseException)] == ["Bufo bufo"]  # its answer returned
    (refused,) = [d for d in done if isinstance(d, BaseException)]
    assert isinstance(refused, Stopping) and str(refused) == STOPPING
