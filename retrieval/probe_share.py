"""The probe shared through a gallery's S3 store: trained (or imported) on one machine, used by every machine.

Each machine sharing an S3 store has its own gallery folder, and the probe (``probe.json``, ``probe.npz``) lives in
the folder. ``probe train`` / ``import`` / ``restore`` on an S3 store also publish the two files to the store
(``<store>/_speciesid/probe/``, :func:`publish_probe`): the weights first, under a name of their own digest
(``probe-<sha256>.npz``, :func:`weights_name`), then ``probe.json``, whose object metadata names that object
(:data:`WEIGHTS_KEY`) and its ETag (:data:`WEIGHTS_ETAG`). A reader follows ``probe.json`` to its weights and reads
both with ``If-Match`` on those ETags, so it never takes a ``probe.json`` with weights not there yet, nor with
another publish's weights. A publish cut off between its two puts (its lease lost) leaves the store's current pair
as it was: its weights went under a new name no ``probe.json`` names, so every folder, a new one too, still takes the
store's probe. The next publish (or withdraw) removes the weights objects no ``probe.json`` names, keeping those of
the ``probe.json`` it replaced (a reader between its two GETs still finds them); a store an earlier version wrote
(a ``probe.json`` naming no weights object: the weights at ``probe.npz``) is read as it was written. A publish is a
write to the store: it holds the store's lease, so two machines' publishes never interleave.

A folder takes the store's copy (:class:`ProbeFollower`) into its own files (weights first, ``probe.json`` last, as
:meth:`retrieval.probe.LinearProbe.save` writes them) and records the copy's ETag in ``probe_origin.json``: at open
when the folder has no probe, or when the store holds a copy the folder has not taken yet (its recorded ETag is
another); and, in a process following the probe (a server: ``follow_probe``), whenever the store's copy changes,
looked at with one HEAD per ``refresh_s`` at most. The folder's own probe files then change, and the process loads
them as it loads a probe written by ``probe train`` on its own machine; the probe taken replaces is kept as
``probe.prev.*`` (:func:`retrieval.probe.keep_previous`), so ``probe restore`` on any machine brings back the probe
the store's copy replaced there. A folder whose probe records no copy taken from the store (no
``probe_origin.json``: made here, or copied in by hand) keeps it at open; a later publish replaces it. A probe
refitted here (the vote's whitening after a write) keeps its origin: it is replaced at the next publish, not at the
next open. ``speciesid probe withdraw`` (:func:`withdraw_probe`) removes the store's copy: no folder takes it any
more, and the folders that took it keep it (their status says ``withdrawn``) until the next publish.

The text prior (``text_prior.json``: the species ``probe train`` set the zero-shot prior up over, its strength and
encoder) travels with the probe: a publish puts the folder's, under a name of its own digest
(``text-prior-<sha256>.json``, :func:`text_prior_name`), after the weights and before ``probe.json``, whose metadata
names it (:data:`TEXT_PRIOR_KEY`, :data:`TEXT_PRIOR_ETAG`), or says the folder had none (:data:`NO_TEXT_PRIOR`). A
folder taking the copy writes that ``text_prior.json`` with the probe (before its ``probe.json``), or removes its own
when the copy has none: a folder taking a copy never keeps a prior the copy was not published with (``probe train``
with an image-only encoder and ``probe import``, whose head has none, remove the folder's before they publish). A
``probe.json`` an earlier version published names no text prior either way: a folder taking it keeps its own
``text_prior.json``, as then. The prior's class embeddings (``text_prior_cache/``) are not shared: each machine
computes them from its own encoder (:func:`retrieval.textprior.load_text_prior`). The text prior is not kept as
``probe.prev.*`` is: ``probe restore`` brings back the earlier probe with the folder's text prior of now, and
publishes the two together (a probe records no prior of its own to restore: the one exception to the rule above).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from index.atomic import atomic_write, write_json_atomic
from index.errors import first_line
from index.formats import PROBE_FORMAT, check_format
from index.gallery import Gallery
from index.layout import PROBE_META, PROBE_WEIGHTS, GalleryLayout, check_encoder
from index.lease import LeaseError, LeaseLostError
from index.locks import WriteLock, write_lock
from index.objects import DELETE_BATCH, StoreObjects, probe_uri
from retrieval.probe import (
    LinearProbe,
    ReferencesSince,
    keep_previous,
    now_utc,
    probe_summary,
    references_since,
)
from retrieval.textprior import prior_sha256

logger = logging.getLogger(__name__)

#: The object metadata of the store's probe.json naming the ETag of the weights published with it.
WEIGHTS_ETAG = "weights-etag"
#: The object metadata of the store's probe.json naming the weights object published with it (its name in the
#: store's probe folder, :func:`weights_name`); absent in a store an earlier version wrote (weights at probe.npz).
WEIGHTS_KEY = "weights-key"
#: The object metadata of the store's probe.json naming the text prior published with it (its name in the store's
#: probe folder, :func:`text_prior_name`), or :data:`NO_TEXT_PRIOR`; absent in a store an earlier version wrote.
TEXT_PRIOR_KEY = "text-prior-key"
#: The object metadata of the store's probe.json naming the ETag of the text prior published with it.
TEXT_PRIOR_ETAG = "text-prior-etag"
#: :data:`TEXT_PRIOR_KEY` of a probe published from a folder without a text prior: a folder taking it removes its own.
NO_TEXT_PRIOR = "none"
#: The names of weights objects in the store's probe folder: a digest's, or the one earlier versions wrote.
_WEIGHTS_NAME = re.compile(r"probe-[0-9a-f]{64}\.npz")
#: The names of text prior objects in the store's probe folder.
_TEXT_PRIOR_NAME = re.compile(r"text-prior-[0-9a-f]{64}\.json")
#: How long an open of a folder without a probe waits for the folder's lock (a writer holds it) to take the
#: store's probe; past it the process answers without a probe, and the next check (or open) takes it.
AT_OPEN_WAIT_S = 5.0


class ProbePublishInterrupted(LeaseLostError, OSError):
    """The store's lease was taken over by another writer between a publish's two puts: the weights were put (under
    their own name), not the ``probe.json`` naming them; the store's probe is the one it was (the message says what
    to run: ``speciesid probe publish``)."""


def weights_name(weights: bytes) -> str:
    """The name of the store's object holding the probe weights ``weights``: ``probe-<their sha256>.npz``."""
    return f"probe-{hashlib.sha256(weights).hexdigest()}.npz"


