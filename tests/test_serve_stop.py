"""``serve``'s stop (soak walk, stop 54): a stalled upload held a SIGTERM for SPECIESID_BODY_TIMEOUT_S (120 s) without
a word in the log. Now the stop lets requests finish for SPECIESID_SHUTDOWN_GRACE_S, then cuts what is left (an
upload still arriving), never an add that is committing, and logs when it begins, what is in flight and how it ended.

A real uvicorn on a thread (``_api_support.serving``): its stop is the one a signal starts (``should_exit``).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

import httpx
import pytest
import uvicorn
from _api_support import API_KEY, SPECIES, body_size_app, gallery_copy, photos, serving
from conftest import until

from api.server import GracefulServer, graceful_server
from api.settings import Settings


def _stalled_upload(port: int) -> socket.socket:
    """An identify request that announces 200,000 bytes, sends half and stops."""
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"POST /v1/identify HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
              b"Content-Length: 200000\r\n\r\n" + b"x" * 100_000)
    return s


def _recording() -> tuple[list[GracefulServer], Callable[[uvicorn.Config], GracefulServer]]:
    """A ``make`` for :func:`_api_support.serving` that keeps the server it builds (the test stops it as a signal
    does), and the list it keeps it in."""
    servers: list[GracefulServer] = []

    def make(config: uvicorn.Config) -> GracefulServer:
        servers.append(GracefulServer(config))
        return servers[-1]

    return servers, make


def test_a_stalled_upload_is_cut_at_the_grace_limit_and_the_stop_is_logged(caplog):
    servers, make = _recording()
    assert graceful_server(body_size_app, Settings()).config.timeout_graceful_shutdown == 25.0  # the default
    with caplog.at_level(logging.WARNING, logger="api.server"):
        with serving(body_size_app, make=make, timeout_graceful_shutdown=0.5) as port:
            client = _stalled_upload(port)
            until(lambda: servers[0].in_flight.describe() != "no request in flight", "the upload in flight")
            servers[0].should_exit = True  # what SIGTERM does; the block's end waits for the stop (20 s at most)
        answer = client.recv(65536).decode()
        client.close()
    assert answer.startswith("HTTP/1.1 503") and "body was still arriving" in answer  # said, not a dropped line
    lines = [r.getMessage() for r in caplog.records if r.name == "api.server"]
    assert lines[0].startswith("stopping: no new connections; 1 request in flight: 1 upload still arriving, given "
                               "up to 0.5 s (SPECIESID_SHUTDOWN_GRACE_S) to finish"), lines
    # the stop ended, the stalled upload cut (with no grace it waits for the body as long as the client holds it)
    assert lines[-1].startswith("stopped after ") and lines[-1].endswith(
        "s: at the grace limit: 1 upload still arriving cut"), lines


def test_an_idle_stop_says_it_and_that_every_request_finished(caplog):
    with caplog.at_level(logging.WARNING, logger="api.server"):
        with serving(body_size_app, make=GracefulServer, timeout_graceful_shutdown=5) as port:
            assert httpx.post(f"http://127.0.0.1:{port}/v1/identify", content=b"abc").json() == {"size": 3}
    lines = [r.getMessage() for r in caplog.records if r.name == "api.server"]
    assert "stopping: no new connections; no request in flight, given up to 5 s" in lines[0]
    assert lines[-1].endswith("s: every request in flight finished")


def test_an_add_committing_when_the_grace_ends_is_finished_not_cut_and_no_write_starts_after(
        tmp_path_factory, monkeypatch, caplog):
    from api import service as service_module
    from api.app import create_app
    from api.service import STOPPING, ServiceError
    from index.gallery import Gallery

    index = gallery_copy(tmp_path_factory, "stop_mid_add")
    before = len(Gallery.open(index))
    real = service_module.workflows.add_photos
    inside, release = threading.Event(), threading.Event()

    def slow_add(*args, **kwargs):  # the add's store steps, held until the stop waits for them
        inside.set()
        release.wait(120)
        return real(*args, **kwargs)

    monkeypatch.setattr(service_module.workflows, "add_photos", slow_add)
    settings = Settings(index=str(index), precision="fp32", api_keys=API_KEY, shutdown_grace_s=0.2)
    app = create_app(settings)
    servers, make = _recording()

    added: dict[str, object] = {}
    new = photos("train", SPECIES[0])[10:12]

    def add(port: int) -> None:
        files = [("images", (p.name, p.read_bytes(), "image/jpeg")) for p in new]
        try:
            added["response"] = httpx.post(f"http://127.0.0.1:{port}/v1/species/Naja_philippinensis/references",
                                           files=files, headers={"X-API-Key": API_KEY}, timeout=300)
        except httpx.HTTPError as exc:  # the answer is not sent: its work was not cut
            added["error"] = exc

    with caplog.at_level(logging.WARNING):
        with serving(app, wait_s=300, make=make, timeout_graceful_shutdown=settings.shutdown_grace_s) as port:
            until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, "/readyz ready")
            service = app.state.service
            thread = threading.Thread(target=add, args=(port,))
            thread.start()
            assert inside.wait(120)  # its body received, its photos embedded, in its write
            servers[0].should_exit = True
            # past the grace, the app's shutdown waits for the write, which then commits
            until(lambda: "waiting for this server's write in progress" in caplog.text, "the stop's wait logged")
            release.set()
        thread.join(60)
    assert len(Gallery.open(index)) == before + 2  # committed whole, while the server stopped
    with pytest.raises(ServiceError, match="the server is stopping: nothing of this request was written") as exc:
        with service._writing():  # noqa: SLF001 - what a write that reached its turn after the stop meets
            pass
    assert exc.value.status == 503 and str(exc.value) == STOPPING


def test_a_delete_in_flight_at_the_stop_is_no_upload_and_the_log_waits_for_its_cut(tmp_path_factory, monkeypatch,
                                                                                    caplog):
    """Re-read of stop 54 (findings 2, 3): a DELETE in flight was called "an upload still arriving" (its client told
    "nothing of it was used" though it was committed), and the stop's last line said "every request in flight
    finished" before the cut one's cancel arrived. Now it is a write (add, delete or set-venom), answered as a
    write whose answer was not sent, and the last line comes after that cut and names it."""
    from api import service as service_module
    from api.app import create_app
    from api.server import CUT_ANSWER
    from index.gallery import Gallery

    index = gallery_copy(tmp_path_factory, "stop_mid_delete")
    rid = int(Gallery.open(index).index.ids[0])
    real = service_module.workflows.delete_references
    inside, release = threading.Event(), threading.Event()

    def slow_delete(*args, **kwargs):  # committed, then held (in its write) until the stop waits for it
        out = real(*args, **kwargs)
        inside.set()
        release.wait(120)
        return out

    monkeypatch.setattr(service_module.workflows, "delete_references", slow_delete)
    app = create_app(Settings(index=str(index), precision="fp32", api_keys=API_KEY, shutdown_grace_s=0.2))
    servers, make = _recording()
    got: dict[str, object] = {}

    def delete(port: int) -> None:
        got["response"] = httpx.delete(f"http://127.0.0.1:{port}/v1/references/{rid}",
                                       headers={"X-API-Key": API_KEY}, timeout=300)

    with caplog.at_level(logging.WARNING):
        with serving(app, wait_s=300, make=make, timeout_graceful_shutdown=0.2) as port:
            until(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200, "the server ready")
            thread = threading.Thread(target=delete, args=(port,))
            thread.start()
            assert inside.wait(120)
            assert servers[0].in_flight.describe() == "1 request in flight: 1 add, delete or set-venom"
            servers[0].should_exit = True
            until(lambda: "waiting for this server's write in progress" in caplog.text, "the stop waiting")  # grace
            release.set()
        thread.join(60)
    assert rid not in set(Gallery.open(index).index.ids.tolist())  # committed
    response = got["response"]
    assert response.status_code == 503 and response.json()["detail"] == CUT_ANSWER
    lines = [r.getMessage() for r in caplog.records if r.name == "api.server"]
    assert "1 request in flight: 1 add, delete or set-venom, given up to 0.2 s" in lines[0], lines
    assert lines[-1].startswith("stopped after ") and lines[-1].endswith(
        "s: at the grace limit: 1 answer(s) not sent (1 add, delete or set-venom; their work, on a worker thread, "
        "was not cut)"), lines


def test_the_stops_last_line_waits_for_a_cancel_that_arrives_after_the_apps_shutdown(monkeypatch, caplog):
    """A request cut while its route ran on a worker thread gets its cancel only when that thread returns (anyio
    holds it back), after the app's shutdown: the last line was written before it, "every request in flight
    finished". Now it waits for it (the cancel here arrives on the loop's next turn after uvicorn's shutdown)."""
    import asyncio

    import uvicorn

    server = GracefulServer(uvicorn.Config(body_size_app, timeout_graceful_shutdown=0.1))
    gate = asyncio.Event()
    sent: list[dict] = []

    async def held(scope, receive, send):  # its route's thread returns when the gate opens: the cancel arrives
        await receive()  # its body is in
        await gate.wait()
        raise asyncio.CancelledError

    async def uvicorn_shutdown(self, sockets=None):  # uvicorn's stop, done: the cancel is still held back
        asyncio.get_running_loop().call_soon(gate.set)

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def stop() -> None:
        server.in_flight.app = held
        scope = {"type": "http", "method": "POST", "path": "/v1/identify", "headers": []}
        task = asyncio.create_task(server.in_flight(scope, receive, send))
        server.server_state.tasks.add(task)
        task.add_done_callback(server.server_state.tasks.discard)
        await asyncio.sleep(0)  # the request is in flight
        await server.shutdown()

    monkeypatch.setattr(uvicorn.Server, "shutdown", uvicorn_shutdown)
    with caplog.at_level(logging.WARNING, logger="api.server"):
        asyncio.run(stop())
    lines = [r.getMessage() for r in caplog.records if r.name == "api.server"]
    assert lines[-1].endswith("s: at the grace limit: 1 answer(s) not sent (1 identify or search; their work, on a "
                              "worker thread, was not cut)"), lines
    assert sent and sent[0]["status"] == 503


