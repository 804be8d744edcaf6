"""The reference store: one LanceDB table, embedded on disk, the gallery's source of truth.

Every write is one LanceDB commit (all or nothing), but for ``species set-venom``'s two (the flags' update, then
the manifest config that records the edit: :meth:`ReferenceStore.set_venomous`); readers see committed versions
only, and an open store notices other processes' commits within ``refresh_s`` seconds (LanceDB's read consistency
interval). Ids are given by the caller (:class:`index.gallery.Gallery` reserves them under its write lock).

Source paths are stored as text; a path that is not valid UTF-8 (possible on Linux) is stored as its
``file://`` URI, which keeps every byte (:func:`source_text`, :func:`source_file`).

The store may live in a local folder or at an object-store URI (``s3://bucket/path``, through Lance's
storage options: :func:`storage_options`), so that workers on other machines can write fragments to it
(:mod:`index.fragments`). Reads that a big gallery needs stay small: ``id`` and ``sha256`` get BTREE scalar
indexes once a build finishes (:meth:`ReferenceStore.ensure_scalar_indexes`), neighbours' metadata and
duplicate checks are ``IN`` queries on them, the species summary is streamed over four columns and cached per
table version, and vectors are read in batches (:meth:`ReferenceStore.iter_vectors`).

Every store of a process (views at an old version, fragment readers) connects through one LanceDB session whose
caches are capped (:func:`store_session`, :mod:`index.store_cache`), so that a long-running server's memory levels
off instead of keeping the manifest of every version it wrote. The Lance datasets that a compaction, a prune, a
venom edit or a fragment commit opens (:meth:`ReferenceStore._dataset`, :mod:`index.fragments`) are short-lived,
with Lance's own caches (a ``lancedb.Session`` is not a ``lance`` one), dropped after use.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import json
import logging
import os
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes, urlparse

import lancedb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from index.compaction import UNVERIFIED_GRACE
from index.errors import import_failure, library_messages
from index.records import HIGHER_RANKS, ReferenceRecord, is_uri
from index.store_cache import cache_bytes

if TYPE_CHECKING:  # lance is imported on first use (import_lance): its names for the hints only
    import types

    from lance import LanceDataset

logger = logging.getLogger(__name__)

TABLE = "references"
#: The key of the table's manifest config where :meth:`ReferenceStore.set_venomous` records its last edit (a
#: generation, the species and the version of the flags' update): every later version carries it, so another
#: process sees an edit by it.
VENOM_EDIT_KEY = "speciesid.venom_edit"
#: Metadata columns (everything but the embedding), in table order.
META_COLUMNS: tuple[str, ...] = (
    "id",
    "species",
    "genus",
    "family",
    *HIGHER_RANKS,
    "common_name",
    "venomous",
    "dataset",
    "source_path",
    "country",
    "sha256",
    "added_at",
    "encoder",
    "excluded",
)


def _schema(dim: int) -> pa.Schema:
    text = pa.string()
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("species", text, nullable=False),
            pa.field("genus", text),
            pa.field("family", text),
            *[pa.field(rank, text) for rank in HIGHER_RANKS],
            pa.field("common_name", text),
            pa.field("venomous", pa.bool_()),
            pa.field("dataset", text),
            pa.field("source_path", text),
            pa.field("country", text),
            pa.field("sha256", text, nullable=False),
            pa.field("added_at", pa.timestamp("us", tz="UTC")),
            pa.field("encoder", text, nullable=False),
            pa.field("excluded", pa.bool_()),
            pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
        ]
    )


@dataclass
class SpeciesSummary:
    """A species in the gallery, with how many reference photos it has."""

    species: str  # binomial
    genus: str | None  # genus name
    family: str | None  # family name
    common_name: str | None  # most frequent common name among its references
    venomous: bool | None  # medically important venomous; None when unknown
    count: int  # reference photos (excluded ones not counted)


def source_text(path: str | Path) -> str:
    """A source path as storable text: made absolute (a relative one names nothing for a server started in another
    folder, or a Ray worker), or its ``file://`` URI when it is not valid UTF-8. Object-store URIs stay as given."""
    text = str(path)
    if not is_uri(text) and not text.startswith("file://"):
        text = os.path.abspath(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:  # undecodable bytes of a Linux file name (surrogate escapes)
        return Path(os.path.abspath(path)).as_uri()


def source_file(text: str) -> Path:
    """The file a stored source path names (the inverse of :func:`source_text`)."""
    if text.startswith("file://"):
        return Path(os.fsdecode(unquote_to_bytes(urlparse(text).path)))
    return Path(text)


#: Digests per ``sha256 IN (...)`` query.
_IN_CHUNK = 1000


def _sql_text(text: str) -> str:
    """``text`` as an SQL string literal of a Lance filter (quotes doubled)."""
    return "'" + text.replace("'", "''") + "'"
#: Columns that get a BTREE scalar index when a build finishes.
SCALAR_INDEXED = ("id", "sha256")
_NOT_EXCLUDED = "excluded = false OR excluded IS NULL"

#: AWS environment variables -> Lance (object_store) storage options.
_ENV_OPTIONS = {
    "AWS_ACCESS_KEY_ID": "aws_access_key_id",
    "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
    "AWS_SESSION_TOKEN": "aws_session_token",
    "AWS_REGION": "region",
    "AWS_DEFAULT_REGION": "region",
    "AWS_ENDPOINT_URL_S3": "aws_endpoint",
    "AWS_ENDPOINT_URL": "aws_endpoint",
    "AWS_ENDPOINT": "aws_endpoint",
    "AWS_ALLOW_HTTP": "allow_http",
}
#: Storage options that are not secrets (the only ones a gallery.json may record).
PUBLIC_OPTIONS = ("region", "aws_endpoint", "allow_http", "aws_virtual_hosted_style_request")


#: Lance's client timeouts and retries for a store on an object store, unless the gallery's options set them (Lance's
#: own defaults retry one request for up to 180 s, with no request timeout: a store that stops answering held every
#: call for minutes). ``timeout``: one HTTP request, whole (a data file is uploaded in parts); ``connect_timeout``:
#: its connection; ``client_max_retries`` and ``client_retry_timeout`` (seconds): Lance's retries of a failed
#: request. Against moto behind a proxy that stops answering, one look at the table's version then failed after
#: 184 s (Lance retries its listing too); refused connections after 3.8 s. A server's reads never wait on them
#: (:data:`index.gallery.STORE_CHECK_WAIT_S`); writes and the CLI do. A slow uplink may need a longer ``timeout``.
STORE_CLIENT_DEFAULTS = {"timeout": "10s", "connect_timeout": "5s", "client_max_retries": "2",
                         "client_retry_timeout": "30"}


def storage_options(recorded: dict[str, str] | None = None, explicit: dict[str, str] | None = None) -> dict[str, str]:
    """Lance storage options: :data:`STORE_CLIENT_DEFAULTS`, then ``recorded`` (gallery.json), then the usual AWS_*
    variables, then ``explicit``.

    Later sources win. ``AWS_ENDPOINT_URL`` (an S3-compatible server, or moto) sets the endpoint; an ``http://``
    endpoint also allows plain HTTP. Writes need the server to honour the write lease's conditional PUTs
    (:mod:`index.lease`).
    """
    opts = dict(STORE_CLIENT_DEFAULTS) | {k: str(v) for k, v in (recorded or {}).items()}
    for var, key in reversed(list(_ENV_OPTIONS.items())):  # the first listed variable wins among the env
        if os.environ.get(var):
            opts[key] = os.environ[var]
    opts.update({k: str(v) for k, v in (explicit or {}).items()})
    if opts.get("aws_endpoint", "").startswith("http://"):
        opts.setdefault("allow_http", "true")
    return opts


def public_options(options: dict[str, str]) -> dict[str, str]:
    """The options safe to write into gallery.json (no keys, no tokens)."""
    return {k: v for k, v in options.items() if k in PUBLIC_OPTIONS}


def rows_table(
    records: Sequence[ReferenceRecord],
    sha256s: Sequence[str],
    embeddings: np.ndarray,
    encoder: str,
    ids: Sequence[int],
    dim: int,
    *,
    added_at: dt.datetime | None = None,
) -> pa.Table:
    """The store's rows for these records (the one row builder: local adds and distributed writers use it)."""
    n = len(records)
    if len(sha256s) != n or embeddings.shape != (n, dim) or len(ids) != n:
        raise ValueError(
            f"rows need as many digests, ids and ({n}, {dim}) embeddings as records; "
            f"got {len(sha256s)} digests, {len(ids)} ids and {embeddings.shape}"
        )
    now = added_at or dt.datetime.now(dt.timezone.utc)
    cols: dict[str, pa.Array] = {
        "id": pa.array([int(i) for i in ids], pa.int64()),
        "species": pa.array([r.species for r in records], pa.string()),
        "genus": pa.array([r.genus for r in records], pa.string()),
        "family": pa.array([r.family for r in records], pa.string()),
    }
    for rank in HIGHER_RANKS:
        cols[rank] = pa.array([r.ranks.get(rank) for r in records], pa.string())
    cols.update(
        {
            "common_name": pa.array([r.common_name for r in records], pa.string()),
            "venomous": pa.array([r.venomous for r in records], pa.bool_()),
            "dataset": pa.array([r.dataset for r in records], pa.string()),
            "source_path": pa.array([source_text(r.path) for r in records], pa.string()),
            "country": pa.array([r.country for r in records], pa.string()),
            "sha256": pa.array(list(sha256s), pa.string()),
            "added_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "encoder": pa.array([encoder] * n, pa.string()),
            "excluded": pa.array([False] * n, pa.bool_()),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)), dim
            ),
        }
    )
    return pa.table(cols, schema=_schema(dim))


