"""The gallery folder (``--index DIR``): every file in it is named here, and only here.

::

    DIR/
      gallery.json            which encoder built the gallery (spec, weights, fingerprint, dim), index settings
      store/                  LanceDB: one row per reference photo, metadata + embedding (the source of truth)
      vectors.faiss(.json)    the FAISS index derived from the store + its manifest (store version, count)
      vectors-<token>.*       the IVF-PQ index's generation files, named by its manifest: .ivfpq (codes),
                              .f16 + .ids (float16 vectors for the exact re-rank), .delta.npz (changes)
      probe.npz, probe.json   the linear probe (weights; species, encoder fingerprint, calibration, the
                              weights' sha256: a reader caught between the two files' writes sees they differ)
      probe.prev.npz/.json    the probe the last `probe train` / `import`, or one taken from the store, replaced
      probe.swap.npz/.json    while `probe restore` swaps the two: the probe it sets aside (a crash leaves it for
                              the next probe write to finish or undo the swap: retrieval.probe)
      probe_origin.json       a store on S3: which copy of the store's shared probe those two came from
                              ("<probe.json ETag> <weights ETag>")
      whitening_stats.npz     the sums the kNN vote's whitening is fitted from, and which rows they cover
      far_threshold.json      the last estimate of the similarity under which a photo is unlike every reference,
                              with the index state it was estimated for (retrieval.identify.saved_far_threshold)
      text_prior.json         which species the zero-shot text prior covers (+ its encoder)
      text_prior_cache/       the text prior's class embeddings, per encoder and species list
      clean_prompt_cache/     the cleaning filter's prompt-class embeddings
      clean_log.json          which references each ``clean --apply`` run excluded (for ``--restore``)
      clean-report/           the report of ``index build --clean``
      uploads/                photos added through the HTTP API, stored by content digest
      ids.json                the next reference id (ids are never reused, whichever process writes)
      store_pruned.json       when a write of this folder last pruned the store's old versions (index.compaction)
      build-marks/<id>.json   one per build into the folder that runs now, or that was interrupted (or an add cut
                              short): its state, host, pid, dataset and photos digest (removed when a build that
                              covered it completes; index.build_mark)
      build.json              the same mark in the layout before stop 51 (one per folder): read, never written
      .write.lock             the lock writers hold across processes (index.locks)
      .uncommitted-<id>.json  a Ray build's journal of data files its workers wrote to the store and not yet
                              committed, held (flock) by the build; one left by a killed build is acted on by
                              the next Ray build on the same host (index.fragments)

The probe's two files have the same names in a fine-tuned model folder (``speciesid finetune --out``).

Anything derived from embeddings records the fingerprint (``spec#digest``) of the encoder that made it;
:func:`check_encoder` is the one check, :class:`EncoderMismatchError` the one error, with one message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GALLERY_FILE = "gallery.json"
STORE_DIR = "store"
VECTORS_FILE = "vectors.faiss"
#: Generation files of the IVF-PQ index: ``vectors-<token>.<part>``.
VECTORS_PARTS = ("ivfpq", "f16", "ids", "delta.npz")
PROBE_WEIGHTS = "probe.npz"
PROBE_META = "probe.json"
#: The probe ``probe train`` / ``probe import`` replaced, kept one generation (``probe restore`` swaps it back).
PROBE_PREV_WEIGHTS = "probe.prev.npz"
PROBE_PREV_META = "probe.prev.json"
#: The probe ``probe restore`` sets aside, copied here before the swap starts (removed when it ends).
PROBE_SWAP_WEIGHTS = "probe.swap.npz"
PROBE_SWAP_META = "probe.swap.json"
#: Which copy of an S3 store's shared probe the folder's probe files came from ("<probe.json ETag> <weights ETag>";
#: retrieval.probe_share).
PROBE_ORIGIN = "probe_origin.json"
WHITENING_STATS = "whitening_stats.npz"
#: The far threshold's last estimate and what it was estimated for (retrieval.identify.saved_far_threshold).
FAR_THRESHOLD_FILE = "far_threshold.json"
TEXT_PRIOR_FILE = "text_prior.json"
TEXT_PRIOR_CACHE = "text_prior_cache"
PROMPT_CACHE = "clean_prompt_cache"
CLEAN_LOG = "clean_log.json"
CLEAN_REPORT = "clean-report"
UPLOADS_DIR = "uploads"
IDS_FILE = "ids.json"
STORE_PRUNED_FILE = "store_pruned.json"
#: The mark of a build into the folder that has not finished, in the layout before stop 51 (index.build_mark).
BUILD_MARK = "build.json"
#: The folder of the marks of builds (and adds) that have not finished, one file per build (index.build_mark).
BUILD_MARKS_DIR = "build-marks"
WRITE_LOCK = ".write.lock"
#: A Ray build's journal of uncommitted data files: ``.uncommitted-<uuid>.json`` (index.fragments).
JOURNAL_PREFIX, JOURNAL_SUFFIX = ".uncommitted-", ".json"
JOURNAL_GLOB = f"{JOURNAL_PREFIX}*{JOURNAL_SUFFIX}"


@dataclass(frozen=True)
class GalleryLayout:
    """Paths of one gallery folder."""

    root: Path  # the --index DIR

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def info(self) -> Path:
        """gallery.json: encoder identity and index settings."""
        return self.root / GALLERY_FILE

    @property
    def store(self) -> Path:
        """The LanceDB folder."""
        return self.root / STORE_DIR

    def store_location(self, info: dict) -> str:
        """Where the gallery keeps its table: the object-store URI its ``gallery.json`` (``info``) names, else
        :attr:`store`, the folder in it."""
        return str((info.get("store") or {}).get("uri") or self.store)

    @property
    def vectors(self) -> Path:
        """The FAISS index file (its manifest is ``vectors.faiss.json``)."""
        return self.root / VECTORS_FILE

    def vectors_part(self, token: str, part: str) -> Path:
        """One generation file of the IVF-PQ index (``part`` in :data:`VECTORS_PARTS`)."""
        if part not in VECTORS_PARTS:
            raise ValueError(f"unknown vectors part {part!r}")
        return self.root / f"vectors-{token}.{part}"

    def vectors_parts(self) -> list[Path]:
        """Every IVF-PQ generation file present."""
        return sorted(p for p in self.root.glob("vectors-*") if any(p.name.endswith("." + x) for x in VECTORS_PARTS))

    @property
    def probe_weights(self) -> Path:
        """The probe's weight and bias arrays."""
        return self.root / PROBE_WEIGHTS

    @property
    def probe_meta(self) -> Path:
        """The probe's species, encoder fingerprint and calibration."""
        return self.root / PROBE_META

    @property
    def probe_origin(self) -> Path:
        """Which copy of the store's shared probe (``{"copy": "<probe.json ETag> <weights ETag>"}``) the folder's
        probe files were taken from or published as (an S3 store only)."""
        return self.root / PROBE_ORIGIN

    @property
    def whitening_stats(self) -> Path:
        """The whitening's sufficient statistics, the ids they cover and the store version they were read at."""
        return self.root / WHITENING_STATS

    @property
    def far_threshold(self) -> Path:
        """The far threshold's last estimate, with the index state it was estimated for."""
        return self.root / FAR_THRESHOLD_FILE

    @property
    def text_prior(self) -> Path:
        """The text prior's species list."""
        return self.root / TEXT_PRIOR_FILE

    @property
    def text_prior_cache(self) -> Path:
        """The text prior's cached class embeddings."""
        return self.root / TEXT_PRIOR_CACHE

    @property
    def prompt_cache(self) -> Path:
        """The cleaning filter's cached prompt-class embeddings."""
        return self.root / PROMPT_CACHE

    @property
    def clean_log(self) -> Path:
        """Exclusions made by ``clean --apply`` runs."""
        return self.root / CLEAN_LOG

    @property
    def clean_report(self) -> Path:
        """Report folder of ``index build --clean``."""
        return self.root / CLEAN_REPORT

    @property
    def uploads(self) -> Path:
        """Photos added through the HTTP API."""
        return self.root / UPLOADS_DIR

    @property
    def ids(self) -> Path:
        """The next reference id (a high-water mark, never lowered)."""
        return self.root / IDS_FILE

    @property
    def store_pruned(self) -> Path:
        """When a write of this folder last pruned the store's old versions (its automatic compaction prunes at
        most once per :data:`index.compaction.AUTO_PRUNE_EVERY`)."""
        return self.root / STORE_PRUNED_FILE

    @property
    def build_mark(self) -> Path:
        """The build mark of the layout before stop 51 (one per folder): read for old galleries, never written; see
        :attr:`build_marks` (:mod:`index.build_mark`)."""
        return self.root / BUILD_MARK

    @property
    def build_marks(self) -> Path:
        """The marks of builds (and adds) into the folder that run or were interrupted, ``<build id>.json``
        (:mod:`index.build_mark`)."""
        return self.root / BUILD_MARKS_DIR

    @property
    def write_lock(self) -> Path:
        """The lock file of the write path."""
        return self.root / WRITE_LOCK


