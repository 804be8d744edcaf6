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

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.gzip import GZipResponder, IdentityResponder
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Answers smaller than this many bytes go as they are: they fit one TCP packet (about 1,400 bytes of payload with
#: the headers) either way, and gzip's 18 bytes of framing can make a small answer bigger.
MIN_BYTES = 1024
#: zlib's level for answers compressed as they are sent: 6 (zlib's default) is within 1% of 9's size for the API's
#: JSON (/openapi.json: 7,458 bytes against 7,429), at less CPU per answer; the page is compressed once, at 9.
LEVEL = 6


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
    said once each (the page says ``Vary: Accept-Encoding`` itself)."""

    def __init__(self, app: ASGIApp, minimum_size: int = MIN_BYTES, level: int = LEVEL) -> None:
        self.app = app
        self.minimum_size = minimum_size
        self.level = level

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        encoded = False  # the app's answer came with its own Content-Encoding (the page's): left as it is

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            async def from_app(message: Message) -> None:
                nonlocal encoded
                if message["type"] == "http.response.start":
                    encoded = "content-encoding" in Headers(raw=message.get("headers", []))
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


def _vary_once(headers: MutableHeaders) -> None:
    """Each ``Vary`` value said once (case aside): an answer that said ``Vary: Accept-Encoding`` itself would
    otherwise get it twice from Starlette's responder."""
    values = [v.strip() for line in headers.getlist("vary") for v in line.split(",") if v.strip()]
    unique: dict[str, str] = {}
    for value in values:
        unique.setdefault(value.lower(), value)
    if len(unique) < len(values):
        headers["vary"] = ", ".join(unique.values())
