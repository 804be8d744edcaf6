"""A gallery directory: the LanceDB store (truth) + the FAISS index derived from it.

The folder's files are named in :mod:`index.layout`. Writes go to the store first, then the derived index; a crash in between is repaired on the next open
(the manifest's store version no longer matches, so the index is rebuilt from the store).

The store may live elsewhere: ``gallery.json`` may name an object-store URI (``"store": {"uri": "s3://…",
"options": {...}}``, never credentials: those come from the AWS_* environment or ``storage_options``), so
workers on other machines write to it; the folder itself (gallery.json, ids.json, the lock, the vector
index) stays on the serving machine. Distributed builds reserve ids (:meth:`Gallery.reserve_ids`) and
commit the fragments their workers wrote (:meth:`Gallery.commit_fragments`) under the write lock. A store on S3
is written by several machines (copies of the folder) safely: the write lock then also holds the store's write
lease (:mod:`index.lease`), and the id high-water mark is shared in the store beside it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from index import ivfpq
from index.atomic import is_leftover, remove_leftovers, write_json_atomic
from index.compaction import (
    AUTO_PRUNE_AGE,
    AUTO_PRUNE_EVERY,
    COMPACT_ENV,
    CompactionCounts,
    compact_fragments_default,
)
from index.errors import StoreFilesMissingError, TableReplacedError, first_line, first_words, store_io_failure
from index.formats import (
    GALLERY_FORMAT,
    PROBE_FORMAT,
    WRITTEN_BY,
    NewerFormatError,
    check_format,
    speciesid_version,
)
from index.ivfpq import MapFn
from index.layout import WRITE_LOCK, EncoderMismatchError, GalleryLayout, check_encoder
from index.lease import LeaseError, S3Lease, canonical_s3_uri, half_created_objects, is_s3
from index.locks import WriteLock, write_lock
from index.objects import StoreObjects
from index.records import ReferenceRecord
from index.sources import read_source
from index.store import (
    CompactReport,
    HalfCreatedStoreError,
    MissingTableError,
    ReferenceStore,
    SpeciesSummary,
    StoreVectors,
    is_uri,
    public_options,
    source_file,
    source_text,
    storage_options,
)
from index.vectors import (
    SearchIndex,
    VectorIndex,
    VectorIndexConfig,
    as_vectors,
    in_sorted,
    load_index,
    manifest_path,
    one_row_per_id,
    read_manifest,
    report_repeated_ids,
    sorted_unique,
)

logger = logging.getLogger(__name__)

#: Stored vectors kept in memory for the whitened vote's re-rank when the index keeps none (ivf).
VECTOR_CACHE_ROWS = 100_000
#: :meth:`Gallery.preload_metadata` (at a server's start) reads the metadata of galleries up to this size.
META_PRELOAD_ROWS = 500_000
#: A lookup of one answer's neighbours costs about as much as scanning this many rows (~8 ms against 0.35 s for
#: 100,000 rows, 2 cores): n answers (one, for a single photo) read the whole metadata first when n x this reaches
#: the gallery's size.
META_LOOKUP_ROWS = 2_000
#: Metadata rows kept from per-answer lookups (~0.85 KB each); past this many the cache starts again.
META_CACHE_ROWS = 1_000_000
#: The longest a server's read (``stale_reads``) waits on the store's look for other processes' writes before it
#: answers from the references loaded. A store that answers takes milliseconds for that look (``store.version`` is
#: ~0.4 ms locally); one that takes seconds is failing, and a client's request should not wait out its retries. Two
#: seconds leaves a slow link room and stays well under a client's patience; /readyz and /metrics wait less
#: (``api.routers.health``), as readiness probes time out after 1 s by default (Kubernetes).
STORE_CHECK_WAIT_S = 2.0
#: The longest pause between looks at a store that failed (they double from ``refresh_s`` up to this).
STORE_RETRY_MAX_S = 30.0
#: How long a look at the store waits for the gallery's lock to read the index (a write of this process holds it
#: longer: that write syncs the index itself, and the look is left for the next pause, not counted as an outage).
_LOCK_TRY_S = 0.5
#: gallery.json's keys an open gallery was made from: kept as opened when it reads the file again
#: (:meth:`Gallery.refresh`: another process recorded something in it).
_OPENED_FROM = ("format", "encoder", "dim", "store", "index")
#: ``update_info``'s ``absent`` when not given: an absent key stands for no value (any update writes it).
_NO_VALUE = object()

__all__ = [
    "GALLERY_FORMAT", "EncoderMismatchError", "Gallery", "Neighbour", "check_gallery_encoder", "gallery_encoder_fix",
    "read_gallery_info",
]


@dataclass
class Neighbour:
    """One reference photo returned by a search, with its metadata."""

    id: int  # stable reference id (store row id)
    similarity: float  # similarity to the query in the vote's metric (cosine, or whitened cosine: retrieval.metric)
    species: str  # binomial
    genus: str | None  # genus name
    family: str | None  # family name
    common_name: str | None  # English common name
    venomous: bool | None  # medically important venomous, when known
    path: str  # source path of the reference photo
    dataset: str | None  # dataset it came from
    cosine: float | None = None  # plain cosine similarity to the query, when the vote's metric is another

    @property
    def plain_cosine(self) -> float:
        """The plain cosine similarity to the query: :attr:`cosine` when the vote's metric is another, else
        :attr:`similarity` (which is then that cosine)."""
        return self.similarity if self.cosine is None else self.cosine

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict: ``similarity`` is the plain cosine (as search answers it), ``vote_similarity`` the
        similarity the vote weighed (the same unless the vote runs on the whitened metric)."""
        out = asdict(self)
        del out["cosine"]
        out["similarity"], out["vote_similarity"] = self.plain_cosine, self.similarity
        return out


def _remove_made_folder(root: Path) -> None:
    """After a failed create, remove the folder that create made, when only its lock file is left in it (under that
    lock): a folder holding just ``.write.lock`` is no gallery, and ``serve`` would call it "not a speciesid
    gallery". A failure to remove it is logged, never raised over the create's own error."""
    try:
        if {c.name for c in root.iterdir()} <= {WRITE_LOCK}:
            (root / WRITE_LOCK).unlink(missing_ok=True)
            root.rmdir()
    except OSError as exc:
        logger.warning("could not remove %s, made by the create that failed: %s", root, exc)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells a file written again (atomically: a new inode) from the one read: (inode, mtime, size); None when
    it cannot be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _foreign(root: Path, *also: str) -> bool:
    """Whether a folder without ``gallery.json`` holds anything but a gallery's lock file, the temporary files of
    interrupted atomic writes (``index.atomic``) and the names ``also``: then it is someone else's folder."""
    return any(c.name != WRITE_LOCK and c.name not in also and not is_leftover(c.name) for c in root.iterdir())


class _StoreCheck:
    """One background look at the store (:meth:`Gallery.refresh` of a server): when it began, when it is done, and
    its outcome (whether the index changed; the error to raise in the reads that waited for it)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.done = threading.Event()
        self.changed = False
        self.error: BaseException | None = None

    @property
    def overdue(self) -> bool:
        """Whether it has run past :data:`STORE_CHECK_WAIT_S` without an answer."""
        return not self.done.is_set() and time.monotonic() - self.started > STORE_CHECK_WAIT_S


def _one_row_per_id(ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows with their first vector per id (:func:`index.vectors.one_row_per_id`), repeats reported."""
    ids, vectors, repeated = one_row_per_id(ids, vectors)
    report_repeated_ids(repeated)
    return ids, vectors


