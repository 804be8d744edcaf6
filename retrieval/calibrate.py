"""Choose the probe's C, the kNN k/T, the blend weight and the unknown threshold by measurement.

Without a separate validation set the choice is made out-of-fold: the gallery is split into
stratified folds, each fold is identified against the rest (kNN over the rest, a probe trained on the
rest), and the settings with the best out-of-fold top-1 of the blend win. With a validation set
(``val_emb``), the whole gallery is the reference set and the validation photos are the queries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.model_selection import StratifiedKFold

from retrieval.metrics import precision_threshold
from retrieval.probe import Calibration, LinearProbe, train_probe

logger = logging.getLogger(__name__)


@dataclass
class SelectionGrid:
    """Values tried during selection."""

    Cs: tuple[float, ...] = (1.0, 5.0, 20.0, 50.0)  # probe regularisation
    ks: tuple[int, ...] = (10, 20, 30)  # neighbours
    temperatures: tuple[float, ...] = (0.02, 0.03, 0.05)  # vote temperature
    weights: tuple[float, ...] = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 1.0)  # blend weight (0 = kNN, 1 = probe)


def knn_matrix(
    queries: np.ndarray,
    refs: np.ndarray,
    ref_labels: np.ndarray,
    n_classes: int,
    k: int,
    temperature: float,
    *,
    exclude_self: bool = False,
) -> np.ndarray:
    """Vectorised kNN vote: (Q, n_classes) probabilities (ref_labels are class indices)."""
    sims = queries @ refs.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    k = min(k, refs.shape[0])
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(sims, top, axis=1)
    w = np.exp((top_sims - top_sims.max(axis=1, keepdims=True)) / temperature)
    out = np.zeros((len(queries), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(queries)), k)
    np.add.at(out, (rows, ref_labels[top].reshape(-1)), w.reshape(-1))
    return out / out.sum(axis=1, keepdims=True)


def blend_matrix(knn: np.ndarray, probe: np.ndarray, known: np.ndarray, weight: float) -> np.ndarray:
    """Matrix form of ``retrieval.blend.blend_knn_probe``; ``known`` masks the probe's classes."""
    mass = (knn * known).sum(axis=1, keepdims=True)
    return np.where(known, (1 - weight) * knn + weight * mass * probe, knn)


def select_settings(
    embeddings: np.ndarray,
    labels: Sequence[str],
    *,
    fingerprint: str,
    val_embeddings: np.ndarray | None = None,
    val_labels: Sequence[str] | None = None,
    val_name: str = "val",
    folds: int = 3,
    grid: SelectionGrid | None = None,
    target_precision: float = 0.95,
    seed: int = 0,
    probe: LinearProbe | None = None,
) -> Calibration:
    """Pick C, k, T, blend weight (best blended top-1) and the unknown threshold (target precision).

    With ``probe`` (a fixed head, e.g. a fine-tuned network's) no probe is trained: C is the probe's own
    and only k, T, the blend weight and the threshold are chosen; the probe may know species the gallery
    lacks. Out-of-fold, each fold's kNN votes from the other folds with that same probe.
    """
    grid = grid or SelectionGrid()
    species = sorted(set(labels) | set(probe.species if probe is not None else ()))
    index = {s: i for i, s in enumerate(species)}
    y = np.array([index[s] for s in labels])
    x = np.asarray(embeddings, dtype=np.float32)
    if val_embeddings is not None:
        unknown_val = sorted(set(val_labels or []) - set(species))
        if unknown_val:
            logger.warning("validation species not in the gallery are ignored for selection: %s", unknown_val)
        keep = [i for i, s in enumerate(val_labels or []) if s in index]
        splits = [(np.arange(len(x)), np.asarray(val_embeddings, np.float32)[keep], np.array(
            [index[val_labels[i]] for i in keep]))]
        selected_on = f"val:{val_name}"
    else:
        counts = np.bincount(y)
        n_folds = int(min(folds, counts[counts > 0].min()))
        if n_folds < 2:
            raise ValueError("every species needs at least 2 reference photos to choose settings by cross-validation")
        splits = []
        folds_ = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for rest, held in folds_.split(x, y):
            splits.append((rest, x[held], y[held]))
        selected_on = f"cv:{n_folds}-fold" + (" (head fixed; it was trained on these photos)" if probe else "")
    n = len(species)
    Cs = (probe.calibration.C,) if probe is not None else grid.Cs
    correct: dict[tuple, int] = {}
    total = 0
    oof: dict[tuple, list[np.ndarray]] = {}
    truth: list[np.ndarray] = []
    for rest, q, qy in splits:
        total += len(q)
        truth.append(qy)
        knns = {
            (k, t): knn_matrix(q, x[rest], y[rest], n, k, t) for k in grid.ks for t in grid.temperatures
        }
        for c in Cs:
            fitted = probe or train_probe(x[rest], [species[i] for i in y[rest]], fingerprint=fingerprint, C=c)
            cols = [index[s] for s in fitted.species]
            known = np.zeros(n, dtype=bool)
            known[cols] = True
            p = np.zeros((len(q), n))
            p[:, cols] = fitted.predict_proba(q)
            for (k, t), kn in knns.items():
                for w in grid.weights:
                    b = blend_matrix(kn, p, known, w)
                    key = (c, k, t, w)
                    correct[key] = correct.get(key, 0) + int((b.argmax(1) == qy).sum())
                    oof.setdefault(key, []).append(b)
    best_key = max(correct, key=lambda kk: (correct[kk], -abs(kk[3] - 0.5), kk[0] == 10.0))
    c, k, t, w = best_key
    y_all = np.concatenate(truth)
    b = np.concatenate(oof[best_key])
    thr, prec, cov = precision_threshold(b.max(1), b.argmax(1) == y_all, target_precision)
    knn_acc = max(correct[(cc, k, t, 0.0)] for cc in Cs) / total
    metrics = {
        "queries": float(total),
        "knn_top1": knn_acc,
        "probe_top1": correct[(c, k, t, 1.0)] / total,
        "blend_top1": correct[best_key] / total,
        "unknown_precision": prec,
        "unknown_coverage": cov,
    }
    logger.info("selected C=%s k=%s T=%s w=%s on %s: %s", c, k, t, w, selected_on, metrics)
    return Calibration(
        C=c, blend_weight=w, k=k, temperature=t, unknown_threshold=thr, selected_on=selected_on, metrics=metrics
    )
