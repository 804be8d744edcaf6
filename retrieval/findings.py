"""Cleaning findings: off-target photos (zero-shot text prompts), duplicates, leakage into another set, suspect labels.

Four checks (run by :mod:`retrieval.clean`; reported by :mod:`retrieval.clean_report`):

- **Zero-shot filter** (text-capable encoders only, e.g. BioCLIP): every photo is scored against prompt
  classes read from a prompt file (:mod:`retrieval.prompts`): target classes ("a snake") and off-target
  ones (drawings, maps, labels, skeletons, jars, shed skins, eggs, people, empty scenes...), with
  :mod:`retrieval.zeroshot` (the same scoring as the text prior). The off-target probability is the
  class probabilities' sum over the off-target classes; a photo is flagged when it reaches ``threshold`` and
  its single most likely class is an off-target one (a sum alone grows with the number of off-target classes:
  a photo the prompts say nothing about would score 0.9 with 9 off-target classes to 1 target).
- **Duplicates** in the set: same bytes (sha256), or embeddings with cosine >= ``dup_threshold``
  (:func:`index.pairs.similar_pairs`). A pair filed under two species is a **label conflict** instead: one of the
  two labels is wrong, and no automatic rule can tell which, so ``--apply`` never acts on it.
- **Leakage** against another set (``against``, e.g. the evaluation photos): the same two tests across sets.
- **Suspect labels** (report only): leave-one-out kNN over the set, cosine. A photo is flagged when its ``k``
  nearest other photos all carry one species that is not its label, and its own species has at least ``k`` other
  photos. Copies of one photo (same bytes, or cosine >= ``dup_threshold``, joined into groups:
  :func:`index.pairs.copy_groups`) count as one photo there: a photo's own copies are not its neighbours, and a
  burst of copies is one neighbour. The finding names that
  species and the neighbours' mean similarity. It is evidence for a person, never a verdict: ``--apply`` never
  acts on it.

Nothing here writes: :mod:`retrieval.clean` turns findings into reversible exclusions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from index.pairs import NeighbourPass, copy_groups, neighbours_and_pairs, similar_pairs
from index.vectors import exact_search
from retrieval.encoders import Encoder
from retrieval.pipeline import Embedded
from retrieval.prompts import PromptSet, load_prompts, taxon_group
from retrieval.zeroshot import cached_class_embeddings, logit_scale, zero_shot_probabilities

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
#: Chosen on the real ph-snakes val-vs-train pairs with MobileNetV1 (docs/cleaning.md): the same photo
#: re-encoded, re-cropped or with its watermark cut off scored 0.959-1.000; different photos of the same
#: animal (burst shots, same scene) 0.93 and below, with a few bursts at 0.95-0.96.
DEFAULT_DUP_THRESHOLD = 0.95
#: The lowest --dup-threshold taken. Pairs of the 975 ph-snakes train photos (MobileNetV1, docs/cleaning.md): 8 at
#: >= 0.95, 117 at 0.85, 341 at 0.80 (36 of them across species), 9,682 at 0.70, 344,851 at 0.50. Copies sit far
#: above it with any encoder; below it a slip (0.5 for 0.95) lists most pairs of photos as "copies".
MIN_DUP_THRESHOLD = 0.8
#: Neighbours that must all carry one other species for a suspect label. Chosen on ph-snakes train only with
#: MobileNetV1 (20 photos moved to another species' folder, 5 seeds; best F1 of k 3 / 5 / 7:
#: benchmarks/bench_suspect.py, docs/cleaning.md).
DEFAULT_SUSPECT_K = 3
KINDS: tuple[str, ...] = ("label-conflict", "suspect-label", "off-target", "leak", "near-leak", "duplicate",
                          "near-duplicate", "unreadable")
#: Kinds ``apply_exclusions`` can act on (unreadable photos are never in a store).
APPLY_KINDS: tuple[str, ...] = ("off-target", "leak", "near-leak", "duplicate", "near-duplicate")
#: Kinds for a person to review: no rule can tell which label is right, so nothing excludes them.
REPORT_ONLY_KINDS: tuple[str, ...] = ("label-conflict", "suspect-label")
#: Queries per neighbour search (a progress bar step); exact_search bounds its own score matrix.
_QUERY_CHUNK = 1024
#: Neighbours searched beyond ``k + 1`` at first, for the copies left out (more are searched where too few remain).
_SEARCH_SLACK = 8


def check_apply_kinds(kinds: Sequence[str]) -> None:
    """ValueError unless every kind is one ``--apply`` may exclude (:data:`APPLY_KINDS`); the report-only kinds are
    refused with why."""
    review = [k for k in kinds if k in REPORT_ONLY_KINDS]
    if review:
        raise ValueError(f"{', '.join(review)} findings are report only: no rule can tell which label is right, so "
                         "--apply never excludes them; review them in findings.csv and contact_sheet.html. "
                         f"--apply-to takes {', '.join(APPLY_KINDS)}")
    bad = [k for k in kinds if k not in APPLY_KINDS]
    if bad:
        raise ValueError(f"unknown finding kind(s) {', '.join(bad)} for --apply-to; choose from {', '.join(APPLY_KINDS)}")


def unfindable_kinds(kinds: Sequence[str], config: CleanConfig, encoder: Encoder, *,
                     against: bool) -> dict[str, str]:
    """Of the ``--apply-to`` kinds, those this run cannot find (a check off, an image-only encoder for the zero-shot
    filter, no ``--against`` set for leaks), each with why and what would find them."""
    why: dict[str, str] = {}
    for kind in dict.fromkeys(kinds):
        if kind == "off-target" and not config.zero_shot:
            why[kind] = "--no-zero-shot turns off the zero-shot filter that finds them"
        elif kind == "off-target" and not encoder.supports_text:
            why[kind] = (f"encoder {encoder.spec} is image-only, and the zero-shot filter that finds them needs one "
                         "that reads text (--encoder bioclip)")
        elif kind in ("leak", "near-leak", "duplicate", "near-duplicate") and not config.duplicates:
            why[kind] = "--no-duplicates turns off the check that finds them"
        elif kind in ("leak", "near-leak") and not against:
            why[kind] = "leaks are photos also in the --against DIR set, and none was given"
    return why


def unfindable_text(why: dict[str, str]) -> str:
    """``unfindable_kinds`` as one clause: the kinds that share a reason named together."""
    by_reason: dict[str, list[str]] = {}
    for kind, reason in why.items():
        by_reason.setdefault(reason, []).append(kind)
    return "; ".join(f"{', '.join(kinds)}: {reason}" for reason, kinds in by_reason.items())


# ------------------------------------------------------------------------------------------ zero-shot
def off_target_probability(probs: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
    """(N,) probability mass on the off-target classes."""
    return probs[:, ~np.asarray(target_mask, dtype=bool)].sum(axis=1)


def top_class_off_target(probs: np.ndarray, target_mask: np.ndarray) -> np.ndarray:
    """(N,) bool: an off-target class is more likely than every target class (a tie is not)."""
    mask = np.asarray(target_mask, dtype=bool)
    p = np.nan_to_num(probs, nan=-1.0)
    return p[:, ~mask].max(axis=1, initial=-1.0) > p[:, mask].max(axis=1, initial=-1.0)


@dataclass
class ZeroShotResult:
    """Zero-shot class probabilities of every photo of a set."""

    prompts: PromptSet
    probs: np.ndarray  # (N, n_classes); rows of unreadable photos are NaN
    off_target: np.ndarray  # (N,) off-target probability (NaN where unreadable)
    logit_scale: float
    seconds_text: float = 0.0  # encoding the prompts

    def describe(self, i: int) -> str:
        """'drawing 0.71; snake 0.20': the best off-target class and the best target class of photo ``i``."""
        mask = self.prompts.target_mask
        p = self.probs[i]
        off = int(np.argmax(np.where(mask, -1.0, p)))
        tgt = int(np.argmax(np.where(mask, p, -1.0)))
        names = self.prompts.names
        return f"{names[off]} {p[off]:.2f}; target {names[tgt]} {p[tgt]:.2f}"


def score_zero_shot(
    encoder: Encoder, embeddings: np.ndarray, ok: np.ndarray, prompts: PromptSet,
    *, cache_dir: str | Path | None = None, progress: bool = False,
) -> ZeroShotResult:
    """Class probabilities and off-target probability of each photo (``ok``: rows that have an embedding).

    ``cache_dir``: where the prompt class embeddings are cached (``None``: computed every time).
    """
    t0 = time.perf_counter()
    class_emb = cached_class_embeddings(encoder, prompts.class_prompts(), cache_dir, progress=progress)
    t1 = time.perf_counter()
    scale = logit_scale(encoder)
    probs = np.full((len(embeddings), len(prompts.classes)), np.nan, dtype=np.float32)
    if ok.any():
        probs[ok] = zero_shot_probabilities(embeddings[ok], class_emb, scale)
    off = np.full(len(embeddings), np.nan, dtype=np.float32)
    if ok.any():
        off[ok] = off_target_probability(probs[ok], prompts.target_mask)
    return ZeroShotResult(prompts=prompts, probs=probs, off_target=off, logit_scale=scale, seconds_text=t1 - t0)



# ------------------------------------------------------------------------------------------ photos
@dataclass
class PhotoSet:
    """Photos with their content digests and embeddings (zero rows where unreadable)."""

    paths: list[str]
    sha256: list[str | None]
    embeddings: np.ndarray  # (N, dim) float32
    errors: list[str | None]  # why a photo has no embedding
    ids: list[int | None]  # gallery reference id, where the photo is in the gallery
    species: list[str | None] = field(default_factory=list)
    embedded: int = 0  # photos run through the encoder (the rest came from the gallery's store)

    @property
    def ok(self) -> np.ndarray:
        """(N,) bool: photos that have an embedding."""
        return np.array([e is None for e in self.errors], dtype=bool)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_embedded(
        cls, paths: Sequence[str | Path], done: Embedded, ids: Sequence[int | None], species: Sequence[str | None] = ()
    ) -> PhotoSet:
        """A set from :func:`retrieval.pipeline.embed_photos` output."""
        return cls([str(p) for p in paths], list(done.sha256), done.embeddings, list(done.errors), list(ids),
                   list(species), done.fresh)


# ----------------------------------------------------------------------------------------- findings
@dataclass
class Finding:
    """One row of the report."""

    kind: str  # one of KINDS
    score: float  # off-target probability, or cosine similarity (1.0 for same bytes; a suspect label: the
    #               neighbours' mean); NaN for unreadable
    path: str  # the photo of the cleaned set (the one an --apply would exclude)
    paired_path: str | None = None  # the other photo of a duplicate / leak pair; a suspect label's nearest neighbour
    detail: str = ""  # best classes (off-target), or why unreadable
    reference_id: int | None = None  # gallery reference id of ``path``, when in the gallery
    paired_reference_id: int | None = None  # gallery reference id of ``paired_path``, when in the gallery
    suggested_species: str | None = None  # suspect label: the species all its nearest neighbours carry

    def row(self) -> dict[str, object]:
        """CSV row."""
        return {
            "kind": self.kind,
            "score": "" if math.isnan(self.score) else f"{self.score:.4f}",
            "path": self.path,
            "paired_path": self.paired_path or "",
            "detail": self.detail,
            "reference_id": "" if self.reference_id is None else self.reference_id,
            "paired_reference_id": "" if self.paired_reference_id is None else self.paired_reference_id,
            "suggested_species": self.suggested_species or "",
        }


def find_issues(
    photos: PhotoSet,
    *,
    against: PhotoSet | None = None,
    zero_shot: ZeroShotResult | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    dup_threshold: float = DEFAULT_DUP_THRESHOLD,
    duplicates: bool = True,
    suspect_k: int | None = None,
    skipped: Sequence[tuple[str | Path, str]] = (),
    progress: bool = False,
) -> list[Finding]:
    """All findings: off-target photos, duplicates (or label conflicts) within ``photos``, leaks from ``against``,
    suspect labels (when ``suspect_k`` is given: :func:`suspect_labels`), unreadable ones (never also a duplicate
    or a leak: two empty files are not copies of a photo), and the ``skipped`` entries the photo search could not
    read (broken links...: :func:`index.photos.scan_photos`)."""
    findings: list[Finding] = [Finding("unreadable", float("nan"), str(p), detail=why) for p, why in skipped]
    if zero_shot is not None:
        flagged = (photos.ok & (np.nan_to_num(zero_shot.off_target, nan=-1.0) >= threshold)
                   & top_class_off_target(zero_shot.probs, zero_shot.prompts.target_mask))
        for i in np.flatnonzero(flagged):
            findings.append(
                Finding("off-target", float(zero_shot.off_target[i]), photos.paths[i],
                        detail=zero_shot.describe(int(i)), reference_id=photos.ids[i])
            )
    # one pass over every pair of the set serves the duplicates, the copy groups and the neighbours; made only
    # when used: by the duplicates, or by suspect_labels when it judges every readable photo (all labelled)
    near = None
    readable = np.flatnonzero(photos.ok)
    if suspect_k is not None and readable.size and (duplicates or all(_species(photos, i) for i in readable)):
        near = neighbours_and_pairs(photos.embeddings[photos.ok], suspect_k + 1 + _SEARCH_SLACK,
                                    threshold=dup_threshold, progress=progress, desc="cleaning: pairs")
    if duplicates:
        findings.extend(_duplicates(photos, dup_threshold, pairs=near.pairs if near is not None else None,
                                    progress=progress))
        if against is not None:
            findings.extend(_leaks(photos, against, dup_threshold))
    if suspect_k is not None:
        findings.extend(suspect_labels(photos, suspect_k, dup_threshold=dup_threshold, progress=progress,
                                       near=near))
    for s, name in ((photos, ""), (against, "against: ")):
        if s is None:
            continue
        for i, err in enumerate(s.errors):
            if err is not None:
                findings.append(Finding("unreadable", float("nan"), s.paths[i], detail=name + err))
    order = {k: n for n, k in enumerate(KINDS)}
    findings.sort(key=lambda f: (order[f.kind], -(0.0 if math.isnan(f.score) else f.score), f.path))
    return findings


def check_photos(
    photos: PhotoSet, encoder: Encoder, config: CleanConfig, *, against: PhotoSet | None = None,
    dataset: str | None = None, prompt_cache: str | Path | None = None, progress: bool = False,
    skipped: Sequence[tuple[str | Path, str]] = (),
) -> tuple[list[Finding], ZeroShotResult | None, str | None]:
    """Run the checks ``config`` asks for: (findings, zero-shot result or None, why the filter did not run);
    ``skipped``: entries the photo search could not read, reported as unreadable."""
    zs, notice = None, None
    if config.zero_shot:
        if encoder.supports_text:
            prompts = load_prompts(config.prompts or taxon_group(dataset, photos.species))
            zs = score_zero_shot(encoder, photos.embeddings, photos.ok, prompts, cache_dir=prompt_cache,
                                 progress=progress)
        else:
            still = [name for name, on in (("duplicate and leakage detection", config.duplicates),
                                           ("suspect labels", config.suspect_labels)) if on]
            notice = (
                f"zero-shot filter skipped: encoder {encoder.spec} is image-only (it needs a text-capable encoder "
                "such as bioclip)" + ("; " + " and ".join(still) + " still ran" if still else "")
            )
            logger.info("%s", notice)
    findings = find_issues(photos, against=against, zero_shot=zs, threshold=config.threshold,
                           dup_threshold=config.dup_threshold, duplicates=config.duplicates,
                           suspect_k=config.suspect_k if config.suspect_labels else None, skipped=skipped,
                           progress=progress)
    return findings, zs, notice


def _copy(photos: PhotoSet, later: int, earlier: int, score: float, how: str) -> Finding:
    """A duplicate of ``earlier`` (``kind`` by ``how``: "same bytes (sha256)" or ""), or a label conflict when the
    two are filed under different species."""
    here, there = _species(photos, later), _species(photos, earlier)
    if here and there and here != there:
        detail = f"{how or 'near-identical'}: labelled {here} here, {there} there; one label is wrong"
        return Finding("label-conflict", score, photos.paths[later], photos.paths[earlier], detail,
                       photos.ids[later], photos.ids[earlier])
    kind = "duplicate" if how else "near-duplicate"
    return Finding(kind, score, photos.paths[later], photos.paths[earlier], how, photos.ids[later], photos.ids[earlier])


def _species(photos: PhotoSet, i: int) -> str | None:
    return photos.species[i] if i < len(photos.species) else None


def _duplicates(photos: PhotoSet, dup_threshold: float, *, pairs: Sequence[tuple[int, int, float]] | None = None,
                progress: bool = False) -> list[Finding]:
    """Same bytes and near-copies within the set; ``pairs``: the near pairs of its readable rows, when found already
    (:func:`index.pairs.neighbours_and_pairs`)."""
    out: list[Finding] = []
    first: dict[str, int] = {}
    for i, sha in enumerate(photos.sha256):
        if sha is None or photos.errors[i] is not None:
            continue
        if sha in first:
            out.append(_copy(photos, i, first[sha], 1.0, "same bytes (sha256)"))
        else:
            first[sha] = i
    ok = np.flatnonzero(photos.ok)
    if pairs is None:
        pairs = similar_pairs(photos.embeddings[ok], threshold=dup_threshold, progress=progress,
                              desc="cleaning: near-copies")
    for a, b, sim in pairs:
        i, j = int(ok[a]), int(ok[b])  # i < j: report the later photo, paired with the earlier one
        if photos.sha256[i] is not None and photos.sha256[i] == photos.sha256[j]:
            continue  # already reported as the same bytes
        out.append(_copy(photos, j, i, sim, ""))
    return out


def _leaks(photos: PhotoSet, against: PhotoSet, dup_threshold: float) -> list[Finding]:
    out: list[Finding] = []
    by_sha: dict[str, list[int]] = {}
    for i, sha in enumerate(photos.sha256):
        if sha is not None and photos.errors[i] is None:
            by_sha.setdefault(sha, []).append(i)
    for j, sha in enumerate(against.sha256):
        if against.errors[j] is not None:
            continue
        for i in by_sha.get(sha or "", []):
            out.append(Finding("leak", 1.0, photos.paths[i], against.paths[j], "same bytes (sha256)",
                               photos.ids[i], against.ids[j]))
    ok_g, ok_a = np.flatnonzero(photos.ok), np.flatnonzero(against.ok)
    for a, g, sim in similar_pairs(against.embeddings[ok_a], photos.embeddings[ok_g], threshold=dup_threshold):
        i, j = int(ok_g[g]), int(ok_a[a])
        if photos.sha256[i] is not None and photos.sha256[i] == against.sha256[j]:
            continue
        out.append(Finding("near-leak", sim, photos.paths[i], against.paths[j], "", photos.ids[i], against.ids[j]))
    return out


def other_neighbours(
    embeddings: np.ndarray, k: int, *, groups: np.ndarray | None = None, progress: bool = False,
    first: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Leave-one-out neighbours: (positions (N, k), cosine similarities (N, k)) of each row's ``k`` nearest other
    rows, best first, found by :func:`index.vectors.exact_search` (rows L2-normalised). ``groups``: copies of one
    photo (:func:`index.pairs.copy_groups`; None: every row its own). A row's own group is left out with it (a
    copy is the same photo again, not another photo's evidence), and another group counts once, by its nearest
    row (a burst of copies is one neighbour). Where fewer than ``k`` groups remain, the rest of the row is
    -1 / NaN. ``progress``: a bar over the rows, like clean's other steps. ``first``: each row's nearest other
    rows already found ((N, W) positions and cosines, best first: :func:`index.pairs.neighbours_and_pairs`); only
    the rows whose W hold fewer than ``k`` other groups (a burst of copies larger than W) are searched again,
    wider, so the answer is the same."""
    from tqdm import tqdm

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    n = len(emb)
    rows = np.arange(n, dtype=np.int64)
    group = rows if groups is None else np.asarray(groups, dtype=np.int64)
    positions = np.full((n, k), -1, dtype=np.int64)
    sims = np.full((n, k), np.nan, dtype=np.float32)
    bar = tqdm(total=n, desc="cleaning: neighbours", unit="photo", disable=not progress)

    def take(q: np.ndarray, s: np.ndarray, pos: np.ndarray, exhausted: bool) -> np.ndarray:
        """Fill the rows ``q`` that have ``k`` other groups among their searched neighbours (all of them when
        ``exhausted``: nothing more to search); the rows left to search wider."""
        theirs = np.where(pos < 0, -1, group[np.maximum(pos, 0)])
        keep = (pos >= 0) & (theirs != group[q][:, None]) & _first_of_group(theirs)
        done = (keep.sum(axis=1) >= k) | exhausted
        for r in np.flatnonzero(done):
            got = np.flatnonzero(keep[r])[:k]
            positions[q[r], : got.size] = pos[r, got]
            sims[q[r], : got.size] = s[r, got]
        bar.update(int(done.sum()))
        return q[~done]

    pending, want = rows, k + 1 + _SEARCH_SLACK
    if first is not None:
        pos0, s0 = first
        pending = take(rows, np.asarray(s0), np.asarray(pos0), pos0.shape[1] >= n - 1)
        want = max(want, 2 * (pos0.shape[1] + 1))
    while pending.size:
        searched = min(want, n)
        short: list[np.ndarray] = []
        for start in range(0, pending.size, _QUERY_CHUNK):
            q = pending[start : start + _QUERY_CHUNK]
            s, pos = exact_search(emb, rows, emb[q], searched)
            short.append(take(q, s, pos, searched >= n))
        pending, want = np.concatenate(short), 2 * want
    bar.close()
    return positions, sims


