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
may get past it.
"""

from __future__ import annotations

import errno
import logging
import mimetypes
import threading
import time
from typing import Any

from index.lease import (
    _CONFLICT,
    _DENIED,
    _MISSING,
    _PRECONDITION,
    CONFLICT_PAUSE_S,
    CONFLICT_TRIES,
    LEASE_DIR,
    LeaseError,
    _bucket_key,
    _code,
    _endpoint,
    _first,
    _network_error,
    _no_credentials,
    _transient,
    is_s3,
    missing_key_hint,
    s3_client,
)

logger = logging.getLogger(__name__)

#: The folder of the API's uploads in the store, beside the lease (``<store uri>/_speciesid/uploads/``).
UPLOADS_DIR = "uploads"
#: The folder of the shared probe's two files in the store (``<store uri>/_speciesid/probe/``).
PROBE_DIR = "probe"


class StoreObjectError(LeaseError, OSError):
    """A request on an object beside the store's table failed (permissions, the network, a busy store); its message
    says what to do, ``transient`` whether a later try may get past it."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def uploads_uri(store_uri: str) -> str:
    """Where a store keeps the API's uploads: ``<store uri>/_speciesid/uploads``."""
    return f"{str(store_uri).rstrip('/')}/{LEASE_DIR}/{UPLOADS_DIR}"


def upload_uri(store_uri: str, name: str) -> str:
    """The URI of the upload ``name`` (``<sha256><ext>``) in a store."""
    return f"{uploads_uri(store_uri)}/{name}"


class ObjectChangedError(StoreObjectError):
    """The object was replaced (or removed) since its ETag was read: read it again later."""

    def __init__(self, message: str) -> None:
        super().__init__(message, transient=True)


def probe_uri(store_uri: str, name: str) -> str:
    """The URI of the shared probe's file ``name`` (``probe.json``, ``probe.npz``) in a store."""
    return f"{str(store_uri).rstrip('/')}/{LEASE_DIR}/{PROBE_DIR}/{name}"


class StoreObjects:
    """Objects of one S3 store: put if absent, get, head, delete, by ``s3://`` URI. The boto3 client is made on
    first use from the store's storage ``options`` (or passed in); boto3 clients may be shared between threads."""

    def __init__(self, store_uri: str, options: dict[str, str] | None = None, *, client: Any = None) -> None:
        if not is_s3(store_uri):
            raise ValueError(f"objects beside the table need an s3:// store, not {store_uri}")
        self.uri = str(store_uri).rstrip("/")
        self._options = dict(options or {})
        self._client = client
        self._guard = threading.Lock()

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

    def _failure(self, exc: BaseException, doing: str, uri: str, *, needs: str) -> OSError:
        """The error to raise for ``doing`` the object at ``uri`` that failed with ``exc``: FileNotFoundError when it
        is not there, else a :class:`StoreObjectError` that says what to do."""
        code = _code(exc)
        if code in _MISSING:
            return FileNotFoundError(errno.ENOENT, "not in the gallery's store", uri)
        where = f"{self.uri}/{LEASE_DIR}/*"
        if _network_error(exc):
            endpoint = _endpoint(exc) or "the store's S3 endpoint"
            return StoreObjectError(f"{doing} {uri} got no answer from {endpoint} ({type(exc).__name__}: "
                                    f"{_first(exc)}): check the network between this machine and the store, then "
                                    "try again", transient=True)
        if _no_credentials(exc):
            return StoreObjectError(f"{doing} {uri} found no credentials for the store ({_first(exc)}): set "
                                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) for this process, "
                                    "or run it where a role gives them")
        if code in _DENIED:
            if doing in ("looking up", "reading"):  # a HEAD or GET: S3 refuses a missing key without ListBucket
                bucket, key = _bucket_key(uri)
                return StoreObjectError(f"{doing} {uri} was refused ({code}: {_first(exc)}): "
                                        f"{missing_key_hint(bucket, key)}; or, if it is there, the credentials need "
                                        f"{needs} on {where}")
            return StoreObjectError(f"{doing} {uri} was refused ({code}: {_first(exc)}): the credentials need "
                                    f"{needs} on {where}")
        if code and _transient(exc):
            return StoreObjectError(f"{doing} {uri} failed ({code}: {_first(exc)}): the store is busy or failing for "
                                    "now; try again shortly", transient=True)
        return StoreObjectError(f"{doing} {uri} failed ({code or type(exc).__name__}: {_first(exc)})")
