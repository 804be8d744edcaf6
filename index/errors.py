"""Error text as people read it in one line."""

from __future__ import annotations


def first_line(exc: BaseException | str | None, limit: int) -> str:
    """The first line of an error's text (or of ``exc`` when it is text), cut at ``limit`` characters."""
    return (str(exc).strip().splitlines() or [""])[0][:limit]
