"""Class prototypes beside the kNN vote, and frozen + fine-tuned encoder ensembles, under the honest protocol.

MobileNetV1 (real weights) on ph-snakes. Prints, never asserts. Settings are chosen inside train only -- C, k, T, w
by ``retrieval.calibrate.select_settings`` (5-fold CV, rule seq-nll), the prototype temperature and its blend
weight by 5-fold CV log-loss -- and val, de-duplicated against train with the ``clean`` leak rule, is read once.

Columns: kNN vote, logistic probe, kNN + probe blend, nearest class prototype (softmax over species of the cosine
to the species' mean embedding / T), prototype + probe blend, and the mean of kNN and prototype blended with the
probe. Rows: the frozen encoder, then for each fine-tuned folder given (``speciesid finetune`` outputs) its own
embeddings and the frozen + fine-tuned embeddings concatenated (each half unit length, scaled by 1/sqrt 2).

    nice -n 19 .venv/bin/python benchmarks/bench_prototypes.py runs/ft-a runs/ft-b
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _common import finetuned_embeddings, frozen_splits, require_shared
from _hardware import machine_report

PROTO_T = (0.02, 0.03, 0.05, 0.08)  # prototype temperatures tried
PROTO_W = (0.25, 0.5, 0.75)  # prototype + probe blend weights tried


def prototypes(xq: np.ndarray, xr: np.ndarray, yr: np.ndarray, n: int, t: float) -> np.ndarray:
    """Softmax over species of the cosine to each species' (unit) mean reference embedding / t."""
    mu = np.stack([xr[yr == c].mean(0) for c in range(n)])
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    z = xq @ mu.T / t
    p = np.exp(z - z.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def probe_proba(xr: np.ndarray, yr: np.ndarray, xq: np.ndarray, n: int, c: float) -> np.ndarray:
    from retrieval.calibrate import probe_matrix
    from retrieval.probe import train_probe

    probe = train_probe(xr, [str(v) for v in yr], fingerprint="bench", C=c)
    return probe_matrix(probe, xq, {str(i): i for i in range(n)}, n)[0]


def prototype_settings(x: np.ndarray, y: np.ndarray, n: int, c: float, folds: int = 5) -> tuple[float, float]:
    """(T, w) of the prototype + probe blend with the least ``folds``-fold out-of-fold log-loss inside train."""
    from sklearn.model_selection import StratifiedKFold

    from retrieval.calibrate import blend_matrix

    nll = {(t, w): 0.0 for t in PROTO_T for w in PROTO_W}
    for a, b in StratifiedKFold(folds, shuffle=True, random_state=0).split(x, y):
        pp = probe_proba(x[a], y[a], x[b], n, c)
        for t in PROTO_T:
            pt = prototypes(x[b], x[a], y[a], n, t)
            for w in PROTO_W:
                pb = blend_matrix(pt, pp, np.ones(n, bool), w)
                nll[(t, w)] -= float(np.log(pb[np.arange(len(b)), y[b]] + 1e-12).sum())
    return min(nll, key=nll.get)


def row(name: str, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, n: int, folds: int = 5) -> None:
    from retrieval.calibrate import blend_matrix, knn_matrix, select_settings

    t0 = time.perf_counter()
    cal = select_settings(x, [str(v) for v in y], fingerprint="bench", folds=folds)
    known = np.ones(n, bool)
    pp = probe_proba(x, y, xv, n, cal.C)
    kn = knn_matrix(xv, x, y, n, cal.k, cal.temperature, metric=cal.metric)
    t_p, w_p = prototype_settings(x, y, n, cal.C, folds)
    pt = prototypes(xv, x, y, n, t_p)
    cols = [kn, pp, blend_matrix(kn, pp, known, cal.blend_weight), pt, blend_matrix(pt, pp, known, w_p),
            blend_matrix(0.5 * (kn + pt), pp, known, cal.blend_weight)]
    acc = " | ".join(f"{float((p.argmax(1) == yv).mean()):.3f}" for p in cols)
    print(f"| {name} | C={cal.C:g} k={cal.k} T={cal.temperature:g} w={cal.blend_weight:g}; prototypes T={t_p:g} "
          f"w={w_p:g} | {acc} | {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("finetuned", nargs="*", help="speciesid finetune output folders (timm local-dir)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: the settings chosen in 2 cross-validation folds, not 5 (figures not to quote)")
    args = ap.parse_args()
    folds = 2 if args.quick else 5
    require_shared()
    print("bench_prototypes: where it ran\n" + machine_report(), flush=True)
    d = frozen_splits()
    tr, y, yv, n = d.train, d.y, d.yv, len(d.species)
    print(f"val: {d.val_total} photos, {len(yv)} kept after de-duplication against train; read once")
    print("| features | settings (inside train) | kNN | probe | blend | prototypes | prototypes + probe | "
          "(kNN + prototypes)/2 + probe | time |")
    print("|---|---|---|---|---|---|---|---|---|")
    row("frozen", tr, y, d.val, yv, n, folds)
    for folder in args.finetuned:
        ft, ftv = finetuned_embeddings(folder, d.train_paths), finetuned_embeddings(folder, d.val_paths)
        name = folder.rstrip("/").split("/")[-1]
        row(f"fine-tuned {name}", ft, y, ftv, yv, n, folds)
        row(f"frozen + fine-tuned {name}, concatenated", np.hstack([tr, ft]) / np.sqrt(2), y,
            np.hstack([d.val, ftv]) / np.sqrt(2), yv, n, folds)


if __name__ == "__main__":
    main()
