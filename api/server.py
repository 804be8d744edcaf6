"""The app under uvicorn with a bounded, logged stop (``speciesid serve``).

A stop (SIGTERM, Ctrl-C) closes the listener at once (new connections are refused: a load balancer moves on), then
lets the requests in flight finish for ``shutdown_grace_s`` (SPECIESID_SHUTDOWN_GRACE_S, uvicorn's
``timeout_graceful_shutdown``); past it uvicorn cancels the ones still running, which cuts an upload still arriving
(a stalled client would otherwise hold the stop for SPECIESID_BODY_TIMEOUT_S). A write (an add, a delete, a
set-venom) is never cut in its commit: its body is received before its route runs, the route runs on a worker thread
that a cancel does not stop, and the app's shutdown (:meth:`api.service.SpeciesService.close`) waits for a write in
its commit and refuses every other (one queued, or still waiting for the gallery's lock: a 503, nothing written).
The server logs, at warning level (``serve`` shows uvicorn's own lines only with ``-v``), when the stop begins and
what is in flight then, and when it ends and what was cut (once the cut requests' cancels have arrived: a route on a
worker thread gets it only when the thread returns). A request is an upload still arriving while the body of a POST
or PUT to a write or identify route has not all come; a DELETE has none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
from collections import Counter
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.guard import route_kind, route_path
from api.settings import Settings

logger = logging.getLogger(__name__)

#: What a request in flight is called in the stop's log lines, by the guard's kind of its route.
KIND_WORDS = {"write": "add, delete or set-venom", "identify": "identify or search", "read": "other"}


#: Seconds the stop's last log line waits, after the app's shutdown, for the requests cut on a worker thread to get
#: their cancel (the thread returns: an identify's forward pass; a write is refused or done by then).
SETTLE_S = 10.0

#: The 503 of an upload still arriving when the stop's grace ended.
CUT_UPLOAD = ("the server is stopping: this request's body was still arriving when its time to finish ran out "
              "(SPECIESID_SHUTDOWN_GRACE_S), so nothing of it was used; send it again once the server is back")
#: The 503 of a request whose work was under way when the stop's grace ended (its answer is not sent).
CUT_ANSWER = ("the server is stopping: this request's answer could not be sent before its time to finish ran out "
              "(SPECIESID_SHUTDOWN_GRACE_S); its work was not cut (an add, delete or set-venom was written or "
              "refused whole: look before sending it again)")


async def _stopped(send: Send, detail: str) -> None:
    """Answer a request the stop cut with a 503 (JSON ``detail``, the connection closed); nothing when the client
    is gone already."""
    body = json.dumps({"detail": detail}).encode()
    try:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"retry-after", b"5")]})
        await send({"type": "http.response.body", "body": body})
    except (OSError, RuntimeError) as exc:  # the client left, or the connection is closing
        logger.debug("a request the stop cut was not answered: %s", exc)


def _signal_name(number: int) -> str:
    """``SIGTERM`` for 15; the number itself for one Python does not name."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