#: A fragment (one Lance data file, at least one per commit) with fewer rows than this is small: each API upload
#: and each ``references add`` chunk (1,024 rows) makes one, and every read of the table opens every fragment, so reads
#: slow down with their number. :meth:`ReferenceStore.compact` merges them into fragments of this many rows and
#: never rewrites a bigger one: a compaction rewrites at most this many rows plus the new ones (its cost, in an
#: add's latency: docs/shared-gallery.md, "Store growth"), and a million single-row adds leave ~122 fragments.
SMALL_FRAGMENT_ROWS = 8_192
#: LanceDB's own "small fragment" (its table statistics): fewer rows than this. It must be at least
#: :data:`SMALL_FRAGMENT_ROWS` (its count bounds ours: :meth:`ReferenceStore.small_fragments_at_most`).
LANCEDB_SMALL_ROWS = 100_000
assert SMALL_FRAGMENT_ROWS <= LANCEDB_SMALL_ROWS
#: At the end of a build (:meth:`ReferenceStore.optimize`) the small fragments are merged into fragments of up to
#: this many rows (Lance's own default target) instead: a build writes many at once. The rule stays the same: a
#: fragment of :data:`SMALL_FRAGMENT_ROWS` rows or more is never rewritten, so a build into an existing gallery
#: does not rewrite the fragments earlier builds left.
BUILD_FRAGMENT_ROWS = 1_048_576


#: A missing lance library (the pylance package, which LanceDB itself does not require): what needs it and what to
#: install, in one line; and an installed lance whose import failed: its error, then what to do.
LANCE_MISSING, LANCE_BROKEN = library_messages(
    "the gallery's store needs the lance library for this (index info, index compact, compacting after writes, "
    "worker-written fragments, set-venom's edit mark)", "pylance")


def import_lance() -> types.ModuleType:
    """The ``lance`` module (imported on first use: only the store's fragment, compaction and version calls and
    set-venom's edit mark need it); ImportError :data:`LANCE_MISSING` when it is not installed,
    :data:`LANCE_BROKEN` when its import failed (chained to the import's own error)."""
    try:
        import lance
    except ImportError as exc:
        raise ImportError(import_failure(exc, "lance", LANCE_MISSING, LANCE_BROKEN)) from exc
    return lance


def version_times(dataset: LanceDataset) -> list[tuple[int, float]]:
    """(version, creation time in epoch seconds) of every version the dataset keeps, oldest first. It reads
    every kept version's manifest (on an object store one request each)."""
    # lance gives naive local datetimes (datetime.fromtimestamp): .timestamp() reads them back as local
    return sorted((int(v["version"]), float(v["timestamp"].timestamp())) for v in dataset.versions())


def superseded_versions(times: Sequence[tuple[int, float]], older_than: dt.timedelta, now: float) -> list[int]:
    """The versions among ``times`` (:func:`version_times`) that stopped being the latest more than
    ``older_than`` before ``now``: the version after each was created that long ago. Never the latest; a zero
    age: every version but the latest.

    Lance's own ``older_than`` counts from a version's creation: after a week without writes the latest version
    is a week old, and the first write after would prune the version every reader is still at. A version only
    falls out of use once a later one exists, so the age counts from then."""
    ordered = sorted(times)
    age = older_than.total_seconds()
    return [v for (v, _), (_, then) in zip(ordered, ordered[1:], strict=False) if age <= 0 or now - then > age]


@dataclass
class Pruned:
    """What :func:`_prune` deleted, and the files no version uses it kept or deleted (a zero age, ``unverified``)."""

    versions: int  # versions deleted
    bytes: int  # bytes of the files deleted
    unused_deleted: int = 0  # files no version used, deleted (a killed writer's)
    unused_kept: int = 0  # files no version uses, kept: one of them is younger than UNVERIFIED_GRACE


