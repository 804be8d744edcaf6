"""gzip for the answers worth it: the web page (compressed once, :func:`gzip_bytes`) and the JSON and text answers
over :data:`MIN_BYTES` (:class:`CompressAnswers`), for a browser on a slow link (2G in the field).

Only a request whose ``Accept-Encoding`` accepts gzip gets it (:func:`accepts_gzip`), and every answer that could
have been compressed says ``Vary: Accept-Encoding``. Never compressed: an answer under :data:`MIN_BYTES` (under one
packet: nothing gained), photos and other already-compressed bodies (a thumbnail's JPEG: Starlette's list of
excluded types), server-sent events, an answer that already has a ``Content-Encoding`` (the page, compressed once
per process with an ETag of its own). Requests, uploads included, are passed on as they came.
"""

from __future__ import annotations

import gzip
import logging

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.gzip import GZipResponder, IdentityResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.guard import route_path

#: Answers smaller than this many bytes go as they are: they fit one TCP packet (about 1,400 bytes of payload with
#: the headers) either way, and gzip's 18 bytes of framing can make a small answer bigger.
MIN_BYTES = 1024
#: zlib's level for answers compressed as they are sent: 6 (zlib's default) is within 1% of 9's size for the API's
#: JSON (/openapi.json: 7,458 bytes against 7,429), at less CPU per answer; the page is compressed once, at 9.
LEVEL = 6

logger = logging.getLogger(__name__)


class _Decided(Exception):  # not an error: the headers are known, the rest of the file is not read
    """Raised from a re-run's ``send`` once the gzip responder has decided on the first chunk: stops the file."""


def _decided(exc: BaseException) -> bool:
    """Whether ``exc`` is :class:`_Decided`, or a group (a task group's) of it alone."""
    group = getattr(exc, "exceptions", None)  # an ExceptionGroup (Python 3.11 on; anyio's backport before)
    if isinstance(group, tuple):
        return bool(group) and all(_decided(e) for e in group)
    return isinstance(exc, _Decided)


