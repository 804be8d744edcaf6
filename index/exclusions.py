"""Reversible exclusions: references left out of search and probe training, and the log that undoes them.

Nothing is deleted: an excluded reference keeps its row (``excluded = true``). Each run that excludes
references is logged in the gallery's ``clean_log.json`` (see :mod:`index.layout`) so that
:func:`restore` can undo the last run, or every exclusion at once.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from index.atomic import write_json_atomic

if TYPE_CHECKING:
    from index.gallery import Gallery


def read_log(gallery: Gallery) -> dict:
    """The gallery's exclusion log: ``{"runs": [{"time", "kinds", "excluded", "report"}, ...]}``."""
    path = gallery.layout.clean_log
    if not path.is_file():
        return {"runs": []}
    return json.loads(path.read_text(encoding="utf-8"))


def excluded_ids(gallery: Gallery) -> list[int]:
    """Ids of the gallery's excluded references."""
    meta = gallery.store.metadata()
    return sorted(int(i) for i, ex in zip(meta["id"], meta["excluded"].fillna(False), strict=True) if bool(ex))


def exclude(
    gallery: Gallery, ids: Sequence[int], *, kinds: Sequence[str], report: str | Path | None = None
) -> tuple[list[int], int]:
    """Exclude references and log the run; returns (ids newly excluded, how many were excluded already)."""
    wanted = sorted({int(i) for i in ids})
    if not wanted:
        return [], 0
    with gallery.writing():  # the exclusion and its log entry as one step: no concurrent run's entry is lost
        return _exclude(gallery, wanted, kinds, report)


def _exclude(gallery: Gallery, wanted: list[int], kinds: Sequence[str], report: str | Path | None
             ) -> tuple[list[int], int]:
    meta = gallery.store.metadata(wanted)
    before = {int(i) for i, ex in zip(meta["id"], meta["excluded"].fillna(False), strict=True) if bool(ex)}
    new = [i for i in wanted if i not in before and i in set(meta["id"].astype(int))]
    if new:
        gallery.set_excluded(new, True)
        log = read_log(gallery)
        log["runs"].append({
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "kinds": list(kinds),
            "excluded": new,
            "report": str(report) if report is not None else None,
        })
        write_json_atomic(gallery.layout.clean_log, log, sort_keys=False)
    return new, len(set(wanted) & before)


def restore(gallery: Gallery, which: str = "last") -> int:
    """Bring excluded references back into search; returns how many.

    ``last``: those excluded by the last logged run (runs can be undone one by one);
    ``all``: every excluded reference of the gallery, whoever excluded it, and the log is cleared.
    """
    if which not in ("last", "all"):
        raise ValueError(f"--restore takes 'last' or 'all', not {which!r}")
    with gallery.writing():  # read, change and write the log under the lock its writers hold
        return _restore(gallery, which)


def _restore(gallery: Gallery, which: str) -> int:
    log = read_log(gallery)
    if which == "all":
        ids = excluded_ids(gallery)
        log["runs"] = []
    else:
        if not log["runs"]:
            raise ValueError(f"gallery {gallery.root} has no clean run to restore (see {gallery.layout.clean_log.name})")
        ids = log["runs"].pop()["excluded"]
    found = gallery.set_excluded(ids, False) if ids else 0
    write_json_atomic(gallery.layout.clean_log, log, sort_keys=False)
    return found