def _unused_files(dataset: LanceDataset) -> list[Path]:  # of a local table
    """The data, deletion and index files of a local ``dataset``'s folder that none of its kept versions names."""
    root = Path(dataset.uri)
    named: set[str] = set()
    for version in dataset.versions():
        at = dataset.checkout_version(int(version["version"]))
        for fragment in at.get_fragments():
            meta = fragment.metadata
            named.update(f"data/{f.path}" for f in meta.files)
            if meta.deletion_file is not None:
                named.add(meta.deletion_file.path(meta.id))  # already "_deletions/NAME": no prefix of ours
        named.update(f"_indices/{seg.uuid}" for index in at.describe_indices() for seg in index.segments)
    found = [p for p in (root / "data").glob("*.lance") if f"data/{p.name}" not in named]
    found += [p for p in (root / "_deletions").glob("*") if f"_deletions/{p.name}" not in named]
    found += [p for p in (root / "_indices").glob("*") if f"_indices/{p.name}" not in named]
    return found


def _newest_mtime(paths: Sequence[Path]) -> float:
    """The newest modification time among ``paths`` (an index folder: of the files in it); 0 for none."""
    times = [0.0]
    for path in paths:
        try:
            times += [q.stat().st_mtime for q in path.rglob("*")] if path.is_dir() else [path.stat().st_mtime]
        except OSError:  # gone meanwhile: nothing to keep
            continue
    return max(times)


def _prune(dataset: LanceDataset, older_than: dt.timedelta, *, unverified: bool = False) -> Pruned:
    """:meth:`ReferenceStore.prune_versions` on a dataset already open (a lance.LanceDataset). ``unverified`` (a zero
    age, a local store, no other writer of this version possible: :meth:`ReferenceStore.compact`): then the files no
    kept version uses (a killed writer's data file, which Lance otherwise keeps 7 days, as a writer's in progress
    looks the same) are deleted too (Lance's ``delete_unverified``), but only when none of them is younger than
    :data:`UNVERIFIED_GRACE`: a young one may be a live writer's that this folder's lock cannot see, so then all are
    kept (:attr:`Pruned.unused_kept`)."""
    if unverified and older_than <= dt.timedelta(0):  # every version but the latest, as a zero age prunes below
        cleaned = dataset.cleanup_old_versions(older_than=dt.timedelta(0), error_if_tagged_old_versions=False)
        pruned = Pruned(int(cleaned.old_versions), int(cleaned.bytes_removed))
        unused = _unused_files(dataset)
        if not unused:
            return pruned
        if time.time() - _newest_mtime(unused) < UNVERIFIED_GRACE.total_seconds():
            return replace(pruned, unused_kept=len(unused))
        cleaned = dataset.cleanup_old_versions(older_than=dt.timedelta(0), delete_unverified=True,
                                               error_if_tagged_old_versions=False)
        gone = sum(not path.exists() for path in unused)  # what Lance's own check let go: the count said
        return Pruned(pruned.versions + int(cleaned.old_versions), pruned.bytes + int(cleaned.bytes_removed),
                      unused_deleted=gone)
    doomed = superseded_versions(version_times(dataset), older_than, time.time())
    if not doomed:
        return Pruned(0, 0)
    cleaned = dataset.cleanup_old_versions(versions=doomed, error_if_tagged_old_versions=False)
    return Pruned(int(cleaned.old_versions), int(cleaned.bytes_removed))


@dataclass
class FragmentStats:
    """The table's fragments, as its manifest lists them."""

    fragments: int  # data fragments of the latest version
    small: int  # of them, those under SMALL_FRAGMENT_ROWS rows (what a compaction merges)
    rows: int  # rows they hold (deleted ones not yet compacted away included)
    versions: int | None  # versions kept (None: not counted)


def _fragment_stats(dataset: LanceDataset) -> FragmentStats:
    """The fragments of ``dataset``'s version (its manifest, no data); versions not counted."""
    rows = [f.metadata.physical_rows for f in dataset.get_fragments()]
    return FragmentStats(fragments=len(rows), small=sum(r < SMALL_FRAGMENT_ROWS for r in rows),
                         rows=int(sum(rows)), versions=None)


@dataclass
class CompactReport:
    """What :meth:`ReferenceStore.compact` did."""

    fragments_before: int  # fragments before it
    fragments_after: int  # after it
    small_before: int  # small fragments before it
    small_after: int  # after it
    fragments_rewritten: int  # fragments merged into others (0: no commit was made)
    versions_removed: int  # old versions pruned
    bytes_removed: int  # bytes of the files deleted with them
    version_before: int  # the table's version before
    version_after: int  # and after (more by one when fragments were merged)
    unused_deleted: int = 0  # files no version used, deleted by a zero-age prune (a killed writer's: _prune)
    unused_kept: int = 0  # files no version uses kept by it: one is younger than UNVERIFIED_GRACE
    unused_kept_because: str = ""  # why a zero-age prune did not look at them (Gallery.compact: a writer may run)


class MissingTableError(ValueError):
    """The store holds no table (``ReferenceStore(create=False)``): a writer's :meth:`Gallery.open` makes it under
    the gallery's write lock where no version was ever committed; a folder that saw one calls the table lost."""


class HalfCreatedStoreError(ValueError):
    """The store's table folder exists but no version of it was ever committed: a create killed inside LanceDB's
    table creation. ``data`` lists the files in it beyond Lance's bookkeeping (none: nothing to lose)."""

    def __init__(self, where: str, data: list[str] | None) -> None:
        self.where = where
        self.data = data  # None when it cannot be listed (an object store)
        if data:
            what = (f"it holds {len(data)} data file(s) ({', '.join(data[:3])}) that no reader can see. Nothing "
                    f"was deleted: if this gallery is new, move {where} aside (or delete it) and run the command "
                    "again; if those files matter, keep them and rebuild the gallery from its photos")
        elif data is None:  # an object store: its objects were not listed here
            what = (f"list {where}: if it holds nothing but _versions/ and _transactions/ objects (no data/ "
                    "objects), nothing was committed: delete it and run the command again. If it holds data/ "
                    "objects, do not delete it: its version objects may be missing or unreadable for another "
                    "reason (a lifecycle rule, replication, permissions); restore them, or rebuild the gallery "
                    "from its photos")
        else:
            what = (f"it holds no data: build into the gallery or add references to it, with write access "
                    f"(either removes it and makes the table), or delete {where}")
        super().__init__(f"the store's table {where} was left half-created by an interrupted create (no version "
                         f"of it was ever committed): {what}")


def uncommitted_files(names: Iterable[str]) -> list[str] | None:
    """The one rule of a half-created table, over its files' names relative to the table (``a/b``, local or on an
    object store): None when one is a version (a ``.manifest`` under ``_versions/``); else those beyond Lance's
    bookkeeping (``_versions``, ``_transactions``), sorted."""
    names = list(names)
    if any(n.startswith("_versions/") and n.endswith(".manifest") for n in names):
        return None
    return sorted(n for n in names if n.split("/", 1)[0] not in ("_versions", "_transactions"))


def half_created(table: str | Path) -> list[str] | None:
    """The files beyond Lance's bookkeeping (``_versions``, ``_transactions``) in a local table folder that holds
    no committed version (a create interrupted inside Lance); None when the folder holds a version, or is
    missing (:func:`uncommitted_files`)."""
    folder = Path(table)
    if not folder.is_dir():
        return None
    return uncommitted_files(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


_session: tuple[tuple[int, int], lancedb.Session] | None = None  # (caps, the lancedb.Session made for them)
_session_lock = threading.Lock()


def _reset_session() -> None:
    """A forked child's own lock and session: the parent's lock may have been held by a thread the child lacks."""
    global _session, _session_lock
    _session, _session_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_session)


