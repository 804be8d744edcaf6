"""A write lease on the object store itself: serialises writers of one S3 store across machines.

``fcntl.flock`` (:mod:`index.locks`) serialises the processes of one machine, on one gallery folder. Two
machines (two copies of a gallery folder) writing one S3 store share no file: they share the bucket. The lease is
an object beside the table, ``<store uri>/_speciesid/write.lock``, holding who holds it (host, pid, since):

- taken with a conditional PUT (``If-None-Match: *``): of writers racing, exactly one creates it;
- renewed by a heartbeat thread while held (PUT ``If-Match: <etag>``; the body changes each time, so does the
  etag): a holder that lost it (broken as stale) notices, and :meth:`S3Lease.check` refuses to commit;
- released by a conditional DELETE (``If-Match: <etag>``): never someone else's lease;
- a lease not renewed for its TTL is stale (a holder killed, or cut off): judged by the object's LastModified
  against the S3 server's clock (the response's ``Date`` header), never this machine's; it is broken by a
  conditional DELETE of exactly that etag (a holder that renews meanwhile keeps it), then taken again.

Under the lease sits the gallery's shared id high-water mark, ``<store uri>/_speciesid/ids.json``, written (also
conditionally) before the rows it names, so two machines never give one id. boto3 talks to the store (the
``s3`` extra): pyarrow's S3 file system and Lance expose no conditional writes. Its endpoint and credentials come
from the same storage options the store is opened with (:func:`index.store.storage_options`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import email.utils
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

logger = logging.getLogger(__name__)

#: Seconds a lease stays valid without a renewal (a killed holder blocks other writers at most this long).
LEASE_TTL_S = 30.0
#: Folder of the coordination objects, beside the store's table.
LEASE_DIR = "_speciesid"
LEASE_OBJECT = "write.lock"
IDS_OBJECT = "ids.json"

#: Error codes of a failed precondition (a conditional write that lost: someone else's object is there).
_PRECONDITION = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
#: Error codes of an object that is not there.
_MISSING = {"NoSuchKey", "404", "NotFound"}
#: Error codes of a store that does not implement conditional requests.
_UNSUPPORTED = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}


class ConditionalWritesUnsupported(ValueError):
    """The object store ignores or refuses conditional writes (If-None-Match / If-Match), which the lease needs."""


class LeaseLostError(RuntimeError):
    """This writer's lease was broken by another writer (it was not renewed in time): nothing more is committed."""


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 (or S3-compatible) store, the kind the lease works on."""
    return str(uri).startswith(("s3://", "s3a://"))


def _code(exc: BaseException) -> str:
    """The error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    code = str(error.get("Code", ""))
    return code if code and code != "None" else status


def _opt(options: dict[str, str], *names: str) -> str | None:
    """The first of ``names`` set in Lance storage options (Lance accepts several spellings of each)."""
    for name in names:
        if options.get(name):
            return str(options[name])
    return None


