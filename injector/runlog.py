"""The host's record of a switch: ``/var/log/dboot.log``.

A terminal that went away takes the screen with it: this file still says what the run did,
what it undid, and whether it got past the point of no return. One line per step, notice,
engine note and undo action, appended and flushed as they happen. Rehearsals leave no
trace on the host and write none.

``DBOOT_LOG_FILE`` (or ``SwitchOptions.log_file``) points it elsewhere, for tests and for
hosts whose /var/log is read-only; an empty value turns it off. A log that cannot be
opened is said once and never stops a run.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import TextIO

from injector.events import (
    Event,
    Finished,
    Injection,
    Log,
    Notice,
    Progress,
    StepDone,
    StepFailed,
    StepStarted,
)

DEFAULT_LOG_FILE = Path("/var/log/dboot.log")
LOG_FILE_ENV = "DBOOT_LOG_FILE"


def default_log_file() -> Path | None:
    configured = os.environ.get(LOG_FILE_ENV)
    if configured is None:
        return DEFAULT_LOG_FILE
    return Path(configured) if configured else None


def describe(event: Event) -> str | None:
    """The log line for an event, or None for those too many or too bulky to log."""
    if isinstance(event, StepStarted):
        return f"{event.step}: {event.title}"
    if isinstance(event, StepDone):
        return f"{event.step}: done{': ' + event.detail if event.detail else ''}"
    if isinstance(event, StepFailed):
        return f"{event.step}: failed: {event.error}"
    if isinstance(event, Progress) and event.done >= event.total:
        return f"{event.step}: {event.done} of {event.total} bytes"
    if isinstance(event, Notice):
        return f"{event.level} {event.code}: {event.message}"
    if isinstance(event, Log):
        return f"  {event.text}"
    if isinstance(event, Injection):
        return (
            f"inject: PID {event.pid} was in {event.interrupted_syscall}(); "
            f"{event.outcome} in {event.elapsed_ms:.1f} ms"
        )
    if isinstance(event, Finished):
        return f"finished: {event.outcome}{': ' + event.detail if event.detail else ''}"
    return None


class RunLog:
    """Appends timestamped lines to the log file; see the module docstring."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.problem = ""  # why the file could not be written, once known
        self._file: TextIO | None = None

    def write(self, text: str) -> None:
        if self.path is None or self.problem:
            return
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                self._file = os.fdopen(fd, "a", encoding="utf-8", errors="replace")
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self._file.write(f"{stamp} dboot[{os.getpid()}]: {text}\n")
            self._file.flush()
        except OSError as error:
            self.problem = f"cannot write {self.path}: {error.strerror}"
            self.close()

    def event(self, event: Event) -> None:
        line = describe(event)
        if line is not None:
            self.write(line)

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
