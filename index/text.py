"""Text from outside (file names, gallery names) made safe where it is shown: a terminal, a spreadsheet.

- :func:`printable` shows the control characters of a path or name visibly (``\\n``, ``\\x1b``, ``\\u202e``), so that
  a file named ``bite\\n  Unlikely to be venomous ...\\x1b[8m.jpg`` prints as one line and cannot hide or fake the
  lines around it on a terminal. For people's output only: JSON and CSV keep the text as it is (their quoting
  already keeps it in its field).
- :func:`csv_cell` neutralises a CSV text cell that a spreadsheet would run as a formula (OWASP, CSV injection): a
  cell starting with ``= + - @``, a tab or a carriage return gets a ``'`` in front; numbers stay numbers.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

#: The escapes of the usual control characters, as Python's repr writes them.
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: Unicode categories escaped by :func:`printable`: controls (C0, DEL, C1: newline, ESC), format characters (bidi
#: overrides and isolates, zero-width ones), the line and paragraph separators, and the lone surrogates that stand
#: for a Linux file name's bytes that are not UTF-8 (which a terminal cannot be written).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """``text`` (a path, a file name, a message holding one) with every character that a terminal would act on or
    hide (newline, ESC, other controls, bidi overrides, zero-width characters) written as a visible escape
    (``\\n``, ``\\x1b``, ``\\u202e``); any other text, accents and Arabic included, as it is."""
    s = str(text)
    if all(unicodedata.category(ch) not in _HIDDEN_CATEGORIES for ch in s):
        return s
    return "".join(_escape(ch) if unicodedata.category(ch) in _HIDDEN_CATEGORIES else ch for ch in s)


#: First characters that make a spreadsheet read a cell as a formula (OWASP's list: ``=``, ``+``, ``-``, ``@``, tab,
#: carriage return).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: A number as text (``-0.25``, ``+3``, ``1e-05``): a cell a spreadsheet reads as that number, never as a formula.
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(value: object) -> object:
    """A CSV cell made safe to open in a spreadsheet: a text cell that starts with a formula character
    (:data:`FORMULA_STARTS`: ``=1+1``, ``@SUM(A1)``, ``-2+3``) gets a ``'`` in front (OWASP), which Excel and
    LibreOffice show as text; numbers (negative ones too), numbers written as text (``-0.25``) and other cells are
    returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(values: Iterable[object]) -> list[object]:
    """A row of cells for ``csv.writer``, each through :func:`csv_cell`."""
    return [csv_cell(v) for v in values]


def csv_dict(row: dict) -> dict:
    """A row for ``csv.DictWriter``, each value through :func:`csv_cell` (the keys are the header: ours)."""
    return {k: csv_cell(v) for k, v in row.items()}
