"""A server whose store hangs (accepts connections, never answers) or fails (walkthrough s48 #1, #2, #6): reads answer
from the references loaded within a bounded wait, the store is looked at again after growing pauses, /readyz and
/metrics answer at once, calls that need the store itself answer 503 at once, and once the store answers again a
write made meanwhile by another folder (another machine) is seen.

A hanging store is a TCP proxy in front of moto's S3 server that stops forwarding (:mod:`_store_proxy`), or, for the
API, a table whose every use blocks until released.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from _api_support import API_KEY, COBRA, SPECIES, binomial, gallery_copy, photos, store_client
from _store_proxy import StoreProxy
from conftest import until
from test_api_store_outage import _DeadTable
from test_object_store import _TINY, BUCKET, s3_endpoint, s3_env  # noqa: F401 - the fixtures, reused

from index.gallery import STORE_CHECK_WAIT_S, STORE_RETRY_MAX_S, Gallery
from index.records import ReferenceRecord

KEYS = {"X-API-Key": API_KEY}
#: A generous bound on any answer while the store hangs (ten times the reads' wait: no timing benchmark).
BOUND_S = 10 * STORE_CHECK_WAIT_S


def _within(fn: Callable[[], Any], what: str, bound: float = BOUND_S) -> Any:
    """``fn()``'s result, run in a thread: fails the test when it has not answered within ``bound`` seconds (the
    thread is left to finish once the store answers again)."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - raised again in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(bound)
    assert not thread.is_alive(), f"{what} did not answer within {bound:g} s while the store hangs"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _rows(n: int, start: int, rng: np.random.Generator) -> tuple[list[ReferenceRecord], list[str], np.ndarray]:
    recs = [ReferenceRecord(path=f"/p{start + i}.jpg", species="Naja naja") for i in range(n)]
    return recs, [f"{start + i:064x}" for i in range(n)], rng.standard_normal((n, _TINY["dim"]))


def test_a_hanging_s3_store_leaves_reads_answering_and_a_write_made_meanwhile_is_seen_after(request, tmp_path,
                                                                                            monkeypatch, caplog):
    endpoint, _ = request.getfixturevalue("s3_env")  # test_object_store's moto server and AWS_* environment
    rng = np.random.default_rng(3)
    first = Gallery.create(tmp_path / "a", _TINY, store=f"s3://{BUCKET}/hang-{tmp_path.name}")
    first.add(*_rows(3, 1, rng))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    proxy = StoreProxy(endpoint)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)  # the server's machine reaches the store through it
        server = Gallery.open(tmp_path / "a", refresh_s=0.05)
        server.stale_reads = True  # as a server's (api.service)
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        other = Gallery.open(tmp_path / "b")  # another machine, reaching the store
        query = rng.standard_normal((1, _TINY["dim"]))
        assert sorted(_within(lambda: server.nearest(query, 3), "a search")[1][0].tolist()) == [1, 2, 3]

        proxy.set("hang")
        with caplog.at_level(logging.WARNING, logger="index.gallery"):
            _within(lambda: server.refresh(force=True), "a refresh")
            _, ids = _within(lambda: server.nearest(query, 3), "a search")
        assert sorted(ids[0].tolist()) == [1, 2, 3]  # the references loaded
        assert server.reading_stale and "answering from the 3 references loaded" in caplog.text
        checks = server.store_checks
        for _ in range(20):  # one look at a time: the reads meanwhile start none
            _within(lambda: server.nearest(query, 3), "a search")
        assert server.store_checks == checks
        (new,) = other.add(*_rows(1, 10, rng))  # written meanwhile, through another machine

        proxy.set("forward")  # the store answers again
        until(lambda: server.refresh() is not None and new in server.index.ids.tolist(),
              "the write made during the hang is seen")
        until(lambda: not server.reading_stale, "reads are no longer stale")
        assert "answers again" in caplog.text
    finally:
        proxy.close()