def text_prior_name(prior: bytes) -> str:
    """The name of the store's object holding the text prior ``prior`` (a ``text_prior.json``'s bytes):
    ``text-prior-<their sha256>.json``."""
    return f"text-prior-{prior_sha256(prior)}.json"


def _is_weights_name(name: str) -> bool:
    """Whether ``name`` (in the store's probe folder) is a weights object's: a digest's, or ``probe.npz``."""
    return name == PROBE_WEIGHTS or _WEIGHTS_NAME.fullmatch(name) is not None


def _is_published_name(name: str) -> bool:
    """Whether ``name`` (in the store's probe folder) is an object a publish puts beside ``probe.json``: weights
    (:func:`_is_weights_name`) or a text prior (:func:`text_prior_name`)."""
    return _is_weights_name(name) or _TEXT_PRIOR_NAME.fullmatch(name) is not None


def _weights_of(head: dict[str, Any]) -> str:
    """The name of the weights object the store's probe.json (its HEAD) names: ``probe.npz`` when it names none (a
    store an earlier version wrote). ValueError when it names something else than a weights object."""
    name = str((head.get("Metadata") or {}).get(WEIGHTS_KEY) or PROBE_WEIGHTS)
    if not _is_weights_name(name):
        raise ValueError(f"its metadata {WEIGHTS_KEY} names {name!r}, not a weights object (probe-<sha256>.npz)")
    return name


