"""Choose the kNN vote defaults (k, temperature, unknown threshold) by measurement.

Selection is by leave-one-out on the ph-snakes *train* gallery only; val is then scored once with the
chosen values, so the val figure is not tuned on val. Real MobileNetV1 weights.

    .venv/bin/python benchmarks/tune_knn.py
"""

from __future__ import annotations

import argparse

import numpy as np
from _common import MOBILENET_SPEC, require_shared, split_embeddings
from _hardware import machine_report

from retrieval.calibrate import knn_matrix
from retrieval.metrics import precision_threshold


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=MOBILENET_SPEC)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--target-precision", type=float, default=0.95)
    args = ap.parse_args()
    print(machine_report(), flush=True)
    require_shared()
    tr, tr_lab, _ = split_embeddings(args.encoder, "train", args.precision)
    va, va_lab, _ = split_embeddings(args.encoder, "val", args.precision)
    species = sorted(set(tr_lab))
    index = {s: i for i, s in enumerate(species)}
    y_tr = np.array([index[s] for s in tr_lab])
    y_va = np.array([index[s] for s in va_lab])
    n = len(species)
    ks = [1, 3, 5, 7, 10, 15, 20, 30]
    ts = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 1.0]
    print(f"encoder {args.encoder} ({args.precision}); gallery {len(tr)} train photos, {len(va)} val queries")
    print("leave-one-out top-1 on train (rows k, columns T):")
    print("   k " + "".join(f"{t:>8}" for t in ts))
    grid = {}
    for k in ks:
        for t in ts:
            loo = knn_matrix(tr, tr, y_tr, n, k, t, exclude_self=True)
            grid[k, t] = float((loo.argmax(1) == y_tr).mean())
        print(f"{k:4d} " + "".join(f"{grid[k, t]:8.3f}" for t in ts))
    k_best, t_best = max(grid, key=lambda kt: (round(grid[kt], 3), -kt[0]))
    chosen = knn_matrix(va, tr, y_tr, n, k_best, t_best)
    one_nn = knn_matrix(va, tr, y_tr, n, 1, 1.0)
    print(f"chosen k={k_best} T={t_best}: LOO train {grid[k_best, t_best]:.3f}")
    print(
        f"val top-1: chosen vote {(chosen.argmax(1) == y_va).mean():.3f}  |  1-NN {(one_nn.argmax(1) == y_va).mean():.3f}"
    )
    loo = knn_matrix(tr, tr, y_tr, n, k_best, t_best, exclude_self=True)
    thr, prec, cov = precision_threshold(loo.max(1), loo.argmax(1) == y_tr, args.target_precision)
    answered = chosen.max(1) >= thr
    correct = chosen.argmax(1) == y_va
    print(
        f"unknown threshold for {args.target_precision:.0%} precision (LOO train): {thr:.2f} "
        f"(train precision {prec:.3f}, coverage {cov:.3f}); on val: precision "
        f"{correct[answered].mean():.3f}, coverage {answered.mean():.3f}"
    )


if __name__ == "__main__":
    main()