class Gallery:
    """Reference photos with their embeddings, searchable by similarity."""

    def __init__(self, root: Path, info: dict, index_config: VectorIndexConfig, *, refresh_s: float = 1.0,
                 options: dict[str, str] | None = None, make_table: bool = False, new_store: bool = False,
                 info_stamp: tuple[int, int, int] | None = None) -> None:
        """``make_table``: a writer (a build, an add) may make the store's table where none was ever committed (a
        create killed before it committed one); a reader never makes one. ``new_store``: a build's deliberate start
        of a new, empty table where the folder's table was lost (:class:`StoreLostError`). ``info_stamp``:
        gallery.json's stamp taken before ``info`` was read from it (a write in between is read again at the next
        look); None: stat it now (``info`` just written under the folder's lock)."""
        self.root = root
        self.layout = GalleryLayout(root)
        self.info = info
        # gallery.json as read: read again when it changes
        self._info_stamp = info_stamp if info_stamp is not None else _file_stamp(self.layout.info)
        #: gallery.json rewritten by a newer speciesid since it was read (a server's look: :meth:`_look_at_info`):
        #: every write refuses with it; reads go on from the record read before. None: readable.
        self.newer_format: NewerFormatError | None = None
        self.index_config = index_config
        self.refresh_s = refresh_s  # how often reads check for other processes' writes (seconds)
        where = info.get("store") or {}
        self.store_uri: str | Path = where.get("uri") or self.layout.store  # a folder or an object-store URI
        self.storage_options = storage_options(where.get("options"), options) if where.get("uri") else {}
        self._writer = self._write_lock()  # every process's writes (one per folder and process; + the S3 lease)
        # the objects kept beside the table (the API's uploads), on an S3 store only; its client made on first use
        self.objects: StoreObjects | None = StoreObjects(str(self.store_uri), self.storage_options) \
            if is_s3(str(self.store_uri)) else None
        # seconds a write of this object waits for other writers (the lock's, and on S3 the store's lease) before its
        # TimeoutError; None: the lock's own (600 s). A server sets a shorter one: its clients wait on the answer.
        self.write_wait_s: float | None = None
        # small store fragments at which a write compacts them (COMPACT_FRAGMENTS; 0: never); a server sets its own
        self.compact_fragments = compact_fragments_default()
        self._compact_floor = 0  # small fragments the last compaction left (ones it could not merge)
        # fragments LanceDB counts as small (under 100,000 rows) that ours does not (8,192 or more): compactions
        # make them and never rewrite them, so the cheap bound minus these still bounds the small ones
        self._compact_medium = 0
        self.compactions = CompactionCounts()  # this object's writes' compactions (a server's /metrics)
        self._write_depth = 0  # writes of this object entered and not left (a write may call another)
        # a write's compaction, due (decided under the thread lock): run once the thread lock is left, in the hold
        self._compaction_due: tuple[int, bool] | None = None  # (small fragments counted, whether to save after)
        # a write's compaction runs now (outside the thread lock): a look at the store, or a refresh, leaves the
        # versions it commits to it (it moves the index to them itself: ids unchanged), no id column read
        self._compacting = False
        # reads answer from the vector index loaded when the store cannot be read (a server: stale, not down); the
        # CLI leaves it off and fails, saying so. Writes never do.
        self.stale_reads = False
        self._stale_since: float | None = None  # when the store last became unreadable to a stale read
        self._stale_why = ""  # why, as the last failed look found it (stale_reason)
        # stale_reads: the store's look runs in one background thread at most (a read waits STORE_CHECK_WAIT_S)
        self._check: _StoreCheck | None = None  # the look running now
        self._check_guard = threading.Lock()  # guards _check (never held across store I/O)
        self._stale_kind = ""  # the kind of store the last failed look named (S3, GCS; "" when not known)
        self._failures = 0  # looks failed in a row (the pause before the next one doubles with each)
        self._check_error: BaseException | None = None  # a look's error that is not an outage (a table gone, a
        #                                                 bug): raised by every read until a look succeeds
        self.store_checks = 0  # looks at the store started in the background (counted for operators and tests)
        self._replaced: TableReplacedError | None = None  # the table replaced under a server: every read says so
        self._make_table, self._new_store = make_table or new_store, new_store
        try:
            self.store = self._open_store(refresh_s)
        except (HalfCreatedStoreError, StoreOpenError, StoreHoldsTableError, TimeoutError, LeaseError):  # they say
            raise  # what to do: never re-worded
        except Exception as exc:
            if not where.get("uri"):
                raise
            logger.info("the store %s cannot be opened: %s", where["uri"], exc)  # -v: the store's whole error
            # credentials, endpoint, bucket: one line, the cause first, not lance's text
            raise store_error(where["uri"], exc, self.storage_options.get("aws_endpoint")) from exc
        self._lock = threading.RLock()  # this process's threads
        # id -> its metadata. Ids are never reused; the one edit of a stored row is a species' venomous flag
        # (set_venomous), which no id difference shows: _drop_edited_rows drops those rows at the version after it
        self._meta_cache: dict[int, Neighbour] = {}
        self._files_checked_at, self._files_missing = -float("inf"), None  # check_files: when, what it found
        self._venom_seen: tuple[int, dict[str, tuple[int, int, int]]] | None = None  # (version, store.venom_counts)
        self._edit_seen: tuple[int, str, int] | None = None  # store.venom_edit read with _venom_seen (None: unknown)
        self._meta_scanned = False  # the whole metadata was read once (preload_metadata)
        self._vector_cache: dict[int, np.ndarray] = {}  # id -> stored vector, for indexes that keep none
        self._checked_at = time.monotonic()
        self._info_at = self._checked_at  # gallery.json's last look by a server's refresh (_refresh_behind)
        self._synced_version = -1
        self._index: SearchIndex = None  # type: ignore[assignment]
        self._index = self._load_index()

    def set_lease_ttl(self, ttl_s: float) -> None:
        """A store on S3: the TTL of this process's write lease (``SPECIESID_LEASE_TTL_S`` as a server's settings read
        it, a .env file included); by default the lease reads the environment. No effect on another store. The
        lease's S3 client, made with the former TTL's timeouts, is made again with the new one's."""
        if self._writer.remote is not None:
            self._writer.remote.set_ttl(ttl_s)

    # ----------------------------------------------------------------- opening
    def _write_lock(self) -> WriteLock:
        """The folder's write lock; for a store on S3 it holds the store's write lease too (one lease object per
        lock, so nested writes of one process take it once)."""
        lock = write_lock(self.layout.write_lock)
        uri = str(self.store_uri)
        same = lock.remote is not None and canonical_s3_uri(lock.remote.uri) == canonical_s3_uri(uri)  # s3a:// too
        if lock.remote is not None and not same and not lock.remote.held:
            lock.remote = None  # another store's lease (a create that failed, a folder made again)
        if is_s3(uri) and lock.remote is None:
            lock.remote = S3Lease(uri, self.storage_options)
        return lock

    def _open_store(self, refresh_s: float) -> ReferenceStore:
        """The store. Its table is made only under the write lock: one that does not exist yet (a creator between
        writing gallery.json and making it, or a create killed then) is made once the lock is ours, after the
        creator at work, if any, has made it. A local table left half-created by an interrupted create and
        holding no data is removed under the lock (a creator still at work holds it: its table is complete once
        the lock is ours) and made again; so is one on S3, listed and removed under the store's write lease. One that
        holds data is never removed: its error says what to do."""
        def store(create: bool) -> ReferenceStore:
            return ReferenceStore(self.store_uri, int(self.info["dim"]), refresh_s=refresh_s,
                                  options=self.storage_options, create=create)

        first: HalfCreatedStoreError | None = None
        try:
            opened = store(create=False)
        except MissingTableError:
            pass
        except HalfCreatedStoreError as exc:
            if exc.data or (exc.data is None and self._writer.remote is None):  # holding files, or on an object
                raise  # store without a lease (not S3): never deleted here
            first = exc
        else:
            if self._new_store:
                raise StoreHoldsTableError(f"gallery {self.root}: its store {self.store_uri} holds the gallery's "
                                           "table: --new-store starts a new one only where the table was lost; run "
                                           "the command without it")
            return opened
        seen = self._folder_saw()
        if seen is not None and not self._new_store:  # the table had versions: lost, never made again unasked
            raise StoreLostError(self._lost_message(seen))
        if not self._make_table:  # a reader: nothing is made, nor removed
            if first is not None:
                raise first
            raise StoreOpenError(f"gallery {self.root}: its store {self.store_uri} holds no table yet (a create "
                                 "interrupted before it committed one: no reference was ever added); a read makes "
                                 f"none: run 'speciesid index build --index {self.root} ...' or 'speciesid references "
                                 f"add --index {self.root} ...' (with write access) to make it")
        with contextlib.ExitStack() as held:
            try:
                held.enter_context(self._writer.hold())
            except TimeoutError as exc:  # a writer at work, not a read-only gallery
                raise TimeoutError(f"{exc}; the store's table {self.store_uri} is not made yet, and is made only "
                                   "under that lock") from exc
            except OSError as lock_error:  # a read-only gallery: the lock cannot be taken, nothing can be made
                if first is not None:
                    raise first from lock_error
                raise ValueError(f"gallery {self.root}: its store {self.store_uri} holds no table yet, and it cannot "
                                 f"be made here ({lock_error}): open the gallery with write access once, or "
                                 "rebuild it") from lock_error
            try:
                made = store(create=True)  # made meanwhile by the creator that held the lock, or made now
            except HalfCreatedStoreError as exc:
                if exc.data is None and self._writer.remote is not None:
                    self._remove_half_created_objects(exc)
                else:
                    if exc.data is None or exc.data:
                        raise
                    logger.warning("removing %s: a table left half-created by an interrupted create (no version was "
                                   "committed, no data in it); making it again", exc.where)
                    shutil.rmtree(exc.where)
                made = store(create=True)
            if seen is not None:  # --new-store: ids go on past every id the folder knows was given
                self._continue_ids(seen)
            return made

    def _folder_saw(self) -> dict[str, int] | None:
        """What the folder records of a store that had a committed table: ``store_version`` and ``references`` (the
        saved vector index's manifest: written only once a table version was committed) and ``next_id`` (ids.json,
        past 1 once ids were given). None when it records neither: no version was ever committed (a create killed
        before its first commit), so a missing table may be made."""
        seen: dict[str, int] = {}
        try:
            manifest = json.loads(manifest_path(self.layout.vectors).read_text(encoding="utf-8"))
        except FileNotFoundError:
            manifest = None
        except (OSError, ValueError):  # a damaged manifest is still one that was written: a version was committed
            manifest = {"store_version": 0}
        if isinstance(manifest, dict) and isinstance(manifest.get("store_version"), int):
            seen["store_version"] = manifest["store_version"]
            if isinstance(manifest.get("count"), int):
                seen["references"] = manifest["count"]
        mark = _read_next_id(self.layout.ids)
        if mark is not None and mark > 1:
            seen["next_id"] = mark
        return seen or None

    def ids_given(self) -> int:
        """How many reference ids this folder records as given (its ids.json mark, never lowered: a deleted
        reference's id stays given); 0 when it records none or cannot be read."""
        mark = _read_next_id(self.layout.ids)
        return max(0, mark - 1) if mark is not None else 0

    def _lost_message(self, seen: dict[str, int]) -> str:
        """What :class:`StoreLostError` says: the store, what the folder last saw, and the two ways on."""
        saw = []
        if seen.get("store_version", 0) > 0:
            saw.append(f"store version {seen['store_version']}"
                       + (f" with {seen['references']} references" if "references" in seen else ""))
        elif "store_version" in seen:
            saw.append("a version its saved vector index reflects (its manifest unreadable)")
        if "next_id" in seen:
            saw.append(f"ids up to {seen['next_id'] - 1} given")
        copies = (" Other copies of this folder (other machines) refuse the lost table too, and follow the new one "
                  "after a rebuild") if is_uri(str(self.store_uri)) else ""
        return (f"gallery {self.root}: its store {self.store_uri} no longer holds the gallery's table (its bucket "
                f"emptied, its prefix or folder deleted?), yet this folder last saw it at {', '.join(saw)}. Nothing "
                "was made or changed: restore the store from a backup (the whole store, then run the command again), "
                f"or give those references up and rebuild: 'speciesid index build --index {self.root} --new-store "
                "--dataset ... --root ...' starts a new, empty table and adds the photos (ids go on past the ones "
                f"given: none is given twice).{copies}")

    def _continue_ids(self, seen: dict[str, int]) -> None:
        """After a new table replaced a lost one (``--new-store``, under the write hold): the id mark set past every
        id the folder knows was given (ids.json, and the ids its saved vector index holds, other machines' rows
        included), in ids.json and, on S3, in the store's shared mark, so no id is ever given twice."""
        start = seen.get("next_id", 1)
        try:
            saved, _ = load_index(self.layout.vectors)
            if saved.ntotal:
                start = max(start, int(np.max(saved.ids)) + 1)
        except (OSError, ValueError) as exc:  # the index unreadable: ids.json alone
            logger.warning("gallery %s: its saved vector index is unreadable (%s): ids continue past ids.json's "
                           "mark alone", self.root, first_line(exc, 300))
        lease = self._writer.held_lease
        shared, etag = lease.read_next_id() if lease is not None else (None, None)
        start = max(start, shared or 1)
        if lease is not None:
            lease.write_next_id(start, etag)
        write_json_atomic(self.layout.ids, {"next": start})
        logger.warning("gallery %s: a new, empty table made in its store %s in place of the one lost (last seen at "
                       "store version %s); ids go on from %d", self.root, self.store_uri,
                       seen.get("store_version", "?"), start)

    def _remove_half_created_objects(self, exc: HalfCreatedStoreError) -> None:
        """A table on S3 with no committed version, under the store's lease: its objects are removed when they are
        only Lance's bookkeeping (``_versions/``, ``_transactions/``), as a local folder's are; otherwise
        HalfCreatedStoreError names the data objects and what to do."""
        lease = self._writer.held_lease
        assert lease is not None
        found = half_created_objects(lease, exc.where)
        if found is None:  # a version appeared: not half-created after all (open it again)
            return
        keys, data = found
        if data:
            raise HalfCreatedStoreError(exc.where, data) from exc
        logger.warning("removing %s: a table left half-created by an interrupted create (no version was committed, "
                       "no data in it: %d bookkeeping object(s)); making it again", exc.where, len(keys))
        lease.delete_keys(keys)

    @classmethod
    def create(
        cls,
        root: str | Path,
        encoder: dict,
        *,
        index_config: VectorIndexConfig | None = None,
        weights: str | None = None,
        refresh_s: float = 1.0,
        store: str | None = None,
        options: dict[str, str] | None = None,
        new_store: bool = False,
    ) -> Gallery:
        """Create a new gallery (or open an existing one built with the same encoder, to write to it).

        ``encoder`` is ``Encoder.describe()``: it must hold spec, fingerprint and dim. ``store``: an
        object-store URI for the LanceDB table (default: ``DIR/store``); ``options``: Lance storage options
        beside the AWS_* environment (only non-secret ones are recorded in gallery.json). ``new_store``: an existing
        gallery whose store lost its table (:class:`StoreLostError`) gets a new, empty one, ids going on past the
        folder's.
        """
        root = Path(root)
        if store and not is_uri(store):
            raise ValueError(f"--store takes an object-store URI (s3://bucket/path), not {store!r}; a local "
                             "store always lives in the gallery folder")
        layout = GalleryLayout(root)
        if not layout.info.is_file():
            if root.exists() and not root.is_dir():
                raise ValueError(f"{root} is a file; --index takes a folder (made if missing)")
            if root.is_dir() and _foreign(root, layout.info.name):  # refused before a lock file is put
                # in someone's folder (a gallery.json another creator wrote meanwhile is not foreign: re-checked below)
                raise ValueError(f"{root} exists and is not a speciesid gallery; choose an empty or new --index DIR")
            made = not root.exists()
            root.mkdir(parents=True, exist_ok=True)
            with write_lock(layout.write_lock).hold():  # two creators of one folder: one makes it, the other opens
                if not layout.info.is_file():
                    try:
                        return cls._create_locked(root, encoder, index_config=index_config, weights=weights,
                                                  refresh_s=refresh_s, store=store, options=options)
                    except Exception:
                        if made:
                            _remove_made_folder(root)
                        raise
        gallery = cls.open(root, expected_fingerprint=encoder["fingerprint"], index_config=index_config,
                           refresh_s=refresh_s, options=options, make_table=True, new_store=new_store)
        if store and canonical_s3_uri(str(gallery.store_uri)) != canonical_s3_uri(str(store)):  # s3a:// is s3://
            raise ValueError(f"gallery {root} keeps its store at {gallery.store_uri}, not {store}")
        kept = gallery.info.get("index") if isinstance(gallery.info.get("index"), dict) else {}
        if index_config is not None and {**kept, **asdict(index_config)} != kept:
            # an index asked for explicitly is the gallery's from now on (keys a newer speciesid wrote kept)
            gallery.update_info("index", lambda now: {**(now if isinstance(now, dict) else {}),
                                                      **asdict(index_config)}, opened=True)
        return gallery

    @classmethod
    def _create_locked(cls, root: Path, encoder: dict, *, index_config: VectorIndexConfig | None,
                       weights: str | None, refresh_s: float, store: str | None,
                       options: dict[str, str] | None) -> Gallery:
        """The creation itself, under the write lock, in a folder no gallery is in yet."""
        layout = GalleryLayout(root)
        if _foreign(root):
            raise ValueError(f"{root} exists and is not a speciesid gallery; choose an empty or new --index DIR")
        config = index_config or VectorIndexConfig()
        config.check_width(int(encoder["dim"]), "index_config")
        info = {
            "format": GALLERY_FORMAT,
            WRITTEN_BY: speciesid_version(),  # every write of gallery.json records the version that wrote it
            "encoder": {k: encoder[k] for k in ("spec", "fingerprint", "dim")} | {"weights": weights}
            | {k: encoder[k] for k in ("pool", "views") if k in encoder},  # embedding options (retrieval.encoders)
            "dim": int(encoder["dim"]),
            "index": asdict(config),
            # what embeds its references, recorded from here on (retrieval.protocol.record_embedding): a gallery.json
            # without the key was made by a speciesid before that was recorded
            "embedded_by": [],
        }
        if store:
            info["store"] = {"uri": str(store).rstrip("/"), "options": public_options(storage_options(None, options))}
        write_json_atomic(layout.info, info)
        try:
            gallery = cls(root, info, config, refresh_s=refresh_s, options=options, make_table=True)
            if store and gallery.store.max_id():  # another gallery's rows: two folders' ids would collide
                raise ValueError(f"the store {store} already holds a gallery's references: give this gallery a "
                                 "--store of its own, or use the folder of the gallery that made it (copy that "
                                 "folder to serve it elsewhere)")
            return gallery
        except Exception:  # nothing half-made is left behind: the same command can simply be run again
            write_lock(layout.write_lock).remote = None  # nor the lease of the store it named
            for child in root.iterdir():  # under the lock, in a folder that held no gallery: all but the lock is ours
                if child.name == WRITE_LOCK:
                    continue  # others may be waiting on it: never unlinked
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            raise  # the folder stays, holding only its lock file, which others may be waiting on

    @classmethod
    def open(
        cls,
        root: str | Path,
        *,
        expected_fingerprint: str | None = None,
        index_config: VectorIndexConfig | None = None,
        refresh_s: float = 1.0,
        options: dict[str, str] | None = None,
        make_table: bool = False,
        new_store: bool = False,
    ) -> Gallery:
        """Open an existing gallery; refuse one built by another encoder than ``expected_fingerprint``.

        ``refresh_s``: searches see other processes' writes at most this many seconds late. ``options``:
        storage options for a store at an object-store URI (besides the AWS_* environment). ``make_table``: a
        writer's open, which makes the store's table where none was ever committed (a create killed before it
        committed one; a reader's open says so and makes nothing). A table the folder saw committed and the store no
        longer holds is never made again (:class:`StoreLostError`) unless ``new_store`` says to.
        """
        root = Path(root)
        stamp = _file_stamp(GalleryLayout(root).info)  # before the read: a write in between is read again later
        info = read_gallery_info(root)
        check_probe_format(root)
        if expected_fingerprint is not None:
            check_gallery_encoder(root, info, expected_fingerprint)
        config = index_config or VectorIndexConfig.from_json(info.get("index", {}),
                                                            f'{GalleryLayout(root).info} "index"')
        if make_table:  # a writer's open (index build, references add): said before a build marks the folder; a
            # reader (identify, index info) opens: its saved index may need no ivfpq_m (checked if it builds one)
            config.check_width(int(info["dim"]), f'{GalleryLayout(root).info} "index"')
        return cls(root, info, config, refresh_s=refresh_s, options=options, make_table=make_table,
                   new_store=new_store, info_stamp=stamp)

    @property
    def encoder_spec(self) -> str:
        """Spec string of the encoder that built this gallery."""
        return str(self.info["encoder"]["spec"])

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the encoder that built this gallery."""
        return str(self.info["encoder"]["fingerprint"])

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.info["dim"])

    # ------------------------------------------------------------ derived index
    def _manifest(self) -> dict:
        return {"fingerprint": self.fingerprint, "dim": self.dim, "store_version": self._synced_version,
                "count": self._index.ntotal}

    def _load_index(self) -> SearchIndex:
        """The saved index brought up to the store's version (a diff), or rebuilt when unusable."""
        self._synced_version = self.store.version
        try:
            index, manifest = load_index(self.layout.vectors)
            bad = [k for k in ("fingerprint", "dim") if manifest.get(k) != {"fingerprint": self.fingerprint,
                                                                             "dim": self.dim}[k]]
            if bad:
                raise ValueError(f"made for another {bad[0]}")
        except FileNotFoundError:
            return self._rebuild("missing")
        except ValueError as exc:
            return self._rebuild(f"unreadable ({exc})")
        self._index = index
        saw = manifest.get("store_version")
        if isinstance(saw, int) and saw > self._synced_version:  # a writer's commit since the store was opened
            self.store.refresh()  # (its saved index read just now), or a replaced table: look at the store again
            self._synced_version = self.store.version
        if isinstance(saw, int) and saw > self._synced_version:  # versions only grow: the table was replaced
            logger.log(logging.INFO if self._new_store else logging.WARNING,  # --new-store: said already
                       "gallery %s: its store %s is at version %d, before the version %d its saved index reflects: "
                       "the table was replaced (restored from an older backup, or started anew with 'index build "
                       "--new-store'); the index is rebuilt from it", self.root, self.store_uri, self._synced_version,
                       saw)
            return self._rebuild("of a replaced table")
        if manifest.get("store_version") != self._synced_version or index.ntotal != manifest.get("count"):
            added, removed = self._sync_index()
            logger.info("vector index behind the store (version %s, store %s): %d vectors added, %d removed",
                        manifest.get("store_version"), self._synced_version, added, removed)
            if added or removed:
                self._save_quietly()
        return self._index

    def _rebuild(self, reason: str) -> SearchIndex:
        """At open, an index that cannot be used: built again from the store. A flat / HNSW / IVF one is built in
        memory without the write lock (a reader never waits on writers, and a read-only gallery still opens) and
        saved only if the lock is free; an IVF-PQ one, built in shards into files, under the lock."""
        logger.info("vector index %s: rebuilding from the store", reason)
        kind = self.index_config.resolve(self.store.count())
        if kind == "ivfpq":
            self.rebuild_index()
            return self._index
        version = self.store.version
        ids, vectors = _one_row_per_id(*self.store.vectors())
        self._index = VectorIndex.build(vectors, ids, replace(self.index_config, kind=kind), dim=self.dim)
        self._synced_version = version
        self._save_quietly()
        return self._index

    def rebuild_index(self, *, map_fn: MapFn | None = None) -> SearchIndex:
        """Rebuild the FAISS index from the store's searchable rows and save it atomically.

        An ivfpq index (``auto`` above 50,000 references) is built from the store in shards, never holding
        every vector: ``map_fn`` runs the shards (Ray tasks; default one after another in this process). It reads
        the store and writes only the folder: the store's lease is not taken for it.
        """
        with self._write(local=True):
            self.store.refresh()
            version = self.store.version
            kind = self.index_config.resolve(self.store.count())
            if kind == "ivfpq":
                options = self.index_config.ivfpq_options(self.dim, f'{self.layout.info} "index"')  # refused first
                source = StoreVectors(str(self.store_uri), self.dim, self.storage_options, version)
                self._index = ivfpq.build(source, folder=self.root, map_fn=map_fn, **options)
            else:
                ids, vectors = _one_row_per_id(*self.store.vectors())
                self._index = VectorIndex.build(vectors, ids, replace(self.index_config, kind=kind), dim=self.dim)
                for part in self.layout.vectors_parts():  # an earlier ivfpq index's files
                    part.unlink(missing_ok=True)
            self._synced_version = version
            self._index.save(self.layout.vectors, self._manifest())
            return self._index

    def _sync_index(self) -> tuple[int, int]:
        """Bring the in-memory index to the store's current version by difference; (added, removed).

        Reads the store's id column, adds the vectors of ids the index lacks and removes ids the store no
        longer searches (deleted or excluded): no rebuild, whatever other processes wrote meanwhile.
        """
        with self._lock:
            version = self.store.version
            new, gone, ids, vectors = self._store_difference(self._index.ids)
            self._apply_sync(gone, ids, vectors, version)
            return int(new.size), int(gone.size)

    def _store_difference(self, have: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None,
                                                           np.ndarray | None]:
        """What the store holds against the ids ``have`` indexed: (new ids, gone ids, the new rows' ids and
        vectors, or None, None when nothing is new)."""
        stored = sorted_unique(self.store.ids())  # an id held twice (two S3 writers) indexed once
        new = np.setdiff1d(stored, have, assume_unique=True)
        gone = np.setdiff1d(have, stored, assume_unique=True)
        ids, vectors = (_one_row_per_id(*self.store.vectors(ids=new.tolist())) if new.size else (None, None))
        return new, gone, ids, vectors

    def _save_quietly(self) -> None:
        """Save the repaired index if the write lock is free now (a reader must not wait on writers: when it is not,
        the index is served from memory, and the writer saves its own)."""
        if self.newer_format is not None:  # a newer speciesid's folder: this one writes nothing in it
            return
        try:
            with self._writer.hold(timeout=0.0, local=True):  # the folder's own file: not the store's lease
                if self._saved_is_newer():
                    return  # a writer saved a later version (or another kind) meanwhile: ours is not better
                self._index.save(self.layout.vectors, self._manifest())
        except (OSError, TimeoutError) as exc:  # e.g. a read-only gallery: serve from memory
            logger.info("could not save the repaired vector index: %s", exc)

    def _saved_is_newer(self) -> bool:
        """Whether the index saved on disk reflects a store version past the one this process's index does, or is
        of another kind (an IVF-PQ one written when the gallery grew past the threshold)."""
        saved = read_manifest(self.layout.vectors)
        if saved is None:
            return False
        version = saved.get("store_version")
        return (isinstance(version, int) and version > self._synced_version) or (
            saved.get("kind") not in (None, getattr(self._index, "kind", "ivfpq")))

    def refresh(self, *, force: bool = False, wait: float | None = None) -> bool:
        """See other processes' writes: when the store has a newer version, sync the index by difference.

        Checked at most every ``refresh_s`` seconds (``force``: now). Returns whether anything changed (as far as
        this call saw). With ``stale_reads`` (a server) the look runs in a background thread, one at a time, and
        this waits for it at most ``wait`` seconds (default :data:`STORE_CHECK_WAIT_S`, never past that after the
        look began): a store that answers late or not at all leaves the read answering from the references loaded
        (logged once per outage), and a failing store is looked at again after a pause that doubles from
        ``refresh_s`` up to :data:`STORE_RETRY_MAX_S`. Only the applying of a finished look takes the lock.
        """
        if self.stale_reads:
            return self._refresh_behind(force, STORE_CHECK_WAIT_S if wait is None else min(wait, STORE_CHECK_WAIT_S))
        now = time.monotonic()
        if not force and now - self._checked_at < self.refresh_s and self._replaced is None:
            return False
        with self._lock:
            self._checked_at = now
            self._look_at_info()
            if force:
                self.store.refresh()
            self._refuse_replaced()  # a command's too: never synced by difference, nor kept
            if self.store.version == self._synced_version or self._compacting:  # a write's compaction (another
                return False  # thread of this process) moves the index to its versions itself: no id column read
            added, removed = self._sync_index()
            if added or removed:
                logger.info("gallery %s: %d references appeared, %d went (store version %d)", self.root, added,
                            removed, self._synced_version)
            return bool(added or removed)

    def _refuse_replaced(self) -> None:
        """:class:`TableReplacedError` when the store's table is at a version before the one this object's index
        reflects (versions only grow: the table it read was lost and another made, or an older backup restored), and
        from then on, whatever version the new table reaches: the index, the metadata and the species it keeps are
        the lost table's. A server says to restart it; a command, to run it again: a new open follows the new table
        (a warning, its index rebuilt from it: :meth:`_load_index`). The version synced is read before the store's: a
        write of this process landing between the two (a server's look runs beside its writes) raises the store's
        alone, never taken for a replaced table."""
        synced = self._synced_version
        version = self.store.version
        if self._replaced is None and version < synced:
            again = "restart the server to serve it" if self.stale_reads else (
                "run the command again: it then rebuilds the gallery's index from the table the store holds now")
            self._replaced = TableReplacedError(
                f"the store {self.store_uri} holds a table at version {version}, before the version "
                f"{synced} this {'server' if self.stale_reads else 'command'} read: its table was "
                f"replaced (made again, or restored from an older backup); {again}")
        if self._replaced is not None:
            raise self._replaced

    def _pause(self) -> float:
        """Seconds between looks at the store: ``refresh_s``, doubled with each look failed in a row (an outage)
        up to :data:`STORE_RETRY_MAX_S`."""
        if not self._failures:
            return self.refresh_s
        return min(STORE_RETRY_MAX_S, max(self.refresh_s, 1.0) * 2.0 ** min(self._failures, 16))  # refresh_s 0 too

    def _refresh_behind(self, force: bool, wait: float) -> bool:
        """:meth:`refresh` of a server: the look in the background, waited for at most ``wait`` seconds."""
        if self._replaced is not None:  # until the process restarts: the index is of the table lost, and a look
            raise self._replaced  # at the new one's version (it may equal the one read) cannot tell what changed
        with self._check_guard:  # gallery.json, a local stat, on refresh_s whatever the store does: a look that
            now = time.monotonic()  # hangs or fails (an outage) must not hold back 'index venom-advice on'
            if force or now - self._info_at >= self.refresh_s:
                self._info_at = now
                self._look_at_info()
        for _ in range(2 if force else 1):  # force: a look begun before the call may miss what it must see
            now = time.monotonic()
            with self._check_guard:
                check = self._check
                if check is None:
                    if not force and now - self._checked_at < self._pause():
                        if self._check_error is not None:  # not an outage: every read says so until a look works
                            raise self._check_error
                        return False
                    self._checked_at = now
                    check = self._check = _StoreCheck(now)
                    self.store_checks += 1
                    try:
                        threading.Thread(target=self._run_check, args=(check, force), daemon=True,
                                         name="speciesid-store-check").start()
                    except BaseException:  # no thread: never a look left "running" for good
                        self._check = None
                        check.done.set()
                        raise
                    force = False
            left = min(wait, check.started + STORE_CHECK_WAIT_S - time.monotonic())
            if not check.done.wait(max(left, 0.0)):
                self._overdue(check)
                return False
            if check.error is not None:
                raise check.error
            if not force:
                return check.changed
        return False

    def _run_check(self, check: _StoreCheck, force: bool) -> None:
        """One look at the store (the background thread of :meth:`refresh`): its I/O without the lock, then the
        index brought to the store's version under it, briefly. Its outcome is left in ``check``."""
        try:  # gallery.json is looked at by the caller (_refresh_behind), whatever this look does
            if force:
                self.store.refresh()
            self._refuse_replaced()  # and every read after, whatever version the new table reaches
            version = self.store.version
            if self._lock.acquire(timeout=_LOCK_TRY_S):  # else a write of this process holds it and syncs the index
                self._sync_behind(check, version)  # itself: not the store's delay, and no outage (a compaction too)
        except (RuntimeError, OSError) as exc:
            kind = store_io_failure(exc, self.store_uri)
            if kind is None:
                check.error = exc  # a damaged store, a table gone: the reads waiting say so, and later reads too
                self._keep_check_error(exc)
            else:
                self._stale_kind = kind
                self._failures += 1
                self._checked_at = time.monotonic()  # the pause counts from the failure, not the look's start
                self._went_stale(f"cannot be read ({first_line(exc, 300)})")
        except Exception as exc:  # noqa: BLE001 - a bug: raised in the reads waiting, never lost in the thread
            check.error = exc
            self._keep_check_error(exc)
        else:
            self._failures = 0
            self._check_error = None
            self._readable_again()
        finally:
            with self._check_guard:
                self._check = None
            check.done.set()

    def _sync_behind(self, check: _StoreCheck, version: int) -> None:
        """The index brought to the store's ``version`` (:meth:`_run_check`, entered holding the lock, which it
        releases): the ids read under it, the store read without it, the rows applied under it again."""
        try:
            if self._compacting or version < self._synced_version:  # a write of this process syncs itself: its
                return  # compaction's versions, or a write committed past the version read (versions only grow)
            synced, have = self._synced_version, self._index.ids.copy()
        finally:
            self._lock.release()
        if version != synced:
            new, gone, ids, vectors = self._store_difference(have)
            if not self._lock.acquire(timeout=_LOCK_TRY_S):  # a write of this process: it syncs itself
                self._checked_at = -float("inf")  # look again at the next read
                return
            try:
                if self._synced_version != synced:  # this process wrote meanwhile: look again at the next read
                    self._checked_at = -float("inf")
                else:
                    self._apply_sync(gone, ids, vectors, version)
                    check.changed = bool(new.size or gone.size)
            finally:
                self._lock.release()
            if check.changed:
                logger.info("gallery %s: %d references appeared, %d went (store version %d)", self.root,
                            new.size, gone.size, version)

    def _apply_sync(self, gone: np.ndarray, ids: np.ndarray | None, vectors: np.ndarray | None,
                    version: int) -> None:
        """Remove ``gone``, add the rows read (call with the lock held): the index then reflects ``version``."""
        if gone.size:
            self._index.remove(gone)
            for i in gone.tolist():  # an id a stale copy of the folder gives again must not show these rows
                self._meta_cache.pop(i, None)
                self._vector_cache.pop(i, None)
        if ids is not None and len(ids):
            self._index.add(vectors, ids)
        self._synced_version = version

    def _keep_check_error(self, exc: BaseException) -> None:
        """A look's error that is not an outage: logged when it is new, raised by every read until a look works."""
        if self._check_error is None or str(self._check_error) != str(exc):
            logger.error("gallery %s: looking at its store %s failed: %s", self.root, self.store_uri,
                         first_line(exc, 300))
        self._check_error = exc

    def _overdue(self, check: _StoreCheck) -> None:
        """A look that has not answered within :data:`STORE_CHECK_WAIT_S`: reads answer from the references
        loaded (said once an outage) while it goes on in the background."""
        with self._check_guard:
            if check.done.is_set():  # it answered just now
                return
        self._went_stale(f"has not answered within {STORE_CHECK_WAIT_S:g} s", since=check.started)

    def _went_stale(self, why: str, since: float | None = None) -> None:
        """Reads answer from the references loaded until the store answers again: logged once an outage."""
        self._stale_why = why
        if self._stale_since is None:
            self._stale_since = time.monotonic() if since is None else since
            logger.warning("gallery %s: its store %s %s: answering from the %d references loaded at store version "
                           "%d until it answers; looked at again after pauses doubling up to %.0f s", self.root,
                           self.store_uri, why, self._index.ntotal, self._synced_version, STORE_RETRY_MAX_S)

    @property
    def reading_stale(self) -> bool:
        """Whether reads answer from the references loaded before a store outage (``stale_reads`` only): the last
        look at the store failed, or the one running has not answered within :data:`STORE_CHECK_WAIT_S`."""
        check = self._check
        return self._stale_since is not None or (check is not None and check.overdue)

    @property
    def stale_store_kind(self) -> str:
        """While :attr:`reading_stale`: the kind of store that fails (``S3``, ``GCS``; ``""`` when not known)."""
        return self._stale_kind or ("S3" if is_s3(str(self.store_uri)) else "")

    @property
    def stale_reason(self) -> str:
        """While :attr:`reading_stale`: why, as the last look found it: ``cannot be read (the store's error)`` or
        ``has not answered within 2 s``."""
        if self._stale_since is None or not self._stale_why:  # a look running past STORE_CHECK_WAIT_S, not said yet
            return f"has not answered within {STORE_CHECK_WAIT_S:g} s"
        return self._stale_why

    def _readable_again(self) -> None:
        """Say that the store answers again, after stale reads."""
        if self._stale_since is not None:
            logger.warning("gallery %s: its store %s answers again (after %.0f s of answers from the references "
                           "loaded before)", self.root, self.store_uri, time.monotonic() - self._stale_since)
            self._stale_since = None

    @property
    def version(self) -> int:
        """The store version the vector index reflects: this process's writes at once, other processes' as a
        search sees them (:meth:`refresh`, at most ``refresh_s`` late). No store round trip (``store.version`` is
        one: ~0.4 ms a call)."""
        return self._synced_version

    @property
    def index(self) -> SearchIndex:
        """The FAISS index (read-only use)."""
        return self._index

    # ------------------------------------------------------------------ writes
    def reserve_ids(self, n: int) -> list[int]:
        """``n`` ids never used before, for rows written by other processes (workers) and committed later
        with :meth:`commit_fragments`. Takes the write lock for the few milliseconds it needs."""
        with self._write():
            return self._reserve_ids(n)

    def commit_fragments(self, fragments: Sequence[str], digests: dict[int, str]) -> dict[int, int]:
        """Commit Lance fragments written by workers (one Append), under the write lock.

        ``digests``: id -> sha256 of every row in the fragments. A photo another process stored since the
        caller checked is deleted again right after the commit (the earlier copy stays); returns
        {deleted id: the stored id it repeats}. The vector index is brought up to date by difference
        (not saved: :meth:`finish_build` rebuilds it).
        """
        from index.fragments import commit_fragments

        with self._write():
            self.store.refresh()
            self._refuse_replaced()
            stored = self.store.find_sha256(digests.values()) if digests else {}
            repeats = {rid: stored[sha] for rid, sha in digests.items() if sha in stored}
            self._writer.check()
            if fragments:
                commit_fragments(self.store.uri, fragments, self.store.version, self.storage_options)
                self.store.refresh()
            if repeats:
                self.store.delete(list(repeats))
                logger.info("%d photo(s) stored meanwhile by another process were not stored again", len(repeats))
            self._after_write(save=False)
            return repeats

    def _reserve_ids(self, n: int) -> list[int]:
        """``n`` ids never used before, by any process (call with the write lock held).

        The high-water mark in ``ids.json`` is written before the rows, so a crash in between leaves a gap,
        never a reuse; deleting the highest id does not lower it. A store on S3 keeps the mark every machine
        shares (``_speciesid/ids.json`` beside the table, read and written under the store's lease, before the
        local copy), so copies of this folder on other machines never give one id twice.
        """
        path = self.layout.ids
        try:
            start = int(json.loads(path.read_text(encoding="utf-8"))["next"])
        except FileNotFoundError:
            start = self.store.max_id() + 1
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("%s unreadable (%s): next id recomputed from the store", path, exc)
            start = self.store.max_id() + 1
        lease = self._writer.held_lease
        shared, etag = lease.read_next_id() if lease is not None else (None, None)
        if shared is not None:
            start = max(start, shared)
        if shared is None and is_uri(str(self.store_uri)):  # a copy of this folder elsewhere writes the same store
            # with its own ids.json, and no shared mark yet: step over every id the store holds (excluded too)
            start = max(start, self.store.max_id() + 1)
        if lease is not None:
            lease.write_next_id(start + n, etag)  # the shared mark first: every machine steps over these ids
        write_json_atomic(path, {"next": start + n})
        return list(range(start, start + n))

    def add(
        self,
        records: Sequence[ReferenceRecord],
        sha256s: Sequence[str],
        embeddings: np.ndarray,
        *,
        save_index: bool = True,
    ) -> list[int]:
        """Store new references and make them searchable at once; returns the ids of the rows stored.

        ``embeddings`` are stored as given: unit-length rows (the search is an inner product; retrieval's adds scale
        them, :func:`retrieval.pipeline.given_embeddings`).

        Photos whose bytes are already stored (by any process) or repeat an earlier photo of the call are
        not stored again: see :meth:`add_unique` for which ones.
        """
        return self.add_unique(records, sha256s, embeddings, save_index=save_index)[0]

    def add_unique(
        self,
        records: Sequence[ReferenceRecord],
        sha256s: Sequence[str],
        embeddings: np.ndarray,
        *,
        save_index: bool = True,
        before_commit: Callable[[], None] | None = None,
    ) -> tuple[list[int], dict[int, int | None]]:
        """Store the references whose bytes are new, in one commit; (their ids, {position: id it repeats}).

        Under the write lock: the digests are checked against the store's latest version, ids are reserved,
        the rows committed, the index synced (other processes' writes included) and saved. A repeat of an
        earlier photo of the same call maps to None.

        ``before_commit``: called under the write lock, the store at its latest version, just before the rows are
        committed (not when all are duplicates): what the store holds then is what the commit adds to (e.g.
        whether the species existed: :meth:`index.store.ReferenceStore.has_species`), whatever other writers did
        while this one waited.
        """
        # checked before anything is committed: a NaN / inf row in the store would leave a gallery no one can open
        embeddings = as_vectors(embeddings, "embeddings", self.dim)
        if len(embeddings) != len(records) or len(sha256s) != len(records):
            raise ValueError(f"{len(records)} records, {len(sha256s)} digests and {len(embeddings)} embeddings: "
                             "one of each per photo")
        with self._store_write() as alone:  # before any id is given or row committed
            stored = self.store.find_sha256(sha256s)
            keep: list[int] = []
            dropped: dict[int, int | None] = {}
            seen: set[str] = set()
            for i, sha in enumerate(sha256s):
                if sha in stored:
                    dropped[i] = stored[sha]
                elif sha in seen:
                    dropped[i] = None
                else:
                    seen.add(sha)
                    keep.append(i)
            if not keep:
                return [], dropped
            ids = self._reserve_ids(len(keep))
            if before_commit is not None:
                before_commit()
            self._writer.check()  # on S3: the store's lease is still ours, after the ids and the caller's look
            self.store.add([records[i] for i in keep], [sha256s[i] for i in keep], embeddings[keep],
                           self.fingerprint, ids)
            self._cache_added([records[i] for i in keep], ids)
            if alone:  # the index only lacks our rows: no need to read the store's ids
                self._index.add(embeddings[keep], np.asarray(ids, dtype=np.int64))
                self._synced_version = self.store.version
            else:
                self._sync_index()
            self._after_write(save=save_index)
            return ids, dropped

    def delete(self, ids: Sequence[int]) -> int:
        """Delete references by id; returns how many existed."""
        with self._store_write() as alone:
            found = self.store.delete(ids)
            if found:
                if alone:  # the index differs from the store only by these ids: no id column read
                    self._apply_sync(np.asarray([int(i) for i in ids], dtype=np.int64), None, None,
                                     self.store.version)
                else:
                    self._sync_index()
                self._after_write(save=True)
            return found

    def set_excluded(self, ids: Sequence[int], excluded: bool = True) -> int:
        """Leave references out of search and probe training (or bring them back); nothing is deleted.

        The store is written first; the index then follows it: by these ids alone when no other writer committed
        since the last sync (the rows they leave out are removed, the rows they bring back read by id and added),
        else by difference (the store's id column read). Returns how many of ``ids`` exist.
        """
        with self._store_write() as alone:
            found = self.store.set_excluded(ids, excluded)
            if found:
                if alone:  # the index differs from the store only by these ids: no id column read
                    self._exclude_in_index(sorted_unique(np.asarray([int(i) for i in ids], dtype=np.int64)),
                                           excluded)
                else:
                    self._sync_index()
                self._after_write(save=True)
            return found

    def set_venomous(self, species: str, venomous: bool) -> tuple[int, int, int]:
        """Set the venomous flag of every reference of ``species`` (``speciesid species set-venom``); returns (how
        many it holds, how many said otherwise and were set, how many of those said yes: ReferenceStore.set_venomous);
        nothing is written when none is held or every one
        says so already. No vector changes: the index only follows the store's version, and is not saved (a saved
        index versions behind is brought up by difference at the next open: the id column read, no vector); this
        process's cached metadata of the rows goes, and another process's once it reads the new version, by the
        edit the store records (:meth:`ReferenceStore.venom_edit`, read by :meth:`_drop_edited_rows`), an add of
        the species after it included."""
        with self._store_write() as alone:
            found, changed, turned_off = self.store.set_venomous(species, venomous)
            if changed:
                if alone:  # no row came or went: the index is the store's new version as it is
                    self._synced_version = self.store.version
                else:
                    self._sync_index()
                self._forget_species({species})  # the rows' flags changed (the one edit of a stored row)
                self._after_write(save=False)
            return found, changed, turned_off

    def _exclude_in_index(self, ids: np.ndarray, excluded: bool) -> None:
        """The index brought to the store's version after this writer's ``set_excluded`` of the sorted ``ids``
        alone (call in the write, the thread lock held): excluded ones removed, or the rows brought back that the
        index lacks read by id and added (an id deleted, or never excluded, changes nothing)."""
        if excluded:
            self._apply_sync(ids, None, None, self.store.version)
            return
        lacking = ids[~in_sorted(ids, self._index.ids)]
        got, vectors = _one_row_per_id(*self.store.vectors(ids=lacking.tolist())) if lacking.size else (None, None)
        self._apply_sync(np.zeros(0, dtype=np.int64), got, vectors, self.store.version)

    def compact(self, *, prune_older_than: dt.timedelta | None = None) -> CompactReport:
        """Merge the store's small fragments (:meth:`index.store.ReferenceStore.compact`; bigger ones are never
        rewritten), bring the scalar indexes over the new rows, and with ``prune_older_than`` delete its versions
        superseded longer ago than that (:meth:`index.store.ReferenceStore.prune_versions`; never the latest; a zero
        age, when no writer can be writing outside this hold, the files no version uses too:
        :meth:`_unverified_kept_because`, said in the report). A store write: under the write lock (on S3 the
        store's lease, checked before the commit). Ids and rows are unchanged, so the vector index stays as it is
        (it then reflects the new version) and other processes' syncs find nothing to do."""
        with self._write():
            self.store.refresh()
            before = self.store.version
            synced = self._synced_version == before
            self._writer.check()  # on S3: the store's lease is still ours
            # the indexes first: their commit is then no version a prune of 0 leaves beside the latest
            self.store.index_new_rows()
            zero = prune_older_than == dt.timedelta(0)
            because = self._unverified_kept_because() if zero else ""
            report = replace(self.store.compact(prune_older_than=prune_older_than, unverified=zero and not because),
                             unused_kept_because=because)
            self._compacted(report, pruned=prune_older_than is not None)
            if synced and self.store.version != before:  # the index commit or the merge: ids unchanged
                self._synced_version = self.store.version
                self._index.save(self.layout.vectors, self._manifest())
            return replace(report, version_before=before)  # the index commit counted among the versions made

    def _prune_due(self) -> bool:
        """Whether a write's compaction prunes old versions this time: at most once per :data:`AUTO_PRUNE_EVERY`
        per gallery folder (the time of the last prune: :attr:`GalleryLayout.store_pruned`; missing or unreadable:
        due)."""
        try:
            last = float(json.loads(self.layout.store_pruned.read_text())["pruned_at"])
        except (OSError, ValueError, KeyError, TypeError):
            return True
        return not 0 <= time.time() - last < AUTO_PRUNE_EVERY.total_seconds()

    def _unverified_kept_because(self) -> str:
        """Why, under this folder's write hold, a writer may be writing the store's files ("" when none can): an
        object store (only a local store's writers all take this folder's lock before a file is written), a Ray
        build running or left journalled (its workers write files outside the lock), a build or add marked running.
        With none, a prune of every version but the latest may delete the files no version uses (a killed writer's
        leftovers; :func:`index.store._prune` still keeps them when one is young)."""
        from index.build_mark import any_running
        from index.fragments import list_journals

        if is_uri(str(self.store_uri)):
            return "the store is on an object store, whose writers this folder's lock does not see"
        journals = list_journals(self.root)
        if journals:
            j = journals[0]
            return (f"a Ray build's journal {j['file']} (driver pid {j.get('pid')} on host {j.get('host')}, "
                    f"{j.get('driver')}) may still commit them: see docs/scale.md")
        if any_running(self.root):
            return "a build or add is running"
        return ""

    def _compacted(self, report: CompactReport, *, pruned: bool) -> None:
        """After a compaction: what the next write's check counts from, and the time of a prune."""
        self._compact_floor = report.small_after
        self._compact_medium = max(0, self.store.small_fragments_at_most() - report.small_after)
        if pruned:
            write_json_atomic(self.layout.store_pruned, {"pruned_at": time.time(), "store_version": self.store.version})

    def _after_write(self, *, save: bool) -> None:
        """The end of a store write, under its hold and the thread lock: save the index (``save``) now, or, when a
        compaction is due (:meth:`_compaction_is_due`), after it: the compaction runs once the write leaves the
        thread lock, still in the hold (:meth:`_write`), so that this process's searches do not wait on it, and the
        saved manifest names the compacted version."""
        small = self._compaction_is_due()
        pending = self._compaction_due  # an earlier store write of the same outer write: its save is kept
        if small is not None or pending is not None:
            self._compaction_due = (pending[0] if small is None else small,  # type: ignore[index]
                                    save or (pending is not None and pending[1]))
        elif save:
            self._index.save(self.layout.vectors, self._manifest())

    def _compaction_is_due(self) -> int | None:
        """Whether the store holds :attr:`compact_fragments` small fragments more than the last compaction left
        (0: never): the small fragments counted when due, else None. Under the write's hold and thread lock.

        Most writes decide without reading the manifest: LanceDB's count of fragments under 100,000 rows (from
        the version open) less the medium ones (8,192 rows or more, which compactions make and never rewrite)
        bounds the small ones; the manifest is read only when that bound reaches the threshold. A failing check is
        logged (:meth:`_compaction_failed`), never raised: the write is committed."""
        wanted = self.compact_fragments
        if wanted <= 0:
            return None
        try:
            bound = self.store.small_fragments_at_most()  # no manifest read
            at_most = bound - min(self._compact_medium, bound)
            self._compact_floor = min(self._compact_floor, at_most)  # compacted elsewhere meanwhile
            if at_most < self._compact_floor + wanted:
                return None
            small = self.store.fragment_stats().small
            self._compact_medium = max(0, bound - small)  # the slack: the next writes' bound stays cheap
            self._compact_floor = min(self._compact_floor, small)
            return small if small >= self._compact_floor + wanted else None
        except Exception as exc:  # noqa: BLE001 - maintenance: the user's write is committed already
            self._compaction_failed(exc, None, attempted=False)
            return None

    def _compact_after_write(self, small: int, save: bool) -> None:
        """A write's compaction that was due (:meth:`_after_write`), in the write's hold but outside the thread
        lock: merge the small fragments, pruning versions superseded longer ago than :data:`AUTO_PRUNE_AGE` and
        bringing the scalar indexes over the new rows at most once per :data:`AUTO_PRUNE_EVERY`; then, under the
        thread lock again (briefly), the index moved to the compacted version (ids and rows are unchanged) and
        saved (``save``). Searches of this process go on meanwhile on the index, which the compaction does not
        touch. Best effort: the write is committed, and a failure is logged, never raised (and tried again once
        :attr:`compact_fragments` more have piled up)."""
        self._compacting = True  # before its first commit: a look that sees one leaves it to this
        try:
            self._compact_behind(small, save)
        finally:
            self._compacting = False  # cleared under the lock with the index moved, else here (a Ctrl-C)

    def _compact_behind(self, small: int, save: bool) -> None:
        """:meth:`_compact_after_write`'s work, :attr:`_compacting` set."""
        before: int | None = None
        attempted = False
        try:
            version = self.store.version
            self._writer.check()  # on S3: the store's lease is still ours (a compaction is a store write)
            t0 = time.perf_counter()
            prune = self._prune_due()
            attempted = True
            report = self.store.compact(prune_older_than=AUTO_PRUNE_AGE if prune else None)
            if prune:  # an index merge costs O(all rows) (~0.4 ms per 1,000): daily, not at every compaction
                self.store.index_new_rows()
            self._compacted(report, pruned=prune)
            before = version  # done: the index may move to the version it committed
            took = time.perf_counter() - t0
            self.compactions.runs += 1
            self.compactions.seconds += took
            logger.info("gallery %s: store compacted in %.2f s: %d fragments -> %d (%d small left), %s",
                        self.root, took, report.fragments_before, report.fragments_after,
                        report.small_after, f"{report.versions_removed} old version(s) pruned "
                        f"({report.bytes_removed / 1e6:.1f} MB)" if prune else "no pruning (done in the last day)")
        except Exception as exc:  # noqa: BLE001 - maintenance: the user's write is committed already
            self._compaction_failed(exc, small, attempted=attempted)
        with self._lock:
            self._compacting = False  # with the index moved: a look sees the compacted version synced, or neither
            if before is not None and self._synced_version == before:  # ids unchanged: the index reflects the
                self._synced_version = self.store.version  # new version as it did the old one
            if save:
                self._index.save(self.layout.vectors, self._manifest())

    def _compaction_failed(self, exc: Exception, small: int | None, *, attempted: bool) -> None:
        """A write's compaction (``attempted``), or its check, that failed: counted and logged; tried again once
        :attr:`compact_fragments` more small fragments than ``small`` have piled up (not at every write)."""
        self.compactions.failures += attempted  # a compaction that failed, not a check (the log has both)
        if small is not None:
            self._compact_floor = small
        logger.warning("gallery %s: compacting its store after a write failed (%s); the write itself is stored. "
                       "Reads slow down as small fragments pile up: run 'speciesid index compact --index %s' "
                       "(or set %s=0 to stop trying)", self.root, first_line(exc, 300), self.root, COMPACT_ENV)

    @contextlib.contextmanager
    def _store_write(self) -> Iterator[bool]:
        """A write of the store's rows (add, delete, exclude, a venomous flag): :meth:`_write`, the store at its
        latest version, a replaced table refused and, on S3, the lease checked still ours; yields whether no other
        writer committed since this process's last sync (the index then follows by the write's own rows, with no
        id column read)."""
        with self._write():
            self.store.refresh()
            self._refuse_replaced()
            self._writer.check()
            yield self.store.version == self._synced_version

    @contextlib.contextmanager
    def _write(self, *, local: bool = False) -> Iterator[None]:
        """A write: the cross-process lock first, then this process's thread lock. Waiting for another process's
        writer while holding the thread lock would stall every search of this process (they take it to sync).
        ``local``: a step that writes only the folder's own files (not the store's lease, on S3). It waits up to
        ``write_wait_s`` for other writers."""
        with self._held(self.write_wait_s, local=local):
            outer = self._write_depth == 0
            try:
                with self._lock:
                    self._write_depth += 1
                    try:
                        if outer:  # of writers killed mid-write (no write is in progress now)
                            for left in remove_leftovers(self.root):
                                logger.info("removed %s, left by an interrupted write", left.name)
                        yield
                    finally:
                        self._write_depth -= 1
                if outer and (due := self._compaction_due) is not None:  # in the hold, the thread lock left:
                    self._compaction_due = None  # this process's searches go on
                    self._compact_after_write(*due)
            finally:
                if outer:
                    self._compaction_due = None  # a write that raised after deciding: no compaction

    @property
    def write_waited_s(self) -> float:
        """Seconds this process's writes of the gallery spent waiting for other writers so far (their lock; on S3
        the store's lease): a caller that times its work takes the difference out."""
        return self._writer.waited_s

    @property
    def write_lease_s(self) -> float:
        """Seconds this process's writes of the gallery spent taking the store's write lease so far (on S3; its own
        round trips, no other writer's: not in :attr:`write_waited_s`)."""
        return self._writer.lease_s

    def writing(self, *, local: bool = False, wait: float | None = None,
                give_up: Callable[[], bool] | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the gallery's write lock (across processes) for a few steps that must not interleave. ``local``:
        steps that write only the folder's own files take the folder's lock alone, not the store's lease (on S3);
        a store write nested in them takes the lease itself. It waits up to ``wait`` seconds for other writers
        (default ``write_wait_s``); the writes of this thread nested in it never wait (the lock is re-entrant), so
        a caller that must answer within a deadline holds it around them with the time it has left. A gallery.json
        a newer speciesid wrote since this object read it refuses the write (:class:`index.formats.NewerFormatError`,
        "upgrade speciesid") before anything is written. ``give_up``: looked at while it waits; true ends the wait in
        :class:`index.locks.WaitGivenUp` (a server stopping), nothing held."""
        return self._held(self.write_wait_s if wait is None else wait, local=local, give_up=give_up)

    @contextlib.contextmanager
    def _held(self, wait: float, *, local: bool, give_up: Callable[[], bool] | None = None) -> Iterator[None]:
        """The write lock held (:meth:`writing`), then gallery.json looked at: a newer format refuses the write."""
        with self._writer.hold(wait, local=local, give_up=give_up):
            self._refuse_newer()
            yield

    def _refuse_newer(self) -> None:
        """Raise :class:`index.formats.NewerFormatError` when gallery.json was written by a newer speciesid since
        this object read it (looked at again here: a stat, read when it changed). The CLI refuses such a gallery at
        its open; a server that was running goes on answering from the record read before, and refuses writes."""
        self._look_at_info()
        if self.newer_format is not None:
            raise NewerFormatError(f"{self.newer_format}; nothing was written")

    def record_info(self, key: str, value: object) -> None:
        """Record ``key: value`` in the folder's ``gallery.json`` (the folder's lock; re-read first, so another
        process's entries are kept); nothing when it already reads so."""
        if self.info.get(key) == value:
            return
        self.update_info(key, lambda _: value)

    def update_info(self, key: str, update: Callable[[object], object], *, opened: bool = False,
                    absent: object = _NO_VALUE) -> None:
        """Set ``gallery.json``'s ``key`` to ``update(its value now)`` (None when absent), under the folder's lock,
        the file re-read first (another process's entries are kept, and ``update`` sees the value they left);
        nothing is written when it reads so already, and a write records the speciesid version that made it
        (``written_by``: :mod:`index.formats`). ``absent``: the value an absent ``key`` stands for (venom advice: on):
        updated to it, an absent key stays absent, nothing written. ``opened``: ``key`` is one this gallery was
        opened from (``index``: an index asked for explicitly), replaced here too; such keys are otherwise kept as
        opened. Every writer of gallery.json holds the folder's lock, so the stamp taken after this write is of this
        write."""
        with self.writing(local=True):
            info = read_gallery_info(self.root)
            value = update(info.get(key))
            unchanged = info[key] == value if key in info else absent is not _NO_VALUE and value == absent
            written = info if unchanged else {**info, key: value, WRITTEN_BY: speciesid_version()}
            self.info = {**self._as_opened(written), **({key: value} if opened else {})}
            if unchanged:
                return
            write_json_atomic(self.layout.info, written)
            self._info_stamp = _file_stamp(self.layout.info)

    def _as_opened(self, info: dict) -> dict:
        """``info`` (gallery.json read again) with the keys this gallery was opened from as it opened them."""
        return {**info, **{k: self.info[k] for k in _OPENED_FROM if k in self.info}}

    def _look_at_info(self) -> None:
        """Read ``gallery.json`` again when it was written since this object read it (another process recorded
        something: the checklist a build was run from, what embedded its references), so that a server says it
        without a restart; the keys it was opened from stay as opened. A stat per look at the store; never raises
        (a file that cannot be read is logged, and the record read before kept). One a newer speciesid wrote (a
        higher format) is kept in :attr:`newer_format`: every write refuses with it until gallery.json reads again.
        """
        stamp = _file_stamp(self.layout.info)
        if stamp is None or stamp == self._info_stamp:
            return
        self._info_stamp = stamp
        try:
            info = read_gallery_info(self.root)
        except NewerFormatError as exc:
            self.newer_format = exc
            logger.warning("gallery %s: %s; answers go on from the record read before, and every write (adds, "
                           "deletes, probe changes) is refused until this speciesid is upgraded and restarted",
                           self.root, first_line(exc, 300))
            return
        except ValueError as exc:
            logger.warning("gallery %s: its gallery.json changed and cannot be read (%s); the record read before is "
                           "kept", self.root, first_line(exc, 300))
            return
        self.info = self._as_opened(info)
        self.newer_format = None
        logger.info("gallery %s: gallery.json changed: read again", self.root)

    def save_index(self) -> None:
        """Persist the FAISS index with a manifest matching the store version it reflects.

        An ivfpq index that has grown 4× past the size its quantizers were trained on is rebuilt instead. The
        folder's files only: the store's lease is not taken for it.
        """
        with self._write(local=True):
            if getattr(self._index, "needs_retrain", False):
                logger.info("gallery has grown 4x since the ivfpq index was trained: rebuilding it")
                self.rebuild_index()
                return
            self._index.save(self.layout.vectors, self._manifest())

    def finish_build(self, *, map_fn: MapFn | None = None) -> None:
        """After a bulk build: compact the store (a write's own policy, into bigger fragments:
        :meth:`index.store.ReferenceStore.optimize`), index ``id`` and ``sha256``, pick the index kind for the
        final size, rebuild it (``map_fn`` runs ivfpq shards, e.g. as Ray tasks) and save.

        Only the store's steps hold its lease (on S3): the rebuild writes the folder alone, so it takes the
        folder's lock, and other machines' writers are not kept waiting for it. A commit another machine makes
        meanwhile is in the rebuilt index or is added by difference (the index records the version it read)."""
        with self._write():
            self._writer.check()  # on S3: the store's lease is still ours
            self.store.refresh()
            prune = self._prune_due()
            try:  # the policy of a write's compaction, merging into bigger fragments (a build writes many)
                report = self.store.optimize(prune_older_than=AUTO_PRUNE_AGE if prune else None)
                self._compacted(report, pruned=prune)
            except Exception as exc:  # noqa: BLE001 - the rows are committed; reads work, slower
                logger.warning("gallery %s: compacting or pruning its store after the build failed (%s); the rows "
                               "are stored. Run 'speciesid index compact --index %s'", self.root,
                               first_line(exc, 300), self.root)
                try:  # the build's rows indexed all the same
                    self.store.ensure_scalar_indexes()
                    self.store.index_new_rows()
                except Exception as again:  # noqa: BLE001 - lookups scan the rows then; the index is rebuilt below
                    logger.warning("gallery %s: its store's id / sha256 indexes not made (%s)", self.root,
                                   first_line(again, 300))
        self.rebuild_index(map_fn=map_fn)

    # ------------------------------------------------------------------- reads
    def __len__(self) -> int:
        return self.store.count()

    def __repr__(self) -> str:
        """One short line: folder, searchable references (the index's count: no store read), encoder."""
        try:
            held = f"{self._index.ntotal} references, "
        except Exception:  # noqa: BLE001 - a repr never raises (a gallery half made)
            held = ""
        return f"Gallery({str(self.root)!r}, {held}encoder {self.info.get('encoder', {}).get('spec')!r})"

    def search(self, queries: np.ndarray, k: int) -> list[list[Neighbour]]:
        """Nearest references of each query embedding, best first, with metadata. The queries are used as given (not
        scaled, not checked for zero rows): ``similarity`` is their inner product with the unit-length references, a
        cosine only for unit-length queries."""
        sims, ids = self.nearest(queries, k)
        self.expect_answers(len(ids))
        return [self.neighbours(row_ids, row_sims) for row_ids, row_sims in zip(ids, sims, strict=True)]

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D, I)`` of the ``k`` nearest references of each query embedding: inner products float32 (Q, k) best
        first, ids int64 (Q, k), -1 padded. The references are unit length (the encoder's rows; rows a caller gives
        retrieval are scaled: :func:`retrieval.pipeline.given_embeddings`; :meth:`add` stores its rows as given), so
        ``D`` is the cosine only for unit-length queries: the queries are not scaled here (a query 10 times as long
        gets ``D`` 10 times as large; :func:`retrieval.metric.unit_queries` scales them). No metadata:
        :meth:`neighbours` dresses the ids kept."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.dim:
            raise ValueError(f"query embeddings are {queries.shape[1]}-d but this gallery holds {self.dim}-d")
        self.refresh()
        with self._lock:
            return self._index.search(queries, k)

    def reference_vectors(self, ids: Sequence[int]) -> np.ndarray:
        """The stored embeddings of references ``ids`` (e.g. search results), (len(ids), dim) float32 in that order.

        From the index where it keeps them (flat, hnsw; ivfpq: its re-rank store, float16), else from the store
        (cached, at most :data:`VECTOR_CACHE_ROWS` rows)."""
        ids = [int(i) for i in ids]
        if not ids:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            got = self._index.reconstruct(ids)
            if got is not None:
                return got
            missing = [i for i in dict.fromkeys(ids) if i not in self._vector_cache]
            if missing:
                if len(self._vector_cache) + len(missing) > VECTOR_CACHE_ROWS:
                    self._vector_cache.clear()
                got_ids, vectors = self.store.vectors(ids=missing)
                self._vector_cache.update(zip(got_ids.tolist(), vectors, strict=True))
            return np.stack([self._vector_cache[i] for i in ids]).astype(np.float32, copy=False)

    def preload_metadata(self, max_rows: int = META_PRELOAD_ROWS) -> int:
        """Read the metadata answers are dressed with for every reference, in one scan, so that no answer waits on
        a store lookup (a server calls this at start). Galleries over ``max_rows`` references are left to the
        per-answer lookups (memory). Returns how many rows were read (0: over ``max_rows``)."""
        if self._index.ntotal > max_rows:
            return 0
        t0 = time.perf_counter()
        self._drop_edited_rows()
        n = len(self._cache_metadata(self.store.metadata()))
        self._meta_scanned = True
        logger.info("gallery %s: metadata of %d references read in %.2f s", self.root, n, time.perf_counter() - t0)
        return n

    def expect_answers(self, n: int) -> None:
        """``n`` answers are about to be dressed: read the whole metadata first when that costs less than their
        lookups would (``n`` x :data:`META_LOOKUP_ROWS` >= references; up to :data:`META_PRELOAD_ROWS`)."""
        if not self._meta_scanned and n * META_LOOKUP_ROWS >= self._index.ntotal:
            self.preload_metadata()

    def _cache_metadata(self, df: pd.DataFrame) -> dict[int, Neighbour]:
        """Cache a :meth:`ReferenceStore.metadata` frame as neighbours (similarity 0); returns them by id."""
        cols = {c: df[c].tolist() for c in ("id", "species", "genus", "family", "common_name", "venomous",
                                            "source_path", "dataset")}
        venomous = [None if _opt(v) is None else bool(v) for v in cols["venomous"]]
        fresh = {int(rid): _cached_neighbour(rid, species, genus, family, common, ven, path, dataset)
                 for rid, species, genus, family, common, ven, path, dataset in zip(
                     cols["id"], cols["species"], cols["genus"], cols["family"], cols["common_name"], venomous,
                     cols["source_path"], cols["dataset"], strict=True)}
        self._meta_cache.update(fresh)
        return fresh

    def check_files(self) -> None:
        """:class:`~index.errors.StoreFilesMissingError` when a local store's folder lacks data files of the table's
        version read (deleted or moved from under the gallery: reads and writes of those rows fail), which the look
        at the store's version does not see. Looked at most once per ``refresh_s`` (one manifest read and a stat per
        data file; an object store's never; not during an outage), the last finding kept in between: for a health
        check (/readyz)."""
        if self.reading_stale:  # the store does not answer (an outage): nothing to look at now
            return
        now = time.monotonic()
        if now - self._files_checked_at >= self.refresh_s:
            self._files_checked_at = now
            missing = self.store.missing_data_files()
            self._files_missing = None if not missing else (
                f"Not found: {missing[0]}: {len(missing)} data file(s) of the store's table at version "
                f"{self.store.version} are not in its folder (deleted or moved)")
        if self._files_missing is not None:
            raise StoreFilesMissingError(self._files_missing)

    def _cache_added(self, records: Sequence[ReferenceRecord], ids: Sequence[int]) -> None:
        """Cache the metadata of rows this process just stored, as the store gives it back: answers naming them read
        nothing (and still answer while the store does not: a store outage, docs/api.md)."""
        if len(self._meta_cache) + len(ids) > META_CACHE_ROWS:  # a gallery too big to keep whole: looked up
            return
        for rid, r in zip(ids, records, strict=True):
            self._meta_cache[int(rid)] = _cached_neighbour(rid, r.species, r.genus, r.family, r.common_name,
                                                           r.venomous, source_text(r.path), r.dataset)

    def _drop_edited_rows(self) -> None:
        """At a new version of the index (another process's writes synced), drop the cached metadata of each species
        whose rows' venomous flags were edited (``speciesid species set-venom``): no id changes, so the sync by id
        difference does not see it, and answers would name a row's old flag until a restart. Seen by the edit the
        store records in its manifest (:meth:`ReferenceStore.venom_edit`, one manifest read a synced version, of the
        latest version the store sees: its generation one up, that species' rows go; another change, every row), and
        by the store's venom counts per species (:meth:`ReferenceStore.venom_counts`, the tally answers read at each
        version anyway: an edit of a speciesid that records none lowers one, unless an add raised it back; a delete
        too, at the cost of a lookup). Without the counts, or the edit read then and before (the lance library
        missing), the whole cache goes. Called before rows are cached or used (:meth:`neighbours`,
        :meth:`preload_metadata`)."""
        version = self._synced_version
        seen = self._venom_seen
        if seen is not None and seen[0] == version:
            if seen[1] is None:  # the counts of this version, once something (Identifier.taxa) has read them
                self._venom_seen = (version, self.store.venom_counts(version=version, read=False))
            return
        if not self._meta_cache or seen is None:  # nothing cached to compare: no read but the edit's manifest
            self._venom_seen = (version, self.store.venom_counts(version=version, read=False))
            self._edit_seen = None if self.reading_stale else self.store.venom_edit()
            return
        counts = self.store.venom_counts(version=version, read=not self.reading_stale)
        if counts is None or self.reading_stale:  # the store does not answer: compared once it does
            return
        edit, before, edit_before = self.store.venom_edit(), seen[1], self._edit_seen
        if before is None or edit is None or edit_before is None or (
                edit != edit_before and edit[0] != edit_before[0] + 1):  # unknown, lost, restored: every row goes
            self._forget_species(None)
        else:
            edited = {name for name, was in before.items()
                      if any(n < w for n, w in zip(counts.get(name, (0, 0, 0)), was, strict=True))}
            if edit != edit_before:
                edited.add(edit[1])  # the one edit since (set_venomous): an add after it may hide it from the counts
            if edited:
                self._forget_species(edited)
        self._venom_seen, self._edit_seen = (version, counts), edit

    def _forget_species(self, species: set[str] | None) -> None:
        """Drop the cached metadata of the rows of ``species`` (None: of every row), read again when next asked."""
        if species is None:
            stale = list(self._meta_cache)
            self._meta_cache.clear()
        else:
            stale = [i for i, n in list(self._meta_cache.items()) if n.species in species]  # list(): one copy
            for i in stale:
                self._meta_cache.pop(i, None)
        if stale:
            self._meta_scanned = False  # expect_answers may read the whole metadata again
            logger.debug("gallery %s: cached metadata of %d references dropped (venomous flags edited since)",
                         self.root, len(stale))

    def neighbours(self, ids: Sequence[int], sims: Sequence[float],
                   cosines: Sequence[float] | None = None) -> list[Neighbour]:
        """References ``ids`` with their metadata and the given similarities (``cosines``: their plain cosines, when
        ``sims`` are in another metric), in that order (-1 and ids deleted meanwhile left out). Ids not in the cache
        (see :meth:`expect_answers`) are looked up."""
        wanted = [int(i) for i in ids if i >= 0]
        self._drop_edited_rows()
        # what this call uses is taken out of the shared cache first: another thread may clear it meanwhile
        known = {i: n for i in wanted if (n := self._meta_cache.get(i)) is not None}
        missing = [i for i in wanted if i not in known]
        if missing:
            if len(self._meta_cache) + len(missing) > META_CACHE_ROWS:  # a gallery too big to keep whole
                self._meta_cache.clear()
            known.update(self._cache_metadata(self.store.metadata(missing)))
        out = []
        for k, (rid, sim) in enumerate(zip(ids, sims, strict=True)):
            base = known.get(int(rid))
            if base is not None:
                out.append(replace(base, similarity=float(sim),
                                   cosine=None if cosines is None else float(cosines[k])))
        return out

    def source_path(self, ref_id: int) -> str | None:
        """The stored source of reference ``ref_id``'s photo (a file, or ``SHARD#MEMBER``; excluded ones too), or None
        when there is none. Read from the store on each call, not from the answers' metadata cache: a reference
        another process deleted is gone here as soon as the store shows it (within ``refresh_s``)."""
        meta = self.store.metadata([int(ref_id)])
        return None if meta.empty else str(meta.iloc[0]["source_path"])

    def read_photo(self, source: str | Path, *, limit: int | None = None, setting: str | None = None) -> bytes:
        """The bytes of a reference photo, by its stored source (:meth:`source_path`) or a record's path: an
        ``s3://`` object (an upload kept in an S3 store) read through this store's client, with its own endpoint and
        credentials; else a file or a ``SHARD#MEMBER`` (:func:`index.sources.read_source`: a file that is not a
        regular one, or has over ``limit`` bytes, refused unread; ``setting`` names what sets ``limit``; None: the
        library's :data:`~index.sources.MAX_PHOTO_BYTES`). OSError when it cannot be read (FileNotFoundError: not
        there)."""
        if isinstance(source, str):
            if self.objects is not None and is_s3(source):
                return self.objects.get(source)
            source = source_file(source)
        return read_source(source, limit=limit, setting=setting)

    def species(self) -> list[SpeciesSummary]:
        """Species in the gallery with counts and metadata. With ``stale_reads`` (a server) as of the version the
        index reflects (no store round trip to ask the latest), and during an outage the list read last."""
        return self.store.species(version=self._species_version())

    def species_names(self) -> tuple[list[SpeciesSummary], dict[str, list[str]]]:
        """(:meth:`species`, species -> every common name its references carry) of one version, as :meth:`species`
        reads it (with ``stale_reads``, the index's: no store round trip; else the table's, asked once): a name
        check's list and names (:func:`retrieval.workflows.add_photos`), never of two versions, and never a second
        tally of the table where the first is kept."""
        return self.store.species_names(version=self._species_version())

    def _species_version(self) -> int | None:
        """The store version :meth:`species` and :meth:`species_names` read: None (the table's, asked) unless
        ``stale_reads``; then the one the index reflects, or the one read last when it is that one or the store is
        out (``reading_stale``)."""
        if not self.stale_reads:
            return None
        cached = self.store.cached_species()
        if cached is not None and (cached[0] == self._synced_version or self.reading_stale):
            return cached[0]
        return self._synced_version


