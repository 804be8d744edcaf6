"""The edge guard's paths (s53 re-read of the guard): how many identify/search bodies are received at once
(SPECIESID_MAX_RECEIVING), a 429 after the whole body, a client leaving mid-body, a chunked body cut at the limit,
the 408 closing the connection, the form parser's temporary files closed on every way out, a full temporary disk,
and the 413 and 400 worded for the route. No model is loaded: the guard runs in front of a stand-in app, or the
app with a stand-in service that no request reaches. Bodies are small and clients few; no assert is on a time."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket

import pytest
from _api_support import JSON, Sent, body_size_app, http_scope, refused_unread, stand_in_app

#: How long a socket waits for an answer that should come at once (generous: a loaded machine).
BLOCKED_S = 20
MB = 1024 * 1024
FORM = [(b"content-type", b"multipart/form-data; boundary=xyz")]


def _photo_body(size: int) -> bytes:
    """A multipart body of one photo part of ``size`` bytes (over 1 MB: the form parser puts it in a temporary
    file)."""
    return (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff" + b"x" * size + b"\r\n--xyz--\r\n")


def _temp_files() -> int:
    """This process's open temporary files (unlinked: what a SpooledTemporaryFile rolls over into)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += "(deleted)" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return n


# ------------------------------------------------------------------------------------ how many are received
def test_bodies_past_max_receiving_are_shed_unread_and_the_others_served():
    """500 stalled clients each held 1 MB (and a temporary file) with nothing shed: past SPECIESID_MAX_RECEIVING
    bodies being received, a 429 with Retry-After before a byte is read."""
    guard = _guarded(api_keys="", max_identify_in_flight=3, max_receiving=3, body_timeout_s=60)
    clients = 30
    reads, sent = [0] * clients, [Sent() for _ in range(clients)]

    async def run() -> None:
        go = asyncio.Event()

        async def client(i: int) -> None:
            async def receive() -> dict:
                reads[i] += 1
                if reads[i] == 1:
                    return {"type": "http.request", "body": b'{"embedding": ', "more_body": True}
                await go.wait()  # a client that stalls after its first chunk
                return {"type": "http.request", "body": b"[1]}", "more_body": False}

            await guard(http_scope("/v1/search", JSON), receive, sent[i])

        tasks = [asyncio.create_task(client(i)) for i in range(clients)]
        for _ in range(50):  # every client has arrived: the shed ones are answered, the others hold
            await asyncio.sleep(0)
        shed = [i for i in range(clients) if tasks[i].done()]
        assert len(shed) == clients - 3, [s.status for s in sent]
        assert all(sent[i].status == 429 and reads[i] == 0 for i in shed)  # answered unread
        assert all(sent[i].headers[b"retry-after"] == b"1" for i in shed)
        assert sent[shed[0]].detail == "busy: 3 requests already sending photos to this server; retry in 1 s"
        go.set()
        await asyncio.gather(*tasks)

    asyncio.run(run())
    served = [s for s in sent if s.status == 200]
    assert len(served) == 3 and all(json.loads(s.body) == {"size": 18} for s in served)
    assert guard._receiving == 0 and guard._in_flight == 0 and guard.shed == clients - 3


def test_max_receiving_defaults_to_four_per_identify_slot():
    from api.settings import Settings

    assert Settings(index="x", max_identify_in_flight=3).max_receiving == 12
    assert Settings(index="x", max_identify_in_flight=3, max_receiving=5).max_receiving == 5


def test_a_request_whose_slot_filled_while_its_body_arrived_is_shed_after_it():
    """A found the slot free and sent its body slowly; B took the slot meanwhile: A gets its 429 (Retry-After) once
    its whole body is in (docs/api.md says so), and its app never answers."""
    from api.guard import EdgeGuard
    from api.settings import Settings

    async def run() -> tuple[Sent, Sent, EdgeGuard]:
        a_rest, b_holds, b_done = asyncio.Event(), asyncio.Event(), asyncio.Event()

        async def app(scope, receive, send) -> None:
            if scope["path"] != "/v1/identify":
                return await body_size_app(scope, receive, send)
            await receive()  # B: its whole body, so it holds the slot until told
            b_holds.set()
            await b_done.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        guard = EdgeGuard(app, Settings(index="nowhere", max_identify_in_flight=1, body_timeout_s=60,
                                        retry_after_s=2, retry_jitter_s=0))
        a_sent, b_sent, a_reads = Sent(), Sent(), []

        async def a_receive() -> dict:
            a_reads.append(1)
            if len(a_reads) == 1:
                return {"type": "http.request", "body": b'{"embedding": ', "more_body": True}
            await a_rest.wait()
            return {"type": "http.request", "body": b"[1]}", "more_body": False}

        async def b_receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        a = asyncio.create_task(guard(http_scope("/v1/search", JSON), a_receive, a_sent))
        while not a_reads:
            await asyncio.sleep(0)
        b = asyncio.create_task(guard(http_scope("/v1/identify", JSON), b_receive, b_sent))
        await b_holds.wait()
        a_rest.set()
        await a
        b_done.set()
        await b
        return a_sent, b_sent, guard

    a_sent, b_sent, guard = asyncio.run(run())
    assert a_sent.status == 429 and a_sent.headers[b"retry-after"] == b"2", a_sent.body
    assert a_sent.detail == "busy: 1 identification in progress; retry in 2 s"
    assert b_sent.status == 200
    assert guard._in_flight == 0 and guard._receiving == 0 and guard.shed == 1


