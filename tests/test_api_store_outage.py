"""The HTTP API while the gallery's store cannot be reached (an S3 outage): JSON 503s with Retry-After on every
route, /readyz naming the store, /metrics still scrapeable, every request counted, identify answered from the
references loaded; and all back to normal once the store answers again.

The outage is Lance's own error, raised by every call on the store's table: the text an unreachable S3 endpoint
gives (walkthrough s47, finding 1).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from _api_support import API_KEY, COBRA, SPECIES, binomial, photos, store_client
from conftest import until

KEYS = {"X-API-Key": API_KEY}
#: What Lance raises when the S3 endpoint is unreachable (checked against moto's server, stopped).
LANCE_S3_DOWN = ("lance error: LanceError(IO): Generic S3 error: Error performing list request: Error performing GET "
                 "http://127.0.0.1:5057/clinics?list-type=2&prefix=ph%2Freferences.lance%2F_versions%2F in 358ms, "
                 "after 3 retries, max_retries: 3, retry_timeout: 180s - HTTP error: error sending request")

#: What Lance raises when a local table's data file was deleted (a local store damaged: no outage).
LANCE_LOCAL_FILE_GONE = ("lance error: LanceError(IO): Generic N/A error: Wrapped error: Not found: "
                         "/x/references.lance/data/0b1c.lance")


class _DeadTable:
    """A Lance table whose every use fails as an unreachable S3 store does."""

    def __getattr__(self, name: str):
        raise RuntimeError(LANCE_S3_DOWN)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with store_client(tmp_path_factory, "api_outage") as c:  # every read looks at the store: each request meets it
        yield c


def _sample(text: str, series: str) -> float:
    return next((float(ln.split()[1]) for ln in text.splitlines() if ln.startswith(series + " ")), 0.0)


def _unavailable(resp) -> str:
    """A 503 with a JSON detail and Retry-After; returns the detail."""
    assert resp.status_code == 503, (resp.status_code, resp.text[:300])
    assert resp.headers["content-type"].startswith("application/json"), resp.text[:300]
    assert int(resp.headers["retry-after"]) >= 1
    return resp.json()["detail"]


def test_a_store_outage_is_a_json_503_with_retry_after_on_every_route_and_counted(client, caplog):
    service = client.app.state.service
    store = service.gallery.store
    cobra = [("images", (COBRA.name, COBRA.read_bytes(), "image/jpeg"))]
    assert client.post("/v1/identify", files=cobra).status_code == 200
    size = len(service.gallery)
    before = client.get("/metrics").text
    table = store._table
    store._table = _DeadTable()
    try:
        with caplog.at_level(logging.WARNING):
            ident = client.post("/v1/identify", files=cobra)  # answered from the references loaded: stale, not down
            assert ident.status_code == 200 and ident.json()["results"][0]["name"] == binomial(SPECIES[0])
            assert "cannot be read" in caplog.text and "answering from the" in caplog.text
            ready = client.get("/readyz")  # still ready (identify answers), degraded, naming the store
            assert ready.status_code == 200, ready.text
            assert ready.json()["status"] == "degraded" and ready.json()["references"] == size
            assert ready.json()["store"] == str(service.gallery.store_uri) and "503" in ready.json()["warning"]
            assert "\nspeciesid_store_up 0.0\n" in client.get("/metrics").text
            detail = _unavailable(client.get("/v1/species"))  # no edge(): the app's handler
            assert "S3 store" in detail and "retry in" in detail
            assert "LanceError" not in detail  # the store's error is in the log, not here
            _unavailable(client.get(f"/v1/species/{binomial(SPECIES[1])}"))
            _unavailable(client.get("/v1/references/1/image"))
            new = photos("val", SPECIES[1], 1)[0]
            _unavailable(client.post(f"/v1/species/{binomial(SPECIES[1])}/references", headers=KEYS,
                                     files=[("images", (new.name, new.read_bytes(), "image/jpeg"))]))
            _unavailable(client.delete("/v1/references/1", headers=KEYS))
            scraped = client.get("/metrics")  # still scrapeable: the last size known
            assert scraped.status_code == 200, scraped.text[:300]
            assert _sample(scraped.text, "speciesid_gallery_references") == size
    finally:
        store._table = table
    text = client.get("/metrics").text
    for series in ('method="GET",route="/readyz",status="200"', 'method="GET",route="/v1/species",status="503"',
                   'method="DELETE",route="/v1/references/{ref_id}",status="503"'):
        assert _sample(text, f"speciesid_requests_total{{{series}}}") - _sample(
            before, f"speciesid_requests_total{{{series}}}") == 1, series
    # the store answers again: so does every route, from the next look (after the outage's back-off pause)
    until(lambda: client.get("/readyz").json()["status"] == "ready", "/readyz ready again", limit=60)
    # "uploads": counted on a thread of its own (tests/test_unused_uploads.py), here or not yet
    assert {k: v for k, v in client.get("/readyz").json().items() if k not in ("probe", "uploads")} == {
        "status": "ready", "references": size, "encoder": service.gallery.encoder_spec,
        "build": {"state": "complete", "note": ""}, "venom_applies": True}
    assert "\nspeciesid_store_up 1.0\n" in client.get("/metrics").text
    assert client.get("/v1/species").status_code == 200
    assert client.get("/v1/references/1/image").status_code == 200


def test_any_other_error_is_still_a_500_and_is_counted(client, monkeypatch):
    service = client.app.state.service
    before = client.get("/metrics").text
    monkeypatch.setattr(service, "species", lambda: (_ for _ in ()).throw(RuntimeError("a bug, not an outage")))
    assert client.get("/v1/species").status_code == 500
    series = 'speciesid_requests_total{method="GET",route="/v1/species",status="500"}'
    assert _sample(client.get("/metrics").text, series) - _sample(before, series) == 1


def test_only_lances_io_errors_count_as_a_store_outage_and_only_of_a_network_store():
    from index.errors import store_io_failure, store_io_kind

    assert store_io_failure(RuntimeError(LANCE_S3_DOWN)) == "S3"
    assert store_io_failure(OSError("LanceError(IO): Generic N/A error: LanceError(IO): Generic S3 error: x")) == "S3"
    # a local store's I/O error (a full disk, a data file deleted) is the store's error, but no outage: retrying
    # does not help; it is one only when the gallery's store is an object store
    wrapped = RuntimeError("reading the table failed")
    wrapped.__cause__ = OSError("LanceError(IO): Generic LocalFileSystem error: No space left on device")
    assert store_io_kind(wrapped) == "LocalFileSystem"
    assert store_io_failure(wrapped) is None and store_io_failure(wrapped, "/galleries/g/references.lance") is None
    assert store_io_failure(wrapped, "s3://bucket/g") == "LocalFileSystem"
    assert store_io_kind(RuntimeError(LANCE_LOCAL_FILE_GONE)) == ""
    assert store_io_failure(RuntimeError(LANCE_LOCAL_FILE_GONE), "/galleries/g/references.lance") is None
    assert store_io_failure(RuntimeError(LANCE_LOCAL_FILE_GONE), "s3://bucket/g") == ""
    # a bug in an except block that handles a store's error is a bug: only causes are followed, not the context
    try:
        try:
            raise RuntimeError(LANCE_S3_DOWN)
        except RuntimeError:
            raise RuntimeError("a bug while handling it")  # noqa: B904 - the implicit context is the point
    except RuntimeError as bug:
        assert bug.__context__ is not None and store_io_kind(bug) is None and store_io_failure(bug) is None
    assert store_io_failure(RuntimeError("a bug, not an outage")) is None
    # Lance's plain "Not found" of one data file (a local table's file deleted): the store damaged, no table gone
    from index.errors import store_table_gone

    plain = RuntimeError("lance error: Not found: tmp/g/store/references.lance/data/0010.lance, /x/local.rs:273:40")
    assert store_io_kind(plain) == "" and store_io_failure(plain, "s3://b/g") is None and not store_table_gone(plain)
    assert store_table_gone(RuntimeError("lance error: Not found: snakes/references.lance/_versions"))
    assert store_io_failure(ValueError(LANCE_S3_DOWN)) is None  # a refusal of the request, not an outage


class _DamagedTable:
    """A local Lance table whose data file was deleted: every use fails with Lance's I/O error, kind N/A."""

    def __getattr__(self, name: str):
        raise RuntimeError(LANCE_LOCAL_FILE_GONE)


