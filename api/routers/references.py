"""DELETE /v1/references/{id}, GET /v1/references/{id}/image."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response
from pydantic import BeforeValidator

from api.deps import ReadKey, Service, WriteKey
from api.routers._edge import edge, errors

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


@router.get(
    "/{ref_id}/image",
    responses={**errors(401, 404, 422), 200: {"content": {"image/jpeg": {}}, "description": "JPEG thumbnail"}},
    response_class=Response,
)
def reference_image(service: Service, _: ReadKey, ref_id: RefId) -> Response:
    """A JPEG thumbnail of a reference photo (evidence display)."""
    return Response(edge(lambda: service.thumbnail(ref_id)), media_type="image/jpeg",
                    headers={"Cache-Control": "max-age=3600"})
