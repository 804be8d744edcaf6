"""Turning service errors and uploads into HTTP at the edge."""

from __future__ import annotations

import logging
import time  # noqa: F401 - tests patch its monotonic clock here (the store warnings' _Every reads it)
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from functools import partial
from pathlib import Path
from typing import TypeVar

from fastapi import HTTPException, Request, Response, UploadFile

from api.guard import _Every
from api.schemas import ErrorOut, NeighbourOut
from api.service import ServiceError, SpeciesService, StoreUnavailable, Upload
from index.errors import first_line, store_io_failure, store_io_kind, store_table_gone
from index.formats import NewerFormatError
from index.gallery import Neighbour
from index.lease import LeaseError
from index.locks import WriterBusy
from index.store import is_uri
from index.taxonomy import InvalidNameError, SpeciesNameConflictError

#: FastAPI's 400 of a body its form parser failed on with an error of its own (the search route raises it too, for
#: the app's handler to answer an upload not written to TMPDIR as identify's: api.app.spool_failure).
UNPARSED = "There was an error parsing the body"

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Retry-After (seconds) of a write the gallery's store could not take now (another writer, a lost lease).
WRITE_RETRY_AFTER_S = 5
#: Retry-After (seconds) of a request the gallery's store could not serve (unreachable: a network or store outage).
STORE_RETRY_AFTER_S = 5
#: During a store outage every request meets it: its 503 is logged at most once per this many seconds.
STORE_WARN_EVERY_S = 60.0
_STORE_WARNINGS = _Every(STORE_WARN_EVERY_S)
#: The request being answered, ``POST /v1/species/Naja naja/references`` (set by the app's middleware): the log
#: lines of its 5xx name it.
REQUEST: ContextVar[str] = ContextVar("speciesid_request", default="")


def _request() -> str:
    """The request being answered and ": " (:data:`REQUEST`), to start a log line; "" when not known."""
    said = REQUEST.get()
    return f"{said}: " if said else ""

ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorOut, "description": "bad request (the message says what to fix); adding references or "
          "setting a species' venomous flag: false for a name that may be a medically important venomous species, "
          "the message names it; send distinct_from_venomous=true if it is another, harmless one (a species the "
          "shipped taxonomy records venomous: refused whatever is sent)"},
    401: {"model": ErrorOut, "description": "missing or wrong X-API-Key"},
    404: {"model": ErrorOut, "description": "not found"},
    409: {"model": ErrorOut, "description": "identify / search: the gallery holds no searchable references yet, add "
          "some first (POST /v1/species/{name}/references, or `speciesid references add`); adding references: a new "
          "species name that looks like a gallery species (a near-spelling, or its common name) or a species of the "
          "shipped taxonomy (a near-spelling), the message names it; send new_species=true if the species is new"},
    413: {"model": ErrorOut, "description": "an upload over the size limit (max_upload_mb), or the request's photos "
          "over its pixel limit (max_request_megapixels, summed from their headers before any is decoded); a body "
          "over what the route accepts"},
    422: {"model": ErrorOut, "description": "not a photo, truncated, corrupt, refused (decompression bomb, too "
          "elongated, too small for a reference), an invalid name, or an invalid parameter: the server's own "
          "answers a string (one line, naming the field), FastAPI's check of a query, path or form parameter "
          "(the add's common_name, venomous, new_species) a list of {loc, msg, type}; a set-venom body that is not "
          "{\"venomous\": true|false} a string saying what to send"},
    415: {"model": ErrorOut, "description": "not a multipart body (/v1/search: nor a JSON embedding)"},
    429: {"model": ErrorOut, "description": "busy: too many identifications in progress; retry after Retry-After s"},
    500: {"model": ErrorOut, "description": "a write the server's gallery store refuses: the store is misconfigured "
          "(credentials, a store without conditional writes) or damaged (its shared id mark unreadable); a local "
          "store that cannot be read or written (damaged, a full disk, a permission); its log says what to fix"},
    503: {"model": ErrorOut, "description": "the model is still loading; the gallery's store cannot be reached now (a "
          "network or store outage); for a write, the gallery's store could not take it now (another writer held it "
          "too long, its write lease was lost, the store was busy): retry after Retry-After s"},
}


def errors(*codes: int) -> dict[int | str, dict]:
    """The error answers a route can give (``codes``), and 503 while the model loads, for its OpenAPI entry."""
    return {code: ERRORS[code] for code in (*codes, 503)}


class FieldError(HTTPException):
    """An error about one request parameter, named in the answer's ``field`` beside its ``detail`` (the web page
    marks that field, not the photos)."""

    def __init__(self, status_code: int, detail: str, field: str) -> None:
        super().__init__(status_code, detail)
        self.field = field


#: How each photo field is named in an answer saying how to send it.
_PHOTO_FIELDS = {"images": "the photos as files", "image": "the photo as a file"}


