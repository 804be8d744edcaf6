"""Pair search: every pair of embeddings at or above a cosine similarity (duplicates, near-duplicates, leaks).

Exact, through FAISS range search on inner products of L2-normalised rows; numpy in, pairs out.
"""

from __future__ import annotations

import faiss
import numpy as np


def similar_pairs(a: np.ndarray, b: np.ndarray | None = None, *, threshold: float) -> list[tuple[int, int, float]]:
    """Every pair with cosine similarity >= ``threshold`` (rows L2-normalised), best first.

    ``b is None``: pairs (i, j, sim) within ``a`` with i < j. Otherwise pairs (i in a, j in b).
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    base = a if b is None else np.ascontiguousarray(b, dtype=np.float32)
    if not len(a) or not len(base):
        return []
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    out: list[tuple[int, int, float]] = []
    radius = float(threshold) - 1e-5  # FAISS keeps similarities strictly above the radius
    for start in range(0, len(a), 4096):
        lims, sims, ids = index.range_search(a[start : start + 4096], radius)
        for q in range(len(lims) - 1):
            i = start + q
            for j, s in zip(ids[lims[q] : lims[q + 1]], sims[lims[q] : lims[q + 1]], strict=True):
                j = int(j)
                if (b is None and j <= i) or s < threshold - 1e-6:
                    continue
                out.append((i, j, min(float(s), 1.0)))
    out.sort(key=lambda t: (-t[2], t[0], t[1]))
    return out
