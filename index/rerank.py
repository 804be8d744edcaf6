"""The re-rank store of the IVF-PQ index: reference id -> float16 vector, on disk and memory-mapped.

A generation is two append-only files (``vectors-<token>.f16``: rows of ``dim`` float16; ``vectors-<token>.ids``:
one int64 id a row), named in :mod:`index.layout`. The index's manifest records how many rows are valid, so
a writer killed while appending leaves only an ignored tail, and a reader that mapped fewer rows keeps a
valid prefix. Rows added since the last save wait in memory (``pending``); a save appends them under the
gallery's write lock, or writes a new generation when the files hold too many rows no longer used (or were
replaced by another process). The same id always names the same vector (ids are never reused), so a row
written twice is harmless.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from index.atomic import atomic_write
from index.layout import GalleryLayout

logger = logging.getLogger(__name__)

#: Rows read per chunk when streaming the file (exact search, compaction).
CHUNK_ROWS = 65_536
#: A new generation is written when more than this fraction of the file's rows are no longer live.
DEAD_FRACTION = 0.5


def new_token() -> str:
    """A fresh generation token."""
    return uuid.uuid4().hex[:12]


class RerankStore:
    """id -> float16 vector for the exact re-rank (and the build's exact calibration)."""

    def __init__(self, dim: int, folder: Path | None = None, token: str | None = None, rows: int = 0) -> None:
        """Open generation ``token`` in ``folder`` with its first ``rows`` rows (or an empty in-memory store)."""
        self.dim = dim
        self.folder = Path(folder) if folder is not None else None
        self.token = token
        self._rows = 0
        self._mm: np.ndarray = np.zeros((0, dim), dtype=np.float16)
        self._file_ids = np.zeros(0, dtype=np.int64)
        self._keys = np.zeros(0, dtype=np.int64)  # file ids, sorted
        self._where = np.zeros(0, dtype=np.int64)  # file row of each key
        self._pending: dict[int, np.ndarray] = {}
        if token is not None and rows:
            self._map(rows)

    # ------------------------------------------------------------------ files
    def _paths(self, token: str | None = None) -> tuple[Path, Path]:
        if self.folder is None:
            raise ValueError("this re-rank store has no folder yet")
        layout = GalleryLayout(self.folder)
        token = token or self.token
        return layout.vectors_part(token, "f16"), layout.vectors_part(token, "ids")

    def _map(self, rows: int) -> None:
        f16, ids = self._paths()
        row_bytes = 2 * self.dim
        if f16.stat().st_size < rows * row_bytes or ids.stat().st_size < rows * 8:
            raise ValueError(f"re-rank files {f16.name} hold fewer than the {rows} rows the manifest names")
        self._mm = np.memmap(f16, dtype=np.float16, mode="r", shape=(rows, self.dim)) if rows else self._mm
        self._file_ids = np.fromfile(ids, dtype=np.int64, count=rows)
        order = np.argsort(self._file_ids, kind="stable")
        self._keys, self._where = self._file_ids[order], order.astype(np.int64)
        self._rows = rows

    @property
    def rows(self) -> int:
        """Rows in the file generation (valid prefix)."""
        return self._rows

    def files(self) -> list[Path]:
        """This generation's two files (none for an in-memory store)."""
        return list(self._paths()) if self.token is not None and self.folder is not None else []

    # ------------------------------------------------------------------ reads
    def __contains__(self, rid: int) -> bool:
        return int(rid) in self._pending or self._file_rows(np.asarray([rid], dtype=np.int64))[0] >= 0

    def _file_rows(self, ids: np.ndarray) -> np.ndarray:
        """File row of each id (-1 where the file lacks it)."""
        if not len(self._keys):
            return np.full(len(ids), -1, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self._keys, ids), len(self._keys) - 1)
        return np.where(self._keys[pos] == ids, self._where[pos], -1)

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """float32 (n, dim) vectors of ``ids`` (KeyError for an id it does not hold)."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        rows = self._file_rows(ids)
        found = rows >= 0
        if found.any():
            take = rows[found]
            order = np.argsort(take)  # ascending rows: sequential page reads
            got = np.asarray(self._mm[take[order]], dtype=np.float32)
            out[np.flatnonzero(found)[order]] = got
        for i in np.flatnonzero(~found):
            vec = self._pending.get(int(ids[i]))
            if vec is None:
                raise KeyError(f"re-rank store has no vector for id {int(ids[i])}")
            out[i] = vec
        return out

    def iter_rows(self, live: np.ndarray | None = None) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        """(ids, float32 vectors) chunks of every stored row (only ``live`` sorted ids when given), once each."""
        for start in range(0, self._rows, CHUNK_ROWS):
            ids = self._file_ids[start : start + CHUNK_ROWS]
            keep = _member(ids, live) if live is not None else np.ones(len(ids), bool)
            keep &= _first_rows(ids, self._keys, self._where, start)
            if keep.any():
                yield ids[keep], np.asarray(self._mm[start : start + CHUNK_ROWS][keep], dtype=np.float32)
        extra = [i for i in self._pending if self._file_rows(np.asarray([i]))[0] < 0]
        if live is not None:
            extra = [i for i in extra if _member(np.asarray([i], np.int64), live)[0]]
        for start in range(0, len(extra), CHUNK_ROWS):
            part = np.asarray(extra[start : start + CHUNK_ROWS], dtype=np.int64)
            yield part, np.stack([self._pending[int(i)] for i in part]).astype(np.float32)

    # ------------------------------------------------------------------ writes
    def put(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Hold these vectors (written at the next :meth:`persist`)."""
        vecs = np.asarray(vectors, dtype=np.float16)
        for rid, vec in zip(np.asarray(ids, dtype=np.int64).tolist(), vecs, strict=True):
            self._pending[rid] = vec

    def dead_rows(self, live: np.ndarray) -> int:
        """File rows whose id is not in ``live`` (sorted)."""
        return int(self._rows - _member(self._file_ids, live).sum()) if self._rows else 0

    def dead_rows_at_most(self, live: np.ndarray) -> int:
        """An upper bound of :meth:`dead_rows`, without reading the file's ids: every live id has a file row or a
        pending one (the index puts each vector it adds here), so at least ``len(live) - pending`` file rows are
        live. What a save asks first: at 1M rows the exact count is a 1M-row binary search (~45 ms a save)."""
        return max(0, min(self._rows, self._rows - len(live) + len(self._pending)))

    def persist(self, folder: Path, live: np.ndarray, disk: tuple[str, int] | None) -> tuple[str, int]:
        """Write what is pending; returns the (token, rows) a manifest should name. Call under the write lock.

        ``disk``: the (token, rows) the manifest on disk names now (another process may have appended or
        replaced the generation since this one was opened). ``live``: sorted ids the index holds.
        """
        self.folder = Path(folder)
        replaced = disk is not None and disk[0] != self.token  # another process wrote its own generation
        if (self.token is None or replaced
                or self._rows > CHUNK_ROWS and self._too_many_dead(live)):
            return self._write_generation(live)
        if disk is not None and disk[1] > self._rows:  # rows appended by another process: map them too
            self._map(disk[1])
        f16, ids_path = self._paths()
        todo = np.asarray(sorted(i for i in self._pending if self._file_rows(np.asarray([i]))[0] < 0), np.int64)
        if todo.size:
            rows = self._rows
            _append(f16, rows * 2 * self.dim, np.stack([self._pending[int(i)] for i in todo]).tobytes())
            _append(ids_path, rows * 8, todo.tobytes())
            self._map(rows + len(todo))
        self._pending.clear()
        return self.token, self._rows

    def _too_many_dead(self, live: np.ndarray) -> bool:
        """Whether more than :data:`DEAD_FRACTION` of the file's rows are no longer live: the exact count only when
        the cheap bound (:meth:`dead_rows_at_most`) does not rule it out."""
        limit = DEAD_FRACTION * max(self._rows, 1)
        return self.dead_rows_at_most(live) > limit and self.dead_rows(live) > limit

    def _write_generation(self, live: np.ndarray) -> tuple[str, int]:
        token = new_token()
        f16, ids_path = self._paths(token)
        kept: list[np.ndarray] = []

        def write_rows(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                for ids, vecs in self.iter_rows(live):
                    fh.write(vecs.astype(np.float16).tobytes())
                    kept.append(ids)

        atomic_write(f16, write_rows)
        all_ids = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
        atomic_write(ids_path, all_ids.astype(np.int64).tobytes())
        logger.info("re-rank store: new generation %s with %d rows", token, len(all_ids))
        self.token = token
        self._pending.clear()
        self._map(len(all_ids))
        return token, self._rows


def write_generation(folder: Path, chunks: Iterable[tuple[np.ndarray, np.ndarray]]) -> tuple[str, np.ndarray]:
    """Stream (ids, vectors) chunks into a new generation's files; returns (token, ids in file order)."""
    token = new_token()
    layout = GalleryLayout(folder)
    kept: list[np.ndarray] = []

    def write_rows(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            for ids, vecs in chunks:
                fh.write(np.asarray(vecs, dtype=np.float16).tobytes())
                kept.append(np.asarray(ids, dtype=np.int64))

    atomic_write(layout.vectors_part(token, "f16"), write_rows)
    ids = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    atomic_write(layout.vectors_part(token, "ids"), ids.tobytes())
    return token, ids


def _append(path: Path, valid_bytes: int, data: bytes) -> None:
    """Cut ``path`` to its valid prefix (a killed writer's tail) and append ``data``, durably."""
    with open(path, "r+b") as fh:
        fh.truncate(valid_bytes)
        fh.seek(valid_bytes)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _member(ids: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Boolean mask: which of ``ids`` are in the sorted array ``sorted_set``."""
    if not len(sorted_set):
        return np.zeros(len(ids), dtype=bool)
    pos = np.minimum(np.searchsorted(sorted_set, ids), len(sorted_set) - 1)
    return sorted_set[pos] == ids


def _first_rows(ids: np.ndarray, keys: np.ndarray, where: np.ndarray, start: int) -> np.ndarray:
    """Mask of rows (starting at file row ``start``) that are the first file row of their id."""
    pos = np.searchsorted(keys, ids)  # stable argsort: the first occurrence's row comes first among equal keys
    return where[pos] == np.arange(start, start + len(ids))