class StoreOpenError(ValueError):
    """A gallery's store at an object-store URI could not be opened (unreachable, refused, missing): the folder
    itself is fine (:func:`index.status.folder_status` says what it knows)."""


class StoreHoldsTableError(ValueError):
    """``new_store`` (``index build --new-store``) asked of a gallery whose store opened and still holds its table: a
    new one is started only where the table was lost. Raised as is, never re-worded as a store that cannot be
    opened."""


class StoreLostError(StoreOpenError):
    """A gallery's store holds no table although the folder records that one was committed (its saved index's
    store version, its id mark): the table was lost. Never made again by an open; ``index build --new-store`` starts
    a new one on purpose."""


def _read_next_id(path: Path) -> int | None:
    """The next id ids.json records; None when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))["next"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


def store_error(uri: str, exc: BaseException, endpoint: str | None = None) -> StoreOpenError:
    """A store at ``uri`` (reached at ``endpoint``, when not AWS's own) that cannot be opened, in one line that says
    what to check, the cause and the endpoint first: for an outage (no answer in time, a refused connection, a name
    that does not resolve) the network and the endpoint first. The store's own error comes last, its first line cut
    at a word past :data:`STORE_ERROR_CHARS` (the whole of it is logged under ``-v``)."""
    text = str(exc)
    raw = f" (the store's error: {first_words(text, STORE_ERROR_CHARS)})"
    cause = store_cause(text)  # the cause sits deep in Lance's long message
    endpoint = endpoint or _endpoint_in(text)
    where = f"the endpoint {endpoint}" if endpoint else "the endpoint (AWS_ENDPOINT_URL, or AWS's own)"
    if cause == "AccessDenied" and "ListRequest" in text:  # Lance lists the table's versions at every open
        return StoreOpenError(f"cannot open the store {uri} (AccessDenied): listing it was refused; the credentials "
                              "need s3:ListBucket on its bucket (and s3:GetObject, s3:PutObject, s3:DeleteObject "
                              f"under the store's prefix: the policy in docs/shared-gallery.md){raw}")
    if cause in OUTAGE_CAUSES or (cause is None and "error sending request" in text):  # no answer, not a refusal
        return StoreOpenError(f"cannot open the store {uri}: it did not answer ({cause or 'error sending request'}); "
                              f"check the network and that {where} is up and reachable from this "
                              "machine, then try again; if it is, check the URI and the AWS_* settings (credentials, "
                              f"AWS_REGION, AWS_ENDPOINT_URL){raw}")
    return StoreOpenError(f"cannot open the store {uri}{f' ({cause})' if cause else ''} at {where}; check the URI "
                          "and the AWS_* settings (credentials, AWS_REGION, AWS_ENDPOINT_URL) and that the endpoint is "
                          f"reachable{raw}")


def store_cause(text: str) -> str | None:
    """The cause an object store's error names, among :data:`STORE_CAUSES` (however Lance's clients spell it:
    :data:`CAUSE_SPELLINGS`); None when it names none of them."""
    return next((c for c in STORE_CAUSES if c in text or any(s in text for s in CAUSE_SPELLINGS.get(c, ()))), None)


def _endpoint_in(text: str) -> str | None:
    """The endpoint (``scheme://host[:port]``) of the request a Lance error names (``uri: Some(http://...)``)."""
    found = re.search(r"uri: Some\((https?://[^/\s)?]+)", text)
    return found[1] if found else None


#: How much of the store's error a "cannot open the store" line keeps (its first line, cut at a word past this).
STORE_ERROR_CHARS = 400
#: Causes of :data:`STORE_CAUSES` that say the store did not answer (the network or the endpoint), not refused.
OUTAGE_CAUSES = ("Connection refused", "dns error", "timed out")


#: Causes an object store names deep in Lance's error text, put first in what the user reads.
STORE_CAUSES = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                "Connection refused", "dns error", "timed out")
#: Other spellings of a cause of :data:`STORE_CAUSES` in the errors of Lance's clients (object_store, reqwest,
#: hyper): a store that hangs fails with ``RetryError(... inner: Http(HttpError { kind: Timeout, ...``
#: (walkthrough s50 #2, moto stopped with SIGSTOP).
CAUSE_SPELLINGS = {
    "timed out": ("kind: Timeout", "TimedOut", "deadline has elapsed"),
    "Connection refused": ("ConnectionRefused",),
}