def _first_of_group(theirs: np.ndarray) -> np.ndarray:
    """(Q, W) bool: whether each entry is its row's first (nearest) of its group."""
    order = np.argsort(theirs, axis=1, kind="stable")  # stable: the nearest of a group comes first
    ranked = np.take_along_axis(theirs, order, axis=1)
    repeat = np.zeros(theirs.shape, dtype=bool)
    repeat[:, 1:] = ranked[:, 1:] == ranked[:, :-1]
    first = np.empty_like(repeat)
    np.put_along_axis(first, order, ~repeat, axis=1)
    return first


def suspect_labels(
    photos: PhotoSet, k: int = DEFAULT_SUSPECT_K, *, dup_threshold: float = DEFAULT_DUP_THRESHOLD,
    progress: bool = False, near: NeighbourPass | None = None,
) -> list[Finding]:
    """Photos whose ``k`` nearest other photos of the set (cosine, leave-one-out: :func:`other_neighbours`) all
    carry one species that is not theirs, when their own species has at least ``k`` other photos (a species of a
    few photos has no neighbourhood to lose). Photos are counted as distinct photos: copies of one photo (the same
    bytes, or cosine >= ``dup_threshold``: :func:`index.pairs.copy_groups`) are one photo, in that count and among
    the neighbours, and a photo's own copies are neither. Score: the neighbours' mean similarity;
    ``suggested_species``: their species; ``paired_path``: the nearest of them. Photos without an embedding or a
    label are not judged. ``near``: the pass over the set's readable photos (:func:`index.pairs.neighbours_and_pairs`
    at this ``dup_threshold``, width above ``k``) when made already: its pairs and neighbours are used when every
    readable photo is judged (else one pass over the judged photos is made here)."""
    if k < 1:
        raise ValueError(f"k (--suspect-k) must be at least 1, got {k}")
    labels = [_species(photos, i) or "" for i in range(len(photos))]
    judged = np.flatnonzero(photos.ok & np.array([bool(s) for s in labels], dtype=bool))
    if not judged.size:
        return []
    if near is None or judged.size != int(photos.ok.sum()) or near.positions.shape[1] <= k:
        near = neighbours_and_pairs(photos.embeddings[judged], k + 1 + _SEARCH_SLACK, threshold=dup_threshold,
                                    progress=progress, desc="cleaning: pairs")
    groups = copy_groups(photos.embeddings[judged], threshold=dup_threshold,
                         sha256=[photos.sha256[i] for i in judged], pairs=near.pairs)
    distinct: dict[str, set[int]] = {}  # species -> its photos' copy groups
    for r, i in enumerate(judged):
        distinct.setdefault(labels[i], set()).add(int(groups[r]))
    positions, sims = other_neighbours(photos.embeddings[judged], k, groups=groups, progress=progress,
                                       first=(near.positions, near.sims))
    out: list[Finding] = []
    for r, i in enumerate(judged):
        own = labels[i]
        if len(distinct[own]) - 1 < k or positions[r, -1] < 0:
            continue
        near = [int(judged[p]) for p in positions[r]]
        theirs = {labels[j] for j in near}
        if len(theirs) != 1 or own in theirs:
            continue
        other = theirs.pop()
        mean = float(sims[r].mean())
        out.append(Finding(
            "suspect-label", mean, photos.paths[i], photos.paths[near[0]],
            f"labelled {own}; its {k} nearest other photos are all {other} (mean cosine {mean:.3f}): check the label",
            photos.ids[i], photos.ids[near[0]], suggested_species=other,
        ))
    logger.info("suspect labels: %d of %d photos (k=%d)", len(out), judged.size, k)
    return out


