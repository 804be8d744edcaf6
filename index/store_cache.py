"""The caps of the store's LanceDB caches, kept apart from the store so that the server's settings read them without
importing LanceDB.

LanceDB caches the manifest of every table version a connection reads (metadata) and the index pages it reads (the
BTREE indexes on ``id`` and ``sha256``). Every add or exclusion is a new version, whose manifest stays cached until
the cache is full: with LanceDB's own caps (1 GiB metadata, 6 GiB index) a server's memory grew ~150 kB per add for
~13,000 commits. Every connection of the process shares one session with these smaller caps
(:func:`index.store.store_session`; docs/scale.md, "What breaks first": memory of a long-running server); the Lance
datasets a compaction, a prune or a fragment commit opens are short-lived, with Lance's own caches.
"""

from __future__ import annotations

import os

#: MiB of table manifests cached (about 80 kB a version of a compacted store, so ~800 recent versions). Superseded
#: versions are never read again; 32 MiB levelled a server's memory with adds no slower, 64 leaves room for a store
#: with more fragments.
METADATA_CACHE_MB = 64
#: MiB of index pages cached (the BTREE indexes a neighbour's metadata lookup and a duplicate check read).
INDEX_CACHE_MB = 256
#: The largest cap taken, in MiB (16 TiB): LanceDB takes the caps in bytes as a u64, which a cap over 2**44 MiB
#: overflows at the first store open.
MAX_CACHE_MB = 1 << 24
#: The variables that set them (the server's settings and the command line read them).
METADATA_ENV = "SPECIESID_STORE_METADATA_CACHE_MB"
INDEX_ENV = "SPECIESID_STORE_INDEX_CACHE_MB"
_DEFAULT_MB = {METADATA_ENV: METADATA_CACHE_MB, INDEX_ENV: INDEX_CACHE_MB}  # each variable's default cap

_chosen: dict[str, int] = {}  # what the server's settings set (a .env file included), over the environment


def parse_cache_mb(name: str, raw: str | int) -> int:
    """The value of the variable ``name`` (:data:`METADATA_ENV`, :data:`INDEX_ENV`): a whole number of MiB, 1 to
    :data:`MAX_CACHE_MB`. A ValueError names the variable and what to set."""
    try:
        value = int(str(raw).strip())
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_CACHE_MB:
        shown = raw.strip() if isinstance(raw, str) else raw
        raise ValueError(f"{name}={shown} is not a whole number of MiB from 1 to {MAX_CACHE_MB}: set the cap of the "
                         f"store's cache in MiB (default {_DEFAULT_MB[name]}), or unset it")
    return value


def set_cache_mb(*, metadata: int | None = None, index: int | None = None) -> None:
    """Set the caps for the stores this process opens from now on (the server's settings, read before its gallery
    opens); None: back to the environment's or the default."""
    for name, value in ((METADATA_ENV, metadata), (INDEX_ENV, index)):
        if value is None:
            _chosen.pop(name, None)
        else:
            _chosen[name] = parse_cache_mb(name, value)


def cache_mb(name: str) -> int:
    """The cap of ``name`` (:data:`METADATA_ENV` or :data:`INDEX_ENV`), in MiB: set by :func:`set_cache_mb`, else
    the variable when set (:func:`parse_cache_mb`), else its default."""
    if name in _chosen:
        return _chosen[name]
    raw = os.environ.get(name, "").strip()
    if raw:
        return parse_cache_mb(name, raw)
    return _DEFAULT_MB[name]


def cache_bytes() -> tuple[int, int]:
    """(metadata, index) caps in bytes, as :func:`cache_mb` reads them."""
    return cache_mb(METADATA_ENV) << 20, cache_mb(INDEX_ENV) << 20