# ------------------------------------------------------------------------------------ refusals mid-body
def _run_app(app, path: str, headers, messages, root_path: str = "") -> Sent:
    """``messages`` sent to ``app`` one per receive (then the call waits: a stalled client); what it answered.
    ``root_path``: as :func:`_api_support.http_scope`'s."""
    sent, queue = Sent(), list(messages)

    async def receive() -> dict:
        if queue:
            return queue.pop(0)
        while sent.status is None:  # stalled until answered (a deadline, or a refusal)
            await asyncio.sleep(0.01)
        return {"type": "http.disconnect"}

    asyncio.run(app(http_scope(path, headers, root_path), receive, sent))
    return sent


def _counted(app, route: str, status: int) -> float:
    """The app's count of ``POST route`` answered ``status`` (speciesid_requests_total)."""
    return app.state.metrics.requests.labels("POST", route, str(status))._value.get()


def test_a_client_leaving_mid_body_is_answered_400_and_counted():
    app = stand_in_app()
    body = _photo_body(100)
    sent = _run_app(app, "/v1/identify", FORM, [{"type": "http.request", "body": body[:50], "more_body": True},
                                                {"type": "http.disconnect"}])
    assert sent.status == 400 and sent.detail == "the client closed the connection before the request body was sent"
    assert _counted(app, "/v1/identify", 400) == 1


