"""Hostile input at the edge (the s53 hostile walk): a reference photo's file swapped for a FIFO, a device or a
huge file is refused unread; a slow client holds no identify slot and is cut at SPECIESID_BODY_TIMEOUT_S; a
multipart body cut short is a 400. No model is loaded here: the guard is served in front of a stand-in app, and
files are read through ``index.sources``. No test reads /dev/zero or a FIFO without a bound: each read that could
block runs in a thread with a timeout, and the FIFO is opened for writing at the end, which ends any read of it."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

#: How long a read that should return at once may take before it counts as blocked (generous: a loaded machine).
BLOCKED_S = 10


def _unblock(fifo) -> None:
    """End any read blocked on ``fifo``: a writer that opens it and closes it at once (EOF)."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # no reader: nothing blocked
        return
    os.close(fd)


def _in_thread(fn):
    """``fn()`` in a daemon thread, joined for :data:`BLOCKED_S` at most: (finished, its result or exception)."""
    out: list = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BLOCKED_S)
    return (not thread.is_alive()), (out[0] if out else None)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_device_named_as_a_photo_is_refused_at_once_unread(tmp_path):
    from index.sources import read_source

    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)
    try:
        finished, result = _in_thread(lambda: read_source(fifo))
    finally:
        _unblock(fifo)
    assert finished, "reading a FIFO named as a photo blocked"
    assert isinstance(result, OSError) and "not a regular file (a named pipe (FIFO))" in str(result), result
    from index.sources import NotRegularFile

    device = tmp_path / "zero.jpg"
    device.symlink_to("/dev/zero")  # refused from its stat: never opened, so never read (only behind the fix)
    with pytest.raises(NotRegularFile, match="a device"):
        read_source(device)


def test_a_file_over_the_byte_limit_is_refused_from_its_size_and_a_non_photo_said_so(tmp_path, monkeypatch):
    import index.sources
    from index.sources import NotAPhotoFile, PhotoTooLarge, read_source
    from retrieval.pipeline import prepare

    monkeypatch.setattr(index.sources, "MAX_PHOTO_BYTES", 4096)  # the library's limit, small here
    video = tmp_path / "clip.jpg"  # a video named .jpg: zeros, no photo's signature
    with video.open("wb") as fh:
        fh.truncate(64 * 1024)
    with pytest.raises(NotAPhotoFile, match=r"not a photo: its content is not JPEG.*its 0\.1 MB were not read"):
        read_source(video)
    big = tmp_path / "big.jpg"  # a JPEG's signature, over the limit
    big.write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 8192)
    with pytest.raises(PhotoTooLarge, match="too large: 0.0 MB, over the 0.0 MB a photo file may have"):
        read_source(big)
    with pytest.raises(PhotoTooLarge, match=r"\(SPECIESID_MAX_UPLOAD_MB\)"):
        read_source(big, limit=100, setting="SPECIESID_MAX_UPLOAD_MB")
    assert read_source(big, limit=8196) == big.read_bytes()  # at the limit: read whole
    # the CLI's reader (identify, references add, index build) reports it in those words, without reading it whole
    said = prepare(0, video, encoder=None)  # type: ignore[arg-type] - refused before any model is needed
    assert said.error is not None and said.error.startswith("not a photo") and "were not read" in said.error


def test_megabytes_is_one_unit_for_every_size():
    from index.sources import megabytes

    assert megabytes(62_914_560) == "60.0 MB"  # what the walk's big60.bin was told as 62.9 MB on identify


# ------------------------------------------------------------------------------- the guard, served for real
@pytest.fixture()
def guarded():
    """The edge guard (one identify slot, a 2 s body deadline) in front of the stand-in, in a real uvicorn."""
    from _api_support import body_size_app, serving

    from api.guard import EdgeGuard
    from api.settings import Settings

    settings = Settings(index="nowhere", max_identify_in_flight=1, body_timeout_s=2.0)
    with serving(EdgeGuard(body_size_app, settings)) as port:
        yield port


_BODY = (b'--xyz\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n'
         b"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff" + b"x" * 100 + b"\r\n--xyz--\r\n")


