"""FAISS vector index of the reference gallery.

Embeddings are L2-normalised float32 rows and similarity is the inner product (cosine). Every index is
keyed by stable int64 reference ids, never by FAISS positions, so ids survive removals, rebuilds and
save/load. Shapes follow faiss: numpy in, ``(D, I)`` out, ``D`` float32 similarities best first and
``I`` int64 ids, padded with ``-inf`` / ``-1`` where fewer than ``k`` results exist.

Kinds:

* ``"flat"``: exact search (``IndexIDMap2(IndexFlatIP)``).
* ``"hnsw"``: graph search (``IndexIDMap2(IndexHNSWFlat)``), CPU only. HNSW cannot delete, so
  :meth:`VectorIndex.remove` tombstones ids (searches filter them out with an ``IDSelector``) and the
  graph is rebuilt from the kept vectors once tombstones pass a quarter of the graph, before a save, or
  when a tombstoned id is added again.
* ``"ivf"``: inverted lists (``IndexIVFFlat``), trained on the vectors given to :meth:`VectorIndex.build`.
* ``"ivfpq"``: for big galleries: IVF-PQ fast-scan codes + an exact re-rank from float16 vectors on disk,
  built in shards (:mod:`index.ivfpq`, class ``IvfPqIndex`` with the same interface). ``"auto"`` picks
  ``"flat"`` up to ``approx_threshold`` (50,000) vectors and ``"ivfpq"`` above.

:func:`load_index` reads whichever kind a manifest names.

A CPU index is always kept as the source of truth; when a GPU is used, a GPU copy is cloned from it
lazily for searching and dropped whenever the CPU index changes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from index.atomic import atomic_write
from index.errors import import_failure, library_messages
from index.formats import known_fields

logger = logging.getLogger(__name__)

#: A missing faiss (faiss-cpu is a dependency; a CUDA machine may have faiss-gpu instead): what to install, one line;
#: and an installed faiss whose import failed (a library it needs is missing, a broken install): its error, what
#: to do.
FAISS_MISSING, FAISS_BROKEN = library_messages("the vector index needs faiss",
                                               "faiss-cpu (or faiss-gpu-cu12 on a CUDA machine)",
                                               "faiss-cpu (faiss-gpu-cu12 on a CUDA machine)")


class _Missing:
    """Stands for a library that did not import: the module importing it still loads (the command line's parser
    reads :data:`KINDS`), and the first use of any of its names raises ImportError saying what to do, chained to
    the import's own error (``-vv`` shows it)."""

    def __init__(self, message: str, cause: ImportError) -> None:
        self._message = message
        self._cause = cause

    def __getattr__(self, name: str) -> Any:
        raise ImportError(self._message) from self._cause


def _not_importable(exc: ImportError) -> _Missing:
    """What stands for faiss after its import raised ``exc``: "not installed" only when faiss itself is not there."""
    return _Missing(import_failure(exc, "faiss", FAISS_MISSING, FAISS_BROKEN), exc)


try:
    import faiss
except ImportError as exc:  # the commands that build or search an index say why (FAISS_MISSING, FAISS_BROKEN)
    faiss = _not_importable(exc)

KINDS: tuple[str, ...] = ("auto", "flat", "hnsw", "ivf", "ivfpq")
#: FAISS warns below this many training points per IVF list; ``ivf_nlist=None`` keeps nlist <= n // 39.
MIN_POINTS_PER_LIST = 39
#: Rebuild an HNSW graph once tombstoned vectors exceed this fraction of it.
HNSW_COMPACT_FRACTION = 0.25
#: Largest k FAISS GPU indexes accept; larger searches run on the CPU copy.
GPU_MAX_K = 2048


