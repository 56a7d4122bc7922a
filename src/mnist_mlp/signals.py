"""Ctrl-C and SIGTERM during training: stop between batches, never mid-save.

The handler only records the request; the TrainingState callback acts on it
at the next batch or epoch end, after saving the state there. A save in
progress therefore always completes, and a resumed run continues from the
batch where it stopped. A second Ctrl-C stops at once.
"""

from __future__ import annotations

import contextlib
import signal


class StopRequested(KeyboardInterrupt):
    """Training was asked to stop by a signal; `signum` says which."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_requested: int | None = None


def _handler(signum, frame):
    global _requested
    if _requested is not None:
        raise StopRequested(signum)
    _requested = signum


def requested() -> bool:
    """A stop was asked for since `handled()` began."""
    return _requested is not None


def check() -> None:
    """Raise StopRequested if a stop was asked for since `handled()` began."""
    if _requested is not None:
        raise StopRequested(_requested)


@contextlib.contextmanager
def handled():
    """Within this block, SIGINT and SIGTERM request a stop instead of killing."""
    global _requested
    _requested = None
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
