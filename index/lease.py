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
  conditional DELETE of exactly that etag (a holder that renews meanwhile keeps it), then taken again;
- a conditional write S3 answers with 409 ConditionalRequestConflict (it raced another on the key) is tried again
  after a short pause, as S3 asks; only 412 (and 404 on a renewal) means the lease is someone else's now;
- before a store is trusted, a second create of the held lease and a PUT and a DELETE naming a wrong etag must all
  be refused: a store that ignores If-None-Match or If-Match is refused (:class:`ConditionalWritesUnsupported`).

The lease's errors are :class:`LeaseError` subclasses, whose messages say what to do and are passed on as they are.

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
_PRECONDITION = {"PreconditionFailed", "412"}
#: Error codes of a conditional write that raced another operation on the key: S3 says to retry it.
_CONFLICT = {"ConditionalRequestConflict", "409"}
#: Error codes of an object that is not there.
_MISSING = {"NoSuchKey", "404", "NotFound"}
#: Error codes of a store that does not implement conditional requests.
_UNSUPPORTED = {"NotImplemented", "501"}
#: Error codes of a request refused as malformed: a store without conditional writes when it names their headers.
_INVALID = {"InvalidArgument", "InvalidRequest", "400"}
#: Error codes of credentials that may not do what the lease needs.
_DENIED = {"AccessDenied", "403", "AllAccessDisabled"}
#: Tries of a conditional write that keeps meeting 409 ConditionalRequestConflict, and the first pause (doubled).
CONFLICT_TRIES, CONFLICT_PAUSE_S = 5, 0.05
#: The parameters the lease sends, by S3 operation; botocore's S3 model has all of them from 1.35.69 on.
NEEDED_PARAMS = {"PutObject": ("IfNoneMatch", "IfMatch"), "DeleteObject": ("IfMatch",)}
BOTO3_FLOOR = "1.35.69"


class LeaseError(Exception):
    """A failure of the store's write lease whose message says what to do (passed on as it is, never re-worded)."""


class ConditionalWritesUnsupported(LeaseError, ValueError):
    """The object store ignores or refuses conditional writes (If-None-Match / If-Match), which the lease needs."""


class LeaseLostError(LeaseError, RuntimeError):
    """This writer's lease was broken by another writer (it was not renewed in time): nothing more is committed."""


class LeaseStoreError(LeaseError, ValueError):
    """A request on the lease's objects was refused (permissions, a client too old, another store error)."""


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
        raise LeaseStoreError("a store on S3 needs boto3 for its write lease (serialising writers across "
                              "machines): pip install 'speciesid[s3]'") from exc
    virtual = (_opt(options, "aws_virtual_hosted_style_request", "virtual_hosted_style_request") or "").lower()
    endpoint = _opt(options, "aws_endpoint", "endpoint", "aws_endpoint_url", "endpoint_url")
    style = "virtual" if virtual == "true" else ("path" if endpoint else "auto")
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=_opt(options, "region", "aws_region", "aws_default_region"),
        aws_access_key_id=_opt(options, "aws_access_key_id", "access_key_id"),
        aws_secret_access_key=_opt(options, "aws_secret_access_key", "secret_access_key"),
        aws_session_token=_opt(options, "aws_session_token", "session_token", "token"),
        config=Config(s3={"addressing_style": style}, retries={"max_attempts": 3, "mode": "standard"},
                      connect_timeout=10, read_timeout=30),
    )
    check_client(client)
    return client


def check_client(client: Any) -> None:
    """Refuse a boto3 client whose S3 model lacks a parameter the lease sends (boto3 before 1.35.69): its calls
    would fail with "Unknown parameter", which says nothing of what to do."""
    model = client.meta.service_model
    missing = [f"{op} {name}" for op, names in NEEDED_PARAMS.items()
               for name in names if name not in model.operation_model(op).input_shape.members]
    if missing:
        raise LeaseStoreError(_upgrade_message(f"its S3 model has no {', '.join(missing)}"))


