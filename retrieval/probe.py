"""Linear probe: class-balanced multinomial logistic regression on gallery embeddings, and its calibration.

Stored beside the gallery as ``probe.npz`` (weights) + ``probe.json`` (species, encoder fingerprint,
the :class:`Calibration` chosen by measurement, the weights' sha256; file names in :mod:`index.layout`). The
probe a new one replaces is kept beside it, one generation (:func:`keep_previous`, :func:`restore_previous`, a swap
that a crash cannot lose either probe of: :func:`finish_interrupted_swap`). The probe is the closed-world half of
the blend: it only knows the species it was trained on, and ``retrieval.blend`` keeps it from touching any other. A fine-tuned network's head is a probe too (``finetune.export``).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from scipy.special import logsumexp, softmax

from index.atomic import atomic_write, fsync_dir, write_json_atomic
from index.formats import PROBE_FORMAT, WRITTEN_BY, check_format, from_dict, jsonable, speciesid_version
from index.layout import (
    PROBE_META,
    PROBE_PREV_META,
    PROBE_PREV_WEIGHTS,
    PROBE_SWAP_META,
    PROBE_SWAP_WEIGHTS,
    PROBE_WEIGHTS,
    check_encoder,
)
from index.photos import first_few
from index.vectors import in_sorted, sorted_unique
from retrieval.metric import DEFAULT_SHRINK, Whitening

logger = logging.getLogger(__name__)

#: The distinct reference photos (not near-copies of each other, cosine < :data:`DUPLICATE_COSINE`) a species needs
#: to be in the probe's cross-validation: one held out, one kept. Here, not in calibrate (sklearn), so that an add's
#: notes read it without loading sklearn.
MIN_PROBE_PHOTOS = 2
#: Cosine at or above which two reference photos are near-copies of one: one photo for cross-validation's folds and
#: for :data:`MIN_PROBE_PHOTOS` (:func:`photo_groups`).
DUPLICATE_COSINE = 0.95


def photo_groups(x: np.ndarray, *, progress: bool = False) -> np.ndarray:
    """(N,) group of each embedding of ``x``, the near-copies of one photo in one group: ``index.pairs.copy_groups``
    at :data:`DUPLICATE_COSINE` (the groups ``probe train``'s cross-validation keeps in one fold). ``progress``: a
    bar over its similarity tiles (all n² pairs)."""
    from index.pairs import copy_groups

    return copy_groups(x, threshold=DUPLICATE_COSINE, progress=progress)


def distinct_photos(groups: np.ndarray, y: np.ndarray) -> dict[Any, int]:
    """The distinct photos of each label of ``y`` (near-copies counted once): the :func:`photo_groups` ``groups``
    among its rows. A species with fewer than :data:`MIN_PROBE_PHOTOS` is left out of ``probe train``."""
    y = np.asarray(y)
    return {c: len(np.unique(groups[y == c])) for c in np.unique(y)}


def distinct_count(x: np.ndarray) -> int:
    """The distinct photos among the embeddings ``x`` of one species (near-copies counted once, by
    :func:`photo_groups`): what :func:`distinct_photos` gives that species."""
    return len(np.unique(photo_groups(np.asarray(x, dtype=np.float32)))) if len(x) else 0


@dataclass
class Calibration:
    """The gallery's calibration: how kNN and probe are blended and when to answer "unknown".

    Chosen by measurement (cross-validation over the gallery, or validation photos; see
    ``retrieval.calibrate``) and recorded with the probe.
    """

    C: float = 10.0  # inverse L2 regularisation strength of the logistic regression
    blend_weight: float = 0.5  # share of the probe in the blend (0 = kNN only, 1 = probe only)
    k: int = 30  # neighbours that vote in the blend's kNN part
    temperature: float = 0.03  # kNN vote temperature
    unknown_threshold: float = 0.5  # best blended score under this -> unknown
    selected_on: str = "default"  # "cv:N-fold", "val:PATH" or "default": where these values come from
    metrics: dict[str, float] = field(default_factory=dict)  # validation figures of kNN / probe / blend
    rule: str = ""  # how the settings were chosen: "seq-nll", "argmax" ("" = not recorded: older files, defaults)
    metric: str = "cosine"  # the kNN vote's metric: "cosine" or "whitened" (retrieval.metric; fitted with the probe)
    weight_fixed: str = ""  # why the blend weight was fixed rather than chosen, in words ("" = chosen by the rule)
    selection_sha256: list[str] = field(default_factory=list)  # the validation photos that chose ([]: none, or older)
    # gallery species with too few distinct photos to cross-validate -> their photo counts: left out of the choice
    # (and of a probe trained here); the kNN vote alone answers them
    left_out: dict[str, int] = field(default_factory=dict)


@dataclass
class LinearProbe:
    """A trained probe: logits = embeddings @ weight.T + bias over ``species``."""

    species: list[str]  # the classes, in column order
    weight: np.ndarray  # (n_species, dim) float32
    bias: np.ndarray  # (n_species,) float32
    fingerprint: str  # encoder fingerprint of the embeddings it was trained on
    calibration: Calibration = field(default_factory=Calibration)  # blend settings chosen for this gallery
    # reference photos given to train_probe (the ones it trained on, unless it subsampled them:
    # calibration.metrics['probe_photos']); the staleness check compares it with the gallery
    trained_on: int = 0
    source: str | None = None  # where the weights come from: None = logistic regression, 'finetune:DIR' = a fine-tuned head
    whitening: Whitening | None = None  # the kNN vote's whitened metric when calibration.metric == "whitened"
    made_at: str = ""  # when `probe train` / `probe import` made it (ISO 8601, UTC); "" = not recorded
    weights_sha256: str = ""  # the sha256 of its probe.npz as saved or loaded; "" = not saved yet
    # the sha256 of the text_prior.json `probe train` wrote before it ("" = none); None = not recorded (imported,
    # older files): retrieval.textprior.load_text_prior ignores a prior of another digest
    text_prior_sha256: str | None = None
    written_by: str = ""  # the speciesid version that saved it (probe.json's written_by); "" = before 0.2.0
    # the gallery's searchable reference ids when `probe train` made it (sorted int64, kept in probe.npz); None: not
    # recorded (imported heads, older files): what :func:`references_since` compares the gallery with
    reference_ids: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Embedding width."""
        return int(self.weight.shape[1])

    def __repr__(self) -> str:
        """One short line (the weights, whitening and selection digests left out: print them by name)."""
        c = self.calibration
        return (f"LinearProbe({len(self.species)} species, dim {self.dim}, trained_on={self.trained_on}, "
                f"source={self.source or 'logistic regression'}, k={c.k}, temperature={c.temperature}, "
                f"blend_weight={c.blend_weight}, unknown_threshold={c.unknown_threshold}, metric={c.metric}, "
                f"selected_on={c.selected_on!r}, made_at={self.made_at!r})")

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) -> (N, n_species) raw scores."""
        emb = np.atleast_2d(np.asarray(embeddings, dtype=np.float32))
        if emb.shape[1] != self.dim:
            raise ValueError(f"probe expects {self.dim}-d embeddings, got {emb.shape[1]}-d")
        return emb @ self.weight.T + self.bias

    def predict_proba(self, embeddings: np.ndarray) -> np.ndarray:
        """(N, dim) -> (N, n_species) probabilities (softmax); ValueError for a row that is not finite."""
        with np.errstate(invalid="ignore", over="ignore"):  # said below, naming the rows
            z = self.logits(embeddings)
        bad = ~np.isfinite(z).all(axis=1)  # a NaN or inf row has a score that is not finite: (N, species), cheap
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(f"embeddings must be finite: row{'s' if rows.size > 1 else ''} "
                             f"{', '.join(map(str, rows[:10].tolist()))}{' ...' if rows.size > 10 else ''} "
                             f"{'hold' if rows.size > 1 else 'holds'} NaN or inf (or values too large to score)")
        return softmax(z, axis=1)

    def scores(self, embeddings: np.ndarray) -> list[dict[str, float]]:
        """Per embedding: species -> probability."""
        return [dict(zip(self.species, row.tolist(), strict=True)) for row in self.predict_proba(embeddings)]

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path) -> None:
        """Write probe.npz + probe.json atomically into ``folder`` (a gallery or a fine-tuned model folder)."""
        folder = Path(folder)
        buf = io.BytesIO()
        arrays = {"weight": self.weight.astype(np.float32), "bias": self.bias.astype(np.float32)}
        if self.whitening is not None:
            arrays.update(whiten_mean=self.whitening.mean, whiten_matrix=self.whitening.matrix)
        if self.reference_ids is not None:
            arrays["reference_ids"] = np.asarray(self.reference_ids, dtype=np.int64)
        np.savez(buf, **arrays)
        weights = buf.getvalue()
        self.weights_sha256 = hashlib.sha256(weights).hexdigest()
        self.written_by = speciesid_version()
        meta = {
            "format": PROBE_FORMAT,
            WRITTEN_BY: self.written_by,
            "species": self.species,
            "fingerprint": self.fingerprint,
            "dim": self.dim,
            "trained_on": self.trained_on,
            "source": self.source,
            "made_at": self.made_at,
            "weights_sha256": self.weights_sha256,  # the pair's bond (load checks it)
            **({} if self.text_prior_sha256 is None else {"text_prior_sha256": self.text_prior_sha256}),
            "settings": jsonable(asdict(self.calibration)),  # a figure not measured (NaN) as null: strict JSON
            "whitening": None if self.whitening is None else {
                "shrink": self.whitening.shrink, "photos": self.whitening.photos,
                "species": list(self.whitening.species)},
        }
        _write_pair(folder, meta, weights, PROBE_META, PROBE_WEIGHTS)  # the weights first: see there

    @classmethod
    def load(cls, folder: str | Path, *, expected_fingerprint: str | None = None) -> LinearProbe:
        """Load a probe; refuse one trained on another encoder's embeddings (EncoderMismatchError)."""
        folder = Path(folder)
        meta_path = folder / PROBE_META
        if not meta_path.is_file():
            raise FileNotFoundError(f"no probe in {folder}; train one with 'speciesid probe train --index {folder}'")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        check_format(meta_path, meta.get("format"), PROBE_FORMAT,
                     older=f"train it again with 'speciesid probe train --index {folder}'")
        if expected_fingerprint is not None:
            check_encoder(f"the probe in {folder}", meta["fingerprint"], expected_fingerprint,
                          fix=f"retrain it with 'speciesid probe train --index {folder}'")
        raw = _weights_of(folder, meta, PROBE_WEIGHTS, PROBE_META)
        digest = str(meta.get("weights_sha256") or "") or hashlib.sha256(raw).hexdigest()  # recorded: checked equal
        arrays = np.load(io.BytesIO(raw))
        if arrays["weight"].shape[0] != len(meta["species"]):  # the two files of two saves (one being replaced)
            raise ValueError(f"the probe in {folder}: its weights have {arrays['weight'].shape[0]} rows for "
                             f"{len(meta['species'])} species (being replaced?); train it again: speciesid probe "
                             f"train --index {folder}")
        whitening = None
        if "whiten_matrix" in arrays.files:
            fitted = meta.get("whitening") or {}
            whitening = Whitening(mean=arrays["whiten_mean"], matrix=arrays["whiten_matrix"],
                                  shrink=float(fitted.get("shrink", DEFAULT_SHRINK)), photos=int(fitted.get("photos", 0)),
                                  species=tuple(fitted.get("species", ())))
        return cls(
            species=list(meta["species"]),
            weight=arrays["weight"],
            bias=arrays["bias"],
            fingerprint=meta["fingerprint"],
            calibration=_calibration_of(meta, meta_path),
            trained_on=int(meta.get("trained_on", 0)),
            source=meta.get("source"),
            whitening=whitening,
            made_at=str(meta.get("made_at") or ""),
            weights_sha256=digest,
            text_prior_sha256=None if meta.get("text_prior_sha256") is None else str(meta["text_prior_sha256"]),
            written_by=str(meta.get(WRITTEN_BY) or ""),
            reference_ids=arrays["reference_ids"] if "reference_ids" in arrays.files else None,
        )

    @property
    def references_then(self) -> int:
        """The searchable references the gallery held when this probe was trained: those it trained on and those of
        the species it left out (what :func:`net_change` compares the gallery's count with)."""
        return self.trained_on + sum(self.calibration.left_out.values())

    def added_since(self, gallery: Mapping[str, int]) -> list[str]:
        """The gallery's species (species -> searchable references) this probe neither knows nor left out when it
        was made: added since, so it cannot name them."""
        known = set(self.species) | set(self.calibration.left_out)
        return sorted(s for s, n in gallery.items() if n > 0 and s not in known)

    def out_of_date(self, gallery: Mapping[str, int]) -> str:
        """In words, how the gallery (species -> searchable references now) moved on since this probe was made,
        "" when it did not: species added since (the probe cannot name them), species gone (left out of its
        answers) and, for a probe trained here, references that left or came."""
        added = self.added_since(gallery)
        parts = []
        if added:
            parts.append(f"{len(added)} species added since the probe was {'made' if self.source else 'trained'} "
                         f"({first_few(added)}): it cannot name them (the blend answers them by the kNN vote alone)")
        if not self.source:  # a fine-tuned head's species and photos are not the gallery's own
            gone = sorted(s for s in self.species if gallery.get(s, 0) <= 0)
            if gone:
                parts.append(f"{len(gone)} species it was trained on are no longer in the gallery ({first_few(gone)}): "
                             "they are left out of its answers")
            moved = net_change(self, sum(gallery.values()))
            if moved is not None and (moved.deleted or (moved.added and not added)):  # species added: said above
                parts.append(moved.moved())
        return "; ".join(parts) + (" (retrain: speciesid probe train)" if parts else "")

    def scaled(self, temperature: float) -> LinearProbe:
        """A copy whose logits are divided by ``temperature`` (same ranking, other confidence)."""
        return replace(self, weight=(self.weight / temperature).astype(np.float32),
                       bias=(self.bias / temperature).astype(np.float32))


