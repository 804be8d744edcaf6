"""Photos -> answers: encoder + gallery search + kNN vote, blended with the probe and text prior.

The vote's neighbours are the gallery's nearest references by cosine, or, when the probe's calibration chose the
whitened metric (``retrieval.metric``), the nearest in that space among the :data:`RERANK_CANDIDATES` nearest
by cosine (their ``similarity`` is then the whitened one); the whitening follows the gallery (fitted again when
species come or go, see ``retrieval.metric``). ``Identifier.search`` always gives plain cosine.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from threadpoolctl import ThreadpoolController

from index.atomic import write_json_atomic
from index.gallery import Gallery, Neighbour, check_gallery_encoder
from index.geography import SNAKE_TABLE
from index.layout import FAR_THRESHOLD_FILE, check_encoder
from index.photos import first_few
from index.records import rank_genus
from index.store import SpeciesSummary
from retrieval.advice import (
    VENOM_WARN_AT,
    ChecklistCoverage,
    VenomAdvice,
    checklist_coverage,
    unrecorded_share,
    venom_advice,
    venom_applies,
)
from retrieval.blend import apply_country, blend_knn_probe, mix_text_prior, text_weight
from retrieval.encoders import Encoder
from retrieval.findings import DEFAULT_DUP_THRESHOLD
from retrieval.metric import DEFAULT_SHRINK, RERANK_CANDIDATES, Whitening, l2_normalize, unit_queries
from retrieval.probe import LinearProbe, ReferencesSince, describe_probe, has_probe, references_since
from retrieval.textprior import TextPriorScores
from retrieval.vote import (
    Rank,
    VoteConfig,
    knn_vote,
    parse_choice,
    rollup,
    top_k,
    venomous_probability,
)
from retrieval.whitening_sync import gallery_stats

logger = logging.getLogger(__name__)

#: Whitened reference vectors kept in memory for the vote's re-rank (the cache starts over beyond this).
WHITENED_CACHE_ROWS = 200_000
#: A photo is "unlike every reference" when its nearest reference is less similar (cosine) than all but this share
#: of the gallery's references are to their own nearest other reference (see :func:`far_threshold`).
FAR_QUANTILE = 0.001
#: References sampled to estimate that threshold (all of them in a smaller gallery).
FAR_SAMPLE = 2000
#: The last estimate of that threshold, kept in the gallery folder beside the index with what it was estimated for
#: (:func:`far_key`): a new process (each CLI ``identify``) reuses it while the index is the same (its name:
#: :data:`index.layout.FAR_THRESHOLD_FILE`, where every file of the folder is named).
FAR_FILE = FAR_THRESHOLD_FILE


#: The version of :func:`far_threshold`'s rule in :func:`far_key`: a threshold kept by an earlier rule is estimated
#: again (raise it when the rule changes). 2: near-copies are passed over as a reference's nearest other.
FAR_RULE = 2
#: Neighbours of each reference :func:`far_threshold` searches (itself among them) for its nearest other that is not
#: a near-copy of it (a photo saved twice, re-cropped): a reference with only near-copies among them is left out.
FAR_NEIGHBOURS = 10

#: Cosine at or above which a photo is a near-copy of a reference (that reference's photo re-saved, re-cropped or
#: mirrored): the ``speciesid clean`` leak rule, by which ``evaluate`` leaves such photos out of val and ``references
#: add`` notes them (:data:`retrieval.findings.DEFAULT_DUP_THRESHOLD`).
NEAR_COPY_COSINE = DEFAULT_DUP_THRESHOLD


@dataclass(frozen=True)
class NearCopyNote:
    """What :func:`near_copy_note` found: the reference the photo nearly copies (None: copies of several species)
    and the note the answer carries. Information only: it changes neither the answer nor its venom advice."""

    reference: int | None
    note: str


def near_copy_note(neighbours: Sequence[Neighbour], top: str | None,
                   probe_older: Callable[[int], bool] = lambda _: False) -> NearCopyNote | None:
    """The near-copy note of an answer (None when no voting neighbour is at cosine >= :data:`NEAR_COPY_COSINE`, the
    ``clean`` leak rule): the reference the photo nearly copies when all such references are of one species, named
    with its species; ``top`` (the answer's first candidate) other than that species adds "check its label";
    ``probe_older(id)`` true (the probe was trained before that reference was added: the stale-probe note) adds that
    ``speciesid probe train`` lets the probe learn it. Copies of several species: a likely mislabelled pair. It
    changes nothing: the answer, its UNKNOWN and its venom advice stay the blend's (a photo lifted out of UNKNOWN
    by its copy would lose its "cannot tell, treat as venomous")."""
    near = [n for n in neighbours if n.plain_cosine >= NEAR_COPY_COSINE]
    if not near:
        return None
    best = max(near, key=lambda n: n.plain_cosine)
    species = sorted({n.species for n in near})
    if len(species) > 1:  # one reference of each species at least (the nearest of each), up to 4 when fewer
        firsts: dict[str, int] = {}
        for n in near:
            firsts.setdefault(n.species, n.id)
        keep = set(firsts.values())
        room = max(4, len(keep)) - len(keep)  # the other references shown
        listed: dict[int, Neighbour] = {}  # nearest first, each reference once (an observation's may repeat)
        for n in near:
            if n.id not in listed and (n.id in keep or room > 0):
                room -= n.id not in keep
                listed[n.id] = n
        others = ", ".join(f"#{n.id} {n.species}" for n in listed.values())
        return NearCopyNote(None, f"this photo is a near-copy of references of {len(species)} species ({others}; "
                            f"cosine >= {NEAR_COPY_COSINE}): one of them is likely mislabelled ('speciesid clean' "
                            "lists such pairs as label conflicts)")
    ref = f"reference #{best.id} of {best.species} ({Path(best.path).name}, cosine {best.plain_cosine:.3f})"
    parts = [f"this photo is a near-copy of {ref}; the answer and its venom advice are the blend's all the same"]
    if top != best.species:
        parts.append(f"the answer ranks {top or 'no species'} first: check that reference's label")
    if probe_older(best.id):
        parts.append("the probe was trained before that reference was added: `speciesid probe train` lets the "
                     "probe learn it")
    return NearCopyNote(best.id, "; ".join(parts))


def far_threshold(gallery: Gallery, *, quantile: float = FAR_QUANTILE, sample: int = FAR_SAMPLE,
                  seed: int = 0) -> float | None:
    """The cosine under which a query is unlike every reference: the ``quantile`` of the references' similarity to
    their nearest other reference (up to ``sample`` of them), leaving out references far below the rest (under
    Q1 - 3 IQR: off-target ones). A reference's nearest other is the nearest that is not a near-copy of it (cosine
    under :data:`NEAR_COPY_COSINE`, among its :data:`FAR_NEIGHBOURS` nearest): a photo saved twice would otherwise
    set a threshold near 1, under which every real photo is far; a reference with only near-copies there is left
    out. None for a gallery of fewer than 2 references, or one whose references are all near-copies of each other
    (its answers say which: :func:`retrieval.workflows.answer_notes`).

    On ph-snakes with MobileNetV1 it is 0.60: the 206 val photos' nearest references lie at 0.64-0.97, while a
    blank, a noise or a 5 x 5 px image lies at 0.30-0.49 (docs/identification.md). Since stop 57 every reference
    path but ``add_references(embeddings=)`` refuses a blank photo (``retrieval.images.blank_reason``); a gallery
    built before may hold some."""
    ids = np.asarray(gallery.index.ids, dtype=np.int64)
    if len(ids) < 2:
        return None
    if len(ids) > sample:
        ids = np.sort(np.random.default_rng(seed).choice(ids, sample, replace=False))
    sims, found = gallery.nearest(gallery.reference_vectors(ids.tolist()), FAR_NEIGHBOURS)
    # itself, a twin (found before itself or not) and any near-copy are passed over: the first hit left is its
    # nearest other (the hits come nearest first)
    usable = (found >= 0) & (found != ids[:, None]) & np.isfinite(sims) & (sims < NEAR_COPY_COSINE)
    has = usable.any(axis=1)
    other = sims[np.arange(len(ids)), usable.argmax(axis=1)][has]
    if len(other) >= 8:  # an off-target reference (a drawing, noise) would set a small gallery's quantile alone:
        q1, q3 = np.quantile(other, [0.25, 0.75])  # Tukey's far-out fence sets such outliers aside (on the
        other = other[other >= q1 - 3 * (q3 - q1)]  # ph-snakes galleries, frozen and fine-tuned, it sets none aside)
    return float(np.quantile(other, quantile)) if len(other) else None


def far_key(gallery: Gallery, *, quantile: float = FAR_QUANTILE, sample: int = FAR_SAMPLE,
            seed: int = 0) -> dict[str, Any]:
    """What :func:`far_threshold` depends on: the index (its encoder, its store, the store version it reflects, its
    size, its kind and settings) and the estimate's own rule and settings."""
    index = gallery.index
    return {"rule": FAR_RULE, "fingerprint": gallery.fingerprint, "store": str(gallery.store_uri),
            "store_version": int(gallery.version), "count": int(index.ntotal), "kind": getattr(index, "kind", None),
            "index": type(index).__name__, "settings": asdict(gallery.index_config),
            "nprobe": getattr(index, "nprobe", None), "quantile": float(quantile), "sample": int(sample),
            "seed": int(seed)}


