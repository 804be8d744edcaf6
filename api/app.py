"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.base import RequestResponseEndpoint
from starlette.responses import Response
from starlette.routing import Match, Mount
from starlette.types import Scope

from api.compression import CompressAnswers, accepts_gzip, gzip_bytes
from api.guard import EdgeAnswer, EdgeGuard, body_limit_detail, multipart_unreadable, route_path, route_photos
from api.routers import health, identify, references, species
from api.routers._edge import REQUEST, UNPARSED, FieldError, photo_field_error, revalidated, store_answer
from api.service import EMPTY_GALLERY, SpeciesService, etag_of
from api.settings import Settings
from index.errors import chained
from index.formats import speciesid_version

logger = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: Methods metrics are labelled with; any other is counted as "other" (a label per invented method would let
#: anyone grow the metrics without bound).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: The page holds an API-key field: no other site may frame it (clickjacking), and its type is never sniffed.
PAGE_HEADERS = {"X-Frame-Options": "DENY", "Content-Security-Policy": "frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff"}
#: Where /docs and /redoc get Swagger UI's and ReDoc's files: from this server (the fastapi-offline package), not
#: a CDN, so the docs work on a host with no internet (rangers in the field).
DOCS_STATIC = "/static-offline-docs"
#: The interactive docs pages: Swagger UI has an "Authorize" API-key field, so they get the page's headers too.
DOCS_PAGES = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})


def _fastapi(**kwargs) -> FastAPI:
    """The app, with /docs and /redoc served from local files (fastapi-offline); without that package, FastAPI's
    own pages, which load their scripts from a CDN (blank offline), and a warning saying so."""
    kwargs["swagger_ui_parameters"] = {"validatorUrl": None}  # no badge fetched from validator.swagger.io
    # /v1/identify/ is a 404 naming /v1/identify, not a 307 to an absolute URL built from the Host header (behind a
    # TLS proxy an http:// one, which a client following it would send its X-API-Key and photos to)
    kwargs["redirect_slashes"] = False
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:
        logger.warning("fastapi-offline is not installed: /docs and /redoc load their scripts from a CDN and stay "
                       "blank without internet (pip install fastapi-offline)")
        return FastAPI(**kwargs)
    return FastAPIOffline(static_url=DOCS_STATIC, **kwargs)


def _route_path(app: FastAPI, request: Request, path: str) -> str:
    """The route template a request was for (``/v1/species/{name}``), also when the edge guard answered it (a 401,
    429 or 413 before routing), else ``unmatched``. ``path``: the request's :func:`api.guard.route_path` as it came
    (routing into a mount, the docs' files, puts the mount's prefix in its ``root_path``)."""
    route = request.scope.get("route")
    if route is not None:  # a path convertor ({name:slashed}) is not part of the route's name
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", route.path)
    if getattr(app.state, "route_templates", None) is None:  # the API's own paths, as its OpenAPI schema lists them;
        # exact: with redirect_slashes off, ``/v1/identify/`` is a 404 no route serves, so ``unmatched``
        app.state.route_templates = [(re.compile("^" + re.sub(r"\\{[^/]+?\\}", "[^/]+", re.escape(t)) + "$"), t)
                                     for t in app.openapi()["paths"]]
    found = next((t for pattern, t in app.state.route_templates if pattern.match(path)), None)
    return found or _other_route(app, request.scope, path) or "unmatched"


def _bare_scope(scope: Scope, path: str) -> Scope:
    """A scope for matching ``path`` against the app's routes afresh (routing has changed the request's own)."""
    return {"type": "http", "path": path, "root_path": "", "method": scope.get("method", "GET")}


def _other_route(app: FastAPI, scope: Scope, path: str) -> str | None:
    """The path of the route outside the OpenAPI schema that ``scope``, for ``path`` (as :func:`_route_path`'s), is
    for (``/openapi.json``, the docs pages; ``/static-offline-docs/{path}`` for the docs' files), else None."""
    bare = _bare_scope(scope, path)
    for route in app.router.routes:
        match, _ = route.matches(bare)
        if match is not Match.NONE:
            path = getattr(route, "path", None)
            return f"{path}/{{path}}" if isinstance(route, Mount) else path
    return None