@functools.cache
def _connect_takes_session() -> bool:
    """Whether this LanceDB's ``connect`` takes a session (looked at once: ~30 µs, and every connect asked)."""
    return "session" in inspect.signature(lancedb.connect).parameters


def store_session() -> lancedb.Session | None:
    """The one LanceDB session every store of this process connects with: its caches capped
    (:func:`index.store_cache.cache_bytes`; a new session when the caps change). Without it each connection caches
    the manifest of every version it reads, up to LanceDB's 1 GiB + 6 GiB, and a server grows with each add.
    None with a LanceDB that has no sessions (its own caches then)."""
    global _session
    make: Callable[..., lancedb.Session] | None = getattr(lancedb, "Session", None)  # older LanceDB: none
    if make is None or not _connect_takes_session():
        return None
    caps = cache_bytes()
    with _session_lock:
        if _session is None or _session[0] != caps:
            _session = (caps, make(metadata_cache_size_bytes=caps[0], index_cache_size_bytes=caps[1]))
        return _session[1]


def _connect(root: str, interval: dt.timedelta | None, options: dict[str, str]):  # noqa: ANN202 - a connection
    """``lancedb.connect`` of a store's root, through the shared :func:`store_session` when LanceDB takes one."""
    session = store_session()
    kwargs = {"session": session} if session is not None else {}
    return lancedb.connect(root, read_consistency_interval=interval, storage_options=options or None, **kwargs)


