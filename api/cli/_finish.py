"""A command's work and output done: a Ctrl-C from then on (its objects torn down as it returns: a model, a
gallery) keeps its exit status instead of a bare 130 (:func:`api.cli.main`)."""

from __future__ import annotations

import sys
from collections.abc import Callable

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


#: What a command says of a Ctrl-C that came once its work was done (``what``: build, add, command), before ``rest``.
FINISHED_WHEN_INTERRUPTED = "speciesid: the {what} had finished when the interrupt came (Ctrl-C): nothing was lost"
#: ``rest`` of a summary printed whole although a Ctrl-C came as it was.
WHOLE_SUMMARY = ", the lines above are its whole summary"


def said_finished(what: str, rest: str = WHOLE_SUMMARY) -> None:
    """Say on stderr that the ``what`` (build, add, command) had finished when a Ctrl-C came, nothing lost, then
    ``rest`` (:data:`WHOLE_SUMMARY`: what was printed is all of it)."""
    sys.stderr.write(FINISHED_WHEN_INTERRUPTED.format(what=what) + rest + "\n")


def held_summary(what: str, summary: Callable[[], int], cut: str = "") -> tuple[int | None, bool]:
    """Print a finished ``what``'s summary (``summary``: prints it, returns the exit status) with a Ctrl-C held until
    it is printed (the work is done: a Ctrl-C does not cut its summary short): (its status, whether a Ctrl-C came
    meanwhile). A second Ctrl-C stops it: said (:func:`said_finished`, its summary cut short, then ``cut``), and
    the status is None (the command exits 130)."""
    from index.interrupts import held_interrupt

    try:
        with held_interrupt(f"the {what} is done; finishing its summary", reraise=False) as held:
            status = summary()
    except KeyboardInterrupt:  # a second Ctrl-C: the user does not want the rest of the summary
        said_finished(what, "; its summary above was cut short" + cut)
        return None, False
    return status, held.came
