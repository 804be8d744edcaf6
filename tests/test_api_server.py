"""The HTTP API as deployed: ``speciesid serve`` in a real uvicorn process on 127.0.0.1, called with httpx."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _api_support import (
    API_KEY,
    COBRA,
    NEW_SPECIES,
    PER_SPECIES,
    SPECIES,
    binomial,
    encode_as,
    free_port,
    gallery_copy,
    photos,
)
from conftest import MOBILENET_SPEC, REPO, needs_shared

READY_TIMEOUT_S = 90


def start_server(index: Path, log: Path, **env: str) -> tuple[subprocess.Popen, str]:
    """``python -m api.cli serve`` on a free port; returns the process and its base URL once /readyz is 200."""
    import httpx

    port = free_port()
    environ = {**os.environ, "SPECIESID_API_KEYS": API_KEY, **env}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--index", str(index), "--host", "127.0.0.1",
             "--port", str(port)],
            cwd=REPO, env=environ, stdout=out, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> int:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it lingers; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    needs_shared()
    index = gallery_copy(tmp_path_factory, "api_server")
    log = index.parent / "server.log"
    # 8 identifications at once are sent below: this fixture serves them all (shedding has its own test)
    proc, url = start_server(index, log, SPECIESID_MAX_IDENTIFY_IN_FLIGHT="16")
    try:
        yield url
    finally:
        code = stop_server(proc)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal: -15 is a clean exit here
    assert code in (0, -signal.SIGTERM) and "Traceback" not in log.read_text(), log.read_text()[-3000:]


def _files(paths, field="images"):
    return [(field, (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


def test_real_server_identifies_adds_and_reports(server):
    import httpx

    with httpx.Client(base_url=server, timeout=60) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        assert ready["references"] == len(SPECIES) * PER_SPECIES and ready["encoder"] == MOBILENET_SPEC
        assert 'id="identify-button"' in http.get("/").text

        resp = http.post("/v1/identify", files=_files([COBRA]), params={"k": 3})
        assert resp.status_code == 200, resp.text
        best = resp.json()["results"][0]
        assert best["name"] == "Naja philippinensis" and best["venomous"] is True
        heic = http.post("/v1/identify", files=[("images", ("cobra.heic", encode_as(COBRA, "HEIF"), "image/heic"))])
        assert heic.status_code == 200 and heic.json()["results"][0]["name"] == "Naja philippinensis"
        big = http.post("/v1/identify", files=[("images", ("big.jpg", b"\xff\xd8" + b"\0" * (21 * 2**20), "x"))])
        assert big.status_code == 413 and "20 MB" in big.json()["detail"]
        bad = http.post("/v1/identify", files=[("images", ("x.jpg", b"not a photo", "image/jpeg"))])
        assert bad.status_code == 422 and "x.jpg" in bad.json()["detail"]

        # parallel identify requests over real sockets, while a new species is added
        queries = [p for f in SPECIES for p in photos("val", f, 3)]
        name = binomial(NEW_SPECIES)
        with ThreadPoolExecutor(8) as pool:
            reads = [pool.submit(http.post, "/v1/identify", files=_files([p])) for p in queries]
            write = pool.submit(http.post, f"/v1/species/{name}/references",
                                files=_files(photos("train", NEW_SPECIES, PER_SPECIES)), headers={"X-API-Key": API_KEY})
            assert all(f.result().status_code == 200 for f in reads)
            assert write.result().status_code == 201 and write.result().json()["added"] == PER_SPECIES
        assert http.post(f"/v1/species/{name}/references", files=_files([COBRA])).status_code == 401
        after = http.post("/v1/identify", files=_files([photos("val", NEW_SPECIES)[2]])).json()
        assert after["results"][0]["name"] == name

        # a client that hangs up half way through a search body: counted, and no traceback in the log (checked
        # when the fixture stops the server)
        import socket

        host, port = server.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"POST /v1/search HTTP/1.1\r\nHost: {host}\r\nContent-Length: 1000\r\n"
                         "Content-Type: application/json\r\n\r\n{\"embedding\": [0.1,".encode())
        cut = 'speciesid_requests_total{method="POST",route="/v1/search",status="400"}'
        deadline = time.monotonic() + 10
        while cut not in (metrics := http.get("/metrics").text) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cut in metrics
        assert 'speciesid_requests_total{method="POST",route="/v1/identify",status="200"}' in metrics
        assert f"speciesid_gallery_references {float(len(SPECIES) * PER_SPECIES + PER_SPECIES)}" in metrics


def _multipart_head(boundary: str, name: str = "images", filename: str = "big.jpg") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()


def _raw_request(url: str, method: str, path: str, length: int, first: bytes, headers: dict | None = None) -> bytes:
    """Send a request head announcing ``length`` body bytes and only ``first`` of them; return what the
    server answers within 10 s (it must answer without the rest of the body)."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {length}",
             "Content-Type: multipart/form-data; boundary=x", *(f"{k}: {v}" for k, v in (headers or {}).items())]
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + first)
        got = sock.recv(65536)
        # the head and the body may come in two segments: read until the announced body is all here
        while b"\r\n\r\n" in got:
            head, _, body = got.partition(b"\r\n\r\n")
            sizes = [int(x.split(b":", 1)[1]) for x in head.lower().split(b"\r\n") if x.startswith(b"content-length:")]
            if not sizes or len(body) >= sizes[0]:
                break
            more = sock.recv(65536)
            if not more:
                break
            got += more
        return got


