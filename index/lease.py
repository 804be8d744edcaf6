"""A write lease on the object store itself: serialises writers of one S3 store across machines.

``fcntl.flock`` (:mod:`index.locks`) serialises the processes of one machine, on one gallery folder. Two
machines (two copies of a gallery folder) writing one S3 store share no file: they share the bucket. The lease is
an object beside the table, ``<store uri>/_speciesid/write.lock``, whose body names its holder (host, pid, since,
TTL) or says it is free. Every change to it is a conditional PUT; it is never deleted, so a store needs to honour
``If-None-Match`` and ``If-Match`` on PutObject only, never a conditional DELETE:

- taken with a PUT ``If-None-Match: *`` when the object is absent (of writers racing, exactly one creates it), or
  ``If-Match: <etag>`` of a free (or stale) body just read (exactly one replaces that version);
- renewed by a heartbeat thread while held (PUT ``If-Match: <etag>``; the body changes each time, so does the
  etag): a holder that lost it (taken over as stale) notices, and :meth:`S3Lease.check` refuses to commit;
- released by a PUT ``If-Match: <its etag>`` of a free body: never someone else's lease;
- a lease not renewed for its TTL is stale (a holder killed, or cut off): judged by the object's LastModified
  against the S3 server's clock (the response's ``Date`` header), never this machine's; it is taken over by a
  PUT ``If-Match`` on exactly that etag (a holder that renews meanwhile keeps it);
- a conditional write S3 answers with 409 ConditionalRequestConflict (it raced another on the key) is tried again
  after a short pause, as S3 asks; only 412 (and 404 on a renewal) means the lease is someone else's now;
- every body carries a fresh nonce: a put refused on botocore's retry (the first try went through, its response
  was lost) is told apart by reading the object back, and its etag adopted, not taken for a lost lease; so is a
  put of this hold that failed with a network error after it went through (the next renewal is put over it), and
  a take that failed so is freed again: only a refusal while the object holds a body not this writer's is a loss;
- before a store is trusted, a create of the held lease (If-None-Match) and a PUT naming a wrong etag (If-Match)
  must both be refused: a store that ignores either is refused (:class:`ConditionalWritesUnsupported`).

A lease object left by this module's earlier form (deleted on release, a holder body without ``free``) is read as
a holder: taken over once stale.

The lease's errors are :class:`LeaseError` subclasses, whose messages say what to do and are passed on as they are;
their ``transient`` says whether a later try may get past them (set where each is raised, never guessed from a cause).
A request that got no answer (botocore's network errors) is a transient :class:`LeaseStoreError` naming the lease and
the endpoint, its cause kept, once the lease gives up on it: after its own handling of a put whose reply was lost. No
credentials found, or only part of them, is a LeaseStoreError too, not transient, naming the variables to set; a TLS
connection not made is not transient (a certificate to fix), a reply cut off while read is. One function reads
botocore's errors so, :func:`s3_failure`, for the lease and for the objects beside the table (:mod:`index.objects`).

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
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NoReturn

from index.errors import first_line
from index.locks import WAIT_ENV, WaitGivenUp, WriterBusy, env_seconds, seconds_setting

logger = logging.getLogger(__name__)

#: Seconds a lease stays valid without a renewal (a killed holder blocks other writers at most this long).
LEASE_TTL_S = 30.0
#: The variable that sets the lease's TTL (the command line's and the server's: :func:`parse_lease_ttl`).
TTL_ENV = "SPECIESID_LEASE_TTL_S"
#: The shortest TTL the variable may set: the lease is renewed every third of it, each renewal a request that may
#: take a second on a real network.
MIN_LEASE_TTL_S = 1.0
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
#: Error codes of a conditional write on an object that is someone else's now (changed, or gone).
_TAKEN = _PRECONDITION | _MISSING
#: Error codes of a store that does not implement conditional requests.
_UNSUPPORTED = {"NotImplemented", "501"}
#: Error codes of a request refused as malformed: a store without conditional writes when it names their headers.
_INVALID = {"InvalidArgument", "InvalidRequest", "400"}
#: Error codes of credentials that may not do what the lease needs.
_DENIED = {"AccessDenied", "403", "AllAccessDisabled"}
#: Error codes of a request a later try may get past: racing writes on the key (409), a busy or failing server
#: (throttling, a 5xx; any 5xx status but 501 counts too: :func:`_transient`).
_TRANSIENT = _CONFLICT | {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                          "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "429", "BadGateway",
                          "GatewayTimeout"}
#: Tries of a conditional write that keeps meeting 409 ConditionalRequestConflict, and the first pause (doubled).
CONFLICT_TRIES, CONFLICT_PAUSE_S = 5, 0.05
#: Attempts of one request on the lease's objects (botocore's ``total_max_attempts``: the first and one retry), and
#: the bounds of its connect and read timeouts (each a sixth of the lease's TTL within them; :func:`request_timeout`).
REQUEST_ATTEMPTS, REQUEST_TIMEOUT_S = 2, (1.0, 10.0)
#: The parameters the lease sends, by S3 operation; botocore's S3 model has all of them from 1.35.69 on.
NEEDED_PARAMS = {"PutObject": ("IfNoneMatch", "IfMatch")}
BOTO3_FLOOR = "1.35.69"


class LeaseError(Exception):
    """A failure of the store's write lease whose message says what to do (passed on as it is, never re-worded).
    ``transient``: whether a later try may get past it (racing writes, a busy or failing server, the lease lost),
    or not until someone fixes the store or this machine's setup (credentials, a store or client too old); the
    API answers the one 503 with Retry-After, the other 500. ``public``: what an API client may be told of it when
    more than the API's own words, naming nothing of the server (no bucket, object, endpoint, path or host: those
    stay in its message, for the server's log); None: the API's own words."""

    transient: bool = False
    public: str | None = None


class ConditionalWritesUnsupported(LeaseError, ValueError):
    """The object store ignores or refuses conditional writes (If-None-Match / If-Match), which the lease needs."""


class LeaseLostError(LeaseError, RuntimeError):
    """This writer's lease was taken over by another writer (not renewed in time): nothing more is committed."""

    transient = True


