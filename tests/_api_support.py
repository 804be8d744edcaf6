"""Shared helpers of the HTTP API tests: a small real gallery, photos in every format, a free port.

The gallery holds ``PER_SPECIES`` train photos of each of ``SPECIES`` (ph-snakes, symlinked into tmp,
never copied into the repo), embedded with the real MobileNetV1 weights. It is built once per test
process and copied for each app that writes to it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from conftest import MOBILENET_SPEC, PH_SNAKES, needs_shared

if TYPE_CHECKING:
    import uvicorn

SPECIES = (
    "Philippine Cobra (Naja philippinensis)",
    "Samar Cobra (Naja samarensis)",
    "Asian Sunbeam Snake (Xenopeltis unicolor)",
    "Red-tailed Green Ratsnake (Gonyosoma oxycephalum)",
)
#: Not in the gallery: added through POST /v1/species/{name}/references by the tests.
NEW_SPECIES = "Variable Reed Snake (Calamaria lumbricoidea)"
PER_SPECIES = 10
API_KEY = "secret"
#: A val photo the small gallery identifies as Naja philippinensis with a score of ~1 (venomous).
COBRA = PH_SNAKES / "val" / SPECIES[0] / "philippine_cobra__naja_philippinensis__val_0003.jpg"

_BASE: dict[str, Path] = {}


def binomial(folder: str) -> str:
    """'Samar Cobra (Naja samarensis)' -> 'Naja samarensis'."""
    return folder.split("(")[1].rstrip(")")


def photos(split: str, folder: str, n: int | None = None) -> list[Path]:
    """The first ``n`` photos of one ph-snakes species folder, sorted."""
    return sorted((PH_SNAKES / split / folder).iterdir())[:n]


def base_gallery(tmp_path_factory) -> Path:
    """Build (once per process) the small MobileNetV1 gallery; callers must not write to it."""
    if "dir" in _BASE:
        return _BASE["dir"]
    needs_shared()
    from retrieval.encoders import EncoderConfig
    from retrieval.workflows import build_gallery

    root = tmp_path_factory.mktemp("api_photos")
    for folder in SPECIES:
        (root / folder).mkdir()
        for f in photos("train", folder, PER_SPECIES):
            os.symlink(f, root / folder / f.name)
    index = tmp_path_factory.mktemp("api_gallery") / "g"
    build_gallery(index, "folder", root, encoder=EncoderConfig(spec=MOBILENET_SPEC, precision="fp32"), progress=False)
    _BASE["dir"] = index
    return index


def gallery_copy(tmp_path_factory, name: str) -> Path:
    """A private, writable copy of the base gallery."""
    dest = tmp_path_factory.mktemp(name) / "g"
    shutil.copytree(base_gallery(tmp_path_factory), dest, symlinks=True)
    return dest


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def body_size_app(scope, receive, send) -> None:
    """A stand-in ASGI app: reads its whole body and answers 200 with its size (what a route does before its work);
    answers a lifespan's startup and shutdown, for a real uvicorn."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"size": size}).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def serving(app, wait_s: float = 20.0, make: Callable[[uvicorn.Config], uvicorn.Server] | None = None,
            **config) -> Iterator[int]:
    """``app`` in a real uvicorn on 127.0.0.1 (a thread), its port yielded; stopped on the way out. ``make``: builds
    the server from its ``uvicorn.Config`` (default ``uvicorn.Server``)."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = (make or uvicorn.Server)(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                     **config))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + wait_s
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(20)


def encode_as(path: Path, fmt: str, **save_kw) -> bytes:
    """A photo re-encoded in another format (JPEG, PNG, WEBP, HEIF)."""
    from PIL import Image

    if fmt == "HEIF":
        from pillow_heif import register_heif_opener

        register_heif_opener()
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, fmt, **save_kw)
    return buf.getvalue()


def png_bomb(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's signature)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    # IHDR chunk: 8-byte signature, 4-byte length, b"IHDR", then width, height, ... and a CRC over type+data
    start = 8 + 4
    ihdr = bytearray(data[start : start + 4 + 13])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[start : start + 17] = ihdr
    data[start + 17 : start + 21] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


@contextmanager
def store_client(tmp_path_factory, name: str) -> Iterator:
    """A TestClient of a server on a copy of the module's gallery (``name``) that looks at its store on every read
    (``refresh_s=0``: each request meets what the store does now) and answers a server error as a 500."""
    from fastapi.testclient import TestClient

    from api.app import create_app
    from api.settings import Settings

    index = gallery_copy(tmp_path_factory, name)
    app = create_app(Settings(index=str(index), api_keys=API_KEY, precision="fp32", refresh_s=0.0))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


#: The header of a JSON body.
JSON = [(b"content-type", b"application/json")]


def http_scope(path: str, headers: list[tuple[bytes, bytes]], root_path: str = "") -> dict:
    """An ASGI ``POST path`` request's scope with ``headers``; ``root_path``: the prefix a proxy mounts the app
    under, which ``path`` holds as uvicorn's ``--root-path`` gives it (``/api`` + ``/v1/identify``)."""
    return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": headers, "http_version": "1.1", "scheme": "http", "server": ("t", 80), "client": ("c", 1),
            "root_path": root_path}


class Sent:
    """What an app sent: its status, headers and body."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body = b""

    async def __call__(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status, self.headers = message["status"], dict(message.get("headers", []))
        else:
            self.body += message.get("body", b"")

    @property
    def detail(self) -> str:
        return json.loads(self.body)["detail"]


def stand_in_app(**settings):
    """The app with a stand-in service no request reaches (the body is refused, or the route fails)."""
    from api.app import create_app
    from api.settings import Settings

    return create_app(Settings(index="nowhere", api_keys="k", **settings), service=SimpleNamespace())


def refused_unread(app, method: str, path: str, headers, root_path: str = "") -> tuple[Sent, list[str]]:
    """``method path`` sent to ``app`` by a client whose body never ends (each receive recorded, then a
    disconnect): what it answered, and the receives it was asked for (``root_path``: as :func:`http_scope`'s)."""
    sent, received = Sent(), []

    async def receive() -> dict:
        received.append("receive")  # none may come: the key is checked before a byte of the body is read
        if len(received) == 1:
            return {"type": "http.request", "body": b"--xyz\r\n" + b"x" * 1000, "more_body": True}
        return {"type": "http.disconnect"}

    scope = dict(http_scope(path, headers, root_path), method=method)
    asyncio.run(app(scope, receive, sent))
    return sent, received
