"""The service behind the HTTP API: one identifier (encoder + gallery), serialised writes, batched encoding.

Every flow goes through :mod:`retrieval.workflows`; what is left here is what only a server needs: the
upload size and decode checks (all or nothing, before any work), and the micro-batcher that lets
concurrent requests share forward passes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from api.batcher import EncodeBatcher
from api.settings import Settings
from index.gallery import Neighbour
from index.lease import is_s3
from index.locks import GIVE_UP_POLL_S, WaitGivenUp
from index.objects import StoreObjectError, unused_uploads, unused_uploads_words
from index.sources import MAX_PHOTO_BYTES, MB, NotAPhotoFile, PhotoTooLarge, SourceRefused, megabytes
from index.store import SpeciesSummary, source_file
from index.store_cache import set_cache_mb
from index.taxonomy import HarmlessFlagRefused, find_species, gallery_lookalikes
from retrieval import workflows
from retrieval.encoders import stack_views
from retrieval.images import ImageLoadError, PixelLimitError, decode_image, header_size
from retrieval.pipeline import model_input
from retrieval.protocol import embedding_note
from retrieval.vote import Rank
from retrieval.workflows import AddResult, Answer, SpeciesNotFound, VenomSet, open_identifier

logger = logging.getLogger(__name__)
#: Thumbnails kept in memory (~10-20 kB each): a page of answers shows up to 20, often the same references.
THUMBNAILS_KEPT = 1024
#: A reference whose photo cannot be read is logged at most once per this many seconds (any client can ask again).
UNREADABLE_LOG_EVERY_S = 600.0
#: How old the count of unused uploads (``/readyz``'s ``uploads``) may get before a ``/readyz`` starts counting again
#: (on a thread of its own: the count reads every row's source path and lists the uploads).
UPLOADS_RECOUNT_S = 3600.0
#: After a count that failed (or could not count: ``unused`` null), the next ``/readyz`` counts again once this long
#: has passed, doubled at each failure in a row up to :data:`UPLOADS_RECOUNT_S`.
UPLOADS_RETRY_S = 60.0


class ServiceError(ValueError):
    """A client error the API turns into a 4xx response."""

    status = 400


class NotFound(ServiceError):
    """The thing asked for does not exist."""

    status = 404


class Refused(ServiceError):
    """A write the gallery's records refuse as it was sent (a harmless flag for a name that may be venomous): the
    message says what to send instead, if anything. A 400, as the add answers the same rule (the page reads a 409
    as "a new species?": api/static/index.html)."""

    status = 400


class StoreUnavailable(ServiceError):
    """The gallery's store could not serve a read now (503 when a later try may get past it, else 500). ``outage``:
    during a store outage, the store and its error for the server's log (the API edge's line, at most one a
    minute, counting the 503s answered meanwhile)."""

    def __init__(self, message: str, *, transient: bool, outage: str | None = None) -> None:
        super().__init__(message)
        self.status = 503 if transient else 500
        self.outage = outage


class TooLarge(ServiceError):
    """The upload is over the size limit."""

    status = 413


class TooManyPixels(TooLarge):
    """The photos of one request hold more pixels than the server decodes for one request."""


class Stopping(ServiceError):
    """The server is stopping: a write that had not begun is refused (nothing written)."""

    status = 503


#: The 503 of a write that reached its turn after the server began to stop.
STOPPING = ("the server is stopping: nothing of this request was written; send it again once the server is back "
            "(Retry-After)")


class BadImage(ServiceError):
    """An upload is not a decodable photo."""

    status = 422


#: Photos a 422 names one by one (:func:`refused`); the rest are counted.
REFUSED_NAMED = 20


def refused(reasons: Sequence[str], total: int) -> str:
    """A 422's one line for the photos of a request of ``total`` that cannot be used (``reasons``: ``name: why``
    each): a single one as it is; several numbered, every one named (up to :data:`REFUSED_NAMED`), so that a client
    fixes them all at once (the request is all or nothing: none was taken)."""
    if len(reasons) == 1:
        return reasons[0]
    named = "; ".join(f"[{i}] {why}" for i, why in enumerate(reasons[:REFUSED_NAMED], 1))
    more = f"; and {len(reasons) - REFUSED_NAMED} more" if len(reasons) > REFUSED_NAMED else ""
    return (f"{len(reasons)} of the {total} photos cannot be used, so none of this request was taken (send it again "
            f"without them, or with them fixed): {named}{more}")


class EmptyGallery(ServiceError):
    """The gallery holds no searchable reference: nothing to compare a photo with."""

    status = 409


#: What identify and search answer (409), ``/readyz`` says and ``serve`` warns while the gallery is empty.
EMPTY_GALLERY = ("this gallery holds no searchable references yet: add some with POST /v1/species/{name}/references "
                 "(with an API key) or 'speciesid references add' (or, if 'speciesid clean --apply' excluded them all, "
                 "bring them back with 'speciesid clean --restore'); identify and search answer once it holds some")


def refused_words(exc: SourceRefused) -> str:
    """What a reference photo's file refused unread (:class:`index.sources.SourceRefused`) is, for an HTTP client:
    no server path; a file too large is over the library's :data:`~index.sources.MAX_PHOTO_BYTES`, which a gallery
    build reads photos at too."""
    if isinstance(exc, PhotoTooLarge):
        return (f"over the {megabytes(MAX_PHOTO_BYTES)} a photo file may have (the limit at which a gallery build "
                "reads photos too)")
    if isinstance(exc, NotAPhotoFile):
        return "not a photo"
    return "not a regular file (a device or a pipe)"


def etag_of(data: bytes) -> str:
    """The ETag the API gives ``data`` (a thumbnail, the web page): the first 32 hex digits of its sha256, quoted as
    an ``ETag`` header holds it."""
    return f'"{hashlib.sha256(data).hexdigest()[:32]}"'


@dataclass(frozen=True)
class Thumbnail:
    """A reference photo's JPEG thumbnail and its ETag, made together (:meth:`SpeciesService.thumbnail`)."""

    data: bytes
    etag: str  # etag_of(data)

    @classmethod
    def of(cls, data: bytes) -> Thumbnail:
        """The thumbnail ``data`` with its tag."""
        return cls(data, etag_of(data))