def saved_far_threshold(gallery: Gallery) -> float | None:
    """:func:`far_threshold` of the gallery as its folder keeps it (:data:`FAR_FILE`) when made for the index as it
    is now (:func:`far_key`), else estimated and kept there (best effort: a read-only folder only logs it)."""
    key, path = far_key(gallery), gallery.layout.far_threshold
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            value = saved.get("threshold")
            return None if value is None else float(value)
    except (OSError, ValueError, TypeError, AttributeError):
        pass  # none kept yet, or unreadable: estimated again below
    value = far_threshold(gallery)
    try:
        write_json_atomic(path, {"key": key, "threshold": value})
    except OSError as exc:
        logger.debug("the far threshold of %s was not kept (%s); estimated again next time", gallery.root, exc)
    return value


@functools.lru_cache(maxsize=1)
def _blas() -> ThreadpoolController:
    """The loaded thread pools, found once (looking them up costs ~5 ms, more than the re-rank)."""
    return ThreadpoolController()


class Method(str, Enum):
    """Which sources score the species."""

    KNN = "knn"  # nearest-neighbour vote only
    PROBE = "probe"  # linear probe only (closed world: species it was trained on)
    BLEND = "blend"  # kNN + probe (+ text prior when one is attached): the default


def parse_method(value: str | Method) -> Method:
    """'knn' / 'probe' / 'blend' -> Method; ValueError naming the choices otherwise."""
    return parse_choice(Method, value, "method")


@dataclass
class Prediction:
    """One candidate species with its probability and what is known of it."""

    species: str  # binomial
    score: float  # probability in [0, 1]
    common_name: str | None = None  # English common name
    genus: str | None = None  # genus name
    family: str | None = None  # family name
    venomous: bool | None = None  # medically important venomous, when known


