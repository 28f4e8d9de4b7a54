"""Typed events: the one stream that both front-ends render.

``injector.switch`` yields these; the CLI prints them as lines, progress bars or JSON, the
TUI turns them into widgets. Each event is a frozen dataclass whose fields are plain JSON
values, so ``to_json`` is lossless and the wizard can show exactly what ``--json`` prints.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Union

Level = Literal["info", "warning", "blocker"]
Scope = Literal["host", "any"]


@dataclasses.dataclass(frozen=True)
class StepStarted:
    step: str
    title: str


@dataclasses.dataclass(frozen=True)
class StepDone:
    step: str
    detail: str = ""


@dataclasses.dataclass(frozen=True)
class StepFailed:
    step: str
    error: str


@dataclasses.dataclass(frozen=True)
class Progress:
    """Bytes (or items) done out of an expected total, for a progress bar with an ETA."""

    step: str
    done: int
    total: int


@dataclasses.dataclass(frozen=True)
class Fact:
    """Something learnt along the way: a key in a section and a JSON value."""

    section: str
    key: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Notice:
    """A warning or a blocker, with what to do about it.

    ``scope`` "host": it speaks of this machine's own userspace (its swap, processes,
    session, container, PID 1), so it stops a real switch but is only a fact to learn from
    in a rehearsal, whose target is a sandbox."""

    level: Level
    code: str
    message: str
    fix: str = ""
    scope: Scope = "any"


@dataclasses.dataclass(frozen=True)
class Log:
    """One line of detail for the log pane (never shown on a non-verbose CLI)."""

    text: str


@dataclasses.dataclass(frozen=True)
class Injection:
    """What the injector did to the target, for the wizard's teaching panel."""

    pid: int
    arch: str
    interrupted_syscall: str
    registers_before: dict[str, int]
    registers_after: dict[str, int]
    elapsed_ms: float
    # What execve actually replaced (e.g. restart_syscall after an interrupted nanosleep).
    replaced_syscall: str = ""
    outcome: Literal["executed", "rolled-back"] = "executed"


@dataclasses.dataclass(frozen=True)
class Console:
    """Output of the sandboxed system (rehearsal), relayed line by line."""

    text: str


@dataclasses.dataclass(frozen=True)
class ConsoleAttached:
    """A rehearsal whose console is a pty (the wizard's): ``fd`` is a descriptor of this
    process for the pty's master end. The front-end that asked for it now owns it: it
    reads the sandbox's output there, writes the keys typed, sets the size and closes it."""

    fd: int


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event. ``exit_status`` is the sandboxed init's status in a rehearsal."""

    outcome: Literal["dry-run", "rehearsed", "switched", "injected", "installed", "reverted"]
    exit_status: int | None = None
    detail: str = ""


# Union[...], not `|`: this alias is evaluated at run time, and Python 3.9 has no `type | type`.
Event = Union[
    StepStarted,
    StepDone,
    StepFailed,
    Progress,
    Fact,
    Notice,
    Log,
    Injection,
    Console,
    ConsoleAttached,
    Finished,
]


def event_name(event: Event) -> str:
    """``StepStarted`` -> ``step_started``: the ``event`` key of the JSON form."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(event).__name__).lower()


def to_json(event: Event) -> dict[str, Any]:
    return {"event": event_name(event), **dataclasses.asdict(event)}