@dataclass
class VectorIndexConfig:
    """How to build a :class:`VectorIndex`."""

    kind: str = "auto"  # "flat" (exact), "hnsw", "ivf", "ivfpq", or "auto" (flat up to approx_threshold, else ivfpq)
    approx_threshold: int = 50_000  # gallery size above which "auto" picks an approximate index
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_construction: int = 80  # HNSW build-time beam width
    hnsw_ef_search: int = 128  # HNSW query-time beam width
    ivf_nlist: int | None = None  # IVF lists; None = about 4*sqrt(n), at least 1, at most n // 39
    ivf_nprobe: int = 16  # IVF lists visited per query
    use_gpu: bool | None = None  # None = use a GPU when faiss-gpu sees one; True = require it; False = CPU
    ivfpq_nlist: int | None = None  # ivfpq lists; None = the power of two nearest sqrt(n)
    ivfpq_m: int | None = None  # ivfpq sub-quantizers; None = the largest divisor of dim up to min(128, dim/4)
    ivfpq_nprobe: int | None = None  # ivfpq lists visited; None = calibrated at build time (recall@10 0.95)
    ivfpq_candidates: int = 200  # ivfpq candidates re-ranked exactly per query (at least 10 k)
    shard_rows: int = 262_144  # vectors per shard when an ivfpq index is built (a Ray task or a local step)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search", "ivf_nprobe"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.approx_threshold < 0:
            raise ValueError(f"approx_threshold must be >= 0, got {self.approx_threshold!r}")
        if self.ivf_nlist is not None and self.ivf_nlist < 1:
            raise ValueError(f"ivf_nlist must be >= 1 or None, got {self.ivf_nlist!r}")
        for name in ("ivfpq_nlist", "ivfpq_m", "ivfpq_nprobe"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)!r}")
        if self.ivfpq_candidates < 1 or self.shard_rows < 1:
            raise ValueError("ivfpq_candidates and shard_rows must be >= 1")

    @classmethod
    def from_json(cls, data: Any, where: str) -> VectorIndexConfig:
        """The config a gallery.json's ``"index"`` object holds (``where`` names it in errors). A value of the wrong
        type (a number as text, a fraction where a count goes) or out of range is a ValueError naming it and what it
        takes (the keys are documented in docs/scale.md); a key left out takes its default. A key not known (a newer
        speciesid's, or misspelt) is ignored with a warning naming it (:func:`index.formats.known_fields`)."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be a JSON object of index settings, not {type(data).__name__}")
        data = known_fields(cls, data, where, level=logging.WARNING)  # a newer speciesid's key, or a misspelt one
        for key, value in data.items():
            default = getattr(cls, key)
            nullable = default is None or key == "use_gpu"
            if value is None and nullable:
                continue
            if key == "kind":
                ok = isinstance(value, str)
            elif key == "use_gpu":
                ok = isinstance(value, bool)
            else:
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok:
                takes = {"kind": f"one of {', '.join(KINDS)}", "use_gpu": "true, false or null"}.get(
                    key, "a whole number" + (" or null" if nullable else ""))
                raise ValueError(f"{where}: {key} is {json.dumps(value)}; it takes {takes} (docs/scale.md)")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc} (docs/scale.md says what each setting takes)") from None

    def check_width(self, dim: int, where: str) -> None:
        """ValueError (``where`` names the settings) when ``ivfpq_m`` does not divide the embedding width ``dim`` of
        a gallery that may build ivfpq: said when a writer opens the gallery (not by a build that has stored its
        photos) and before an ivfpq index is built; a reader's open does not ask it (its index may need none)."""
        if self.kind in ("ivfpq", "auto") and self.ivfpq_m is not None and dim % self.ivfpq_m:
            raise ValueError(f"{where}: ivfpq_m is {self.ivfpq_m}; it takes a divisor of the embedding width {dim}, "
                             "or null (docs/scale.md)")

    def resolve(self, n: int) -> str:
        """The kind to build for ``n`` vectors: "auto" by size; ivfpq below its minimum (16 vectors, or fewer than
        ``ivfpq_nlist``) is flat, with a warning (:func:`not_built`) unless n is 0 (a gallery's empty create)."""
        from index.ivfpq import MIN_VECTORS

        kind = self.kind
        if kind == "auto":
            kind = "ivfpq" if n > self.approx_threshold else "flat"
        if kind == "ivfpq" and n < MIN_VECTORS:
            not_built("ivfpq", n, f"{n} vectors are too few to train it (it needs at least {MIN_VECTORS})")
            kind = "flat"
        elif kind == "ivfpq" and self.ivfpq_nlist is not None and n < self.ivfpq_nlist:
            not_built("ivfpq", n, f"ivfpq_nlist is {self.ivfpq_nlist}, more lists than the {n} vectors to train "
                      "them on (lower ivfpq_nlist in gallery.json's \"index\", or set it to null)")
            kind = "flat"
        return kind

    def ivfpq_options(self, dim: int, where: str) -> dict[str, Any]:
        """Keyword arguments of :func:`index.ivfpq.build` from this config, for an embedding width ``dim``: ValueError
        first (:meth:`check_width`, ``where`` names the settings) when ``ivfpq_m`` does not divide it."""
        self.check_width(dim, where)
        return {"nlist": self.ivfpq_nlist, "m": self.ivfpq_m, "nprobe": self.ivfpq_nprobe,
                "candidates": self.ivfpq_candidates, "shard_rows": self.shard_rows, "use_gpu": self.use_gpu}