def check_gallery_encoder(root: str | Path, info: dict, fingerprint: str) -> None:
    """Refuse an encoder that did not build the gallery, saying which one did (EncoderMismatchError)."""
    built = info["encoder"]
    check_encoder(f"gallery {root}", built["fingerprint"], fingerprint, fix=gallery_encoder_fix(info))


def gallery_encoder_fix(info: dict) -> str:
    """What to do instead of using another encoder with the gallery of ``info`` (its ``gallery.json``)."""
    built = info["encoder"]
    return (f"use --encoder {built['spec']}" + (f" --weights {built['weights']}" if built.get("weights") else "")
            + " or build a new index in another directory")


def read_gallery_info(root: str | Path) -> dict:
    """Read ``gallery.json``; clear ``ValueError`` when DIR is not a gallery, or when its ``gallery.json`` or
    ``probe.json`` was written by a newer speciesid (a higher format: :func:`index.formats.check_format`)."""
    root = Path(root)
    path = GalleryLayout(root).info
    if not path.is_file():
        raise ValueError(
            f"{root} is not a speciesid gallery (no {path.name}); build one with "
            "'speciesid index build --index DIR ...'"
        )
    rebuild = "rebuild the gallery into a new folder with 'speciesid index build --index NEW_DIR ...'"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError(f"a JSON {type(info).__name__}, not an object")
    except (OSError, ValueError) as exc:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"{path} is unreadable ({exc}); speciesid writes it whole (atomically), so it was changed "
                         f"or damaged by something else: check its permissions, restore it from a backup, or "
                         f"{rebuild}") from exc
    check_format(path, info.get("format"), GALLERY_FORMAT, older=rebuild)
    return info