def photo_field_error(field: str, content_type: str, *, also: str = "") -> HTTPException:
    """The answer to a request whose photo ``field`` holds no file, the same on every route: 415 when the body is not
    multipart at all, 422 when it is but the field is missing or holds text (FastAPI's code for a missing field).
    ``also``: what else the route accepts, said in the 415 (search: ", or application/json with 'embedding'")."""
    what, how = _PHOTO_FIELDS.get(field, "the photos as files"), f"(e.g. curl -F {field}=@photo.jpg)"
    if not content_type.lower().startswith("multipart/form-data"):
        sent = content_type.split(";")[0].strip() or "a request without a Content-Type (no body?)"
        return HTTPException(415, f"send multipart/form-data with {what} in the field '{field}' {how}{also}, "
                             f"not {sent}")
    return HTTPException(422, f"send {what} in the multipart field '{field}' {how}")


#: The 409 of a write to a gallery whose gallery.json a newer speciesid wrote since the server read it.
NEWER_FORMAT_WRITE = ("this server's speciesid is older than its gallery: {why}. Identify and search still answer, "
                      "from the gallery as the server read it before; the server's operator upgrades speciesid and "
                      "restarts the server")


def edge(fn: Callable[[], T], field: str | None = None) -> T:
    """Run ``fn``; a ServiceError (or ValueError from the library) becomes an HTTPException, and so does a failure
    of the store's write lease (:func:`lease_answer`): never a 400, as the request was not at fault. A failure of
    the store itself (a RuntimeError or OSError) is raised on to the app's handler, which knows the store and
    answers with :func:`store_answer`. ``field``: the request parameter ``fn`` checks, named in its ValueError's 400
    (a :class:`FieldError`: the page marks that field)."""
    try:
        return fn()
    except ServiceError as exc:  # a 503 (the store unreachable) says when to retry, as the store's own do
        if isinstance(exc, StoreUnavailable) and exc.outage:  # answered at once: logged and counted as the others
            _log_outage(exc.outage)
        retry = {"Retry-After": str(STORE_RETRY_AFTER_S)} if exc.status == 503 else None
        raise HTTPException(exc.status, str(exc), headers=retry) from exc
    except InvalidNameError as exc:
        raise HTTPException(422, str(exc)) from exc
    except SpeciesNameConflictError as exc:  # worded for an HTTP client: the route and the form field
        path = (exc.meant or "").replace(" ", "_")  # no species meant: a name not written as a scientific one
        raise HTTPException(409, exc.advice(use=f"send the photos to POST /v1/species/{path}/references to add them "
                                            f"to {exc.meant!r}",
                                            confirm=f"send the form field new_species=true to create {exc.name!r} "
                                            "as a new species")) from exc
    except (LeaseError, TimeoutError) as exc:  # before ValueError: some lease errors are ValueErrors
        raise lease_answer(exc) from exc
    except NewerFormatError as exc:  # the server's speciesid is older than the gallery's: not the request's fault
        raise HTTPException(409, NEWER_FORMAT_WRITE.format(why=exc)) from exc
    except ValueError as exc:
        raise (FieldError(400, str(exc), field=field) if field else HTTPException(400, str(exc))) from exc


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (weak comparison, as RFC 9110 asks for it; ``*``: any)."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or etag in tags


def revalidated(request: Request, body: bytes, etag: str, media_type: str, headers: dict[str, str]) -> Response:
    """``body`` with its ``ETag`` and ``headers``, or a 304 with no body (the same headers) when the request's
    ``If-None-Match`` names that ETag (:func:`etag_matches`): the web page's and a thumbnail's answer."""
    headers = {**headers, "ETag": etag}
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