def test_limits_keys_and_load_shedding_on_a_real_server(tmp_path_factory):
    """Keys before bodies, body limits while streaming (chunked too), 429 + Retry-After past the in-flight
    bound with writes still served, and a write by another process (the CLI) seen without a restart."""
    import httpx

    needs_shared()
    index = gallery_copy(tmp_path_factory, "api_limits")
    log = index.parent / "server.log"
    proc, url = start_server(index, log, SPECIESID_MAX_IDENTIFY_IN_FLIGHT="1", SPECIESID_MAX_ADD_IMAGES="2",
                             SPECIESID_REFRESH_S="0.5")
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            # an unauthenticated 100 MB upload to a write route: the 401 comes back while the client has sent
            # only the headers and 64 kB of the body (nothing waits for the rest)
            head = _raw_request(url, "POST", "/v1/species/Naja%20haje/references", 100 * 2**20, b"\0" * 2**16)
            assert head.startswith(b"HTTP/1.1 401") and b"X-API-Key" in head, head[:300]
            # the same for a Content-Length over the add route's limit, with a key: 413 at once
            head = _raw_request(url, "POST", "/v1/species/Naja%20haje/references", 100 * 2**20, b"\0" * 2**16,
                                {"X-API-Key": API_KEY})
            assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head, head[:300]

            # a chunked identify body (no Content-Length) over the route's limit: cut with a 413
            def big():
                yield _multipart_head("b")
                for _ in range(200):
                    yield b"\xff" * 2**20

            resp = http.post("/v1/identify", content=big(), headers={"content-type": "multipart/form-data; boundary=b"})
            assert resp.status_code == 413 and "MB this route accepts" in resp.json()["detail"]
            # a Content-Length over the add route's limit (2 photos x 20 MB): 413 at once, key or not
            resp = http.post("/v1/species/Naja haje/references", content=b"\0" * (42 * 2**20),
                             headers={"X-API-Key": API_KEY, "content-type": "multipart/form-data; boundary=x"})
            assert resp.status_code == 413 and "MB this route accepts" in resp.json()["detail"], resp.text[:300]

            # load shedding: 1 identification in flight; 6 at once -> some 429 with Retry-After, none 5xx,
            # and a write sent meanwhile completes
            with ThreadPoolExecutor(7) as pool:
                reads = [pool.submit(http.post, "/v1/identify", files=_files([COBRA])) for _ in range(6)]
                write = pool.submit(http.post, f"/v1/species/{binomial(NEW_SPECIES)}/references",
                                    files=_files(photos("train", NEW_SPECIES, 2)), headers={"X-API-Key": API_KEY})
                codes = [f.result().status_code for f in reads]
                shed = [f.result() for f in reads if f.result().status_code == 429]
                assert write.result().status_code == 201, write.result().text
            assert set(codes) <= {200, 429} and 200 in codes and shed, codes
            # Retry-After spread over 1..3 s (retry_after_s + jitter) so shed clients do not return together
            assert all(1 <= int(r.headers["retry-after"]) <= 3 and "busy" in r.json()["detail"] for r in shed)
            metrics = http.get("/metrics").text  # shed requests are counted under their route, not "unmatched"
            assert f'route="/v1/identify",status="429"}} {float(len(shed))}' in metrics, metrics[-2000:]
            assert 'route="/v1/species/{name}/references",status="413"}' in metrics

            # a reference added by another process (the CLI) is seen by the running server
            new = photos("train", "Common Wolf Snake (Lycodon capucinus)", 4)
            cli = subprocess.run(
                [sys.executable, "-m", "api.cli", "references", "add", "--index", str(index), "--species",
                 "Lycodon capucinus", *map(str, new), "-q"], cwd=REPO, capture_output=True, text=True, timeout=300)
            assert cli.returncode == 0, cli.stderr
            deadline = time.monotonic() + 10
            while True:
                names = {s["species"] for s in http.get("/v1/species").json()}
                top = http.post("/v1/identify", files=_files([new[0]])).json()
                if "Lycodon capucinus" in names and top["results"][0]["name"] == "Lycodon capucinus":
                    break
                assert time.monotonic() < deadline, (names, top)
                time.sleep(0.25)
    finally:
        stop_server(proc)


