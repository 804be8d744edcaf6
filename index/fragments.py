"""Rows written by workers, committed by one process: Lance fragments + one Append commit.

Workers (Ray tasks, on any machine that reaches the store) write their rows as Lance data files with
:func:`write_fragments`, which returns the fragments' metadata as JSON text; nothing is visible yet. The
driver commits all of them at once with :func:`commit_fragments` (one new table version: all or nothing).
Fragments of a run that dies before its commit are never seen (their files go with Lance's cleanup of old
versions). Needs ``pylance`` (the ``ray`` extra); LanceDB alone cannot write detached fragments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import pyarrow as pa

logger = logging.getLogger(__name__)


def _lance():
    try:
        import lance
    except ImportError as exc:  # pragma: no cover - the base install has no pylance
        raise ImportError("writing fragments needs pylance: pip install 'speciesid[ray]'") from exc
    return lance


def write_fragments(table: pa.Table, uri: str, options: dict[str, str] | None = None) -> list[str]:
    """Write ``table``'s rows as fragment files of the Lance dataset ``uri``; their metadata as JSON text."""
    if table.num_rows == 0:
        return []
    lance = _lance()
    frags = lance.fragment.write_fragments(table, uri, schema=table.schema, storage_options=options or None)
    return [json.dumps(f.to_json()) for f in frags]


def commit_fragments(uri: str, fragments: Sequence[str], read_version: int, options: dict[str, str] | None = None) -> int:
    """Append the fragments to dataset ``uri`` in one commit; returns the new version."""
    lance = _lance()
    frags = [lance.FragmentMetadata.from_json(f) for f in fragments]
    ds = lance.LanceDataset.commit(uri, lance.LanceOperation.Append(frags), read_version=read_version,
                                   storage_options=options or None)
    logger.info("committed %d fragment(s) to %s as version %d", len(frags), uri, ds.version)
    return int(ds.version)
