"""GET /healthz, /readyz, /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """The model and gallery are loaded (503 until then)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    return JSONResponse({"status": "ready", "references": len(service.gallery), "encoder": service.gallery.encoder_spec})


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