@pytest.mark.parametrize("root", ["", "/api"])
def test_a_set_venom_put_is_an_upload_until_its_body_is_in_then_named_as_the_write_it_is(root):
    """s56 re-read api #9: a PUT's body was never counted as still arriving (only a POST's), and a set-venom in
    flight was called "add or delete" in the stop's log. An app that reads the body in two chunks, asked for
    between them. s57: behind a root_path (``root``, which the path holds) too: there it was "1 other"."""
    import asyncio

    from api.server import InFlight

    said: list[str] = []
    chunks = [{"type": "http.request", "body": b'{"venomous"', "more_body": True},
              {"type": "http.request", "body": b": true}", "more_body": False}]

    async def app(scope, receive, send) -> None:
        await receive()
        said.append(flight.describe())
        await receive()
        said.append(flight.describe())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive():
        return chunks.pop(0)

    async def send(message) -> None:
        pass

    flight = InFlight(app)
    scope = {"type": "http", "method": "PUT", "path": root + "/v1/species/Bufo_bufo/venomous", "root_path": root,
             "headers": []}
    asyncio.run(flight(scope, receive, send))
    assert said == ["1 request in flight: 1 upload still arriving", "1 request in flight: 1 add, delete or set-venom"]


@pytest.mark.parametrize(("given", "root_path"), [([], ""), (["--root-path", "/api/"], "/api")])
def test_serve_passes_its_root_path_to_uvicorn(monkeypatch, tmp_path, given, root_path):
    """s57 re-read #2: the root-path fix served a setup ``speciesid serve`` could not be run in (uvicorn's
    ``root_path``, which serve never set). ``--root-path`` is passed on to uvicorn's config, without a last slash."""
    import api.cli.serve as serve_cli
    import api.server
    import index.gallery
    from api.cli import main

    configs: list[dict] = []

    class Started:
        started = True

        def run(self, sockets) -> None:
            for sock in sockets:
                sock.close()

    def fake_server(app, settings, **config) -> Started:
        configs.append(config)
        return Started()

    monkeypatch.setattr(api.server, "graceful_server", fake_server)
    monkeypatch.setattr(index.gallery, "read_gallery_info", lambda index: None)
    monkeypatch.setattr(serve_cli, "listening_socket", lambda host, port: socket.create_server((host, 0)))
    assert main(["serve", "--index", str(tmp_path), *given]) == 0
    assert [c["root_path"] for c in configs] == [root_path]
