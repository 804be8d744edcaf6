"""The edge guard (pure ASGI, before any body is read): API keys of write routes, load shedding, body limits.

- **Keys first.** A write route (adding or deleting references) without a valid ``X-API-Key`` gets its 401
  before a byte of the body is read; so do reads when ``reads_require_key`` is set.
- **Load shedding.** At most ``max_identify_in_flight`` identify/search requests are served at once; past
  that a fast 429 with ``Retry-After``. Writes do not count against it: they have their own lane.
- **Body limits as the body arrives.** Each route accepts what it can use (its photos x the per-photo
  limit, capped by ``max_request_mb``): a ``Content-Length`` over it is a 413 at once, and a chunked body
  is counted as it streams and cut at the limit (Starlette's ``RequestBodyLimitResponder``).
"""

from __future__ import annotations

import hmac
import json
import random
import re
import threading

from starlette.middleware.body_limit import RequestBodyLimitResponder
from starlette.types import ASGIApp, Receive, Scope, Send

from api.settings import Settings

_MB = 1024 * 1024
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


def _route_photos(settings: Settings, method: str, path: str) -> int:
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
    return int(min(_photo_limit(settings, _route_photos(settings, method, path)), settings.max_request_mb * _MB))


def body_limit_detail(settings: Settings, method: str, path: str, size: int | None = None) -> str:
    """The 413 of a body over :func:`body_limit` (``size``: its Content-Length, when it announced one), naming the
    limit that applied: ``SPECIESID_MAX_REQUEST_MB`` where it caps the route, else the route's photos at
    ``SPECIESID_MAX_UPLOAD_MB`` each. The same words whether the body was refused from its Content-Length or cut
    as it streamed in."""
    photos = _route_photos(settings, method, path)
    limit = body_limit(settings, method, path)
    if settings.max_request_mb * _MB < _photo_limit(settings, photos):
        why = "SPECIESID_MAX_REQUEST_MB, the cap of every request's body"
    elif photos:
        why = (f"{photos} photo{'s' if photos > 1 else ''} at SPECIESID_MAX_UPLOAD_MB ({settings.max_upload_mb:g} MB) "
               "each, + 1 MB for the form")
    else:
        why = "a route without photos"
    what = f"request body of {size / _MB:.1f} MB is" if size is not None else "request body"
    return f"{what} over the {limit / _MB:.0f} MB this route accepts ({why})"


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
        if kind == "identify":
            with self._lock:
                full = self._in_flight >= s.max_identify_in_flight
                if not full:
                    self._in_flight += 1
                else:
                    self.shed += 1
            if full:
                wait = s.retry_after_s + random.randint(0, s.retry_jitter_s)  # noqa: S311 - spreading, not secrecy
                return await _json(send, 429, busy_detail(s.max_identify_in_flight, wait), {"retry-after": str(wait)})
        try:
            limit = body_limit(s, method, path)
            length = next((v for k, v in scope["headers"] if k == b"content-length"), b"")
            if length.isdigit() and int(length) > limit:  # announced: refused before a byte is read
                return await _json(send, 413, body_limit_detail(s, method, path, int(length)))
            await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)
        finally:
            if kind == "identify":
                with self._lock:
                    self._in_flight -= 1


async def _json(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    body = json.dumps({"detail": detail}, ensure_ascii=False, separators=(",", ":")).encode()  # as the app's JSON
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