class InFlight:
    """ASGI wrapper counting the HTTP requests in flight, by kind (the guard's: write, identify, read), and whether
    each one's body is still arriving; and those a stop cut (cancelled)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._lock = threading.Lock()
        self._requests: dict[int, dict[str, Any]] = {}
        self._next = 0
        self.cut: Counter[str] = Counter()  # kind -> requests cancelled at the grace limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], route_path(scope)
        kind = route_kind(method, path)
        # an upload until its last chunk is in: a POST or PUT of a write or identify route (a DELETE has no body)
        entry = {"kind": kind, "receiving": kind != "read" and method in ("POST", "PUT")}

        async def receiving() -> Message:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                entry["receiving"] = False
            return message

        async def sending(message: Message) -> None:
            entry["answered"] = True
            await send(message)

        with self._lock:
            key, self._next = self._next, self._next + 1
            self._requests[key] = entry
        try:
            await self.app(scope, receiving, sending)
        except asyncio.CancelledError:  # the stop's grace is over (uvicorn cancels what is left)
            upload = entry["receiving"]
            with self._lock:
                self.cut["upload" if upload else kind] += 1
            if entry.get("answered"):
                raise
            # a 503 saying what happened, instead of uvicorn's 500 and traceback of a cancelled task
            await _stopped(send, CUT_UPLOAD if upload else CUT_ANSWER)
        finally:
            with self._lock:
                self._requests.pop(key, None)

    def describe(self) -> str:
        """The requests in flight now, in words: "no request in flight", or "3 requests in flight: 1 upload still
        arriving, 2 identify or search"."""
        with self._lock:
            entries = list(self._requests.values())
        if not entries:
            return "no request in flight"
        uploads = sum(1 for e in entries if e["receiving"])
        kinds = Counter(e["kind"] for e in entries if not e["receiving"])
        parts = ([f"{_plural(uploads, 'upload')} still arriving"] if uploads else []) + [
            f"{n} {KIND_WORDS[k]}" for k, n in sorted(kinds.items())]
        return f"{_plural(len(entries), 'request')} in flight: {', '.join(parts)}"

    def describe_cut(self) -> str:
        """What the stop cut, in words ("every request in flight finished" when nothing): uploads still arriving,
        and requests whose work (on a worker thread, which a cancel does not stop: an add's commit finishes) was
        under way, whose answer was not sent; and requests still running (their cancel not arrived yet)."""
        with self._lock:
            cut, running = dict(self.cut), len(self._requests)
        whose = 'its' if running == 1 else 'their'
        left = (f"{_plural(running, 'request')} still running on a worker thread, {whose} answer not sent"
                if running else "")
        if not cut:
            return f"at the grace limit: {left}" if left else "every request in flight finished"
        uploads = cut.pop("upload", 0)
        parts = [f"{_plural(uploads, 'upload')} still arriving cut"] if uploads else []
        if cut:
            parts.append(f"{sum(cut.values())} answer(s) not sent ("
                         + ", ".join(f"{n} {KIND_WORDS[k]}" for k, n in sorted(cut.items()))
                         + "; their work, on a worker thread, was not cut)")
        return f"at the grace limit: {'; '.join(parts + ([left] if left else []))}"


class GracefulServer(uvicorn.Server):
    """uvicorn's server, its app wrapped in :class:`InFlight`, logging its stop (module docstring)."""

    def __init__(self, config: uvicorn.Config) -> None:
        self.in_flight = InFlight(config.app)
        config.app = self.in_flight
        super().__init__(config)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        """uvicorn's stop, logged: what is in flight when it begins, what was cut and how long it took."""
        caught = [_signal_name(s) for s in getattr(self, "_captured_signals", ())]  # uvicorn's: SIGTERM, SIGINT
        why = f" ({', '.join(caught)})" if caught else ""
        grace = self.config.timeout_graceful_shutdown
        limit = f"up to {grace:g} s (SPECIESID_SHUTDOWN_GRACE_S)" if grace is not None else "with no limit"
        start = time.monotonic()
        logger.warning("stopping%s: no new connections; %s, given %s to finish", why, self.in_flight.describe(),
                       limit)
        await super().shutdown(sockets)
        # a request cut while its route ran on a worker thread gets its cancel (and its 503) only once that thread
        # returns, after the app's shutdown: the log waits for them (a while at most), so it says what was cut
        settle = time.monotonic() + SETTLE_S
        while self.server_state.tasks and not self.force_exit and time.monotonic() < settle:
            await asyncio.sleep(0.05)
        logger.warning("stopped after %.1f s: %s", time.monotonic() - start, self.in_flight.describe_cut())


def graceful_server(app: ASGIApp, settings: Settings, **config: Any) -> GracefulServer:
    """A :class:`GracefulServer` of ``app`` whose stop lets requests finish for ``settings.shutdown_grace_s``;
    ``config``: more of ``uvicorn.Config`` (``log_level``, ``host``, ``port``)."""
    return GracefulServer(uvicorn.Config(app, timeout_graceful_shutdown=settings.shutdown_grace_s, **config))