def _upgrade_message(why: str) -> str:
    try:
        import botocore

        version = f" (botocore {botocore.__version__})"
    except ImportError:  # pragma: no cover
        version = ""
    return (f"the boto3 installed here{version} is too old for the store's write lease, which sends conditional "
            f"writes ({why}): upgrade boto3 to {BOTO3_FLOOR} or later: pip install -U 'speciesid[s3]'")


def _first(exc: BaseException | None) -> str:
    """The first line of an error's text, cut at 300 characters."""
    return (str(exc).strip().splitlines() or [""])[0][:300]


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
    def acquire(self, timeout: float, *, waited: float = 0.0) -> None:
        """Take the lease, waiting up to ``timeout`` seconds for its holder (0: one try); a stale one is broken.
        ``waited``: seconds this writer already waited before (for the local lock), told in the timeout message.

        Every try that finds the lease taken pauses (growing to 1 s) before the next, and the timeout is honoured
        whether or not the holder could be read; only a try right after breaking a stale lease is immediate.
        TimeoutError names the holder and what to do; :class:`ConditionalWritesUnsupported` when the store does not
        honour conditional writes. A failure after the lease object was put deletes it again (nothing is left
        for others to wait out), an interrupt included."""
        if self.held:
            raise RuntimeError(f"lease {self.where} is already held by this object")
        start = time.monotonic()
        pause, warned = 0.05, False
        while True:
            if self._take():
                return
            holder, broke = self._break_if_stale()
            if broke:
                continue  # a stale lease was broken just now: try again at once
            spent = time.monotonic() - start
            if spent >= timeout:
                raise TimeoutError(self._busy_message(holder, waited + spent))
            if spent > 2 and not warned:
                logger.info("waiting for another writer of the store %s (%s)", self.uri,
                            _who(holder) if holder else "taken and released meanwhile")
                warned = True
            time.sleep(min(pause, max(timeout - spent, 0.0)))
            pause = min(pause * 1.5, 1.0)

    def _take(self) -> bool:
        """One try: put the lease object, check the store honours conditional writes, start renewing it. Whether
        the lease is ours now; on any failure once it was put (an interrupt too), the object is deleted again."""
        try:
            if not self._try_put():
                return False
            self._probe()
            self._start_heartbeat()
            return True
        except BaseException as exc:
            with self._guard:
                etag = self._etag
                self._forget()
            if etag is not None:  # ours was put: never left for others to wait a TTL out
                careless = isinstance(exc, ConditionalWritesUnsupported)  # If-Match unheeded: the object is ours
                with contextlib.suppress(Exception):
                    self.client.delete_object(Bucket=self.bucket, Key=self.key,
                                              **({} if careless else {"IfMatch": etag}))
            raise

    def _body(self) -> bytes:
        """What the lease object says (fresh each put: a new etag even for the same holder)."""
        return json.dumps({**self._holder, "renewed": time.time(), "nonce": uuid.uuid4().hex}).encode()

    def _try_put(self) -> bool:
        """One conditional create of the lease object; whether it is ours now (False: another's, or a racing
        write made S3 answer 409 ConditionalRequestConflict: the caller pauses and tries again)."""
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "ttl_s": self.ttl}
        try:
            response = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), IfNoneMatch="*",
                                              ContentType="application/json")
        except Exception as exc:  # noqa: BLE001 - botocore's ClientError, told apart by code
            if _code(exc) in _PRECONDITION | _CONFLICT:
                return False
            raise self._failure(exc, "taking it (a PUT with If-None-Match)") from exc
        with self._guard:
            self._etag, self._renewed, self._lost = response["ETag"], time.monotonic(), None
        return True

    def _probe(self) -> None:
        """Once per lease object, holding the lease: a second create of it (If-None-Match), a put and a delete
        naming a wrong etag (If-Match) must all be refused. A store that accepts one ignores that condition, and
        would let two writers hold the lease at once (or delete another's)."""
        if self._probed:
            return
        wrong = '"0"'
        checks = (("a create of an object that exists (If-None-Match)",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self.key, Body=b"{}", IfNoneMatch="*")),
                  ("a put naming a wrong etag (If-Match)",
                   lambda: self.client.put_object(Bucket=self.bucket, Key=self.key, Body=b"{}", IfMatch=wrong)),
                  ("a delete naming a wrong etag (If-Match)",
                   lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=wrong)))
        for what, request in checks:
            for attempt in range(CONFLICT_TRIES):
                try:
                    request()
                except Exception as exc:  # noqa: BLE001
                    code = _code(exc)
                    if code in _CONFLICT and attempt + 1 < CONFLICT_TRIES:
                        time.sleep(CONFLICT_PAUSE_S * 2 ** attempt)  # a racing create: ask again
                        continue
                    if code in _PRECONDITION:
                        break  # refused, as it must be
                    raise self._failure(exc, f"checking the store refuses {what}") from exc
                raise self._unsupported(None, f"it accepted {what}")
        self._probed = True

    def _unsupported(self, exc: BaseException | None, said: str = "") -> ConditionalWritesUnsupported:
        said = f" ({_code(exc)}: {_first(exc)})" if exc is not None else f" ({said})"
        return ConditionalWritesUnsupported(
            f"the object store of {self.uri} does not honour conditional writes (If-None-Match / If-Match){said}: "
            "speciesid's write lease, which keeps writers on several machines from storing a photo twice or giving "
            "an id twice, needs them. Use a store that supports them (AWS S3, MinIO, Ceph RGW and R2 do), or keep "
            "the gallery's store in its folder (no --store)")

    def _failure(self, exc: BaseException, doing: str) -> BaseException:
        """The error to raise for a request on the lease's objects that failed with ``exc``: one that names the lease
        and what to do for a store's refusal; ``exc`` itself for anything else (a network error)."""
        code = _code(exc)
        if not code:
            if type(exc).__name__ == "ParamValidationError" and ("IfMatch" in str(exc) or "IfNoneMatch" in str(exc)):
                return LeaseStoreError(_upgrade_message(str(exc)))
            return exc
        if code in _UNSUPPORTED:
            return self._unsupported(exc)
        error = (getattr(exc, "response", None) or {}).get("Error") or {}
        named = f"{error.get('ArgumentName', '')} {error.get('Message', '')} {exc}".lower()
        if code in _INVALID and any(h in named for h in ("if-none-match", "if-match", "ifnonematch", "ifmatch",
                                                          "conditional")):
            return self._unsupported(exc)
        if code in _DENIED:
            return LeaseStoreError(
                f"the write lease {self.where}: {doing} was refused ({code}: {_first(exc)}). The lease keeps writers "
                f"on several machines apart; the credentials need s3:GetObject, s3:PutObject and s3:DeleteObject on "
                f"s3://{self.bucket}/{self.prefix}{LEASE_DIR}/* (the lease and the shared id mark beside the table)")
        return LeaseStoreError(f"the write lease {self.where}: {doing} failed ({code}: {_first(exc)})")

    def _break_if_stale(self) -> tuple[dict | None, bool]:
        """(the holder of the lease: its body, with ``age_s`` and ``held_s``, or None when it could not be read, or
        was gone; whether it was stale and is broken now). Staleness is judged on the server's clock: LastModified
        against the response's Date, and the holder's own TTL."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            body = response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return None, False  # released meanwhile
            raise self._failure(exc, "reading who holds it (a GET)") from exc
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
        with contextlib.suppress(TypeError, ValueError):
            holder["held_s"] = max((now - dt.datetime.fromisoformat(str(holder["since"]))).total_seconds(), age)
        try:
            ttl = float(holder.get("ttl_s") or self.ttl)
        except (TypeError, ValueError):
            ttl = self.ttl
        holder["ttl_s"] = ttl
        if age <= ttl:
            return holder, False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=response["ETag"])
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _PRECONDITION | _MISSING | _CONFLICT:
                return None, False  # renewed, released or broken by someone else meanwhile: look again
            raise self._failure(exc, "breaking a stale lease (a DELETE with If-Match)") from exc
        logger.warning("broke the stale write lease of the store %s (%s, not renewed for %.0f s, past its %.0f s); "
                       "that writer is gone or cut off", self.uri, _who(holder), age, ttl)
        return None, True

    def _busy_message(self, holder: dict | None, waited: float) -> str:
        if not holder:
            return (f"this writer waited {waited:.0f} s for the store {self.uri}: other writers kept taking its "
                    f"write lease {self.where} (released and taken again between this one's tries). Try again "
                    "when they are done")
        held = holder.get("held_s")
        held_for = f", for {held:.0f} s" if isinstance(held, (int, float)) else ""
        ttl = holder.get("ttl_s", self.ttl)
        return (f"another writer holds the store {self.uri} ({_who(holder)}{held_for}; lease {self.where}, "
                f"renewed {holder.get('age_s', 0):.0f} s ago); this one waited {waited:.0f} s: try again when it is "
                f"done. If that writer is gone, its lease lapses {ttl:.0f} s after its last renewal (its TTL) and is "
                "then broken by the next writer; if its process still runs, let it finish or stop it")

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

    def _conditional(self, request: Any, doing: str) -> Any:
        """``request()`` (a conditional write), tried again after a short, growing pause while S3 answers 409
        ConditionalRequestConflict (a racing write on the key; S3 says to retry), at most CONFLICT_TRIES times.
        Any other failure is raised as it is, for the caller to tell apart."""
        for attempt in range(CONFLICT_TRIES):
            try:
                return request()
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in _CONFLICT:
                    raise
                if attempt + 1 == CONFLICT_TRIES:
                    raise LeaseStoreError(f"the write lease {self.where}: {doing} met {CONFLICT_TRIES} conflicting "
                                          "writes in a row (409 ConditionalRequestConflict): try again") from exc
                time.sleep(CONFLICT_PAUSE_S * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def renew(self) -> None:
        """Renew the held lease now (a conditional put on its etag); LeaseLostError when it is not ours any more."""
        with self._guard:
            if self._etag is None:
                raise LeaseLostError(f"the write lease {self.where} is not held")
            if self._lost:
                raise LeaseLostError(self._lost)
            etag = self._etag
            try:
                response = self._conditional(
                    lambda: self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(),
                                                   IfMatch=etag, ContentType="application/json"),
                    "renewing it")
            except LeaseStoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                if _code(exc) in _PRECONDITION | _MISSING:
                    self._lost = (f"the write lease {self.where} of this writer was broken by another (not renewed "
                                  f"within {self.ttl:.0f} s): nothing more is committed; run the command again")
                    logger.error("%s", self._lost)
                    raise LeaseLostError(self._lost) from exc
                failure = self._failure(exc, "renewing it (a PUT with If-Match)")
                if failure is exc:
                    raise
                raise failure from exc
            self._etag, self._renewed = response["ETag"], time.monotonic()

    def check(self) -> None:
        """Before a commit: the lease is still ours (renewed now when its last renewal is over half the TTL
        old); LeaseLostError otherwise."""
        if self._lost:
            raise LeaseLostError(self._lost)
        if time.monotonic() - self._renewed > self.ttl / 2:
            self.renew()

    def release(self) -> None:
        """Stop renewing and delete the lease object if it is still ours (a conditional delete on its etag, tried
        again while S3 answers 409 ConditionalRequestConflict)."""
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
            self._conditional(lambda: self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag),
                              "releasing it")
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
            failure = self._failure(exc, f"reading the shared id mark {IDS_OBJECT}")
            if failure is exc:
                raise
            raise failure from exc

    def write_next_id(self, next_id: int, etag: str | None) -> None:
        """Record the shared next id, conditional on the version read (:meth:`read_next_id`): a writer without the
        lease that wrote it meanwhile makes this fail (LeaseLostError), never a silent overwrite."""
        self.check()
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        body = json.dumps({"next": int(next_id)}).encode()
        try:
            self._conditional(lambda: self.client.put_object(Bucket=self.bucket, Key=self.ids_key, Body=body,
                                                             ContentType="application/json", **condition),
                              f"writing the shared id mark {IDS_OBJECT}")
        except LeaseStoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _PRECONDITION | _MISSING:
                raise LeaseLostError(f"{self.uri}/{LEASE_DIR}/{IDS_OBJECT} changed under this writer's lease "
                                     "(another writer without it?): nothing was committed; run the command "
                                     "again") from exc
            failure = self._failure(exc, f"writing the shared id mark {IDS_OBJECT}")
            if failure is exc:
                raise
            raise failure from exc

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