def _text_prior_of(head: dict[str, Any]) -> tuple[bool, str | None, str | None]:
    """What the store's probe.json (its HEAD) says of its text prior: (whether it says anything: False for one an
    earlier version published, the name of the text prior object it names, None: none; that object's ETag).
    ValueError when it names something else than a text prior object, or one without its ETag."""
    metadata = head.get("Metadata") or {}
    name = metadata.get(TEXT_PRIOR_KEY)
    if name is None:
        return False, None, None
    name = str(name)
    if name == NO_TEXT_PRIOR:
        return True, None, None
    if _TEXT_PRIOR_NAME.fullmatch(name) is None:
        raise ValueError(f"its metadata {TEXT_PRIOR_KEY} names {name!r}, not a text prior object "
                         "(text-prior-<sha256>.json)")
    if not metadata.get(TEXT_PRIOR_ETAG):
        raise ValueError(f"its metadata names the text prior {name} but not its ETag ({TEXT_PRIOR_ETAG})")
    return True, name, str(metadata[TEXT_PRIOR_ETAG])


def _published_names(head: dict[str, Any]) -> set[str]:
    """The names of the objects the store's probe.json (its HEAD) names: its weights and text prior (those it names
    well: a name of something else is left out)."""
    names = set()
    with contextlib.suppress(ValueError):
        names.add(_weights_of(head))
    with contextlib.suppress(ValueError):
        prior = _text_prior_of(head)[1]
        if prior is not None:
            names.add(prior)
    return names


def publish_probe(gallery: Gallery, *, meta: bytes | None = None) -> str | None:
    """Put the folder's probe files in the gallery's S3 store (under the store's lease): the weights first, as
    ``probe-<sha256>.npz`` (:func:`weights_name`), then the folder's text prior when it has one, as
    ``text-prior-<sha256>.json`` (:func:`text_prior_name`), then ``probe.json`` naming them (or saying it has no
    text prior: :data:`NO_TEXT_PRIOR`); the store's new copy (:func:`_copy`), recorded as the folder's origin. None
    when the store is not on S3 (nothing to share). Then the objects no ``probe.json`` names are removed
    (:func:`_remove_unnamed`: those of the ``probe.json`` replaced are kept). ``meta``: the caller's read of
    ``probe.json``, if any.

    The lease is checked before each put (:meth:`index.locks.WriteLock.check`: renewed when half its TTL is gone):
    LeaseLostError before the weights, :class:`ProbePublishInterrupted` when it was lost after the weights were put
    and before ``probe.json`` (then ``probe.json`` is not put: the store's probe stays the one it was, its weights and
    text prior untouched)."""
    objects = gallery.objects
    if objects is None:
        return None
    layout = gallery.layout
    lock = write_lock(layout.write_lock)  # the gallery's own (one per folder and process): it holds the lease
    meta_uri = probe_uri(objects.uri, PROBE_META)
    with gallery.writing():  # a write to the store: under its lease, so two publishes never interleave
        weights = layout.probe_weights.read_bytes()
        meta = layout.probe_meta.read_bytes() if meta is None else meta  # the caller's read of probe.json, if any
        prior = layout.text_prior.read_bytes() if layout.text_prior.is_file() else None
        name = weights_name(weights)
        lock.check()
        replaced = objects.head(meta_uri)  # the copy this publish replaces: its weights and text prior are kept
        weights_etag = objects.put(probe_uri(objects.uri, name), weights)  # a name of its own: the store's pair stays
        metadata = {WEIGHTS_ETAG: weights_etag, WEIGHTS_KEY: name, TEXT_PRIOR_KEY: NO_TEXT_PRIOR}
        keep = {name}
        try:
            lock.check()  # a stall (a slow put, a paused process) past the TTL: another writer may hold it now
            if prior is not None:
                prior_name = text_prior_name(prior)
                metadata.update({TEXT_PRIOR_KEY: prior_name,
                                 TEXT_PRIOR_ETAG: objects.put(probe_uri(objects.uri, prior_name), prior)})
                keep.add(prior_name)
                lock.check()
        except LeaseLostError as exc:
            where = lock.remote.where if lock.remote is not None else "of the store"
            raise ProbePublishInterrupted(
                f"the write lease {where} was taken over by another writer after this probe's weights were put in "
                f"the store and before its probe.json: probe.json was not put, so the store's probe is the one it "
                f"was (every machine takes that one). Run 'speciesid probe publish --index {gallery.root}' to share "
                "the probe") from exc
        etag = objects.put(meta_uri, meta, metadata=metadata)
        copy = _copy(etag, weights_etag, metadata.get(TEXT_PRIOR_ETAG))
        write_json_atomic(layout.probe_origin, {"copy": copy})
        if replaced is not None:
            keep |= _published_names(replaced)
        _remove_unnamed(objects, lock, keep)
    logger.info("probe of %s shared through its store (%s, %s, %s)", gallery.root, meta_uri, name,
                metadata[TEXT_PRIOR_KEY] if prior is not None else "no text prior")
    return copy