class LeaseStoreError(LeaseError, ValueError):
    """A request on the lease's objects was refused or failed (permissions, a client too old, a busy store, another
    store error); ``transient`` says whether a later try may get past it, as set where it is raised."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def is_s3(uri: str) -> bool:
    """Whether ``uri`` names an S3 (or S3-compatible) store, the kind the lease works on."""
    return str(uri).startswith(("s3://", "s3a://"))


def canonical_s3_uri(uri: str) -> str:
    """An S3 URI in the one spelling speciesid writes and compares: ``s3://`` (Hadoop's ``s3a://`` names the same
    bucket and keys) and no trailing slash, so two spellings of one store give one upload URI and one identity.
    Any other URI comes back as given, less its trailing slashes."""
    text = str(uri).rstrip("/")
    return "s3://" + text[len("s3a://"):] if text.startswith("s3a://") else text


def _code(exc: BaseException) -> str:
    """The error code of a botocore ClientError ('' for anything else)."""
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    code = str(error.get("Code", ""))
    return code if code and code != "None" else status


def _transient(exc: BaseException) -> bool:
    """Whether an S3 error answer is one a later try may get past (:data:`_TRANSIENT`, or a 5xx but 501)."""
    try:
        status = int(((getattr(exc, "response", None) or {}).get("ResponseMetadata") or {}).get("HTTPStatusCode", 0))
    except (TypeError, ValueError):
        status = 0
    return _code(exc) in _TRANSIENT or (500 <= status < 600 and status != 501)


def _network_error(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's for a request that got no answer (no connection, a timeout, the connection
    closed before or while it replied): whether it went through on the server is not known."""
    try:
        from botocore.exceptions import ConnectionError as NoConnection
        from botocore.exceptions import HTTPClientError
    except ImportError:  # pragma: no cover - the s3 extra not installed
        return False
    return isinstance(exc, (NoConnection, HTTPClientError))


