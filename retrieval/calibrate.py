"""Choose the probe's C, the kNN k/T, the blend weight and the unknown threshold by measurement.

Without a separate validation set the choice is made out-of-fold: the gallery is split into
stratified folds (near-duplicate photos kept in one fold), each fold is identified against the rest (kNN
over the rest, a probe trained on the rest). Above :data:`SELECTION_MAX_PHOTOS` only a per-species sample
(:func:`selection_sample`, :func:`out_of_fold`'s ``sample``) is split into folds and queried: each held-out photo
votes over the whole gallery but its fold and its near-copies, and each fold's probe trains on the sample's other
folds only. With a validation set (``val_emb``), the whole gallery is the reference set and the validation photos
are the queries.

Two rules turn the out-of-fold scores into settings (``rule``; recorded in the :class:`Calibration`):

- ``seq-nll`` (the default): one setting at a time, each by out-of-fold log-loss -- C alone (the probe),
  then the metric, k and T (the kNN vote alone), then the blend weight for those -- and at each step the value nearest
  the measured defaults (:data:`PRIOR`) among those within one standard error of the best (the plateau, not a
  lucky point). Few free settings, each chosen on a smooth score: it does not over-fit small folds (docs/accuracy.md).
- ``argmax``: the old rule, the grid point (C, k, T, w) with the best out-of-fold top-1 of the blend; 4
  settings chosen jointly on a step-shaped score, it over-fits small folds (a bigger gallery could get a
  worse blend). Kept for comparison.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from retrieval.metric import METRICS, fit_whitening
from retrieval.metrics import min_answered, precision_threshold
from retrieval.probe import (
    DUPLICATE_COSINE,
    MIN_PROBE_PHOTOS,
    Calibration,
    LinearProbe,
    distinct_count,
    distinct_photos,
    per_species_sample,
    photo_groups,
    train_probe,
)
from retrieval.vote import DEFAULT_UNKNOWN_THRESHOLD

logger = logging.getLogger(__name__)

RULES = ("seq-nll", "argmax")
DEFAULT_RULE = "seq-nll"
#: The measured defaults each step of ``seq-nll`` leans toward when the scores cannot tell values apart.
#: The metric leans to plain cosine: the whitened one (``retrieval.metric``) is chosen only where the gallery's own
#: out-of-fold scores show it better by more than their standard error.
PRIOR = {"C": 10.0, "k": 30, "temperature": 0.03, "weight": 0.5, "metric": "cosine"}
#: Above this many gallery photos, cross-validation scores the held-out votes of a seeded subsample of at most this
#: many (:func:`selection_sample`: each species keeps min(its photos, a cap), the cap the largest that fits), each
#: voting over the whole gallery but its fold and near-copies; the folds' probes (C) train on the subsample only. A
#: ph-snakes-size gallery (980 photos) is far under it: every photo is a query, voting over the other folds.
SELECTION_MAX_PHOTOS = 20_000


def selection_sample(labels: Sequence[str], *, max_photos: int = SELECTION_MAX_PHOTOS,
                     seed: int = 0) -> tuple[np.ndarray | None, int]:
    """(sorted positions of the photos whose held-out votes choose the settings, the cap per species); (None, 0)
    when there are at most ``max_photos`` (all of them): :func:`retrieval.probe.per_species_sample`."""
    return per_species_sample(labels, max_photos, seed)


class FewPhotosError(ValueError):
    """Cross-validation cannot hold out a photo of these species (fewer than 2 distinct photos each)."""

    def __init__(self, species: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.species = list(species)  # every such species, sorted


@dataclass
class SelectionGrid:
    """Values tried during selection."""

    Cs: tuple[float, ...] = (1.0, 5.0, 20.0, 50.0)  # probe regularisation
    ks: tuple[int, ...] = (10, 20, 30)  # neighbours
    temperatures: tuple[float, ...] = (0.02, 0.03, 0.05)  # vote temperature
    weights: tuple[float, ...] = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0)  # blend weight (0 = kNN, 1 = probe)
    metrics: tuple[str, ...] = METRICS  # the kNN vote's metric (retrieval.metric)


def check_weight(weight: float) -> float:
    """``weight`` as a float when it is a blend weight (the probe's share, 0 to 1); ValueError otherwise."""
    w = float(weight)
    if not 0.0 <= w <= 1.0:  # NaN fails too
        raise ValueError(f"a blend weight is the probe's share, from 0 (kNN only) to 1 (probe only), not {weight}")
    return w


#: Floats of one block of query-to-reference similarities (float32: 128 MiB): the kNN vote is computed over blocks of
#: queries (every reference per query row, so each row's top-k is the dense matrix's, bit for bit), never a whole
#: Q x R matrix (40 GB at 100k x 100k).
BLOCK_FLOATS = 1 << 25
#: The fewest similarities one block holds (32 KiB), whatever ``block_floats`` says: BLAS sums a one-row product
#: (gemv) and a small one (OpenBLAS's small-matrix kernels) in another order than a big one, so such a block's last
#: bits could differ from the dense matrix's. Measured with OpenBLAS 0.3.31 (SkylakeX kernels, the AVX-512-BF16 CPU
#: kind): products of up to about 1,200 similarities (e.g. 6 x 200 at 32 dims or more) differ, 1,261 and more did not
#: (tests/test_probe_scale.py checks such shapes).
MIN_BLOCK_FLOATS = 1 << 13


def knn_top(
    queries: np.ndarray, refs: np.ndarray, ks: Sequence[int], *, exclude_self: bool = False,
    exclude: tuple[np.ndarray, np.ndarray] | None = None, block_floats: int = BLOCK_FLOATS,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per k of ``ks``: (reference positions (Q, k'), their similarities (Q, k')) of each query's k' = min(k, R)
    nearest references by inner product, over blocks of query rows (``block_floats`` similarities at a time, at
    least :data:`MIN_BLOCK_FLOATS`). The same neighbours, in the same order, as ``np.argpartition`` over the dense
    Q x R matrix: every block is one shape (a short last block is the last full window, its last rows kept), none so
    small that BLAS sums it another way, and one row's similarities do not depend on the others'.
    ``exclude_self``: query i is reference i (it is not its own neighbour). ``exclude``: (query rows, reference
    positions) of pairs that are no neighbours (a query's near-copies among the references)."""
    if block_floats < 1:
        raise ValueError(f"block_floats must be at least 1, got {block_floats}")
    if exclude is not None:  # sorted by query row: each block masks its own slice
        order = np.argsort(exclude[0], kind="stable")
        ex_rows, ex_cols = np.asarray(exclude[0])[order], np.asarray(exclude[1])[order]
    n_q, n_r = len(queries), refs.shape[0]
    per_row = max(n_r, 1)
    rows = max(1, min(n_q, max(block_floats // per_row, -(-MIN_BLOCK_FLOATS // per_row))))
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {int(k): [] for k in ks}
    for s in range(0, n_q, rows):
        start = min(s, n_q - rows)  # a short tail: the overlapping last full window (the same BLAS path)
        sims = (queries[start : start + rows] @ refs.T)[s - start :]
        if exclude_self:
            r = np.arange(len(sims))
            keep = r + s < n_r
            sims[r[keep], r[keep] + s] = -np.inf
        if exclude is not None:
            lo, hi = np.searchsorted(ex_rows, [s, s + len(sims)])
            sims[ex_rows[lo:hi] - s, ex_cols[lo:hi]] = -np.inf
        for k in parts:
            kk = min(k, n_r)
            top = np.argpartition(-sims, kk - 1, axis=1)[:, :kk].copy()  # not a view of the block's whole order
            parts[k].append((top, np.take_along_axis(sims, top, axis=1)))
    return {k: (np.concatenate([t for t, _ in v]) if v else np.zeros((0, min(k, n_r)), np.int64),
                np.concatenate([t for _, t in v]) if v else np.zeros((0, min(k, n_r)), np.float32))
            for k, v in parts.items()}


def vote_weights(top_sims: np.ndarray, temperature: float) -> np.ndarray:
    """Each neighbour's weight in the kNN vote: exp((sim - the query's best) / T)."""
    return np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)


def dense_vote(labels: np.ndarray, weights: np.ndarray, n_classes: int) -> np.ndarray:
    """(Q, n_classes) kNN vote probabilities from each query's neighbours' class indices and weights (Q, k)."""
    out = np.zeros((len(labels), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(labels)), labels.shape[1])
    np.add.at(out, (rows, labels.reshape(-1)), weights.reshape(-1))
    return out / out.sum(axis=1, keepdims=True)


def knn_matrix(
    queries: np.ndarray,
    refs: np.ndarray,
    ref_labels: np.ndarray,
    n_classes: int,
    k: int,
    temperature: float,
    *,
    exclude_self: bool = False,
    metric: str = "cosine",
) -> np.ndarray:
    """Vectorised kNN vote: (Q, n_classes) probabilities (ref_labels are class indices). ``metric`` "whitened" fits
    the whitening (``retrieval.metric``) on the references and their labels first. The similarities are computed a
    block of queries at a time (:func:`knn_top`): memory Q x n_classes, not Q x R."""
    queries, refs = in_metric(queries, refs, ref_labels, metric)
    top, top_sims = knn_top(queries, refs, [k], exclude_self=exclude_self)[k]
    return dense_vote(ref_labels[top], vote_weights(top_sims, temperature), n_classes)


class Votes(Mapping):
    """(k, T, metric) -> (Q, n) out-of-fold kNN vote, kept as each fold's neighbours' classes and weights (Q x k)
    and made dense on access (the last one cached): ~40 settings of (Q, n) float64 would be 128 GB at 200k x 2,000
    species. A dense vote equals :func:`knn_matrix`'s, bit for bit."""

    def __init__(self, n_classes: int) -> None:
        self._n = n_classes
        self._parts: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._last: tuple[tuple, np.ndarray] | None = None

    def add(self, key: tuple, labels: np.ndarray, weights: np.ndarray) -> None:
        """Append one fold's neighbours' class indices and vote weights (Q, k) for setting ``key``."""
        self._parts.setdefault(key, []).append((labels, weights))
        self._last = None

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = tuple(key)
        if self._last is None or self._last[0] != key:
            parts = self._parts[key]
            self._last = (key, np.concatenate([dense_vote(lab, w, self._n) for lab, w in parts]))
        return self._last[1]

    def __iter__(self) -> Iterator[tuple]:
        return iter(self._parts)

    def __len__(self) -> int:
        return len(self._parts)


def in_metric(queries: np.ndarray, refs: np.ndarray, ref_labels: np.ndarray,
              metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(queries, refs) in the space the vote compares under ``metric``: "whitened" fits the whitening on the
    references and their labels (``retrieval.metric``)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric == "cosine":
        return queries, refs
    wh = fit_whitening(refs, ref_labels)
    return wh.apply(queries), wh.apply(refs)


def probe_matrix(probe: LinearProbe, queries: np.ndarray, index: Mapping[str, int],
                 n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, n_classes) with the probe's species at their ``index`` columns and 0 elsewhere, and a
    (n_classes,) mask of the species the probe knows). A probe's species outside ``index`` (a fine-tuned head's
    species the gallery has no photo of) are left out and the rest renormalised, as identification does."""
    pairs = [(i, index[s]) for i, s in enumerate(probe.species) if s in index]
    rows, cols = [i for i, _ in pairs], [c for _, c in pairs]
    known = np.zeros(n_classes, dtype=bool)
    known[cols] = True
    p = np.zeros((len(queries), n_classes))
    p[:, cols] = probe.predict_proba(queries)[:, rows]
    total = p.sum(axis=1, keepdims=True)
    return np.divide(p, total, out=np.zeros_like(p), where=total > 0), known


def blend_matrix(knn: np.ndarray, probe: np.ndarray, known: np.ndarray, weight: float) -> np.ndarray:
    """Matrix form of ``retrieval.blend.blend_knn_probe``; ``known`` masks the probe's classes."""
    mass = (knn * known).sum(axis=1, keepdims=True)
    return np.where(known, (1 - weight) * knn + weight * mass * probe, knn)


def photo_nll(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-photo log-loss of probabilities ``p`` (N, n) for true classes ``y``."""
    return -np.log(np.clip(p[np.arange(len(y)), y], 1e-9, 1.0))


def plateau_pick(candidates: Sequence, losses: Sequence[np.ndarray], distance: Callable[[Any], float]) -> tuple:
    """Among ``candidates`` (each with per-photo losses), the one nearest the prior (``distance``) whose mean
    loss is within one standard error (paired, per photo) of the best one's. Returns (candidate, index)."""
    means = np.array([float(np.mean(v)) for v in losses])
    best = int(np.argmin(means))
    plateau = []
    for i, v in enumerate(losses):
        diff = v - losses[best]
        se = float(np.std(diff, ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else 0.0
        if means[i] <= means[best] + se + 1e-12:
            plateau.append(i)
    i = min(plateau, key=lambda j: (distance(candidates[j]), means[j]))
    return candidates[i], i


def _log_step(value: float, prior: float) -> float:
    return abs(math.log(value / prior)) if value > 0 and prior > 0 else abs(value - prior)


def cv_splits(x: np.ndarray, y: np.ndarray, folds: int, seed: int,
              groups: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified folds of the gallery with near-duplicates kept together: [(rest, held), ...]. ``groups``:
    ``index.pairs.copy_groups`` of ``x`` (cosine >= DUPLICATE_COSINE), when already computed."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    groups = photo_groups(x) if groups is None else groups
    if len(np.unique(groups)) == len(x):
        return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y))
    return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups))


@dataclass
class OutOfFold:
    """Out-of-fold probabilities of every grid value: what a rule chooses from (``select_settings``)."""

    y: np.ndarray  # (Q,) true class index of every held-out photo
    knn: Mapping[tuple[int, float, str], np.ndarray]  # (k, T, metric) -> (Q, n) kNN vote (:class:`Votes`)
    probe: dict[float, np.ndarray]  # C -> (Q, n) probe probabilities (zero on species it does not know)
    known: dict[float, np.ndarray]  # C -> (Q, n) bool: the species that probe knows
    weights: tuple[float, ...]
    selected_on: str

    def blended(self, c: float, kt: tuple[int, float, str], w: float) -> np.ndarray:
        """The blend of one grid point."""
        return blend_matrix(self.knn[kt], self.probe[c], self.known[c], w)

    def top1(self, p: np.ndarray) -> float:
        """Top-1 accuracy of probabilities ``p``."""
        return float((p.argmax(1) == self.y).mean())


def out_of_fold(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    fingerprint: str,
    val_embeddings: np.ndarray | None = None,
    val_labels: Sequence[str] | None = None,
    val_name: str = "val",
    folds: int = 5,
    grid: SelectionGrid | None = None,
    seed: int = 0,
    probe: LinearProbe | None = None,
    progress: bool = False,
    sample: np.ndarray | None = None,
) -> OutOfFold:
    """Held-out probabilities over the grid: by cross-validation over the gallery, or on validation photos.
    ``progress``: a bar over the folds' settings (each kNN vote's (metric, k, T) and each probe's C, fold by fold),
    the warnings logged meanwhile written above it (``logging_redirect_tqdm``).

    ``sample`` (cross-validation only): the positions of the photos whose held-out votes are scored (the queries,
    :func:`selection_sample`); the folds and near-copy groups are made over them alone, and each held-out photo
    votes over every gallery photo but those of its fold and its own near-copies (cosine >= DUPLICATE_COSINE): the
    vote is tuned at the gallery's density. The probe of each fold (its C) trains on the sample's other folds only.
    None: every photo is a query, voting over the other folds (the folds are then the whole gallery)."""
    from tqdm.auto import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    grid = grid or SelectionGrid()
    if len(labels) == 0:
        raise ValueError("the gallery has no searchable references (none added, or all excluded: see "
                         "'speciesid clean --restore'); add reference photos first")
    if val_embeddings is None and folds < 2:
        raise ValueError(f"--folds must be at least 2 (got {folds})")
    species = sorted(set(labels))  # the gallery's: a fixed head's other species are no answer (probe_matrix)
    index = {s: i for i, s in enumerate(species)}
    y = np.array([index[s] for s in labels], dtype=np.int64)
    x = np.asarray(embeddings, dtype=np.float32)
    if val_embeddings is not None:
        unknown_val = sorted(set(val_labels or []) - set(species))
        if unknown_val:
            logger.warning("validation species not in the gallery are ignored for selection: %s", unknown_val)
        keep = [i for i, s in enumerate(val_labels or []) if s in index]
        if not keep:
            raise ValueError(f"none of the {val_name} photos is of a gallery species (or none was readable), so "
                             "they cannot choose the settings; give photos of the gallery's species, or leave "
                             "--val-root out to choose by cross-validation")
        splits = [(np.arange(len(x)), np.asarray(val_embeddings, np.float32)[keep], np.array(
            [index[val_labels[i]] for i in keep]))]
        selected_on = f"val:{val_name}"
    elif sample is None:
        groups = photo_groups(x, progress=progress)  # all pairs: n² (SELECTION_MAX_PHOTOS bounds n)
        n_folds = _fold_count(y, groups, species, folds)
        splits = [(rest, x[held], y[held]) for rest, held in cv_splits(x, y, n_folds, seed, groups)]
    else:
        sample = np.asarray(sample, dtype=np.int64)
        xs, ys = x[sample], y[sample]
        groups = photo_groups(xs, progress=progress)  # all pairs of the sample: n² (SELECTION_MAX_PHOTOS bounds n)
        n_folds = _fold_count(ys, groups, species, folds)
        outside = np.setdiff1d(np.arange(len(x)), sample)  # references only: no fold holds them out
        x_out = x[outside]  # the same for every fold: copied once
        splits, trains, excludes = [], [], []
        for rest, held in cv_splits(xs, ys, n_folds, seed, groups):
            refs = np.setdiff1d(np.arange(len(x)), sample[held])  # every photo but this fold's
            splits.append((refs, xs[held], ys[held]))
            trains.append(sample[rest])
            excludes.append(_near_copies(xs[held], x_out, np.searchsorted(refs, outside)))
        del x_out
    if val_embeddings is None:
        selected_on = f"cv:{n_folds}-fold" + (" (head fixed; it was trained on these photos)" if probe else "")
    if sample is None or val_embeddings is not None:  # each fold's references train its probe; no pair excluded
        trains, excludes = [rest for rest, _, _ in splits], [None] * len(splits)
    n = len(species)
    Cs = (probe.calibration.C,) if probe is not None else grid.Cs
    knn_oof = Votes(n)
    probe_oof: dict[float, list[np.ndarray]] = {}
    known_oof: dict[float, list[np.ndarray]] = {}
    truth: list[np.ndarray] = []
    metrics = list(grid.metrics)
    if "whitened" in metrics and not all(_spread(y[rest]) for rest, _, _ in splits):
        logger.info("kNN metric: cosine only (a fold has no species with 2+ references to fit the whitening on)")
        metrics.remove("whitened")
    kts = list(itertools.product(grid.ks, grid.temperatures))
    where = f"{len(splits)} folds" if val_embeddings is None else "the validation photos"
    with (logging_redirect_tqdm() if progress else contextlib.nullcontext(),  # closed on an error too
          tqdm(total=len(splits) * (len(metrics) * len(kts) + len(Cs)), desc=f"choosing settings ({where})",
               unit="setting", disable=not progress) as bar):
        for (rest, q, qy), train_on, exclude in zip(splits, trains, excludes, strict=True):
            truth.append(qy)
            xr, yr = x[rest], y[rest]  # this fold's references: one copy for every metric
            for metric in metrics:
                qm, refs = in_metric(q, xr, yr, metric)  # the whitening: this fold's references only
                tops = knn_top(qm, refs, grid.ks, exclude=exclude)  # blocks of queries: never the Q x R matrix
                for k, t in kts:
                    top, top_sims = tops[k]
                    knn_oof.add((k, t, metric), yr[top], vote_weights(top_sims, t))
                    bar.update()
                del qm, refs, tops  # before the next metric's: one whitened copy alive at a time
            del xr, yr
            for c in Cs:
                fitted = probe or train_probe(x[train_on], [species[i] for i in y[train_on]], fingerprint=fingerprint,
                                              C=c)
                p, known = probe_matrix(fitted, q, index, n)
                probe_oof.setdefault(c, []).append(p)
                known_oof.setdefault(c, []).append(np.broadcast_to(known, p.shape))
                bar.update()
    return OutOfFold(
        y=np.concatenate(truth),
        knn=knn_oof,
        probe={c: np.concatenate(v) for c, v in probe_oof.items()},
        known={c: np.concatenate(v) for c, v in known_oof.items()},
        weights=tuple(grid.weights),
        selected_on=selected_on,
    )


def _near_copies(queries: np.ndarray, others: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, reference positions ``at[j]``) of the pairs of ``queries`` and ``others`` (rows j) at or above
    DUPLICATE_COSINE: a held-out photo's near-copies among the references no fold holds out (exact, by tiles)."""
    from index.pairs import similar_pairs

    pairs = similar_pairs(queries, others, threshold=DUPLICATE_COSINE)
    rows = np.array([i for i, _, _ in pairs], dtype=np.int64)
    cols = np.array([j for _, j, _ in pairs], dtype=np.int64)
    return rows, np.asarray(at, dtype=np.int64)[cols]


def _fold_count(y: np.ndarray, groups: np.ndarray, species: Sequence[str], folds: int) -> int:
    """The folds cross-validation can make: at most ``folds``, and no more than the distinct photos (near-duplicate
    groups, ``index.pairs.copy_groups``: one fold holds a whole group) of the species with the fewest. ValueError,
    naming them, when a species has fewer than 2: no fold could hold one of its photos out and keep another."""
    distinct = distinct_photos(groups, y)
    few = sorted(species[c] for c, n in distinct.items() if n < MIN_PROBE_PHOTOS)
    if few:
        photos = {species[c]: int((y == c).sum()) for c in distinct}
        named = ", ".join(f"{s} ({photos[s]} photo{'s' * (photos[s] > 1)}"
                          + (", all near-copies of one" if photos[s] > 1 else "") + ")" for s in few[:5])
        raise FewPhotosError(
            few,
            f"every species needs at least {MIN_PROBE_PHOTOS} distinct reference photos (not near-copies of each "
            f"other: cosine < {DUPLICATE_COSINE}) to choose settings by cross-validation; {len(few)} have one: {named}"
            f"{', ...' if len(few) > 5 else ''}: add other photos of them, or choose the settings on other photos "
            "(--val-root)")
    n_folds = int(min(folds, min(distinct.values())))
    if n_folds < folds:
        fewest = min(distinct, key=lambda c: distinct[c])
        logger.warning("cross-validation in %d folds, not %d: %s has %d distinct photos (near-copies count once), "
                       "and each fold must hold one out", n_folds, folds, species[fewest], distinct[fewest])
    return n_folds


def _spread(labels: np.ndarray) -> bool:
    """Whether some species has 2+ references (the whitening needs within-species spread)."""
    return bool(len(labels)) and int(np.bincount(labels).max()) >= 2


def choose(oof: OutOfFold, rule: str = DEFAULT_RULE) -> tuple[float, int, float, float, str]:
    """(C, k, T, blend weight, metric) chosen from out-of-fold scores by ``rule`` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")
    Cs, kts, ws, y = list(oof.probe), list(oof.knn), list(oof.weights), oof.y
    if rule == "argmax":
        scores = {(c, k, t, w, m): oof.top1(oof.blended(c, (k, t, m), w)) for c in Cs for k, t, m in kts for w in ws}
        return max(scores, key=lambda kk: (scores[kk], -abs(kk[3] - 0.5), kk[0] == 10.0, kk[4] == PRIOR["metric"]))
    c = Cs[0]
    if len(Cs) > 1:  # the probe alone
        c, _ = plateau_pick(Cs, [photo_nll(oof.probe[cc], y) for cc in Cs], lambda cc: _log_step(cc, PRIOR["C"]))
    (k, t, m), _ = plateau_pick(kts, [photo_nll(oof.knn[kt], y) for kt in kts],  # the kNN vote alone
                                lambda kt: 100.0 * (kt[2] != PRIOR["metric"]) + _log_step(kt[0], PRIOR["k"])
                                + _log_step(kt[1], PRIOR["temperature"]))
    w, _ = plateau_pick(ws, [photo_nll(oof.blended(c, (k, t, m), ww), y) for ww in ws],  # then the blend of the two
                        lambda ww: abs(ww - PRIOR["weight"]))
    return c, k, t, w, m


def select_settings(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    fingerprint: str,
    val_embeddings: np.ndarray | None = None,
    val_labels: Sequence[str] | None = None,
    val_name: str = "val",
    folds: int = 5,
    grid: SelectionGrid | None = None,
    target_precision: float = 0.95,
    seed: int = 0,
    probe: LinearProbe | None = None,
    rule: str = DEFAULT_RULE,
    blend_weight: float | None = None,
    progress: bool = False,
) -> Calibration:
    """Pick C, the kNN metric, k, T, blend weight (by ``rule``, see the module docstring) and the unknown threshold.

    Species with fewer than 2 distinct photos cannot be cross-validated: they are left out of the choice, recorded in
    ``Calibration.left_out`` (refused only when fewer than 2 species remain).
    With ``probe`` (a fixed head, e.g. a fine-tuned network's) no probe is trained: C is the probe's own
    and only k, T, the blend weight and the threshold are chosen; the probe may know species the gallery
    lacks. Out-of-fold, each fold's kNN votes from the other folds with that same probe. With ``blend_weight``
    the weight is fixed there, not chosen (the other settings and the threshold still are). ``progress``: a bar
    over the folds' settings (hidden by ``-q``).
    """
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {', '.join(RULES)}")
    if blend_weight is not None:
        grid = replace(grid or SelectionGrid(), weights=(check_weight(blend_weight),))
    def oof_of(x: np.ndarray, y: Sequence[str], queries: np.ndarray | None = None) -> OutOfFold:
        return out_of_fold(x, y, fingerprint=fingerprint, val_embeddings=val_embeddings, val_labels=val_labels,
                           val_name=val_name, folds=folds, grid=grid, seed=seed, probe=probe, progress=progress,
                           sample=queries)

    counts = Counter(labels)
    sample, cap = ((None, 0) if val_embeddings is not None
                   else selection_sample(labels, max_photos=SELECTION_MAX_PHOTOS, seed=seed))
    if sample is not None:  # n² copy grouping and the probes' cross-validation: bounded by the queries (module docs)
        logger.warning("choosing the settings on the held-out votes of %d of the %d gallery photos (at most %d a "
                       "species, seed %d), each voting over every other photo but its fold's and its near-copies: "
                       "cross-validation over more than %d photos would take hours. The probe's C is chosen on "
                       "probes trained on those %d photos alone; %s",
                       len(sample), len(labels), cap, seed, SELECTION_MAX_PHOTOS, len(sample),
                       "the final probe trains on all" if probe is None else "the head is fixed (nothing is trained)")
    left_out: dict[str, int] = {}
    try:
        oof = oof_of(embeddings, labels, sample)
    except FewPhotosError as exc:  # a rare species' single photo must not keep the rest from being calibrated
        few = set(exc.species)
        keep = [i for i, s in enumerate(labels) if s not in few] if sample is None else \
            sample[[labels[i] not in few for i in sample.tolist()]]
        if len({labels[i] for i in keep}) < 2:
            raise
        # a species the subsample cut (more than `cap` photos) may have distinct photos outside it: grouped again
        # on all its photos, it is left out of the choice only (and the probe still learns it) when it has 2
        cut = {s for s in few if sample is not None and counts[s] > cap
               and _distinct_of(embeddings, labels, s) >= MIN_PROBE_PHOTOS}
        left_out = {s: counts[s] for s in sorted(few) if s not in cut}
        if cut:
            logger.info("%d species left out of the choice of the settings only (their sampled photos are "
                        "near-copies of one, the rest of their photos are not): %s", len(cut),
                        "the probe still learns them" if probe is None else "the fixed head is used as it is")
        if sample is None:  # the species left out are no references either (as they always were here)
            oof = oof_of(np.asarray(embeddings)[keep], [labels[i] for i in keep])
        else:  # no query of theirs; their photos still vote, as they do in the gallery
            oof = oof_of(embeddings, labels, np.asarray(keep))
    calibration = calibration_from(oof, rule, target_precision)
    calibration.left_out = left_out
    if sample is not None:  # said with the settings (probe.json, the CLI's "settings chosen on ...")
        total = sum(counts.values())
        calibration.selected_on += (f" (queries: {len(oof.y)} of {total} photos, at most {cap} a species, seed "
                                    f"{seed}, voting over all the others)")
        calibration.metrics["gallery_photos"] = float(total)
    return calibration


def _distinct_of(x: np.ndarray, labels: Sequence[str], species: str) -> int:
    """The distinct photos of ``species`` among all its rows of ``x`` (:func:`photo_groups` over that species
    only): the count ``probe train``'s left-out rule uses without a subsample."""
    return distinct_count(np.asarray(x)[[i for i, s in enumerate(labels) if s == species]])


def calibration_from(oof: OutOfFold, rule: str = DEFAULT_RULE, target_precision: float = 0.95) -> Calibration:
    """The :class:`Calibration` a rule chooses from out-of-fold scores, with its unknown threshold and figures."""
    c, k, t, w, m = choose(oof, rule)
    y = oof.y
    b = oof.blended(c, (k, t, m), w)
    thr, prec, cov = precision_threshold(b.max(1), b.argmax(1) == y, target_precision)
    answered, least = round(cov * len(y)), min_answered(target_precision)
    if cov == 0.0:  # no threshold reaches the target here: one of 1.0 would answer "unknown" to every photo
        logger.warning("no unknown threshold reaches %.0f%% precision on these %d photos (blend top-1 %.3f): the "
                       "default %.2f is kept", 100 * target_precision, len(y), oof.top1(b), DEFAULT_UNKNOWN_THRESHOLD)
        thr = DEFAULT_UNKNOWN_THRESHOLD
    elif answered < least:  # a threshold set by a few lucky photos (a larger one answers fewer still)
        logger.warning("the unknown threshold %.2f reaches %.0f%% precision on these %d photos, but only %d photos "
                       "answered above it: too few to trust (at least %d, so that one wrong answer can show): the "
                       "default %.2f is kept; add reference photos, or give --val-root more validation photos",
                       thr, 100 * target_precision, len(y), answered, least, DEFAULT_UNKNOWN_THRESHOLD)
        thr, prec, cov = DEFAULT_UNKNOWN_THRESHOLD, float("nan"), 0.0
    metrics = {
        "queries": float(len(y)),
        "knn_top1": oof.top1(oof.knn[k, t, m]),
        "probe_top1": oof.top1(oof.blended(c, (k, t, m), 1.0)),
        "blend_top1": oof.top1(b),
        "blend_nll": float(photo_nll(b, y).mean()),
        "unknown_precision": prec,
        "unknown_coverage": cov,
        # photos answered above the threshold that reached the target (0: none did); under unknown_min_answered the
        # default was kept (unknown_coverage 0)
        "unknown_answered": float(answered),
        "unknown_min_answered": float(least),
    }
    logger.info("selected C=%s k=%s T=%s w=%s metric=%s on %s by %s: %s", c, k, t, w, m, oof.selected_on, rule,
                metrics)
    return Calibration(C=c, blend_weight=w, k=k, temperature=t, unknown_threshold=thr, selected_on=oof.selected_on,
                       metrics=metrics, rule=rule, metric=m)