@dataclass(frozen=True)
class ReferencesSince:
    """How the gallery's searchable references moved since its probe was trained (:func:`references_since`)."""

    added: int  # references searchable now that the probe never saw
    deleted: int  # references it was trained beside that are no longer searchable (deleted, or excluded by clean)
    exact: bool  # counted from the ids the probe recorded; False: an older probe.json, the net change of the counts
    made_at: str  # when the probe was made ("" = not recorded)

    @property
    def stale(self) -> bool:
        """Whether references came or went since the probe was trained."""
        return bool(self.added or self.deleted)

    def note(self, *, api: bool = False, root: str | Path | None = None) -> str:
        """What an answer (and ``/readyz``, ``index info``) says of it, "" when nothing moved. ``api``: worded for an
        HTTP client (the retrain runs on the server's machine); ``root``: the gallery folder the CLI names."""
        if not self.stale:
            return ""
        fix = ("run `speciesid probe train` on the server's machine (with the server's gallery folder; the server "
               "takes the new probe up without a restart)" if api else
               f"run `speciesid probe train --index {root}`" if root is not None else "run `speciesid probe train`")
        return (f"the probe is older than the gallery: {self.moved()}. Answers blend the kNN vote, which sees every "
                "reference, with a probe that never saw those, so a photo like them can come back less sure, or "
                f"UNKNOWN; {fix}")

    def moved(self) -> str:
        """How the references moved since the probe was trained, in words (the one wording of a probe older than
        the gallery: answers' notes, ``/readyz``, ``index info``, ``evaluate``'s protocol): "3 reference photos added
        and 1 deleted since the probe was trained on ...", or, counted from the counts alone, "2 reference photos
        more than when the probe was trained on ... (net change of the counts)" (fewer: "...: photos that left it may
        have trained it")."""
        when = f" on {self.made_at[:16].replace('T', ' ')} UTC" if self.made_at else ""
        if self.exact:
            return (f"{self.added} reference photo{'s' * (self.added != 1)} added and {self.deleted} deleted since "
                    f"the probe was trained{when}")
        n = self.added or self.deleted
        left = ": photos that left it may have trained it" if self.deleted else ""
        return (f"{n} reference photo{'s' * (n != 1)} {'more' if self.added else 'fewer'} than when the probe was "
                f"trained{when} (net change of the counts){left}")

    def to_dict(self) -> dict[str, Any]:
        """The ``references_since`` entry of the ``probe`` block of ``/readyz`` and ``index info``."""
        return {"added": self.added, "deleted": self.deleted, "exact": self.exact, "stale": self.stale}


