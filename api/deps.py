"""FastAPI dependencies: the service, settings and the API-key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from api.guard import key_ok
from api.service import SpeciesService
from api.settings import Settings


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    return request.app.state.settings


def get_service(request: Request) -> SpeciesService:
    """The app's service (503 until the model is loaded)."""
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the model is still loading")
    return service


def require_write_key(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Header(description="API key for writes")] = None,
) -> None:
    """Writes need a key from SPECIESID_API_KEYS."""
    keys = settings.key_list()
    if not keys:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "writes are disabled: no SPECIESID_API_KEYS configured")
    if not key_ok(x_api_key, keys):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong X-API-Key")


def require_read_key(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Header(description="API key (when reads require one)")] = None,
) -> None:
    """Reads are open unless SPECIESID_READS_REQUIRE_KEY is set."""
    if settings.reads_require_key and not key_ok(x_api_key, settings.key_list()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or wrong X-API-Key")


Service = Annotated[SpeciesService, Depends(get_service)]
WriteKey = Annotated[None, Depends(require_write_key)]
ReadKey = Annotated[None, Depends(require_read_key)]
