"""Pair search: every pair of embeddings at or above a cosine similarity (duplicates, near-duplicates, leaks), and
the groups of copies those pairs make (:func:`copy_groups`: the one copy rule of suspect labels and of cross-validation's folds).

Exact, by blocked inner products of L2-normalised rows (numpy matmul, one ``block`` x ``block`` tile at a time,
so memory stays at a tile whatever the sizes); numpy in, pairs out. Within one set only the tiles on and above
the diagonal are computed. Measured against the FAISS ``IndexFlatIP.range_search`` this replaced:
benchmarks/bench_clean.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np

#: Rows per side of a similarity tile: 2048 x 2048 float32 = 16 MiB (+ 4 MiB mask).
DEFAULT_BLOCK = 2048
#: Rounding slack: a pair a hair under the threshold from float32 sums still counts (copies at threshold 1.0).
_SLACK = 1e-6


def _tile_pairs(
    a: np.ndarray, base: np.ndarray, threshold: float, upper: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows of ``a``, rows of ``base``, similarities) of one tile at or above ``threshold``; ``upper``: only j > i."""
    sims = a @ base.T
    hit = sims >= threshold - _SLACK
    if upper:
        hit = np.triu(hit, k=1)
    i, j = np.nonzero(hit)
    return i, j, sims[i, j]


def _best_first(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> list[tuple[int, int, float]]:
    """Pairs sorted by similarity (highest first), then i, then j; similarities clamped to 1.0."""
    s = np.minimum(s, np.float32(1.0))
    order = np.lexsort((j, i, -s))
    return list(zip(i[order].tolist(), j[order].tolist(), s[order].tolist(), strict=True))


def similar_pairs(
    a: np.ndarray, b: np.ndarray | None = None, *, threshold: float, block: int = DEFAULT_BLOCK,
    progress: bool = False,
) -> list[tuple[int, int, float]]:
    """Every pair with cosine similarity >= ``threshold`` (rows L2-normalised), best first.

    ``b is None``: pairs (i, j, sim) within ``a`` with i < j. Otherwise pairs (i in a, j in b).
    ``block``: rows per side of the similarity tile computed at once (memory: ``block``² floats).
    ``progress``: a bar over the tiles (all n² pairs within one set: long at 100k+ rows).
    """
    from tqdm.auto import tqdm

    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    base = a if b is None else np.ascontiguousarray(b, dtype=np.float32)
    if not len(a) or not len(base):
        return []
    parts_i, parts_j, parts_s = [], [], []
    na, nb = -(-len(a) // block), -(-len(base) // block)
    tiles = na * (na + 1) // 2 if b is None else na * nb
    shown = progress and tiles > 1  # no bar object at all otherwise (other bars' owners count theirs)
    with tqdm(total=tiles, desc="grouping near-copies", unit="tile") if shown else contextlib.nullcontext() as bar:
        for s in range(0, len(a), block):
            for t in range(s if b is None else 0, len(base), block):  # within one set: tiles on/above the diagonal
                i, j, sims = _tile_pairs(a[s : s + block], base[t : t + block], float(threshold),
                                         b is None and s == t)
                parts_i.append(i + s)
                parts_j.append(j + t)
                parts_s.append(sims)
                if bar is not None:
                    bar.update()
    return _best_first(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s))


def copy_groups(x: np.ndarray, *, threshold: float, sha256: Sequence[str | None] = (),
                block: int = DEFAULT_BLOCK, progress: bool = False) -> np.ndarray:
    """The copy rule, in one place: (N,) group label of every row, rows in one group being copies of one photo:
    connected components of the pairs with cosine >= ``threshold`` (:func:`similar_pairs`, rows L2-normalised)
    and of the rows with the same ``sha256`` (when given; None or "" never matches). A burst of near-copies is
    one group. Labels are row positions (a group's label is one of its rows). ``progress``: a bar over the tiles.

    The labels are the roots of this union-find (the pairs best first, then the same-sha256 rows), kept rather
    than scipy's ``connected_components``: the groups would be the same, but any relabelling of them (each to its
    smallest row, say) reorders them, and cross-validation's folds (``StratifiedGroupKFold`` sorts the labels)
    and every CV figure with them would move (tests/test_pairs.py freezes the labels)."""
    parent = np.arange(len(x))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b, _ in similar_pairs(x, threshold=threshold, block=block, progress=progress):
        parent[find(a)] = find(b)
    first: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        if digest:
            j = first.setdefault(digest, i)
            if j != i:
                parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(x))], dtype=np.int64)
