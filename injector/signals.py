"""Holding back the signals that end us, across the few steps that must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterable, Iterator

# Ctrl-C, the SIGTERM that cancels a namespace worker, a closed terminal, Ctrl-\.
ENDING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})


@contextlib.contextmanager
def signals_deferred(held: Iterable[signal.Signals] = ENDING_SIGNALS) -> Iterator[None]:
    """Block ``held`` in this thread; whatever arrived meanwhile is delivered on exit.

    For a resource that is created and recorded, or removed, as one step (a mount, a
    temporary container), and for the window in which PID 1 holds our registers and bytes.
    SIGKILL cannot be held; nothing here pretends otherwise.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, set(held))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