def test_a_chunked_body_past_the_limit_is_cut_with_a_413_that_closes_the_connection():
    app = stand_in_app(max_request_mb=1)  # identify's limit: 1 MB
    body = _photo_body(2 * MB)  # announced by no Content-Length: counted as it arrives
    chunks = [{"type": "http.request", "body": body[i:i + MB // 2], "more_body": True}
              for i in range(0, 2 * MB, MB // 2)]
    sent = _run_app(app, "/v1/identify", FORM, chunks)
    assert sent.status == 413 and sent.headers[b"connection"] == b"close", sent.body
    assert sent.detail.startswith("request body over the 1 MB this route accepts "
                                  "(SPECIESID_MAX_REQUEST_MB"), sent.body


@pytest.mark.parametrize("how", ["408", "disconnect", "app error"])
def test_the_form_parsers_temporary_file_is_closed_on_every_way_out(how, monkeypatch):
    """A photo over 1 MB is in a temporary file while its body arrives: closed on a 408, on the client leaving and
    on the route failing after the form was read."""
    app = stand_in_app(body_timeout_s=1.0)
    body = _photo_body(3 * MB)
    held: list[int] = []
    before = _temp_files()

    def fail() -> None:  # the route's first step once its form is read
        held.append(_temp_files())
        raise LookupError("the route failed")

    app.state.service.require_references = fail
    head = {"type": "http.request", "body": body[: 2 * MB], "more_body": True}
    if how == "408":
        sent = _run_app(app, "/v1/identify", FORM, [head])
        assert sent.status == 408 and sent.headers[b"connection"] == b"close", sent.body
    elif how == "disconnect":
        sent = _run_app(app, "/v1/identify", FORM, [head, {"type": "http.disconnect"}])
        assert sent.status == 400
    else:
        with pytest.raises(LookupError):
            _run_app(app, "/v1/identify", FORM, [{"type": "http.request", "body": body, "more_body": False}])
        assert held == [before + 1]  # the photo was in a temporary file while the route ran
    assert _temp_files() == before


@pytest.mark.parametrize("route", ["/v1/identify", "/v1/search"])
def test_a_photo_the_temporary_disk_cannot_hold_is_a_503_saying_so(route, monkeypatch):
    """The form parser's write failing (a full disk) was a 400 "error parsing the body" (identify) or a 500."""
    from fastapi.testclient import TestClient
    from starlette import formparsers

    class Full(formparsers.SpooledTemporaryFile):
        def write(self, data):  # noqa: ANN001, ANN202 - the file's own signature
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(formparsers, "SpooledTemporaryFile", Full)
    field = "image" if route == "/v1/search" else "images"
    resp = TestClient(stand_in_app()).post(route, files=[(field, ("a.jpg", b"\xff\xd8\xff" + b"x" * 100,
                                                                  "image/jpeg"))])
    assert resp.status_code == 503, resp.text
    detail = resp.json()["detail"]
    assert detail.startswith("this server cannot keep the request's photos in its temporary space now (No space "
                             "left on device): retry later"), detail
    assert "TMPDIR" in detail and resp.headers["retry-after"]


def test_a_408_closes_the_connection_on_a_real_server():
    from _api_support import serving

    with serving(stand_in_app(body_timeout_s=1.0), lifespan="off") as port, \
            socket.create_connection(("127.0.0.1", port), timeout=BLOCKED_S) as conn:
        conn.sendall(b"POST /v1/identify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz"
                     b"\r\nContent-Length: 1000\r\n\r\n--xyz\r\n")  # then nothing more
        reply = b""
        while got := conn.recv(4096):  # until the server closes it (a timeout here fails the test)
            reply += got
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert b"connection: close" in reply.lower()


# ------------------------------------------------------------------------------------ wording
def test_a_json_body_over_the_limit_is_told_what_the_route_takes():
    from fastapi.testclient import TestClient

    client = TestClient(stand_in_app(max_upload_mb=1))  # identify: 6 MB, search: 2 MB
    body = b"x" * (7 * MB)
    search = client.post("/v1/search", content=body, headers={"Content-Type": "application/json"}).json()["detail"]
    hint = search.split("send only ", 1)[1]
    assert json.loads(hint.replace("[...]", "[]")) == {"embedding": [], "k": 10}, search  # valid JSON
    identify = client.post("/v1/identify", content=body, headers={"Content-Type": "application/json"})
    detail = identify.json()["detail"]
    assert identify.status_code == 413 and "this route takes no JSON: send multipart/form-data photos" in detail
    assert "embedding" not in detail, detail


def test_a_form_refusal_finds_the_parsers_reason_anywhere_in_the_chain_and_else_says_the_generic_one():
    from python_multipart.exceptions import MultipartParseError
    from starlette.exceptions import HTTPException

    from api.app import PART_HEADER_BYTES, _form_refusal
    from api.settings import Settings

    settings = Settings(index="nowhere")

    def refused(context: BaseException | None, cause: BaseException | None = None) -> str:
        exc = HTTPException(400, "Invalid multipart data.")
        if context is not None:
            context.__cause__ = cause
        exc.__context__ = context
        return _form_refusal(settings, None, exc)  # type: ignore[arg-type] - unused for these

    generic = "the multipart body cannot be read (Invalid multipart data): send multipart/form-data"
    header = f"a part's header is over {PART_HEADER_BYTES:,} bytes"
    assert PART_HEADER_BYTES == 4224
    too_long = MultipartParseError("Maximum header size exceeded")
    assert header in refused(ValueError("wrapped"), too_long)  # Starlette's chain today
    assert header in refused(too_long)  # the parser's error as the context itself
    assert refused(None).startswith(generic)  # no chain
    assert refused(ValueError("x"), ValueError("header size")).startswith(generic)  # not the parser's error


# ------------------------------------------------------------------------------------ keys before the body
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/species/Naja_naja/references"),
                                              ("DELETE", "/v1/references/1"),
                                              ("POST", "/v1/identify"), ("POST", "/v1/search")])
@pytest.mark.parametrize("key", [None, b"wrong"])
def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(method, path, key):
    """Writes (and reads with SPECIESID_READS_REQUIRE_KEY) without the key: a 401 from the guard, the body never
    received. Without it the app's own key check answered only after the whole upload (writes have no deadline and
    no receiving cap: keyless clients could hold memory and temporary files)."""
    headers = FORM + ([(b"x-api-key", key)] if key else [])
    sent, received = refused_unread(stand_in_app(reads_require_key=True), method, path, headers)
    assert sent.status == 401, sent.body
    assert sent.detail == "missing or wrong X-API-Key"
    assert received == []


def test_a_key_is_accepted_whichever_of_the_configured_keys_it_is():
    """Keys rotate: an old one and a new one are valid together (SPECIESID_API_KEYS)."""
    from api.guard import key_ok, key_refusal

    keys = ["a", "b", "c"]
    assert all(key_ok(k, keys) for k in keys)
    assert not any(key_ok(k, keys) for k in ["", None, "ab", "d", "A"])
    assert [key_refusal(k, keys, "write") for k in ["a", "b", "c", "ab"]] == [None, None, None,
                                                                            "missing or wrong X-API-Key"]
    assert key_refusal("a", [], "write") == "writes are disabled: no SPECIESID_API_KEYS configured"


def test_a_refused_key_leaves_one_warning_naming_the_request_never_the_key(monkeypatch, caplog):
    """Walk s56-logs #5: a write refused for a missing or wrong key (401) left no log line at the default level.
    Now a WARNING naming the request, its client and why, never the key; at most once a minute, with the count."""
    import api.guard as guard

    clock = [1000.0]
    monkeypatch.setattr(guard.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(guard, "_REFUSALS", guard._Refusals())
    app = stand_in_app()
    refused = [(b"x-api-key", b"s3cretKEY-guess-1")]
    with caplog.at_level(logging.WARNING, logger="api.guard"):
        for headers in (refused, refused, []):
            sent = _run_app(app, "/v1/species/Naja%20naja/references", headers, [{"type": "http.request"}])
            assert sent.status == 401
            clock[0] += 1.0
        clock[0] += guard.REFUSAL_LOG_EVERY_S
        _run_app(app, "/v1/species/Naja%20naja/references", [], [{"type": "http.request"}])
    lines = [r.getMessage() for r in caplog.records if r.name == "api.guard"]
    assert lines == [
        "refused a write with 401 (a wrong X-API-Key): POST /v1/species/Naja%20naja/references from c; said at most "
        "once per 60 s",
        "refused a write with 401 (no X-API-Key): POST /v1/species/Naja%20naja/references from c; 2 more refused "
        "since the last such line; said at most once per 60 s"], lines
    assert "s3cretKEY" not in caplog.text


# ------------------------------------------------------------------------------------ behind a root path
#: The prefix a proxy mounts the app under (``speciesid serve --root-path /api``): uvicorn puts it in front of the
#: path it received, Starlette 1.x routes on the path without it.
ROOT = "/api"


@pytest.mark.parametrize(("method", "path", "route"), [
    ("POST", "/v1/species/Naja_naja/references", "/v1/species/{name}/references"),
    ("DELETE", "/v1/references/1", "/v1/references/{ref_id}"),
    ("PUT", "/v1/species/Naja_naja/venomous", "/v1/species/{name}/venomous"),
    ("POST", "/v1/identify", "/v1/identify"), ("POST", "/v1/search", "/v1/search")])
def test_behind_a_root_path_a_request_without_a_key_is_refused_before_its_body_is_read(method, path, route):
    """s57: the guard matched its routes on scope["path"], which holds the root_path: behind ``--root-path`` every
    write (and a read with SPECIESID_READS_REQUIRE_KEY) passed it. The three with a body to read (the add, the PUT
    of venom, identify) had it read before the route's own 401. The DELETE and the search passed on the old code too
    (their route's 401 came before any read, the label from the route): regression guards (s57 re-read #7)."""
    app = stand_in_app(reads_require_key=True)
    sent, received = refused_unread(app, method, ROOT + path, FORM, root_path=ROOT)
    assert (sent.status, sent.detail, received) == (401, "missing or wrong X-API-Key", [])
    assert app.state.metrics.requests.labels(method, route, "401")._value.get() == 1  # the route's label


def _guarded(**settings):
    """The guard in front of :func:`body_size_app` (its 200 says the body's size), keys ``k``, Retry-After 1 s;
    ``settings`` add to or override those."""
    from api.guard import EdgeGuard
    from api.settings import Settings

    return EdgeGuard(body_size_app, Settings(**{"index": "nowhere", "api_keys": "k", "retry_after_s": 1,
                                                "retry_jitter_s": 0, **settings}))


def _answered(app, path: str, headers, messages, root_path: str) -> tuple[int | None, str]:
    """The status and the detail (or the body) of ``POST path`` behind ``root_path`` ("": none)."""
    sent = _run_app(app, root_path + path, headers, messages, root_path)
    return sent.status, sent.body.decode()


@pytest.mark.parametrize(("path", "headers", "size"), [
    ("/v1/identify", [(b"content-length", b"%d" % (120 * MB))], None),  # over 5 photos x 20 MB + 1 MB
    ("/v1/species/Naja_naja/references", [(b"x-api-key", b"k"), (b"content-length", b"%d" % (300 * MB))], None),
    ("/v1/identify", [], 3 * MB),  # within identify's limit, over the 1 MB of a route without photos
    ("/v1/species/Naja_naja/references", [(b"x-api-key", b"k")], 3 * MB),
])
def test_behind_a_root_path_each_route_has_its_own_body_limit(path, headers, size):
    """s57: behind a root_path every route got the 1 MB limit of a route without photos: an identify of one 3 MB
    photo was a 413, and a body over a route's own limit was told about "a route without photos"."""
    messages = [{"type": "http.request", "body": _photo_body(size) if size else b"", "more_body": False}]
    plain = _answered(_guarded(), path, FORM + headers, messages, "")
    behind = _answered(_guarded(), path, FORM + headers, messages, ROOT)
    assert behind == plain, (behind, plain)
    if size:
        assert json.loads(behind[1]) == {"size": len(messages[0]["body"])}
    else:
        assert behind[0] == 413 and "a route without photos" not in behind[1], behind


def test_behind_a_root_path_identify_is_shed_when_the_slots_are_full():
    """s57: behind a root_path an identify took no slot and was never shed (a 429) however many ran."""
    guard = _guarded(max_identify_in_flight=1)
    guard._in_flight = 1  # every slot taken
    sent, received = refused_unread(guard, "POST", ROOT + "/v1/identify", FORM, root_path=ROOT)
    assert (sent.status, sent.detail, received) == (429, "busy: 1 identification in progress; retry in 1 s", [])
    assert guard.shed == 1


def test_behind_a_root_path_a_refused_key_is_logged_with_the_path_as_sent(monkeypatch, caplog):
    """s57: behind a root_path a write without its key passed the guard, which logs the 401s: none was logged."""
    import api.guard as guard

    monkeypatch.setattr(guard, "_REFUSALS", guard._Refusals())
    with caplog.at_level(logging.WARNING, logger="api.guard"):
        sent = _run_app(stand_in_app(), ROOT + "/v1/species/Naja_naja/references", [], [{"type": "http.request"}],
                        ROOT)
    assert sent.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "api.guard"]
    assert lines == ["refused a write with 401 (no X-API-Key): POST /api/v1/species/Naja_naja/references from c; "
                     "said at most once per 60 s"], lines


@pytest.mark.parametrize(("path", "root"), [
    ("/v1/identify", "/api"), ("/api", "/api"), ("/api/", "/api"), ("/apiv1/identify", "/api"),
    ("/api/v1/identify", "/api/"), ("/api//v1/identify", "/api/"), ("/v1/identify", "/v"), ("/v/v1/x", "/v"),
    ("/v1/identify", ""), ("", "")])
def test_the_path_routes_are_matched_on_is_starlettes(path, root):
    """s57: the guard, the stop's log and the app's hints take the path without its root_path as Starlette's router
    does: the root stripped only where it ends at a "/" (``/v`` is no prefix of ``/v1/identify``), a path that does
    not start with it taken as it is (a server that did not put it in front)."""
    from starlette._utils import get_route_path

    from api.guard import route_path

    scope = {"path": path, "root_path": root}
    assert route_path(scope) == get_route_path(scope)


@pytest.mark.parametrize(("path", "status"), [("/v1/species/Naja_naja/references", 401), ("/api", 404),
                                              ("/apiv1/identify", 404), ("/api/", 405)])
def test_behind_a_root_path_a_path_without_it_is_routed_and_guarded_as_it_is(path, status):
    """s57: a path that does not start with the root_path (a server that did not put it in front) is routed as it
    is, so guarded as it is: a write without its key is a 401 unread; a path no route serves, a 404, no crash (the
    root itself: ``/api/`` is the page's ``/``, which takes no POST)."""
    sent, received = refused_unread(stand_in_app(), "POST", path, FORM, root_path=ROOT)
    assert sent.status == status, sent.body
    if status == 401:
        assert received == []


def test_behind_uvicorns_root_path_a_write_without_a_key_is_refused_before_its_body_is_sent():
    """s57, on a real server: uvicorn's ``--root-path /api`` puts the prefix in front of the path it received, as
    the scopes above do; a write without its key is answered while its body is still to come."""
    from _api_support import serving

    with serving(stand_in_app(), lifespan="off", root_path=ROOT) as port, \
            socket.create_connection(("127.0.0.1", port), timeout=BLOCKED_S) as conn:
        conn.sendall(b"POST /v1/species/Naja_naja/references HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                     b"form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n")  # then nothing more
        reply = b""
        while not reply.endswith(b"}") and (got := conn.recv(4096)):  # a timeout here fails the test: the server
            reply += got  # waited for the body
    assert reply.startswith(b"HTTP/1.1 401"), reply[:200]
    assert reply.endswith(b'{"detail":"missing or wrong X-API-Key"}'), reply