@dataclass
class Identification:
    """The answer for one photo (or one multi-photo observation)."""

    predictions: list[Prediction]  # best first
    neighbours: list[Neighbour]  # nearest reference photos, the evidence
    unknown: bool  # True when the best score is under the unknown threshold, nothing scored, or ``far``
    scores: dict[str, float] = field(default_factory=dict)  # every species with a non-zero score
    genus_scores: dict[str, float] = field(default_factory=dict)  # species scores summed per genus
    family_scores: dict[str, float] = field(default_factory=dict)  # species scores summed per family
    venomous_score: float | None = None  # probability mass on medically important venomous species (None: far, or
    # no candidate's venom status is recorded)
    venom_unknown_score: float = 0.0  # probability mass on species whose venom status the gallery does not record
    # (whatever their names: a toad's counts until 'species set-venom' records it harmless)
    far: bool = False  # unlike every reference (nearest cosine under the gallery's far_threshold): not a photo of
    # what the gallery holds, or too small / blank to tell
    nearest: float | None = None  # cosine similarity of the nearest reference photo
    country_applied: bool | None = None  # None: no country given; False: it changed nothing (every candidate
    # recorded there, or none, or none in the table), so the scores are the photo's alone
    country_covered: bool | None = None  # None: no country given; False: no candidate is in the country table or
    # has a reference photo whose country the gallery records (country_note says so)
    set_aside: list[int] = field(default_factory=list)  # of an observation: the photos (0-based, in the order
    # given) set aside as far while another photo was not; they carry nothing about the animal
    venom_advice: VenomAdvice | None = None  # what to do about a bite (retrieval.advice); None: any answer of a
    # gallery whose gallery.json turns venom advice off (venom_applies false: birds)
    venom_applies: bool = True  # venom advice applies to the gallery (retrieval.advice.venom_applies: on unless
    # recorded off): False, no venom wording belongs with its answers
    near_copy: int | None = None  # the reference the photo is a near-copy of (cosine >= NEAR_COPY_COSINE, all such
    # references of one species): information only, it changes nothing (:func:`near_copy_note`)
    notes: list[str] = field(default_factory=list)  # what this answer is to be shown with (the near-copy note)

    def at_rank(self, rank: Rank) -> dict[str, float]:
        """Scores at the given rank."""
        return {Rank.SPECIES: self.scores, Rank.GENUS: self.genus_scores, Rank.FAMILY: self.family_scores}[rank]

    def country_note(self) -> str | None:
        """Why the country changed nothing, when it did not (None otherwise): no candidate is in any source of
        presence (:func:`index.geography.country_presence`), or all or none of them are recorded there."""
        if self.country_applied is not False:
            return None
        if not self.country_covered:
            return ("the country changed nothing here: none of these candidates is in the shipped country table "
                    f"({SNAKE_TABLE}) or has a reference photo whose country this gallery records (a manifest's "
                    "country column, index build --dataset manifest)")
        return ("the country changed nothing here: these candidates are all recorded in that country, or none is "
                f"(the shipped country table, {SNAKE_TABLE}, and the countries of the gallery's own photos)")

    def to_dict(self, *, neighbours: int | None = None) -> dict[str, object]:
        """JSON-ready dict (``neighbours`` limits the evidence list)."""
        return {
            "predictions": [asdict(p) for p in self.predictions],
            "neighbours": [n.to_dict() for n in self.neighbours[:neighbours]],
            "unknown": self.unknown,
            "far": self.far,
            "nearest_similarity": self.nearest,
            "genus_scores": self.genus_scores,
            "family_scores": self.family_scores,
            "venomous_score": self.venomous_score,
            "venom_unknown_score": self.venom_unknown_score,
            "country_applied": self.country_applied,
            "country_note": self.country_note(),
            "set_aside": list(self.set_aside),
            "venom_advice": self.venom_advice.to_dict() if self.venom_advice is not None else None,
            "venom_applies": self.venom_applies,
            "near_copy": self.near_copy,
        }


@dataclass(frozen=True)
class Calibrated:
    """What the gallery's probe files set, swapped whole when they change (:meth:`Identifier.follow_probe`)."""

    probe: LinearProbe | None  # the linear probe (or a fine-tuned head), None without one
    config: VoteConfig  # the vote's k, T and unknown threshold
    blend_weight: float  # the probe's share in the blend
    text_prior: TextPriorScores | None  # the zero-shot text prior, None without one


#: Loads the gallery's probe and text prior again (:meth:`Identifier.follow_probe`).
ProbeLoader = Callable[[], tuple[LinearProbe | None, TextPriorScores | None]]
#: A guard around a read of the probe files (``follow_probe``'s ``quiet``): ``quiet(wait=...)`` is a context
#: whose value says whether they may be read now.
FilesQuiet = Callable[..., contextlib.AbstractContextManager[bool]]


