"""Pair search: every pair of embeddings at or above a cosine similarity (duplicates, near-duplicates, leaks), and
the groups of copies those pairs make (:func:`copy_groups`: the one copy rule of suspect labels and of
cross-validation's folds).

Exact, by blocked inner products of L2-normalised rows (numpy matmul, one ``block`` x ``block`` tile at a time,
so memory stays at a tile whatever the sizes); numpy in, pairs out. Within one set only the tiles on and above
the diagonal are computed. Measured against the FAISS ``IndexFlatIP.range_search`` this replaced:
benchmarks/bench_clean.py.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

#: Rows per side of a similarity tile: 2048 x 2048 float32 = 16 MiB (+ 4 MiB mask).
DEFAULT_BLOCK = 2048
#: Rounding slack: a pair a hair under the threshold from float32 sums still counts (copies at threshold 1.0).
_SLACK = 1e-6


def _tiles(n_rows: int, n_base: int, block: int, within: bool, progress: bool,
           desc: str, diagonal_first: bool = False) -> Iterator[tuple[int, int]]:
    """The (row, column) starts of the similarity tiles of ``n_rows`` x ``n_base`` rows, ``block`` a side (``within``:
    one set, the tiles on and above the diagonal; ``diagonal_first``: the diagonal ones before the others);
    ``progress``: a bar over them named ``desc`` (none for one tile: no bar object at all, other bars' owners count
    theirs)."""
    from tqdm.auto import tqdm

    na, nb = -(-n_rows // block), -(-n_base // block)
    tiles = na * (na + 1) // 2 if within else na * nb
    shown = progress and tiles > 1
    starts = ((s, t) for s in range(0, n_rows, block) for t in range(s if within else 0, n_base, block))
    if diagonal_first:
        starts = itertools.chain(((s, s) for s in range(0, min(n_rows, n_base), block)),
                                 ((s, t) for s, t in starts if s != t))
    with tqdm(total=tiles, desc=desc, unit="tile") if shown else contextlib.nullcontext() as bar:
        for s, t in starts:
            yield s, t
            if bar is not None:
                bar.update()


def _tile_pairs(sims: np.ndarray, threshold: float, upper: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, columns, similarities) of one similarity tile ``sims`` at or above ``threshold``; ``upper``: only
    j > i. Only the rows whose best reaches the threshold are searched for hits (a whole-tile mask, ``triu`` and
    ``nonzero`` cost more than the matrix product at 64-d)."""
    cut = np.float32(threshold - _SLACK)
    rows = np.flatnonzero(sims.max(axis=1) >= cut)
    if not rows.size:
        return rows, rows, np.zeros(0, dtype=np.float32)
    r, j = np.nonzero(sims[rows] >= cut)
    i = rows[r]
    if upper:
        keep = j > i
        i, j = i[keep], j[keep]
    return i, j, sims[i, j]


def _best_first(i: np.ndarray, j: np.ndarray, s: np.ndarray) -> list[tuple[int, int, float]]:
    """Pairs sorted by similarity (highest first), then i, then j; similarities clamped to 1.0."""
    s = np.minimum(s, np.float32(1.0))
    order = np.lexsort((j, i, -s))
    return list(zip(i[order].tolist(), j[order].tolist(), s[order].tolist(), strict=True))


def similar_pairs(
    a: np.ndarray, b: np.ndarray | None = None, *, threshold: float, block: int = DEFAULT_BLOCK,
    progress: bool = False, desc: str = "grouping near-copies",
) -> list[tuple[int, int, float]]:
    """Every pair with cosine similarity >= ``threshold`` (rows L2-normalised), best first.

    ``b is None``: pairs (i, j, sim) within ``a`` with i < j. Otherwise pairs (i in a, j in b).
    ``block``: rows per side of the similarity tile computed at once (memory: ``block``² floats).
    ``progress``: a bar over the tiles (all n² pairs within one set: long at 100k+ rows), named ``desc``.
    """
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    base = a if b is None else np.ascontiguousarray(b, dtype=np.float32)
    if not len(a) or not len(base):
        return []
    parts_i, parts_j, parts_s = [], [], []
    for s, t in _tiles(len(a), len(base), block, b is None, progress, desc):
        i, j, sims = _tile_pairs(a[s : s + block] @ base[t : t + block].T, float(threshold), b is None and s == t)
        parts_i.append(i + s)
        parts_j.append(j + t)
        parts_s.append(sims)
    return _best_first(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s))


@dataclass
class NeighbourPass:
    """One pass over every pair of a set (:func:`neighbours_and_pairs`): each row's ``k`` nearest other rows and
    every pair at or above a cosine."""

    positions: np.ndarray  # (n, k) int64: each row's nearest other rows, best first (ties: lower row); -1 pads
    sims: np.ndarray  # (n, k) float32 cosines of those rows; -inf pads (a set of k rows or fewer)
    pairs: list[tuple[int, int, float]]  # every (i, j, cosine) with i < j at or above the threshold: similar_pairs'


