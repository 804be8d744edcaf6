"""Reading a gallery folder's JSON records across speciesid versions: the one rule, in one place.

- **Unknown keys are ignored.** A newer speciesid adds fields freely; an older reader keeps the ones it knows
  (:func:`from_dict` / :func:`known_fields`, the one way a record becomes a dataclass) and says once, in the log,
  which it left out. (speciesid before 0.2.0 raised TypeError on them.)
- **``format`` is bumped only for a real break**: a change an older reader would misread. A reader that meets a
  higher format refuses, before it does anything, with "written by a newer speciesid (format N): upgrade speciesid"
  (:func:`check_format`).
- **Every write of ``gallery.json``, and every save of a probe (``probe train``, ``probe import``), records
  ``written_by``**: the speciesid version that wrote it (:func:`speciesid_version`), which ``index info`` shows. A
  probe brought back (``probe restore``) or taken from the store (a shared probe) is copied as saved, its
  ``written_by`` with it: it names the version that made the probe, which decides how its settings were chosen.

CONTRIBUTING.md ("Gallery formats") says how to add a field; tests/test_formats.py is the compat test. Values
written as JSON are made plain here too (:func:`jsonable`: numpy values, paths, NaN).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)

#: speciesid's version, the one place it is written: ``pyproject.toml`` reads it ([tool.setuptools.dynamic]), and
#: ``speciesid --version``, the API and ``written_by`` give it (:func:`speciesid_version`). A plain string:
#: setuptools reads it without importing this module.
VERSION = "0.2.0"
#: ``gallery.json``'s format: bumped only when a reader of the previous one would misread the file.
GALLERY_FORMAT = 1
#: ``probe.json``'s format (a gallery's probe, a fine-tuned model folder's head): bumped likewise.
PROBE_FORMAT = 1
#: The key of ``gallery.json`` and ``probe.json`` that names the speciesid version that last wrote the file (for
#: ``probe.json``: that saved the probe, kept when it is restored or taken from the store).
WRITTEN_BY = "written_by"

T = TypeVar("T")
#: (record kind, unknown keys) already logged: said once per process, not at every read of a file.
_said: set[tuple[str, frozenset[str]]] = set()


def speciesid_version() -> str:
    """The running code's speciesid version (:data:`VERSION`, which ``pyproject.toml`` reads): a source checkout
    reports its own, whatever version an editable install recorded when it was made."""
    return VERSION


def jsonable(obj: Any) -> Any:
    """Plain-Python copy of ``obj`` for strict JSON: numpy scalars unwrapped, arrays and tuples as lists, NaN/inf
    -> None, Paths -> str, mapping keys as str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def known_fields(cls: type, data: Mapping[str, Any], where: str, *, level: int = logging.INFO) -> dict[str, Any]:
    """The items of ``data`` (a record read from ``where``) that are fields of the dataclass ``cls``. The others
    were written by a newer speciesid (or by hand): they are left out, and logged once per process at ``level``
    (naming the known key each is closest to, for a misspelt one)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown and (cls.__name__, frozenset(unknown)) not in _said:
        _said.add((cls.__name__, frozenset(unknown)))
        hints = [f"{k!r}" + (f" (did you mean {near[0]!r}?)" if (near := difflib.get_close_matches(k, names, n=1))
                             else "") for k in unknown]
        logger.log(level, "%s: ignored the key(s) this speciesid (%s) does not know: %s (written by a newer "
                   "speciesid, or by hand)", where, speciesid_version(), ", ".join(hints))
    return {k: v for k, v in data.items() if k in names}


def from_dict(cls: type[T], data: Mapping[str, Any], where: str, *, level: int = logging.INFO) -> T:
    """The dataclass ``cls`` made from a record read from ``where``, its unknown keys ignored
    (:func:`known_fields`); a key it lacks takes the field's default."""
    return cls(**known_fields(cls, data, where, level=level))


class NewerFormatError(ValueError):
    """A gallery folder's record was written by a newer speciesid (a higher ``format``): upgrade speciesid."""


def check_format(path: str | Path, found: object, reads: int, *, older: str) -> None:
    """Refuse the file ``path`` whose ``format`` is ``found`` when this speciesid, which reads format ``reads``,
    cannot read it (ValueError): a higher format was written by a newer speciesid (:class:`NewerFormatError`,
    "upgrade speciesid"); anything else that is not ``reads`` (a lower or damaged one) takes the fix ``older``."""
    if found == reads:
        return
    if isinstance(found, int) and not isinstance(found, bool) and found > reads:
        raise NewerFormatError(f"{path} was written by a newer speciesid (format {found}): upgrade speciesid (this "
                               f"is {speciesid_version()}, which reads format {reads}) on every machine that uses it")
    raise ValueError(f"{path} has format {found!r}; this speciesid reads format {reads}: {older}")
