"""Objects a gallery keeps on its S3 store beside the table, under ``<store uri>/_speciesid/``.

Every machine that shares one S3 store has its own gallery folder; what it keeps in the store, it shares. The photos
added through the HTTP API are kept there (``<store uri>/_speciesid/uploads/<sha256><ext>``, :func:`upload_uri`):
their stored ``source_path`` is that ``s3://`` URI, so every machine reads them (:meth:`StoreObjects.get`; the
gallery's :meth:`index.gallery.Gallery.read_photo`). An upload's key is its content digest: two machines that put one
photo put the same bytes under the same key, so a race between them is harmless; :meth:`StoreObjects.put_if_absent`
sends ``If-None-Match: *`` all the same, so a photo already there is not stored twice (its bytes are still sent).

The client is made by :func:`index.lease.s3_client` from the store's own storage options (gallery.json's and the
AWS_* environment: :func:`index.store.storage_options`), the same endpoint and credentials as the lease's.
A read of an object that is not there is a FileNotFoundError; any other failure a :class:`StoreObjectError` (an
OSError and a :class:`index.lease.LeaseError`: a reader skipping unreadable photos skips it, the API answers a write
it failed as it answers the lease's), whose message says what to do and whose ``transient`` says whether a later try
may get past it: botocore's errors are read by :func:`index.lease.s3_failure`, the lease's own reading.

Store URIs are written and compared in one spelling (:func:`index.lease.canonical_s3_uri`: ``s3://``, no trailing
slash), so ``s3a://`` and ``s3://`` names of one store give one upload URI (a row spelled ``s3a://`` is the same
upload: :func:`spellings`). An upload no row uses (an add that crashed between its put and its commit, a removal
that failed or was left because the lease was lost) is removed by :func:`sweep_uploads` once older than a grace
age (``speciesid index sweep-uploads``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import mimetypes
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from index.lease import (
    _CONFLICT,
    _MISSING,
    _PRECONDITION,
    CONFLICT_PAUSE_S,
    CONFLICT_TRIES,
    LEASE_DIR,
    LeaseError,
    _bucket_key,
    _code,
    _first,
    _opt,
    _server_now,
    canonical_s3_uri,
    is_s3,
    s3_client,
    s3_failure,
)
from index.locks import write_lock
from index.sources import megabytes
from index.vectors import sorted_unique

if TYPE_CHECKING:
    from index.gallery import Gallery
    from index.store import ReferenceStore

logger = logging.getLogger(__name__)

#: The folder of the API's uploads in the store, beside the lease (``<store uri>/_speciesid/uploads/``).
UPLOADS_DIR = "uploads"
#: The folder of the shared probe's two files in the store (``<store uri>/_speciesid/probe/``).
PROBE_DIR = "probe"
#: Keys per DeleteObjects request (S3's most): the sweep deletes its orphans this many at a time.
DELETE_BATCH = 1000
#: Error codes with which a server that takes single deletes refuses a DeleteObjects request as such (a store that
#: wants the Content-MD5 newer boto3 no longer sends, or has no batch delete): the objects are then deleted one by one.
#: Objects deleted one by one between two ``check`` calls (the lease's) when the store refuses DeleteObjects.
EACH_CHECK = 100
_BATCH_REFUSED = frozenset({"MissingContentMD5", "InvalidDigest", "BadDigest", "InvalidRequest", "NotImplemented",
                            "MethodNotAllowed", "501", "405"})


class StoreObjectError(LeaseError, OSError):
    """A request on an object beside the store's table failed (permissions, the network, a busy store); its message
    says what to do, ``transient`` whether a later try may get past it."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def uploads_uri(store_uri: str) -> str:
    """Where a store keeps the API's uploads: ``<store uri>/_speciesid/uploads``, in the one spelling
    (:func:`index.lease.canonical_s3_uri`: ``s3a://`` and trailing slashes give the same URI)."""
    return f"{canonical_s3_uri(store_uri)}/{LEASE_DIR}/{UPLOADS_DIR}"


def upload_uri(store_uri: str, name: str) -> str:
    """The URI of the upload ``name`` (``<sha256><ext>``) in a store (one spelling: :func:`uploads_uri`)."""
    return f"{uploads_uri(store_uri)}/{name}"


