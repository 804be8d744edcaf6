"""A command's work and output done: a Ctrl-C from then on (its objects torn down as it returns: a model, a
gallery) keeps its exit status instead of a bare 130 (:func:`api.cli.main`)."""

from __future__ import annotations

_status: list[int] = []  # the status of the command whose work is done (none: not done)


def finished(status: int) -> int:
    """Record that the running command's work and output are done, with exit status ``status``; returns it."""
    _status[:] = [status]
    return status


def finished_status() -> int | None:
    """The status :func:`finished` recorded for the running command, None when it has not."""
    return _status[0] if _status else None


def starting() -> None:
    """A command starts: nothing of it is done."""
    _status.clear()
