"""Turning service errors and uploads into HTTP at the edge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
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


#: How each photo field is named in an answer saying how to send it.
_PHOTO_FIELDS = {"images": "the photos as files", "image": "the photo as a file"}


def photo_field_error(field: str, content_type: str, *, also: str = "") -> HTTPException:
    """The answer to a request whose photo ``field`` holds no file, the same on every route: 415 when the body is not
    multipart at all, 422 when it is but the field is missing or holds text (FastAPI's code for a missing field).
    ``also``: what else the route accepts, said in the 415 (search: ", or application/json with 'embedding'")."""
    what, how = _PHOTO_FIELDS.get(field, "the photos as files"), f"(e.g. curl -F {field}=@photo.jpg)"
    if not content_type.lower().startswith("multipart/form-data"):
        sent = content_type.split(";")[0].strip() or "no content type"
        return HTTPException(415, f"send multipart/form-data with {what} in the field '{field}' {how}{also}, "
                             f"not {sent}")
    return HTTPException(422, f"send {what} in the multipart field '{field}' {how}")


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
    raw = []
    for f in files:
        name, size = f.filename or "upload", f.size
        if size is not None:  # known from the spooled upload: refused before it is read
            edge(partial(service.check_size, name, size))
        raw.append((name, f.file.read(service.upload_limit + 1)))
    return edge(lambda: service.decode(raw))


def neighbour_out(n: Neighbour) -> NeighbourOut:
    """A neighbour as evidence: its reference id and thumbnail URL, never the server's file path."""
    fields = n.to_dict()
    fields.pop("path")
    return NeighbourOut(**fields, thumbnail_url=f"/v1/references/{n.id}/image")