def check_probe_format(root: str | Path) -> None:
    """Refuse (NewerFormatError) a gallery whose probe.json a newer speciesid wrote, when it is opened: before
    anything is done, not after a write. An unreadable or damaged probe.json passes: its own load says what is
    wrong."""
    probe = GalleryLayout(root).probe_meta
    try:
        probe_format = json.loads(probe.read_text(encoding="utf-8")).get("format") if probe.is_file() else None
    except (OSError, ValueError, AttributeError):
        probe_format = None
    if isinstance(probe_format, int) and probe_format > PROBE_FORMAT:
        check_format(probe, probe_format, PROBE_FORMAT, older="")


def _cached_neighbour(rid: int, species: str, genus: object, family: object, common: object,
                      venomous: bool | None, path: str, dataset: object) -> Neighbour:
    """A row's metadata as the meta cache keeps it: similarity 0, its missing (None, NaN) texts None."""
    return Neighbour(id=int(rid), similarity=0.0, species=species, genus=_opt(genus), family=_opt(family),
                     common_name=_opt(common), venomous=venomous, path=path, dataset=_opt(dataset))


def _opt(value: object) -> object | None:
    if value is None:
        return None
    try:
        if value != value:  # NaN
            return None
    except (TypeError, ValueError):
        pass
    return value