def _without_slash(app: FastAPI, scope: Scope) -> str | None:
    """The path of ``scope`` without its trailing slash when a route serves that (the 404's hint), else None; behind
    a ``root_path``, with it (the path the client sends)."""
    path = route_path(scope)
    if len(path) < 2 or not path.endswith("/"):
        return None
    bare = _bare_scope(scope, path.rstrip("/"))
    served = any(r.matches(bare)[0] is not Match.NONE for r in app.router.routes)
    return scope["path"].rstrip("/") if served else None


#: The multipart parser's limit of one part's header line, in bytes: a longer one is a file name of thousands of
#: characters.
PART_HEADER_BYTES = DEFAULT_MAX_HEADER_SIZE
#: The 503 of an upload the form parser could not write to its temporary files (a full disk, most often).
SPOOL_FAILED = ("this server cannot keep the request's photos in its temporary space now ({why}): retry later; the "
                "server's operator: free space under TMPDIR (or point TMPDIR at a larger disk)")


def spool_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a form parser's failure to write an upload to its temporary file (in ``exc``'s chain: the
    :data:`UNPARSED` 400 it was raised as), else None."""
    return chained(exc, OSError, context=True)


def _form_refusal(settings: Settings, request: Request, exc: StarletteHTTPException) -> str:
    """A 400 of Starlette's form parser in the API's words: too many files -> the route's own limit of photos; a
    multipart body it cannot read -> why, its parser's reason in brackets (a part's header too long: its file
    name, said so, when python-multipart's own error is found in the exception's chain); any other 400 as it is."""
    detail = str(exc.detail)
    if detail.startswith("Too many files"):  # the parser's 1000: the route's own limit is the one that matters
        photos = route_photos(settings, request.method, route_path(request.scope))
        return f"at most {photos} photos per request; this one holds over 1000 files" if photos else detail
    if "multipart" not in detail.lower():
        return detail
    # Starlette's "Invalid multipart data" hides python-multipart's reason: found in the exception's chain
    parser = chained(exc, MultipartParseError, context=True)
    if parser is not None and "header size" in str(parser):
        return multipart_unreadable(f"a part's header is over {PART_HEADER_BYTES:,} bytes: a file name that long? "
                                    "send a shorter one")
    return multipart_unreadable(detail)


class ServiceCounts(Collector):
    """Counters the app's service keeps, read at each scrape (``service``: the app's service now, or None)."""

    def __init__(self, service: Callable[[], SpeciesService | None]) -> None:
        self.service = service


class EncoderCounts(ServiceCounts):
    """The micro-batcher's cumulative counts as Prometheus counters (``*_total``), read at each scrape: they only
    grow while a service runs (a restarted service starts them at 0 again, which ``rate()`` takes as a reset)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The batcher's forward passes and photos encoded (0 while no service runs)."""
        service = self.service()
        batcher = service.batcher if service is not None else None
        yield CounterMetricFamily("speciesid_encoder_batches", "encoder forward passes run for identify and search "
                                  "photos (the request batcher's); reference photos added are not counted",
                                  value=batcher.batches if batcher else 0)
        yield CounterMetricFamily("speciesid_encoder_images", "identify and search photos encoded (through the "
                                  "request batcher); reference photos added are not counted",
                                  value=batcher.images if batcher else 0)


class StoreCounts(ServiceCounts):
    """The gallery's compactions after this server's writes (:class:`index.compaction.CompactionCounts`) as
    Prometheus counters, read at each scrape from memory (never a request to the store)."""

    def collect(self) -> Iterator[CounterMetricFamily]:
        """The compactions run, those that failed, and the seconds spent (0 while no service runs)."""
        service = self.service()
        counts = getattr(service.gallery, "compactions", None) if service is not None else None
        yield CounterMetricFamily("speciesid_store_compactions", "store compactions after this server's writes "
                                  "(SPECIESID_COMPACT_FRAGMENTS small fragments piled up)",
                                  value=counts.runs if counts else 0)
        yield CounterMetricFamily("speciesid_store_compaction_failures", "store compactions after this server's "
                                  "writes that failed (the writes stood; reads slow down as small fragments pile up: "
                                  "alert on it, run 'speciesid index compact')", value=counts.failures if counts else 0)
        yield CounterMetricFamily("speciesid_store_compaction_seconds", "time this server's writes spent compacting "
                                  "the store (searches wait on it)", value=counts.seconds if counts else 0.0)


