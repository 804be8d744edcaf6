"""FastAPI dependencies: the service, settings and the API-key check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader

from api.guard import key_refusal
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


#: The ``X-API-Key`` header, declared as the API's security scheme (the docs page gets its "Authorize" button);
#: the edge guard has checked it before any body was read, these dependencies say so in the schema and check again.
API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="a key from SPECIESID_API_KEYS: writes need one, reads when "
                       "SPECIESID_READS_REQUIRE_KEY is set")


def require_write_key(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Security(API_KEY)] = None,
) -> None:
    """Writes need a key from SPECIESID_API_KEYS."""
    _require_key(settings, x_api_key, "write")


def require_read_key(
    settings: Annotated[Settings, Depends(get_settings)],
    x_api_key: Annotated[str | None, Security(API_KEY)] = None,
) -> None:
    """Reads are open unless SPECIESID_READS_REQUIRE_KEY is set."""
    if settings.reads_require_key:
        _require_key(settings, x_api_key, "read")


def _require_key(settings: Settings, given: str | None, kind: str) -> None:
    """A 401 unless ``given`` is one of the configured keys (:func:`api.guard.key_refusal`)."""
    refusal = key_refusal(given, settings.key_list(), kind)
    if refusal:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, refusal)


Service = Annotated[SpeciesService, Depends(get_service)]
WriteKey = Annotated[None, Depends(require_write_key)]
ReadKey = Annotated[None, Depends(require_read_key)]