def withdraw_probe(gallery: Gallery) -> list[str]:
    """Remove the shared probe from the gallery's S3 store (under its lease): ``probe.json`` first, so that no
    machine takes the weights meanwhile, then the weights and text prior it names, and the weights and text prior
    objects no ``probe.json`` names (a publish cut off before its ``probe.json``); the objects removed, [] when the
    store held none. The folder's own probe files, text prior and ``probe_origin.json`` stay: the folders that took
    the probe keep it, and ``speciesid probe publish`` shares it again. ValueError when the store is not on S3."""
    objects = gallery.objects
    if objects is None:
        raise ValueError(f"the store of {gallery.root} is not on S3: its probe is not shared through the store "
                         "(every process reads the folder's probe files); nothing to withdraw")
    removed = []
    lock = write_lock(gallery.layout.write_lock)
    meta_uri = probe_uri(objects.uri, PROBE_META)
    with gallery.writing():
        head = objects.head(meta_uri)
        if head is not None:
            lock.check()
            objects.delete(meta_uri)
            removed.append(meta_uri)
            for name in sorted(_published_names(head)):  # one it names badly: the listing below finds it
                uri = probe_uri(objects.uri, name)
                if objects.head(uri) is not None:
                    lock.check()
                    objects.delete(uri)
                    removed.append(uri)
        removed += _remove_unnamed(objects, lock, set())
    if removed:
        logger.info("shared probe of %s's store withdrawn (%s)", gallery.root, ", ".join(removed))
    return removed


def _remove_unnamed(objects: StoreObjects, lock: WriteLock, keep: set[str]) -> list[str]:
    """Under the store's lease (``lock``, checked first): remove the weights and text prior objects of the store's
    probe folder (:func:`_is_published_name`) other than ``keep`` (names); the URIs removed. Best effort, after the
    publish or the withdraw it follows succeeded: a failure (a listing refused, the lease lost) is logged, and the
    next publish or withdraw tries again (an unnamed object is taken by no machine: it costs its bytes, nothing
    else)."""
    folder = probe_uri(objects.uri, "")
    try:
        unnamed = [o.uri for o in objects.listing(folder)
                   if "/" not in o.uri[len(folder):] and _is_published_name(o.uri[len(folder):])
                   and o.uri[len(folder):] not in keep]
        if not unnamed:
            return []
        lock.check()
        refused = {}
        for start in range(0, len(unnamed), DELETE_BATCH):
            refused.update(objects.delete_many(unnamed[start:start + DELETE_BATCH], check=lock.check))
    except (OSError, LeaseError, TimeoutError) as exc:
        logger.warning("the probe weights and text priors no probe.json names in %s were not removed (%s): the next "
                       "'speciesid probe publish' or 'probe withdraw' removes them", folder, exc)
        return []
    for uri, why in refused.items():
        logger.warning("probe object %s named by no probe.json not removed: %s", uri, why)
    return [uri for uri in unnamed if uri not in refused]


