"""The signals that end a run: held back across the few steps that must not be cut in half,
and turned into an exception everywhere else, so that the undo runs."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterable, Iterator
from types import FrameType

# Ctrl-C, the SIGTERM that cancels a namespace worker, a closed terminal, Ctrl-\.
ENDING_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT})
# Those whose default action ends the process without running a single clean-up.
_SILENTLY_FATAL = (signal.SIGTERM, signal.SIGHUP)


class EndingSignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a closed terminal) arrived: unwind like Ctrl-C, undoing as we go."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received")
        self.signum = signum


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


def pending_call_off() -> signal.Signals | None:
    """SIGINT, SIGTERM or SIGHUP, if one waits for us (held back by ``signals_deferred``).

    SIGQUIT is left out: its default action ends the process before any undo could run."""
    pending = sorted(signal.sigpending() & {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    return pending[0] if pending else None


@contextlib.contextmanager
def ending_signals_raise() -> Iterator[None]:
    """While inside, SIGTERM and SIGHUP raise :class:`EndingSignal` instead of ending the
    process on the spot, so that ``except``/``finally`` blocks undo what was done.

    The first one raises; later ones are ignored, so that they cannot cut the undo short.
    Python runs signal handlers in the main thread only: elsewhere (the wizard's worker)
    this does nothing and the embedding application owns its signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise EndingSignal(signum)

    previous = {signum: signal.signal(signum, handler) for signum in _SILENTLY_FATAL}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