class ReferenceStore:
    """LanceDB table of reference photos: metadata + embedding, one row per photo."""

    def __init__(
        self, root: str | Path, dim: int, *, refresh_s: float | None = 1.0, options: dict[str, str] | None = None,
        create: bool = True,
    ) -> None:
        """Open (or, with ``create``, create) the table under ``root``: a folder, or an object-store URI with
        ``options``.

        :class:`HalfCreatedStoreError` when the table was left half-created (a writer's :meth:`Gallery.open`
        removes one that holds no data, under the gallery's write lock); :class:`MissingTableError` when there is
        none and ``create`` is False (a gallery makes it only under its write lock)."""
        # a folder is kept absolute: fragment writers on Ray workers run in other working directories
        self.root: str | Path = str(root).rstrip("/") if is_uri(root) else Path(root).absolute()
        self.dim = dim
        self.options = dict(options or {}) if is_uri(root) else {}
        interval = None if refresh_s is None else dt.timedelta(seconds=refresh_s)
        if not create and not is_uri(self.root) and not Path(self.root).is_dir():  # connecting would make the folder
            raise MissingTableError(f"the store {self.root} holds no table {TABLE} yet")
        self._db = _connect(str(self.root), interval, self.options)
        self._species_cache: tuple[int, list[SpeciesSummary]] | None = None
        self._species_tally: _SpeciesTally | None = None  # what the cached summary was made from
        if TABLE in self._table_names():
            try:
                self._table = self._db.open_table(TABLE)
            except Exception as exc:  # noqa: BLE001 - lance's kinds vary; only a half-created table is told apart
                if is_uri(self.root):
                    if "not found" in str(exc).lower():  # listed, yet no version to open
                        raise HalfCreatedStoreError(self.uri, None) from exc
                    raise
                data = half_created(self.uri)
                if data is None:
                    raise
                raise HalfCreatedStoreError(self.uri, data) from exc
        elif not create:
            raise MissingTableError(f"the store {self.root} holds no table {TABLE} yet")
        else:
            try:
                self._table = self._db.create_table(TABLE, schema=_schema(dim))
            except (ValueError, OSError) as exc:  # another process created it first
                if TABLE not in self._table_names():
                    raise
                logger.debug("table created by another process: %s", exc)
                self._table = self._db.open_table(TABLE)
        got = self._table.schema.field("embedding").type.list_size
        if got != dim:
            raise ValueError(f"store {self.root} holds {got}-d embeddings, not {dim}-d")

    @property
    def uri(self) -> str:
        """The Lance dataset of the table (what fragment writers and commits name)."""
        return f"{self.root}/{TABLE}.lance"

    def _table_names(self) -> list[str]:
        names = self._db.list_tables() if hasattr(self._db, "list_tables") else self._db.table_names()
        return list(getattr(names, "tables", names))

    def max_id(self) -> int:
        """The largest id stored (0 for an empty store); reads only the id column."""
        ids = self.ids(include_excluded=True)
        return int(ids.max()) if len(ids) else 0

    def refresh(self) -> None:
        """See other processes' commits now (otherwise within ``refresh_s``)."""
        self._table.checkout_latest()

    def at_version(self, version: int) -> ReferenceStore:
        """A read-only view of the table as it was at ``version`` (rows deleted since are still there);
        ValueError when that version is no longer kept (cleaned up by compaction)."""
        view = ReferenceStore(self.root, self.dim, refresh_s=None, options=self.options, create=False)
        try:
            view._table.checkout(int(version))
        except Exception as exc:  # noqa: BLE001 - lance raises ValueError, other backends their own kinds
            raise ValueError(f"store {self.root} no longer keeps version {version}: {exc}") from exc
        return view

    def _columns(self, columns: Sequence[str], where: str | None = None) -> pa.Table:
        """``columns`` of every row (of the rows ``where`` matches, an SQL filter), in one read: the one query of
        whole columns the readers below share."""
        query = self._table.search().select(list(columns)).limit(max(self._table.count_rows(), 1))
        if where:
            query = query.where(where)
        return query.to_arrow()

    def _read(self, columns: Sequence[str], where: str | None = None) -> pd.DataFrame:
        return self._columns(columns, where).to_pandas()

    @property
    def version(self) -> int:
        """LanceDB table version: grows with every write (the derived index records it)."""
        return int(self._table.version)

    def count(self, *, include_excluded: bool = False) -> int:
        """Number of reference rows."""
        if include_excluded:
            return int(self._table.count_rows())
        return int(self._table.count_rows(_NOT_EXCLUDED))

    def find_sha256(self, digests: Iterable[str]) -> dict[str, int]:
        """Digest -> reference id of the given digests that are stored (excluded rows too)."""
        wanted = sorted({d for d in digests if d and all(c in "0123456789abcdef" for c in d)})
        found: dict[str, int] = {}
        for start in range(0, len(wanted), _IN_CHUNK):
            chunk = wanted[start : start + _IN_CHUNK]
            df = self._read(["id", "sha256"], "sha256 IN (" + ", ".join(f"'{d}'" for d in chunk) + ")")
            found.update(zip(df["sha256"], df["id"].astype(int), strict=True))
        return found

    def uses_source(self, text: str) -> bool:
        """Whether any row (excluded ones too) has this stored source path."""
        return self._table.count_rows(f"source_path = {_sql_text(text)}") > 0

    def ids(self, *, include_excluded: bool = False) -> np.ndarray:
        """Sorted int64 ids of the searchable rows (all rows with ``include_excluded``); reads one column."""
        table = self._columns(["id"], None if include_excluded else _NOT_EXCLUDED)
        return np.sort(table.column("id").to_numpy().astype(np.int64))

    def source_paths(self) -> tuple[np.ndarray, list[str]]:
        """(ids int64, stored source paths) of every row (excluded ones too), in one read of those two columns."""
        table = self._columns(["id", "source_path"])
        return table.column("id").to_numpy().astype(np.int64), [str(t) for t in table.column("source_path").to_pylist()]

    def add(
        self,
        records: Sequence[ReferenceRecord],
        sha256s: Sequence[str],
        embeddings: np.ndarray,
        encoder: str,
        ids: Sequence[int],
    ) -> list[int]:
        """Append rows under the given (reserved, unused) ids, in one commit; returns the ids."""
        table = rows_table(records, sha256s, embeddings, encoder, ids, self.dim)
        if table.num_rows:
            before = self.version
            self._table.add(table)
            self._carry_species(before, table)
        return [int(i) for i in ids]

    def _matching(self, ids: Sequence[int]) -> tuple[str, int]:
        """SQL filter for the ids and how many rows it matches."""
        ids = [int(i) for i in ids]
        if not ids:
            return "", 0
        where = f"id IN ({', '.join(map(str, ids))})"
        return where, int(self._table.count_rows(where))

    def delete(self, ids: Sequence[int]) -> int:
        """Delete rows by id; returns how many existed."""
        where, found = self._matching(ids)
        if found:
            self._table.delete(where)
        return found

    def set_excluded(self, ids: Sequence[int], excluded: bool) -> int:
        """Mark rows excluded from search (reversible); returns how many rows matched."""
        where, found = self._matching(ids)
        if found:
            self._table.update(where=where, values={"excluded": excluded})
        return found

    def set_venomous(self, species: str, venomous: bool) -> tuple[int, int, int]:
        """Set the venomous flag of every row of ``species`` (its exact name; excluded rows too, so a restored one
        agrees), in one commit; returns (how many rows matched, how many of them said otherwise and were set, how
        many of those said yes: a "no" that turns a venomous row harmless, excluded rows included). No row to change
        (none matched, or every one says so already): nothing written, no new version. A change is followed by a
        second commit that records it in the manifest's config (:meth:`venom_edit`: the generation raised, the
        species, the update's version), which another process's cached rows follow: its venom counts cannot always
        show the edit (an add of the species after it can raise the count it lowered). Without the lance library the
        flags are set and the edit is not recorded (a warning says so, as when the mark's commit fails). The two
        commits are not one: an edit interrupted between them (a kill) leaves the flags set and the edit unrecorded,
        and another process may keep the rows' old flags until it restarts: restart the servers after an interrupted
        set-venom (running it again changes nothing, so records nothing)."""
        where = f"species = {_sql_text(species)}"
        found = int(self._table.count_rows(where))
        differ = f"{where} AND (venomous IS NULL OR venomous <> {'true' if venomous else 'false'})"
        changed = int(self._table.count_rows(differ)) if found else 0
        turned_off = int(self._table.count_rows(f"{where} AND venomous = true")) if changed and not venomous else 0
        if changed:
            self._table.update(where=differ, values={"venomous": venomous})
            updated = int(self._table.version)
            try:  # the writer's hold serialises the mark's read and its commit
                dataset = self._dataset()  # ImportError LANCE_MISSING / LANCE_BROKEN: says which
                edit = self.venom_edit(dataset)  # read from the dataset just opened: never None
                dataset.update_config({VENOM_EDIT_KEY: json.dumps({"generation": edit[0] + 1, "species": species,
                                                                   "version": updated})})
                self._table.checkout_latest()  # the config's commit, read by this store too
            except (ImportError, OSError, RuntimeError) as exc:  # the flags are set: said, not raised as a failure
                logger.debug("store %s: the venom edit mark not written", self.root, exc_info=exc)
                logger.warning("store %s: venomous flags of %s set, but the edit is not recorded in the store's "
                               "manifest (%s): other processes see it by the venom counts only, which a later add "
                               "of the species can hide: restart them if they name its old flags (running "
                               "set-venom again changes nothing)", self.root, species, " ".join(str(exc).split()))
        return found, changed, turned_off

    def venom_edit(self, dataset: LanceDataset | None = None) -> tuple[int, str, int] | None:
        """(generation, species, version of the flags' update) of the last :meth:`set_venomous` change recorded in the
        manifest of the latest version this store sees (the table's current version, which LanceDB's read
        consistency moves on by itself: it may be ahead of a gallery's synced version), one manifest read, no data.
        The generation grows by one with each change; the version tells two edits apart that a Lance ``restore()``
        would give the same generation. (0, "", 0) when none is recorded (no change yet, or one made by a speciesid
        that did not record it); None when it cannot be read (the lance library missing): a change unknown.
        ``dataset``: the one this store has just opened (:meth:`_dataset`), not read again."""
        if dataset is None:
            try:
                dataset = self._dataset()
            except ImportError as exc:
                logger.debug("store %s: the venom edit mark not read (%s)", self.root, exc)
                return None
        raw = dataset.config().get(VENOM_EDIT_KEY)
        if raw is None:
            return 0, "", 0
        try:
            mark = json.loads(raw)
            return int(mark["generation"]), str(mark["species"]), int(mark.get("version", 0))
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # written otherwise: taken as no mark
            logger.debug("store %s: unreadable %s %r (%s)", self.root, VENOM_EDIT_KEY, raw, exc)
            return 0, "", 0

    def has_species(self, species: str) -> bool:
        """Whether any searchable row (not excluded) is of ``species`` (its exact name), at the version this store
        reads: one filtered count, not the whole :meth:`species` list."""
        return self._table.count_rows(f"species = {_sql_text(species)} AND ({_NOT_EXCLUDED})") > 0

    def species_of(self, ids: Sequence[int]) -> list[str]:
        """The species of rows ``ids`` (any row, excluded ones too), in the order given."""
        meta = self.metadata(ids)
        return [str(meta.at[int(i), "species"]) for i in ids]

    def id_species(self, *, include_excluded: bool = False) -> tuple[np.ndarray, list[str]]:
        """(sorted int64 ids, the species of each) of the searchable rows (all with ``include_excluded``): two
        columns read once, unfiltered by id (``species_of`` of every id builds one ``id IN (...)`` filter)."""
        table = self._columns(["id", "species"], None if include_excluded else _NOT_EXCLUDED)
        ids = table.column("id").to_numpy().astype(np.int64)
        order = np.argsort(ids, kind="stable")
        species = table.column("species").to_pylist()
        return ids[order], [str(species[i]) for i in order.tolist()]

    def species_countries(self) -> dict[str, frozenset[str]]:
        """species -> the countries (as stored, stripped: codes or names) its searchable rows record, of the rows
        whose ``country`` is not empty: two columns of the searchable rows read once and grouped here, not the
        whole metadata (:meth:`metadata`); {} when no row records a country."""
        table = self._columns(["species", "country"], f"({_NOT_EXCLUDED}) AND country IS NOT NULL")
        table = table.set_column(table.schema.get_field_index("country"), "country",
                                 pc.utf8_trim_whitespace(table.column("country")))
        table = table.filter(pc.not_equal(table.column("country"), ""))
        grouped = table.group_by("species").aggregate([("country", "distinct")])
        names, countries = grouped.column("species").to_pylist(), grouped.column("country_distinct").to_pylist()
        return {str(species): frozenset(held) for species, held in zip(names, countries, strict=True)}

    def metadata(self, ids: Sequence[int] | None = None, *, include_excluded: bool = True,
                 species: str | None = None) -> pd.DataFrame:
        """Metadata rows (no embeddings), optionally only the given ids and / or one species' rows, indexed by id."""
        clauses = [] if species is None else [f"species = {_sql_text(species)}"]
        if ids is not None:
            ids = [int(i) for i in ids]
            if not ids:
                return pd.DataFrame(columns=list(META_COLUMNS)).set_index("id")
            clauses.append(f"id IN ({', '.join(map(str, ids))})")
        if not include_excluded:
            clauses.append(f"({_NOT_EXCLUDED})")
        df = self._read(META_COLUMNS, " AND ".join(clauses) or None)
        return df.set_index("id", drop=False)

    def vectors(
        self, *, include_excluded: bool = False, ids: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64 (N,), embeddings float32 (N, dim)) of the searchable rows (or of ``ids``, any row)."""
        if ids is not None:
            parts = [self._vectors(f"id IN ({', '.join(map(str, map(int, ids[s : s + _IN_CHUNK])))})")
                     for s in range(0, len(ids), _IN_CHUNK)] or [self._vectors("id < 0")]
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        return self._vectors(None if include_excluded else _NOT_EXCLUDED)

    def _vectors(self, where: str | None) -> tuple[np.ndarray, np.ndarray]:
        return _batch_vectors(self._columns(["id", "embedding"], where), self.dim)

    def iter_vectors(
        self, *, batch_rows: int = 65_536, where: str | None = None, include_excluded: bool = False
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, float32 (n, dim)) batches of the searchable rows (all with ``include_excluded``),
        optionally filtered by ``where``: the whole table never sits in memory."""
        clauses = [f"({where})"] if where else []
        if not include_excluded:
            clauses.append(f"({_NOT_EXCLUDED})")
        query = self._table.search().select(["id", "embedding"])
        if clauses:
            query = query.where(" AND ".join(clauses))
        for batch in query.limit(None).to_batches(batch_rows):
            if batch.num_rows:
                yield _batch_vectors(batch, self.dim)

    def sample_vectors(self, n: int, *, seed: int = 0) -> np.ndarray:
        """About ``n`` searchable vectors drawn at random (float32 (m, dim)), read by row offsets."""
        total = self.count(include_excluded=True)
        if total == 0 or n <= 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if n >= total:
            parts = [v for _, v in self.iter_vectors()]
            return np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        rng = np.random.default_rng(seed)
        offsets = np.sort(rng.choice(total, size=n, replace=False))
        out = []
        for start in range(0, n, 8192):
            tbl = self._table.take_offsets(offsets[start : start + 8192].tolist()).select(
                ["embedding", "excluded"]).to_arrow()
            keep = ~np.asarray(tbl.column("excluded").fill_null(False).to_numpy(zero_copy_only=False), bool)
            out.append(_batch_vectors(tbl, self.dim)[1][keep] if keep.any() else np.zeros((0, self.dim), np.float32))
        return np.concatenate(out)

    def ensure_scalar_indexes(self) -> None:
        """BTREE indexes on ``id`` and ``sha256`` (point lookups of neighbours and duplicates), kept current."""
        if self.count(include_excluded=True) == 0:
            return
        have = {tuple(getattr(i, "columns", ())) for i in self._table.list_indices()}
        for column in SCALAR_INDEXED:
            if (column,) in have:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    warnings.simplefilter("ignore", UserWarning)
                    self._table.create_scalar_index(column, index_type="BTREE")
                logger.info("store: BTREE index on %s created", column)
            except Exception as exc:  # noqa: BLE001 - an index speeds reads up; reads work without it
                logger.warning("store: could not index %s (%s); lookups will scan", column, exc)

    def cached_species(self) -> tuple[int, list[SpeciesSummary]] | None:
        """The last :meth:`species` read (the version it was read at, the list), with no store round trip."""
        cached = self._species_cache
        return None if cached is None else (cached[0], list(cached[1]))

    def species(self, *, version: int | None = None) -> list[SpeciesSummary]:
        """Distinct species with reference counts and their metadata, sorted by name (the most common common name
        of a species' references; venomous when any of its references says so).

        Streamed over five columns (never the whole table), tallied per batch with Arrow's group-by (no per-row
        Python), and cached until the table's version moves (``version``: the one the caller knows, saving the
        store round trip that asks it). This store's own adds and compactions carry the cache to the version they
        commit (:meth:`_carry_species`): under a stream of uploads only another process's write makes it read
        the table again.
        """
        version = self.version if version is None else version
        if self._species_cache is not None and self._species_cache[0] == version:
            return list(self._species_cache[1])
        tally = _SpeciesTally()
        query = self._table.search().select(list(_SPECIES_COLUMNS))
        for batch in query.where(_NOT_EXCLUDED).limit(None).to_batches(65_536):
            if batch.num_rows:
                tally.add(pa.Table.from_batches([batch]))
        out = tally.summaries()
        self._species_cache = (version, out)
        self._species_tally = tally
        return list(out)

    def venom_counts(self, *, version: int | None = None, read: bool = True
                     ) -> dict[str, tuple[int, int, int]] | None:
        """species -> how many of its searchable rows are flagged venomous, flagged not, and unflagged, from the
        tally :meth:`species` keeps (no other read): of ``version`` (default the table's), read first when the
        tally kept is of another one, or None then when not ``read``. An add only raises these counts; an edit of
        rows' flags (:meth:`set_venomous`) lowers one, unless an add after it raised it back: another process sees
        an edit by :meth:`venom_edit`, and by these counts the edits of a speciesid that records none."""
        version = self.version if version is None else version
        cached = self._species_cache
        if cached is None or cached[0] != version:
            if not read:
                return None
            self.species(version=version)
        tally = self._species_tally  # kept with the cached summary, always (species, _carry_species)
        if tally is None:
            return None
        out = {}
        for name, n in tally.counts.items():
            flags = tally.venoms.get(name) or Counter()
            yes, no = int(flags.get(True, 0)), int(flags.get(False, 0))
            out[name] = (yes, no, int(n) - yes - no)
        return out

    def species_names(self, *, version: int | None = None) -> tuple[list[SpeciesSummary], dict[str, list[str]]]:
        """(:meth:`species`, species -> every common name its searchable rows carry, most frequent first: a species
        built from folders in several languages carries several) of one tally, of ``version`` (default the table's:
        one store round trip), the table read once when the tally kept is of another: what a name check needs, both
        of one version."""
        version = self.version if version is None else version
        cached, tally = self._species_cache, self._species_tally
        if cached is None or cached[0] != version or tally is None:
            summaries = self.species(version=version)
            tally = self._species_tally
        else:
            summaries = list(cached[1])
        names = {} if tally is None else {name: sorted(counts, key=lambda n: (-counts[n], n))
                                          for name, counts in tally.commons.items()}
        return summaries, names

    def _carry_species(self, before: int, added: pa.Table | None = None) -> None:
        """After this store's write on top of version ``before``: move the cached species summary to the version
        now read, adding the rows ``added``. An add (``added``: its rows) carries it only when the cache was of
        ``before`` and its commit is ``before + 1`` (no other writer's commit between); a write that changes no row
        (``added`` None: a compaction, an index commit, one or more commits) carries it when the cache was of
        ``before``, as the gallery carries its index (these run under its write hold, after a refresh). Otherwise
        the next :meth:`species` reads the table."""
        cached, tally = self._species_cache, self._species_tally
        if cached is None or tally is None or cached[0] != before:
            return
        after = self.version
        if added is None:
            self._species_cache = (after, cached[1])
            return
        if after != before + 1 or not added.num_rows:
            return
        self._species_cache = self._species_tally = None  # a failed tally leaves no half-updated cache
        tally.add(added.select(list(_SPECIES_COLUMNS)))
        self._species_cache, self._species_tally = (after, tally.summaries()), tally

    def _dataset(self) -> LanceDataset:  # lance imported on first use: import_lance
        """The Lance dataset of the table at the version this store reads (one manifest read, no data)."""
        import_lance()  # LanceDB's own error names pylance but not what needs it
        return self._table.to_lance()

    def missing_data_files(self) -> list[str]:
        """The data files of the table (at the version this store reads) that a local store's folder lacks: deleted
        or moved from under it. One manifest read and one stat per data file; [] for an object store (not looked
        at: a request per file)."""
        if is_uri(self.root):
            return []
        dataset = self._dataset()
        base = Path(dataset.uri) / "data"
        return [str(base / data.path) for fragment in dataset.get_fragments() for data in fragment.data_files()
                if not (base / data.path).is_file()]

    def small_fragments_at_most(self) -> int:
        """An upper bound of the small fragments (:data:`SMALL_FRAGMENT_ROWS`): LanceDB's own count of fragments under
        :data:`LANCEDB_SMALL_ROWS` rows, from the version of the table already open (no manifest read). A write checks
        it before it counts them exactly (:meth:`fragment_stats`)."""
        return int(self._table.stats()["fragment_stats"]["num_small_fragments"])

    def fragment_stats(self, *, versions: bool = False) -> FragmentStats:
        """Fragments of the table (read from its manifest: no data), and with ``versions`` the versions kept, in a
        local store (its ``_versions`` folder listed; on an object store None: LanceDB's listing reads every
        version's manifest, one request each)."""
        kept = None
        if versions and not is_uri(self.root):
            folder = Path(self.uri) / "_versions"
            kept = sum(1 for p in folder.iterdir() if p.name.endswith(".manifest")) if folder.is_dir() else 0
        return replace(_fragment_stats(self._dataset()), versions=kept)

    def compact(self, *, prune_older_than: dt.timedelta | None = None, target_rows: int = SMALL_FRAGMENT_ROWS,
                unverified: bool = False) -> CompactReport:
        """Merge the small fragments (under :data:`SMALL_FRAGMENT_ROWS` rows) into fragments of up to
        ``target_rows`` rows, leaving every bigger one as it is; then, with ``prune_older_than``, delete the versions
        superseded longer ago than that (:meth:`prune_versions`). One commit (none when fewer than two fragments are
        small); rows, ids and the scalar indexes are unchanged (Lance remaps the indexes of the rows it moves).

        Lance merges adjacent candidate fragments, a candidate being one with fewer rows than its target (1M by
        default): a bulk fragment of, say, 386,000 rows followed by small ones would be rewritten whole at every
        compaction. Here every fragment of :data:`SMALL_FRAGMENT_ROWS` rows or more is excluded from the plan (and
        is a boundary it never merges across), whatever the target.

        Call it under the gallery's write hold (on S3 the store's lease): it is a store write. ``unverified``: with a
        zero ``prune_older_than``, the files no version uses are deleted too when none is younger than
        :data:`UNVERIFIED_GRACE` (:func:`_prune`): only when no writer can be writing files outside that hold (the
        caller's to tell: :meth:`Gallery.compact`).
        """
        if target_rows < SMALL_FRAGMENT_ROWS:
            raise ValueError(f"target_rows={target_rows}: a compaction merges into at least {SMALL_FRAGMENT_ROWS} "
                             "rows (SMALL_FRAGMENT_ROWS); pass that or more")
        self.refresh()
        dataset = self._dataset()  # opened once: the merge moves it to the version it commits, the prune uses it
        before = _fragment_stats(dataset)
        version = self.version
        rewritten = 0
        if before.small >= 2:
            big = [f.fragment_id for f in dataset.get_fragments() if f.metadata.physical_rows >= SMALL_FRAGMENT_ROWS]
            metrics = dataset.optimize.compact_files(target_rows_per_fragment=target_rows,
                                                     excluded_fragment_ids=big)
            rewritten = int(metrics.fragments_removed)
            self.refresh()
            self._carry_species(version)  # rows unchanged
        pruned = (_prune(dataset, prune_older_than, unverified=unverified) if prune_older_than is not None
                  else Pruned(0, 0))
        after = _fragment_stats(dataset) if rewritten else before
        return CompactReport(fragments_before=before.fragments, fragments_after=after.fragments,
                             small_before=before.small, small_after=after.small, fragments_rewritten=rewritten,
                             versions_removed=pruned.versions, bytes_removed=pruned.bytes, version_before=version,
                             version_after=self.version, unused_deleted=pruned.unused_deleted,
                             unused_kept=pruned.unused_kept)

    def prune_versions(self, older_than: dt.timedelta) -> tuple[int, int]:
        """Delete the versions that stopped being the latest more than ``older_than`` ago
        (:func:`superseded_versions`; a zero age: all but the latest) and the files only they use: (versions
        deleted, bytes deleted). A store write (under the write hold); it lists every kept version (on an object
        store one request each).

        A pruned version can no longer be read (:meth:`at_version` raises ValueError): a reader still at one (a
        server between its looks, an IVF-PQ shard of a rebuild, :meth:`at_version`) fails its next read. The age
        counts from when a version was superseded, so a reader that looks for new versions more often than that
        never meets a pruned one.
        """
        self.refresh()
        pruned = _prune(self._dataset(), older_than)
        return pruned.versions, pruned.bytes

    def optimize(self, *, prune_older_than: dt.timedelta | None = None) -> CompactReport:
        """The end of a bulk build: :meth:`compact` into fragments of up to :data:`BUILD_FRAGMENT_ROWS` rows (the
        same rule: a fragment of :data:`SMALL_FRAGMENT_ROWS` rows or more is never rewritten), pruning as it does;
        then the scalar indexes over every row (:meth:`ensure_scalar_indexes`, :meth:`index_new_rows`)."""
        report = self.compact(prune_older_than=prune_older_than, target_rows=BUILD_FRAGMENT_ROWS)
        self.ensure_scalar_indexes()
        self.index_new_rows()
        return replace(report, version_after=self.version)

    def index_new_rows(self) -> None:
        """Bring the scalar indexes (:meth:`ensure_scalar_indexes`) over the rows added since they were made or
        last brought over (lookups scan those rows otherwise). A store write (one commit); best effort."""
        try:
            if not self._table.list_indices():
                return
            self.refresh()
            before = self.version
            self._dataset().optimize.optimize_indices()
            self.refresh()
            self._carry_species(before)  # rows unchanged
        except Exception as exc:  # noqa: BLE001 - an index speeds reads up; reads work without it
            logger.warning("store: could not bring its indexes over the new rows (%s); lookups scan them", exc)


