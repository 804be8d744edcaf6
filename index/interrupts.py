"""Ctrl-C held back for a short step that must not be cut in the middle (a few renames, a mark removed, an exclusion
and its log entry): the step finishes, then the interrupt is taken up."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class HeldInterrupt:
    """What :func:`held_interrupt` saw: ``came`` is True once a Ctrl-C came during its block."""

    came: bool = False


@contextlib.contextmanager
def held_interrupt(note: str | None = None, *, reraise: bool = True) -> Iterator[HeldInterrupt]:
    """Hold Ctrl-C (SIGINT) back for the block: a first one is noted (``note`` logged as a warning, "interrupted:
    NOTE (Ctrl-C again to stop now)") and the block goes on; a second one raises KeyboardInterrupt at once. When the
    block ends, a Ctrl-C it held is raised as KeyboardInterrupt (``reraise``), or only recorded in the yielded
    :class:`HeldInterrupt` for the caller to say. Outside the main thread (a server's worker), or while SIGINT has a
    handler other than Python's (a server's, an outer :func:`held_interrupt`), the block runs as it is."""
    held = HeldInterrupt()
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield held
        return

    def hold(signum: int, frame: object) -> None:
        if held.came:  # a second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        held.came = True
        if note:
            logger.warning("interrupted: %s (Ctrl-C again to stop now)", note)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)
    if held.came and reraise:
        raise KeyboardInterrupt