# --------------------------------------------------------------------------- validation helpers


def as_vectors(x: Any, name: str = "vectors", dim: int | None = None) -> np.ndarray:
    """``x`` as a C-contiguous 2-D float32 array, else ValueError saying what was expected."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n, dim), got {arr.ndim}-D with shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{name} must be float32 (or another float dtype), got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} must have dim {dim} to match the index, got dim {arr.shape[1]}")
    if arr.size and not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or inf")
    return arr


def not_built(kind: str, n: int, why: str) -> None:
    """Say that the ``kind`` index asked for is not built over ``n`` vectors, and ``why``: a flat one is, instead.
    A warning, except for n = 0 (a gallery's empty create: the kind is chosen again when vectors come)."""
    logger.log(logging.WARNING if n else logging.DEBUG,
               "%s index not built: %s; a flat index is built instead", kind, why)


def _as_ids(x: Any, n: int | None = None, *, negative: bool = False) -> np.ndarray:
    """``x`` as a C-contiguous 1-D int64 array (of length ``n`` when given), else ValueError. ``negative``: negative
    ids pass (a removal's: no index holds one)."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"ids must be a 1-D int64 array, got {arr.ndim}-D with shape {arr.shape}")
    if arr.size == 0:
        arr = arr.astype(np.int64)  # np.asarray([]) is float64
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be int64 (or another integer dtype), got dtype {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and arr.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64, got uint64 values above 2**63 - 1")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"ids must have one entry per vector: expected {n} ids, got {arr.shape[0]}")
    if not negative:
        refuse_negative_ids(arr)
    return arr


def refuse_negative_ids(ids: np.ndarray) -> None:
    """ValueError naming the first 10 negative ``ids`` (FAISS marks missing results with them: a search would read
    such a reference as no result); nothing when there is none."""
    if ids.size and ids.min() < 0:
        bad = ids[ids < 0]
        raise ValueError(f"ids must be >= 0 (FAISS marks missing results with negative ids), got "
                         f"{bad[:10].tolist()}{' ...' if bad.size > 10 else ''}")


# Id-set helpers for the sorted id arrays the indexes keep. NumPy 2.x's plain ``np.unique`` (and ``np.union1d``,
# which calls it) hashes: ~100x slower than a sort on 1M int64 ids (1.2 s against ~10 ms) and paid on every add,
# delete and load. These sort (or search) instead; each gives what the NumPy call it replaces gives.


def sorted_unique(ids: Any) -> np.ndarray:
    """The distinct values of the int array ``ids``, sorted (as ``np.unique(ids)``), by one sort."""
    a = np.sort(np.asarray(ids).ravel())
    if a.size < 2:
        return a
    keep = np.empty(a.size, dtype=bool)
    keep[0] = True
    np.not_equal(a[1:], a[:-1], out=keep[1:])
    return a if keep.all() else a[keep]


def has_repeats(sorted_ids: np.ndarray) -> bool:
    """Whether the sorted array ``sorted_ids`` holds a value twice (adjacent equal values)."""
    return bool(sorted_ids.size > 1 and (sorted_ids[1:] == sorted_ids[:-1]).any())


def in_sorted(ids: Any, sorted_ids: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``ids`` are in the sorted array ``sorted_ids`` (as ``np.isin``), by binary search."""
    ids = np.asarray(ids)
    if not sorted_ids.size or not ids.size:
        return np.zeros(ids.shape, dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_ids, ids), sorted_ids.size - 1)
    return sorted_ids[pos] == ids


def union_sorted(sorted_ids: np.ndarray, ids: Any) -> np.ndarray:
    """The sorted distinct union of the sorted distinct ``sorted_ids`` and any ``ids`` (as ``np.union1d``).

    New ids above the largest held (reserved ids always are) are appended; others are inserted in place.
    """
    new = sorted_unique(ids)
    if not new.size:
        return sorted_ids
    if not sorted_ids.size or new[0] > sorted_ids[-1]:
        return np.concatenate([sorted_ids, new.astype(sorted_ids.dtype, copy=False)])
    new = new[~in_sorted(new, sorted_ids)]
    return np.insert(sorted_ids, np.searchsorted(sorted_ids, new), new) if new.size else sorted_ids


