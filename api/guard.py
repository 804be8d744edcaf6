"""The edge guard (pure ASGI, before the app sees a request): API keys of write routes, load shedding, body limits.

- **Keys first.** A write route (adding or deleting references) without a valid ``X-API-Key`` gets its 401
  before a byte of the body is read; so do reads when ``reads_require_key`` is set.
- **Load shedding.** At most ``max_identify_in_flight`` identify/search requests are served at once; past
  that a fast 429 with ``Retry-After``, before the body is read when the slots are full as the request arrives.
  Writes do not count against it: they have their own lane.
- **Bodies read before a slot is taken.** An identify's or search's body is received whole (held in memory up to
  :data:`SPOOL_BYTES`, then in a temporary file) before the request takes its slot, within ``body_timeout_s``
  (past it a 408): a client that sends its body slowly (a slow link, or on purpose) holds no slot, so others
  are served meanwhile. An add's body is received whole first too (no deadline: a key is needed, and writes
  hold no slot), so that a multipart body cut short is a 400 before any photo in it is looked at.
- **Body limits as the body arrives.** Each route accepts what it can use (its photos x the per-photo
  limit, capped by ``max_request_mb``): a ``Content-Length`` over it is a 413 at once, and a chunked body
  is counted as it streams and cut at the limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import random
import re
import tempfile
import threading
import time
from typing import IO

from python_multipart.multipart import parse_options_header
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.settings import Settings
from index.sources import MB, megabytes

_MB = MB
#: A body received before the app sees it is held in memory up to this many bytes, then in a temporary file: many
#: clients uploading at once cost disk, not memory.
SPOOL_BYTES = 1024 * 1024
#: Bytes handed to the app at a time when a received body is passed on.
REPLAY_CHUNK = 64 * 1024
#: (method, path pattern, kind): kind is "write", "identify" (shed under load) or "read".
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"^/v1/species/[^/]+/references/?$"), "write"),
    ("DELETE", re.compile(r"^/v1/references/[^/]+/?$"), "write"),
    ("POST", re.compile(r"^/v1/identify/?$"), "identify"),
    ("POST", re.compile(r"^/v1/search/?$"), "identify"),
)


def no_keys_message(kind: str) -> str:
    """The 401 of a request that needs a key when no SPECIESID_API_KEYS is configured (``kind``: write or a read)."""
    if kind == "write":
        return "writes are disabled: no SPECIESID_API_KEYS configured"
    return ("reads need an X-API-Key here (SPECIESID_READS_REQUIRE_KEY), but no SPECIESID_API_KEYS is configured, "
            "so none can be served: ask the server's operator")


def key_refusal(given: str | None, keys: list[str], kind: str) -> str | None:
    """The 401's message for a request of ``kind`` (write or a read) that needs a key and gave ``given``, where
    ``keys`` are configured; None when the key is accepted."""
    if not keys:
        return no_keys_message(kind)
    if not key_ok(given, keys):
        return "missing or wrong X-API-Key"
    return None


def key_ok(given: str | None, keys: list[str]) -> bool:
    """Whether ``given`` is one of ``keys`` (constant-time against every key)."""
    if not given:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given.encode(), key.encode())
    return ok


def route_photos(settings: Settings, method: str, path: str) -> int:
    """How many photos the route of ``method path`` takes in one request (0: none)."""
    if method == "POST" and path.startswith("/v1/identify"):
        return settings.max_images
    if method == "POST" and path.startswith("/v1/search"):
        return 1
    if method == "POST" and path.startswith("/v1/species/"):
        return settings.max_add_images
    return 0


def _photo_limit(settings: Settings, photos: int) -> float:
    """Bytes a route taking ``photos`` photos needs: each up to the per-photo limit, + 1 MB for the form fields
    and multipart framing."""
    return (photos * settings.max_upload_mb + 1) * _MB


def body_limit(settings: Settings, method: str, path: str) -> int:
    """Bytes the route of ``method path`` may receive."""
    return int(min(_photo_limit(settings, route_photos(settings, method, path)), settings.max_request_mb * _MB))


def body_limit_detail(settings: Settings, method: str, path: str, size: int | None = None,
                      content_type: str = "") -> str:
    """The 413 of a body over :func:`body_limit` (``size``: its Content-Length, when it announced one), naming the
    limit that applied: ``SPECIESID_MAX_REQUEST_MB`` where it caps the route, else the route's photos at
    ``SPECIESID_MAX_UPLOAD_MB`` each. The same words whether the body was refused from its Content-Length or cut
    as it streamed in; a JSON body (``content_type``, a search by embedding) is told about its JSON, not photos."""
    photos = route_photos(settings, method, path)
    limit = body_limit(settings, method, path)
    what = f"request body of {megabytes(size)} is" if size is not None else "request body"
    if content_type.lower().startswith("application/json"):
        return (f"JSON {what} over the {limit / _MB:.0f} MB this route accepts; an embedding's JSON is far smaller: "
                "send only {'embedding': [...], 'k': 10}")
    if settings.max_request_mb * _MB < _photo_limit(settings, photos):
        why = "SPECIESID_MAX_REQUEST_MB, the cap of every request's body"
    elif photos:
        why = (f"{photos} photo{'s' if photos > 1 else ''} at SPECIESID_MAX_UPLOAD_MB ({settings.max_upload_mb:g} MB) "
               "each, + 1 MB for the form")
    else:
        why = "a route without photos"
    return f"{what} over the {limit / _MB:.0f} MB this route accepts ({why})"


def body_timeout_detail(settings: Settings) -> str:
    """The 408 of a body not received within ``body_timeout_s``."""
    return (f"the request body was not received within {settings.body_timeout_s:g} s (SPECIESID_BODY_TIMEOUT_S): "
            "send fewer or smaller photos, or from a faster connection; the connection is closed")


def multipart_unreadable(reason: str) -> str:
    """The 400 of a multipart body that cannot be read, ``reason`` in brackets (the parser's, or ours)."""
    return (f"the multipart body cannot be read ({reason.rstrip('.')}): send multipart/form-data as curl -F or a "
            "browser's FormData does")


#: The reason of a multipart body that ends before its closing boundary.
CUT_SHORT = "cut short: it ends before its closing boundary"


def closing_delimiter(content_type: str) -> bytes | None:
    """The bytes that close a multipart body of ``content_type`` (CRLF, ``--``, its boundary, ``--``), None when it
    is not multipart or names no boundary (the parser refuses that itself)."""
    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        return None
    return b"\r\n--" + boundary.strip(b'"') + b"--"


class _Received:
    """A request body received whole before the app sees it: in memory up to :data:`SPOOL_BYTES`, then in a
    temporary file."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed in close()
        self.size = 0

    def close(self) -> None:
        """Drop the body (its temporary file, if any)."""
        self.file.close()


async def _receive_body(receive: Receive, limit: int, timeout: float | None, close: bytes | None
                        ) -> tuple[_Received | None, int, str]:
    """Receive a whole body: (body, 0, "") when it arrived; (None, status, reason) for an answer the caller words
    (413 over ``limit`` bytes, 408 past ``timeout`` seconds in all, 400 a multipart body without its ``close``
    delimiter, ``reason`` saying what is wrong with it); (None, 0, "") when the client left (nobody to answer)."""
    body: _Received | None = _Received()
    deadline = time.monotonic() + timeout if timeout is not None else None
    opener = close[2:-2] if close is not None else b""  # "--" and the boundary: every part begins with it
    tail, opened, closed = b"\r\n", close is None, close is None  # the body may begin with a delimiter: as if
    try:  # a CRLF came before it
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                message: Message = await (receive() if left is None else asyncio.wait_for(receive(), max(left, 0)))
            except asyncio.TimeoutError:
                return None, 408, ""
            if message["type"] == "http.disconnect":
                return None, 0, ""
            chunk = message.get("body", b"")
            body.size += len(chunk)
            if body.size > limit:
                return None, 413, ""
            body.file.write(chunk)
            if not closed and close is not None:  # the delimiters, also across two chunks
                window = tail + chunk
                opened = opened or opener in window
                closed = close in window
                tail = window[-(len(close) - 1):]
            if not message.get("more_body", False):
                break
        if not closed:
            boundary = opener[2:].decode("latin-1")
            return None, 400, CUT_SHORT if opened else (f"no part begins with the boundary {boundary!r} that its "
                                                        "Content-Type names")
        body.file.seek(0)
        done, body = body, None
        return done, 0, ""
    finally:
        if body is not None:
            body.close()


def _replay(body: _Received, receive: Receive) -> Receive:
    """A ``receive`` that hands the app ``body`` (already received), then the client's own messages (a
    disconnect)."""
    left = body.size

    async def replay() -> Message:
        nonlocal left
        if left < 0:
            return await receive()
        chunk = body.file.read(REPLAY_CHUNK)
        left -= len(chunk)
        more = left > 0
        if not more:
            left = -1
        return {"type": "http.request", "body": chunk, "more_body": more}

    return replay


def busy_detail(in_flight: int, wait: int) -> str:
    """The 429 of an identify or search shed under load: ``in_flight`` of them in progress, ``wait`` seconds to wait
    (its Retry-After)."""
    return f"busy: {in_flight} identification{'s' * (in_flight != 1)} in progress; retry in {wait} s"


class EdgeGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._in_flight = 0
        self._lock = threading.Lock()
        self.shed = 0  # requests answered 429 so far

    def _kind(self, method: str, path: str) -> str:
        return next((kind for m, pattern, kind in ROUTES if m == method and pattern.match(path)), "read")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        kind = self._kind(method, path)
        s = self.settings
        if kind == "write" or (kind == "identify" and s.reads_require_key):
            key = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-api-key"), None)
            refusal = key_refusal(key, s.key_list(), kind)
            if refusal:
                return await _json(send, 401, refusal)
        limit = body_limit(s, method, path)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if kind == "identify" and not self._take(take=False):  # full as it arrives: a fast 429, its body unread
            return await self._busy(send)
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:  # announced: refused before a byte is read
            return await _json(send, 413, body_limit_detail(s, method, path, int(length), ctype))
        if kind == "read":
            return await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)
        body, status, reason = await _receive_body(receive, limit, s.body_timeout_s if kind == "identify" else None,
                                              closing_delimiter(ctype))
        if body is None:
            if status == 408:  # the rest of the body is never read: the connection cannot carry another request
                return await _json(send, 408, body_timeout_detail(s), {"connection": "close"})
            if status == 413:
                return await _json(send, 413, body_limit_detail(s, method, path, None, ctype),
                                   {"connection": "close"})
            if status == 400:
                return await _json(send, 400, multipart_unreadable(reason))
            # the client left: nobody reads it, but the request is answered (and counted) as the routes answer it
            return await _json(send, 400, "the client closed the connection before the request body was sent")
        try:
            if kind == "identify" and not self._take():  # the slots filled while the body arrived
                return await self._busy(send)
            try:
                await self.app(scope, _replay(body, receive), send)
            finally:
                if kind == "identify":
                    with self._lock:
                        self._in_flight -= 1
        finally:
            body.close()

    def _take(self, *, take: bool = True) -> bool:
        """Whether an identify/search slot is free (taken when ``take``); one refused is counted in :attr:`shed`."""
        with self._lock:
            if self._in_flight >= self.settings.max_identify_in_flight:
                self.shed += 1
                return False
            self._in_flight += take
            return True

    async def _busy(self, send: Send) -> None:
        s = self.settings
        wait = s.retry_after_s + random.randint(0, s.retry_jitter_s)  # noqa: S311 - spreading, not secrecy
        await _json(send, 429, busy_detail(s.max_identify_in_flight, wait), {"retry-after": str(wait)})


async def _json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()  # as the app's JSON
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