def spellings(uri: str) -> tuple[str, ...]:
    """The spellings a stored ``source_path`` may give the object ``uri``: its canonical one (``s3://``) and
    ``s3a://`` (a row written through a store named so before URIs were made canonical)."""
    canonical = canonical_s3_uri(uri)
    return (canonical, "s3a://" + canonical[len("s3://"):]) if canonical.startswith("s3://") else (canonical,)


class ObjectChangedError(StoreObjectError):
    """The object was replaced (or removed) since its ETag was read: read it again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def probe_uri(store_uri: str, name: str) -> str:
    """The URI of the shared probe's file ``name`` (``probe.json``, ``probe-<sha256>.npz``) in a store."""
    return f"{canonical_s3_uri(store_uri)}/{LEASE_DIR}/{PROBE_DIR}/{name}"


@dataclass(frozen=True)
class StoredObject:
    """An object (or a file) as a listing found it: where, its size in bytes, its age in seconds."""

    uri: str
    size: int
    age_s: float


class StoreObjects:
    """Objects of one S3 store: put if absent, get, head, delete, by ``s3://`` URI. The boto3 client is made on
    first use from the store's storage ``options`` (or passed in); boto3 clients may be shared between threads."""

    def __init__(self, store_uri: str, options: dict[str, str] | None = None, *, client: Any = None) -> None:
        if not is_s3(store_uri):
            raise ValueError(f"objects beside the table need an s3:// store, not {store_uri}")
        self.uri = canonical_s3_uri(store_uri)  # s3a:// or a trailing slash: the same uploads, the same URIs
        self._options = dict(options or {})
        self._endpoint = _opt(self._options, "aws_endpoint", "endpoint", "aws_endpoint_url", "endpoint_url")
        self._client = client
        self._guard = threading.Lock()
        self._batch_refused = False  # the store refused a DeleteObjects request as such: one by one from then on

    @property
    def client(self) -> Any:
        """The boto3 client (made on first use)."""
        with self._guard:
            if self._client is None:
                self._client = s3_client(self._options)
            return self._client

    def put_if_absent(self, uri: str, data: bytes) -> bool:
        """Put ``data`` at ``uri`` unless an object is there (``If-None-Match: *``); whether this call put it. A
        conflicting write on the key (409, a racing put) is tried again after a short pause, as S3 asks. A put that
        went through but whose reply was lost is answered 412 on botocore's retry: False then, the object being
        there all the same (what a caller that puts content-named objects needs)."""
        bucket, key = _bucket_key(uri)
        kind = mimetypes.guess_type(key)[0] or "application/octet-stream"
        for attempt in range(CONFLICT_TRIES):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=kind, IfNoneMatch="*")
                return True
            except Exception as exc:  # noqa: BLE001 - botocore's errors, told apart by code
                code = _code(exc)
                if code in _PRECONDITION:
                    return False
                if code in _CONFLICT and attempt + 1 < CONFLICT_TRIES:
                    time.sleep(CONFLICT_PAUSE_S * 2**attempt)
                    continue
                raise self._failure(exc, "putting", uri, needs="s3:PutObject") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def put(self, uri: str, data: bytes, *, metadata: dict[str, str] | None = None) -> str:
        """Put ``data`` at ``uri`` (over what is there), with user ``metadata``; the new object's ETag."""
        bucket, key = _bucket_key(uri)
        kind = mimetypes.guess_type(key)[0] or "application/octet-stream"
        try:
            return self.client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=kind,
                                          Metadata=dict(metadata or {}))["ETag"]
        except Exception as exc:  # noqa: BLE001
            raise self._failure(exc, "putting", uri, needs="s3:PutObject") from exc

    def get(self, uri: str, *, etag: str | None = None) -> bytes:
        """The bytes of the object at ``uri``; FileNotFoundError when there is none. ``etag``: only that version
        (``If-Match``); :class:`ObjectChangedError` when the object is another one now."""
        bucket, key = _bucket_key(uri)
        try:
            condition = {"IfMatch": etag} if etag else {}
            return self.client.get_object(Bucket=bucket, Key=key, **condition)["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if etag and _code(exc) in _PRECONDITION:
                raise ObjectChangedError(f"{uri} changed since it was looked at: read it again") from exc
            raise self._failure(exc, "reading", uri, needs="s3:GetObject") from exc

    def head(self, uri: str) -> dict[str, Any] | None:
        """The object's metadata (``ETag``, ``ContentLength``, ``LastModified``...), or None when there is none."""
        bucket, key = _bucket_key(uri)
        try:
            return self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return None
            raise self._failure(exc, "looking up", uri, needs="s3:GetObject") from exc

    def exists(self, uri: str) -> bool:
        """Whether an object is at ``uri`` (a HEAD)."""
        return self.head(uri) is not None

    def delete(self, uri: str) -> None:
        """Delete the object at ``uri`` (none there is no error)."""
        bucket, key = _bucket_key(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return
            raise self._failure(exc, "deleting", uri, needs="s3:DeleteObject") from exc

    def listing(self, prefix_uri: str) -> Iterator[StoredObject]:
        """The objects under ``prefix_uri`` (ListObjectsV2, a page of up to 1,000 at a time), each with its size and
        its age on the store's clock: LastModified against the listing's ``Date`` header (this machine's clock only
        when the store sent none), as the lease judges a stale holder."""
        bucket, key = _bucket_key(canonical_s3_uri(prefix_uri))
        prefix = key.rstrip("/") + "/"
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                now = _server_now(page) or dt.datetime.now(dt.timezone.utc)
                for o in page.get("Contents", []):
                    yield StoredObject(f"s3://{bucket}/{o['Key']}", int(o.get("Size", 0)),
                                       (now - o["LastModified"]).total_seconds())
        except Exception as exc:  # noqa: BLE001
            # ListBucket is granted on the bucket, never on keys: the refusal names it so, once
            raise self._failure(exc, "listing the objects under", f"s3://{bucket}/{prefix}",
                                needs=f"s3:ListBucket on the bucket {bucket}", on="") from exc

    def delete_many(self, uris: Sequence[str], *, check: Callable[[], None] | None = None) -> dict[str, str]:
        """Delete the objects ``uris`` (of one bucket, at most :data:`DELETE_BATCH`) with one DeleteObjects request;
        the ones the store did not delete, each with the reason its reply gave (per key: the request may delete some
        and refuse others; a key already gone counts as deleted). A failure of the whole request is raised
        (:class:`StoreObjectError`, saying what to do), nothing known deleted then; a server that refuses the batch
        request as such (:data:`_BATCH_REFUSED`) has the objects deleted one by one instead, from then on
        (:meth:`_delete_each`: ``check`` before every :data:`EACH_CHECK` of them, e.g. the lease's)."""
        if len(uris) > DELETE_BATCH:
            raise ValueError(f"one DeleteObjects request takes {DELETE_BATCH} keys at most, not {len(uris)}")
        if not uris:
            return {}
        keys = {uri: _bucket_key(uri) for uri in uris}
        buckets = {bucket for bucket, _ in keys.values()}
        if len(buckets) != 1:
            raise ValueError(f"one DeleteObjects request deletes from one bucket, not {sorted(buckets)}")
        (bucket,) = buckets
        if self._batch_refused:
            return self._delete_each(uris, check)
        where = f"s3://{bucket}/{os.path.commonprefix([k for _, k in keys.values()]).rpartition('/')[0]}/"
        try:
            reply = self.client.delete_objects(Bucket=bucket, Delete={
                "Objects": [{"Key": key} for _, key in keys.values()], "Quiet": True})
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _BATCH_REFUSED:
                logger.info("the store refused a DeleteObjects request (%s): deleting %d objects one by one",
                            _code(exc), len(uris))
                self._batch_refused = True
                return self._delete_each(uris, check)
            raise self._failure(exc, f"deleting {len(uris)} objects (one DeleteObjects request) under", where,
                                needs="s3:DeleteObject") from exc
        from botocore.exceptions import ClientError  # here: botocore is loaded with the client, on first use

        by_key = {key: uri for uri, (_, key) in keys.items()}
        failed: dict[str, str] = {}
        for error in reply.get("Errors") or ():
            uri = by_key.get(str(error.get("Key")), f"s3://{bucket}/{error.get('Key')}")
            code, said = str(error.get("Code") or "?"), str(error.get("Message") or "no message")
            if code in _MISSING:  # gone already: what the delete was for
                continue
            answer = ClientError({"Error": {"Code": code, "Message": said}}, "DeleteObjects")
            failed[uri] = str(self._failure(answer, "deleting", uri, needs="s3:DeleteObject"))
        return failed

    def _delete_each(self, uris: Sequence[str], check: Callable[[], None] | None) -> dict[str, str]:
        """:meth:`delete_many` one request per object: the ones not deleted, each with its error. A failure a later
        try may get past (the network, a busy store) is raised at once: the rest would fail alike, each after its
        timeouts, under the lease."""
        failed: dict[str, str] = {}
        for n, uri in enumerate(uris):
            if check is not None and n and n % EACH_CHECK == 0:
                check()
            try:
                self.delete(uri)
            except StoreObjectError as exc:  # it says what to do
                if exc.transient:
                    raise
                failed[uri] = str(exc)
        return failed

    def _failure(self, exc: BaseException, doing: str, uri: str, *, needs: str, on: str | None = None) -> OSError:
        """The error to raise for ``doing`` the object at ``uri`` that failed with ``exc``: FileNotFoundError when it
        is not there, else a :class:`StoreObjectError` that says what to do, read by :func:`index.lease.s3_failure`
        (the lease's own reading of botocore's errors: the same ones transient, in the same words). A refusal says
        the credentials need ``needs`` on ``on`` (by default the store's ``_speciesid/*``; ``""``: ``needs``
        names its resource itself)."""
        if _code(exc) in _MISSING:
            return FileNotFoundError(errno.ENOENT, "not in the gallery's store", uri)
        on = f"{self.uri}/{LEASE_DIR}/*" if on is None else on
        failure = s3_failure(exc, f"{doing} {uri}", needs=f"{needs} on {on}" if on else needs,
                             endpoint=self._endpoint, lookup=uri if doing in ("looking up", "reading") else "")
        if failure is None:
            return StoreObjectError(f"{doing} {uri} failed ({type(exc).__name__}: {_first(exc)})")
        return StoreObjectError(failure.message, transient=failure.transient)


#: How old an upload no row references must be before :func:`sweep_uploads` removes it (seconds; one day). An add
#: puts its uploads before it commits their rows, seconds to minutes apart (its embedding, a wait for the lease):
#: an object younger than this may be an add's in flight, never an orphan to remove.
SWEEP_GRACE_S = 86400.0


#: The name the API gives an upload it keeps (:func:`upload_uri`, ``retrieval.workflows._upload_path``): its content's
#: sha256 in lowercase hex and an extension (``.jpg``, ``.png``... ``.img`` for a format it cannot name).
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{64}\.[^./]+$")
#: The temporary file :func:`index.atomic.atomic_write` writes an upload of a folder's ``uploads/`` as
#: (``.<sha256><ext>.<32 hex>.tmp<ext>``): left there by a write killed mid-way, named by no row.
_UPLOAD_LEFTOVER = re.compile(r"^\.[0-9a-f]{64}\.[^./]+\.[0-9a-f]{32}\.tmp(\.[^./]+)?$")


def is_upload_name(name: str) -> bool:
    """Whether ``name`` (a file name in ``uploads/``, a key's part after ``_speciesid/uploads/``) is one the API
    gives an upload (``<sha256><ext>``), or the temporary file of one a write killed mid-way left in a folder
    (``.<sha256><ext>.<32 hex>.tmp<ext>``; no row ever names it): only such names are :func:`sweep_uploads`'s."""
    return bool(_UPLOAD_NAME.match(name) or _UPLOAD_LEFTOVER.match(name))


@dataclass
class SweepReport:
    """What :func:`sweep_uploads` found: the places it swept (the store's ``_speciesid/uploads/``, the folder's
    ``uploads/``), the uploads no row references and older than ``older_than_s`` it removed (or with ``dry_run``
    would remove), those of them it could not remove (each with the reason: a key the store refused, a file that
    could not be unlinked; left for a later sweep), and what it kept: ``referenced`` the uploads a row uses (of any
    age), ``young`` those no row uses but younger than the grace age, and ``others`` the files (objects) there whose
    names are not an upload's (:func:`is_upload_name`), left untouched."""

    places: list[str]
    older_than_s: float
    dry_run: bool
    orphans: list[StoredObject] = field(default_factory=list)
    failed: list[tuple[StoredObject, str]] = field(default_factory=list)
    referenced: int = 0
    young: int = 0
    others: list[StoredObject] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        """The bytes of the orphans removed (or that would be), all together."""
        return sum(o.size for o in self.orphans)


def _folder_uploads(folder: Path) -> list[StoredObject]:
    """The files of a gallery folder's ``uploads/`` with their ages (mtime, on this machine's clock: the files'),
    none when it has no such folder."""
    if not folder.is_dir():
        return []
    now = time.time()
    with os.scandir(folder) as entries:
        return [StoredObject(e.path, st.st_size, now - st.st_mtime) for e in entries
                if e.is_file(follow_symlinks=False) for st in (e.stat(follow_symlinks=False),)]


def sweep_uploads(gallery: Gallery, *, older_than_s: float = SWEEP_GRACE_S, dry_run: bool = False,
                  progress: Callable[[Iterator[StoredObject]], Iterable[StoredObject]] | None = None,
                  removing: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None) -> SweepReport:
    """Remove the uploads no row references (excluded rows count as references) that are older than
    ``older_than_s``: the objects under the store's ``_speciesid/uploads/`` on S3 (a crash between an add's put
    and its commit, a removal after a delete that failed or was left to this sweep), and the files of the folder's
    ``uploads/`` (a crash between an add's write and its commit). ``dry_run``: remove nothing, say what would go.
    ``progress`` wraps the store's listing (a progress bar); ``removing``, given how many orphans are to be removed,
    gives a bar (entered; its ``update(n)`` called as they go). Only the names the API gives its uploads are taken
    (:func:`is_upload_name`: ``<sha256><ext>``); anything else there (a stray ``notes.txt``, a key in a deeper
    folder) is left untouched and reported (``others``). Every upload, of any age, is checked against the rows, so
    the report counts those in use among the young ones too.

    The listing and the read of every row's source path are made first, holding nothing (:func:`_rows_read`); then
    under the gallery's write hold (on S3 the store's lease, so that no machine's add commits in between; none for
    a dry run or when every upload is younger than the grace age: nothing is removed then) only what was committed
    since is read (:func:`_rows_since`: nothing when the store's version has not moved, else its id column and the
    source paths of the ids the first read did not see), so every writer waits for that and the deletes alone, not
    for a read of the whole gallery. A row deleted meanwhile still counts as a reference (its upload stays for a
    later sweep). The orphans on S3 are deleted :data:`DELETE_BATCH` at a time (one DeleteObjects request each),
    each batch after a check that the lease is still this writer's (:class:`index.lease.LeaseLostError`
    otherwise: run it again). A key or file that could not be removed is reported (``failed``, with the reason) and
    the sweep goes on. A folder's upload counts as used when a row names its file name (its digest) in a folder
    named ``uploads`` (:func:`_names_upload`): the folder may be reached by another path than the rows' writer used.
    An upload that an add is putting or has put but not committed yet is younger than the grace age, and so kept;
    an add that found its object there already (an old one) and commits after this sweep removed it puts it again
    once committed (:func:`retrieval.workflows.add_photos`)."""
    if not older_than_s >= 0:
        raise ValueError(f"the grace age must be 0 seconds or more, not {older_than_s}")
    objects = gallery.objects
    folder = gallery.layout.uploads
    listed: list[StoredObject] = []
    places = [f"{folder}/"]
    where = ""
    if objects is not None:
        where = uploads_uri(objects.uri)
        places.insert(0, f"{where}/")
        listing = objects.listing(where)
        listed = list(progress(listing) if progress is not None else listing)
    files = _folder_uploads(folder)
    report = SweepReport(places=places, older_than_s=float(older_than_s), dry_run=dry_run)
    uploads: list[StoredObject] = []
    for o in listed + files:
        name = o.uri[len(where) + 1:] if is_s3(o.uri) else os.path.basename(o.uri)  # a key's part under uploads/
        (uploads if is_upload_name(name) else report.others).append(o)
    for o in report.others:
        logger.info("left %s: its name is not an upload's (<sha256><ext>)", o.uri)
    if not uploads:
        return report
    old = any(o.age_s >= older_than_s for o in uploads)
    in_folder = {o.uri for o in files}
    names = {os.path.basename(o.uri) for o in uploads if o.uri in in_folder}  # the folder's uploads
    read = _rows_read(gallery.store)  # every row, holding nothing: writers do not wait for it
    used = _Referenced(names)
    used.add(read.texts)
    # only a removal holds the gallery's write hold: a dry run, or young uploads alone, are only counted
    with contextlib.nullcontext() if dry_run or not old else gallery.writing():
        used.add(_rows_since(gallery.store, read))  # another machine's commit of a moment ago
        orphans = []
        for o in uploads:  # every upload, of any age: the summary counts those in use among the young ones too
            if used.names_file(o.uri) if o.uri in in_folder else canonical_s3_uri(o.uri) in used.stored:
                report.referenced += 1
            elif o.age_s < older_than_s:
                report.young += 1
            else:
                orphans.append(o)
        if dry_run or not orphans:
            report.orphans = orphans
            return report
        lock = write_lock(gallery.layout.write_lock)  # the gallery's own (one per folder and process): its lease
        in_store = [o for o in orphans if is_s3(o.uri)]
        with removing(len(orphans)) if removing is not None else contextlib.nullcontext() as bar:
            for start in range(0, len(in_store), DELETE_BATCH):
                batch = in_store[start:start + DELETE_BATCH]
                lock.check()  # the lease still ours: no add of another machine committed since the read above
                assert objects is not None
                refused = objects.delete_many([o.uri for o in batch], check=lock.check)
                for o in batch:
                    _removed(report, o, refused.get(o.uri))
                if bar is not None:
                    bar.update(len(batch))
            for o in orphans:
                if not is_s3(o.uri):
                    try:
                        Path(o.uri).unlink(missing_ok=True)
                    except OSError as exc:
                        _removed(report, o, f"removing {o.uri} failed ({type(exc).__name__}: {exc})")
                    else:
                        _removed(report, o, None)
                    if bar is not None:
                        bar.update(1)
    return report


def unused_uploads(gallery: Gallery, *, api: bool = False) -> dict[str, Any]:
    """The ``uploads`` block of ``index info`` and ``/readyz``: the uploads no row uses (an add killed between keeping
    its photos and committing their rows; a removal that failed), counted by a dry run of :func:`sweep_uploads`
    (holding nothing: the listing, then every row's source path): ``unused``, of them ``removable`` (older than
    :data:`SWEEP_GRACE_S`, which ``speciesid index sweep-uploads`` removes; a younger one may be an add's in
    flight), their ``bytes``, and a ``note`` saying what to run ("" when none is unused). ``api``: the note worded
    for an HTTP client (the command runs on the server's machine). Not swept here: a sweep takes the gallery's write
    hold (on S3 the store's lease), and a photo a kill left is younger than the grace age for a day anyway. A store
    or folder that cannot be read now (any error of the store: lance's ValueError too): ``unused`` null and a
    ``note`` saying why, never raised (``index info`` goes on)."""
    try:
        report = sweep_uploads(gallery, dry_run=True)
    except Exception as exc:  # noqa: BLE001 - the store or the folder unreadable now: said, not raised
        return {"unused": None, "removable": None, "bytes": None,
                "note": f"the kept uploads could not be counted now: {_first(exc)}"}
    counted = {"unused": len(report.orphans) + report.young, "removable": len(report.orphans), "bytes": report.bytes}
    return counted | {"note": unused_uploads_words(counted, None if api else gallery.root)}


def unused_uploads_words(counted: dict[str, Any], root: str | Path | None) -> str:
    """The note of :func:`unused_uploads`' count ``counted`` ("" when none is unused); ``root``: the gallery folder
    to name in the command (None: an HTTP client's words, the server's folder on its machine)."""
    unused = counted["unused"]
    if not unused:
        return ""
    where = f"`speciesid index sweep-uploads --index {root}`" if root is not None else (
        "`speciesid index sweep-uploads --index` with the server's gallery folder, on its machine")
    return (f"{unused} kept upload photo{'s' * (unused != 1)} that no reference uses ({counted['removable']} older "
            f"than a day: {megabytes(counted['bytes'])}): adds cut off between keeping their photos and storing "
            f"their rows (a server killed mid-add), or removals that failed; run {where} (it removes those older "
            "than a day; --older-than sets the age)")


@dataclass(frozen=True)
class _RowsRead:
    """What :func:`_rows_read` read: the store's version before the read, the ids the read saw (excluded rows
    too) and their stored source paths."""

    version: int
    ids: np.ndarray  # sorted int64
    texts: list[str]


def _rows_read(store: ReferenceStore) -> _RowsRead:
    """Every row's id and source path (excluded rows too), at the store's latest version, in one read (one
    snapshot: whatever it saw is named by the ids it returns)."""
    store.refresh()  # another machine's commit of a moment ago is seen
    version = store.version
    ids, texts = store.source_paths()  # two columns, not every metadata column
    return _RowsRead(version, sorted_unique(ids), texts)


#: Ids per read of the source paths of the rows committed since :func:`_rows_read` (one SQL ``IN`` list each).
_SINCE_CHUNK = 1000


def _rows_since(store: ReferenceStore, read: _RowsRead) -> list[str]:
    """The source paths of the rows committed since ``read`` (at the latest version; call it under the write hold,
    so that none commits before the deletes): none when the store's version is still the one before the read;
    else the store's id column (excluded rows too) is read, and the source paths of the ids ``read`` did not see.
    Ids are never given twice (:meth:`index.gallery.Gallery.reserve_ids`) and a row's source path is never
    rewritten, so a row committed since is one of those ids."""
    store.refresh()
    if store.version == read.version:
        return []
    new = np.setdiff1d(store.ids(include_excluded=True), read.ids, assume_unique=True).tolist()
    logger.debug("store moved from version %d to %d since the rows were read: %d new row(s) read again",
                 read.version, store.version, len(new))
    texts: list[str] = []
    for start in range(0, len(new), _SINCE_CHUNK):
        texts.extend(str(t) for t in store.metadata(new[start:start + _SINCE_CHUNK])["source_path"])
    return texts


def _removed(report: SweepReport, o: StoredObject, refused: str | None) -> None:
    """Record the orphan ``o`` removed, or not (``refused``: why), in ``report``, and log it."""
    if refused is None:
        report.orphans.append(o)
        logger.info("removed %s (%d bytes, %.0f s old): no reference uses it", o.uri, o.size, o.age_s)
    else:
        report.failed.append((o, refused))
        logger.warning("did not remove %s, which no reference uses: %s; it stays, harmless, for a later sweep",
                       o.uri, refused)


class _Referenced:
    """What the rows reference, in one pass over their source paths with plain string splits (no path object per
    row: a count reads every row; path objects were 3.2 of the 5.0 s of a profiled count of 50,000, docs/api.md): the
    S3 objects (canonical URIs), the names of the folder's uploads (``names``) that a row names in a folder called
    ``uploads``, and the rows naming one of them elsewhere (compared as files: :func:`_names_upload`)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names
        self.stored: set[str] = set()
        self.in_uploads: set[str] = set()
        self.elsewhere: dict[str, list[str]] = {}

    def add(self, texts: Iterable[str]) -> None:
        """Take in the rows' source paths ``texts``."""
        from index.store import source_file  # here: index.store loads lancedb

        for text in texts:
            if is_s3(text):
                self.stored.add(canonical_s3_uri(text))
                continue
            if not self.names:  # no file in the folder's uploads/ (a store on S3 keeps them there)
                continue
            if text.startswith("file://"):
                text = str(source_file(text))
            folder, _, name = text.rpartition(os.sep)
            if name in self.names:
                if folder.rpartition(os.sep)[2] == UPLOADS_DIR:
                    self.in_uploads.add(name)
                else:
                    self.elsewhere.setdefault(name, []).append(text)

    def names_file(self, upload: str) -> bool:
        """Whether a row names the folder's upload file ``upload`` (:func:`_names_upload`)."""
        return os.path.basename(upload) in self.in_uploads or _names_upload(self.elsewhere, upload)


def _names_upload(local: dict[str, list[str | Path]], upload: str) -> bool:
    """Whether a row names the folder's upload file ``upload``: a row's source path with its file name (an upload's
    name is its content digest, ``<sha256><ext>``) in a folder named ``uploads``, so also when the gallery's folder
    is reached by another path than the row's writer used (moved, another mount, a container's bind mount); a row
    with its name elsewhere when it is the same file (``os.path.samefile``). A file that cannot be compared (gone,
    unreadable) counts as named: an error never makes an upload unused."""
    for path in local.get(os.path.basename(upload), ()):
        if os.path.basename(os.path.dirname(path)) == UPLOADS_DIR:
            return True
        try:
            if os.path.samefile(path, upload):
                return True
        except OSError as exc:
            logger.debug("%s counts as used: a row names %s, which could not be compared with it (%s)",
                         upload, path, exc)
            return True
    return False