def _check_unique(ids: np.ndarray) -> None:
    a = np.sort(ids)
    if has_repeats(a):
        dup = sorted_unique(a[1:][a[1:] == a[:-1]])
        raise ValueError(f"duplicate ids in input: {dup[:10].tolist()}{' ...' if dup.size > 10 else ''}")


def one_row_per_id(
    ids: np.ndarray, vectors: np.ndarray, *, seen: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors, repeated): the first row of each id, and the ids met more than once (sorted).

    Two machines writing one S3 store can give an id twice; indexing both rows would make the gallery impossible to
    open, even to delete them. Every index kind keeps each id's first row by this rule. ``seen``: ids whose
    first row came in an earlier chunk of the same read (a shard read in batches): their rows here are repeats too.
    Without repeats the rows come back as given; with them, in id order.
    """
    uniq, first = np.unique(ids, return_index=True)
    repeated = sorted_unique(ids[np.setdiff1d(np.arange(len(ids)), first)])
    if seen is not None and seen.size:
        earlier = np.isin(uniq, seen)
        repeated = union_sorted(repeated, uniq[earlier])
        uniq, first = uniq[~earlier], first[~earlier]
    if len(uniq) == len(ids):
        return ids, vectors, repeated
    return uniq, vectors[first], repeated


def report_repeated_ids(repeated: np.ndarray) -> None:
    """Say (once per build or sync) that the store holds ``repeated`` ids more than once: how many, which."""
    if not len(repeated):
        return
    shown = np.asarray(repeated)[:10].tolist()
    logger.error("the store holds %d id%s more than once (%s%s; two writers on one store?): each is searched with "
                 "its first row; 'speciesid references delete' removes every row of an id", len(repeated),
                 "" if len(repeated) == 1 else "s", shown, " ..." if len(repeated) > 10 else "")


def new_entries(vectors: Any, ids: Any, *, dim: int, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Checked (vectors, ids) to add to an index holding the sorted ids ``present``: float32 rows of ``dim``,
    int64 ids, unique, none already there (ValueError saying which otherwise)."""
    xb = as_vectors(vectors, dim=dim)
    ids = _as_ids(ids, xb.shape[0])
    if ids.size:
        _check_unique(ids)
        there = ids[in_sorted(ids, present)]
        if there.size:
            raise ValueError(f"ids already in the index: {there[:10].tolist()}{' ...' if there.size > 10 else ''}")
    return xb, ids


def held_ids(ids: Any, present: np.ndarray) -> np.ndarray:
    """The distinct ``ids`` that the index (sorted ids ``present``) holds: what a removal removes (a negative id
    is held by none)."""
    ids = sorted_unique(_as_ids(ids, negative=True))
    return ids[in_sorted(ids, present)]


