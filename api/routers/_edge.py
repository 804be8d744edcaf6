"""Turning service errors and uploads into HTTP at the edge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from fastapi import HTTPException, UploadFile

from api.schemas import ErrorOut, NeighbourOut
from api.service import ServiceError, SpeciesService, Upload
from index.gallery import Neighbour
from index.taxonomy import InvalidNameError

T = TypeVar("T")

ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorOut, "description": "bad request (the message says what to fix)"},
    401: {"model": ErrorOut, "description": "missing or wrong X-API-Key"},
    404: {"model": ErrorOut, "description": "not found"},
    413: {"model": ErrorOut, "description": "an upload over the size limit (max_upload_mb), or the request's photos "
          "over its pixel limit (max_request_megapixels, summed from their headers before any is decoded)"},
    422: {"model": ErrorOut, "description": "not a photo, truncated, corrupt, refused (decompression bomb, too "
          "elongated, too small for a reference), an invalid name, or an invalid parameter"},
    415: {"model": ErrorOut, "description": "not a multipart body (/v1/search: nor a JSON embedding)"},
    429: {"model": ErrorOut, "description": "busy: too many identifications in progress; retry after Retry-After s"},
    503: {"model": ErrorOut, "description": "the model is still loading"},
}


def errors(*codes: int) -> dict[int | str, dict]:
    """The error answers a route can give (``codes``), and 503 while the model loads, for its OpenAPI entry."""
    return {code: ERRORS[code] for code in (*codes, 503)}


def edge(fn: Callable[[], T]) -> T:
    """Run ``fn``; a ServiceError (or ValueError from the library) becomes an HTTPException."""
    try:
        return fn()
    except ServiceError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    except InvalidNameError as exc:
        raise HTTPException(422, str(exc)) from exc
    except ValueError as exc:
        raise HTTPException(400, str(exc)) from exc


def read_uploads(service: SpeciesService, files: Sequence[UploadFile], *, at_most: int) -> list[Upload]:
    """Size-check, read and decode uploads (all or nothing)."""
    if not files:
        raise HTTPException(400, "send at least one photo in the multipart field 'images'")
    if len(files) > at_most:
        raise HTTPException(400, f"at most {at_most} photos per request, got {len(files)}")
    limit = int(service.settings.max_upload_mb * 1024 * 1024)
    raw = []
    for f in files:
        if f.size is not None and f.size > limit:
            raise HTTPException(413, f"{f.filename}: over this server's limit of {service.settings.max_upload_mb:g} "
                                "MB a photo (ask its operator to raise SPECIESID_MAX_UPLOAD_MB)")
        data = f.file.read(limit + 1)
        raw.append((f.filename or "upload", data))
    return edge(lambda: service.decode(raw))


def neighbour_out(n: Neighbour) -> NeighbourOut:
    """A neighbour as evidence: its reference id and thumbnail URL, never the server's file path."""
    fields = n.to_dict()
    fields.pop("path")
    return NeighbourOut(**fields, thumbnail_url=f"/v1/references/{n.id}/image")