def test_a_damaged_local_store_is_a_500_saying_so_not_a_503_to_retry_and_readyz_is_not_degraded(client, caplog):
    """A local store's I/O error is no outage (finding 2 of the s47 review): retrying does not help, so no 503 with
    Retry-After and no "network"; /readyz does not answer "degraded" (nothing will come back by itself)."""
    service = client.app.state.service
    store = service.gallery.store
    table = store._table
    store._table = _DamagedTable()
    try:
        with caplog.at_level(logging.ERROR, logger="api.routers._edge"):
            for resp in (client.get("/v1/species"), client.get("/readyz")):
                assert resp.status_code == 500, (resp.status_code, resp.text[:300])
                assert "retry-after" not in resp.headers
                detail = resp.json()["detail"]
                assert "cannot be read or written" in detail and "retrying does not help" in detail, detail
                assert "network" not in detail and "LanceError" not in detail and "/x/" not in detail
        assert "answered 500: the gallery's store" in caplog.text and "Not found: /x/" in caplog.text
        assert str(service.gallery.store_uri) in caplog.text
    finally:
        store._table = table
    assert client.get("/readyz").json()["status"] == "ready"


def test_an_outages_503s_are_logged_at_most_once_per_minute_with_the_count_between(monkeypatch, caplog):
    """Every request meets an outage: its 503 was one WARNING line per request. Now one per STORE_WARN_EVERY_S,
    the next saying how many were answered so meanwhile; each request still gets its 503."""
    import api.routers._edge as edge_module

    clock = [1000.0]
    monkeypatch.setattr(edge_module.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(edge_module, "_STORE_WARNINGS", edge_module._Every(edge_module.STORE_WARN_EVERY_S))
    with caplog.at_level(logging.WARNING, logger="api.routers._edge"):
        for _ in range(5):
            answer = edge_module.store_answer(RuntimeError(LANCE_S3_DOWN), "s3://bucket/g")
            assert answer is not None and answer.status_code == 503
            clock[0] += 1.0
        lines = [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]
        assert len(lines) == 1 and "more answered so" not in lines[0] and "at most once per 60 s" in lines[0], lines
        clock[0] += edge_module.STORE_WARN_EVERY_S
        edge_module.store_answer(RuntimeError(LANCE_S3_DOWN), "s3://bucket/g")
        lines = [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]
        assert len(lines) == 2 and "(4 more answered so since the last such line)" in lines[1], lines


def test_the_503s_answered_at_once_during_an_outage_are_logged_and_counted(client, monkeypatch, caplog):
    """Walk s56-logs #10: once the store was known down, the species list, thumbnails and writes answered 503 at
    once (require_store) with no log line and no count, though the docs promise the store's error in the log, one
    line a minute at most counting the 503s since the last. Now they go through the same line as the others."""
    import api.routers._edge as edge_module

    service = client.app.state.service
    cobra = [("images", (COBRA.name, COBRA.read_bytes(), "image/jpeg"))]
    store = service.gallery.store
    table = store._table
    store._table = _DeadTable()
    warnings = edge_module._Every(edge_module.STORE_WARN_EVERY_S)
    monkeypatch.setattr(edge_module, "_STORE_WARNINGS", warnings)
    try:
        assert client.post("/v1/identify", files=cobra).status_code == 200  # the look fails: reads answer stale
        assert service.gallery.reading_stale
        with caplog.at_level(logging.WARNING, logger="api.routers._edge"):
            for _ in range(3):
                _unavailable(client.get("/v1/species"))
            lines = [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]
            assert len(lines) == 1, lines
            assert lines[0].startswith("GET /v1/species: answered 503 (retry in 5 s): the gallery's S3 store cannot "
                                       "be reached (answered at once: its store "), lines
            assert "Generic S3 error" in lines[0] and "at most once per 60 s" in lines[0], lines
            warnings._last = float("-inf")  # a minute later (no clock patched: the server's threads use it)
            _unavailable(client.delete("/v1/references/1", headers=KEYS))
            lines = [r.getMessage() for r in caplog.records if "answered 503" in r.getMessage()]
            assert len(lines) == 2 and lines[1].startswith("DELETE /v1/references/1: answered 503"), lines
            assert "(2 more answered so since the last such line)" in lines[1], lines
    finally:
        store._table = table
    until(lambda: client.get("/readyz").json()["status"] == "ready", "/readyz ready again", limit=60)


def test_identify_and_search_answer_from_the_references_this_server_added_during_an_outage(tmp_path_factory,
                                                                                            caplog):
    """Walk s56-logs #3: once the server itself had added references, identify and search answered 503 during an
    outage (their rows' metadata was not cached: each answer naming one looked it up in the store), while the log
    said it answered from the references loaded. Now an add caches its rows' metadata: answers name them unread."""
    from _api_support import NEW_SPECIES

    with store_client(tmp_path_factory, "api_outage_adds") as c:
        new = photos("val", NEW_SPECIES, 2)
        added = c.post(f"/v1/species/{binomial(NEW_SPECIES)}/references", headers=KEYS,
                       files=[("images", (p.name, p.read_bytes(), "image/jpeg")) for p in new])
        assert added.status_code == 201, added.text[:300]
        assert c.delete("/v1/references/1", headers=KEYS).status_code == 204
        gallery = c.app.state.service.gallery
        ids = added.json()["ids"]
        cached = {i: gallery._meta_cache.get(i) for i in ids}
        assert gallery._cache_metadata(gallery.store.metadata(ids)) == cached  # as the store gives them back
        store = gallery.store
        table = store._table
        store._table = _DeadTable()
        try:
            with caplog.at_level(logging.WARNING):
                for _ in range(2):
                    ident = c.post("/v1/identify", files=[("images", (new[0].name, new[0].read_bytes(),
                                                                      "image/jpeg"))])
                    assert ident.status_code == 200, ident.text[:300]
                    assert ident.json()["results"][0]["name"] == binomial(NEW_SPECIES)
                    assert "answering from the" in caplog.text
        finally:
            store._table = table


def test_a_local_stores_data_files_deleted_are_a_500_saying_it_cannot_be_read_and_readyz_says_so(client, caplog):
    """Walk s56-logs #4: with the data files of a local store deleted, the 500 said the store no longer held its
    table and the log blamed an emptied bucket, while /readyz answered 200 "ready" (it reads only the version). Now
    both are the 500 of a store that cannot be read or written (docs/api.md), the log naming no bucket."""
    import shutil

    gallery = client.app.state.service.gallery
    data = Path(gallery.store.root) / "references.lance" / "data"
    aside = data.parent / "data-aside"
    shutil.move(data, aside)
    data.mkdir()
    try:
        with caplog.at_level(logging.ERROR, logger="api.routers._edge"):
            for resp in (client.get("/v1/references/2/image"), client.get("/readyz")):
                assert resp.status_code == 500, (resp.status_code, resp.text[:300])
                detail = resp.json()["detail"]
                assert "cannot be read or written" in detail and "retrying does not help" in detail, detail
                assert "no longer holds" not in detail and str(data) not in detail
        assert "cannot be read or written" in caplog.text and "Not found" in caplog.text
        assert "GET /v1/references/2/image: answered 500: the gallery's store" in caplog.text  # which request
        assert "bucket" not in caplog.text and "no longer holds" not in caplog.text
    finally:
        data.rmdir()
        shutil.move(aside, data)
    until(lambda: client.get("/readyz").status_code == 200, "/readyz ready again", limit=60)
    assert client.get("/v1/references/2/image").status_code == 200
