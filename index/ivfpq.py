"""Approximate search for big galleries: FAISS IVF-PQ with 4-bit fast-scan codes + an exact re-rank.

The design follows what was measured on 2 cores (docs/scale.md):

- ``IVF{nlist},PQ{M}x4fs``: ``nlist`` = the power of two nearest √n (at most n / 39), ``M`` = the largest
  divisor of the width up to min(128, dim / 4) (512-d: 128 sub-quantizers, 64-byte codes: ~75 B a vector
  with ids and lists). The coarse centroids are k-means of a random sample (on a GPU when faiss-gpu sees
  one), the product quantizer is trained on the same sample.
- Vectors are added in **shards** (any map function: Ray tasks, or in-process one after another), each a
  plain 4-bit ``IndexIVFPQ`` (fast-scan indexes cannot be merged safely: ``merge_from`` of fast-scan shards
  segfaults at the 5th 1M shard in faiss 1.15), merged with ``merge_from`` and converted to
  ``IndexIVFPQFastScan`` for serving. Sharded and one-process builds hold the same codes in the same order.
  An id's rows all fall in one shard, which indexes its first row only (a store written by two machines can
  hold an id twice: :func:`index.vectors.one_row_per_id`, the rule of every index kind).
- A query takes ``candidates`` (200) neighbours from ``nprobe`` lists and **re-ranks them exactly** from the
  float16 vectors of :mod:`index.rerank` (memory-mapped): codes alone give recall@10 ≈ 0.72; with the re-rank
  0.95-0.97. ``nprobe`` is **calibrated at build time**: 200 stored vectors as queries (self excluded),
  exact top-10 by a streamed brute force, the smallest nprobe of a ladder reaching recall@10 0.95.
- Changes after a build: adds are encoded with the trained quantizers into the in-memory index, removals
  use ``remove_ids``; a save records them as a small delta (added ids, removed ids) beside the immutable base
  file, and rewrites the base when the delta passes 10 % of it (or the codes are under 32 MB). The gallery
  rebuilds (retrains) once it has grown 4× since training.

The index is read into memory (75 B a vector: 0.75 GB at 10M); only the re-rank vectors are mapped.
faiss-gpu has no fast-scan: searches stay on the CPU, training uses the GPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from index.atomic import atomic_write
from index.layout import GalleryLayout
from index.rerank import RerankStore, new_token, write_generation
from index.vectors import (
    as_vectors,
    check_k,
    empty_result,
    exact_topk,
    faiss,  # faiss, or what says to install it (index.vectors.FAISS_MISSING)
    gpu_available,
    has_repeats,
    held_ids,
    in_sorted,
    invlist_ids,
    manifest_path,
    new_entries,
    one_row_per_id,
    read_manifest,
    refuse_negative_ids,
    report_repeated_ids,
    sorted_unique,
    union_sorted,
)

logger = logging.getLogger(__name__)

KIND = "ivfpq"
#: Fewer vectors than this: a flat index (4-bit PQ trains 16 centroids per sub-quantizer).
MIN_VECTORS = 16
TARGET_RECALL = 0.95
CALIBRATION_QUERIES = 200
#: Candidates re-ranked exactly per query (at least 10 × k).
CANDIDATES = 200
#: Rows per shard of a build (Ray runners pass their own).
SHARD_ROWS = 262_144
#: The base file is rewritten at every save while its codes are smaller than this.
REWRITE_BYTES = 32 << 20
DELTA_FRACTION = 0.1
RETRAIN_GROWTH = 4.0
_LADDER = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096,
           6144, 8192, 12288, 16384)

MapFn = Callable[[Callable[..., Any], list[tuple]], Iterable[Any]]


class VectorSource(Protocol):
    """Vectors to index, readable in shards by workers (must pickle)."""

    @property
    def dim(self) -> int:
        """The vectors' width."""
        ...

    def count(self) -> int:
        """Vectors in the source."""
        ...

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """About ``n`` vectors at random (float32)."""
        ...

    def shards(self, rows: int) -> list[Any]:
        """Shard descriptions of about ``rows`` vectors each, in id order; all rows of an id in one shard."""
        ...

    def read(self, shard: Any) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, float32 vectors) batches of one shard."""
        ...


@dataclass
class ArraySource:
    """In-memory (ids, vectors) as a :class:`VectorSource` (tests, benchmarks, small galleries)."""

    ids: np.ndarray
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        """The vectors' width."""
        return int(self.vectors.shape[1])

    def count(self) -> int:
        """Vectors held."""
        return int(len(self.ids))

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """``n`` vectors drawn with ``seed`` without replacement, in row order (all of them when there are fewer)."""
        if n >= len(self.ids):
            return np.ascontiguousarray(self.vectors, dtype=np.float32)
        pick = np.sort(np.random.default_rng(seed).choice(len(self.ids), n, replace=False))
        return np.ascontiguousarray(self.vectors[pick], dtype=np.float32)

    def shards(self, rows: int) -> list[tuple[int, int]]:
        """(start, end) row ranges of ``rows`` rows each (the last one fewer)."""
        return [(s, min(s + rows, len(self.ids))) for s in range(0, len(self.ids), max(rows, 1))]

    def read(self, shard: tuple[int, int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64, float32 vectors) batches of one shard's rows, 65,536 at most each."""
        lo, hi = shard
        for s in range(lo, hi, 65_536):
            e = min(s + 65_536, hi)
            yield (np.asarray(self.ids[s:e], dtype=np.int64),
                   np.ascontiguousarray(self.vectors[s:e], dtype=np.float32))


def serial_map(fn: Callable[..., Any], args: list[tuple]) -> Iterator[Any]:
    """The in-process map: one shard after another, lazily (one shard's result in memory at a time)."""
    return (fn(*a) for a in args)


# ----------------------------------------------------------------------------------------------- train
def plan(n: int, dim: int, nlist: int | None = None, m: int | None = None) -> tuple[int, int]:
    """(lists, sub-quantizers) for ``n`` vectors of width ``dim`` (see the module docstring)."""
    if nlist is None:
        nlist = 2 ** round(math.log2(max(math.sqrt(max(n, 1)), 1)))
        nlist = max(1, min(nlist, n // 39))
    elif nlist > n:  # k-means needs a training point a list (FAISS's own error names neither setting nor count)
        raise ValueError(f"ivfpq_nlist is {nlist}, more lists than the {n} vectors to train them on: lower it, or "
                         "leave it None (gallery.json's \"index\": null)")
    if m is None:
        cap = max(1, min(128, dim // 4))
        m = max(d for d in range(1, cap + 1) if dim % d == 0)
    if dim % m:
        raise ValueError(f"ivfpq needs a sub-quantizer count that divides the width {dim}, not {m}")
    return int(nlist), int(m)


def train_size(n: int, nlist: int) -> int:
    """Training sample: 64 vectors a list, at least 16,384 (and one a list), at most 262,144 (and n)."""
    return int(min(n, max(min(max(64 * nlist, 16_384), 262_144), nlist)))


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run FAISS with ``n`` OpenMP threads inside the block (None: unchanged).

    Small k-means runs are dominated by OpenMP's barriers: on a loaded machine, 2 spinning threads took
    22 s for what 1 thread does in 0.2 s (64 lists, 6,000 vectors).
    """
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def train(sample: np.ndarray, nlist: int, m: int, *, use_gpu: bool | None = None, seed: int = 0) -> np.ndarray:
    """A trained, empty plain 4-bit ``IndexIVFPQ`` (inner product), serialised (bytes that pickle cheaply)."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    dim = x.shape[1]
    gpu = bool(use_gpu) if use_gpu is not None else gpu_available()
    t0 = time.process_time()
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 4, faiss.METRIC_INNER_PRODUCT)
    if len(x) < 39 * 16:  # small galleries: 16 centroids per sub-quantizer on fewer points (FAISS warns per one)
        index.pq.cp.min_points_per_centroid = 1
    with _threads(1 if len(x) * max(nlist, 16) < 50_000_000 else None):
        if nlist > 1:
            kmeans = faiss.Kmeans(dim, nlist, niter=10, max_points_per_centroid=64, seed=seed, gpu=gpu)
            kmeans.train(x)
            quantizer.add(kmeans.centroids)
        index.train(x)  # the product quantizer on residuals (and the 1-list quantizer)
    logger.info("ivfpq: trained %d lists x PQ%dx4 on %d vectors in %.1f CPU-s%s", nlist, m, len(x),
                time.process_time() - t0, " (k-means on GPU)" if gpu else "")
    return faiss.serialize_index(index)


class ShardCodes(NamedTuple):
    """What :func:`encode_shard` gives back for one shard."""

    codes: np.ndarray  # the serialised shard index
    ids: np.ndarray  # int64 ids, in the order their rows were added
    f16: np.ndarray  # their float16 rows (the re-rank store's)
    repeated: np.ndarray  # ids the shard held more than once (each indexed with its first row)
    dropped: int  # rows left out as repeats


def encode_shard(trained: np.ndarray, source: VectorSource, shard: Any) -> ShardCodes:
    """Add one shard's vectors to a copy of the trained index, one row per id (the first: an id a store holds twice,
    :func:`index.vectors.one_row_per_id`).

    A top-level function: Ray tasks run it on other machines (the source reopens the store there).
    """
    index = faiss.deserialize_index(trained)
    ids_parts, rows, repeats = [], [], []
    seen = np.zeros(0, dtype=np.int64)
    dropped = 0
    for batch_ids, vectors in source.read(shard):
        refuse_negative_ids(np.asarray(batch_ids))  # as index.vectors refuses them: a search reads them as no result
        ids, vectors, repeated = one_row_per_id(batch_ids, vectors, seen=seen)
        dropped += len(batch_ids) - len(ids)
        if repeated.size:
            repeats.append(repeated)
        if len(ids):
            index.add_with_ids(vectors, ids)
            seen = np.concatenate([seen, ids])  # disjoint from seen already: no re-sort per batch
        ids_parts.append(ids)
        rows.append(vectors.astype(np.float16))
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int64)
    f16 = np.concatenate(rows) if rows else np.zeros((0, index.d), dtype=np.float16)
    repeated = sorted_unique(np.concatenate(repeats)) if repeats else np.zeros(0, dtype=np.int64)
    return ShardCodes(faiss.serialize_index(index), ids, f16, repeated, dropped)


def build(
    source: VectorSource,
    *,
    folder: Path | None = None,
    nlist: int | None = None,
    m: int | None = None,
    nprobe: int | None = None,
    candidates: int = CANDIDATES,
    shard_rows: int = SHARD_ROWS,
    map_fn: MapFn | None = None,
    use_gpu: bool | None = None,
    seed: int = 0,
) -> IvfPqIndex:
    """Train on a sample, add the vectors in shards (``map_fn``), merge, convert to fast-scan, calibrate.

    ``folder``: the gallery folder the re-rank vectors are written to (None: kept in memory until a save).
    ``nprobe``: fixed instead of calibrated.
    """
    n, dim = source.count(), source.dim
    if n < MIN_VECTORS:
        raise ValueError(f"ivfpq needs at least {MIN_VECTORS} vectors, got {n}")
    nlist, m = plan(n, dim, nlist, m)
    t0 = time.perf_counter()
    trained = train(source.sample(train_size(n, nlist), seed), nlist, m, use_gpu=use_gpu, seed=seed)
    merged = faiss.deserialize_index(trained)
    shards = source.shards(shard_rows)
    results = (map_fn or serial_map)(encode_shard, [(trained, source, s) for s in shards])
    memory = RerankStore(dim)
    repeats: list[np.ndarray] = []
    dropped = 0

    def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        nonlocal dropped
        for part in results:
            merged.merge_from(faiss.deserialize_index(part.codes), 0)
            repeats.append(part.repeated)
            dropped += part.dropped
            yield part.ids, part.f16

    if folder is not None:
        token, file_ids = write_generation(Path(folder), chunks())
        rerank = RerankStore(dim, Path(folder), token, len(file_ids))
    else:
        for ids, f16 in chunks():
            memory.put(ids, f16)
        rerank = memory
    report_repeated_ids(sorted_unique(np.concatenate(repeats)) if repeats else np.zeros(0, dtype=np.int64))
    n -= dropped
    index = IvfPqIndex(faiss.IndexIVFPQFastScan(merged), rerank, nprobe=nprobe or 1, candidates=candidates,
                       trained_n=n)
    if index.ntotal != n:  # each shard indexes one row per id: a mismatch is a bug, not a property of the data
        raise RuntimeError(
            f"ivfpq build indexed {index.ntotal} vectors of the {n} rows it read (one per id): an internal error, "
            "please report it with the gallery's size and shard count. The rows in the store are not touched by "
            "the index build; running 'speciesid index build' again with --index-kind flat (or hnsw) gives the "
            "gallery an index that does not use this code meanwhile")
    logger.info("ivfpq: %d vectors in %d shard(s) added and merged in %.1f s", n, len(shards), time.perf_counter() - t0)
    if nprobe is None:
        index.calibrate(seed=seed)
    return index


# ----------------------------------------------------------------------------------------------- index
class IvfPqIndex:
    """IVF-PQ fast-scan codes + exact float16 re-rank, keyed by reference ids (the ``VectorIndex`` interface)."""

    kind = KIND
    on_gpu = False

    def __init__(self, index: faiss.Index, rerank: RerankStore, *, nprobe: int, candidates: int, trained_n: int,
                 base: str | None = None, delta: np.ndarray | None = None, tomb: np.ndarray | None = None,
                 calibration: dict | None = None) -> None:
        """Wrap a fast-scan index (use :func:`build` or :meth:`load`)."""
        self._index = index
        self._rerank = rerank
        self._dim = int(index.d)
        self._ids = np.sort(invlist_ids(index))
        if has_repeats(self._ids):
            raise ValueError("index holds duplicate ids")
        self._nprobe = max(1, min(int(nprobe), int(index.nlist)))
        self._candidates = int(candidates)
        self._trained_n = int(trained_n)
        self._base = base  # token of the base file this index was loaded from / saved as
        self._delta = np.zeros(0, np.int64) if delta is None else np.sort(np.asarray(delta, np.int64))
        self._tomb = np.zeros(0, np.int64) if tomb is None else np.sort(np.asarray(tomb, np.int64))
        self.calibration = calibration or {}
        self._clamp_logged = False  # a caller's nprobe outside 1..nlist, clamped: said once

    # ---------------------------------------------------------------- properties
    @property
    def ntotal(self) -> int:
        """Searchable vectors."""
        return int(self._ids.size)

    @property
    def dim(self) -> int:
        """Embedding width."""
        return self._dim

    @property
    def ids(self) -> np.ndarray:
        """Sorted copy of the ids in the index."""
        return self._ids.copy()

    @property
    def nlist(self) -> int:
        """Inverted lists."""
        return int(self._index.nlist)

    @property
    def nprobe(self) -> int:
        """Lists visited per query."""
        return self._nprobe

    @property
    def needs_retrain(self) -> bool:
        """The gallery has grown past 4× the size the quantizers were trained for."""
        return self.ntotal > RETRAIN_GROWTH * max(self._trained_n, MIN_VECTORS)

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return f"IvfPqIndex(dim={self._dim}, ntotal={self.ntotal}, nlist={self.nlist}, nprobe={self._nprobe})"

    # ---------------------------------------------------------------- changes
    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Encode and add ``vectors`` under ``ids`` (ids already in the index raise ValueError)."""
        xb, ids = new_entries(vectors, ids, dim=self._dim, present=self._ids)
        if ids.size == 0:
            return
        self._index.add_with_ids(xb, ids)
        self._rerank.put(ids, xb)
        self._ids = union_sorted(self._ids, ids)
        back = in_sorted(ids, self._tomb)
        self._tomb = np.setdiff1d(self._tomb, ids[back], assume_unique=True)
        self._delta = union_sorted(self._delta, ids[~back])

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ones ignored); returns how many were removed."""
        ids = held_ids(ids, self._ids)
        if ids.size == 0:
            return 0
        removed = int(self._index.remove_ids(faiss.IDSelectorBatch(ids)))
        if removed != ids.size:
            raise RuntimeError(f"FAISS removed {removed} vectors, expected {ids.size}")
        self._ids = np.setdiff1d(self._ids, ids, assume_unique=True)
        fresh = in_sorted(ids, self._delta)
        self._delta = np.setdiff1d(self._delta, ids[fresh], assume_unique=True)
        self._tomb = union_sorted(self._tomb, ids[~fresh])
        return int(ids.size)

    # ---------------------------------------------------------------- search
    def _candidates_of(self, xq: np.ndarray, k: int, nprobe: int) -> np.ndarray:
        kf = min(max(self._candidates, 10 * k), self.ntotal)
        return self._index.search(xq, kf, params=faiss.SearchParametersIVF(nprobe=nprobe))[1]

    def _rerank_rows(self, xq: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        dists = np.full((len(xq), k), -np.inf, dtype=np.float32)
        labels = np.full((len(xq), k), -1, dtype=np.int64)
        valid = cand[cand >= 0]
        if not valid.size:
            return dists, labels
        uniq, inv = np.unique(valid, return_inverse=True)
        vecs = self._rerank.gather(uniq)
        pos = np.full(cand.shape, -1, dtype=np.int64)
        pos[cand >= 0] = inv
        for r in range(len(xq)):
            row = pos[r][pos[r] >= 0]
            if not row.size:
                continue
            scores = vecs[row] @ xq[r]
            order = np.argsort(-scores, kind="stable")[:k]
            dists[r, : len(order)] = scores[order]
            labels[r, : len(order)] = uniq[row[order]]
        return dists, labels

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray:
        """The re-rank store's vectors of ``ids`` (float16 on disk), (len(ids), dim) float32 in that order."""
        return self._rerank.gather(np.asarray(ids, dtype=np.int64))

    def _probes(self, nprobe: int | None) -> int:
        """A caller's ``nprobe`` clamped to 1..nlist, as the constructor clamps its own (None, 0: the calibrated one).

        FAISS takes a larger one without complaint and then returns wrong neighbours (recall@10 1.0 -> 0.02).
        """
        if not nprobe:
            return self._nprobe
        got = max(1, min(int(nprobe), self.nlist))
        if got != nprobe and not self._clamp_logged:
            self._clamp_logged = True
            logger.info("ivfpq: nprobe %d asked, %d used (the index has %d lists)", nprobe, got, self.nlist)
        return got

    def search(self, queries: np.ndarray, k: int, *, nprobe: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``D`` float32 (Q, k) best first, ``I`` int64 (Q, k) ids (-1 padded).

        ``nprobe``: lists visited instead of the calibrated number, clamped to 1..nlist.
        """
        k = check_k(k)
        xq = as_vectors(queries, "queries", self._dim)
        dists, labels = empty_result(xq.shape[0], k)
        if self.ntotal == 0 or xq.shape[0] == 0:
            return dists, labels
        kk = min(k, self.ntotal)
        cand = self._candidates_of(xq, kk, self._probes(nprobe))
        dists[:, :kk], labels[:, :kk] = self._rerank_rows(xq, cand, kk)
        return dists, labels

    def calibrate(self, *, queries: int = CALIBRATION_QUERIES, k: int = 10, target: float = TARGET_RECALL,
                  seed: int = 0) -> dict:
        """Choose nprobe: the smallest of a ladder whose recall@k (re-ranked, self excluded) reaches ``target``."""
        t0 = time.perf_counter()
        n = self.ntotal
        if n <= k + 1:
            self._nprobe = self.nlist
            self.calibration = {"nprobe": self._nprobe, "recall_at_10": 1.0, "queries": 0}
            return self.calibration
        rng = np.random.default_rng(seed)
        qids = np.sort(rng.choice(self._ids, size=min(queries, n), replace=False))
        xq = self._rerank.gather(qids)
        _, exact = exact_topk(xq, self._rerank.iter_rows(self._ids), k + 1)
        truth = [set(row[row != q][:k].tolist()) for row, q in zip(exact, qids, strict=True)]
        tried: dict[int, float] = {}
        ladder = sorted({p for p in _LADDER if p < self.nlist} | {self.nlist})
        for nprobe in ladder:
            got = self._rerank_rows(xq, self._candidates_of(xq, k + 1, nprobe), k + 1)[1]
            recall = float(np.mean([len(t & set(row[row != q][:k].tolist())) / max(len(t), 1)
                                    for row, q, t in zip(got, qids, truth, strict=True)]))
            tried[nprobe] = round(recall, 4)
            self._nprobe = nprobe
            if recall >= target:
                break
        reached = tried[self._nprobe] >= target
        self.calibration = {"nprobe": self._nprobe, "recall_at_10": tried[self._nprobe], "queries": len(qids),
                            "target": target, "target_reached": reached, "ladder": tried,
                            "seconds": round(time.perf_counter() - t0, 2)}
        if not reached:
            logger.warning("ivfpq: recall@%d reached only %.3f of the %.2f target, even at nprobe %d of %d lists (every "
                           "query scans every code): true neighbours rank past the candidates the PQ codes keep for "
                           "the exact re-rank; first raise ivfpq_candidates (now %d per query) or ivfpq_m (now %d "
                           "sub-quantizers for %d dims; a divisor of the width) in the \"index\" object of the "
                           "gallery's gallery.json and build into it again; else build with --index-kind hnsw or "
                           "flat for exact-enough search", k, tried[self._nprobe], target, self._nprobe, self.nlist,
                           self._candidates, self._index.pq.M, self._dim)
        logger.info("ivfpq: nprobe %d of %d lists (recall@%d %.3f on %d stored vectors)", self._nprobe, self.nlist,
                    k, tried[self._nprobe], len(qids))
        return self.calibration

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path, manifest: dict) -> None:
        """Persist under the gallery folder of ``path`` (``vectors.faiss``); the manifest is the commit point.

        Call under the gallery's write lock. Writes pending re-rank rows, then the base (rewritten when small,
        when the delta is large or when another process replaced it) or a small delta file, then the manifest,
        then removes generation files named by neither the new nor the previous manifest.
        """
        path = Path(path)
        folder = path.parent
        layout = GalleryLayout(folder)
        disk = _read_manifest(path)
        disk_rerank = (disk["rerank"], int(disk["rerank_rows"])) if disk else None
        rtoken, rrows = self._rerank.persist(folder, self._ids, disk_rerank)
        code_bytes = self.ntotal * int(self._index.code_size)
        if (self._base is None or disk is None or disk.get("base") != self._base or code_bytes < REWRITE_BYTES
                or self._delta.size + self._tomb.size > DELTA_FRACTION * max(self.ntotal, 1)):
            token = new_token()
            atomic_write(layout.vectors_part(token, "ivfpq"), lambda tmp: faiss.write_index(self._index, str(tmp)))
            self._base, self._delta, self._tomb = token, np.zeros(0, np.int64), np.zeros(0, np.int64)
        delta = None
        if self._delta.size or self._tomb.size:
            delta = new_token()
            atomic_write(layout.vectors_part(delta, "delta.npz"),
                         lambda tmp: np.savez(tmp, added=self._delta, removed=self._tomb))
        meta = {**manifest, "kind": KIND, "dim": self._dim, "count": self.ntotal, "base": self._base,
                "rerank": rtoken, "rerank_rows": rrows, "delta": delta, "nlist": self.nlist,
                "m": int(self._index.pq.M), "nprobe": self._nprobe, "candidates": self._candidates,
                "trained_n": self._trained_n, "calibration": self.calibration}
        atomic_write(manifest_path(path), json.dumps(meta, indent=2, sort_keys=True))
        keep = _parts(layout, meta) | _parts(layout, disk)
        for part in layout.vectors_parts():
            if part not in keep:
                part.unlink(missing_ok=True)
        path.unlink(missing_ok=True)  # a flat/hnsw file from before: the manifest now names ivfpq parts
        logger.info("saved ivfpq index (%d vectors, base %s, delta %s) in %s", self.ntotal, self._base, delta, folder)

    @classmethod
    def load(cls, path: str | Path, manifest: dict) -> IvfPqIndex:
        """Read the index a manifest (read from ``<path>.json``) names; ValueError when its files disagree."""
        layout = GalleryLayout(Path(path).parent)
        try:
            base = faiss.read_index(str(layout.vectors_part(manifest["base"], "ivfpq")))
            dim = int(manifest["dim"])
            rerank = RerankStore(dim, layout.root, manifest["rerank"], int(manifest["rerank_rows"]))
            delta = tomb = np.zeros(0, np.int64)
            if manifest.get("delta"):
                with np.load(layout.vectors_part(manifest["delta"], "delta.npz")) as z:
                    delta, tomb = z["added"].astype(np.int64), z["removed"].astype(np.int64)
            if delta.size:
                base.add_with_ids(rerank.gather(delta), delta)
            if tomb.size:
                base.remove_ids(faiss.IDSelectorBatch(tomb))
        except (KeyError, TypeError, RuntimeError) as exc:
            raise ValueError(f"ivfpq index files of {layout.root} are unusable: {exc}") from exc
        index = cls(base, rerank, nprobe=int(manifest["nprobe"]), candidates=int(manifest["candidates"]),
                    trained_n=int(manifest["trained_n"]), base=manifest["base"], delta=delta, tomb=tomb,
                    calibration=manifest.get("calibration"))
        if index.ntotal != int(manifest.get("count", -1)):
            raise ValueError(f"ivfpq index holds {index.ntotal} vectors, its manifest says {manifest.get('count')}")
        logger.info("loaded ivfpq index (%d vectors, %d lists, nprobe %d)", index.ntotal, index.nlist, index.nprobe)
        return index


def _read_manifest(path: Path) -> dict | None:
    """The IVF-PQ manifest saved beside the index file ``path`` (None: none, unreadable or another kind's)."""
    data = read_manifest(path)
    return data if data is not None and data.get("kind") == KIND else None


def _parts(layout: GalleryLayout, manifest: dict | None) -> set[Path]:
    if not manifest:
        return set()
    out = {layout.vectors_part(manifest["base"], "ivfpq")} if manifest.get("base") else set()
    if manifest.get("rerank"):
        out |= {layout.vectors_part(manifest["rerank"], "f16"), layout.vectors_part(manifest["rerank"], "ids")}
    if manifest.get("delta"):
        out.add(layout.vectors_part(manifest["delta"], "delta.npz"))
    return out