class EncoderMismatchError(ValueError):
    """Something derived from embeddings (a gallery, a probe, a text prior) meets another encoder."""


def weights_digest(fingerprint: str) -> str:
    """The weights part of an encoder fingerprint (``spec#digest`` -> ``digest``), with the embedding options
    that follow it (``spec#digest+pool=gem3+views=flip``) when there are any."""
    return str(fingerprint).rsplit("#", 1)[-1]


def weights_only(fingerprint: str) -> str:
    """The digest of an encoder fingerprint without the embedding options (``spec#digest+size=288`` -> ``digest``):
    the same network, whatever its pooling, views or input size."""
    return weights_digest(fingerprint).partition("+")[0]


def _spec(fingerprint: str) -> str:
    return str(fingerprint).rsplit("#", 1)[0]


def check_encoder(what: str, recorded: str, given: str, *, fix: str) -> None:
    """Refuse to use ``what`` (made with encoder fingerprint ``recorded``) with the encoder ``given``.

    Encoders are the same when their weights are (the digest part of the fingerprint): one set of weights
    reached through two spellings of a spec (``bioclip`` / ``open_clip:hf-hub:imageomics/bioclip``, a
    relative / absolute folder) makes the same embeddings. ``fix`` says what to do instead.
    """
    if weights_digest(recorded) == weights_digest(given):
        return
    rec_opt = weights_digest(recorded).partition("+")[2]
    giv_opt = weights_digest(given).partition("+")[2]
    if weights_only(recorded) == weights_only(given):  # same weights, other embedding options (pooling, test-time views)
        own = dict(part.split("=", 1) for part in (rec_opt or "pool=model+views=single").split("+") if "=" in part)
        flags = " ".join(f"--{k} {own.get(k, d)}" for k, d in (("pool", "model"), ("views", "single")))
        raise EncoderMismatchError(
            f"{what} was built with encoder {_spec(recorded)!r} with options '{rec_opt or 'pool=model+views=single'}',"
            f" not with the options given ('{giv_opt or 'pool=model+views=single'}'): its embeddings would not "
            f"compare; give the gallery's own ({flags}: queries take them when --pool/--views are left out), or "
            "build a new index in another directory"
        )
    if _spec(recorded) == _spec(given):  # the same spec: the weights it names were replaced since
        raise EncoderMismatchError(
            f"{what} was built with encoder {_spec(recorded)!r} (fingerprint {recorded}), but the weights that spec "
            f"names have changed since (now {given}): put the weights it was built with back, or build a new index "
            "(in another directory) with these"
        )
    raise EncoderMismatchError(
        f"{what} was built with encoder {_spec(recorded)!r} (fingerprint {recorded}), not with the encoder "
        f"given ({given}); {fix}"
    )
