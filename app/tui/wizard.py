"""The wizard's shared state and its step vocabulary (no Textual widgets here)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from app.tui.backend import Backend

if TYPE_CHECKING:
    from injector.events import Notice
    from injector.image.sources import ImageDetails
    from injector.preflight.preflight import Report

# The titles shown in the step indicator, in order. Confirm is a modal over Processes.
STEP_TITLES = ("Images", "Init", "Resources", "Processes", "Confirm", "Run")


class Outcome(enum.Enum):
    """What a step screen tells the wizard loop when the user leaves it."""

    NEXT = "next"
    BACK = "back"
    REHEARSE = "rehearse"
    SWITCH = "switch"


@dataclasses.dataclass
class Choices:
    """What the user picked so far; each step reads upstream choices and writes its own."""

    image: str | None = None
    details: ImageDetails | None = None
    init_argv: list[str] = dataclasses.field(default_factory=list)
    report: Report | None = None
    # Blockers for the run the user can still choose: rehearsal blockers in rehearse-only
    # mode, all of them otherwise (the Confirm modal then offers Rehearse only).
    rehearsal_blockers: list[Notice] = dataclasses.field(default_factory=list)
    switch_blockers: list[Notice] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Wizard:
    """Everything a step screen needs: the engine, the choices, the mode and the clock."""

    backend: Backend
    rehearse_only: bool
    rehearse_only_reason: str
    clock: Callable[[], datetime]
    choices: Choices = dataclasses.field(default_factory=Choices)