def store_answer(exc: BaseException, store: str | Path | None) -> HTTPException | None:
    """The answer to a request the gallery's store (where it keeps its table: ``gallery.store_uri``) failed to
    serve, a read or a write; None for any other error, which stays a 500 with its traceback in the log.

    An outage (:func:`index.errors.store_io_failure`: an object store unreachable, a network error): a 503 with
    Retry-After naming the kind of store, not its endpoint or bucket (logged at most once per
    :data:`STORE_WARN_EVERY_S`, with the count of those answered meanwhile). A local store's I/O error
    (:func:`index.errors.store_io_kind`: a data file missing, a full disk, a permission): a 500, as retrying does not
    help, naming nothing of the server's disk. The server's log has the store's whole error."""
    kind = store_io_kind(exc)
    if kind is None and store_table_gone(exc):  # the store answers, without the table: no outage, a 500
        how = "its bucket emptied or its prefix deleted" if is_uri(str(store)) else "its folder emptied or deleted"
        logger.error("%sanswered 500: the gallery's store %s no longer holds its table (%s?): restore the store, or "
                     "rebuild the gallery and restart the server: %s", _request(), store, how, first_line(exc, 500))
        return HTTPException(500, "the server's gallery store no longer holds the gallery's table (emptied or "
                             "deleted); retrying does not help until the server's operator restores the store from a "
                             "backup, or rebuilds the gallery and restarts the server (the server's log has the "
                             "store's error)")
    if kind is None:
        return None
    if store_io_failure(exc, store) is None:
        logger.error("%sanswered 500: the gallery's store %s cannot be read or written (damaged, a full disk, a "
                     "permission; check it, or rebuild the gallery): %s", _request(), store, first_line(exc, 500),
                     exc_info=exc)
        return HTTPException(500, "the server's gallery store cannot be read or written (damaged, or its disk "
                             "full or not permitted); retrying does not help until the server's operator fixes it "
                             "(the server's log has the store's error)")
    named = f"{kind} store" if kind else "store"
    _log_outage(f"the gallery's {named} cannot be reached: {first_line(exc, 500)}")
    return HTTPException(503, f"the gallery's {named} cannot be reached now (a network or storage outage); this "
                         f"server looks at it again shortly: retry in {STORE_RETRY_AFTER_S} s (the server's "
                         "log has the store's error)", headers={"Retry-After": str(STORE_RETRY_AFTER_S)})


def _log_outage(what: str) -> None:
    """Log a 503 of a store outage (``what``: the store and its error) at most once per :data:`STORE_WARN_EVERY_S`,
    saying how many were answered so since the last line: an outage meets every request, not one line each."""
    if (unlogged := _STORE_WARNINGS.due()) is not None:
        since = f" ({unlogged} more answered so since the last such line)" if unlogged else ""
        logger.warning("%sanswered 503 (retry in %d s): %s%s; said at most once per %.0f s", _request(),
                       STORE_RETRY_AFTER_S, what, since, STORE_WARN_EVERY_S)


def lease_answer(exc: LeaseError | TimeoutError) -> HTTPException:
    """The answer to a write the gallery's store did not take. 503 with Retry-After when a later try may succeed
    (another writer held the gallery's write lock or its store's lease past the wait, a TimeoutError: said so; a
    lease error whose ``transient`` says so: the lease lost, racing writes, a busy store); 500 otherwise: the
    server's store is misconfigured (credentials refused, a store without conditional writes, a client too old) or
    damaged (an unreadable shared id mark), which the client cannot fix. Neither names a path, host, pid, bucket or
    credential: the log has the error's whole message."""
    if isinstance(exc, TimeoutError) or getattr(exc, "transient", False):
        logger.warning("%swrite answered 503 (retry in %d s): %s", _request(), WRITE_RETRY_AFTER_S, exc)
        # the answer names nothing exc does (the lock file's path, the holder's host and pid; on S3 the store's URI
        # and lease object): the log has them. A wait given up on another writer is no store fault: said so; nor is
        # this server's own queue of writes (a TimeoutError not a WriterBusy): no other process holds anything.
        waited = ("as long as the server waits (SPECIESID_WRITE_WAIT_S on the server sets that); "
                  f"retry in {WRITE_RETRY_AFTER_S} s")
        if isinstance(exc, WriterBusy):
            detail = (f"another writer holds {exc.held}, and this write waited for it {waited} (the server's log "
                      "names the writer)")
        elif isinstance(exc, TimeoutError):
            detail = f"this server is busy with other writes to this gallery, and this write waited {waited}"
        else:
            why = exc.public or ("the gallery's store could not take this write now (its write lease lost to another "
                                 "writer, racing writes, or the store busy or not answering)")
            detail = f"{why}; retry in {WRITE_RETRY_AFTER_S} s (the server's log has the store's error)"
        return HTTPException(503, detail, headers={"Retry-After": str(WRITE_RETRY_AFTER_S)})
    logger.error("%swrite refused by the gallery's store, answered 500 (fix the server's store): %s", _request(), exc)
    return HTTPException(500, "the server's gallery store is misconfigured or damaged: it refused this write, and "
                         "will refuse every write until the server's operator fixes it (the server's log says what "
                         "to fix); retrying does not help")


def read_uploads(service: SpeciesService, files: Sequence[UploadFile], *, at_most: int,
                 references: bool = False) -> list[Upload]:
    """Size-check, read and decode uploads (all or nothing; ``references``: :meth:`SpeciesService.decode`)."""
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
    return edge(lambda: service.decode(raw, references=True) if references else service.decode(raw))


def neighbour_out(n: Neighbour) -> NeighbourOut:
    """A neighbour as evidence: its reference id and thumbnail URL, never the server's file path."""
    fields = n.to_dict()
    fields.pop("path")
    return NeighbourOut(**fields, thumbnail_url=f"/v1/references/{n.id}/image")
