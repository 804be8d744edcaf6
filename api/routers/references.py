"""DELETE /v1/references/{id}, GET /v1/references/{id}/image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response
from pydantic import BeforeValidator

from api.deps import ReadKey, Service, WriteKey
from api.routers._edge import edge, errors, revalidated

router = APIRouter(prefix="/v1/references", tags=["references"])


def _digits(value: object) -> object:
    """A reference id is written in digits only: "1.0" or "1e3" is not an id (pydantic would take them as 1)."""
    if isinstance(value, str) and not (value.isascii() and value.isdigit()):
        raise ValueError("a reference id is a whole number written in digits, e.g. 17")
    return value


RefId = Annotated[int, Path(ge=0, le=2**62, description="reference id"), BeforeValidator(_digits)]


@router.delete("/{ref_id}", status_code=204, responses=errors(401, 404, 422, 500))
def delete_reference(service: Service, _: WriteKey, ref_id: RefId) -> Response:
    """Delete a reference photo from the gallery."""
    edge(lambda: service.delete_reference(ref_id))
    return Response(status_code=204)


#: A thumbnail's caching: ``private`` always, as shared caches (a CDN, a caching proxy) do not treat X-API-Key as
#: they treat Authorization and could serve a key-gated thumbnail to callers without a key; an hour in the
#: browser's own cache, then revalidated by its ETag (a deleted reference's thumbnail then answers 404).
THUMBNAIL_CACHE = "private, max-age=3600"


@router.get(
    "/{ref_id}/image",
    responses={**errors(401, 404, 422), 200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"},
               304: {"description": "the thumbnail is the one If-None-Match names (its ETag)"}},
    response_class=Response,
)
@router.head("/{ref_id}/image", include_in_schema=False, response_class=Response)
def reference_image(request: Request, service: Service, _: ReadKey, ref_id: RefId) -> Response:
    """A JPEG thumbnail of a reference photo (evidence display): ``Cache-Control: private``, with an ETag (the
    first 32 hex digits of the sha256 of the thumbnail's bytes, made with the thumbnail and kept with it) that
    ``If-None-Match`` revalidates with a 304."""
    thumb = edge(lambda: service.thumbnail(ref_id))
    return revalidated(request, thumb.data, thumb.etag, "image/jpeg", {"Cache-Control": THUMBNAIL_CACHE})
