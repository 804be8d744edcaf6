"""POST /v1/identify and POST /v1/search."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from pydantic import TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import ReadKey, Service
from api.routers._edge import (
    UNPARSED,
    edge,
    errors,
    neighbour_out,
    photo_field_error,
    read_uploads,
)
from api.schemas import SEARCH_K_DEFAULT, IdentifyOut, ResultOut, SearchK, SearchOut, SearchVectorIn
from api.service import SpeciesService
from index.geography import resolve_country
from retrieval.vote import Rank

router = APIRouter(prefix="/v1", tags=["identify"])

#: identify's query parameters: sent as form fields they would be ignored, so they are refused (a 422 saying where).
IDENTIFY_QUERY = ("k", "rank", "country", "neighbours")
#: search's ``k``: from the query string (``?k=``), or a form field / the JSON body's key, which wins.
SEARCH_K = TypeAdapter(SearchK)
#: search's ``k`` in the hand-written OpenAPI of its two bodies (the bounds of :data:`api.schemas.SearchK`).
_K_SCHEMA = {"type": "integer", **SEARCH_K.json_schema(), "default": SEARCH_K_DEFAULT}
#: The most field errors one search 422 lists (an embedding of 1,024 strings would otherwise list 1,024).
MAX_FIELD_ERRORS = 3


async def query_not_form(request: Request) -> None:
    """A form field named as one of identify's query parameters (``-F k=1``) is a 422 saying to send it in the
    query string, not silently ignored. The form is the one FastAPI parsed for ``images`` (Starlette keeps it)."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return
    stray = [key for key in IDENTIFY_QUERY if key in (await request.form())]
    if stray:
        query, names = "&".join(f"{key}=..." for key in stray), ", ".join(repr(key) for key in stray)
        one = len(stray) == 1
        what = "is a query parameter of /v1/identify, not a form field" if one else \
            "are query parameters of /v1/identify, not form fields"
        raise HTTPException(422, f"{names} {what}: send {'it' if one else 'them'} as /v1/identify?{query} (only the "
                            "photos go in the form, as 'images')")


def field_errors(exc: ValidationError, *, field: str = "the body") -> str:
    """A pydantic error in one line naming each field (``field`` where it names none): ``k: input should be
    greater than or equal to 1``, as FastAPI's own 422 lists it in ``msg``; no newlines, no link."""
    errs = exc.errors(include_url=False)
    parts = []
    for err in errs[:MAX_FIELD_ERRORS]:
        where = ".".join(str(x) for x in err.get("loc", ())) or field
        msg = " ".join(str(err.get("msg", "invalid")).split()).removeprefix("Value error, ")  # our validators' own
        parts.append(f"{where}: {msg[:1].lower()}{msg[1:]}")
    more = f" (and {len(errs) - MAX_FIELD_ERRORS} more)" if len(errs) > MAX_FIELD_ERRORS else ""
    return "; ".join(parts) + more


@router.post("/identify", response_model=IdentifyOut, responses=errors(400, 401, 409, 413, 415, 422, 429),
             dependencies=[Depends(query_not_form)])
def identify(
    service: Service,
    _: ReadKey,
    images: Annotated[list[UploadFile], File(description="1-5 photos of one animal (JPEG, PNG, WebP, HEIC)")],
    k: Annotated[int, Query(ge=1, le=50, description="candidates to return")] = 5,
    rank: Annotated[Rank, Query(description="report species, genus or family")] = Rank.SPECIES,
    country: Annotated[str | None, Query(max_length=64, description="ISO code or name, e.g. MA, Maroc")] = None,
    neighbours: Annotated[bool, Query(description="include the evidence reference photos")] = True,
) -> IdentifyOut:
    """Identify the animal in 1-5 photos of one observation, combined into one answer."""
    if country:  # a bad country is a 400 before any upload is decoded, naming the field (the page marks it)
        edge(lambda: resolve_country(country), field="country")
    edge(service.require_references)  # an empty gallery is a 409 before any upload is decoded
    uploads = read_uploads(service, images, at_most=service.settings.max_images)
    answer = edge(lambda: service.identify(uploads, top=k, rank=rank, country=country))
    said = answer.to_dict(neighbours=False)  # the library's plain answer: IdentifyOut's fields, under its names
    results = [  # the evidence as the API shows it: a thumbnail URL, never the server's file path
        ResultOut(**{**r, "neighbours": [neighbour_out(n) for n in ranked.neighbours] if neighbours else []})
        for r, ranked in zip(said.pop("results"), answer.results, strict=True)
    ]
    said["notes"] += service.answer_notes(rank)  # the answer's own notes, then the gallery's
    fields = {key: value for key, value in said.items() if key in IdentifyOut.model_fields}  # not source, error
    return IdentifyOut(**fields, results=results, encoder=service.gallery.encoder_spec, images=len(uploads))


