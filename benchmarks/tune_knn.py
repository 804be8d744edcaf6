"""Choose the kNN vote defaults (k, temperature, unknown threshold) by measurement.

Selection is by leave-one-out on the ph-snakes *train* gallery only; val is then scored once with the
chosen values, so the val figure is not tuned on val. Real MobileNetV1 weights.

    .venv/bin/python benchmarks/tune_knn.py
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict

import numpy as np
from _common import MOBILENET_SPEC, require_shared, split_embeddings


def vote_scores(sims: np.ndarray, labels: list[str], k: int, t: float) -> list[dict[str, float]]:
    """Per query: species -> probability from its k best (sims rows already sorted best first)."""
    out = []
    for row_s, row_l in zip(sims[:, :k], labels, strict=True):
        top = row_s[0]
        acc: dict[str, float] = defaultdict(float)
        for s, lab in zip(row_s, row_l[:k], strict=True):
            acc[lab] += math.exp((s - top) / t)
        z = sum(acc.values())
        out.append({lab: v / z for lab, v in acc.items()})
    return out


def neighbours(q: np.ndarray, g: np.ndarray, g_labels: list[str], k: int, exclude_self: bool):
    sims = q @ g.T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :k]
    return np.take_along_axis(sims, order, axis=1), [[g_labels[j] for j in row] for row in order]


def accuracy(scores: list[dict[str, float]], truth: list[str]) -> float:
    return float(np.mean([max(s, key=s.get) == t for s, t in zip(scores, truth, strict=True)]))


def threshold_for_precision(scores, truth, target: float) -> tuple[float, float, float]:
    """Smallest threshold whose answered set reaches `target` precision: (threshold, precision, coverage)."""
    best = np.array([max(s.values()) for s in scores])
    correct = np.array([max(s, key=s.get) == t for s, t in zip(scores, truth, strict=True)])
    for thr in np.round(np.arange(0.0, 1.0001, 0.01), 2):
        answered = best >= thr
        if answered.sum() and correct[answered].mean() >= target:
            return float(thr), float(correct[answered].mean()), float(answered.mean())
    return 1.0, float("nan"), 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default=MOBILENET_SPEC)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--target-precision", type=float, default=0.95)
    args = ap.parse_args()
    require_shared()
    tr, tr_lab, _ = split_embeddings(args.encoder, "train", args.precision)
    va, va_lab, _ = split_embeddings(args.encoder, "val", args.precision)
    ks = [1, 3, 5, 7, 10, 15, 20, 30]
    ts = [0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 1.0]
    loo_s, loo_l = neighbours(tr, tr, tr_lab, max(ks), exclude_self=True)
    va_s, va_l = neighbours(va, tr, tr_lab, max(ks), exclude_self=False)
    print(f"encoder {args.encoder} ({args.precision}); gallery {len(tr)} train photos, {len(va)} val queries")
    print("leave-one-out top-1 on train (rows k, columns T):")
    print("   k " + "".join(f"{t:>8}" for t in ts))
    grid = {}
    for k in ks:
        row = []
        for t in ts:
            grid[k, t] = accuracy(vote_scores(loo_s, loo_l, k, t), tr_lab)
            row.append(grid[k, t])
        print(f"{k:4d} " + "".join(f"{v:8.3f}" for v in row))
    (k_best, t_best) = max(grid, key=lambda kt: (round(grid[kt], 3), -kt[0]))
    chosen = vote_scores(va_s, va_l, k_best, t_best)
    one_nn = vote_scores(va_s, va_l, 1, 1.0)
    print(f"chosen k={k_best} T={t_best}: LOO train {grid[k_best, t_best]:.3f}")
    print(f"val top-1: chosen vote {accuracy(chosen, va_lab):.3f}  |  1-NN {accuracy(one_nn, va_lab):.3f}")
    thr, prec, cov = threshold_for_precision(vote_scores(loo_s, loo_l, k_best, t_best), tr_lab, args.target_precision)
    best = np.array([max(s.values()) for s in chosen])
    correct = np.array([max(s, key=s.get) == t for s, t in zip(chosen, va_lab, strict=True)])
    ans = best >= thr
    print(
        f"unknown threshold for {args.target_precision:.0%} precision (LOO train): {thr:.2f} "
        f"(train precision {prec:.3f}, coverage {cov:.3f}); on val: precision "
        f"{correct[ans].mean():.3f}, coverage {ans.mean():.3f}"
    )


if __name__ == "__main__":
    main()