def neighbours_and_pairs(
    x: np.ndarray, k: int, *, threshold: float, block: int = DEFAULT_BLOCK, progress: bool = False,
    desc: str = "pairs and neighbours",
) -> NeighbourPass:
    """Each row's ``k`` nearest other rows (exact, inner product of L2-normalised rows) and every pair at or above
    ``threshold``, from one pass over the tiles on and above the diagonal (each tile serves both its rows and its
    columns): what ``similar_pairs`` + ``copy_groups`` + a leave-one-out top-k search cost three passes for.

    The pairs are the answer of :func:`similar_pairs` (the same tiles, so the same similarities, bit for bit),
    complete whatever ``k``: a row with more near-copies than ``k`` loses none. Memory: two ``block``² tiles (the
    similarities, reused, and a mask), (n, ``k``) for the neighbours, and the pairs found. The diagonal tiles come
    first (each row's ``k`` nearest within its own block: a bound); then a tile adds to a row only its entries at
    or above the row's current ``k``-th best (:func:`_merge_top`). ``progress``: a bar over the tiles.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if block < 1:
        raise ValueError(f"block must be at least 1, got {block}")
    a = np.ascontiguousarray(x, dtype=np.float32)
    n = len(a)
    best_s = np.full((n, k), -np.inf, dtype=np.float32)
    best_i = np.full((n, k), -1, dtype=np.int64)
    parts_i, parts_j, parts_s = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
    side = min(block, n)
    buf = np.empty((side, side), dtype=np.float32)  # one tile's similarities, reused: no 16 MiB page faults a tile
    for s, t in _tiles(n, n, block, True, progress, desc, diagonal_first=True):
        rows, cols = a[s : s + block], a[t : t + block]
        sims = np.matmul(rows, cols.T, out=buf[: len(rows), : len(cols)])
        i, j, v = _tile_pairs(sims, float(threshold), s == t)
        parts_i.append(i + s)
        parts_j.append(j + t)
        parts_s.append(v)
        if s == t:
            np.fill_diagonal(sims, -np.inf)  # a row is not its own neighbour
            _merge_top(best_s, best_i, s, sims, t, fresh=True)
        else:
            _merge_top(best_s, best_i, s, sims, t)
            _merge_top(best_s, best_i, t, sims, s, columns=True)
    pairs = _best_first(np.concatenate(parts_i), np.concatenate(parts_j), np.concatenate(parts_s)) if n else []
    return NeighbourPass(best_i, best_s, pairs)


#: Above every -inf (a row's own entry, a pad): an entry at or above it is a real candidate.
_LOWEST = np.float32(-np.finfo(np.float32).max)


def _merge_top(best_s: np.ndarray, best_i: np.ndarray, r0: int, sims: np.ndarray, c0: int, *,
               columns: bool = False, fresh: bool = False) -> None:
    """Merge one tile into the running top-k, in place: best first, ties by the lower column. The tile's rows are
    rows ``r0``.. and its columns the candidates ``c0``.. (``columns``: the other way round, the tile read in its
    own layout, never transposed). Only the entries at or above a row's k-th best are candidates (all of a row's
    finite entries while it holds fewer than ``k``); ``fresh``: the rows hold nothing yet, their bound is the
    tile's own k-th best of each row (one partition instead of every entry)."""
    k = best_s.shape[1]
    h, w = sims.shape
    nrows, ncols = (w, h) if columns else (h, w)
    kth = best_s[r0 : r0 + nrows, -1]
    if fresh and ncols > k:
        kth = np.partition(sims, ncols - k, axis=1)[:, ncols - k]
    cut = np.maximum(kth, _LOWEST)
    hit = np.flatnonzero(sims >= (cut[None, :] if columns else cut[:, None]))
    if not hit.size:
        return
    tr, tc = np.divmod(hit, w)
    v = sims[tr, tc] + np.float32(0.0)  # -0.0 as 0.0: equal values order by column alone
    r, c = (tc, tr + c0) if columns else (tr, tc + c0)
    touched = np.flatnonzero(np.bincount(r, minlength=nrows))
    all_r = np.concatenate([np.repeat(touched, k), r])
    all_c = np.concatenate([best_i[touched + r0].ravel(), c])
    all_v = np.concatenate([best_s[touched + r0].ravel(), v])
    bits = all_v.view(np.uint32)  # float order as unsigned order, then the lower column as the larger key
    order_bits = np.where(bits >> 31, ~bits, bits | np.uint32(0x80000000)).astype(np.uint64)
    key = (order_bits << np.uint64(32)) | (np.uint64(0xFFFFFFFF) - np.maximum(all_c, 0).astype(np.uint64))
    order = np.argsort(key)
    by_row = all_r[order].astype(np.int16 if nrows <= np.iinfo(np.int16).max else np.int64)  # int16: a radix sort
    order = order[np.argsort(by_row, kind="stable")]  # by row, each ascending: its best last
    ends = np.cumsum(np.bincount(all_r, minlength=nrows))[touched]
    take = order[ends[:, None] - 1 - np.arange(k)]  # each touched row's k best, best first (a row has >= k)
    best_s[touched + r0] = all_v[take]
    best_i[touched + r0] = all_c[take]


def copy_groups(x: np.ndarray, *, threshold: float, sha256: Sequence[str | None] = (),
                block: int = DEFAULT_BLOCK, progress: bool = False,
                pairs: Sequence[tuple[int, int, float]] | None = None) -> np.ndarray:
    """The copy rule, in one place: (N,) group label of every row, rows in one group being copies of one photo:
    connected components of the pairs with cosine >= ``threshold`` (:func:`similar_pairs`, rows L2-normalised)
    and of the rows with the same ``sha256`` (when given; None or "" never matches). A burst of near-copies is
    one group. Labels are row positions (a group's label is one of its rows). ``progress``: a bar over the tiles.
    ``pairs``: ``similar_pairs(x, threshold=threshold)`` when already found (:func:`neighbours_and_pairs`), so
    the same labels without a second pass.

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

    if pairs is None:
        pairs = similar_pairs(x, threshold=threshold, block=block, progress=progress)
    for a, b, _ in pairs:
        parent[find(a)] = find(b)
    first: dict[str, int] = {}
    for i, digest in enumerate(sha256):
        if digest:
            j = first.setdefault(digest, i)
            if j != i:
                parent[find(i)] = find(j)
    return np.array([find(i) for i in range(len(x))], dtype=np.int64)