class Metrics:
    """The app's Prometheus metrics, in a registry of its own (``service``: the app's service now, for the encoder's
    counters)."""

    def __init__(self, service: Callable[[], SpeciesService | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "speciesid_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "speciesid_request_seconds", "HTTP request latency", ["method", "route"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.gallery_size = Gauge("speciesid_gallery_references", "searchable reference photos, as of the server's "
                                  "last look at the store (at most SPECIESID_REFRESH_S old while it answers)",
                                  registry=self.registry)
        self.store_up = Gauge("speciesid_store_up", "1 while the gallery's store answers, 0 while reads answer from "
                              "the references loaded before an outage (alert on it: /readyz stays 200, degraded)",
                              registry=self.registry)
        self.registry.register(EncoderCounts(service))
        self.registry.register(StoreCounts(service))


def create_app(settings: Settings | None = None, service: SpeciesService | None = None) -> FastAPI:
    """Build the app; the model loads at startup (``/readyz`` says when) unless a service is given."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # A service given to create_app belongs to the caller (left open); one loaded here is closed and
        # dropped at shutdown, so a restarted lifespan loads a fresh one instead of reusing a closed one.
        owned = getattr(app.state, "service", None) is None
        if owned:
            try:
                app.state.service = await run_in_threadpool(SpeciesService, settings)
            except Exception as exc:
                app.state.startup_error = exc  # what `serve` says in one line (uvicorn only exits, status 3)
                raise
            logger.info("serving gallery %s (%d references)", settings.index, len(app.state.service.gallery))
        if app.state.service.empty:  # the CLI refuses such a gallery; a server may be where references get added
            logger.warning("gallery %s: %s", settings.index, EMPTY_GALLERY)
        yield
        if owned:  # on a thread: close() waits for a write in progress (api.server), the loop stays free meanwhile
            await run_in_threadpool(app.state.service.close)
            app.state.service = None

    app = _fastapi(
        title="speciesid",
        version=speciesid_version(),  # the code's own (index.formats.VERSION, which pyproject.toml reads)
        description="Identify animal species from photos by embedding retrieval. Writes need X-API-Key.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.startup_error = None  # why the gallery or the model did not load, once the lifespan failed
    app.state.metrics = Metrics(lambda: getattr(app.state, "service", None))
    # gzip for answers worth it (api.compression); first: inside the guard. The docs' files: StaticFiles, whose 304s
    # and HEADs CompressAnswers gives the headers of the GET (ETag, Vary, Content-Encoding) for the same encoding
    app.add_middleware(CompressAnswers, files=(f"{DOCS_STATIC}/",))
    app.add_middleware(EdgeGuard, settings=settings)  # keys, load shedding, body limits: before any body is read

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, EdgeAnswer):  # the guard's own, raised while the body arrived: worded already
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        if exc.detail == UNPARSED and (failed := spool_failure(exc)) is not None:  # an upload not written to TMPDIR
            logger.warning("%s %s: the form parser could not write an upload: %s", request.method, request.url.path,
                           failed)
            return JSONResponse({"detail": SPOOL_FAILED.format(why=failed.strerror or failed)}, status_code=503,
                                headers={"retry-after": str(settings.retry_after_s)})
        detail = exc.detail
        if exc.status_code == 413 and detail == "Content Too Large":  # Starlette's body limit, while streaming
            detail = body_limit_detail(settings, request.method, route_path(request.scope),  # as the guard's own
                                       content_type=request.headers.get("content-type", ""))
        if exc.status_code == 400 and isinstance(detail, str):
            detail = _form_refusal(settings, request, exc)
        if exc.status_code == 404 and detail == "Not Found" and (bare := _without_slash(app, request.scope)):
            detail = f"no route {request.url.path}: send the request to {bare} (without the trailing slash)"
        field = {"field": exc.field} if isinstance(exc, FieldError) else {}  # the parameter it is about
        return JSONResponse({"detail": detail, **field}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        for err in exc.errors():  # a photo field that holds no file: say how to send one
            loc = tuple(err.get("loc", ()))
            if len(loc) >= 2 and loc[0] == "body" and loc[1] in ("images", "image"):
                error = photo_field_error(str(loc[1]), request.headers.get("content-type", ""))
                return JSONResponse({"detail": error.detail}, status_code=error.status_code)
        if getattr(request.scope.get("route"), "path", None) == species.VENOMOUS_ROUTE:  # one line: what to send
            error = species.venomous_body_error(exc.errors(), request.headers.get("content-type", ""))
            return JSONResponse({"detail": error}, status_code=422)
        return await request_validation_exception_handler(request, exc)

    @app.exception_handler(RuntimeError)
    @app.exception_handler(OSError)
    async def store_unreachable(request: Request, exc: Exception) -> JSONResponse:
        """A failure of the gallery's store on any route (:func:`store_answer`: an outage's 503, a damaged local
        store's 500). Any other RuntimeError or OSError is a bug: raised on, a 500 with its traceback in the log."""
        service = getattr(request.app.state, "service", None)
        answer = store_answer(exc, service.gallery.store_uri if service is not None else None)
        if answer is None:
            raise exc
        return JSONResponse({"detail": answer.detail}, status_code=answer.status_code, headers=answer.headers)

    @app.middleware("http")
    async def observe(request: Request, call_next: RequestResponseEndpoint) -> Response:
        start = time.perf_counter()
        status = 500  # what the server answers a request that raised
        said = REQUEST.set(f"{request.method} {request.url.path}")  # named by the log lines of its 5xx
        routed = route_path(request.scope)  # behind a root_path too; before routing changes the scope
        try:
            response = await call_next(request)
            status = response.status_code
            if routed in DOCS_PAGES:  # the docs' API-key field, as the page's: never framed
                response.headers.update(PAGE_HEADERS)
            return response
        finally:  # a request that raised is counted too (as the 500 it is answered)
            path = _route_path(app, request, routed)
            m = app.state.metrics
            method = request.method if request.method in HTTP_METHODS else "other"  # no label per invented method
            m.requests.labels(method, path, str(status)).inc()
            m.latency.labels(method, path).observe(time.perf_counter() - start)
            REQUEST.reset(said)

    for router in (identify.router, species.router, references.router, health.router):
        app.include_router(router)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def page(request: Request) -> Response:
        return page_response(request)

    return app


#: The page is revalidated at every load (a new version shows at once after an upgrade), and a browser whose copy is
#: current gets a 304 with no body (its ETag): a visit over 2G does not download the page again (walk s54 #12).
PAGE_CACHE = "no-cache"


@dataclass(frozen=True)
class Page:
    """The web page as sent: its bytes and their ETag, and the same gzipped with an ETag of their own."""

    body: bytes
    etag: str
    gzipped: bytes
    gzip_etag: str


@functools.cache
def page_file() -> Page:
    """The web page (``api/static/index.html``) with its ETag (:func:`api.service.etag_of`, as a thumbnail's), and
    gzipped (:func:`api.compression.gzip_bytes`) with that ETag ending ``-gzip`` (another byte sequence, another
    tag), read and compressed once per process: the file is part of the package, changed only by an upgrade, which
    restarts the server."""
    body = (STATIC / "index.html").read_bytes()
    etag = etag_of(body)
    return Page(body, etag, gzip_bytes(body), etag.removesuffix('"') + '-gzip"')


def page_response(request: Request) -> Response:
    """The web page with its ETag (:func:`page_file`), gzipped when the request accepts gzip, or a 304 when
    ``If-None-Match`` names the ETag of the one it would get. Either says ``Vary: Accept-Encoding``."""
    page = page_file()  # revalidated as a thumbnail is
    gzipped = accepts_gzip(request.headers.get("accept-encoding"))
    body, etag = (page.gzipped, page.gzip_etag) if gzipped else (page.body, page.etag)
    headers = {**PAGE_HEADERS, "Cache-Control": PAGE_CACHE, "Vary": "Accept-Encoding"}
    response = revalidated(request, body, etag, "text/html; charset=utf-8", headers)
    if gzipped and response.status_code == 200:  # a 304 has no body to say the encoding of
        response.headers["Content-Encoding"] = "gzip"
    return response