class Identifier:
    """Identify photos against a gallery with the encoder that built it.

    ``probe``, ``config``, ``blend_weight`` and ``text_prior`` are read from one :class:`Calibrated` state; an
    answer keeps the state it started with, even when :meth:`follow_probe` swaps in a new one meanwhile."""

    def __init__(
        self,
        encoder: Encoder,
        gallery: Gallery,
        config: VoteConfig | None = None,
        *,
        probe: LinearProbe | None = None,
        text_prior: TextPriorScores | None = None,
        blend_weight: float | None = None,
    ) -> None:
        check_gallery_encoder(gallery.root, gallery.info, encoder.fingerprint)
        if probe is not None:
            check_encoder(f"the probe of {gallery.root}", probe.fingerprint, gallery.fingerprint,
                          fix=f"retrain it with 'speciesid probe train --index {gallery.root}'")
        self.encoder = encoder
        self.gallery = gallery
        self._given_config = config  # set by the caller: kept when the probe changes (else the probe's)
        self._given_weight = blend_weight
        self._state = self._calibrated(probe, text_prior)
        self._pinned_state = threading.local()  # the state an answer in progress on this thread started with
        self._follow: tuple[list[Path], ProbeLoader, float] | None = None  # (files, loader, refresh_s)
        self._sync: Callable[[bool], object] | None = None  # called before each look at the files (follow_probe)
        self._quiet: FilesQuiet | None = None  # held around each read of the files (follow_probe)
        #: The follower of an S3 store's shared probe (retrieval.probe_share.ProbeFollower; open_identifier sets it),
        #: whose last look /readyz tells; None otherwise.
        self.probe_follower: Any = None
        self._probe_files: tuple | None = None  # their (mtime_ns, size) when the state was loaded
        self._probe_checked = 0.0  # time.monotonic() of the last look at them
        self._reload_lock = threading.Lock()
        self._taxa_version = -1
        self._taxa: dict[str, SpeciesSummary] = {}
        self._held: frozenset[str] = frozenset()  # species with searchable references (with the taxa's version)
        self._venomous: tuple[SpeciesSummary, ...] = ()  # species recorded venomous (with the taxa's version)
        self._probe_noted: dict[str, tuple[int, LinearProbe | None]] = {}  # warned -> (gallery version, probe) then
        self._whitening_version = -1
        self._whitening: Whitening | None = None
        self._whitening_probe: LinearProbe | None = None  # the probe the cached whitening came with
        self._whitened: dict[int, np.ndarray] = {}  # reference id -> its whitened vector (under self._whitening)
        self._whitened_lock = threading.Lock()  # the service identifies from several threads
        self._far: tuple[int, float | None] | None = None  # (gallery size it was estimated at, far_threshold)
        # (taxa version, text prior, gallery.json as read, it): gallery.json is read again when it changes
        self._coverage: tuple[int, Any, dict, ChecklistCoverage | None] | None = None
        self._countries: tuple[int, dict[str, frozenset[str]]] | None = None  # (taxa version, recorded_countries)
        self._since: tuple[int, LinearProbe | None, ReferencesSince | None] | None = None  # (version, probe, it)

    def __repr__(self) -> str:
        """One short line: the gallery (:meth:`Gallery.__repr__`), the probe's species count or none."""
        probe = self.probe
        return (f"Identifier({self.gallery!r}, probe: {f'{len(probe.species)} species' if probe else 'none'}, "
                f"k={self.config.k})")

    # ------------------------------------------------------- probe, settings, text prior
    def _calibrated(self, probe: LinearProbe | None, text_prior: TextPriorScores | None) -> Calibrated:
        """The state for ``probe`` and ``text_prior``: the caller's vote settings and weight, else the probe's."""
        config = self._given_config
        if config is None and probe is not None:
            s = probe.calibration
            config = VoteConfig(k=s.k, temperature=s.temperature, unknown_threshold=s.unknown_threshold)
        weight = self._given_weight
        if weight is None:
            weight = probe.calibration.blend_weight if probe is not None else 0.0
        return Calibrated(probe, config or VoteConfig(), weight, text_prior)

    def _current(self) -> Calibrated:
        return getattr(self._pinned_state, "state", None) or self._state

    @property
    def probe(self) -> LinearProbe | None:
        """The gallery's probe (None without one)."""
        return self._current().probe

    @probe.setter
    def probe(self, value: LinearProbe | None) -> None:
        self._state = replace(self._state, probe=value)

    @property
    def config(self) -> VoteConfig:
        """The vote's k, T and unknown threshold."""
        return self._current().config

    @config.setter
    def config(self, value: VoteConfig) -> None:
        """Set the vote's settings: kept when the probe is loaded again (:meth:`follow_probe`)."""
        self._given_config = value
        self._state = replace(self._state, config=value)

    @property
    def blend_weight(self) -> float:
        """The probe's share in the blend."""
        return self._current().blend_weight

    @blend_weight.setter
    def blend_weight(self, value: float) -> None:
        """Set the probe's share: kept when the probe is loaded again (:meth:`follow_probe`)."""
        self._given_weight = value
        self._state = replace(self._state, blend_weight=value)

    @property
    def text_prior(self) -> TextPriorScores | None:
        """The zero-shot text prior (None without one)."""
        return self._current().text_prior

    @text_prior.setter
    def text_prior(self, value: TextPriorScores | None) -> None:
        """Set the text prior (None: none); the species metadata is read again at the next answer (:meth:`taxa`)."""
        self._state = replace(self._state, text_prior=value)
        self._taxa_version = -1

    def follow_probe(self, files: Sequence[str | Path], load: ProbeLoader, refresh_s: float = 1.0, *,
                     marks: tuple | None = None, sync: Callable[[bool], object] | None = None,
                     quiet: FilesQuiet | None = None) -> None:
        """Load the probe and text prior again (``load``) when one of ``files`` changes (:func:`file_marks`), looked
        at most every ``refresh_s`` seconds before an answer: a server follows ``speciesid probe train`` / ``probe
        import`` as it follows other processes' reference writes. Settings the caller gave stay. ``marks``: the
        files' marks when the current state was loaded (default: now). ``sync``: called at each look first, with
        whether the look is forced (an S3 store's shared probe taken into the files: :mod:`retrieval.probe_share`;
        a look before an answer starts it on a thread of its own, a forced one waits for it). ``quiet``: the files
        are read inside ``quiet(wait=force)``, whose value says whether they may be read now (False: that take is
        writing them: they are read at the next look, not caught half-written; ``ProbeFollower.files_quiet``)."""
        self._follow = ([Path(f) for f in files], load, refresh_s)
        self._sync = sync
        self._quiet = quiet
        self._probe_files = file_marks(self._follow[0]) if marks is None else marks
        self._probe_checked = time.monotonic()

    def refresh_probe(self, *, force: bool = False) -> bool:
        """Swap in the probe files' new state when they changed (see :meth:`follow_probe`; ``force``: look now).
        Returns whether it did. Files caught half-written, or refused, leave the current state in place."""
        if self._follow is None:
            return False
        files, load, refresh_s = self._follow
        if not force and time.monotonic() - self._probe_checked < refresh_s:
            return False
        if not self._reload_lock.acquire(blocking=force):  # another thread is at it: answer with the state we have
            return False
        try:
            self._probe_checked = time.monotonic()
            if self._sync is not None:
                self._sync(force)  # logs its own failures: the files then stay as they are
            with self._quiet(wait=force) if self._quiet is not None else contextlib.nullcontext(True) as quiet:
                if not quiet:  # this process's take is writing them: read whole at the next look
                    return False
                marks = file_marks(files)
                if marks == self._probe_files:
                    return False
                self._probe_files = marks  # a failed load is warned once: the write it caught half-done changes them
                try:
                    probe, text = load()  # ValueError for files of two saves (LinearProbe.load)
                except (OSError, ValueError, KeyError) as exc:  # mid-write, or another encoder's: looked at later
                    logger.warning("the probe files of %s changed but cannot be loaded (%s): answering with the "
                                   "ones loaded before", self.gallery.root, exc)
                    return False
            self._state = self._calibrated(probe, text)
            with self._whitened_lock:  # the vote's metric comes with the probe
                self._whitening, self._whitening_version, self._whitening_probe = None, -1, None
                self._whitened.clear()
            self._taxa_version = -1
            logger.info("probe of %s loaded again: %s", self.gallery.root,
                        describe_probe(probe) if probe is not None else "none (the blend is the kNN vote alone)")
            return True
        finally:
            self._reload_lock.release()

    @contextlib.contextmanager
    def _pinned(self) -> Iterator[Calibrated]:
        """One answer's state: the probe files looked at first, then the state kept for this thread until done."""
        outer = getattr(self._pinned_state, "state", None)
        if outer is None:
            self.refresh_probe()
            self._pinned_state.state = self._state
        try:
            yield self._pinned_state.state
        finally:
            if outer is None:
                self._pinned_state.state = None

    # ----------------------------------------------------------------- taxonomy
    def taxa(self) -> dict[str, SpeciesSummary]:
        """Species metadata of the gallery (and the text prior's photo-less species), cached per version of the
        rows the index serves (``Gallery.version``: this process's writes at once, other processes' when a search
        refreshes; no store round trip per answer)."""
        version = self.gallery.version
        if version != self._taxa_version:
            taxa = dict(self.text_prior.taxa) if self.text_prior else {}
            held = self.gallery.species()
            taxa.update({s.species: s for s in held})
            self._held = frozenset(s.species for s in held if s.count > 0)
            self._taxa, self._taxa_version = taxa, version
            self._venomous = tuple(t for t in taxa.values() if t.venomous)
        return self._taxa

    def recorded_countries(self) -> dict[str, frozenset[str]]:
        """species -> the countries (as stored: codes or names) the gallery's searchable reference photos were
        taken in, from a dataset's ``country`` column (``--dataset manifest``, ``snakeclef2021``); {} when none is
        recorded. Read once per :meth:`taxa` version, and only when asked (a ``--country``)."""
        self.taxa()
        kept = self._countries
        if kept is None or kept[0] != self._taxa_version:
            kept = (self._taxa_version, self.gallery.store.species_countries())
            self._countries = kept
        return kept[1]

    def references_since(self) -> ReferencesSince | None:
        """How the gallery's searchable references moved since its probe was trained
        (:func:`retrieval.probe.references_since`), computed once per gallery version and probe, never per answer;
        None without a probe, or for one not trained on this gallery."""
        version, probe = self.gallery.version, self.probe
        kept = self._since
        if kept is None or kept[0] != version or kept[1] is not probe:
            kept = (version, probe, references_since(probe, self.gallery.index.ids) if probe is not None else None)
            self._since = kept
        return kept[2]

    def _probe_older_than(self, reference: int) -> bool:
        """Whether the probe was trained before ``reference`` was added (the stale-probe note is on): from the ids it
        recorded, else (an older probe.json) whenever the gallery moved since it was trained."""
        since = self.references_since()
        if since is None or not since.stale:
            return False
        ids = self.probe.reference_ids if self.probe is not None else None
        return ids is None or not bool((ids == reference).any())  # one scan: only answers with a near-copy ask

    def stale_probe_note(self, *, api: bool = False) -> str:
        """The note every answer carries while the probe is older than the gallery (:meth:`references_since`), ""
        otherwise; ``api``: worded for an HTTP client."""
        since = self.references_since()
        return since.note(api=api, root=self.gallery.root) if since is not None else ""

    def held_species(self) -> frozenset[str]:
        """The species the gallery holds searchable references of (cached as :meth:`taxa` is)."""
        self.taxa()
        return self._held

    def one_species(self) -> str | None:
        """The one species the gallery can name, when it holds photos of one species only (and its text prior, if
        any, names no other): it cannot tell species apart (:func:`retrieval.advice.one_species_note`); None
        otherwise. Cached as :meth:`taxa` is."""
        held = self.held_species()
        prior = self.text_prior
        if len(held) != 1 or (prior is not None and set(prior.species) - held):
            return None
        return next(iter(held))

    def venom_applies(self) -> bool:
        """Whether venom advice applies to the gallery (:func:`retrieval.advice.venom_applies`): on unless its
        ``gallery.json`` records it off (read again when it changes), and on while a species is recorded venomous
        (the species read, cached as :meth:`taxa` is, only for a gallery recorded off): the page words itself by it
        (``/readyz``)."""
        return venom_applies(self.gallery.info, self._venomous_taxa())

    def _venomous_taxa(self) -> Iterator[SpeciesSummary]:
        """The species recorded venomous (:meth:`taxa`, read only when iterated: a gallery recorded on never
        reads them for :func:`retrieval.advice.venom_applies`)."""
        self.taxa()
        yield from self._venomous

    def checklist_coverage(self) -> ChecklistCoverage | None:
        """Which species of the checklist the gallery was built from it can name (:func:`retrieval.advice.
        checklist_coverage`: photos, or the text prior), None for a gallery of no checklist; cached per
        :meth:`taxa` version, text prior and gallery record (no file read per answer)."""
        held, prior, info = self.held_species(), self.text_prior, self.gallery.info
        kept = self._coverage
        if kept is None or kept[0] != self._taxa_version or kept[1] is not prior or kept[2] is not info:
            kept = (self._taxa_version, prior, info, checklist_coverage(info, held, prior.species if prior else ()))
            self._coverage = kept
        return kept[3]

    # ------------------------------------------------------------------ answers
    def identify_images(self, images: Sequence[Image.Image | np.ndarray], **kw: Any) -> list[Identification]:
        """One answer per image: PIL images (RGB, L, RGBA), or H x W x 3 uint8 arrays (RGB pixels); ``kw``: as
        :meth:`identify_embeddings`'s. Photo files and bytes: :func:`retrieval.workflows.identify`, which checks and
        reads them (and rolls the answers up by rank)."""
        if isinstance(images, (Image.Image, np.ndarray)):
            raise ValueError("images is a list, even for one image: pass [image]")
        images = [_pil_image(im, i) for i, im in enumerate(images)]
        return self.identify_embeddings(self.encoder.encode_images(images), **kw)

    def identify_embeddings(
        self,
        embeddings: np.ndarray,
        *,
        top: int = 5,
        method: Method | str = Method.BLEND,
        presence: Mapping[str, bool] | None = None,
    ) -> list[Identification]:
        """One answer per embedding row, each row scaled to unit length first (:func:`retrieval.metric.unit_queries`:
        ValueError for a row all zeros or not finite). ``presence``: species -> present in the photo's country."""
        emb = unit_queries(embeddings, self.gallery.dim)
        with self._pinned():
            neighbours, nearest = self._neighbours(emb)
            return [
                self.answer(ns, emb[i], top=top, method=method, presence=presence, nearest=float(nearest[i]))
                for i, ns in enumerate(neighbours)
            ]

    def identify_observation(
        self,
        embeddings: np.ndarray,
        *,
        top: int = 5,
        method: Method | str = Method.BLEND,
        presence: Mapping[str, bool] | None = None,
    ) -> Identification:
        """Several photos of one animal -> one answer: neighbours vote together, the probe sees the mean.

        Photos unlike every reference (``far``: a blank frame, a thumbnail) are set aside while another photo is
        not: they carry nothing about the animal. The evidence lists each reference once. Each row is scaled to unit
        length first, as :meth:`identify_embeddings` does; ValueError for no row."""
        emb = unit_queries(embeddings, self.gallery.dim)
        if not len(emb):
            raise ValueError("identify_observation needs at least one embedding (one row per photo of the animal), "
                             "got 0 rows")
        with self._pinned():
            per_photo, nearest = self._neighbours(emb)
            limit = self.far_threshold()
            aside: list[int] = []
            if limit is not None and (nearest >= limit).any():
                keep = np.flatnonzero(nearest >= limit)
                aside = [int(i) for i in np.flatnonzero(nearest < limit)]
                emb, nearest, per_photo = emb[keep], nearest[keep], [per_photo[i] for i in keep]
            merged = sorted((n for ns in per_photo for n in ns), key=lambda n: -n.similarity)
            mean = l2_normalize(emb.mean(axis=0))
            answer = self.answer(merged, mean, top=top, method=method, presence=presence,
                                 nearest=float(nearest.max()))
        answer.set_aside = aside
        unique: dict[int, Neighbour] = {}
        for n in merged:  # best first: a reference two photos found is listed once, at its best similarity
            unique.setdefault(n.id, n)
        answer.neighbours = list(unique.values())
        return answer

    def search(self, embeddings: np.ndarray, k: int) -> list[list[Neighbour]]:
        """Raw neighbours of each embedding, which is used as given (:meth:`index.gallery.Gallery.search`): not scaled
        nor checked, so ``similarity`` is the inner product, a cosine only for unit-length rows (a zero row is 0.0 to
        every reference). :func:`retrieval.metric.unit_queries` scales rows as :meth:`identify_embeddings` does."""
        return self.gallery.search(embeddings, k)

    def voting_neighbours(self, embeddings: np.ndarray) -> list[list[Neighbour]]:
        """The ``config.k`` references that vote for each embedding, under the probe's metric (module docstring)."""
        with self._pinned():
            return self._neighbours(embeddings)[0]

    def _neighbours(self, embeddings: np.ndarray) -> tuple[list[list[Neighbour]], np.ndarray]:
        """(the voting neighbours, each embedding's cosine to its nearest reference: -inf when the gallery is empty)."""
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))

        def cosine_vote() -> tuple[list[list[Neighbour]], np.ndarray]:
            found = self.gallery.search(emb, self.config.k)
            return found, np.array([ns[0].similarity if ns else -np.inf for ns in found], dtype=np.float64)

        if not self._votes_whitened():
            return cosine_vote()
        cos, found = self.gallery.nearest(emb, max(self.config.k, RERANK_CANDIDATES))  # sees other writers first
        nearest = np.where(found[:, 0] >= 0, cos[:, 0], -np.inf).astype(np.float64)
        self.gallery.expect_answers(len(found))  # as Gallery.search does: many answers read the metadata in one scan
        wh = self.whitening()
        if wh is None:  # too few photos a species to fit one (rare): the cosine vote
            return cosine_vote()
        out = []
        with _blas().limit(limits=1, user_api="blas"):  # small products: BLAS threads would only fight the encoder's
            for z, row, cos_row in zip(wh.apply(emb), found, cos, strict=True):
                valid = row >= 0
                ids, cosines = [int(i) for i in row[valid]], cos_row[valid]
                sims = self._whitened_refs(ids, wh) @ z
                order = np.argsort(-sims, kind="stable")[: self.config.k]
                out.append(self.gallery.neighbours([ids[j] for j in order], sims[order].tolist(),
                                                   [float(cosines[j]) for j in order]))
        return out, nearest

    def far_threshold(self) -> float | None:
        """:func:`far_threshold` of the gallery, estimated again when its size has moved by more than 10%; the first
        one of a process is the one its folder keeps when made for the same index (:func:`saved_far_threshold`)."""
        size = self.gallery.index.ntotal  # no copy of the ids: this runs on every answer
        if self._far is None or abs(size - self._far[0]) > 0.1 * max(self._far[0], 1):
            self._far = (size, saved_far_threshold(self.gallery))
        return self._far[1]

    def _whitened_refs(self, ids: list[int], wh: Whitening) -> np.ndarray:
        """Whitened vectors of references ``ids`` (len(ids), d), computed once per reference and whitening."""
        if not ids:
            return np.zeros((0, self.gallery.dim), dtype=np.float32)
        with self._whitened_lock:
            if wh is not self._whitening:  # refitted meanwhile by another thread: this request's own, uncached
                return wh.apply(self.gallery.reference_vectors(ids))
            missing = [i for i in dict.fromkeys(ids) if i not in self._whitened]
            if missing:
                if len(self._whitened) + len(missing) > WHITENED_CACHE_ROWS:
                    self._whitened.clear()
                vectors = wh.apply(self.gallery.reference_vectors(missing))
                self._whitened.update(zip(missing, vectors, strict=True))
            return np.stack([self._whitened[i] for i in ids])

    def _note_once(self, what: str) -> bool:
        """Whether warning ``what`` is due: once per gallery version and probe (the object, whose id could be
        reused by a later one)."""
        version, probe = self.gallery.version, self.probe
        noted = self._probe_noted.get(what)
        if noted is not None and noted[0] == version and noted[1] is probe:
            return False
        self._probe_noted[what] = (version, probe)
        return True

    def _votes_whitened(self) -> bool:
        return self.probe is not None and self.probe.calibration.metric == "whitened"

    def whitening(self) -> Whitening | None:
        """The vote's whitening when the probe's calibration chose that metric (else None): the probe's own while
        it still fits the gallery (:meth:`Whitening.fits`), else fitted again on the gallery's rows."""
        if not self._votes_whitened():
            return None
        probe = self.probe  # this answer's (pinned) probe: the whitening comes with it
        version = self.gallery.version  # the rows the index serves (a search refreshes it): no store round trip
        if version != self._whitening_version or probe is not self._whitening_probe:
            kept = self._whitening if probe is self._whitening_probe else None

            def candidates() -> Iterator[Whitening | None]:
                yield kept or probe.whitening
                yield _saved_whitening(self.gallery, probe.fingerprint)  # a writer may have saved one that fits

            current = fitted_whitening(self.gallery, candidates())
            if probe is not self._state.probe:  # an answer begun before the probe was loaded again: its own, uncached
                return current
            with self._whitened_lock:
                if current is not self._whitening:
                    self._whitened.clear()
                self._whitening, self._whitening_version, self._whitening_probe = current, version, probe
        return self._whitening

    def species_scores(
        self, neighbours: list[Neighbour], embedding: np.ndarray | None, method: Method | str = Method.BLEND
    ) -> dict[str, float]:
        """Species probabilities from the chosen sources (before any country reweighting)."""
        method = parse_method(method)
        knn = knn_vote(neighbours, self.config.temperature)
        if method is Method.KNN or embedding is None:
            return knn
        if self.probe is None:
            if method is Method.PROBE:
                raise ValueError(self._no_probe())
            scores = knn
        else:
            probe = self._held_only(self.probe.scores(embedding[None])[0], method)
            if method is Method.PROBE:
                return dict(sorted(probe.items(), key=lambda kv: -kv[1]))
            scores = blend_knn_probe(knn, probe, self.blend_weight)
        if self.text_prior is not None:
            counts = [s.count for s in self.taxa().values() if s.count > 0]
            lam = text_weight(float(np.median(counts)) if counts else 0.0, self.text_prior.strength)
            scores = mix_text_prior(scores, self.text_prior.scores(embedding[None])[0], lam)
        return scores

    def _no_probe(self) -> str:
        """Why ``method="probe"`` has no probe to answer with, and what to do: train one, or, when the gallery's
        folder holds one now (trained or imported after this Identifier was opened, or opened without its probe),
        open the gallery again."""
        root = self.gallery.root
        if has_probe(root):
            return (f"this Identifier has no probe, but gallery {root} has one now (trained or imported after it was "
                    f"opened, or opened without it): open it again with open_identifier('{root}'), or open it with "
                    "follow_probe=True to take up each new probe as it is saved")
        return (f"no probe for this gallery: train one with 'speciesid probe train --index {root}' (from Python: "
                f"train_gallery_probe('{root}')), or use method knn")

    def _held_only(self, probe: dict[str, float], method: Method) -> dict[str, float]:
        """The probe's probabilities over the species the gallery holds now, renormalised: a species whose
        references were all deleted (or renamed away) is no answer, and has no evidence to show. Says once per
        gallery version (and probe) when the probe names species the gallery no longer holds, and, for ``--method
        probe``, the gallery's species it cannot name."""
        held = self.held_species()
        kept = {s: p for s, p in probe.items() if s in held}
        if self._note_once("gone"):
            gone = sorted(s for s in probe if s not in held)
            if gone:
                logger.warning("the probe of %s names %d species the gallery no longer holds (%s): they are left "
                               "out of its answers; retrain: speciesid probe train --index %s", self.gallery.root,
                               len(gone), first_few(gone), self.gallery.root)
        if method is Method.PROBE and self._note_once("unknown"):
            unknown = sorted(held - probe.keys())
            if unknown:
                logger.warning("the probe of %s cannot name %d of the gallery's species (%s: added since it was "
                               "trained, or left out of its training); --method blend or knn answers them; "
                               "retrain: speciesid probe train --index %s", self.gallery.root, len(unknown),
                               first_few(unknown), self.gallery.root)
        total = sum(kept.values())
        if len(kept) == len(probe) or total <= 0.0:
            return kept if total > 0.0 else {}
        return {s: p / total for s, p in kept.items()}

    def answer(
        self,
        neighbours: list[Neighbour],
        embedding: np.ndarray | None = None,
        *,
        top: int = 5,
        method: Method | str = Method.BLEND,
        presence: Mapping[str, bool] | None = None,
        nearest: float | None = None,
    ) -> Identification:
        """Score species and dress the result with taxonomy; ``nearest`` (the cosine of the nearest reference) marks
        a photo unlike every reference as ``far`` and ``unknown``."""
        seen = self.species_scores(neighbours, embedding, method)  # what the photo alone says
        scores = apply_country(seen, presence) if presence is not None else seen
        scores = {s: p for s, p in scores.items() if p > 0.0}
        taxa = self.taxa()
        for n in neighbours:  # species of neighbours are always in the gallery, but be safe
            taxa.setdefault(
                n.species, SpeciesSummary(n.species, n.genus, n.family, n.common_name, n.venomous, 0)
            )

        def info(s: str) -> SpeciesSummary:
            return taxa.get(s) or SpeciesSummary(s, s.split(" ")[0], None, None, None, 0)

        predictions = [
            Prediction(
                species=s,
                score=float(p),
                common_name=info(s).common_name,
                genus=info(s).genus,
                family=info(s).family,
                venomous=info(s).venomous,
            )
            for s, p in top_k(scores, top)
        ]
        # the country reorders candidates, but never makes an answer surer, nor a bite safer, than the photo does
        best = min(predictions[0].score if predictions else 0.0, max(seen.values(), default=0.0))
        views = (scores,) if presence is None else (scores, seen)
        flags = {s: info(s).venomous for s in seen}  # scores' species are seen's
        venom = [v for v in (venomous_probability(d, flags) for d in views) if v is not None]
        # recorded off (birds): no venom advice at all, unless a species is recorded venomous (a neighbour the taxa
        # lack, another writer's, at once); on, a species of no recorded status counts as unrecorded, whatever the
        # rest of the gallery records
        applies = venom_applies(self.gallery.info, itertools.chain(self._venomous_taxa(), neighbours))
        limit = self.far_threshold() if nearest is not None else None
        far = limit is not None and nearest < limit
        candidates = [presence.get(s) for s, p in seen.items() if p > 0] if presence is not None else []
        unknown = best < self.config.unknown_threshold or not predictions or far
        copy = None if far or Method(method) is Method.PROBE else near_copy_note(
            neighbours, predictions[0].species if predictions else None, self._probe_older_than)
        venomous_score = None if far or not venom else max(venom)  # far: the scores say nothing of this photo
        # species of unrecorded status, whatever their names (a toad's counts until set-venom records it harmless)
        unflagged = 0.0 if far or not applies else max(unrecorded_share(d, flags) for d in views)
        named = [p.common_name or p.species for p in predictions if p.venomous and p.score >= VENOM_WARN_AT]
        unrecorded = [p.common_name or p.species for p in predictions if p.venomous is None and p.score >= 0.01]
        return Identification(
            predictions=predictions,
            neighbours=neighbours,
            unknown=unknown,
            far=far,
            nearest=nearest if nearest is not None and np.isfinite(nearest) else None,
            scores=scores,
            genus_scores=rollup(scores, {s: rank_genus(s, info(s).genus) for s in scores}, Rank.GENUS),
            family_scores=rollup(scores, {s: info(s).family for s in scores}, Rank.FAMILY),
            venomous_score=venomous_score,
            venom_unknown_score=unflagged,
            # the country changed the scores only when some candidate is recorded there and some is not
            country_applied=None if presence is None else (False in candidates
                                                           and any(c is not False for c in candidates)),
            country_covered=None if presence is None else any(c is not None for c in candidates),
            venom_advice=venom_advice(unknown=unknown, far=far, venomous_score=venomous_score,
                                      venom_unknown_score=unflagged, venomous_names=named,
                                      unrecorded_names=unrecorded[:3], applies=applies,
                                      one_species=self.one_species()),
            venom_applies=applies,
            near_copy=copy.reference if copy is not None else None,
            notes=[copy.note] if copy is not None else [],
        )