def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header accepts gzip (RFC 9110: ``gzip``, ``x-gzip`` or ``*`` with a q above
    0; the first one named counts). No header: no gzip."""
    weights: dict[str, float] = {}
    for item in (accept_encoding or "").split(","):
        name, *params = (part.strip() for part in item.split(";"))
        weight = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(value)
                except ValueError:  # a q that is no number: not accepted
                    weight = 0.0
        weights.setdefault(name.lower(), weight)
    for name in ("gzip", "x-gzip", "*"):
        if name in weights:
            return weights[name] > 0
    return False


def gzip_bytes(data: bytes) -> bytes:
    """``data`` gzipped at level 9 with no timestamp: the same bytes for the same input (the page's ETag holds)."""
    return gzip.compress(data, compresslevel=9, mtime=0)


class CompressAnswers:
    """ASGI middleware: see the module docstring (Starlette's gzip responders, with :func:`accepts_gzip` choosing).
    An answer it compresses that has a strong ETag (a docs page's script) gets it weak (``W/"..."``), as one ETag
    cannot name two byte sequences; ``If-None-Match`` compares weakly, so the 304 still comes. ``Vary`` values are
    said once each (the page says ``Vary: Accept-Encoding`` itself).

    ``files``: the path prefixes of a file handler that knows nothing of encodings (Starlette's ``StaticFiles``: the
    docs' scripts), whose 304 and HEAD answers have no body to decide on: a HEAD gets the headers of the GET for the
    same ``Accept-Encoding`` (the file run as a GET, its body not sent), and a 304 the ETag and ``Vary`` of the 200
    that the request without its conditions gets (:meth:`_revalidated`), so that a browser revalidates the variant
    it holds."""

    def __init__(self, app: ASGIApp, minimum_size: int = MIN_BYTES, level: int = LEVEL,
                 files: tuple[str, ...] = ()) -> None:
        self.app = app
        self.minimum_size = minimum_size
        self.level = level
        self.files = files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not (self.files and route_path(scope).startswith(self.files) and scope["method"] in ("GET", "HEAD")):
            return await self._respond(scope, receive, send)
        head = scope["method"] == "HEAD"
        asked = dict(scope)  # the request as it came: routing changes the scope it runs with (its root_path)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                if message["status"] == 304:
                    await self._revalidated(asked, receive, message)
                await send(message)
                if head:
                    await send({"type": "http.response.body", "body": b""})
                    raise _Decided  # the rest of the file is not read
            elif not head:
                await send(message)

        try:
            await self._respond({**scope, "method": "GET"} if head else scope, receive, sending, first_only=head)
        except BaseException as exc:
            if not _decided(exc):
                raise

    async def _respond(self, scope: Scope, receive: Receive, send: Send, *, first_only: bool = False) -> None:
        """The app's answer, gzipped when worth it and accepted. ``first_only`` (a HEAD, a 304's look at its 200):
        only the app's start and first body message reach the gzip responder, which decides on them (and
        compresses that one chunk); the rest of the body is dropped, not compressed."""
        encoded = False  # the app's answer came with its own Content-Encoding (the page's): left as it is
        bodies = 0

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            async def from_app(message: Message) -> None:
                nonlocal encoded, bodies
                if message["type"] == "http.response.start":
                    encoded = "content-encoding" in Headers(raw=message.get("headers", []))
                elif message["type"] in ("http.response.body", "http.response.pathsend"):
                    bodies += 1
                    if first_only and bodies > 1:
                        return
                await send(message)

            await self.app(scope, receive, from_app)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                _vary_once(headers)
                etag = headers.get("etag")
                if not encoded and "content-encoding" in headers and etag and not etag.startswith("W/"):
                    headers["etag"] = f"W/{etag}"
            await send(message)

        if accepts_gzip(Headers(scope=scope).get("accept-encoding")):
            responder: ASGIApp = GZipResponder(app, self.minimum_size, compresslevel=self.level)
        else:
            responder = IdentityResponder(app, self.minimum_size)
        await responder(scope, receive, sending)

    async def _revalidated(self, scope: Scope, receive: Receive, message: Message) -> None:
        """A file handler's 304 (``message``, changed in place) given the ``Vary`` of the 200 that the same request
        without its conditions gets, and its ETag made weak when that 200's is (gzipped): the file is read again,
        its first chunk compressed, nothing sent, the rest not read (:class:`_Decided`). A re-run that fails (the
        file removed since) leaves the 304 as the file handler made it (logged at debug), never a 500."""
        conditions = {b"if-none-match", b"if-modified-since", b"range", b"if-range"}  # the whole 200's headers
        plain = {**scope, "method": "GET",
                 "headers": [(k, v) for k, v in scope["headers"] if k.lower() not in conditions]}
        got: list[Message] = []
        given = False

        async def no_body() -> Message:  # a GET's empty request once, then what the client's connection says
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()

        async def keep(sent: Message) -> None:
            if sent["type"] == "http.response.start":
                got.append(sent)
                raise _Decided  # the gzip responder has seen the first chunk: the headers are known

        try:
            await self._respond(plain, no_body, keep, first_only=True)
        except Exception as exc:  # the 304 is due whatever the re-run did
            if not _decided(exc):
                logger.debug("a 304 of %s keeps the file handler's headers: its re-run failed: %r",
                             scope["path"], exc)
                return
        if not got or got[0]["status"] != 200:
            return
        full = Headers(raw=got[0].get("headers", []))
        headers = MutableHeaders(scope=message)
        for vary in full.getlist("vary"):
            headers.add_vary_header(vary)
        _vary_once(headers)
        etag = headers.get("etag")
        if etag and full.get("etag") == f"W/{etag}":  # the 200 went gzipped: its ETag is this one, weak
            headers["etag"] = f"W/{etag}"


def _vary_once(headers: MutableHeaders) -> None:
    """Each ``Vary`` value said once (case aside): an answer that said ``Vary: Accept-Encoding`` itself would
    otherwise get it twice from Starlette's responder."""
    values = [v.strip() for line in headers.getlist("vary") for v in line.split(",") if v.strip()]
    unique: dict[str, str] = {}
    for value in values:
        unique.setdefault(value.lower(), value)
    if len(unique) < len(values):
        headers["vary"] = ", ".join(unique.values())
