"""A gallery's whitening statistics, saved beside it and brought up to the store by difference.

The kNN vote's whitening (:mod:`retrieval.metric`) is fitted from sums over every searchable reference
(:class:`~retrieval.metric.WhiteningStats`). Streaming the whole store for them at every refit costs O(gallery):
minutes for a SnakeCLEF-sized gallery, paid by the write that adds a new species. Instead the sums are saved in the
gallery folder (``whitening_stats.npz``, :attr:`index.layout.GalleryLayout.whitening_stats`) with the ids of the rows
they cover. A later refit reads the store's id column, adds the rows that appeared and takes out the rows that went
-- read at the store version the sums were saved at, where they still exist (ids are never reused, and a row's
embedding and species never change) -- and fits from the sums: O(changed rows + d^3) instead of O(gallery).

When no difference can be made (no file, an unreadable one, another encoder's, or the old version cleaned up and the
gone rows deleted), the store is streamed once as before and the file written again. The sums are float64; a row
added and later removed leaves them as they were, to rounding.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from index.atomic import atomic_write
from index.gallery import Gallery
from index.store import ReferenceStore
from retrieval.metric import WhiteningStats

logger = logging.getLogger(__name__)

STATS_FORMAT = 1
#: Rows read per store query when summing the rows that appeared or went.
_CHUNK = 4096


@dataclass
class GalleryStats:
    """The whitening's sums over a gallery's searchable rows, and which rows those are."""

    stats: WhiteningStats  # the sums (retrieval.metric)
    ids: np.ndarray  # sorted int64 ids of the rows summed
    version: int  # a store version at which every row in ``ids`` exists (where gone rows are read back)
    fingerprint: str  # the encoder that made the embeddings


def _ranges(ids: np.ndarray) -> np.ndarray:
    """Sorted ids as (k, 2) runs [start, stop): a gallery's ids are mostly consecutive."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return np.zeros((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    starts = ids[np.r_[0, breaks]]
    stops = ids[np.r_[breaks - 1, len(ids) - 1]] + 1
    return np.stack([starts, stops], axis=1)


def _from_ranges(runs: np.ndarray) -> np.ndarray:
    runs = np.asarray(runs, dtype=np.int64).reshape(-1, 2)
    return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in runs]) if len(runs) else np.zeros(0, np.int64)


def load_stats(gallery: Gallery) -> GalleryStats | None:
    """The saved statistics, or None (logged) when there are none usable for this gallery."""
    path = gallery.layout.whitening_stats
    if not path.is_file():
        return None
    try:
        with np.load(path) as arrays:
            meta = json.loads(str(arrays["meta"]))
            if meta.get("format") != STATS_FORMAT:
                raise ValueError(f"format {meta.get('format')}, not {STATS_FORMAT}")
            saved = GalleryStats(stats=WhiteningStats.from_arrays(arrays), ids=_from_ranges(arrays["ranges"]),
                                 version=int(meta["version"]), fingerprint=str(meta["fingerprint"]))
    except (OSError, ValueError, KeyError) as exc:
        logger.info("whitening statistics %s not used: %s", path, exc)
        return None
    if saved.fingerprint != gallery.fingerprint or saved.stats.dim != gallery.dim:
        logger.info("whitening statistics %s were made by another encoder: not used", path)
        return None
    return saved


def save_stats(gallery: Gallery, saved: GalleryStats) -> None:
    """Write the statistics atomically (any process may: the file always holds sums and the ids they cover)."""
    buf = io.BytesIO()
    meta = {"format": STATS_FORMAT, "version": int(saved.version), "fingerprint": saved.fingerprint,
            "photos": int(saved.stats.count)}
    np.savez(buf, meta=np.asarray(json.dumps(meta)), ranges=_ranges(saved.ids), **saved.stats.to_arrays())
    atomic_write(gallery.layout.whitening_stats, buf.getvalue())


def stats_from_rows(gallery: Gallery, ids: np.ndarray, vectors: np.ndarray, labels: Sequence[str]) -> GalleryStats:
    """Statistics of rows already in memory (the probe's training data: every searchable row)."""
    stats = WhiteningStats(dim=gallery.dim)
    stats.add(vectors, list(labels))
    order = np.argsort(np.asarray(ids, dtype=np.int64))
    return GalleryStats(stats, np.asarray(ids, dtype=np.int64)[order], gallery.store.version, gallery.fingerprint)


def _rows(store: ReferenceStore, ids: np.ndarray) -> Iterator[tuple[np.ndarray, list[str]]]:
    """(vectors, species) of ``ids`` (any row, excluded ones too) in chunks; ValueError when one is missing."""
    for start in range(0, len(ids), _CHUNK):
        want = ids[start : start + _CHUNK]
        got, vectors = store.vectors(ids=want.tolist())
        if len(got) != len(want):
            raise ValueError(f"{len(want) - len(got)} of the rows are not in the store at version {store.version}")
        yield vectors, store.species_of(got.tolist())


def scan_stats(gallery: Gallery) -> GalleryStats:
    """Statistics of every searchable row, streamed from the store in batches (never the whole table at once)."""
    version = gallery.store.version
    stats, seen = WhiteningStats(dim=gallery.dim), []
    for ids, vectors in gallery.store.iter_vectors():
        stats.add(vectors, gallery.store.species_of(ids.tolist()))
        seen.append(ids)
    ids = np.sort(np.concatenate(seen)) if seen else np.zeros(0, np.int64)
    return GalleryStats(stats, ids, version, gallery.fingerprint)


def synced_stats(gallery: Gallery, saved: GalleryStats) -> tuple[GalleryStats, int, int] | None:
    """``saved`` brought to the store's searchable rows by difference: (statistics, rows added, rows taken out);
    None when the difference cannot be made (a row that went is no longer readable). ``saved.stats`` is updated in
    place: a loaded copy, not to be used again after a None."""
    version = gallery.store.version
    now = gallery.store.ids()
    new = np.setdiff1d(now, saved.ids, assume_unique=True)
    gone = np.setdiff1d(saved.ids, now, assume_unique=True)
    stats = saved.stats
    try:
        if len(gone):
            try:  # as they were when summed: deleted rows are still there
                old = gallery.store.at_version(saved.version)
            except ValueError as exc:  # cleaned up: rows only excluded since are still readable now
                logger.info("%s; reading the rows that went at the current version", exc)
                old = gallery.store
            for vectors, labels in _rows(old, gone):
                stats.remove(vectors, labels)
        for vectors, labels in _rows(gallery.store, new):
            stats.add(vectors, labels)
    except ValueError as exc:
        logger.info("whitening statistics not brought up to date by difference: %s", exc)
        return None
    return GalleryStats(stats, now, version, gallery.fingerprint), len(new), len(gone)


def gallery_stats(gallery: Gallery, *, save: bool = False) -> GalleryStats:
    """The whitening statistics of the gallery's searchable rows now: the saved ones brought up to date by
    difference, else streamed from the whole store. ``save``: write them back (a writer, under the write lock)."""
    saved = load_stats(gallery)
    synced = synced_stats(gallery, saved) if saved is not None else None
    if synced is not None:
        current, added, removed = synced
        logger.info("whitening statistics brought up to date: %d rows added, %d taken out (of %d)", added, removed,
                    current.stats.count)
        changed = bool(added or removed) or current.version != saved.version
    else:
        current, changed = scan_stats(gallery), True
        logger.info("whitening statistics summed over the gallery's %d rows", current.stats.count)
    if save and changed:
        save_stats(gallery, current)
    return current