def _pil_image(image: object, i: int) -> Image.Image:
    """``images[i]`` of :meth:`Identifier.identify_images` as a PIL image (an H x W x 3 uint8 array: its pixels);
    TypeError saying what to pass otherwise."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8:
            return Image.fromarray(image)
        raise TypeError(f"images[{i}] is an array of shape {list(image.shape)} and dtype {image.dtype}: "
                        "pass H x W x 3 uint8 RGB pixels (np.asarray(pil_image.convert('RGB'))), or a PIL image")
    raise TypeError(f"images[{i}] is a {type(image).__name__}: pass PIL images or H x W x 3 uint8 arrays; for photo "
                    "files or bytes use retrieval.workflows.identify(ident, [path])")


def file_marks(files: Sequence[Path]) -> tuple:
    """What says a file changed: (inode, mtime_ns, size) of each (None when missing)."""
    marks = []
    for f in files:
        try:
            st = f.stat()
            marks.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            marks.append(None)
    return tuple(marks)


def _saved_whitening(gallery: Gallery, fingerprint: str) -> Whitening | None:
    """The whitening saved with the gallery's probe (``retrieval.probe_flows.refresh_gallery_metric``), if any."""
    if not has_probe(gallery.root):
        return None
    try:
        return LinearProbe.load(gallery.root, expected_fingerprint=fingerprint).whitening
    except (OSError, ValueError, KeyError) as exc:  # being replaced, or another encoder's: refit instead
        logger.info("saved whitening not used: %s", exc)
        return None


