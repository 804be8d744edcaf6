"""What an operator needs to see of a gallery's store, read only: where it is and what writers left there.

:func:`store_status` gathers, for ``speciesid index info``: the store's URI; the Ray build journals left in the
gallery folder (:func:`index.fragments.list_journals`); and for a store on S3, its write lease (holder, last
renewal, TTL: :meth:`index.lease.S3Lease.look`) and the shared id mark (``_speciesid/ids.json``). Nothing is
taken, changed or removed; a part that cannot be read (the store unreachable, an unreadable mark) is reported as
that part's ``error``, never as a failure of the whole.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from index.errors import first_line
from index.fragments import list_journals
from index.lease import is_s3
from index.locks import look as look_at_lock
from index.locks import write_lock

if TYPE_CHECKING:
    from index.gallery import Gallery

logger = logging.getLogger(__name__)


def store_status(gallery: Gallery) -> dict[str, Any]:
    """The ``store`` block of ``index info``: ``uri``, ``journals`` (leftover build journals, with host and pid),
    ``write_lock`` (whether a writer holds the folder's lock now, and its holder: :func:`index.locks.look`), and on
    S3 ``lease`` (None when no writer ever took it) and ``ids`` (the shared id mark: ``next`` and
    ``object``; None when no writer recorded one)."""
    uri = str(gallery.store_uri)
    status: dict[str, Any] = {"uri": uri, "journals": list_journals(gallery.root),
                              "write_lock": look_at_lock(gallery.layout.write_lock)}
    lease = write_lock(gallery.layout.write_lock).remote
    if not is_s3(uri) or lease is None:
        return status
    try:
        status["lease"] = lease.look()
    except Exception as exc:  # noqa: BLE001 - told as this part's error: the rest of the block still says something
        status["lease"] = {"error": first_line(exc, 500)}
    mark = lease.ids_where
    try:
        next_id, _ = lease.read_next_id()
        status["ids"] = None if next_id is None else {"next": next_id, "object": mark}
    except Exception as exc:  # noqa: BLE001
        status["ids"] = {"error": first_line(exc, 500), "object": mark}
    return status


def folder_status(root: str | Path, error: BaseException) -> dict[str, Any]:
    """What ``index info`` says of a gallery whose store could not be opened (``error``): what the folder itself
    knows (``gallery.json``'s encoder and index settings; the saved vector index's kind, count and the store version
    it reflects: ``local_index``), and ``store`` as ``{"uri", "error"}``. Nothing is asked of the store."""
    from index.gallery import read_gallery_info
    from index.layout import GalleryLayout
    from index.vectors import read_manifest

    layout = GalleryLayout(Path(root))
    info = read_gallery_info(root)
    saved = read_manifest(layout.vectors)
    local = None if saved is None else {k: saved.get(k) for k in ("kind", "count", "store_version")}
    return {"index": str(root), "encoder": info.get("encoder"), "index_config": info.get("index"),
            "local_index": local, "store": {"uri": str((info.get("store") or {}).get("uri") or layout.store),
                                            "journals": list_journals(Path(root)), "error": first_line(error, 1000)}}