_SEARCH_BODY = {
    "parameters": [{"name": "k", "in": "query", "required": False, "description": "neighbours to return; a form "
                    "field 'k' or the JSON body's 'k' wins over it",
                    "schema": _K_SCHEMA}],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "k": _K_SCHEMA,
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
    query_k = request.query_params.get("k")
    if ctype.startswith("application/json"):
        body = _search_json(await request.body(), query_k)
        hits = await run_in_threadpool(edge, lambda: service.search_vector(body.embedding, body.k))
    elif ctype.startswith("multipart/form-data"):
        try:
            form = await request.form()
        except OSError as exc:  # the parser could not write the photo to a temporary file (a full disk): the
            raise HTTPException(400, UNPARSED) from exc  # as FastAPI's: answered 503 by the app's handler
        try:  # its uploads closed at the end, as FastAPI does for identify's
            images = form.getlist("image")
            if len(images) > 1:  # never one silently dropped (nor left unchecked)
                raise HTTPException(422, f"send one photo in 'image' (use /v1/identify for several), got "
                                    f"{len(images)}")
            image = images[0] if images else None
            if not isinstance(image, UploadFile) and not hasattr(image, "read"):  # as identify answers it: a 422
                raise photo_field_error("image", ctype)
            try:
                k = SEARCH_K.validate_python(form.get("k", query_k if query_k is not None else SEARCH_K_DEFAULT))
            except ValidationError as exc:
                raise HTTPException(422, field_errors(exc, field="k")) from exc
            hits = await run_in_threadpool(_search_upload, service, image, k)
        finally:
            await form.close()
    else:
        raise photo_field_error("image", ctype, also=", or application/json with 'embedding'")
    return SearchOut(neighbours=[neighbour_out(h) for h in hits], encoder=service.gallery.encoder_spec)


def _search_json(raw: bytes, query_k: str | None) -> SearchVectorIn:
    """The JSON body of a search by embedding, ``?k=`` applying where the body has no ``k``; a 422 in one line
    naming what is wrong otherwise."""
    expected = 'expected JSON {"embedding": [...], "k": 10}'
    if not raw.strip():
        raise HTTPException(422, f"{expected}: the body is empty")
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"{expected}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno})") \
            from exc
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        raise HTTPException(422, f"{expected}: not valid JSON (nested too deep, or not UTF-8)") from exc
    if isinstance(data, dict) and "k" not in data and query_k is not None:
        data["k"] = query_k
    try:
        return SearchVectorIn.model_validate(data)
    except ValidationError as exc:
        raise HTTPException(422, f"{expected}: {field_errors(exc)}") from exc
    except RecursionError as exc:
        raise HTTPException(422, f"{expected}: nested too deep") from exc


def _search_upload(service: SpeciesService, image: UploadFile, k: int) -> list:
    """Read, decode and search one uploaded photo (blocking: called in the threadpool)."""
    edge(service.require_references)  # an empty gallery is a 409 before the photo is decoded, as in identify
    uploads = read_uploads(service, [image], at_most=1)
    return edge(lambda: service.search_image(uploads[0], k))