def gallery_whitening(gallery: Gallery, shrink: float = DEFAULT_SHRINK, *, save_stats: bool = False) -> Whitening:
    """The within-class whitening of a gallery's searchable photos, fitted from its statistics: the saved ones
    brought up to date by difference, else streamed from the store (``retrieval.whitening_sync``). ``save_stats``:
    write the statistics back (a writer, under the gallery's write lock)."""
    return gallery_stats(gallery, save=save_stats).stats.fit(shrink)


def fitted_whitening(gallery: Gallery, candidates: Iterable[Whitening | None], *,
                     save_stats: bool = False) -> Whitening | None:
    """The first of ``candidates`` (looked at lazily) that still fits the gallery (:meth:`Whitening.fits`), else one
    fitted again from the gallery's statistics (with the candidates' shrinkage; ``save_stats`` as in
    :func:`gallery_whitening`); None, logged, when the gallery has nothing to fit it on (e.g. every species down to
    one photo): the vote then runs on cosine."""
    counts = {s.species: s.count for s in gallery.species() if s.count > 0}
    shrink = None
    for wh in candidates:
        if wh is not None:
            if wh.fits(counts):
                return wh
            shrink = shrink or wh.shrink
    try:
        fresh = gallery_whitening(gallery, shrink or DEFAULT_SHRINK, save_stats=save_stats)
    except ValueError as exc:
        logger.warning("kNN vote on cosine: cannot fit the whitening on this gallery (%s)", exc)
        return None
    logger.info("kNN whitening fitted again on the gallery's %d photos of %d species", fresh.photos,
                len(fresh.species))
    return fresh


