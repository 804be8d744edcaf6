"""Photos an add cut off left in ``uploads/`` (soak walk, stop 54: a server killed mid-add): ``index info`` and
``/readyz`` count them and say what to run (``index sweep-uploads``); nothing running removes them (a sweep takes the
write hold, and such a photo is younger than the sweep's one-day grace anyway)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

from _api_support import gallery_copy
from conftest import until

from api.cli import main


def _orphans(index) -> list:
    """Two photos no row uses, as a kill between an add's keep and its commit leaves them: one 2 days old."""
    uploads = index / "uploads"
    uploads.mkdir(exist_ok=True)
    made = []
    for i, age_days in enumerate((2, 0)):
        data = f"photo {i}".encode()
        path = uploads / f"{hashlib.sha256(data).hexdigest()}.jpg"
        path.write_bytes(data)
        then = time.time() - age_days * 86400
        os.utime(path, (then, then))
        made.append(path)
    return made


def test_index_info_and_readyz_count_the_unused_uploads_and_name_the_sweep(tmp_path_factory, capsys):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.service import SpeciesService
    from api.settings import Settings

    index = gallery_copy(tmp_path_factory, "unused_uploads")
    made = _orphans(index)
    assert main(["index", "info", "--index", str(index)]) == 0
    uploads = json.loads(capsys.readouterr().out)["uploads"]
    assert {k: uploads[k] for k in ("unused", "removable")} == {"unused": 2, "removable": 1}
    assert uploads["note"].startswith("2 kept upload photos that no reference uses (1 older than a day: ")
    assert f"run `speciesid index sweep-uploads --index {index}` (it removes" in uploads["note"]
    service = SpeciesService(Settings(index=str(index), precision="fp32"))  # counts them on a thread at start
    try:
        with TestClient(create_app(service=service)) as client:
            until(lambda: "uploads" in client.get("/readyz").json(), "/readyz's uploads block")
            body = client.get("/readyz").json()
        assert body["uploads"]["unused"] == 2 and body["uploads"]["removable"] == 1
        assert "with the server's gallery folder, on its machine" in body["uploads"]["note"]
    finally:
        service.close()
    assert all(p.exists() for p in made)  # counted, never removed by either
    for p in made:
        p.unlink()
    assert main(["index", "info", "--index", str(index)]) == 0
    assert json.loads(capsys.readouterr().out)["uploads"] == {"unused": 0, "removable": 0, "bytes": 0, "note": ""}


def _stand_in_service(monkeypatch, counts: list):
    """A service of a stand-in gallery whose counts of unused uploads are ``counts`` in turn (an exception: raised),
    on a clock of its own (``clock.now``)."""
    from types import SimpleNamespace
    from unittest import mock

    import api.service
    from api.service import SpeciesService
    from api.settings import Settings

    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(api.service, "time", SimpleNamespace(monotonic=lambda: clock.now), raising=False)
    answers = iter(counts)

    def count(gallery, *, api=False):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(api.service, "unused_uploads", count)
    started: list[threading.Thread] = []

    def thread(*args, **kwargs) -> threading.Thread:  # the counts' threads, for the test to join
        started.append(threading.Thread(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(api.service, "threading", SimpleNamespace(
        Thread=thread, Lock=threading.Lock, Condition=threading.Condition))
    identifier = mock.MagicMock()
    identifier.gallery.reading_stale = False
    service = SpeciesService(Settings(_env_file=None), identifier=identifier)
    started[-1].join(60)  # the count at start, on its thread
    return service, clock, started


def test_a_failed_count_of_the_unused_uploads_is_tried_again_after_a_minute_not_an_hour(monkeypatch):
    """Re-read of stop 54 (finding 5): a count that failed was kept as the count for an hour (/readyz without its
    ``uploads`` block meanwhile). Now the next look a minute on counts again, the wait doubling while it fails."""
    import api.service

    retry, hour = getattr(api.service, "UPLOADS_RETRY_S", 60.0), api.service.UPLOADS_RECOUNT_S
    fine = {"unused": 0, "removable": 0, "bytes": 0, "note": ""}
    could_not = {"unused": None, "removable": None, "bytes": None,
                 "note": "the kept uploads could not be counted now"}
    service, clock, started = _stand_in_service(monkeypatch, [RuntimeError("the store did not answer"), could_not,
                                                              fine, fine])
    try:
        assert service.uploads_status() is None and len(started) == 1  # failed: not counted again at once
        clock.now += retry + 1
        assert service.uploads_status() is None and len(started) == 2  # a minute on: counted again
        started[-1].join(60)
        assert service.uploads_status() == could_not  # could not count: the next try waits twice as long
        clock.now += retry + 1
        service.uploads_status()
        assert len(started) == 2  # not yet
        clock.now += retry
        service.uploads_status()
        assert len(started) == 3
        started[-1].join(60)
        assert service.uploads_status() == fine
        clock.now += retry * 4
        service.uploads_status()
        assert len(started) == 3  # counted: the next in an hour
        clock.now += hour
        service.uploads_status()
        assert len(started) == 4
        started[-1].join(60)
    finally:
        service.close()


def test_a_store_error_of_any_kind_leaves_the_count_unknown_with_a_note(monkeypatch):
    """lance raises ValueError for some store failures: unused_uploads let it out, and ``index info`` stopped."""
    from unittest import mock

    import index.objects
    from index.objects import unused_uploads

    def broken(*args, **kwargs):
        raise ValueError("lance error: Not found: /g/store/references.lance/_versions/3.manifest")

    monkeypatch.setattr(index.objects, "sweep_uploads", broken)
    counted = unused_uploads(mock.MagicMock())
    assert counted["unused"] is None
    assert counted["note"].startswith("the kept uploads could not be counted now: lance error: Not found")


def test_the_recount_back_off_stays_an_hour_however_long_the_count_keeps_failing():
    """w3 re-read #1: the back-off computed 60 * 2 ** (failures - 1) before its cap, which overflows a float at
    1,025 failures in a row (about 42 days of a store that keeps failing under /readyz polls): every /readyz then
    raised, and no count ever started again. The doubling is capped; the wait stays the hour."""
    import api.service

    service = object.__new__(api.service.SpeciesService)
    for failures, wait in ((0, api.service.UPLOADS_RECOUNT_S), (1, api.service.UPLOADS_RETRY_S),
                           (2, 2 * api.service.UPLOADS_RETRY_S), (1025, api.service.UPLOADS_RECOUNT_S),
                           (10**6, api.service.UPLOADS_RECOUNT_S)):
        service._uploads_failures = failures
        assert service._recount_after() == wait, failures