def empty_result(nq: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(D, I) of ``nq`` queries with no hits yet: -inf distances, -1 ids."""
    return np.full((nq, k), -np.inf, dtype=np.float32), np.full((nq, k), -1, dtype=np.int64)


def check_k(k: int) -> int:
    """``k`` as an int when it is a positive count of neighbours, else ValueError."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return int(k)


# --------------------------------------------------------------------------- naive baseline


def exact_topk(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner products of ``queries`` over streamed ``(ids, vectors)`` chunks, in numpy (never
    FAISS: the oracle approximate search is tested against): (scores, ids), each (nq, min(k, rows)), best first;
    ties are broken by the lower row position in the stream. The kernel of :func:`exact_search`."""
    nq = len(queries)
    best_s = np.zeros((nq, 0), dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for ids, vecs in chunks:
        s = queries @ vecs.T
        i = np.broadcast_to(np.asarray(ids, dtype=np.int64), s.shape)
        if best_s.shape[1]:  # the best so far first: they come earlier in the stream
            s, i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i], axis=1)
        if s.shape[1] > k:
            cand = _top_positions(s, k)
            s, i = np.take_along_axis(s, cand, axis=1), np.take_along_axis(i, cand, axis=1)
        best_s, best_i = s, i
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)


def _top_positions(s: np.ndarray, k: int) -> np.ndarray:
    """(nq, k) column positions of the ``k`` highest scores of each row of ``s``, ascending; among equal scores at
    the edge of the top-k the lower positions (argpartition alone takes any of them)."""
    cand = np.argpartition(-s, k - 1, axis=1)[:, :k]
    cand.sort(axis=1)  # in stream order, so a stable sort by score breaks ties by position
    edge = np.take_along_axis(s, cand, axis=1).min(axis=1)
    for row in np.flatnonzero((s >= edge[:, None]).sum(axis=1) > k):  # more scores tie at the edge than fit (rare)
        above = np.flatnonzero(s[row] > edge[row])
        cand[row] = np.sort(np.concatenate([above, np.flatnonzero(s[row] == edge[row])[: k - len(above)]]))
    return cand


def exact_search(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k in numpy (matrix product + argpartition: :func:`exact_topk`): the naive
    baseline.

    Same output contract as :meth:`VectorIndex.search`; ties are broken by the lower row position.
    """
    k = check_k(k)
    xb = as_vectors(vectors)
    ids = _as_ids(ids, xb.shape[0])
    xq = as_vectors(queries, "queries", xb.shape[1] if xb.shape[0] else None)
    nq, n = xq.shape[0], xb.shape[0]
    dists, labels = empty_result(nq, k)
    if n == 0 or nq == 0:
        return dists, labels
    kk = min(k, n)
    chunk = max(1, (1 << 24) // n)  # bound the (chunk, n) score matrix to ~64 MB
    for s in range(0, nq, chunk):
        dists[s : s + chunk, :kk], labels[s : s + chunk, :kk] = exact_topk(xq[s : s + chunk], [(ids, xb)], kk)
    return dists, labels


# --------------------------------------------------------------------------- GPU helpers


def gpu_available() -> bool:
    """Whether faiss-gpu sees a CUDA device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_gpu_request(use_gpu: bool | None) -> None:
    if use_gpu is True and not gpu_available():
        raise ValueError(
            "use_gpu=True but faiss sees no GPU: install faiss-gpu (e.g. `pip install faiss-gpu-cu12` "
            "instead of faiss-cpu) on a machine with a CUDA GPU, or pass use_gpu=None/False"
        )


def _wants_gpu(use_gpu: bool | None, kind: str) -> bool:
    _check_gpu_request(use_gpu)
    if use_gpu is False or not gpu_available():
        return False
    if kind == "hnsw":
        logger.info("FAISS has no GPU HNSW; the hnsw index stays on the CPU")
        return False
    return True


# --------------------------------------------------------------------------- index construction


def _nlist_for(n: int, requested: int | None) -> int:
    """IVF list count for ``n`` training vectors; 0 means too few vectors to train IVF."""
    if requested is not None:
        if n < requested:
            return 0
        if n < MIN_POINTS_PER_LIST * requested:
            logger.warning(
                "training IVF with %d lists on only %d vectors (FAISS wants >= %d per list)",
                requested,
                n,
                MIN_POINTS_PER_LIST,
            )
        return requested
    return max(0, min(max(1, round(4 * math.sqrt(n))), n // MIN_POINTS_PER_LIST))


def _new_flat(dim: int) -> faiss.Index:
    return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))


def _new_hnsw(dim: int, cfg: VectorIndexConfig) -> faiss.Index:
    inner = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    inner.hnsw.efConstruction = cfg.hnsw_ef_construction
    inner.hnsw.efSearch = cfg.hnsw_ef_search
    return faiss.IndexIDMap2(inner)


def _new_ivf(train: np.ndarray, nlist: int, nprobe: int) -> faiss.Index:
    dim = train.shape[1]
    # the Python wrapper keeps the quantizer alive as long as the index (do not set own_fields here)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.train(train)
    index.nprobe = min(nprobe, nlist)
    return index


def _kind_of(index: faiss.Index) -> str:
    """The kind of a CPU index this module wrote, else ValueError."""
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf"
    if isinstance(index, faiss.IndexIDMap2):
        inner = faiss.downcast_index(index.index)
        if isinstance(inner, faiss.IndexHNSWFlat):
            return "hnsw"
        if isinstance(inner, faiss.IndexFlat):
            return "flat"
        raise ValueError(f"unsupported index inside IndexIDMap2: {type(inner).__name__}")
    raise ValueError(f"unsupported FAISS index type {type(index).__name__}")


def _stored_ids(index: faiss.Index, kind: str) -> np.ndarray:
    """All ids held by a CPU index (including HNSW tombstones)."""
    if kind != "ivf":
        return faiss.vector_to_array(index.id_map).astype(np.int64, copy=False)
    return invlist_ids(index)


def invlist_ids(index: faiss.Index) -> np.ndarray:
    """All ids in the inverted lists of a CPU IVF index, list by list."""
    invlists = index.invlists
    parts = [np.zeros(0, dtype=np.int64)]
    for lst in range(invlists.nlist):
        size = invlists.list_size(lst)
        if size:
            parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).copy())
    return np.concatenate(parts).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- the index


class SearchIndex(Protocol):
    """What a gallery needs of its vector index, whatever the kind: ``VectorIndex`` (flat, HNSW, IVF) and
    ``index.ivfpq.IvfPqIndex`` both provide it."""

    @property
    def ntotal(self) -> int: ...  # searchable vectors

    @property
    def dim(self) -> int: ...  # embedding width

    @property
    def kind(self) -> str: ...  # resolved: "flat", "hnsw", "ivf" or "ivfpq" (index info and build name it)

    @property
    def ids(self) -> np.ndarray: ...  # sorted copy of the ids held

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray | None: ...

    def save(self, path: str | Path, manifest: dict) -> None: ...


class VectorIndex:
    """A FAISS inner-product index keyed by stable int64 reference ids (never FAISS positions)."""

    def __init__(self, cpu_index: faiss.Index, config: VectorIndexConfig, kind: str) -> None:
        """Wrap an index made by :meth:`build` or :meth:`load` (use those rather than this)."""
        self._cpu = cpu_index
        self._kind = kind
        self._dim = int(cpu_index.d)
        self._config = config
        self._ids = np.sort(_stored_ids(cpu_index, kind))  # live ids, sorted
        if has_repeats(self._ids):
            raise ValueError("index holds duplicate ids")
        self._removed = np.zeros(0, dtype=np.int64)  # hnsw tombstones, sorted
        self._on_gpu = _wants_gpu(config.use_gpu, kind)
        self._gpu: faiss.Index | None = None  # lazily cloned from self._cpu

    # ----------------------------------------------------------------- construction

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        ids: np.ndarray,
        config: VectorIndexConfig | None = None,
        *,
        dim: int | None = None,
    ) -> VectorIndex:
        """Build an index over ``vectors`` (n, dim) keyed by ``ids`` (n,); ``dim`` is needed when n == 0."""
        cfg = config if config is not None else VectorIndexConfig()
        _check_gpu_request(cfg.use_gpu)
        arr = np.asarray(vectors)
        if arr.ndim == 2 and arr.shape[0] == 0 and arr.shape[1] == 0 and dim is not None:
            arr = arr.reshape(0, dim)
        xb = as_vectors(arr, dim=dim)
        ids = _as_ids(ids, xb.shape[0])
        _check_unique(ids)
        n, d = xb.shape
        if d < 1:
            raise ValueError(
                "an empty build needs dim: pass dim=<embedding size> or vectors of shape (0, dim)"
            )

        kind = cfg.resolve(n)
        if kind == "ivfpq":
            from index import ivfpq

            return ivfpq.build(ivfpq.ArraySource(ids, xb),  # type: ignore[return-value]
                               **cfg.ivfpq_options(d, "index_config"))
        if kind == "ivf":
            nlist = _nlist_for(n, cfg.ivf_nlist)
            if nlist < 1:
                not_built("ivf", n, f"{n} vectors are too few to train it (it needs at least {MIN_POINTS_PER_LIST})"
                          if cfg.ivf_nlist is None else
                          f"ivf_nlist is {cfg.ivf_nlist}, more lists than the {n} vectors to train them on "
                          "(lower ivf_nlist in gallery.json's \"index\", or set it to null)")
                kind = "flat"
        if kind == "flat":
            index = _new_flat(d)
        elif kind == "hnsw":
            index = _new_hnsw(d, cfg)
        else:
            index = _new_ivf(xb, nlist, cfg.ivf_nprobe)
        if n:
            index.add_with_ids(xb, ids)
        logger.info("built %s vector index: %d vectors of dim %d", kind, n, d)
        return cls(index, cfg, kind)

    # ----------------------------------------------------------------- properties

    @property
    def ntotal(self) -> int:
        """Number of searchable vectors."""
        return int(self._ids.size)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return self._dim

    @property
    def kind(self) -> str:
        """Resolved kind: "flat", "hnsw" or "ivf"."""
        return self._kind

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU."""
        return self._on_gpu

    @property
    def ids(self) -> np.ndarray:
        """Sorted copy of the ids currently in the index."""
        return self._ids.copy()

    def __len__(self) -> int:
        return self.ntotal

    def __repr__(self) -> str:
        return (
            f"VectorIndex(kind={self._kind!r}, dim={self._dim}, ntotal={self.ntotal}, on_gpu={self._on_gpu})"
        )

    # ----------------------------------------------------------------- mutation

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add ``vectors`` (n, dim) under ``ids`` (n,); ids already in the index raise ValueError."""
        xb, ids = new_entries(vectors, ids, dim=self._dim, present=self._ids)
        if ids.size == 0:
            return
        if self._removed.size and np.isin(ids, self._removed).any():
            self._compact()  # the tombstoned copies must go before the id can be reused
        self._cpu.add_with_ids(xb, ids)
        self._ids = union_sorted(self._ids, ids)
        self._gpu = None

    def remove(self, ids: np.ndarray) -> int:
        """Remove ``ids`` (absent ids are ignored); returns how many were removed."""
        ids = held_ids(ids, self._ids)
        if ids.size == 0:
            return 0
        if self._kind == "hnsw":
            self._removed = union_sorted(self._removed, ids)
            self._ids = np.setdiff1d(self._ids, ids, assume_unique=True)
            if self._removed.size > HNSW_COMPACT_FRACTION * self._cpu.ntotal:
                self._compact()
        else:
            removed = int(self._cpu.remove_ids(ids))
            if removed != ids.size:
                raise RuntimeError(f"FAISS removed {removed} vectors, expected {ids.size}")
            self._ids = np.setdiff1d(self._ids, ids, assume_unique=True)
            self._gpu = None
        return int(ids.size)

    def _compact(self) -> None:
        """Rebuild the HNSW graph without its tombstoned vectors."""
        if not self._removed.size:
            return
        stored = _stored_ids(self._cpu, "hnsw")
        keep = ~np.isin(stored, self._removed)
        vectors = self._cpu.index.reconstruct_n(0, self._cpu.ntotal)[keep]
        index = _new_hnsw(self._dim, self._config)
        if keep.any():
            index.add_with_ids(np.ascontiguousarray(vectors), np.ascontiguousarray(stored[keep]))
        logger.info("rebuilt hnsw index without %d removed vectors (%d kept)", self._removed.size, keep.sum())
        self._cpu = index
        self._removed = np.zeros(0, dtype=np.int64)

    # ----------------------------------------------------------------- search

    def _search_index(self, k: int) -> faiss.Index:
        if not self._on_gpu or k > GPU_MAX_K:
            return self._cpu
        if self._gpu is None:
            self._gpu = faiss.index_cpu_to_all_gpus(self._cpu)
        return self._gpu

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``D`` float32 (Q, k) best first, ``I`` int64 (Q, k) reference ids."""
        k = check_k(k)
        xq = as_vectors(queries, "queries", self._dim)
        dists, labels = empty_result(xq.shape[0], k)
        if self.ntotal == 0 or xq.shape[0] == 0:
            return dists, labels
        kk = min(k, self.ntotal)
        if self._removed.size:  # hnsw with tombstones: filter them out inside the graph search
            keep = faiss.IDSelectorNot(faiss.IDSelectorBatch(self._removed))
            params = faiss.SearchParametersHNSW(sel=keep, efSearch=max(self._config.hnsw_ef_search, kk))
            dk, ik = self._cpu.search(xq, kk, params=params)
        else:
            dk, ik = self._search_index(kk).search(xq, kk)
        dk[ik < 0] = -np.inf
        dists[:, :kk] = dk
        labels[:, :kk] = ik
        return dists, labels

    def reconstruct(self, ids: Sequence[int]) -> np.ndarray | None:
        """The stored vectors of ``ids`` (held by the index), (len(ids), dim) float32 in that order; None for an
        ``ivf`` index, which keeps no id -> vector map (read them from the store instead)."""
        if self._kind == "ivf":
            return None
        out = np.zeros((len(ids), self._dim), dtype=np.float32)
        for row, i in enumerate(ids):
            out[row] = self._cpu.reconstruct(int(i))
        return out

    # ----------------------------------------------------------------- persistence

    def save(self, path: str | Path, manifest: dict) -> None:
        """Write the index to ``path`` and ``manifest`` (+ kind/dim/count) to ``<path>.json``, each atomically."""
        path = Path(path)
        self._compact()  # never persist hnsw tombstones
        meta = {**manifest, "kind": self._kind, "dim": self._dim, "count": self.ntotal}
        text = json.dumps(meta, indent=2, sort_keys=True)  # fail on a bad manifest before touching disk
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: faiss.write_index(self._cpu, str(tmp)))
        atomic_write(manifest_path(path), text)
        logger.info("saved %s vector index (%d vectors) to %s", self._kind, self.ntotal, path)

    @classmethod
    def load(cls, path: str | Path, *, use_gpu: bool | None = None,
             manifest: dict | None = None) -> tuple[VectorIndex, dict]:
        """Read an index written by :meth:`save`; returns ``(index, manifest)``. ``manifest``: its manifest when
        the caller read it already (:func:`load_index`), not read again."""
        path = Path(path)
        mpath = manifest_path(path)
        for p in (path, mpath):
            if not p.is_file():
                raise FileNotFoundError(f"vector index file not found: {p}")
        if manifest is None:
            try:
                manifest = json.loads(mpath.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"vector index manifest {mpath} is unreadable: {exc}") from exc
        if not isinstance(manifest, dict):
            raise ValueError(
                f"vector index manifest {mpath} must hold a JSON object, got {type(manifest).__name__}"
            )
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            raise ValueError(f"vector index file {path} is corrupt or not a FAISS index: {exc}") from exc
        try:
            kind = _kind_of(index)
        except ValueError as exc:
            raise ValueError(f"vector index file {path} was not written by VectorIndex: {exc}") from exc
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"vector index file {path} does not use the inner-product metric")
        expected = {"kind": kind, "dim": int(index.d)}
        got = {key: manifest.get(key) for key in expected}
        if got != expected:
            raise ValueError(
                f"vector index {path} and its manifest disagree (interrupted save?): "
                f"index has {expected}, manifest says {got}"
            )
        if manifest.get("count") != int(index.ntotal):  # read between the file's save and its manifest's: the file
            # is a valid index keyed by ids, the manifest an older one; whoever opens it syncs it by id
            logger.info("vector index %s holds %d vectors, its manifest says %s: the manifest is older",
                        path, index.ntotal, manifest.get("count"))
            manifest = {**manifest, "store_version": None}
        cfg = VectorIndexConfig(kind=kind, use_gpu=use_gpu)
        if kind == "hnsw":
            hnsw = faiss.downcast_index(index.index).hnsw
            cfg.hnsw_m = int(hnsw.nb_neighbors(1))
            cfg.hnsw_ef_construction = int(hnsw.efConstruction)
            cfg.hnsw_ef_search = int(hnsw.efSearch)
        elif kind == "ivf":
            cfg.ivf_nlist = int(index.nlist)
            cfg.ivf_nprobe = int(index.nprobe)
        logger.info(
            "loaded %s vector index (%d vectors of dim %d) from %s", kind, index.ntotal, index.d, path
        )
        return cls(index, cfg, kind), manifest


def manifest_path(path: Path) -> Path:
    """The JSON manifest beside an index file (``vectors.faiss`` -> ``vectors.faiss.json``)."""
    return path.with_name(path.name + ".json")


def read_manifest(path: str | Path) -> dict | None:
    """The manifest saved beside the index file ``path`` (:func:`manifest_path`), or None when it is missing,
    unreadable or not a JSON object (a look at what was saved: :func:`load_index` says what is wrong)."""
    try:
        saved = json.loads(manifest_path(Path(path)).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def load_index(path: str | Path, *, use_gpu: bool | None = None) -> tuple[SearchIndex, dict]:
    """Read the index saved at ``path`` whatever its kind: (``VectorIndex`` or ``IvfPqIndex``, manifest).

    FileNotFoundError when nothing was saved; ValueError when the files are unusable.
    """
    path = Path(path)
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"vector index manifest not found: {manifest_path(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = None  # VectorIndex.load says what is wrong
    if isinstance(manifest, dict) and manifest.get("kind") == "ivfpq":
        from index.ivfpq import IvfPqIndex

        return IvfPqIndex.load(path, manifest), manifest
    return VectorIndex.load(path, use_gpu=use_gpu, manifest=manifest if isinstance(manifest, dict) else None)