def references_since(probe: LinearProbe, ids_now: np.ndarray) -> ReferencesSince | None:
    """How the gallery (``ids_now``: its searchable reference ids, sorted) moved since ``probe`` was trained: from
    the id set it recorded (ids are never reused, so an id not among them was added since), else from the count
    it trained on (:attr:`LinearProbe.trained_on` and the references of species it left out): the net change only.
    None for a probe not trained on this gallery (an imported head) or one that records neither."""
    if probe.source:
        return None
    now = sorted_unique(np.asarray(ids_now, dtype=np.int64))
    if probe.reference_ids is not None:
        then = sorted_unique(probe.reference_ids)
        return ReferencesSince(int((~in_sorted(now, then)).sum()), int((~in_sorted(then, now)).sum()), True,
                               probe.made_at)
    return net_change(probe, len(now))


def net_change(probe: LinearProbe, now: int) -> ReferencesSince | None:
    """How the gallery's count of searchable references (``now``) moved since ``probe`` was trained, from the count
    alone (:attr:`LinearProbe.references_then`; ``exact`` False): None for a probe not trained on this gallery (an
    imported head) or one that records no count."""
    if probe.source or not probe.trained_on:
        return None
    then = probe.references_then
    return ReferencesSince(max(now - then, 0), max(then - now, 0), False, probe.made_at)


