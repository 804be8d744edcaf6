"""Error text as people read it in one line."""

from __future__ import annotations

import re


def first_line(exc: BaseException | str | None, limit: int) -> str:
    """The first line of an error's text (or of ``exc`` when it is text), cut at ``limit`` characters."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


#: How Lance words a failed read or write of its storage (an object store unreachable, a request refused
#: mid-flight): ``lance error: LanceError(IO): Generic S3 error: Error performing list request ...``.
_STORE_IO = re.compile(r"LanceError\(IO\)|Generic (\w+) error")


def store_io_failure(exc: BaseException) -> str | None:
    """When ``exc`` is a store's I/O failure (a RuntimeError or OSError whose text, or a cause's, is Lance's I/O
    error or an object store's), the kind of store it names (``S3``, ``GCS``, ``LocalFileSystem``; ``""`` when it
    names none); else None: other errors (a programming error, a bad argument) are not a store outage."""
    if not isinstance(exc, (RuntimeError, OSError)):
        return None
    seen: set[int] = set()
    err: BaseException | None = exc
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        found = _STORE_IO.search(str(err))
        if found:
            kinds = [k for k in re.findall(r"Generic (\w+) error", str(err)) if k != "N/A"]
            return kinds[0] if kinds else ""
        err = err.__cause__ or err.__context__
    return None