def _copy_of(head: dict | None) -> str | None:
    """The copy (:func:`_copy`) a HEAD of the store's probe.json names; None when the store has none."""
    if head is None:
        return None
    metadata = head.get("Metadata") or {}
    return _copy(str(head["ETag"]), metadata.get(WEIGHTS_ETAG), metadata.get(TEXT_PRIOR_ETAG))


def _copy(etag: str, weights_etag: str | None, prior_etag: str | None = None) -> str:
    """One copy of the store's probe: its probe.json's ETag, the weights' it names and the text prior's when it
    names one (an S3 ETag follows the bytes: a probe.json of the same text with other weights, or another text
    prior, is another copy; a copy without a text prior is written as earlier versions wrote it)."""
    return f"{etag} {weights_etag}" + (f" {prior_etag}" if prior_etag else "")


class ProbeFollower:
    """Takes the store's shared probe into a gallery folder when it changes (see the module's docstring)."""

    def __init__(self, gallery: Gallery, objects: StoreObjects) -> None:
        self.gallery = gallery
        self.objects = objects
        self.seen: str | None = _origin(gallery)  # the store's copy (_copy) the folder's files match, or seen last
        self._failing = False  # a failure was warned: the next ones are logged at info until one succeeds
        #: The last look at the store's copy: {"at": when (ISO 8601, UTC), "copy": the store's copy then (None: it
        #: had none)} or {"at", "error"}; None before the first. What /readyz tells without asking the store.
        self.last_look: dict[str, str | None] | None = None
        self._looking: threading.Thread | None = None  # the look look_soon started (None: none yet)
        self._looking_guard = threading.Lock()
        self._taking = threading.Lock()  # held while a take writes the folder's probe files (files_quiet)
        #: Called with a text prior's bytes before a take writes it into the folder, on the take's thread (the look
        #: thread of a server): computes and caches its class embeddings, so that loading it (before an answer)
        #: finds them cached (:func:`retrieval.textprior.warm_text_prior`). None: loading computes them.
        self.warm: Callable[[bytes], object] | None = None

    def at_open(self) -> None:
        """At open: take the store's copy when the folder has no probe (waiting :data:`AT_OPEN_WAIT_S` at most for
        a writer of the folder), or holds a copy taken from the store that is not the store's now; else only
        remember the store's copy as seen (later changes are taken)."""
        has = self.gallery.layout.probe_meta.is_file()
        if has and self.seen is None:  # a probe not taken from the store (made here, copied in): kept until the
            # next publish
            try:
                self.seen = self._etag()
            except OSError as exc:  # the store unreachable: its copy is taken at the first look that reaches it
                logger.warning("could not look at the shared probe of %s's store (%s)", self.gallery.root, exc)
            return
        self.check(wait=0.0 if has else AT_OPEN_WAIT_S)  # without a probe, wait a little for a writer of the folder

    def check(self, *, wait: float | None = 0.0) -> bool:
        """One look at the store's copy (a HEAD); when it is neither the one seen last nor the one the folder
        records (``probe_origin.json``, read at each look and again under the folder's lock: a publish from this
        folder is not taken back), take it into the folder. Whether it did. A failure (the store unreachable, the
        folder's lock held by a writer: ``wait`` seconds for it, 0 by default, a reader's) is logged, and looked at
        again at the next check."""
        try:
            took = self._take(wait)
        except TimeoutError as exc:  # a writer holds the folder: not a failure
            logger.info("the shared probe of %s's store not taken yet (%s): looked at again later", self.gallery.root,
                        exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the store's or the folder's: the probe loaded stays
            log = logger.info if self._failing else logger.warning
            log("could not take the shared probe of %s's store into it (%s): the probe loaded stays; looked at again "
                "later", self.gallery.root, exc)
            self._failing = True
            return False
        self._failing = False
        return took

    def look_soon(self) -> None:
        """Start one :meth:`check` on a thread of its own, unless one is running, and return at once: a server's
        request does not wait on the HEAD (nor on a take). The folder's files a take changes are loaded at the next
        look at them (``refresh_s`` later at most, :meth:`retrieval.identify.Identifier.refresh_probe`)."""
        with self._looking_guard:
            if self._looking is not None and self._looking.is_alive():
                return
            thread = threading.Thread(target=self.check, name=f"probe look {self.gallery.root}", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # no thread to be had (the interpreter shutting down, a thread limit)
                logger.info("the shared probe of %s's store not looked at (%s): looked at again later",
                            self.gallery.root, exc)
                self._looking = None
                return
            self._looking = thread

    @contextlib.contextmanager
    def files_quiet(self, *, wait: bool = False) -> Iterator[bool]:
        """Keep this follower's takes off the folder's probe files while they are read in the block: yields True
        (no take writes them until the block ends), or False when a take is writing them now (``wait``: waits for
        it to end instead): a reader then leaves them for its next look, not catching half a take."""
        if not self._taking.acquire(blocking=wait):
            yield False
            return
        try:
            yield True
        finally:
            self._taking.release()

    def wait_for_look(self, timeout: float | None = None) -> None:
        """Wait (``timeout`` seconds at most) for the look :meth:`look_soon` started, if one is running."""
        thread = self._looking
        if thread is not None:
            thread.join(timeout)

    def _etag(self) -> str | None:
        """The store's copy now (:func:`_copy`; None: it has none)."""
        head = self._head()
        return _copy_of(head)

    def _head(self) -> dict[str, Any] | None:
        """The HEAD of the store's probe.json (None: none there), kept as :attr:`last_look`."""
        try:
            head = self.objects.head(probe_uri(self.objects.uri, PROBE_META))
        except Exception as exc:  # noqa: BLE001 - recorded for /readyz, raised as it is
            self.last_look = {"at": now_utc(), "error": first_line(exc, 300)}
            raise
        copy = _copy_of(head)
        self.last_look = {"at": now_utc(), "copy": copy}
        return head

    def _take(self, wait: float | None) -> bool:
        meta_uri = probe_uri(self.objects.uri, PROBE_META)
        before = self.last_look
        head = self._head()
        if head is None:
            self._note_withdrawn(meta_uri, before)
            return False
        etag = str(head["ETag"])
        weights_etag = (head.get("Metadata") or {}).get(WEIGHTS_ETAG)
        copy = _copy_of(head)
        if copy == self.seen:
            return False
        if copy == _origin(self.gallery):  # the folder has it (published here, or taken by another process)
            self.seen = copy
            return False
        if not weights_etag:  # not one publish_probe wrote: its weights cannot be told to be its own
            logger.warning("%s names no weights (metadata %s): not taken; publish it again with speciesid probe "
                           "train or probe import", meta_uri, WEIGHTS_ETAG)
            self.seen = copy
            return False
        try:
            name = _weights_of(head)
            says_prior, prior_name, prior_etag = _text_prior_of(head)
        except ValueError as exc:
            logger.warning("%s %s: not taken; publish it again with speciesid probe publish", meta_uri, exc)
            self.seen = copy
            return False
        meta = self.objects.get(meta_uri, etag=etag)  # ObjectChangedError: published again meanwhile (next look)
        weights = self.objects.get(probe_uri(self.objects.uri, name), etag=weights_etag)
        prior = None if prior_name is None else self.objects.get(probe_uri(self.objects.uri, prior_name),
                                                                 etag=prior_etag)
        where = f"the shared probe {meta_uri}"
        fix = f"train the probe again with 'speciesid probe train --index {self.gallery.root}'"
        try:
            said = json.loads(meta)
            if not isinstance(said, dict):  # not a probe's: refused (and marked seen) like one of another encoder
                raise ValueError(f"{where} is a JSON {type(said).__name__}, not a probe's record (an object); "
                                 f"publish the probe again with 'speciesid probe publish'")
            check_format(where, said.get("format"), PROBE_FORMAT, older=fix)  # a newer one: never taken
            check_encoder(where, str(said["fingerprint"]), self.gallery.fingerprint, fix=fix)
            if prior is not None:
                check_encoder(f"the text prior {prior_name} of {where}", str(json.loads(prior)["fingerprint"]),
                              self.gallery.fingerprint, fix=fix)
        except (ValueError, KeyError, TypeError) as exc:  # another encoder's (or not a probe's): never taken
            logger.warning("%s (not taken into %s)", exc, self.gallery.root)
            self.seen = copy
            return False
        if prior is not None and self.warm is not None:  # before the files change: no answer computes it
            try:
                self.warm(prior)
            except Exception as exc:  # noqa: BLE001 - the take goes on: loading the prior computes it then
                logger.warning("the class embeddings of the text prior %s not computed ahead (%s): the first answer "
                               "after the take computes them", prior_name, exc)
        layout = self.gallery.layout
        # the folder's files only (a writer's probe write waits); this process's readers of them wait (files_quiet)
        with self.gallery.writing(local=True, wait=wait), self._taking:
            origin = _origin(self.gallery)
            if origin == copy:  # a publish from this folder (or another follower) since the look
                self.seen = copy
                return False
            same_probe = _holds_probe(layout, meta, weights)  # the copy recorded in another spelling (a version's)
            if same_probe and _holds_prior(layout, says_prior, prior):  # nothing to write: probe.prev.* stays
                write_json_atomic(layout.probe_origin, {"copy": copy})
                self.seen = copy
                logger.info("the shared probe of the store (%s) is the one %s holds (recorded as %s): not taken "
                            "again", copy, self.gallery.root, origin)
                return False
            # the probe it replaces (what 'probe restore' brings back here), unless it is this one (its prior alone
            # is new): probe.prev.* never becomes a second copy of the probe
            kept = "" if same_probe else keep_previous(self.gallery.root)
            atomic_write(layout.probe_weights, weights)  # weights first: a reader of the folder checks the pair
            dropped = _take_text_prior(layout.text_prior, says_prior, prior)  # with the probe, before its json
            atomic_write(layout.probe_meta, meta)
            write_json_atomic(layout.probe_origin, {"copy": copy})
        self.seen = copy
        prior_words = (f"; its text prior {prior_name}" if prior is not None else
                       "; removed the folder's text_prior.json (the store's probe has none)" if dropped else "")
        logger.info("took the shared probe of the store into %s (%s)%s%s", self.gallery.root, copy, prior_words,
                    f"; kept {kept} as probe.prev.*" if kept else "")
        return True

    def _note_withdrawn(self, meta_uri: str, before: dict[str, str | None] | None) -> None:
        """The store holds no probe: when the folder's came from it (withdrawn: ``speciesid probe withdraw``), say
        the folder keeps it, once (not again while the store stays without one): at WARNING when the look before
        saw one (a server's probe withdrawn while it runs), at INFO otherwise (a command's open)."""
        if before is not None and "error" not in before and before.get("copy") is None:
            return  # said at the look that found it gone
        origin = _origin(self.gallery)
        if origin is None:
            return
        log = logger.warning if before is not None and before.get("copy") else logger.info
        log("the shared probe %s is not in the store any more (withdrawn): %s keeps the probe it took from it (%s) "
            "and answers with it; the next 'speciesid probe publish' (or train, import, restore) on any machine is "
            "taken", meta_uri, self.gallery.root, origin)


def _take_text_prior(path: Path, says: bool, prior: bytes | None) -> bool:
    """Write the store's text prior ``prior`` at ``path`` (the folder's ``text_prior.json``), or remove the folder's
    when the store's copy ``says`` it has none (a probe published without one: the folder's belongs to an older
    probe); a copy an earlier version published (``says`` False) leaves it as it is. Whether one was removed."""
    if prior is not None:
        atomic_write(path, prior)
        return False
    if says and path.exists():
        path.unlink()
        return True
    return False


def _holds_probe(layout: GalleryLayout, meta: bytes, weights: bytes) -> bool:
    """Whether the folder's probe files are, byte for byte, ``meta`` (probe.json) and ``weights``."""
    try:
        return layout.probe_meta.read_bytes() == meta and layout.probe_weights.read_bytes() == weights
    except OSError:
        return False


def _holds_prior(layout: GalleryLayout, says: bool, prior: bytes | None) -> bool:
    """Whether the folder's text prior is already what taking a copy leaves (:func:`_take_text_prior`): ``prior``
    byte for byte, none when the copy ``says`` it has none, anything when it says nothing."""
    try:
        if prior is not None:
            return layout.text_prior.read_bytes() == prior
    except OSError:
        return False
    return not (says and layout.text_prior.exists())


def shared_probe_status(gallery: Gallery, follower: ProbeFollower | None = None, *, look: bool = False
                        ) -> dict[str, Any] | None:
    """The ``shared`` part of the ``probe`` block (:func:`probe_status`), None when the store is not on S3:
    ``object`` (the store's probe.json), ``copy`` (the store's copy the folder's probe files came from, from
    probe_origin.json; None: made here, or none), and the store's copy as last looked at: ``store_copy``,
    ``looked_at``, ``matches`` (None: not looked at yet, the last look failed, or the store has none), ``withdrawn``
    (True: the folder's probe came from the store, which holds none now; None: not looked at yet, or the last look
    failed) and ``error`` (that failure). ``look``: one HEAD now
    (``index info``); else ``follower``'s last look, and no request (``/readyz`` never waits on the store)."""
    if gallery.objects is None:
        return None
    if look:
        follower = ProbeFollower(gallery, gallery.objects)
        origin = follower.seen  # probe_origin.json, as the follower read it: not read again
        with contextlib.suppress(Exception):  # kept as its last_look's error
            follower._head()
    else:
        origin = _origin(gallery)
    status: dict[str, Any] = {"object": probe_uri(gallery.objects.uri, PROBE_META), "copy": origin}
    last = follower.last_look if follower is not None else None
    if last is None:
        status.update(store_copy=None, looked_at=None, matches=None, withdrawn=None)
    elif "error" in last:
        status.update(looked_at=last["at"], error=last["error"], matches=None, withdrawn=None)
    else:
        status.update(store_copy=last["copy"], looked_at=last["at"],
                      matches=None if last["copy"] is None else last["copy"] == status["copy"],
                      withdrawn=last["copy"] is None and status["copy"] is not None)
    return status


def probe_status(probe: LinearProbe | None, gallery: Gallery, follower: ProbeFollower | None = None, *,
                 look: bool = False, since: ReferencesSince | None | bool = True,
                 api: bool = False) -> dict[str, Any]:
    """The ``probe`` block of ``/readyz`` and ``index info``: ``loaded`` (whether ``probe`` is one), what it is
    (:func:`retrieval.probe.probe_summary`), ``references_since`` (the references added and deleted since a probe
    trained here was, with a ``note`` while any were: :func:`retrieval.probe.references_since`; ``since``: that,
    computed already (a server's, once per gallery version), or True to compute it here), and on an S3 store
    ``shared`` (:func:`shared_probe_status`). ``api``: the note worded for an HTTP client."""
    block: dict[str, Any] = {"loaded": probe is not None}
    if probe is not None:
        block.update(probe_summary(probe))
        moved = references_since(probe, gallery.index.ids) if since is True else since or None
        if moved is not None:
            block["references_since"] = moved.to_dict() | {"note": moved.note(api=api, root=gallery.root)}
    shared = shared_probe_status(gallery, follower, look=look)
    if shared is not None:
        block["shared"] = shared
    return block


def _origin(gallery: Gallery) -> str | None:
    """The store's copy (:func:`_copy`) the folder's probe came from (None: none recorded, or unreadable)."""
    try:
        return str(json.loads(gallery.layout.probe_origin.read_text(encoding="utf-8"))["copy"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def probe_follower(gallery: Gallery) -> ProbeFollower | None:
    """The follower of the gallery's shared probe, None when its store is not on S3."""
    return ProbeFollower(gallery, gallery.objects) if gallery.objects is not None else None
