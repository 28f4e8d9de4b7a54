"""The error hierarchy, one class per exit code of the CLI contract.

Every error carries one line that names the cause and, where there is one, the fix.
Front-ends print ``str(error)`` and exit with ``error.exit_code``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator


class DbootError(Exception):
    """Base class. Its message is a single line a user can act on."""

    exit_code: int = 1

    def __init__(self, cause: str, fix: str | None = None) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}: {fix}" if fix else cause)


class BadInput(DbootError):
    """Bad usage or bad input: unknown image, corrupt archive, non-absolute init... (exit 1)."""

    exit_code = 1


class EnvironmentFailure(DbootError):
    """The environment cannot do it: not root, no engine, ptrace denied... (exit 2)."""

    exit_code = 2


class SafetyRefusal(DbootError):
    """A safety check refused: lab mode, a preflight blocker, an unconfirmed switch (exit 3)."""

    exit_code = 3


@contextlib.contextmanager
def system_call_failure(cause: str, fix: str) -> Iterator[None]:
    """An OSError of the system call inside becomes ``EnvironmentFailure("cause: strerror",
    fix)``: the one line that names what the kernel refused."""
    try:
        yield
    except OSError as error:
        raise EnvironmentFailure(f"{cause}: {os.strerror(error.errno or 0)}", fix) from None


def add_note(error: BaseException, note: str) -> None:
    """``error.add_note(note)`` on Python 3.9 and 3.10 too: the same ``__notes__`` list, which
    Python 3.11's tracebacks print and the CLI's -v prints on every version."""
    notes = getattr(error, "__notes__", None)
    if not isinstance(notes, list):
        notes = []
        error.__notes__ = notes  # type: ignore[attr-defined]  # BaseException's own from 3.11
    notes.append(note)


def traceback_text(error: BaseException) -> str:
    """The traceback Python would print for ``error``, its notes included on every version."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if sys.version_info < (3, 11):  # from 3.11 on, format_exception prints the notes itself
        text += "".join(f"{note}\n" for note in getattr(error, "__notes__", []))
    return text