def has_probe(folder: str | Path) -> bool:
    """True when ``folder`` holds a saved probe."""
    return (Path(folder) / PROBE_META).is_file()


def probe_text_prior_sha256(folder: str | Path) -> str | None:
    """The :attr:`LinearProbe.text_prior_sha256` the probe saved in ``folder`` records, read from its ``probe.json``
    alone (no weights): None with no probe, or one that records none (or cannot be read)."""
    try:
        recorded = json.loads((Path(folder) / PROBE_META).read_text(encoding="utf-8")).get("text_prior_sha256")
    except (OSError, ValueError, AttributeError):
        return None
    return None if recorded is None else str(recorded)


def now_utc() -> str:
    """This moment as :attr:`LinearProbe.made_at` records it (ISO 8601, UTC, to the second)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _weights_of(folder: Path, meta: Mapping, weights_name: str, meta_name: str) -> bytes:
    """The bytes of the weights file ``weights_name`` that the probe.json ``meta`` (file ``meta_name``) was saved
    with; ValueError when they are another save's (a reader caught between the two files' writes, or a save
    interrupted between them). Files saved before the digest was recorded are taken as they are."""
    weights = (folder / weights_name).read_bytes()
    recorded = meta.get("weights_sha256")
    if recorded and hashlib.sha256(weights).hexdigest() != recorded:
        fix = (f"a 'probe restore' was interrupted: 'speciesid probe restore --index {folder}' finishes it"
               if (folder / PROBE_SWAP_META).is_file() else
               f"else a save was interrupted: train it again: speciesid probe train --index {folder}")
        raise ValueError(f"the probe in {folder}: {weights_name} is not the one {meta_name} was saved with (being "
                         f"replaced now? run again in a moment; {fix})")
    return weights


def probe_origin(meta: Mapping) -> str:
    """In words, what made the probe of ``meta`` (its probe.json) and when: "the probe 'probe train' trained on
    2026-12-06 21:01 UTC (C=50, settings chosen on cv:5-fold, rule seq-nll), weights sha256 0123456789ab", or "the
    head of RUN that 'probe import' took on ..."; the digest where ``meta`` records one."""
    made = str(meta.get("made_at") or "")
    when = f" on {made[:16].replace('T', ' ')} UTC" if made else ""
    source = str(meta.get("source") or "")
    settings = meta.get("settings") or {}
    # two probes made in one minute differ here (a probe.json written before the digest was kept has none)
    digest = f", weights sha256 {str(meta['weights_sha256'])[:12]}" if meta.get("weights_sha256") else ""
    if source.startswith("finetune:"):
        return f"the head of {source.partition(':')[2]} that 'probe import' took{when}{digest}"
    if source:
        return f"the probe from {source}{when}{digest}"
    rule = f", rule {settings['rule']}" if settings.get("rule") else ""
    return (f"the probe 'probe train' trained{when} (C={settings.get('C', Calibration.C):g}, settings chosen on "
            f"{settings.get('selected_on', 'default')}{rule}){digest}")


