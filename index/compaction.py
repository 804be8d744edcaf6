"""The settings of the store's automatic compaction (:meth:`index.gallery.Gallery.compact`), kept apart from the
gallery so that the server's settings read them without importing LanceDB."""

from __future__ import annotations

import datetime as dt
import os

#: Small store fragments (:data:`index.store.SMALL_FRAGMENT_ROWS`) at which a write compacts them, in the same
#: write hold (:meth:`index.gallery.Gallery.compact`). Each commit (an API upload, an ``index add`` chunk, an
#: exclusion) makes one, and every read opens them all: after 1,000 single-row adds to a built gallery of 1,000
#: rows, an identify's neighbour lookup took 525 ms (p50) without compaction and 11.5 ms with it at 32, and a sync's
#: ``ids()`` 551 ms against 4.9 ms, for one compaction (its add's p99: 151 ms against the adds' 40 ms p50) per ~32
#: uploads (``benchmarks/bench_store_growth.py``, docs/shared-gallery.md "Store growth"). 0: never
#: (``speciesid index compact`` by hand).
COMPACT_FRAGMENTS = 32
#: The variable that sets it (the server's settings and the command line read it).
COMPACT_ENV = "SPECIESID_COMPACT_FRAGMENTS"
#: A write's compaction also deletes the store's versions older than this (LanceDB's own default for its
#: ``optimize``): a reader elsewhere is never that far behind (it looks every ``refresh_s``), and
#: ``retrieval.whitening_sync`` reads an old version only back to its last saved statistics, falling back when it is
#: gone. ``speciesid index compact --prune-older-than`` prunes closer.
AUTO_PRUNE_AGE = dt.timedelta(days=7)


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
