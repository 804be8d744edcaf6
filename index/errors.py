"""Error text as people read it in one line."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


def exception_chain(exc: BaseException | None, *, context: bool = False) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from (``__cause__``), each once (a chain that loops back ends there);
    with ``context``, an exception without a cause is followed by the one it was raised while handling
    (``__cause__``, else ``__context__``). Nothing when ``exc`` is None."""
    seen: set[int] = set()
    at = exc
    while at is not None and id(at) not in seen:
        seen.add(id(at))
        yield at
        at = (at.__cause__ or at.__context__) if context else at.__cause__


def chained(exc: BaseException | None, kind: type[E], *, context: bool = False) -> E | None:
    """The first exception of type ``kind`` in ``exc``'s chain (:func:`exception_chain`; with ``context``, what
    each was raised while handling too), else None."""
    return next((e for e in exception_chain(exc, context=context) if isinstance(e, kind)), None)


def first_line(exc: BaseException | str | None, limit: int) -> str:
    """The first line of an error's text (or of ``exc`` when it is text), cut at ``limit`` characters."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]


def first_words(exc: BaseException | str | None, limit: int) -> str:
    """The first line of an error's text, whole up to ``limit`` characters, else cut at the first space past it
    (never mid-word) with an ellipsis."""
    line = (str(exc).strip().splitlines() or [""])[0]
    if len(line) <= limit:
        return line
    cut = line.find(" ", limit)
    return line if cut < 0 else line[:cut] + " …"


#: How Lance words a failed read or write of its storage (an object store unreachable, a request refused
#: mid-flight, a local data file missing): ``lance error: LanceError(IO): Generic S3 error: Error performing list
#: request ...``; the kind is object_store's name for the store (``S3``, ``LocalFileSystem``, ``N/A`` for none).
_GENERIC = r"Generic (\w+) error"
_STORE_IO = re.compile(rf"LanceError\(IO\)|{_GENERIC}")
#: object_store's names of the stores reached over a network: their I/O errors are outages (a later try may work).
NETWORK_STORES = frozenset({"S3", "GCS", "MicrosoftAzure", "Azure", "HTTP"})


def library_messages(needs: str, install: str, reinstall: str | None = None) -> tuple[str, str]:
    """The two one-line messages of a library that did not import, after what ``needs`` it ("the vector index needs
    faiss"): not installed (``pip install`` ``install``), and installed but failed to load (a ``{}`` for the import's
    own error, :func:`import_failure`: fix what it names, or reinstall ``reinstall``, by default ``install``)."""
    return (f"{needs}, which is not installed: pip install {install}",
            f"{needs}, which is installed but failed to load ({{}}): fix what that names, or reinstall "
            f"{install if reinstall is None else reinstall}")


def import_failure(exc: ImportError, module: str, missing: str, broken: str) -> str:
    """What to say of ``exc``, raised importing ``module``: ``missing`` when ``module`` itself is not there, else
    ``broken`` (:func:`library_messages`) naming the import's error in one line (a library it needs, a broken
    install)."""
    if isinstance(exc, ModuleNotFoundError) and exc.name == module:
        return missing
    return broken.format(" ".join(str(exc).split()) or type(exc).__name__)


def store_io_kind(exc: BaseException) -> str | None:
    """When ``exc`` is a store's I/O error (a RuntimeError or OSError whose text, or its ``__cause__``'s, is
    Lance's I/O error), the kind of store it names (``S3``, ``GCS``, ``LocalFileSystem``; ``""`` when it names
    none); else None. Only the causes are followed, not ``__context__``: an error raised while handling a store's
    error (a bug in an ``except`` block) is not that store's error."""
    if not isinstance(exc, (RuntimeError, OSError)):
        return None
    for err in exception_chain(exc):
        if isinstance(err, StoreFilesMissingError):
            return "LocalFileSystem"
        if _DATA_FILE_GONE.search(str(err)):  # a data file of the table deleted: the store damaged
            return ""
        if _STORE_IO.search(str(err)):
            kinds = [k for k in re.findall(_GENERIC, str(err)) if k != "N/A"]
            return kinds[0] if kinds else ""
    return None


def store_io_failure(exc: BaseException, store: str | Path | None = None) -> str | None:
    """When ``exc`` is an outage of the gallery's store, the kind of store (:func:`store_io_kind`); else None.

    An outage is a store's I/O error that a later try may not meet: its kind names a network store
    (:data:`NETWORK_STORES`), or ``store`` (where the gallery keeps its table: ``gallery.store_uri``; None when not
    known) is an object-store URI. A local store's I/O error (a data file deleted, a full disk, a permission) is no
    outage: :func:`store_io_kind` tells it apart from other errors, which are neither (a programming error, a bad
    argument)."""
    kind = store_io_kind(exc)
    if kind is None or any(_DATA_FILE_GONE.search(str(err)) and not _STORE_IO.search(str(err))
                           for err in exception_chain(exc)):  # Lance's plain "Not found" of a data file: damaged
        return None
    if kind in NETWORK_STORES:
        return kind
    from index.store import is_uri  # here: index.store loads lancedb, which an error of its store has loaded

    return kind if store is not None and is_uri(str(store)) else None


#: How Lance words a table whose files are gone from under an open gallery (its bucket emptied, its prefix deleted,
#: a store made again elsewhere): ``lance error: Not found: snakes/references.lance/_versions``.
_TABLE_GONE = re.compile(r"Not found: \S*\.lance(/|\b)")
#: How Lance words one data file of a table gone while the table is there (a local store damaged: a file deleted or
#: moved from under it): ``lance error: Not found: tmp/g/store/references.lance/data/0010....lance, .../local.rs``.
_DATA_FILE_GONE = re.compile(r"Not found: \S*\.lance/data/\S")


class StoreFilesMissingError(FileNotFoundError):
    """Data files of a local store's table (its version read) are not in its folder: deleted or moved from under the
    gallery. The store's I/O error (:func:`store_io_kind`: ``LocalFileSystem``), no outage: it does not come back."""


class TableReplacedError(RuntimeError):
    """The store's table is at a version before the one this process's gallery read (a server's or a command's):
    versions only grow, so the table it read was lost and another made (or an older backup restored). Every read and
    write of that gallery raises this until the process opens it again: a server answers as for a table gone
    (restart it), a command says to run it again."""


def store_table_gone(exc: BaseException) -> bool:
    """Whether ``exc`` (or a cause of it) is Lance's "Not found" of the table itself, not a store's I/O error: the
    store answers, but no longer holds the gallery's table (or holds another: :class:`TableReplacedError`).
    Retrying does not bring it back."""
    for err in exception_chain(exc):
        if isinstance(err, TableReplacedError):
            return True
        if isinstance(err, (RuntimeError, OSError, ValueError)) and _STORE_IO.search(str(err)) is None \
                and _TABLE_GONE.search(str(err)) and store_io_kind(err) is None:  # a data file gone: damaged
            return True
    return False
