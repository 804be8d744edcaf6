"""The settings of the store's automatic compaction (:meth:`index.gallery.Gallery.compact`), kept apart from the
gallery so that the server's settings read them without importing LanceDB."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

#: Small store fragments (:data:`index.store.SMALL_FRAGMENT_ROWS`) at which a write compacts them, in the same
#: write hold (:meth:`index.gallery.Gallery.compact`). Each add or exclusion commit (an API upload, a
#: ``references add`` chunk) makes one, and every read opens them all: after 1,000 single-row adds to a built
#: gallery of 1,000 rows, an identify's neighbour lookup took 436 ms (p50) without compaction and 12.9 ms with it
#: at 32, and a sync's ``ids()`` 502 ms against 7.4 ms, for one compaction (its add's p99: 75 ms against the adds'
#: 23 ms p50) per ~32 uploads (``benchmarks/bench_store_growth.py``, docs/shared-gallery.md "Store growth").
#: 0: never (``speciesid index compact`` by hand).
COMPACT_FRAGMENTS = 32
#: The variable that sets it (the server's settings and the command line read it).
COMPACT_ENV = "SPECIESID_COMPACT_FRAGMENTS"
#: A write's compaction also deletes the store's versions superseded longer ago than this (the version after them
#: created that long ago: :func:`index.store.superseded_versions`; never the latest, however old): a reader
#: elsewhere looks for new versions every ``refresh_s``, so it is never at one of them, and
#: ``retrieval.whitening_sync`` reads an old version only back to its last saved statistics, falling back when it is
#: gone. ``speciesid index compact --prune-older-than`` prunes closer.
AUTO_PRUNE_AGE = dt.timedelta(days=7)
#: How young a file no version uses may be for a zero-age prune to delete such files (Lance's ``delete_unverified``):
#: one written more recently may be a writer's not yet committed (one this folder's lock, journal and marks cannot
#: see: an older speciesid's Ray build, a folder whose flock is not shared), so then every such file is kept.
UNVERIFIED_GRACE = dt.timedelta(hours=1)
#: A write's compaction prunes at most this often per gallery folder (the time of the last prune is kept in the
#: folder: :attr:`index.layout.GalleryLayout.store_pruned`): listing the versions reads every kept version's manifest (on
#: S3 one request each), inside the write hold, which a server's searches wait on.
AUTO_PRUNE_EVERY = dt.timedelta(days=1)


@dataclass
class CompactionCounts:
    """What a gallery object's writes compacted since it was opened (a server's ``/metrics`` counters)."""

    runs: int = 0  # compactions after a write that finished
    failures: int = 0  # compactions (or their checks) after a write that failed (logged; the writes stood)
    seconds: float = 0.0  # time spent in the finished ones


def parse_compact_fragments(raw: str | int) -> int:
    """:data:`COMPACT_ENV`'s value: a whole number, 0 or more (0: no automatic compaction). A ValueError names the
    variable and what to set."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = -1
    if value < 0:
        shown = raw.strip() if isinstance(raw, str) else raw
        raise ValueError(f"{COMPACT_ENV}={shown} is not a whole number of fragments, 0 or more: set it to how many "
                         f"small store fragments a write compacts at (default {COMPACT_FRAGMENTS}; 0: never), "
                         "or unset it")
    return value


def compact_fragments_default() -> int:
    """:data:`COMPACT_ENV` when set (:func:`parse_compact_fragments`), else :data:`COMPACT_FRAGMENTS`."""
    raw = os.environ.get(COMPACT_ENV, "").strip()
    return parse_compact_fragments(raw) if raw else COMPACT_FRAGMENTS