@dataclass
class RankedResult:
    """One ranked candidate: a species, or a genus / family with its summed score, and its evidence."""

    name: str  # species binomial, genus or family name
    rank: str  # "species", "genus" or "family"
    score: float  # probability in [0, 1]
    species: str | None = None  # the binomial (species rank only)
    common_name: str | None = None  # English common name (species rank only)
    genus: str | None = None  # genus name (species and genus rank)
    family: str | None = None  # family name (when all members agree)
    venomous: bool | None = None  # medically important venomous; for a group: any member
    neighbours: list[Neighbour] = field(default_factory=list)  # the reference photos behind it

    def to_dict(self, *, neighbours: bool = True) -> dict[str, object]:
        """JSON-ready dict (evidence optional)."""
        d = asdict(self)
        d["neighbours"] = [n.to_dict() for n in self.neighbours] if neighbours else []
        return d


def ranked_results(
    answer: Identification, rank: Rank, top: int, taxa: Mapping[str, SpeciesSummary]
) -> list[RankedResult]:
    """The ``top`` candidates of an answer at ``rank``: species predictions, or genus/family scores rolled
    up from them, each with the neighbours (evidence) of its species."""
    if rank is Rank.SPECIES:
        return [
            RankedResult(p.species, rank.value, p.score, p.species, p.common_name, p.genus, p.family, p.venomous,
                         [n for n in answer.neighbours if n.species == p.species])
            for p in answer.predictions[:top]
        ]
    def group(species: str, genus: str | None, family: str | None) -> str | None:
        """What ``species`` is summed under at ``rank`` (a label, no scientific name, is its own genus)."""
        return rank_genus(species, genus) if rank is Rank.GENUS else family

    out = []
    for name, score in list(answer.at_rank(rank).items())[:top]:
        members = [s for s in answer.scores if s in taxa and group(s, taxa[s].genus, taxa[s].family) == name]
        flags = [taxa[s].venomous for s in members]
        family = {taxa[s].family for s in members} if rank is Rank.GENUS else {name}
        label = rank is Rank.GENUS and members == [name] and taxa[name].genus != name  # a label, answered as itself
        out.append(RankedResult(
            name, rank.value, score, name if label else None, None,
            genus=name if rank is Rank.GENUS and not label else None,
            family=next(iter(family)) if len(family) == 1 else None,
            venomous=True if any(flags) else (False if flags and all(f is False for f in flags) else None),
            neighbours=[n for n in answer.neighbours if group(n.species, n.genus, n.family) == name],
        ))
    return out
