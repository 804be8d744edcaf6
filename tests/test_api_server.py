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
    proc, url = start_server(index, log)
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

        metrics = http.get("/metrics").text
        assert 'speciesid_requests_total{method="POST",route="/v1/identify",status="200"}' in metrics
        assert f"speciesid_gallery_references {float(len(SPECIES) * PER_SPECIES + PER_SPECIES)}" in metrics