class _HangingTable:
    """A Lance table whose every use blocks until ``release`` is set (a store that accepts and never answers), then
    is the real table's."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.release = threading.Event()

    def __getattr__(self, name: str) -> Any:
        self.release.wait()
        return getattr(self.table, name)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with store_client(tmp_path_factory, "api_hang") as c:  # every read looks at the store: each request meets it
        yield c


def test_a_hanging_store_leaves_identify_readyz_and_metrics_answering_and_the_rest_503_at_once(client):
    service = client.app.state.service
    store = service.gallery.store
    cobra = [("images", (COBRA.name, COBRA.read_bytes(), "image/jpeg"))]
    size = len(service.gallery)
    hanging = _HangingTable(store._table)
    store._table = hanging
    try:
        ident = _within(lambda: client.post("/v1/identify", files=cobra), "identify")
        assert ident.status_code == 200 and ident.json()["results"][0]["name"] == binomial(SPECIES[0])
        ready = _within(lambda: client.get("/readyz"), "/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded", ready.text
        assert ready.json()["store"] == str(service.gallery.store_uri) and ready.json()["references"] == size
        scraped = _within(lambda: client.get("/metrics"), "/metrics")
        assert scraped.status_code == 200 and "\nspeciesid_store_up 0.0\n" in scraped.text
        new = photos("val", SPECIES[1], 1)[0]
        for method, path, kw in (
            ("GET", "/v1/species", {}), ("GET", f"/v1/species/{binomial(SPECIES[1])}", {}),
            ("GET", "/v1/references/1/image", {}),
            ("POST", f"/v1/species/{binomial(SPECIES[1])}/references",
             {"headers": KEYS, "files": [("images", (new.name, new.read_bytes(), "image/jpeg"))]}),
            ("DELETE", "/v1/references/1", {"headers": KEYS}),
        ):
            resp = _within(lambda m=method, p=path, k=kw: client.request(m, p, **k), f"{method} {path}")
            assert resp.status_code == 503, (path, resp.status_code, resp.text[:300])
            assert resp.headers["content-type"].startswith("application/json") and int(resp.headers["retry-after"])
            assert "cannot be reached now" in resp.json()["detail"], resp.text
    finally:
        hanging.release.set()
        store._table = hanging.table
    until(lambda: client.get("/readyz").json()["status"] == "ready", "/readyz ready again")
    assert "\nspeciesid_store_up 1.0\n" in client.get("/metrics").text
    assert client.get("/v1/species").status_code == 200


def test_a_failing_store_is_looked_at_again_after_pauses_that_double_up_to_a_bound(tmp_path_factory):
    gallery = Gallery.open(gallery_copy(tmp_path_factory, "backoff"), refresh_s=1.0)
    gallery.stale_reads = True
    store = gallery.store
    table, store._table = store._table, _DeadTable()

    def later(seconds: float) -> None:  # as if ``seconds`` had passed since the last look (no sleep)
        gallery._checked_at -= seconds

    try:
        later(1.0)
        gallery.refresh()
        assert gallery.reading_stale and gallery.store_checks == 1
        for pause in (2.0, 4.0, 8.0):  # doubling from refresh_s
            for _ in range(20):
                assert gallery.refresh() is False
            checks = gallery.store_checks
            later(pause - 0.1)
            gallery.refresh()
            assert gallery.store_checks == checks, "looked at before its pause"
            later(0.2)
            gallery.refresh()
            assert gallery.store_checks == checks + 1
        gallery._failures = 20  # a long outage: never more than STORE_RETRY_MAX_S between looks
        later(STORE_RETRY_MAX_S + 0.1)
        gallery.refresh()
        assert gallery.store_checks == checks + 2
    finally:
        store._table = table
    later(STORE_RETRY_MAX_S + 0.1)
    gallery.refresh()  # the first look that succeeds ends the outage, and the pauses
    assert not gallery.reading_stale and gallery._pause() == gallery.refresh_s


def test_an_s3_store_gets_short_client_timeouts_unless_its_options_say_otherwise(tmp_path):
    from index.store import STORE_CLIENT_DEFAULTS, public_options, storage_options

    opts = storage_options({"region": "eu-west-1"}, {"aws_endpoint": "http://127.0.0.1:9"})
    assert {k: opts[k] for k in STORE_CLIENT_DEFAULTS} == {"timeout": "10s", "connect_timeout": "5s",
                                                             "client_max_retries": "2", "client_retry_timeout": "30"}
    assert storage_options({"timeout": "120s"}, {"client_max_retries": "10"})["timeout"] == "120s"
    assert storage_options(None, {"client_max_retries": "10"})["client_max_retries"] == "10"
    assert not set(public_options(opts)) & set(STORE_CLIENT_DEFAULTS)  # never recorded in gallery.json


#: What Lance raised on every use of a table whose bucket was emptied under a running server (walkthrough s48 #6).
LANCE_TABLE_GONE = "lance error: Not found: snakes/references.lance/_versions"


class _GoneTable:
    """A Lance table whose store answers but no longer holds it (a bucket emptied, a prefix deleted)."""

    def __getattr__(self, name: str):
        raise RuntimeError(LANCE_TABLE_GONE)


def test_a_store_whose_table_is_gone_answers_a_json_500_saying_so_and_metrics_stay_scrapeable(client):
    from index.errors import store_io_failure, store_table_gone

    assert store_table_gone(RuntimeError(LANCE_TABLE_GONE)) and store_io_failure(RuntimeError(LANCE_TABLE_GONE)) is None
    assert not store_table_gone(RuntimeError("lance error: LanceError(IO): Generic S3 error: Not found: x.lance/y"))
    service = client.app.state.service
    store = service.gallery.store
    cobra = [("images", (COBRA.name, COBRA.read_bytes(), "image/jpeg"))]
    table, store._table = store._table, _GoneTable()
    try:
        for resp in (_within(lambda: client.get("/readyz"), "/readyz"),
                     _within(lambda: client.post("/v1/identify", files=cobra), "identify")):
            assert resp.status_code == 500 and resp.headers["content-type"].startswith("application/json"), resp.text
            detail = resp.json()["detail"]
            assert "no longer holds the gallery's table" in detail and "rebuilds the gallery" in detail, detail
        scraped = _within(lambda: client.get("/metrics"), "/metrics")
        assert scraped.status_code == 200 and "\nspeciesid_store_up 0.0\n" in scraped.text
    finally:
        store._table = table
    until(lambda: client.get("/readyz").status_code == 200, "/readyz ready again")


def test_the_line_of_a_store_that_does_not_answer_names_it_says_to_check_the_network_and_cuts_no_word():
    from index.gallery import store_error

    lance = ('lance error: Invalid input, Failed to connect to namespace: IO { source: Generic { store: "S3", source: '
             'ListRequest { source: RetryError(RetryErrorImpl { method: GET, uri: Some(http://127.0.0.1:54821/gal?'
             'list-type=2&prefix=snakes%2F), retries: 3, max_retries: 3, retry_timeout: 180s, inner: Http(HttpError { '
             'kind: Connect, source: reqwest::Error { kind: Request, source: hyper_util::client::legacy::Error(Connect, '
             'ConnectError("tcp connect error", Os { code: 111, kind: ConnectionRefused, message: "Connection refused"'
             ' })) } }) }) } } }')  # walkthrough s48 #7, moto stopped
    msg = str(store_error("s3://gal/snakes", RuntimeError(lance), "http://127.0.0.1:54821"))
    assert msg.startswith("cannot open the store s3://gal/snakes: it did not answer (Connection refused); check the "
                          "network and that the endpoint http://127.0.0.1:54821 is up and reachable"), msg
    assert msg.endswith(" …)") and "(the store's error: lance error: Invalid input" in msg  # the raw text last,
    assert "retry_timeout: 180s, inner:" in msg  # its first line cut after a whole word
    refused = str(store_error("s3://gal/snakes", RuntimeError("lance error: NoSuchBucket"), None))
    assert refused.startswith("cannot open the store s3://gal/snakes (NoSuchBucket") and "network" not in refused


def test_index_info_of_a_gallery_whose_store_does_not_answer_prints_what_the_folder_knows_and_fails(
        request, tmp_path, monkeypatch, capsys):
    import json

    from _api_support import free_port

    from api.cli import main

    request.getfixturevalue("s3_env")
    rng = np.random.default_rng(4)
    uri = f"s3://{BUCKET}/info-{tmp_path.name}"
    Gallery.create(tmp_path / "a", _TINY, store=uri).add(*_rows(2, 1, rng))
    down = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", down)
    capsys.readouterr()
    assert main(["index", "info", "--index", str(tmp_path / "a")]) == 1
    out, err = capsys.readouterr()
    info = json.loads(out)
    assert info["encoder"]["fingerprint"] == _TINY["fingerprint"] and info["local_index"]["count"] == 2
    assert info["store"]["uri"] == uri and "it did not answer" in info["store"]["error"]
    assert f"check the network and that the endpoint {down}" in err


def test_a_look_waiting_on_this_processs_own_write_is_no_outage_and_one_failing_otherwise_is_said_by_every_read(
        tmp_path_factory, caplog):
    """Review of the outage fix: a look at the store that had to wait on the gallery's lock behind a long write of
    this process counted as the store not answering (a false outage: degraded, 503s); a look's error that is not an
    outage (a table gone) reached only the read waiting on it, never logged; refresh_s 0 had no back-off."""
    import logging
    import threading

    gallery = Gallery.open(gallery_copy(tmp_path_factory, "lockwait"), refresh_s=1.0)
    gallery.stale_reads = True
    release = threading.Event()

    def hold() -> None:
        with gallery._lock:  # a write of this process (a rebuild), longer than STORE_CHECK_WAIT_S
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        gallery._checked_at -= 5.0
        with caplog.at_level(logging.WARNING, logger="index.gallery"):
            gallery.refresh()
            assert not gallery.reading_stale
            until(lambda: gallery._check is None, "the look to end")
        assert "has not answered" not in caplog.text and not gallery.reading_stale and gallery._failures == 0
        caplog.clear()
    finally:
        release.set()
        holder.join()
    store = gallery.store
    table, store._table = store._table, _GoneTable()
    try:
        gallery._checked_at -= 5.0
        with caplog.at_level(logging.ERROR, logger="index.gallery"):
            with pytest.raises(RuntimeError, match="Not found"):
                gallery.refresh()
        assert "looking at its store" in caplog.text
        with pytest.raises(RuntimeError, match="Not found"):  # within the pause: said again, no new look
            gallery.refresh()
    finally:
        store._table = table
    gallery._checked_at -= 5.0
    assert gallery.refresh() is False  # a look that works ends it
    assert gallery.refresh() is False
    gallery.refresh_s = 0.0
    gallery._failures = 3
    assert gallery._pause() == 8.0  # from 1 s when refresh_s is 0
