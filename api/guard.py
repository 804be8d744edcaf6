"""The edge guard (pure ASGI, before the app sees a request): API keys of write routes, load shedding, body limits.

- **Keys first.** A write route (adding or deleting references, setting a species' venomous flag) without a valid
  ``X-API-Key`` gets its 401 before a byte of the body is read; so do reads when ``reads_require_key`` is set.
- **Load shedding.** At most ``max_identify_in_flight`` identify/search requests are served at once; past
  that a fast 429 with ``Retry-After``, before the body is read when the slots are full as the request arrives.
  Writes do not count against it: they have their own lane.
- **A slot is taken once the body is in.** An identify's or search's body streams into the app (its form parser
  keeps each photo in memory up to 1 MB, then in a temporary file under ``TMPDIR``) before the request takes its
  slot, within ``body_timeout_s`` (past it a 408): a client that sends its body slowly (a slow link, or on purpose)
  holds no slot, so others are served meanwhile. At most ``max_receiving`` such bodies are received at once; past
  that a 429 before a byte is read, which bounds what slow clients can hold (memory, temporary files,
  connections). A request whose slot filled while its body arrived is shed then (a 429 after its upload).
- **A multipart body cut short is a 400** (identify, search and add): its last chunk is checked for the closing
  delimiter before the form parser gets it, so no photo of it is looked at. Adds stream as they arrive too
  (no deadline: a key is needed, and writes hold no slot).
- **Body limits as the body arrives.** Each route accepts what it can use (its photos x the per-photo
  limit, capped by ``max_request_mb``): a ``Content-Length`` over it is a 413 at once, and a chunked body
  is counted as it streams and cut at the limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable

from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException
from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.settings import Settings
from index.sources import MB, megabytes

logger = logging.getLogger(__name__)
#: The most often a refused key (a 401) is logged: at most one line per this many seconds, the next with the count.
REFUSAL_LOG_EVERY_S = 60.0

#: (method, path pattern, kind): kind is "write", "identify" (shed under load) or "read".
ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(r"^/v1/species/[^/]+/references/?$"), "write"),
    ("PUT", re.compile(r"^/v1/species/.+/venomous/?$"), "write"),  # a name holding '/' too: its 422 after the key
    ("DELETE", re.compile(r"^/v1/references/[^/]+/?$"), "write"),
    ("POST", re.compile(r"^/v1/identify/?$"), "identify"),
    ("POST", re.compile(r"^/v1/search/?$"), "identify"),
)


def route_path(scope: Scope) -> str:
    """The request's path without the ``root_path`` a proxy mounts the app under (``uvicorn --root-path /api``):
    Starlette 1.x's ``scope["path"]`` holds it. The path routes are matched on, as Starlette's router takes it: the
    root stripped only where it ends at a ``/`` (or the path's end), else the path as it is (a server that did not
    prefix it: routed as it is, so matched as it is). Of a scope as the request came: routing into a mount (the
    docs' files) puts the mount's prefix in its ``root_path``. A copy of Starlette's private
    ``starlette._utils.get_route_path``, line for line (a test pins them equal)."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):]
    return path


def route_kind(method: str, path: str) -> str:
    """The kind of the route a request is for (:data:`ROUTES`): "write", "identify", or "read" for any other."""
    return next((kind for m, pattern, kind in ROUTES if m == method and pattern.match(path)), "read")


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


class _Every:
    """Says whether to log now (at most once per ``seconds``) and how many were left unlogged since the last."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self._last, self._unlogged, self._lock = seconds, float("-inf"), 0, threading.Lock()

    def due(self) -> int | None:
        """The count of unlogged ones before this one when it is time to log, else None (this one is counted)."""
        now = time.monotonic()
        with self._lock:
            if now - self._last < self.seconds:
                self._unlogged += 1
                return None
            unlogged, self._last, self._unlogged = self._unlogged, now, 0
            return unlogged


class _Refusals(_Every):
    """The 401s answered since the last line about them: logged at most once per :data:`REFUSAL_LOG_EVERY_S`."""

    def __init__(self) -> None:
        super().__init__(REFUSAL_LOG_EVERY_S)

    def log(self, scope: Scope, given: str | None, kind: str, refusal: str) -> None:
        """A WARNING naming the request (method, path, client address) and why (no key, a wrong key, no keys
        configured), never the key; at most once per :data:`REFUSAL_LOG_EVERY_S`, with the count between."""
        if (unlogged := self.due()) is None:
            return
        why = "no X-API-Key" if not given else "a wrong X-API-Key" if "wrong" in refusal else "no keys configured"
        client = scope.get("client") or ("unknown", 0)
        since = f"; {unlogged} more refused since the last such line" if unlogged else ""
        logger.warning("refused a %s with 401 (%s): %s %s from %s%s; said at most once per %.0f s", kind, why,
                       scope.get("method"), scope.get("path"), client[0], since, REFUSAL_LOG_EVERY_S)


_REFUSALS = _Refusals()


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
    return (photos * settings.max_upload_mb + 1) * MB


def body_limit(settings: Settings, method: str, path: str) -> int:
    """Bytes the route of ``method path`` may receive."""
    return int(min(_photo_limit(settings, route_photos(settings, method, path)), settings.max_request_mb * MB))


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
        if path.rstrip("/") == "/v1/search":
            return (f"JSON {what} over the {limit / MB:.0f} MB this route accepts; an embedding's JSON is far "
                    'smaller: send only {"embedding": [...], "k": 10}')
        if route_kind(method, path) == "write" and method == "PUT":
            return (f"JSON {what} over the {limit / MB:.0f} MB this route accepts; its JSON is far smaller: send "
                    'only {"venomous": true}')
        return (f"JSON {what} over the {limit / MB:.0f} MB this route accepts; this route takes no JSON: send "
                "multipart/form-data photos, as curl -F or a browser's FormData does")
    if settings.max_request_mb * MB < _photo_limit(settings, photos):
        why = "SPECIESID_MAX_REQUEST_MB, the cap of every request's body"
    elif photos:
        why = (f"{photos} photo{'s' if photos > 1 else ''} at SPECIESID_MAX_UPLOAD_MB ({settings.max_upload_mb:g} MB) "
               "each, + 1 MB for the form")
    else:
        why = "a route without photos"
    return f"{what} over the {limit / MB:.0f} MB this route accepts ({why})"


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


class EdgeAnswer(HTTPException):
    """An answer of the guard's, raised from the body's ``receive`` while the app reads it (a 400, 408, 413 or
    429): the app's exception handler sends it as it is, worded already, ``headers`` included."""


#: The 400 of a request whose client left before its body was all sent (nobody reads it, but it is counted).
CLIENT_LEFT = "the client closed the connection before the request body was sent"


class _CheckedBody:
    """The ``receive`` the app reads a write's or an identify's body through, as it arrives (never held here: the
    app's form parser keeps each photo in memory up to 1 MB, then in a temporary file). It counts the bytes (413
    past ``limit``, ``too_large`` its message), holds the body to ``timeout`` seconds in all (408, ``too_slow``),
    checks that a multipart body ends with its closing delimiter (``close``; a 400 before the last chunk reaches
    the parser, so no photo of a body cut short is looked at), and answers a client that leaves mid-body with a
    400; ``on_end`` runs as the last chunk arrives, before the app gets it, and may raise (the identify slot is
    taken then, or a 429). Each refusal is an :class:`EdgeAnswer`; the 408 and 413 close the connection (the rest
    of the body is never read)."""

    def __init__(self, receive: Receive, *, limit: int, timeout: float | None, close: bytes | None,
                 on_end: Callable[[], None], too_large: str, too_slow: str) -> None:
        self._receive, self.limit, self.close, self.on_end = receive, limit, close, on_end
        self.too_large, self.too_slow = too_large, too_slow
        self.deadline = time.monotonic() + timeout if timeout is not None else None
        self.size, self.ended = 0, False
        self._opener = close[2:-2] if close is not None else b""  # "--" and the boundary: every part begins with it
        # the body may begin with a delimiter: as if a CRLF came before it
        self._tail, self._opened, self._closed = b"\r\n", close is None, close is None

    async def receive(self) -> Message:
        """The client's next message, checked; once the body is in, the client's own messages (a disconnect)."""
        if self.ended:
            return await self._receive()
        left = None if self.deadline is None else self.deadline - time.monotonic()
        try:
            message: Message = await (self._receive() if left is None else
                                      asyncio.wait_for(self._receive(), max(left, 0)))
        except asyncio.TimeoutError:
            raise EdgeAnswer(408, self.too_slow, {"connection": "close"}) from None
        if message["type"] == "http.disconnect":  # nobody reads the answer, but the request is counted
            raise EdgeAnswer(400, CLIENT_LEFT)
        chunk = message.get("body", b"")
        self.size += len(chunk)
        if self.size > self.limit:
            raise EdgeAnswer(413, self.too_large, {"connection": "close"})
        if not self._closed and self.close is not None:  # the delimiters, also across two chunks
            window = self._tail + chunk
            self._opened = self._opened or self._opener in window
            self._closed = self.close in window
            self._tail = window[-(len(self.close) - 1):]
        if not message.get("more_body", False):
            self.ended = True
            if not self._closed:
                boundary = self._opener[2:].decode("latin-1")
                raise EdgeAnswer(400, multipart_unreadable(CUT_SHORT if self._opened else (
                    f"no part begins with the boundary {boundary!r} that its Content-Type names")))
            self.on_end()
        return message


def busy_detail(in_flight: int, wait: int) -> str:
    """The 429 of an identify or search shed under load: ``in_flight`` of them in progress, ``wait`` seconds to wait
    (its Retry-After)."""
    return f"busy: {in_flight} identification{'s' * (in_flight != 1)} in progress; retry in {wait} s"


def receiving_detail(receiving: int, wait: int) -> str:
    """The 429 of an identify or search shed because ``receiving`` bodies are being received already
    (``SPECIESID_MAX_RECEIVING``), ``wait`` seconds to wait (its Retry-After)."""
    return (f"busy: {receiving} request{'s' * (receiving != 1)} already sending photos to this server; retry in "
            f"{wait} s")


class EdgeGuard:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._in_flight = 0  # identify/search requests holding a slot (their body in, their work under way)
        self._receiving = 0  # identify/search requests admitted whose body is still arriving
        self._lock = threading.Lock()
        self.shed = 0  # requests answered 429 so far

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], route_path(scope)  # the log lines name scope["path"]: what was sent
        kind = route_kind(method, path)
        s = self.settings
        if kind == "write" or (kind == "identify" and s.reads_require_key):
            key = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-api-key"), None)
            refusal = key_refusal(key, s.key_list(), kind)
            if refusal:
                _REFUSALS.log(scope, key, kind, refusal)
                return await _json(send, 401, refusal)
        limit = body_limit(s, method, path)
        headers = dict(scope["headers"])
        ctype = headers.get(b"content-type", b"").decode("latin-1")
        if kind == "identify" and (busy := self._admit()) is not None:  # a fast 429, its body unread
            return await self._busy(send, busy)
        receiving = kind == "identify"  # counted among the bodies being received (SPECIESID_MAX_RECEIVING)
        took = False  # holds an identify slot

        def take() -> None:  # the body is in: it leaves the receiving ones and takes a slot, or is shed (429)
            nonlocal receiving, took
            with self._lock:
                self._receiving -= 1
                receiving = False
                took = not self._full()
                if took:
                    self._in_flight += 1
            if not took:  # the slots filled while the body arrived
                wait = self._retry_after()
                raise EdgeAnswer(429, busy_detail(s.max_identify_in_flight, wait), {"retry-after": str(wait)})

        try:
            length = headers.get(b"content-length", b"")
            if length.isdigit() and int(length) > limit:  # announced: refused before a byte is read
                return await _json(send, 413, body_limit_detail(s, method, path, int(length), ctype))
            if kind == "read":
                return await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)
            body = _CheckedBody(receive, limit=limit, timeout=s.body_timeout_s if kind == "identify" else None,
                                close=closing_delimiter(ctype), on_end=take if kind == "identify" else lambda: None,
                                too_large=body_limit_detail(s, method, path, None, ctype),
                                too_slow=body_timeout_detail(s))
            started = False

            async def sending(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            try:
                await self.app(scope, body.receive, sending)
            except EdgeAnswer as answer:  # an app that does not answer HTTPExceptions itself: the guard does
                if started:
                    raise
                await _json(send, answer.status_code, answer.detail, answer.headers)
        finally:
            with self._lock:
                if took:
                    self._in_flight -= 1
                if receiving:  # its body never ended (refused, cut, or the client left)
                    self._receiving -= 1

    def _full(self) -> bool:
        """Whether every identify/search slot is taken; one found full is counted in :attr:`shed` (the caller holds
        the lock)."""
        full = self._in_flight >= self.settings.max_identify_in_flight
        if full:
            self.shed += 1
        return full

    def _admit(self) -> str | None:
        """Admit an identify/search request among those whose body is being received: None, or why it is shed (a
        429 before its body is read): every slot is taken, or ``max_receiving`` bodies are being received."""
        with self._lock:
            if self._full():
                return "slots"
            if self._receiving >= self.settings.max_receiving:
                self.shed += 1
                return "receiving"
            self._receiving += 1
            return None

    def _retry_after(self) -> int:
        s = self.settings
        return s.retry_after_s + random.randint(0, s.retry_jitter_s)  # noqa: S311 - spreading, not secrecy

    async def _busy(self, send: Send, why: str) -> None:
        s, wait = self.settings, self._retry_after()
        detail = busy_detail(s.max_identify_in_flight, wait) if why == "slots" else receiving_detail(s.max_receiving,
                                                                                                      wait)
        await _json(send, 429, detail, {"retry-after": str(wait)})


async def _json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()  # as the app's JSON
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