def test_serve_on_a_busy_port_exits_2_before_loading_the_model(tmp_path_factory, capsys, caplog, monkeypatch):
    import logging
    import socket

    import api.service
    from api.cli import main

    index = gallery_copy(tmp_path_factory, "busy_port")
    monkeypatch.setattr(api.service, "open_identifier", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setenv("SPECIESID_READS_REQUIRE_KEY", "true")  # and no keys: said at start-up
    monkeypatch.delenv("SPECIESID_API_KEYS", raising=False)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level(logging.WARNING, logger="speciesid"):
            code = main(["serve", "--index", str(index), "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"speciesid: error: port {port} on 127.0.0.1 is in use (another server?): choose another with --port" in err
    assert "serving" not in err  # no banner for a server that never ran
    assert "SPECIESID_READS_REQUIRE_KEY is set but no SPECIESID_API_KEYS is: every read" in caplog.text


def test_serve_on_a_gallery_whose_model_does_not_load_exits_2_with_the_loaders_one_line(tmp_path_factory, tmp_path):
    """uvicorn exits with status 3 and logs the loader's traceback when the app's startup fails: ``serve`` says the
    loader's error in one line and exits 2, as documented (the traceback only under -vv)."""
    import json

    index = gallery_copy(tmp_path_factory, "no_model")
    info = json.loads((index / "gallery.json").read_text())
    missing = tmp_path / "nomodel"
    missing.mkdir()
    info["encoder"]["spec"] = info["encoder"]["fingerprint"] = f"timm:local-dir:{missing}"
    (index / "gallery.json").write_text(json.dumps(info))
    cmd = [sys.executable, "-m", "api.cli", "serve", "--index", str(index), "--port", str(free_port())]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("speciesid: error:")]
    assert len(errors) == 1 and str(missing) in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) <= 4, done.stderr[-3000:]
    verbose = subprocess.run([*cmd, "-vv"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr, verbose.stderr[-3000:]


def test_listening_socket_refuses_a_port_held_by_a_server_still_loading():
    """A first ``serve`` holds its socket while its model loads (before uvicorn listens); a second one on that
    port is refused at the check, not after loading its own model."""
    from api.cli.serve import listening_socket

    first = listening_socket("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(ValueError, match=f"port {port} on 127.0.0.1 is in use \\(another server\\?\\): "
                                             "choose another with --port"):
            listening_socket("127.0.0.1", port).close()
    finally:
        first.close()

