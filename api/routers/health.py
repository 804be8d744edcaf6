"""GET /healthz, /readyz, /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.routers._edge import store_answer
from api.service import EMPTY_GALLERY

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """The model and gallery are loaded (503 until then). An empty gallery is ready (references can be added
    through this server) and says so in ``warning``: identify and search answer 409 until it holds references."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    try:  # asks the store: an unreachable one is a 503 naming it (identify still answers, from what is loaded)
        references = len(service.gallery)
    except (RuntimeError, OSError) as exc:
        answer = store_answer(exc)
        if answer is None:
            raise
        return JSONResponse({"status": "store unreachable", "store": str(service.gallery.store_uri),
                             "detail": answer.detail}, status_code=503, headers=answer.headers)
    body = {"status": "ready", "references": references, "encoder": service.gallery.encoder_spec}
    if service.empty:
        body["warning"] = EMPTY_GALLERY
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics: request counts and latencies, gallery size, encoder batches. Never asks the store more
    than a read does (at most once per ``refresh_s``): while it is unreachable, the size is the last one known."""
    m = request.app.state.metrics
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.gallery.refresh()  # never raises on a store outage (stale reads): the index keeps what it had
        m.gallery_size.set(service.gallery.index.ntotal)  # the encoder's counters are read by their collector
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