def _calibration_of(meta: Mapping[str, Any], meta_path: Path) -> Calibration:
    """The :class:`Calibration` of a probe.json: its ``metrics`` as floats, a null (a figure not measured, as
    :meth:`LinearProbe.save` writes NaN) read back as NaN."""
    calibration = from_dict(Calibration, meta.get("settings") or {}, f"{meta_path} settings")
    calibration.metrics = {k: math.nan if v is None else v for k, v in (calibration.metrics or {}).items()}
    return calibration


def probe_summary(probe: LinearProbe) -> dict[str, Any]:
    """What an operator needs to tell one probe from another (the ``probe`` block of ``/readyz`` and ``index info``):
    ``kind`` ("trained": by ``probe train``, with its ``settings``; "imported": a fine-tuned run's head taken by
    ``probe import``, with that ``run``), ``made_at``, ``written_by`` (the speciesid version that saved it; null
    before 0.2.0), ``weights_sha256`` (its first 12 hex digits), its species,
    the vote's ``metric``, and ``what`` in words (:func:`probe_origin`)."""
    source = probe.source or ""
    s = probe.calibration
    settings: dict[str, Any] = {"blend_weight": s.blend_weight, "k": s.k, "temperature": s.temperature,
                                "unknown_threshold": s.unknown_threshold, "selected_on": s.selected_on,
                                "rule": s.rule or None}
    block: dict[str, Any] = {"kind": "trained" if not source else "imported" if source.startswith("finetune:")
                             else "other"}
    if not source:
        block["trained_on"] = probe.trained_on
        settings = {"C": s.C, **settings}
    elif source.startswith("finetune:"):
        block["run"] = source.partition(":")[2]
    else:
        block["source"] = source
    block.update(made_at=probe.made_at or None, written_by=probe.written_by or None,
                 weights_sha256=probe.weights_sha256[:12] or None,
                 species=len(probe.species), metric=s.metric, settings=settings, what=describe_probe(probe))
    return block


def describe_probe(probe: LinearProbe) -> str:
    """In words, what made ``probe`` and when (:func:`probe_origin`), its species and its weights' short sha256."""
    meta = {"made_at": probe.made_at, "source": probe.source, "settings": asdict(probe.calibration)}
    digest = f", weights sha256 {probe.weights_sha256[:12]}" if probe.weights_sha256 else ""
    return f"{probe_origin(meta)}, {len(probe.species)} species{digest}"


def _read_pair(folder: Path, meta_name: str, weights_name: str) -> tuple[dict, bytes] | None:
    """(the probe.json dict, the weights' bytes) of the pair saved as ``meta_name`` + ``weights_name`` in ``folder``,
    with its digest and when it was made recorded (older files: the digest of the weights found, the json's time);
    None when there is none. ValueError when the two files are not of one save."""
    meta_path = folder / meta_name
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    try:
        weights = _weights_of(folder, meta, weights_name, meta_name)
    except FileNotFoundError:
        raise ValueError(f"the probe in {folder}: {meta_name} has no {weights_name} beside it") from None
    meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
    if not meta.get("made_at"):
        stamp = datetime.fromtimestamp(meta_path.stat().st_mtime, timezone.utc)
        meta["made_at"] = stamp.isoformat(timespec="seconds")
    return meta, weights


def _write_pair(folder: Path, meta: dict, weights: bytes, meta_name: str, weights_name: str) -> None:
    """Write a pair atomically, the weights first (a reader of the old json sees that their digest differs)."""
    atomic_write(folder / weights_name, weights)
    write_json_atomic(folder / meta_name, meta, sort_keys=False)


def keep_previous(folder: str | Path) -> str:
    """Set the probe saved in ``folder`` aside as probe.prev.npz + probe.prev.json (one generation: an older one
    kept there is replaced), before a new probe is saved there; returns in words what it is (:func:`probe_origin`),
    "" when there is none. A pair of two saves (an interrupted save) is not kept: warned about, "" returned."""
    folder = Path(folder)
    finish_interrupted_swap(folder)  # an interrupted restore's pairs made whole before one of them is written over
    try:
        pair = _read_pair(folder, PROBE_META, PROBE_WEIGHTS)
    except (OSError, ValueError) as exc:
        logger.warning("the probe being replaced is not kept as %s: %s", PROBE_PREV_META, exc)
        return ""
    if pair is None:
        return ""
    _write_pair(folder, *pair, PROBE_PREV_META, PROBE_PREV_WEIGHTS)
    return probe_origin(pair[0])