@dataclass
class Upload:
    """One uploaded photo, decoded and preprocessed (the decoded pixels are not kept: a request holds model inputs,
    not full-size photos)."""

    name: str  # the client's file name
    data: bytes  # the raw bytes (what a write stores)
    size: tuple[int, int]  # (width, height) of the photo as stored (the decode itself may be reduced)
    views: np.ndarray | tuple  # the encoder's input (every view), as the CLI's pipeline makes it
    note: str | None = None  # what the answer is to say of the photo as read (an animated GIF: its first frame)
    blank: str | None = None  # why it cannot be a reference when it is blank (retrieval.images.blank_reason)


class SpeciesService:
    """Identify, search and curate one gallery."""

    def __init__(self, settings: Settings, identifier: workflows.Identifier | None = None) -> None:
        self.settings = settings
        # before the gallery's store connects (a .env file included): every store of the process shares the caps
        set_cache_mb(metadata=settings.store_metadata_cache_mb, index=settings.store_index_cache_mb)
        self.identifier = identifier or open_identifier(
            settings.index, settings.encoder_config(), refresh_s=settings.refresh_s,
            follow_probe=True,  # `probe train` / `probe import` elsewhere: no restart
        )
        self.encoder = self.identifier.encoder
        self.gallery = self.identifier.gallery
        self.gallery.write_wait_s = settings.write_wait_s  # a busy gallery: a prompt 503, not the CLI's 600 s wait
        self.gallery.set_lease_ttl(settings.lease_ttl_s)  # a store on S3: SPECIESID_LEASE_TTL_S, .env included
        self.gallery.compact_fragments = settings.compact_fragments  # SPECIESID_COMPACT_FRAGMENTS, .env included
        self.gallery.stale_reads = True  # the store unreachable: identify answers from the references loaded
        self.gallery.preload_metadata()  # no answer waits on a store lookup for its neighbours' metadata
        self.identifier.far_threshold()  # nor the first answer on estimating it
        self.gallery.species()  # nor an answer's taxa on the species list (kept for a store outage)
        if other := embedding_note(self.gallery.info, self.encoder, queries="this server's photos",  # said once
                                   references=self.gallery.index.ntotal):
            logger.warning("%s", other)
        self.batcher = EncodeBatcher(self.encoder, window_ms=settings.batch_window_ms, max_batch=settings.max_batch)
        self.uploads_dir = self.gallery.layout.uploads
        self._write_lock = threading.Lock()  # this server's turn: one write at a time
        self._state = threading.Condition()  # guards _stopping and _committing (close() and the writes)
        self._stopping = False  # set by close(): no write takes the gallery's lock after it
        self._committing = False  # a write holds the gallery's lock and writes: close() waits for it
        self._uploads: tuple[float, dict | None] | None = None  # (time.monotonic() of the count, unused_uploads)
        self._uploads_lock = threading.Lock()
        self._uploads_counting = False
        self._uploads_failures = 0  # counts in a row that failed or could not count (the back-off's)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="speciesid-decode")
        self._thumbs: OrderedDict[tuple, Thumbnail] = OrderedDict()  # the latest thumbnails served, with their tags
        self._thumb_lock = threading.Lock()
        self._unreadable_said: OrderedDict[int, float] = OrderedDict()  # reference -> when its warning was logged
        self._unreadable_lock = threading.Lock()
        self.uploads_status()  # counted once at start, on a thread of its own (an add a kill cut off left them)

    def uploads_status(self) -> dict | None:
        """The ``uploads`` block of ``/readyz`` (:func:`index.objects.unused_uploads`, worded for an HTTP client): the
        last count, None until the first is done; a count older than :data:`UPLOADS_RECOUNT_S` (or none) starts
        another on a thread of its own, so no request waits on it (the server counts once when it starts). A count
        that failed or could not count is tried again at the first look :data:`UPLOADS_RETRY_S` after it (doubled
        at each failure in a row, up to the hour)."""
        with self._uploads_lock:
            kept = self._uploads
            if (kept is None or time.monotonic() - kept[0] > self._recount_after()) and not self._uploads_counting:
                self._uploads_counting = True
                threading.Thread(target=self._count_uploads, name="speciesid-uploads", daemon=True).start()
        return kept[1] if kept is not None else None

    def _recount_after(self) -> float:
        """Seconds after the last count that the next one starts (:meth:`uploads_status`; under its lock)."""
        if not self._uploads_failures:
            return UPLOADS_RECOUNT_S
        doublings = min(self._uploads_failures - 1, 16)  # capped: 2 ** a long run of failures overflows a float
        return min(UPLOADS_RETRY_S * 2 ** doublings, UPLOADS_RECOUNT_S)

    def _count_uploads(self) -> None:
        """Count the unused uploads (:meth:`uploads_status`); a failure is logged and leaves the count unknown until
        the retry (:data:`UPLOADS_RETRY_S`). Each count that finds some unused logs it (at start, then hourly while
        ``/readyz`` is asked)."""
        try:
            counted = unused_uploads(self.gallery, api=True)
            if counted["unused"]:  # null when it could not be counted now (the note says why)
                logger.warning("gallery %s: %s", self.gallery.root, unused_uploads_words(counted, self.gallery.root))
        except Exception as exc:  # noqa: BLE001 - a thread of its own: nothing to raise to; counted again soon
            logger.warning("the unused uploads of %s were not counted: %s", self.gallery.root, exc)
            counted = None
        with self._uploads_lock:
            failed = counted is None or counted["unused"] is None
            self._uploads_failures = self._uploads_failures + 1 if failed else 0
            self._uploads, self._uploads_counting = (time.monotonic(), counted), False

    def close(self) -> None:
        """Stop background threads, once the write in its commit (an add's, a delete's or a set-venom's, holding the
        gallery's lock) is done: no write is cut half-way by a stop. Every other write is refused (:class:`Stopping`,
        a 503, nothing written): one queued behind this server's write in progress, and one still waiting for the
        gallery's lock (another process's writer, the S3 lease), which stops waiting at once."""
        with self._state:
            self._stopping = True
            if self._committing:
                logger.warning("stopping: waiting for this server's write in progress to finish (an add, a delete "
                               "or a set-venom committing; writes not yet holding the gallery's lock are refused)")
                self._state.wait_for(lambda: not self._committing)
        self.batcher.close()
        self._pool.shutdown(wait=False)

    # ---------------------------------------------------------------- uploads
    def decode(self, files: Sequence[tuple[str, bytes]], *, references: bool = False) -> list[Upload]:
        """Decode every upload or raise (413 / 422) naming the bad ones, every one (:func:`refused`); nothing is kept
        on failure. ``references``: the uploads are to be references: a 422 for photos that cannot be read names
        those too small or blank as well (:meth:`unfit_reference`), so that one answer names every photo to fix."""
        for name, data in files:
            self.check_size(name, len(data))
        self.check_pixels(files)

        def one(item: tuple[str, bytes]) -> Upload | BadImage:
            """The upload decoded, or the BadImage saying why not: said with the others, so that one answer names
            every photo that cannot be used."""
            name, data = item
            try:  # as a gallery build and the CLI turn a photo into the encoder's input: the same embedding
                views, size, note, blank = model_input(data, self.encoder, max_pixels=self.settings.max_pixels,
                                                       name=name)
            except PixelLimitError as exc:  # one line: send it smaller, or (when that would take it) the setting
                return BadImage(exc.advise("send", "ask this server's operator to raise SPECIESID_MAX_PIXELS"))
            except ImageLoadError as exc:
                return BadImage(str(exc))
            return Upload(name=name, data=data, size=size, views=views, note=note, blank=blank)

        done = list(self._pool.map(one, files))
        if any(isinstance(d, BadImage) for d in done):  # in the order sent
            bad = [str(d) if isinstance(d, BadImage) else self.unfit_reference(d) if references else None
                   for d in done]
            raise BadImage(refused([why for why in bad if why], len(files)))
        return [d for d in done if isinstance(d, Upload)]  # every one an Upload

    def unfit_reference(self, upload: Upload) -> str | None:
        """Why ``upload`` cannot be a reference (``name: reason``): under ``min_reference_px`` on its short side, or
        blank (``retrieval.images.blank_reason``); None when it can."""
        least = self.settings.min_reference_px
        if min(upload.size) < least:
            return (f"{upload.name}: {upload.size[0]}x{upload.size[1]} pixels is too small for a reference photo "
                    f"(at least {least} px on the short side)")
        return f"{upload.name}: {upload.blank}" if upload.blank else None

    @property
    def upload_limit(self) -> int:
        """The most bytes one photo may have (``max_upload_mb``)."""
        return int(self.settings.max_upload_mb * MB)

    def check_size(self, name: str, size: int) -> None:
        """TooLarge (413) when the photo ``name`` of ``size`` bytes is over :attr:`upload_limit`."""
        if size > self.upload_limit:
            raise TooLarge(f"{name}: {megabytes(size)} is over this server's limit of "
                           f"{self.settings.max_upload_mb:g} MB a photo (ask its operator to raise "
                           "SPECIESID_MAX_UPLOAD_MB)")

    def check_pixels(self, files: Sequence[tuple[str, bytes]]) -> None:
        """TooManyPixels (413) when the photos' sizes, read from their headers, sum past the request's budget
        (``max_request_megapixels``); what is not a photo is left to the decode, which names it (422)."""
        budget = self.settings.max_request_megapixels
        sizes = [header_size(data) for _, data in files]
        total = sum(w * h for w, h in (s for s in sizes if s is not None)) / 1e6
        if total > budget:
            what = f"the {len(files)} photos of this request hold" if len(files) > 1 else f"{files[0][0]} holds"
            raise TooManyPixels(f"{what} {total:,.1f} megapixels, over this server's limit of {budget:g} per request: "
                                "send fewer or smaller photos per request, or have the server's operator raise "
                                "SPECIESID_MAX_REQUEST_MEGAPIXELS")

    def embed(self, uploads: Sequence[Upload]) -> np.ndarray:
        """(n, dim) embeddings, through the shared batcher."""
        tensors = stack_views([u.views for u in uploads])
        return self.batcher.encode(tensors)

    # ------------------------------------------------------------------ reads
    @property
    def empty(self) -> bool:
        """Whether the gallery holds no searchable reference now (other processes' writes seen, ``refresh_s`` late
        at most); costs no store round trip within ``refresh_s`` of the last look."""
        self.gallery.refresh()
        return not self.gallery.index.ntotal

    def require_references(self) -> None:
        """EmptyGallery (409) while the gallery holds no searchable reference: checked before any photo is decoded."""
        if self.empty:
            raise EmptyGallery(EMPTY_GALLERY)

    def identify(
        self, uploads: Sequence[Upload], *, top: int = 5, rank: Rank = Rank.SPECIES, country: str | None = None
    ) -> Answer:
        """One answer for the photos of one observation, with the candidates at the asked rank."""
        self.require_references()
        answer = workflows.identify(self.identifier, embeddings=self.embed(uploads), names=[u.name for u in uploads],
                                    observation=True, top=top, rank=rank, country=country)[0]
        answer.notes += workflows.photo_notes([u.name for u in uploads], [u.note for u in uploads])  # as the CLI's
        return answer

    def answer_notes(self, rank: Rank | str = Rank.SPECIES) -> list[str]:
        """What every answer is to carry (:func:`retrieval.workflows.answer_notes`, worded for an HTTP client): the
        last build into the gallery did not finish; a gallery too small to mark a photo unlike every reference;
        at ``rank`` family, species of no recorded family."""
        return workflows.answer_notes(self.identifier, api=True, rank=rank)

    def search_vector(self, vector: Sequence[float], k: int) -> list[Neighbour]:
        """Neighbours of an embedding (L2-normalised here)."""
        self.require_references()
        return workflows.search(self.identifier, embedding=vector, k=k)

    def search_image(self, upload: Upload, k: int) -> list[Neighbour]:
        """Neighbours of a photo."""
        self.require_references()
        return workflows.search(self.identifier, embedding=self.embed([upload])[0], k=k)

    def require_store(self, what: str) -> None:
        """StoreUnavailable (503) while reads answer from the references loaded: the store's last look failed, or
        the one running has not answered within ``STORE_CHECK_WAIT_S``. ``what`` (the request, plural) needs the
        store itself: answered at once, never after the store's timeouts (a write would hold the gallery's lock,
        which searches take, for them)."""
        self.gallery.refresh()  # waited for STORE_CHECK_WAIT_S at most; a failing store is not looked at each time
        if self.gallery.reading_stale:
            kind = self.gallery.stale_store_kind
            kind = f"{kind} store" if kind else "store"
            raise StoreUnavailable(f"the gallery's {kind} cannot be reached now (a network or storage outage): {what} "
                                   "answer 503 until it answers again, while identify and search answer from the "
                                   "references loaded; retry in the seconds Retry-After says", transient=True,
                                   outage=f"the gallery's {kind} cannot be reached (answered at once: its store "
                                   f"{self.gallery.store_uri} {self.gallery.stale_reason})")

    def species(self) -> list[SpeciesSummary]:
        """Species summaries, read from the store (503 during its outage: :meth:`require_store`)."""
        self.require_store("species lists")
        return workflows.list_species(self.gallery)

    def get_species(self, name: str) -> SpeciesSummary:
        """One species by name (``_`` or ``-`` may stand for the space; any case, accents and hamza aside:
        :func:`index.taxonomy.find_species` ``folded``), or NotFound, naming the gallery
        species the name is the common name or a near-spelling of (:func:`index.taxonomy.gallery_lookalikes`)."""
        held = self.species()
        found = find_species(held, name, folded=True)  # both sides normalised: "Naja-haje", "Vipere a cornes" too
        if found is None:
            same_common, close = gallery_lookalikes(held, name)
            meant = list(dict.fromkeys(s.species for s in same_common + close))
            raise NotFound(f"no species {name!r} in this gallery"
                           + (f"; did you mean {' or '.join(map(repr, meant))}?" if meant else ""))
        return found

    def thumbnail(self, ref_id: int) -> Thumbnail:
        """A JPEG thumbnail of a reference photo and its ETag (503 during the store's outage: :meth:`require_store`).
        Both are kept (the latest :data:`THUMBNAILS_KEPT`) under the photo file's size and modification time as well
        as the id: a photo replaced on disk makes a new thumbnail, and so a new tag; a request hashes nothing."""
        self.require_store("reference photos")
        stored = self.gallery.source_path(ref_id)
        if stored is None:
            raise NotFound(f"no reference with id {ref_id}")
        path = source_file(stored)
        try:  # the file as it is now: a photo replaced or removed on disk is not answered from the cache
            st = os.stat(path)
            key: tuple = (ref_id, str(path), st.st_mtime_ns, st.st_size)
        except OSError:  # a member of a tar shard (SHARD#MEMBER), or gone: read below, which says so
            key = (ref_id, str(path))
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:  # decoded at reduced scale: a 12 MP phone photo would cost ~0.3 s at full size, on every page view
            data = self.gallery.read_photo(stored)  # at most MAX_PHOTO_BYTES: every photo a gallery build read
            image = decode_image(data, max_pixels=self.settings.max_pixels, name=str(path),
                                 draft=2 * self.settings.thumbnail_px)
        except StoreObjectError as exc:  # an upload kept in the S3 store, there but not readable now
            logger.warning("reference %d: its photo %s cannot be read from the gallery's store: %s", ref_id, stored,
                           exc)
            raise StoreUnavailable(f"the photo of reference {ref_id} is kept in the gallery's store, which could not "
                                   "be read now" + ("; retry shortly" if exc.transient else " (the server's log "
                                                    "says what to fix)"), transient=exc.transient) from exc
        except SourceRefused as exc:  # a FIFO, a device, a huge file where the photo was: refused at once, unread
            logger.warning("reference %d: its photo at %s is refused unread: %s", ref_id, path, exc.reason)
            raise NotFound(f"the photo of reference {ref_id} cannot be shown: its file on this server is "
                           f"{refused_words(exc)}. The reference itself is valid: the "
                           "server's operator can put the photo back as a plain file (the server's log names "
                           "it)") from exc
        except PixelLimitError as exc:  # a 16-bit scan, a huge PNG: its decode would cost more than a photo may
            logger.warning("reference %d: its photo is over the pixel limit: %s", ref_id, exc)
            raise NotFound(f"the photo of reference {ref_id} cannot be shown: it has more pixels than this server "
                           "decodes for a photo (SPECIESID_MAX_PIXELS; a 16-bit or transparent photo's pixels count "
                           "2-3 times). The reference itself is valid: the server's operator can replace its file by "
                           "an 8-bit JPEG of it, or raise the limit") from exc
        except (OSError, ImageLoadError) as exc:  # the path stays in the server's log, never in an answer
            if self._say_unreadable(ref_id):  # the path once: an OSError's own text names it again
                why = exc.strerror if isinstance(exc, OSError) and exc.filename and exc.strerror else exc
                logger.warning("reference %d: its photo is no longer readable at %s: %s (said at most once per "
                               "%.0f min for a reference)", ref_id, path, why, UNREADABLE_LOG_EVERY_S / 60)
            if is_s3(stored):  # an upload kept in the shared store: every machine reads it there, no folder to sync
                raise NotFound(f"the photo of reference {ref_id} is no longer in the gallery's store (deleted "
                               "there?); the reference itself is valid: add its photo again") from exc
            raise NotFound(f"the photo of reference {ref_id} is not on this server's machine: it was added through "
                           "another machine that shares this gallery's store, or moved or deleted here. The "
                           "reference itself is valid: restore the photo on this machine (or sync the machines' "
                           "uploads folders), or add it here again") from exc
        image.thumbnail((self.settings.thumbnail_px, self.settings.thumbnail_px))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        thumb = Thumbnail.of(buf.getvalue())
        with self._thumb_lock:
            self._thumbs[key] = thumb
            while len(self._thumbs) > THUMBNAILS_KEPT:
                self._thumbs.popitem(last=False)
        return thumb

    def _say_unreadable(self, ref_id: int) -> bool:
        """Whether to log that reference ``ref_id``'s photo cannot be read: not within
        :data:`UNREADABLE_LOG_EVERY_S` of the last time (the last :data:`THUMBNAILS_KEPT` references remembered)."""
        now = time.monotonic()
        with self._unreadable_lock:
            last = self._unreadable_said.get(ref_id)
            if last is not None and now - last < UNREADABLE_LOG_EVERY_S:
                return False
            self._unreadable_said[ref_id] = now
            self._unreadable_said.move_to_end(ref_id)
            while len(self._unreadable_said) > THUMBNAILS_KEPT:
                self._unreadable_said.popitem(last=False)
            return True

    # ----------------------------------------------------------------- writes
    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """This server's turn to write (one write at a time), then the gallery's write lock (another process's
        writer; on S3, another machine's lease) held around the write's store steps. Both waits together last at
        most ``write_wait_s``: the gallery's hold gets the time left after this server's turn, and the write's own
        holds nested in it never wait. Past it a TimeoutError (a 503 with Retry-After) before anything is written,
        so a client answered 503 has nothing written. An add's photos are embedded before this (their time is
        not counted in ``write_wait_s``), so neither lock is held while the model runs: other writers wait only
        for the write itself (the species check, the upload files, the digest re-check, ids, commit, index).
        Once the server is stopping (:meth:`close`), a write waiting for either is refused (:class:`Stopping`, a 503,
        nothing written); one holding the gallery's lock finishes."""
        wait = self.settings.write_wait_s
        start = time.monotonic()
        if not self._take_turn(start + wait):
            raise TimeoutError(f"this server's other writes to this gallery have kept this one waiting for over "
                               f"{wait:.0f} s; try again when they are done")
        try:
            with contextlib.ExitStack() as held:
                try:
                    held.enter_context(self.gallery.writing(wait=max(wait - (time.monotonic() - start), 0.0),
                                                            give_up=lambda: self._stopping))
                except WaitGivenUp as exc:  # the server began to stop while this write waited: nothing written
                    raise Stopping(STOPPING) from exc
                with self._state:  # close() sets _stopping under it: a write either commits whole or never starts
                    if self._stopping:
                        raise Stopping(STOPPING)
                    self._committing = True
                try:
                    yield
                finally:
                    with self._state:
                        self._committing = False
                        self._state.notify_all()
        finally:
            self._write_lock.release()

    def _take_turn(self, deadline: float) -> bool:
        """Take this server's turn to write (:meth:`_writing`) by ``deadline`` (time.monotonic()): False when the
        time ran out; :class:`Stopping` once the server is stopping (a write queued behind another is refused,
        nothing written), looked at every :data:`index.locks.GIVE_UP_POLL_S` while it waits."""
        while True:
            left = max(deadline - time.monotonic(), 0.0)
            if self._write_lock.acquire(timeout=min(left, GIVE_UP_POLL_S)):
                if self._stopping:
                    self._write_lock.release()
                    raise Stopping(STOPPING)
                return True
            if self._stopping:
                raise Stopping(STOPPING)
            if left <= 0.0:
                return False

    def add_references(
        self,
        species: str,
        uploads: Sequence[Upload],
        *,
        common_name: str | None = None,
        venomous: bool | None = None,
        new_species: bool = False,
        distinct_from_venomous: bool = False,
    ) -> AddResult:
        """Store the photos as references of ``species`` (created if new); searchable when this returns.
        ``new_species``: a new name that looks like a gallery species is meant (else refused, a 409). 503 during
        the store's outage (:meth:`require_store`: a write would hold the gallery's lock, which searches take)."""
        self.require_store("writes")
        workflows.check_new_references(self.gallery, species, common_name=common_name, venomous=venomous,
                                       new_species=new_species, distinct_from_venomous=distinct_from_venomous,
                                       api=True)
        # a refused name (422, 409) costs no forward pass
        least = self.settings.min_reference_px
        if unfit := [why for why in map(self.unfit_reference, uploads) if why]:  # every one named: none stored
            raise BadImage(refused(unfit, len(uploads)))
        embeddings = self.embed(uploads)  # before any lock: uploads share forward passes, and no writer waits on it
        try:
            with self._writing():
                result = workflows.add_photos(self.gallery, self.encoder, species, [(u.name, u.data) for u in uploads],
                                              common_name=common_name, venomous=venomous, dataset="api",
                                              min_side=least, new_species=new_species, embeddings=embeddings,
                                              api=True, distinct_from_venomous=distinct_from_venomous)
        except workflows.UploadsNotKeptError as exc:  # committed: a 503 whose message says so, and what to send
            self.identifier.whitening()
            raise StoreUnavailable(str(exc), transient=True) from exc
        self.identifier.whitening()  # a new species refits the vote's metric now: on the writer's time, not a reader's
        return result

    def set_venomous(self, name: str, venomous: bool, *,
                     distinct_from_venomous: bool = False) -> tuple[VenomSet, SpeciesSummary]:
        """Set a gallery species' medically important venomous flag on every one of its references (the CLI's
        ``species set-venom``: :func:`retrieval.workflows.set_species_venomous`, the same rule), in this server's
        turn to write; what it did, and the species' summary after it. NotFound (404) for a name the gallery does
        not hold; :class:`Refused` (400, as the add's) for ``venomous`` False on a name that may be venomous, unless
        ``distinct_from_venomous`` (never for one the shipped taxonomy records venomous), both before the wait for
        the gallery's write lock (and again under it); 503 during the store's
        outage (:meth:`require_store`). This server's answers see the change at once, another process's at its next
        look at the store (the edit the store records: :meth:`index.gallery.Gallery.set_venomous`)."""
        self.require_store("writes")
        try:  # a misspelt name or a refused flag answered before the wait for the lock (on S3: the lease)
            workflows.check_species_venomous(self.gallery, name, venomous, api=True,
                                             distinct_from_venomous=distinct_from_venomous)
            with self._writing():  # checked again under it: another writer may have changed the species
                done = workflows.set_species_venomous(self.gallery, name, venomous, api=True,
                                                      distinct_from_venomous=distinct_from_venomous)
        except SpeciesNotFound as exc:
            raise NotFound(str(exc)) from exc
        except HarmlessFlagRefused as exc:
            raise Refused(str(exc)) from exc
        return done, self.get_species(done.species)

    def delete_reference(self, ref_id: int) -> None:
        """Delete one reference (and its uploaded photo, when no other reference uses it); 503 during the store's
        outage (:meth:`require_store`)."""
        self.require_store("writes")
        with self._writing():
            if not workflows.delete_references(self.gallery, [ref_id]):
                raise NotFound(f"no reference with id {ref_id}")
        self.identifier.whitening()
