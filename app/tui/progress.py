"""Progress for the wizard: a few updates a second, and words with a rate and an ETA."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from app.format import human_bytes, human_seconds
from injector.events import Progress

# Progress can come for every MiB read or copied; the screen needs a few per second.
PROGRESS_INTERVAL_S = 0.1


class ProgressThrottle:
    """Lets an update through at most every ``interval`` seconds, and always the last one."""

    def __init__(self, interval: float = PROGRESS_INTERVAL_S) -> None:
        self.interval = interval
        self._last = 0.0

    def due(self, event: Progress) -> bool:
        now = time.monotonic()
        if event.done >= event.total or now - self._last >= self.interval:
            self._last = now
            return True
        return False


class EtaClock:
    """Bytes per second since the first Progress of a step, from the wizard's clock."""

    def __init__(self, clock: Callable[[], datetime]) -> None:
        self.clock = clock
        self.start: tuple[str, datetime, int] | None = None

    def describe(self, event: Progress) -> str:
        now = self.clock()
        if self.start is None or self.start[0] != event.step:
            self.start = (event.step, now, event.done)
        _, since, done_then = self.start
        amount = f"{human_bytes(event.done)} of {human_bytes(event.total)}"
        elapsed = (now - since).total_seconds()
        rate = (event.done - done_then) / elapsed if elapsed > 0 else 0.0
        if event.done >= event.total:
            return f"{amount} · done"
        if rate <= 0:
            return f"{amount} · ETA …"
        remaining = human_seconds((event.total - event.done) / rate)
        return f"{amount} · {human_bytes(int(rate))}/s · ETA {remaining}"