#: The key of probe.swap.json naming the probe its swap restores (the swap's target): the :func:`_pair_digest` of its
#: json and weights, not the weights' alone (two probes can share their weights: a retrain of the same gallery, or
#: one with other calibration settings).
_SWAP_TARGET = "swap_restores_pair_sha256"


def _pair_digest(meta: Mapping, weights: bytes) -> str:
    """The sha256 of a probe's pair: its json (keys sorted, the swap's own key left out) and its weights."""
    text = json.dumps({k: v for k, v in meta.items() if k != _SWAP_TARGET}, sort_keys=True, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8") + b"\0" + weights).hexdigest()


def restore_previous(folder: str | Path, *, expected_fingerprint: str | None = None) -> tuple[str, str]:
    """Swap the probe of ``folder`` with the one kept when it was saved (:func:`keep_previous`): (what was
    restored, what was set aside in its place, "" when there was no probe), in words. FileNotFoundError when none
    was kept; EncoderMismatchError when the kept one was made with another encoder than ``expected_fingerprint``.

    Every file is written atomically, the weights before their json (a reader never takes half of each), and in an
    order that a crash at any point leaves both probes whole on disk: the probe set aside is first copied as
    probe.swap.* (naming the probe the swap restores), then the restored probe written as the current one, then the
    copy as probe.prev.*, and probe.swap.* removed last, its json last of all. The next write of the folder's probe (this
    function, :func:`keep_previous`) finishes or undoes a swap a crash left (:func:`finish_interrupted_swap`); a
    restore whose current probe was already in place is finished and not swapped back."""
    folder = Path(folder)
    done = finish_interrupted_swap(folder)
    if done == "finished":  # the restore asked for before is complete now: swapping again would undo it
        now, prev = _read_pair(folder, PROBE_META, PROBE_WEIGHTS), _read_pair(folder, PROBE_PREV_META,
                                                                               PROBE_PREV_WEIGHTS)
        return probe_origin(now[0]) if now else "", probe_origin(prev[0]) if prev else ""
    kept = _read_pair(folder, PROBE_PREV_META, PROBE_PREV_WEIGHTS)
    if kept is None:
        raise FileNotFoundError(f"no earlier probe is kept in {folder} ({PROBE_PREV_META}): 'probe train' and 'probe "
                                "import' keep the probe they replace; nothing to restore")
    meta, weights = kept
    check_format(folder / PROBE_PREV_META, meta.get("format"), PROBE_FORMAT,  # a newer one: this version locked out
                 older=f"train a new one: speciesid probe train --index {folder}")
    if expected_fingerprint is not None:
        check_encoder(f"the earlier probe kept in {folder}", meta["fingerprint"], expected_fingerprint,
                      fix=f"train a new one: speciesid probe train --index {folder}")
    try:
        current = _read_pair(folder, PROBE_META, PROBE_WEIGHTS)
    except (OSError, ValueError) as exc:  # two saves' files: nothing whole to set aside
        logger.warning("the probe being replaced is not kept as %s: %s", PROBE_PREV_META, exc)
        current = None
    if current is None:  # nothing to swap back to: the kept pair is the probe now
        _write_pair(folder, meta, weights, PROBE_META, PROBE_WEIGHTS)
        _remove_files(folder, PROBE_PREV_META, PROBE_PREV_WEIGHTS)  # the json first: no probe.prev.* then
        return probe_origin(meta), ""
    now_meta, now_weights = current
    _write_pair(folder, {**now_meta, _SWAP_TARGET: _pair_digest(meta, weights)}, now_weights, PROBE_SWAP_META,
                PROBE_SWAP_WEIGHTS)  # from here on a crash leaves both probes whole
    _write_pair(folder, meta, weights, PROBE_META, PROBE_WEIGHTS)
    _write_pair(folder, now_meta, now_weights, PROBE_PREV_META, PROBE_PREV_WEIGHTS)
    _remove_files(folder, PROBE_SWAP_WEIGHTS, PROBE_SWAP_META)  # the json last: while it is there, a swap is pending
    return probe_origin(meta), probe_origin(now_meta)


def finish_interrupted_swap(folder: str | Path) -> str:
    """Make whole the pairs of a :func:`restore_previous` that a crash interrupted in ``folder`` (its probe.swap.json
    left behind): "finished" when the restored probe was already the current one (the copy set aside is written as
    probe.prev.*, unless its removal had begun: then it was), "undone" when it was not (the copy is written back as
    the current probe; the probe it was to restore is still probe.prev.*), "" when there was nothing to do. The
    swap's files are removed. Call it holding the folder's write lock, before the probe files are written."""
    folder = Path(folder)
    meta_path, weights_path = folder / PROBE_SWAP_META, folder / PROBE_SWAP_WEIGHTS
    if not meta_path.exists():  # no swap begun (its copy's own write interrupted), or one ended: a lone npz
        if weights_path.exists():
            _remove_files(folder, PROBE_SWAP_WEIGHTS)
        return ""
    target = None  # a json that cannot be read, or is not a swap's record: the swap names no probe (below)
    try:
        target = json.loads(meta_path.read_text(encoding="utf-8")).get(_SWAP_TARGET)
        swap = _read_pair(folder, PROBE_SWAP_META, PROBE_SWAP_WEIGHTS)
    except (OSError, ValueError, AttributeError):  # its weights removed first: the swap had ended (below)
        swap = None
    done = ""
    if target and _whole_pair_digest(folder, PROBE_META, PROBE_WEIGHTS) == target:
        if swap is not None:  # the copy may not be probe.prev.* yet
            swap[0].pop(_SWAP_TARGET, None)
            _write_pair(folder, *swap, PROBE_PREV_META, PROBE_PREV_WEIGHTS)
        done = "finished"
    elif target and swap is not None and _whole_pair_digest(folder, PROBE_PREV_META, PROBE_PREV_WEIGHTS) == target:
        swap[0].pop(_SWAP_TARGET, None)
        _write_pair(folder, *swap, PROBE_META, PROBE_WEIGHTS)
        done = "undone"
    elif not target:  # damaged (a hand edit, a bad copy): it names no probe, so it can finish or undo nothing
        logger.warning("%s in %s is not the record of an interrupted 'probe restore' that this version can read: "
                       "removed, the probe files beside it left as they are", PROBE_SWAP_META, folder)
    else:  # both pairs written since (not through this module): the copy is of no use any more
        logger.warning("%s of an interrupted 'probe restore' in %s matches neither probe there now: removed",
                       PROBE_SWAP_META, folder)
    _remove_files(folder, PROBE_SWAP_WEIGHTS, PROBE_SWAP_META)  # as restore_previous ends: the json last
    if done:
        logger.warning("an interrupted 'probe restore' in %s was %s: the probe is %s", folder, done,
                       "the one it restored, the other kept as probe.prev.*" if done == "finished" else
                       "the one before it, the one it was to restore still kept as probe.prev.*")
    return done


def _whole_pair_digest(folder: Path, meta_name: str, weights_name: str) -> str | None:
    """The :func:`_pair_digest` of the pair as :func:`_read_pair` reads it (the digest a swap's target was made
    with), when it is one save's whole pair; else None (missing, unreadable, or two saves' files)."""
    try:
        pair = _read_pair(folder, meta_name, weights_name)
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return _pair_digest(*pair) if pair is not None else None


def _remove_files(folder: Path, *names: str) -> None:
    """Remove ``names`` from ``folder`` in that order, durably."""
    for name in names:
        (folder / name).unlink(missing_ok=True)
    fsync_dir(folder)


def per_species_sample(labels: Sequence[str], max_photos: int, seed: int = 0) -> tuple[np.ndarray | None, int]:
    """(sorted positions of a seeded per-species subsample of at most ``max_photos`` photos, the cap per species);
    (None, 0) when there are at most ``max_photos`` (all of them). Each species keeps min(its photos, cap), the cap
    the largest that keeps the total within ``max_photos`` (at least :data:`MIN_PROBE_PHOTOS`), drawn with ``seed``."""
    if max_photos < 1:
        raise ValueError(f"max_photos must be at least 1, got {max_photos}")
    if len(labels) <= max_photos:
        return None, 0
    by_species: dict[str, list[int]] = {}
    for i, s in enumerate(labels):
        by_species.setdefault(s, []).append(i)
    sizes = np.array([len(v) for v in by_species.values()])
    lo, hi = MIN_PROBE_PHOTOS, int(sizes.max())  # the largest cap with sum(min(size, cap)) <= max_photos
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if int(np.minimum(sizes, mid).sum()) <= max_photos else (lo, mid - 1)
    rng = np.random.default_rng(seed)
    keep = [np.asarray(pos) if len(pos) <= lo else rng.choice(pos, lo, replace=False)
            for _, pos in sorted(by_species.items())]
    return np.sort(np.concatenate(keep)), lo


#: The final probe's bound, in photos x species: scikit-learn's lbfgs holds (photos, species) float64 arrays, so its
#: memory and time grow with that product (200,000 photos x 1,994 species = 3.99e8: 593 s CPU, 3.3 GiB peak,
#: docs/scale.md). Above it the probe trains on a seeded per-species subsample of ``PROBE_MAX_CELLS // species``
#: photos (:func:`probe_photo_bound`); up to it, on every photo. Every gallery up to 200,000 x 2,000 species
#: trains on all its photos: a bound there cost 4.3 points of a synthetic probe's top-1 (50,000 photos).
PROBE_MAX_CELLS = 400_000_000

#: The bound never goes under this many photos, however many species (a subsample must keep a few a species).
PROBE_MIN_BOUND = 50_000


def probe_photo_bound(n_species: int) -> int:
    """How many photos the final probe trains on at most with ``n_species`` species (:data:`PROBE_MAX_CELLS`)."""
    return max(PROBE_MIN_BOUND, PROBE_MAX_CELLS // max(n_species, 1))


@contextlib.contextmanager
def _ticking(desc: str, progress: bool) -> Iterator[None]:
    """A bar showing the time ``desc`` has taken, redrawn each second while the block runs (a fit that reports no
    steps of its own); nothing when not ``progress``."""
    if not progress:
        yield
        return
    from tqdm.auto import tqdm

    done = threading.Event()
    with tqdm(total=None, desc=desc, bar_format="{desc}: {elapsed}") as bar:
        def tick() -> None:
            while not done.wait(1.0):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()


def train_probe(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    fingerprint: str,
    C: float = 10.0,
    max_iter: int = 3000,
    max_photos: int | None | Literal["auto"] = "auto",
    seed: int = 0,
    progress: bool = False,
) -> LinearProbe:
    """Fit a class-balanced multinomial logistic regression (scikit-learn, lbfgs, float32), on every photo up to
    ``max_photos`` ("auto": :func:`probe_photo_bound` of the species, a memory bound; None: no bound), above it on a
    seeded per-species subsample of that many (:func:`per_species_sample`, logged;
    ``calibration.metrics["probe_photos"]`` says how many). ``progress``: a bar with the fit's time."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(embeddings, dtype=np.float32)
    species = sorted(set(labels))
    if len(species) < 2:
        raise ValueError(f"a probe needs at least 2 species with reference photos, got {len(species)}"
                         + (f" ({species[0]})" if species else "") + ": add references of another species "
                         "('speciesid references add'); without a probe 'speciesid identify --method knn' answers "
                         "with the kNN vote alone")
    if len(x) != len(labels):
        raise ValueError(f"{len(x)} embeddings but {len(labels)} labels")
    index = {s: i for i, s in enumerate(species)}
    y = np.array([index[s] for s in labels])
    if max_photos == "auto":
        max_photos = probe_photo_bound(len(species))
    sample, cap = (None, 0) if max_photos is None else per_species_sample(labels, max_photos, seed)
    metrics: dict[str, float] = {}
    if sample is not None:
        logger.warning("the probe trains on %d of the %d photos (at most %d a species, seed %d; every species kept): "
                       "lbfgs over more than %d photos x %d species takes too long and too much memory "
                       "(probe train --max-photos sets the bound; 0: every photo)",
                       len(sample), len(x), cap, seed, max_photos, len(species))
        x, y = x[sample], y[sample]
        metrics = {"probe_photos": float(len(sample)), "probe_cap_per_species": float(cap)}
    clf = LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter)
    with _ticking(f"training the probe ({len(x)} photos, {len(species)} species)", progress):
        clf.fit(x, y)
    weight, bias = clf.coef_, clf.intercept_
    if weight.shape[0] == 1:  # binary: sklearn keeps one row; softmax over [-z/2, z/2] is the same sigmoid
        weight = np.vstack([-weight / 2, weight / 2])
        bias = np.array([-bias[0] / 2, bias[0] / 2])
    return LinearProbe(
        species=species,
        weight=weight.astype(np.float32),
        bias=bias.astype(np.float32),
        fingerprint=fingerprint,
        calibration=Calibration(C=C, metrics=metrics),
        trained_on=len(labels),  # the photos it was given (a subsample's are said in metrics["probe_photos"])
    )


def fit_temperature(
    logits: np.ndarray, y: np.ndarray, grid: Sequence[float] | None = None
) -> tuple[float, float]:
    """(temperature, mean log-loss at it): the softmax temperature of fixed ``logits`` (N, n) that minimises the
    log-loss of the true classes ``y`` (N,), from ``grid`` (default 0.1-10, geometric). No ranking changes."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y)
    grid = np.geomspace(0.1, 10.0, 81) if grid is None else np.asarray(grid, dtype=np.float64)

    def nll(t: float) -> float:
        zt = z / t
        return float(np.mean(logsumexp(zt, axis=1) - zt[np.arange(len(y)), y]))

    best = float(min(grid, key=nll))
    return best, nll(best)


def fit_head_temperature(
    probe: LinearProbe, embeddings: np.ndarray, labels: Sequence[str], grid: Sequence[float] | None = None
) -> float:
    """The softmax temperature of a fixed head that minimises log-loss on held-out photos.

    A fine-tuned head trained with label smoothing and mixup is under-confident (on ph-snakes val: ECE 0.20,
    0.05 after scaling); dividing its logits by the temperature changes no ranking, only the probabilities.
    Fit it on photos the head did not train on (the gallery's would make it over-confident).
    """
    cols = {s: i for i, s in enumerate(probe.species)}
    keep = [i for i, s in enumerate(labels) if s in cols]
    if not keep:
        raise ValueError("none of the held-out photos is of a species the head knows: cannot fit its temperature")
    z = probe.logits(np.asarray(embeddings, dtype=np.float32)[keep])
    return fit_temperature(z, np.array([cols[labels[i]] for i in keep]), grid)[0]
