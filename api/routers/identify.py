"""POST /v1/identify and POST /v1/search."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, File, HTTPException, Query, Request, UploadFile
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import ReadKey, Service
from api.routers._edge import edge, errors, neighbour_out, photo_field_error, read_uploads
from api.schemas import IdentifyOut, ResultOut, SearchOut, SearchVectorIn
from api.service import SpeciesService
from index.geography import resolve_country
from retrieval.vote import Rank

router = APIRouter(prefix="/v1", tags=["identify"])


@router.post("/identify", response_model=IdentifyOut, responses=errors(400, 401, 409, 413, 415, 422, 429))
def identify(
    service: Service,
    _: ReadKey,
    images: Annotated[list[UploadFile], File(description="1-5 photos of one animal (JPEG, PNG, WebP, HEIC)")],
    k: Annotated[int, Query(ge=1, le=50, description="candidates to return")] = 5,
    rank: Annotated[Rank, Query(description="report species, genus or family")] = Rank.SPECIES,
    country: Annotated[str | None, Query(max_length=64, description="ISO code or name, e.g. MA")] = None,
    neighbours: Annotated[bool, Query(description="include the evidence reference photos")] = True,
) -> IdentifyOut:
    """Identify the animal in 1-5 photos of one observation, combined into one answer."""
    if country:
        edge(lambda: resolve_country(country))  # a bad country is a 400 before any upload is decoded
    edge(service.require_references)  # an empty gallery is a 409 before any upload is decoded
    uploads = read_uploads(service, images, at_most=service.settings.max_images)
    answer = edge(lambda: service.identify(uploads, top=k, rank=rank, country=country))
    out = [
        ResultOut(**{**r.to_dict(neighbours=False),
                     "neighbours": [neighbour_out(n) for n in r.neighbours] if neighbours else []})
        for r in answer.results
    ]
    return IdentifyOut(
        results=out,
        unknown=answer.identification.unknown,
        far=answer.identification.far,
        nearest_similarity=answer.identification.nearest,
        venomous_score=answer.identification.venomous_score,
        venom_unknown_score=answer.identification.venom_unknown_score,
        country_applied=answer.identification.country_applied,
        encoder=service.gallery.encoder_spec,
        images=len(uploads),
        notes=service.answer_notes(),
    )


_SEARCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
                    },
                }
            },
            "application/json": {"schema": SearchVectorIn.model_json_schema()},
        },
    }
}


@router.post("/search", response_model=SearchOut, responses=errors(400, 401, 409, 413, 415, 422, 429),
             openapi_extra=_SEARCH_BODY)
async def search(request: Request, service: Service, _: ReadKey) -> SearchOut:
    """Raw kNN: a photo (multipart field ``image``) or an embedding (JSON ``{"embedding": [...], "k": 10}``).

    Async only to read the body by content type; the decode, encode and search run in the threadpool, as
    ``identify``'s do, so one slow search never stalls the event loop (health checks, the guard's 429s)."""
    ctype = request.headers.get("content-type", "").lower()  # media types ignore case
    try:
        return await _search(request, service, ctype)
    except ClientDisconnect:  # nobody to answer; a plain 400 keeps the log free of tracebacks and counts it
        raise HTTPException(400, "the client closed the connection before the request body was sent") from None


async def _search(request: Request, service: SpeciesService, ctype: str) -> SearchOut:
    if ctype.startswith("application/json"):
        try:
            body = SearchVectorIn.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, ValidationError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
            raise HTTPException(422, f"expected JSON {{'embedding': [...], 'k': 10}}: {exc}") from exc
        hits = await run_in_threadpool(edge, lambda: service.search_vector(body.embedding, body.k))
    elif ctype.startswith("multipart/form-data"):
        async with request.form() as form:  # its uploads closed at the end, as FastAPI does for identify's
            image = form.get("image")
            if not isinstance(image, UploadFile) and not hasattr(image, "read"):  # as identify answers it: a 422
                raise photo_field_error("image", ctype)
            try:
                k = int(form.get("k", request.query_params.get("k", 10)))  # a form field, or ?k= as identify's
            except (TypeError, ValueError) as exc:
                raise HTTPException(422, "k must be an integer") from exc
            if not 1 <= k <= 1000:
                raise HTTPException(422, "k must be between 1 and 1000")
            hits = await run_in_threadpool(_search_upload, service, image, k)
    else:
        raise photo_field_error("image", ctype, also=", or application/json with 'embedding'")
    return SearchOut(neighbours=[neighbour_out(h) for h in hits], encoder=service.gallery.encoder_spec)


def _search_upload(service: SpeciesService, image: UploadFile, k: int) -> list:
    """Read, decode and search one uploaded photo (blocking: called in the threadpool)."""
    edge(service.require_references)  # an empty gallery is a 409 before the photo is decoded, as in identify
    uploads = read_uploads(service, [image], at_most=1)
    return edge(lambda: service.search_image(uploads[0], k))