def _no_credentials(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's for credentials not found (none anywhere boto3 looks, or only part of them)."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # pragma: no cover - the s3 extra not installed
        return False
    return isinstance(exc, (NoCredentialsError, PartialCredentialsError))


def _tls_error(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's for a TLS connection that could not be made (a certificate refused, a URL
    that is not TLS): a later try meets the same certificate."""
    try:
        from botocore.exceptions import SSLError
    except ImportError:  # pragma: no cover - the s3 extra not installed
        return False
    return isinstance(exc, SSLError)


def _cut_read(exc: BaseException) -> bool:
    """Whether ``exc`` is botocore's for a reply cut off while its body was read (the connection closed mid-body,
    or fewer bytes than announced): the store answered, the network lost the rest; a later try may get it."""
    try:
        from botocore import exceptions
    except ImportError:  # pragma: no cover - the s3 extra not installed
        return False
    kinds = tuple(k for k in (getattr(exceptions, "IncompleteReadError", None),
                              getattr(exceptions, "ResponseStreamingError", None)) if k is not None)
    return bool(kinds) and isinstance(exc, kinds)


@dataclass(frozen=True)
class S3Failure:
    """A failed request to an S3 store as people read it: ``message`` says what failed and what to do,
    ``transient`` whether a later try may get past it."""

    message: str
    transient: bool


def s3_failure(exc: BaseException, what: str, *, needs: str, endpoint: str | None = None, lookup: str = "",
               why: str = "") -> S3Failure | None:
    """The one reading of botocore's errors, for the lease's requests (:meth:`S3Lease._failure`) and those on the
    objects beside the table (:meth:`index.objects.StoreObjects._failure`); ``what`` names the request (its
    message starts with it), ``needs`` the permissions a refusal names, ``endpoint`` the store's when the error
    names none, ``lookup`` the ``s3://`` URI a GET or HEAD asked for (S3 refuses a missing key without ListBucket:
    :func:`missing_key_hint`), ``why`` a clause put before the permissions of a refusal. In this order:

    - a TLS connection not made (botocore's SSLError, a ConnectionError too): not transient, a certificate or
      URL to fix;
    - a reply cut off while it was read (IncompleteReadError, ResponseStreamingError): transient;
    - no answer (botocore's ConnectionError and HTTPClientError: refused, timed out, closed before it replied):
      transient; whether a write went through is not known (the lease tells that itself, before this);
    - no credentials found, or only part of them: not transient, naming the variables to set;
    - refused (AccessDenied): not transient; a store's other error answers: transient when it is busy or failing
      (:func:`_transient`), else not.

    None for an error that is none of these (no error code: a bug, a bad parameter): the caller decides."""
    code, said = _code(exc), f"{type(exc).__name__}: {_first(exc)}"
    endpoint = _endpoint(exc) or endpoint or "the store's S3 endpoint"
    if not code:
        if _tls_error(exc):
            return S3Failure(f"{what} failed: no TLS connection to {endpoint} ({said}): check the endpoint's URL and "
                             "its certificate (AWS_CA_BUNDLE names the certificates to trust)", False)
        if _cut_read(exc):
            return S3Failure(f"{what} was cut off while {endpoint} answered ({said}): check the network between "
                             "this machine and the store, then try again", True)
        if _network_error(exc):
            return S3Failure(f"{what} got no answer from {endpoint} ({said}): check the network between this "
                             "machine and the store, then try again", True)
        if _no_credentials(exc):
            return S3Failure(f"{what} found no credentials for the store ({said}): set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones) in the environment "
                             "of this process, or AWS_PROFILE naming a profile in ~/.aws/credentials, or run it "
                             "where an instance or task role gives them", False)
        return None
    if code in _DENIED and lookup:  # a GET or HEAD: S3 refuses a missing key without ListBucket
        return S3Failure(f"{what} was refused ({code}: {_first(exc)}): {missing_key_hint(*_bucket_key(lookup))}; or, "
                         f"if it is there, the credentials need {needs}", False)
    if code in _DENIED:
        return S3Failure(f"{what} was refused ({code}: {_first(exc)}): {why}the credentials need {needs}", False)
    if _transient(exc):
        return S3Failure(f"{what} failed ({code}: {_first(exc)}): the store is busy or failing for now; try again "
                         "shortly", True)
    return S3Failure(f"{what} failed ({code}: {_first(exc)})", False)


def _endpoint(exc: BaseException) -> str | None:
    """The scheme and host of the URL a botocore network error names (None when it names none)."""
    url = str((getattr(exc, "kwargs", None) or {}).get("endpoint_url") or "")
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None


def _opt(options: dict[str, str], *names: str) -> str | None:
    """The first of ``names`` set in Lance storage options (Lance accepts several spellings of each)."""
    for name in names:
        if options.get(name):
            return str(options[name])
    return None


def parse_lease_ttl(raw: str | float) -> float:
    """:data:`TTL_ENV`'s value as seconds (finite, :data:`MIN_LEASE_TTL_S` or more): the one parser of that
    variable, the server's settings' and the command line's. A ValueError names the variable and what to set."""
    return seconds_setting(TTL_ENV, raw, least=MIN_LEASE_TTL_S, default=LEASE_TTL_S,
                           what="how long a write lease lasts unrenewed before another machine may take it over")


def lease_ttl() -> float:
    """The TTL of this process's write leases: :data:`TTL_ENV` when set (:func:`parse_lease_ttl`), else
    :data:`LEASE_TTL_S`."""
    return env_seconds(TTL_ENV, parse_lease_ttl, LEASE_TTL_S)


def request_timeout(ttl: float) -> float:
    """The connect and read timeout of the lease's requests for a lease of ``ttl`` seconds: a sixth of it, within
    REQUEST_TIMEOUT_S. With REQUEST_ATTEMPTS tries, a request that hangs gives up well within the TTL (30 s: 5 s
    timeouts, about 21 s at most in all): a renewal cut off fails, and a commit's check with it, before the lease
    could lapse, not minutes later."""
    low, high = REQUEST_TIMEOUT_S
    return min(max(ttl / 6, low), high)


def s3_client(options: dict[str, str], *, timeout: float = REQUEST_TIMEOUT_S[1]) -> Any:
    """A boto3 S3 client for the endpoint, region and credentials in Lance storage ``options`` (those not given
    there come from boto3's own chain: environment, profile, instance role), with ``timeout`` seconds to connect
    and to read, and REQUEST_ATTEMPTS tries of each request."""
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
        config=Config(s3={"addressing_style": style},
                      retries={"total_max_attempts": REQUEST_ATTEMPTS, "mode": "standard"},
                      connect_timeout=timeout, read_timeout=timeout),
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
            f"writes ({why}): upgrade boto3 to {BOTO3_FLOOR} or later: pip install 'speciesid[s3]'")


def missing_key_hint(bucket: str, key: str) -> str:
    """Why a HEAD or GET of ``key`` may be refused although reading it is granted, for an error message: S3 answers
    403, not 404, for a key that is not there when the credentials lack ``s3:ListBucket`` on the bucket."""
    return (f"S3 answers 403, not 404, for a key that is not there when the credentials lack s3:ListBucket, so "
            f"s3://{bucket}/{key} may simply be missing: grant s3:ListBucket on the bucket {bucket} (the policy in "
            "docs/shared-gallery.md)")


def _first(exc: BaseException | None) -> str:
    """The first line of an error's text, cut at 300 characters."""
    return first_line(exc, 300)


def _bucket_key(uri: str) -> tuple[str, str]:
    """The bucket and the key (prefix) of an ``s3://`` URI."""
    bucket, _, key = str(uri).split("://", 1)[1].partition("/")
    return bucket, key


def _is_ours(seen: _Seen | None, body: dict) -> bool:
    """Whether the lease object as read holds ``body`` itself (its nonce): a put of it went through."""
    return seen is not None and seen.body.get("nonce") == body.get("nonce")


def _server_now(response: dict) -> dt.datetime | None:
    """The S3 server's clock at a response (its ``Date`` header), or None when it sent none."""
    date = ((response.get("ResponseMetadata") or {}).get("HTTPHeaders") or {}).get("date")
    if not date:
        return None
    try:
        return email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError):
        return None


@dataclass
class _Seen:
    """The lease object as read: its body, its holder as people read it (with ``age_s``, ``held_s`` and
    ``ttl_s``), its etag, whether it is free (released) or stale (not renewed within its holder's TTL)."""

    body: dict[str, Any]
    holder: dict[str, Any]
    etag: str
    free: bool
    stale: bool