#: The columns the species summary is made from.
_SPECIES_COLUMNS = ("species", "genus", "family", "common_name", "venomous")
_WITH_NULLS = pc.ScalarAggregateOptions(skip_nulls=False)


class _SpeciesTally:
    """What :meth:`ReferenceStore.species` sums up, per species, over rows taken in table order: the count, the
    genus and family (the first non-empty value, else the last one), and the common names' and venomous flags'
    counts. :meth:`add` takes a table of rows following those already tallied (an Arrow group-by each: no per-row
    Python)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, dict[str, str]] = {"genus": {}, "family": {}}
        self.last: dict[str, dict[str, str | None]] = {"genus": {}, "family": {}}
        self.commons: dict[str, Counter[str]] = {}
        self.venoms: dict[str, Counter[bool]] = {}
        self.touched: set[str] = set()  # species whose summary moved since :meth:`summaries` last ran
        self._summaries: dict[str, SpeciesSummary] = {}

    def add(self, rows: pa.Table) -> None:
        """Tally ``rows`` (the five columns of :data:`_SPECIES_COLUMNS`), which follow the rows tallied before."""
        species = rows.column("species")
        columns = {"species": species}
        for col in ("genus", "family"):  # "first" skips nulls: an empty name is made one, "last" keeps both
            values = rows.column(col)
            columns[col] = values
            columns[f"{col}_given"] = pc.if_else(pc.equal(values, ""), pa.scalar(None, values.type), values)
        grouped = pa.table(columns).group_by("species", use_threads=False).aggregate(
            [([], "count_all"), ("genus", "last", _WITH_NULLS), ("family", "last", _WITH_NULLS),
             ("genus_given", "first"), ("family_given", "first")])
        names = grouped.column("species").to_pylist()
        self.touched.update(names)
        self.counts.update(dict(zip(names, grouped.column("count_all").to_pylist(), strict=True)))
        for col in ("genus", "family"):
            self.last[col].update(zip(names, grouped.column(f"{col}_last").to_pylist(), strict=True))
            first = self.first[col]
            for name, value in zip(names, grouped.column(f"{col}_given_first").to_pylist(), strict=True):
                if value is not None and name not in first:
                    first[name] = value
        for col, into in (("common_name", self.commons), ("venomous", self.venoms)):
            values = rows.column(col)
            if values.null_count == len(values):
                continue
            counted = pa.table({"species": species, col: values}).group_by(["species", col]).aggregate(
                [([], "count_all")])
            for name, value, n in zip(counted.column("species").to_pylist(), counted.column(col).to_pylist(),
                                      counted.column("count_all").to_pylist(), strict=True):
                if value is not None:
                    into.setdefault(name, Counter())[value] += n

    def _summary(self, name: str) -> SpeciesSummary:
        genus, family = (self.first[c].get(name, self.last[c].get(name)) for c in ("genus", "family"))
        return SpeciesSummary(species=str(name), genus=genus, family=family, common_name=_mode(self.commons.get(name)),
                              venomous=_venomous(self.venoms.get(name)), count=int(self.counts[name]))

    def summaries(self) -> list[SpeciesSummary]:
        """One summary per species tallied, sorted by name (only the species touched since the last call are
        summed up again)."""
        for name in self.touched:
            self._summaries[name] = self._summary(name)
        self.touched.clear()
        return [self._summaries[name] for name in sorted(self._summaries)]


def _venomous(counts: Counter | None) -> bool | None:
    """A species' venomous flag from its references' flags: venomous when any reference says so (a harmless
    answer for a venomous snake is the error that hurts), None when none says either."""
    if not counts:
        return None
    return bool(counts.get(True))


def _mode(counts: Counter | None):
    """The most frequent value (the smallest among ties, as pandas' mode gives), or None."""
    if not counts:
        return None
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


def _batch_vectors(batch: pa.RecordBatch | pa.Table, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 (n, dim)) of an Arrow batch with ``id`` (optional) and ``embedding`` columns."""
    n = batch.num_rows
    ids = (batch.column("id").to_numpy().astype(np.int64) if "id" in batch.schema.names
           else np.zeros(0, dtype=np.int64))
    emb = batch.column("embedding")
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    flat = emb.flatten().to_numpy(zero_copy_only=False)
    return ids, np.ascontiguousarray(flat, dtype=np.float32).reshape(n, dim)


class StoreVectors:
    """The searchable vectors of a store at one version, as an ``index.ivfpq.VectorSource``.

    Picklable: a worker on another machine reopens the store (a folder it can reach, or an object-store URI
    with ``options``) at the same version, so every shard reads the same snapshot.
    """

    def __init__(self, root: str, dim: int, options: dict[str, str] | None = None, version: int | None = None) -> None:
        self.root, self.dim, self.options, self.version = str(root), int(dim), dict(options or {}), version
        self._store: ReferenceStore | None = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_store"} | {"_store": None}

    def _open(self) -> ReferenceStore:
        if self._store is None:
            self._store = ReferenceStore(self.root, self.dim, refresh_s=None, options=self.options,
                                         create=False)
            if self.version is not None and self._store.version != self.version:
                self._store._table.checkout(self.version)
        return self._store

    def count(self) -> int:
        """Searchable rows."""
        return self._open().count()

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """About ``n`` searchable vectors at random."""
        return self._open().sample_vectors(n, seed=seed)

    def shards(self, rows: int) -> list[tuple[int, int]]:
        """Id ranges [lo, hi) of about ``rows`` searchable rows each, ascending."""
        ids = self._open().ids()
        if not len(ids):
            return []
        starts = ids[:: max(rows, 1)].tolist()
        return [(lo, hi) for lo, hi in zip(starts, [*starts[1:], int(ids[-1]) + 1], strict=True)]

    def read(self, shard: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, vectors) batches of the searchable rows with ``lo <= id < hi``."""
        lo, hi = shard
        yield from self._open().iter_vectors(where=f"id >= {int(lo)} AND id < {int(hi)}")