def test_a_slow_client_holds_no_identify_slot_and_is_cut_at_the_body_deadline(guarded):
    import httpx

    slow = socket.create_connection(("127.0.0.1", guarded), timeout=BLOCKED_S)
    try:
        slow.sendall(b"POST /v1/identify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
                     b"Content-Length: 1000000\r\n\r\n" + _BODY[:20])  # then a byte now and then, never the rest
        stop = threading.Event()

        def dribble() -> None:
            for byte in _BODY[20:60]:
                if stop.wait(0.2):
                    return
                try:
                    slow.sendall(bytes([byte]))
                except OSError:  # the server closed it (the 408)
                    return

        sender = threading.Thread(target=dribble, daemon=True)
        sender.start()
        time.sleep(0.3)  # the slow client's request is under way
        headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
        other = httpx.post(f"http://127.0.0.1:{guarded}/v1/identify", content=_BODY, headers=headers,
                           timeout=BLOCKED_S)
        answered_while_slow = sender.is_alive()
        assert other.status_code == 200, other.text  # served: the slow client holds no slot (was a 429)
        assert other.json() == {"size": len(_BODY)}
        assert answered_while_slow  # it did not wait for the slow client
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            got = slow.recv(4096)  # the 408 comes at the deadline (2 s here); the socket's timeout bounds the wait
            if not got:
                break
            reply += got
        stop.set()
    finally:
        slow.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply[:300]
    detail = json.loads(body)["detail"]
    assert "not received within 2 s (SPECIESID_BODY_TIMEOUT_S)" in detail and "faster connection" in detail


# ------------------------------------------------------------------------------- answers worded at the edge
@pytest.fixture()
def client():
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    return TestClient(create_app(Settings(index="nowhere", api_keys="k")))  # no lifespan: no model


_CUT = _BODY[: _BODY.index(b"\r\n--xyz--")]  # the photo's part, its closing boundary never sent


def test_a_multipart_body_cut_short_is_a_400_saying_so_on_every_photo_route():
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    # a stand-in service (never used: the body is refused first); search reads its body after its dependencies
    client = TestClient(create_app(Settings(index="nowhere", api_keys="k"), service=SimpleNamespace()))
    headers = {"Content-Type": "multipart/form-data; boundary=xyz", "X-API-Key": "k"}
    for route in ("/v1/identify", "/v1/search", "/v1/species/Naja_haje/references"):
        body = _CUT.replace(b'name="images"', b'name="image"') if route == "/v1/search" else _CUT
        for cut in (body, body + b"\r\n--xyz\r\n"):  # within a part, or its closing boundary without its "--"
            resp = client.post(route, content=cut, headers=headers)
            assert resp.status_code == 400, (route, resp.text)
            assert resp.json()["detail"].startswith("the multipart body cannot be read (cut short: it ends before "
                                                    "its closing boundary)"), resp.text
    wrong = client.post("/v1/identify", content=_BODY.replace(b"xyz", b"abc"), headers=headers)
    assert wrong.status_code == 400 and "no part begins with the boundary 'xyz'" in wrong.json()["detail"]


def test_the_parsers_own_limits_are_said_in_the_apis_words(client):
    many = [("images", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(1001)]
    resp = client.post("/v1/identify", files=many)
    assert resp.status_code == 400 and resp.json()["detail"] == ("at most 5 photos per request; this one holds over "
                                                                 "1000 files")
    long_name = client.post("/v1/identify", files=[("images", ("a" * 10_000 + ".jpg", b"x", "image/jpeg"))])
    assert long_name.status_code == 400
    assert "a part's header is over 4,224 bytes: a file name that long? send a shorter one" in \
        long_name.json()["detail"]


def test_a_json_body_over_the_limit_is_told_about_json_in_one_unit(client):
    body = b"x" * 62_914_560
    resp = client.post("/v1/search", content=body, headers={"Content-Type": "application/json"})
    detail = resp.json()["detail"]
    assert resp.status_code == 413 and detail.startswith("JSON request body of 60.0 MB is over the 21 MB"), detail
    assert "photo" not in detail and "form" not in detail, detail
    form = client.post("/v1/search", files=[("image", ("big.bin", body, "image/jpeg"))])
    assert form.status_code == 413 and "60.0 MB" in form.json()["detail"]


def test_a_species_path_with_a_leading_slash_is_refused_for_the_slash(client):
    resp = client.get("/v1/species/%2Ftmp%2Fabs")
    assert resp.status_code == 422 and "'/'" in resp.json()["detail"], resp.text
    add = client.post("/v1/species/%2Ftmp%2Fabs/references", headers={"X-API-Key": "k"},
                      files=[("images", ("a.jpg", b"x", "image/jpeg"))])
    assert add.status_code == 422 and "'/'" in add.json()["detail"], add.text


def test_a_search_k_of_true_is_not_a_number():
    from fastapi import HTTPException

    from api.routers.identify import _search_json

    with pytest.raises(HTTPException) as info:
        _search_json(b'{"embedding": [1, 0], "k": true}', None)
    assert info.value.status_code == 422
    assert info.value.detail.endswith("k: k is a whole number of neighbours, e.g. 10, not true or false")
    assert _search_json(b'{"embedding": [1, 0]}', "3").k == 3  # ?k= from the query string, a string
