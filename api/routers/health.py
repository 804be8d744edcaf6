"""GET /healthz, /readyz, /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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
    body = {"status": "ready", "references": len(service.gallery), "encoder": service.gallery.encoder_spec}
    if service.empty:
        body["warning"] = EMPTY_GALLERY
    return JSONResponse(body)


@router.get("/metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """Prometheus metrics: request counts and latencies, gallery size, encoder batches."""
    m = request.app.state.metrics
    service = getattr(request.app.state, "service", None)
    if service is not None:
        m.gallery_size.set(len(service.gallery))
        m.encoder_batches.set(service.batcher.batches)
        m.encoder_images.set(service.batcher.images)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