@dataclass
class CleanConfig:
    """What ``clean`` checks and with which thresholds."""

    prompts: str | None = None  # prompt file or shipped group; None = chosen from the dataset's taxon group
    threshold: float = DEFAULT_THRESHOLD  # off-target probability at which a photo is flagged
    dup_threshold: float = DEFAULT_DUP_THRESHOLD  # cosine similarity of near-duplicates / near-leaks
    zero_shot: bool = True  # run the zero-shot filter (when the encoder reads text)
    duplicates: bool = True  # look for duplicates and leaks
    suspect_labels: bool = True  # report photos whose nearest neighbours all carry another species
    suspect_k: int = DEFAULT_SUSPECT_K  # how many nearest neighbours must agree

    def __post_init__(self) -> None:
        if not self.zero_shot and not self.duplicates and not self.suspect_labels:
            raise ValueError("nothing to check: --no-zero-shot, --no-duplicates and --no-suspect-labels together "
                             "turn off every check")
        if self.suspect_k < 1:
            raise ValueError(f"--suspect-k is a count of neighbours, at least 1, got {self.suspect_k}")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"--threshold is a probability in (0, 1], got {self.threshold}")
        if not MIN_DUP_THRESHOLD <= self.dup_threshold <= 1.0:
            raise ValueError(
                f"--dup-threshold is the cosine similarity from which two photos count as copies, from "
                f"{MIN_DUP_THRESHOLD:g} to 1 (default {DEFAULT_DUP_THRESHOLD:g}: copies scored 0.959-1 with "
                f"MobileNetV1, other shots of one animal 0.93 and below; below {MIN_DUP_THRESHOLD:g} most pairs "
                f"of photos of a species would be listed, docs/cleaning.md), got {self.dup_threshold:g}")
        if self.prompts is not None and self.zero_shot:
            load_prompts(self.prompts)  # a missing or malformed file is refused now, whatever the encoder reads
