"""GET /healthz, /readyz, /metrics (Prometheus)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.schemas import ErrorOut
from api.service import EMPTY_GALLERY
from index.build_mark import build_status
from retrieval.probe_share import probe_status

#: /readyz's warning while the gallery's store cannot be reached.
STORE_DEGRADED = ("the gallery's store cannot be reached: identify and search answer from the references loaded "
                  "before; adding, deleting, listing species and reference photos answer 503 until it answers again")

#: /readyz's warning while the gallery's gallery.json was written by a newer speciesid than the server's.
NEWER_FORMAT = ("{why}: identify and search answer from the gallery as this server read it before; adding and "
                "deleting references answer 409 until the server's speciesid is upgraded and the server restarted "
                "(or the gallery.json reads at this server's format again)")

#: The longest /readyz and /metrics wait on the store's look for other processes' writes (then they answer what the
#: server loaded, degraded while the look is overdue): half of a readiness probe's default timeout (Kubernetes: 1 s).
PROBE_STORE_WAIT_S = 0.5

logger = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


#: /readyz's answers other than 200, for its OpenAPI entry.
READYZ_ERRORS: dict[int | str, dict] = {
    503: {"description": "the model and gallery are still loading",
          "content": {"application/json": {"schema": {"type": "object", "required": ["status"], "properties": {
              "status": {"type": "string", "enum": ["loading"]}}}}}},
    500: {"model": ErrorOut, "description": "the gallery's store no longer holds its table, or cannot be read "
          "(damaged, a full disk, a permission): retrying does not help until the operator fixes it"},
}


@router.get("/readyz", responses=READYZ_ERRORS)
def readyz(request: Request) -> JSONResponse:
    """The model and gallery are loaded (503 until then). An empty gallery is ready (references can be added
    through this server) and says so in ``warning``: identify and search answer 409 until it holds references.
    While the gallery's store cannot be reached the server is still ready, ``"status": "degraded"``: identify and
    search answer from the references loaded before (a 503 here would take every replica out of a load balancer at
    once during a store outage); ``warning`` names the store and what answers 503 meanwhile. Degraded too while
    gallery.json was rewritten by a newer speciesid: answers go on, writes answer 409, ``warning`` says so.
    ``probe``: the probe answers use (:func:`retrieval.probe_share.probe_status`), read from memory and the folder,
    never the store; with ``references_since`` (references added and deleted since the probe was trained, and a
    ``note`` while any were), counted once per gallery version, not per request.
    ``build``: whether the last build into the gallery completed (``state`` complete, running or interrupted, and a
    ``note``): a gallery a build left partial is ready all the same, and says so (:mod:`index.build_mark`).
    ``venom_applies``: whether answers give venom advice (:meth:`retrieval.identify.Identifier.venom_applies`: on
    unless gallery.json records it off, ``speciesid index venom-advice``), which the page words itself by; left out
    when it cannot be told now (a gallery recorded off whose species cannot be read).
    ``uploads``: the kept upload photos no reference uses (an add cut off before its commit): ``unused``, of them
    ``removable`` (older than a day), their ``bytes`` and a ``note`` saying what to run
    (:func:`index.objects.unused_uploads`); counted on a thread of its own when the server starts, again when a
    /readyz finds the count over an hour old, and left out until the first count is done."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    gallery = service.gallery
    # at most once per refresh_s, waited for PROBE_STORE_WAIT_S at most; never raises on an outage (stale reads),
    # a damaged store or a table gone does (a JSON 500: api.app)
    gallery.refresh(wait=PROBE_STORE_WAIT_S)
    gallery.check_files()  # a local store's data files deleted from under it: the same 500 (once per refresh_s)
    body = {"status": "ready", "references": gallery.index.ntotal, "encoder": gallery.encoder_spec}
    if gallery.reading_stale:  # the store did not answer: the references identify answers from
        body.update(status="degraded", store=str(gallery.store_uri), warning=STORE_DEGRADED)
    elif not gallery.index.ntotal:
        body["warning"] = EMPTY_GALLERY
    if gallery.newer_format is not None:  # answers go on; writes are refused (409) until the server is upgraded
        body.update(status="degraded", warning=NEWER_FORMAT.format(why=gallery.newer_format))
    # a build interrupted: still ready, the partial gallery said so; no key needed here: no pid or host. The
    # references as index info passes them, excluded rows aside (they differ only for a gallery whose every row is
    # excluded, with no build marks: practically never): a gallery no photo was ever stored in reads as interrupted
    body["build"] = build_status(gallery.root, api=True, references=gallery.index.ntotal)
    ident = service.identifier  # the probe answers use now; on S3 the store's copy as last looked at (no request)
    # references added or deleted since the probe was trained: counted once per gallery version (the identifier's)
    body["probe"] = probe_status(ident.probe, gallery, ident.probe_follower, since=ident.references_since(), api=True)
    if (uploads := service.uploads_status()) is not None:  # photos an add cut off left: counted on a thread, hourly
        body["uploads"] = uploads
    try:  # venom advice on or off: the page's wording (api/static/index.html); gallery.json read when it changed
        body["venom_applies"] = ident.venom_applies()
    except (RuntimeError, OSError) as exc:  # the species list unreadable now: left out (the page keeps the snake
        logger.debug("readyz: venom_applies left out: %s", exc)  # wording, the safe one)
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics: request counts and latencies, gallery size, encoder batches. Never asks the store more
    than a read does (at most once per ``refresh_s``, waited for :data:`PROBE_STORE_WAIT_S` at most): while it is
    unreachable or its look overdue, the size is the last one known and ``speciesid_store_up`` 0; a damaged store
    (an error that is no outage) is 0 too, not a failed scrape."""
    m = request.app.state.metrics
    service = getattr(request.app.state, "service", None)
    if service is not None:
        try:  # never raises on a store outage (stale reads): the index keeps what it had
            service.gallery.refresh(wait=PROBE_STORE_WAIT_S)
            up = not service.gallery.reading_stale
        except (RuntimeError, OSError) as exc:  # damaged, or its table gone: /readyz and the log say what
            logger.debug("metrics: the gallery's store failed: %s", exc)
            up = False
        m.gallery_size.set(service.gallery.index.ntotal)
        m.store_up.set(1 if up else 0)  # the encoder's counters are read by their collector
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