def s3_client(options: dict[str, str]) -> Any:
    """A boto3 S3 client for the endpoint, region and credentials in Lance storage ``options`` (those not given
    there come from boto3's own chain: environment, profile, instance role)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - the s3 extra not installed
        raise ValueError("a store on S3 needs boto3 for its write lease (serialising writers across machines): "
                         "pip install 'speciesid[s3]'") from exc
    virtual = (_opt(options, "aws_virtual_hosted_style_request", "virtual_hosted_style_request") or "").lower()
    endpoint = _opt(options, "aws_endpoint", "endpoint", "aws_endpoint_url", "endpoint_url")
    style = "virtual" if virtual == "true" else ("path" if endpoint else "auto")
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=_opt(options, "region", "aws_region", "aws_default_region"),
        aws_access_key_id=_opt(options, "aws_access_key_id", "access_key_id"),
        aws_secret_access_key=_opt(options, "aws_secret_access_key", "secret_access_key"),
        aws_session_token=_opt(options, "aws_session_token", "session_token", "token"),
        config=Config(s3={"addressing_style": style}, retries={"max_attempts": 3, "mode": "standard"},
                      connect_timeout=10, read_timeout=30),
    )


def _server_now(response: dict) -> dt.datetime | None:
    """The S3 server's clock at a response (its ``Date`` header), or None when it sent none."""
    date = ((response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None


class S3Lease:
    """The write lease of one S3 store (``<uri>/_speciesid/write.lock``). Not re-entrant: :class:`index.locks.
    WriteLock` holds it once per process and gallery folder, inside its ``flock``."""

    def __init__(self, uri: str, options: dict[str, str] | None = None, *, ttl: float | None = None,
                 client: Any = None) -> None:
        if not is_s3(uri):
            raise ValueError(f"a write lease needs an s3:// store, not {uri}")
        self.uri = str(uri).rstrip("/")
        bucket, _, prefix = self.uri.split("://", 1)[1].partition("/")
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.key = f"{self.prefix}{LEASE_DIR}/{LEASE_OBJECT}"
        self.ids_key = f"{self.prefix}{LEASE_DIR}/{IDS_OBJECT}"
        self.ttl = float(ttl if ttl is not None else os.environ.get("SPECIESID_LEASE_TTL_S", LEASE_TTL_S))
        self._options = dict(options or {})
        self._client = client
        self._etag: str | None = None
        self._holder: dict[str, Any] = {}
        self._renewed = 0.0  # monotonic time of the last successful put
        self._lost: str | None = None  # why the lease was lost while held
        self._probed = False  # the store was shown to refuse a conditional put it should refuse
        self._guard = threading.Lock()  # the etag between the heartbeat and the holder
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def client(self) -> Any:
        """The boto3 client (made on first use)."""
        if self._client is None:
            self._client = s3_client(self._options)
        return self._client

    @property
    def where(self) -> str:
        """The lease object's URI."""
        return f"s3://{self.bucket}/{self.key}"

    @property
    def held(self) -> bool:
        """Whether this object holds the lease (it may have been lost since: :meth:`check`)."""
        return self._etag is not None

    # ------------------------------------------------------------------ taking it
    def acquire(self, timeout: float) -> None:
        """Take the lease, waiting up to ``timeout`` seconds for its holder (0: one try); a stale one is broken.

        TimeoutError names the holder and what to do; :class:`ConditionalWritesUnsupported` when the store does not
        honour conditional writes."""
        if self.held:
            raise RuntimeError(f"lease {self.where} is already held by this object")
        start = time.monotonic()
        pause, warned = 0.05, False
        while True:
            if self._try_put():
                self._probe()
                self._start_heartbeat()
                return
            holder = self._break_if_stale()
            if holder is None:
                continue  # it was stale (broken now) or gone meanwhile: try again at once
            waited = time.monotonic() - start
            if waited >= timeout:
                raise TimeoutError(self._busy_message(holder, timeout))
            if waited > 2 and not warned:
                logger.info("waiting for another writer of the store %s (%s)", self.uri, _who(holder))
                warned = True
            time.sleep(min(pause, max(timeout - waited, 0.0)))
            pause = min(pause * 1.5, 1.0)

    def _body(self) -> bytes:
        """What the lease object says (fresh each put: a new etag even for the same holder)."""
        return json.dumps({**self._holder, "renewed": time.time(), "nonce": uuid.uuid4().hex}).encode()

    def _try_put(self) -> bool:
        """One conditional create of the lease object; whether it is ours now."""
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "ttl_s": self.ttl}
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*",
                                              ContentType="application/json")
        except Exception as exc:  # noqa: BLE001 - botocore's ClientError, told apart by code
            code = _code(exc)
            if code in _PRECONDITION:
                return False
            if code in _UNSUPPORTED:
                raise self._unsupported(exc) from exc
            raise
        with self._guard:
            self._etag, self._renewed, self._lost = response["ETag"], time.monotonic(), None
        return True

    def _probe(self) -> None:
        """Once per lease object: a second create of the held lease must be refused. A store that accepts it ignores
        If-None-Match, and would let two writers hold the lease at once."""
        if self._probed:
            return
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key, Body=b"{}", IfNoneMatch="*")
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _PRECONDITION:
                self._probed = True
                return
            self._forget()
            if _code(exc) in _UNSUPPORTED:
                raise self._unsupported(exc) from exc
            raise
        with contextlib.suppress(Exception):
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        self._forget()
        raise self._unsupported(None)

    def _unsupported(self, exc: BaseException | None) -> ConditionalWritesUnsupported:
        said = f" ({_code(exc)}: {exc})" if exc is not None else " (it accepted a create of an object that exists)"
        return ConditionalWritesUnsupported(
            f"the object store of {self.uri} does not honour conditional writes (If-None-Match / If-Match){said}: "
            "speciesid's write lease, which keeps writers on several machines from storing a photo twice or giving "
            "an id twice, needs them. Use a store that supports them (AWS S3, MinIO, Ceph RGW and R2 do), or keep "
            "the gallery's store in its folder (no --store)")

    def _break_if_stale(self) -> dict | None:
        """The holder of the lease (its body, with ``age_s``), or None when there was none or it was stale and is
        broken now. Staleness is judged on the server's clock: LastModified against the response's Date."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            body = response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return None  # released meanwhile
            raise
        try:
            holder = json.loads(body or b"{}")
        except ValueError:
            holder = {}
        holder = holder if isinstance(holder, dict) else {}
        now = _server_now(response)
        if now is None:  # no Date header (not S3 over HTTP): this machine's clock, the only one there is
            now = dt.datetime.now(dt.timezone.utc)
        modified = response["LastModified"]
        age = (now - modified).total_seconds()
        holder["age_s"] = age
        try:
            ttl = float(holder.get("ttl_s") or self.ttl)
        except (TypeError, ValueError):
            ttl = self.ttl
        if age <= ttl:
            return holder
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=response["ETag"])
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _PRECONDITION | _MISSING:
                return None  # renewed, released or broken by someone else meanwhile: look again
            raise
        logger.warning("broke the stale write lease of the store %s (%s, not renewed for %.0f s, past its %.0f s); "
                       "that writer is gone or cut off", self.uri, _who(holder), age, ttl)
        return None

    def _busy_message(self, holder: dict, timeout: float) -> str:
        return (f"another writer has held the store {self.uri} for over {timeout:.0f} s ({_who(holder)}; lease "
                f"{self.where}, renewed {holder.get('age_s', 0):.0f} s ago): try again when it is done. If that "
                f"writer is gone, its lease lapses {self.ttl:.0f} s after its last renewal and is then broken "
                f"by the next writer; if its process still runs, let it finish or stop it")

    # ------------------------------------------------------------------ holding it
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name=f"lease {self.where}", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as exc:  # noqa: BLE001 - a network error: try again at the next beat
                logger.warning("could not renew the write lease %s: %s", self.where, exc)

    def renew(self) -> None:
        """Renew the held lease now (a conditional put on its etag); LeaseLostError when it is not ours any more."""
        with self._guard:
            if self._etag is None:
                raise LeaseLostError(f"the write lease {self.where} is not held")
            if self._lost:
                raise LeaseLostError(self._lost)
            try:
                response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                  IfMatch=self._etag, ContentType="application/json")
            except Exception as exc:  # noqa: BLE001
                if _code(exc) in _PRECONDITION | _MISSING:
                    self._lost = (f"the write lease {self.where} of this writer was broken by another (not renewed "
                                  f"within {self.ttl:.0f} s): nothing more is committed; run the command again")
                    logger.error("%s", self._lost)
                    raise LeaseLostError(self._lost) from exc
                raise
            self._etag, self._renewed = response["ETag"], time.monotonic()

    def check(self) -> None:
        """Before a commit: the lease is still ours (renewed now when its last renewal is over half the TTL
        old); LeaseLostError otherwise."""
        if self._lost:
            raise LeaseLostError(self._lost)
        if time.monotonic() - self._renewed > self.ttl / 2:
            self.renew()

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still ours (a conditional delete on its etag)."""
        self._stop.set()
        if self._beat is not None and self._beat is not threading.current_thread():
            self._beat.join(timeout=self.ttl)
        self._beat = None
        with self._guard:
            etag, lost = self._etag, self._lost
            self._forget()
        if etag is None or lost:
            return
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
        except Exception as exc:  # noqa: BLE001 - it lapses after its TTL anyway
            if _code(exc) in _PRECONDITION | _MISSING:
                logger.warning("the write lease %s was broken by another writer before this one released it",
                               self.where)
            else:
                logger.warning("could not release the write lease %s (%s): it lapses in %.0f s", self.where, exc,
                               self.ttl)

    def _forget(self) -> None:
        self._etag, self._lost = None, None

    # ------------------------------------------------------------------ shared ids
    def read_next_id(self) -> tuple[int | None, str | None]:
        """(the shared next id, its etag), (None, None) when no writer recorded one yet (call holding the lease)."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.ids_key)
            return int(json.loads(response["Body"].read())["next"]), response["ETag"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{self.uri}/{LEASE_DIR}/{IDS_OBJECT} is unreadable ({exc}): delete it (the next "
                             "writer steps over every id the store holds) and run the command again") from exc
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return None, None
            raise

    def write_next_id(self, next_id: int, etag: str | None) -> None:
        """Record the shared next id, conditional on the version read (:meth:`read_next_id`): a writer without the
        lease that wrote it meanwhile makes this fail (LeaseLostError), never a silent overwrite."""
        self.check()
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.ids_key, Body=json.dumps({"next": int(next_id)}).encode(),
                                   ContentType="application/json", **condition)
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _PRECONDITION | _MISSING:
                raise LeaseLostError(f"{self.uri}/{LEASE_DIR}/{IDS_OBJECT} changed under this writer's lease (another "
                                     "writer without it?): nothing was committed; run the command again") from exc
            raise

    # ------------------------------------------------------------------ a half-created table
    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the bucket)."""
        keys: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys += [o["Key"] for o in page.get("Contents", [])]
        return keys

    def delete_keys(self, keys: list[str]) -> None:
        """Delete the objects ``keys`` (call holding the lease)."""
        self.check()
        for key in keys:
            self.client.delete_object(Bucket=self.bucket, Key=key)


def _who(holder: dict) -> str:
    """The holder of a lease as people read it."""
    return (f"held by host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
            f"{holder.get('since', '?')}")


def half_created_objects(lease: S3Lease, table_uri: str) -> tuple[list[str], list[str]] | None:
    """A table on the lease's store that holds no committed version: (all its keys, those beyond Lance's bookkeeping
    ``_versions/`` and ``_transactions/``, relative to the table); None when it holds a version (a ``.manifest``)."""
    prefix = table_uri.split("://", 1)[1].partition("/")[2].rstrip("/") + "/"
    keys = lease.list_keys(prefix)
    from index.store import uncommitted_files  # the one rule (index.store.half_created's)

    beyond = uncommitted_files(k[len(prefix):] for k in keys)
    return None if beyond is None else (keys, beyond)