class S3Lease:
    """The write lease of one S3 store (``<uri>/_speciesid/write.lock``). Not re-entrant: :class:`index.locks.
    WriteLock` holds it once per process and gallery folder, inside its ``flock``."""

    def __init__(self, uri: str, options: dict[str, str] | None = None, *, ttl: float | None = None,
                 client: Any = None) -> None:
        if not is_s3(uri):
            raise ValueError(f"a write lease needs an s3:// store, not {uri}")
        self.uri = str(uri).rstrip("/")
        bucket, prefix = _bucket_key(self.uri)
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        self.key = f"{self.prefix}{LEASE_DIR}/{LEASE_OBJECT}"
        self.ids_key = f"{self.prefix}{LEASE_DIR}/{IDS_OBJECT}"
        self.ttl = float(ttl) if ttl is not None else lease_ttl()
        self._options = dict(options or {})
        self._client = client
        self._own_client = False  # the client was made here, its timeouts from the TTL of then (not passed in)
        self._etag: str | None = None
        self._holder: dict[str, Any] = {}
        self._renewed = 0.0  # monotonic time the last put known to have gone through was sent (not answered)
        self._lost: str | None = None  # why the lease was lost while held
        self._unsure: set[str] = set()  # nonces of this hold's lease puts not known to have gone through or not
        self._probed = False  # the store was shown to refuse a conditional put it should refuse
        self._free_etag: str | None = None  # the free body this writer put at its last release (a hint)
        self._guard = threading.Lock()  # the etag between the heartbeat and the holder
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def client(self) -> Any:
        """The boto3 client (made on first use; its timeouts a sixth of the TTL: :func:`request_timeout`)."""
        if self._client is None:
            self._client = s3_client(self._options, timeout=request_timeout(self.ttl))
            self._own_client = True
        return self._client

    def set_ttl(self, ttl: float) -> None:
        """Give the lease a TTL of ``ttl`` seconds (a server's settings, after the gallery was opened). A client this
        lease made already (the gallery's open, a write) had its timeouts fixed from the former TTL: it is dropped,
        and the next request makes one whose timeouts follow ``ttl``. A client passed in is kept."""
        ttl = float(ttl)
        if ttl != self.ttl and self._own_client:
            self._client, self._own_client = None, False
        self.ttl = ttl

    @property
    def where(self) -> str:
        """The lease object's URI."""
        return f"s3://{self.bucket}/{self.key}"

    @property
    def ids_where(self) -> str:
        """The shared id mark's URI."""
        return f"{self.uri}/{LEASE_DIR}/{IDS_OBJECT}"

    @property
    def held(self) -> bool:
        """Whether this object holds the lease (it may have been lost since: :meth:`check`)."""
        return self._etag is not None

    # ------------------------------------------------------------------ taking it
    def acquire(self, timeout: float, *, waited: float = 0.0, give_up: Callable[[], bool] | None = None) -> float:
        """Take the lease, waiting up to ``timeout`` seconds for its holder (0: one try); a stale one is taken over.
        ``waited``: seconds this writer already waited before (for the local lock), told in the timeout message.
        Returns the seconds spent waiting for another writer: from the first try that found the lease held to the
        try that took it (0.0 when the first try took it; the lease's own requests are no wait for anyone).

        Every try that finds the lease taken pauses (growing to 1 s) before the next, and the timeout is honoured
        whether or not the holder could be read. :class:`index.locks.WriterBusy` (a TimeoutError) names the holder
        and what to do;
        :class:`ConditionalWritesUnsupported` when the store does not honour conditional writes. A failure once
        this writer's holder body may have been put (a network error with the put itself too: the object is read
        to tell) frees the lease again (nothing is left for others to wait out), an interrupt included.
        ``give_up``: looked at before each pause; true ends the wait in :class:`index.locks.WaitGivenUp`."""
        if self.held:
            raise RuntimeError(f"lease {self.where} is already held by this object")
        start = time.monotonic()
        busy_since: float | None = None  # when a try first found another writer holding it
        pause, warned = 0.05, False
        while True:
            tried = time.monotonic()
            holder = self._take()
            if holder is None:
                return 0.0 if busy_since is None else tried - busy_since
            now = time.monotonic()
            busy_since = now if busy_since is None else busy_since
            spent = now - start
            if spent >= timeout:
                raise WriterBusy(self._busy_message(holder or None, waited + spent, waits=timeout > 0 or waited > 0),
                                 held="the gallery store's write lease")
            if spent > 2 and not warned:
                logger.warning("%s", self._waiting_message(holder or None, waited + timeout))
                warned = True
            if give_up is not None and give_up():
                raise WaitGivenUp(f"the wait for the store's write lease {self.where} was given up")
            time.sleep(min(pause, max(timeout - spent, 0.0)))
            pause = min(pause * 1.5, 1.0)

    def _take(self) -> dict | None:
        """One try: put this writer's holder body, check the store honours conditional writes, start renewing it.
        None when the lease is ours now; else its holder as read (``{}``: none could be read, another writer took
        it between the read and the put). On any failure once the body may have been put (an interrupt too), the
        lease is freed again: when its put was answered, or when the object holds one of its nonces."""
        try:
            holder = self._try_take()
            if holder is not None:
                return holder
            self._probe()
            self._start_heartbeat()
            return None
        except BaseException as exc:
            with self._guard:
                etag, unsure = self._etag, set(self._unsure)
                self._forget()
            if etag is None and unsure:  # the put failed (a network error): it may have gone through all the same
                with contextlib.suppress(Exception):
                    seen = self._look()
                    if seen is not None and seen.body.get("nonce") in unsure:
                        etag = seen.etag
            if etag is not None:  # ours was put: never left for others to wait a TTL out
                careless = isinstance(exc, ConditionalWritesUnsupported)  # If-Match unheeded: the object is ours
                with contextlib.suppress(Exception):
                    self._free(etag, conditional=not careless)
            raise

    def _holder_body(self) -> dict[str, Any]:
        """A holder body of this writer (a new nonce: a new etag even for the same holder, and a put of it that S3
        refuses is told from one that went through, its response lost)."""
        return {**self._holder, "renewed": time.time(), "nonce": uuid.uuid4().hex}

    def _try_take(self) -> dict | None:
        """One conditional put of this writer's holder body: on the free body this writer released last (no read
        needed), else on what a read finds: the object absent (``If-None-Match: *``), free, or stale
        (``If-Match`` on its etag: a holder that renewed meanwhile keeps it). None when the lease is ours now, else
        its holder (``{}``: taken by another between the read and the put, or a 409 conflict)."""
        sent = time.monotonic()  # before any put of this body: the lease, once adopted, is timed from here
        self._holder = {"host": socket.gethostname(), "pid": os.getpid(),
                        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "ttl_s": self.ttl}
        body = self._holder_body()
        self._unsure = set()  # a put of the body below adds its nonce: on a failure, _take reads the object to tell
        hint, self._free_etag = self._free_etag, None
        if hint is not None and self._put_holder(body, sent, IfMatch=hint):
            return None
        seen = self._look()
        if _is_ours(seen, body):
            self._adopt(seen.etag, sent)  # the put above went through; its response was lost
            return None
        if seen is None:
            condition = {"IfNoneMatch": "*"}
        elif seen.free or seen.stale:
            condition = {"IfMatch": seen.etag}
        else:
            return seen.holder
        if self._put_holder(body, sent, **condition):
            if seen is not None and seen.stale and not seen.free:
                logger.warning("broke the stale write lease of the store %s (%s, not renewed for %.0f s, past its "
                               "%.0f s): taken over; that writer is gone or cut off", self.uri, _who(seen.holder),
                               seen.holder["age_s"], seen.holder["ttl_s"])
            return None
        again = self._look()
        if _is_ours(again, body):
            self._adopt(again.etag, sent)
            return None
        return {} if again is None or again.free else again.holder

    def _put_holder(self, body: dict, sent: float, **condition: str) -> bool:
        """One conditional put of a holder body (first sent at monotonic time ``sent``); whether it went through
        (False: refused, 412, 404 or a 409 conflict: the caller reads the object to tell a lost race from its own
        put whose response was lost). Until a reply its nonce is unsure: :meth:`_take` frees what it put on a
        failure."""
        self._unsure.add(body["nonce"])
        try:
            response = self._send(body, **condition)
        except Exception as exc:  # noqa: BLE001 - botocore's ClientError, told apart by code
            if _code(exc) in _TAKEN | _CONFLICT:
                return False
            self._raise(exc, "taking it (a conditional PUT)")
        self._adopt(response["ETag"], sent)
        return True

    def _adopt(self, etag: str, sent: float) -> None:
        """The lease is ours, at ``etag``, put by a request sent at monotonic time ``sent``: the lease is timed from
        the send, never the reply (S3 dates the object when the request arrives; a reply can come late, after
        botocore's retries, and the lease lapses ``ttl`` after that date)."""
        with self._guard:
            self._etag, self._renewed, self._lost = etag, sent, None
            self._unsure.clear()

    def _send(self, body: dict, **condition: str) -> dict:
        """PUT ``body`` as the lease object, on ``condition`` (If-None-Match / If-Match)."""
        return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=json.dumps(body).encode(),
                                      ContentType="application/json", **condition)

    def _put(self, body: dict, doing: str, **condition: str) -> str:
        """A conditional put of ``body`` over this writer's lease (tried again on 409 conflicts,
        :meth:`_conditional`); its new etag. Until a reply, its nonce is among this hold's puts of unknown outcome
        (a network error leaves it there). A refusal (412, 404, or 409s throughout) is told apart by reading the
        object back: holding ``body`` itself, botocore tried the request again after a response was lost and the
        first try had gone through (its etag is adopted); holding an earlier put of this hold whose reply never
        came, ``body`` is put once more, over that one. Only a body not this writer's (or none) means the lease is
        someone else's: the refusal is raised as it is (a failure of the read instead: not known to be lost)."""
        for attempt in range(2):
            self._unsure.add(body["nonce"])
            try:
                etag = self._conditional(partial(self._send, body, **condition), doing)["ETag"]
            except Exception as exc:  # noqa: BLE001
                if not (isinstance(exc, LeaseStoreError) or _code(exc) in _TAKEN):
                    raise  # a network error: it may have gone through (its nonce stays unsure)
                seen = self._look()  # its failure is raised: the lease is not known to be lost
                nonce = seen.body.get("nonce") if seen is not None else None
                if nonce is None or nonce not in self._unsure:
                    raise
                if nonce == body.get("nonce"):
                    logger.info("the write lease %s: %s was refused on a retry, but the first try had gone through",
                                self.where, doing)
                    self._unsure.clear()
                    return seen.etag
                if attempt:
                    raise
                logger.info("the write lease %s holds an earlier put of this writer whose reply was lost: %s over "
                            "it", self.where, doing)
                condition = {"IfMatch": seen.etag}
                continue
            self._unsure.clear()
            return etag
        raise AssertionError("unreachable")  # pragma: no cover

    def _free(self, etag: str, *, conditional: bool = True) -> str:
        """Put the free body over this writer's lease at ``etag`` (``If-Match``; ``conditional=False``: a store
        that ignores the condition anyway); the free body's etag."""
        body = {"free": True, "by": self._holder.get("host"), "pid": self._holder.get("pid"),
                "released": time.time(), "nonce": uuid.uuid4().hex}
        if not conditional:
            return self._send(body)["ETag"]
        return self._put(body, "releasing it", IfMatch=etag)

    def _probe(self) -> None:
        """Once per lease object, holding the lease: a create of it (If-None-Match) and a put naming a wrong etag
        (If-Match) must both be refused. A store that accepts one ignores that condition, and would let two writers
        hold the lease at once (or one renew or release another's). Only conditional PUTs are needed: the lease
        object is never deleted."""
        if self._probed:
            return
        wrong, probe = '"0"', {"probe": True}
        checks = (("a create of an object that exists (If-None-Match)", {"IfNoneMatch": "*"}),
                  ("a put naming a wrong etag (If-Match)", {"IfMatch": wrong}))
        for what, condition in checks:
            doing = f"checking the store refuses {what}"
            try:  # a racing create (409) is asked again; the last one is told as any other failure of the check
                self._conditional(partial(self._send, probe, **condition), doing,
                                  exhausted=partial(self._failure, doing=doing))
            except LeaseStoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                if _code(exc) in _PRECONDITION:
                    continue  # refused, as it must be
                self._raise(exc, doing)
            raise self._unsupported(None, f"it accepted {what}")
        self._probed = True

    def _unsupported(self, exc: BaseException | None, said: str = "") -> ConditionalWritesUnsupported:
        said = f" ({_code(exc)}: {_first(exc)})" if exc is not None else f" ({said})"
        return ConditionalWritesUnsupported(
            f"the object store of {self.uri} does not honour conditional writes (If-None-Match and If-Match on "
            f"PutObject){said}: speciesid's write lease, which keeps writers on several machines from storing a "
            "photo twice or giving an id twice, needs both. Use a store that honours them (AWS S3 does; other "
            "S3-compatible stores when they implement both on PutObject), or keep the gallery's store in its "
            "folder (no --store)")

    def _raise(self, exc: BaseException, doing: str, *, needs: str | None = None, lookup: str = "") -> NoReturn:
        """Raise the error :meth:`_failure` makes of ``exc`` (from ``exc``), or ``exc`` itself as it is."""
        failure = self._failure(exc, doing, needs=needs, lookup=lookup)
        if failure is exc:
            raise exc
        raise failure from exc

    def _failure(self, exc: BaseException, doing: str, *, needs: str | None = None,
                 lookup: str = "") -> BaseException:
        """The error to raise for a request on the lease's objects that failed with ``exc``, where the lease gives
        up on it: a LeaseStoreError naming the lease and what to do, read by :func:`s3_failure` (the one reading of
        botocore's errors, the objects beside the table's too: a refusal, no answer, a TLS failure, a reply cut
        off, no credentials, a busy store), or ConditionalWritesUnsupported; ``exc`` itself for anything else.
        Only here, never on the request itself: the lease tells a put whose reply was lost by the raw error first
        (its nonce stays unsure). ``needs``: the permissions a refusal (AccessDenied) names, when not the lease's
        own; ``lookup``: the key a GET read (its refusal may be a missing key: :func:`missing_key_hint`)."""
        code = _code(exc)
        if not code and type(exc).__name__ == "ParamValidationError" and (
                "IfMatch" in str(exc) or "IfNoneMatch" in str(exc)):
            return LeaseStoreError(_upgrade_message(str(exc)))
        if code in _UNSUPPORTED:
            return self._unsupported(exc)
        error = (getattr(exc, "response", None) or {}).get("Error") or {}
        named = f"{error.get('ArgumentName', '')} {error.get('Message', '')} {exc}".lower()
        if code in _INVALID and any(h in named for h in ("if-none-match", "if-match", "ifnonematch", "ifmatch",
                                                          "conditional")):
            return self._unsupported(exc)
        where = f"s3://{self.bucket}/{self.prefix}{LEASE_DIR}/*"
        if lookup:
            needs = f"s3:GetObject and s3:PutObject on {where}"
        needs = needs or f"s3:GetObject and s3:PutObject on {where} (the lease and the shared id mark beside the table)"
        failure = s3_failure(exc, f"the write lease {self.where}: {doing}", needs=needs,
                             endpoint=_opt(self._options, "aws_endpoint", "endpoint", "aws_endpoint_url",
                                           "endpoint_url"),
                             lookup=f"s3://{self.bucket}/{lookup}" if lookup else "",
                             why="the lease keeps writers on several machines apart; ")
        if failure is None:
            return exc
        return LeaseStoreError(failure.message, transient=failure.transient)

    def _look(self) -> _Seen | None:
        """The lease object as it is now (None: absent). Its holder gets ``age_s`` (since the last renewal) and
        ``held_s``, judged on the server's clock: LastModified against the response's Date; stale when older than
        the holder's own TTL."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.key)
            raw = response["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return None
            self._raise(exc, "reading who holds it (a GET)", lookup=self.key)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {}
        body = body if isinstance(body, dict) else {}
        holder = dict(body)
        now = _server_now(response)
        if now is None:  # no Date header (not S3 over HTTP): this machine's clock, the only one there is
            now = dt.datetime.now(dt.timezone.utc)
        age = (now - response["LastModified"]).total_seconds()
        holder["age_s"] = age
        with contextlib.suppress(KeyError, TypeError, ValueError):  # a free body, or a holder's without "since"
            holder["held_s"] = max((now - dt.datetime.fromisoformat(str(holder["since"]))).total_seconds(), age)
        try:
            ttl = float(holder.get("ttl_s") or self.ttl)
        except (TypeError, ValueError):
            ttl = self.ttl
        holder["ttl_s"] = ttl
        return _Seen(body=body, holder=holder, etag=response["ETag"], free=body.get("free") is True, stale=age > ttl)

    def _waiting_message(self, holder: dict | None, wait: float) -> str:
        """The one line a writer logs once it has waited a while for the lease: whom it waits for, the holder's TTL,
        and how long it will wait in all (``wait`` seconds; SPECIESID_WRITE_WAIT_S sets it)."""
        if not holder:
            return (f"waiting up to {wait:.0f} s in all for the write lease of the store {self.uri}: other writers "
                    f"keep taking it ({WAIT_ENV} sets how long a writer waits)")
        ttl = holder.get("ttl_s", self.ttl)
        return (f"waiting up to {wait:.0f} s in all for another writer of the store {self.uri} ({_who(holder)}, "
                f"renewed {holder.get('age_s', 0):.0f} s ago; its lease lapses {ttl:.0f} s after its last renewal "
                f"if that writer is gone; lease {self.where}); {WAIT_ENV} sets how long a writer waits")

    def look(self) -> dict[str, Any] | None:
        """The lease as it is now, for people to see (read only; None: no writer ever took it): ``state`` ``free``
        (released), ``held`` or ``stale`` (not renewed within its TTL: the next writer takes it over), and for a
        held or stale one its holder (``host``, ``pid``, ``since``), ``renewed_s_ago`` and ``ttl_s``, on the store's
        clock. A failure to read it is the LeaseStoreError a writer would get."""
        seen = self._look()
        if seen is None:
            return None
        if seen.free:
            return {"state": "free", "object": self.where}
        holder = seen.holder
        return {"state": "stale" if seen.stale else "held", "host": holder.get("host"), "pid": holder.get("pid"),
                "since": holder.get("since"), "renewed_s_ago": round(float(holder["age_s"]), 1),
                "ttl_s": holder["ttl_s"], "object": self.where}

    def _busy_message(self, holder: dict | None, waited: float, *, waits: bool = True) -> str:
        """The TimeoutError of a writer that gave up on the lease after ``waited`` seconds (``waits``: False for one
        set not to wait at all, a wait of 0 s), naming its holder (``holder``; None: other writers kept taking it)."""
        if not holder:
            how = f"waited {waited:.0f} s" if waits else "was set not to wait (a wait of 0 s)"
            return (f"this writer {how} for the store {self.uri}: other writers kept taking its "
                    f"write lease {self.where} (released and taken again between this one's tries). Try again "
                    f"when they are done ({WAIT_ENV} sets how long a writer waits)")
        held = holder.get("held_s")
        held_for = f", for {held:.0f} s" if isinstance(held, (int, float)) else ""
        ttl = holder.get("ttl_s", self.ttl)
        how = (f"this one waited {waited:.0f} s" if waits else
               f"this one was set not to wait for it (a wait of 0 s; {WAIT_ENV} sets how long a writer waits)")
        return (f"another writer holds the store {self.uri} ({_who(holder)}{held_for}; lease {self.where}, "
                f"renewed {holder.get('age_s', 0):.0f} s ago); {how}: try again when it is "
                f"done. If that writer is gone, its lease lapses {ttl:.0f} s after its last renewal (its TTL) and is "
                "then taken over by the next writer; if its process still runs, let it finish or stop it")

    # ------------------------------------------------------------------ holding it
    def _start_heartbeat(self) -> None:
        self._stop = threading.Event()  # one per hold: a beat left from an earlier hold (a join that timed out) ends
        self._beat = threading.Thread(target=self._heartbeat, args=(self._stop,), name=f"lease {self.where}",
                                      daemon=True)
        self._beat.start()

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLostError:
                return
            except Exception as exc:  # noqa: BLE001 - a network error: try again at the next beat
                logger.warning("could not renew the write lease %s: %s", self.where, exc)

    def _conditional(self, request: Callable[[], Any], doing: str, *,
                     exhausted: Callable[[BaseException], BaseException] | None = None) -> Any:
        """``request()`` (a conditional write), tried again after a short, growing pause while S3 answers 409
        ConditionalRequestConflict (a racing write on the key; S3 says to retry), at most CONFLICT_TRIES times;
        then a LeaseStoreError saying so, or ``exhausted(the last 409)`` when given. Any other failure is raised
        as it is, for the caller to tell apart."""
        for attempt in range(CONFLICT_TRIES):
            try:
                return request()
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in _CONFLICT:
                    raise
                if attempt + 1 == CONFLICT_TRIES:
                    if exhausted is not None:
                        raise exhausted(exc) from exc
                    raise LeaseStoreError(f"the write lease {self.where}: {doing} met {CONFLICT_TRIES} conflicting "
                                          "writes in a row (409 ConditionalRequestConflict): try again",
                                          transient=True) from exc
                time.sleep(CONFLICT_PAUSE_S * 2 ** attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def renew(self) -> None:
        """Renew the held lease now (a conditional put on its etag); LeaseLostError when it is not ours any more. The
        renewal is timed from when its request was sent, not from its reply (:meth:`_adopt`)."""
        with self._guard:
            if self._etag is None:
                raise LeaseLostError(f"the write lease {self.where} is not held")
            if self._lost:
                raise LeaseLostError(self._lost)
            sent = time.monotonic()
            try:
                etag = self._put(self._holder_body(), "renewing it", IfMatch=self._etag)
            except LeaseStoreError:
                raise
            except Exception as exc:  # noqa: BLE001
                if _code(exc) in _TAKEN:
                    self._lost = (f"the write lease {self.where} of this writer was taken over by another (not "
                                  f"renewed within {self.ttl:.0f} s): nothing more is committed; run the command "
                                  "again")
                    logger.error("%s", self._lost)
                    raise LeaseLostError(self._lost) from exc
                self._raise(exc, "renewing it (a PUT with If-Match)")
            self._etag, self._renewed = etag, sent

    def check(self) -> None:
        """Before a commit: the lease is still ours (renewed now when its last renewal was sent over half the TTL
        ago); LeaseLostError otherwise. A renewal that succeeds proves the lease was never taken over meanwhile (its
        If-Match names the etag this writer put last; any other writer's put changes it), however old the last one."""
        if self._lost:
            raise LeaseLostError(self._lost)
        if time.monotonic() - self._renewed > self.ttl / 2:
            self.renew()

    def release(self) -> None:
        """Stop renewing and, if the lease is still ours, put the free body over it (a conditional put on its etag,
        tried again while S3 answers 409 ConditionalRequestConflict). The object stays: the next writer takes the
        free lease with a conditional put on its etag (no store needs to honour a conditional DELETE)."""
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
            self._free_etag = self._free(etag)
        except Exception as exc:  # noqa: BLE001 - it lapses after its TTL anyway
            if _code(exc) in _TAKEN:
                logger.warning("the write lease %s was taken over by another writer before this one released it",
                               self.where)
            else:
                logger.warning("could not release the write lease %s (%s): it lapses in %.0f s", self.where, exc,
                               self.ttl)

    def _forget(self) -> None:
        self._etag, self._lost = None, None

    # ------------------------------------------------------------------ shared ids
    def read_next_id(self) -> tuple[int | None, str | None]:
        """(the shared next id, its etag), (None, None) when no writer recorded one yet (call holding the lease).
        An unreadable mark is a LeaseStoreError (not transient: someone has to delete it, as its message says)."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.ids_key)
            return int(json.loads(response["Body"].read())["next"]), response["ETag"]
        except (ValueError, KeyError, TypeError) as exc:  # never repaired here: see the message
            mark = self.ids_where
            raise LeaseStoreError(
                f"{mark} is unreadable ({exc}). It is the only record of the ids a running build (or writer) on any "
                "machine reserved and has not committed yet, so no writer can rebuild it: wait until no writer or "
                f"build runs on any machine that writes {self.uri}, then delete it (the next writer steps over every "
                "id the store holds) and run the command again. Deleted while one runs, its reserved ids could be "
                "given twice") from exc
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _MISSING:
                return None, None
            self._raise(exc, f"reading the shared id mark {IDS_OBJECT}", lookup=self.ids_key)

    def write_next_id(self, next_id: int, etag: str | None) -> None:
        """Record the shared next id, conditional on the version read (:meth:`read_next_id`): a writer without the
        lease that wrote it meanwhile makes this fail (LeaseLostError), never a silent overwrite."""
        self.check()
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        nonce = uuid.uuid4().hex
        body = json.dumps({"next": int(next_id), "nonce": nonce}).encode()
        try:
            self._conditional(lambda: self.client.put_object(Bucket=self.bucket, Key=self.ids_key, Body=body,
                                                             ContentType="application/json", **condition),
                              f"writing the shared id mark {IDS_OBJECT}")
        except LeaseStoreError:
            raise
        except Exception as exc:  # noqa: BLE001
            if _code(exc) in _TAKEN:
                if self._wrote_ids(nonce):
                    return  # botocore's retry was refused: its first try had gone through (the response was lost)
                raise LeaseLostError(f"{self.ids_where} changed under this writer's lease "
                                     "(another writer without it?): nothing was committed; run the command "
                                     "again") from exc
            self._raise(exc, f"writing the shared id mark {IDS_OBJECT}")

    def _wrote_ids(self, nonce: str) -> bool:
        """Whether the shared id mark holds the body this writer put with ``nonce``."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.ids_key)
            return json.loads(response["Body"].read()).get("nonce") == nonce
        except Exception:  # noqa: BLE001 - unreadable: not known to be ours
            return False

    # ------------------------------------------------------------------ a half-created table
    def list_keys(self, prefix: str) -> list[str]:
        """Keys under ``prefix`` (relative to the bucket). A failure is a LeaseStoreError (:meth:`_failure`)."""
        keys: list[str] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys += [o["Key"] for o in page.get("Contents", [])]
        except Exception as exc:  # noqa: BLE001
            self._raise(exc, f"listing the objects under s3://{self.bucket}/{prefix} (a ListObjectsV2)",
                        needs=f"s3:ListBucket on s3://{self.bucket} (to list s3://{self.bucket}/{prefix})")
        return keys

    def delete_keys(self, keys: list[str]) -> None:
        """Delete the objects ``keys`` (call holding the lease). A failure is a LeaseStoreError (:meth:`_failure`)."""
        self.check()
        for key in keys:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=key)
            except Exception as exc:  # noqa: BLE001
                self._raise(exc, f"deleting s3://{self.bucket}/{key} (a DeleteObject)",
                            needs=f"s3:DeleteObject on s3://{self.bucket}/{key}")


def _who(holder: dict) -> str:
    """The holder of a lease as people read it."""
    return (f"held by host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
            f"{holder.get('since', '?')}")


def half_created_objects(lease: S3Lease, table_uri: str) -> tuple[list[str], list[str]] | None:
    """A table on the lease's store that holds no committed version: (all its keys, those beyond Lance's bookkeeping
    ``_versions/`` and ``_transactions/``, relative to the table); None when it holds a version (a ``.manifest``)."""
    prefix = _bucket_key(table_uri)[1].rstrip("/") + "/"
    keys = lease.list_keys(prefix)
    from index.store import uncommitted_files  # the one rule (index.store.half_created's)

    beyond = uncommitted_files(k[len(prefix):] for k in keys)
    return None if beyond is None else (keys, beyond)
