"""The wizard's shared state and its step vocabulary (no Textual widgets here)."""

from __future__ import annotations

import dataclasses
import enum
import shlex
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from app.format import command_line
from app.tui.backend import Backend, InstallChoices, RunOptions, RunRequest, install_options

if TYPE_CHECKING:
    from injector.events import Notice
    from injector.image.sources import ImageDetails
    from injector.install.install import InstallFacts
    from injector.preflight.preflight import Report
    from injector.teach import PauseHook

# The titles shown in the step indicator, in order; a screen's STEP is its index here.
# Confirm is a modal over the step before it. Destination is asked only where an install is
# possible (``Wizard.asks_destination``); elsewhere the indicator leaves it out.
STEP_TITLES = (
    "Images",
    "Init",
    "Resources",
    "Processes",
    "Options",
    "Destination",
    "Confirm",
    "Run",
)
DESTINATION = "Destination"


class Outcome(enum.Enum):
    """What a step screen tells the wizard loop when the user leaves it."""

    NEXT = "next"
    BACK = "back"
    REHEARSE = "rehearse"
    SWITCH = "switch"
    INSTALL = "install"


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
    # The Options step's choices (grace period, tmpfs size...), the engine's defaults at first.
    options: RunOptions = dataclasses.field(default_factory=RunOptions)
    # The Destination step's: None runs from RAM (a switch), else the install's choices.
    install: InstallChoices | None = None
    # What the engine found for an install here (boot chain, space, verdicts); None: not read.
    install_facts: InstallFacts | None = None


@dataclasses.dataclass
class Wizard:
    """Everything a step screen needs: the engine, the choices, the mode and the clock."""

    backend: Backend
    rehearse_only: bool
    rehearse_only_reason: str
    clock: Callable[[], datetime]
    choices: Choices = dataclasses.field(default_factory=Choices)
    # Teaching rehearsals pause before each step (dboot-tui --teach; F7 on the Run screen).
    teach: bool = False
    # How this front-end answers a teaching pause (the app's UiPauser); None: it cannot.
    pauser: PauseHook | None = None

    @property
    def asks_destination(self) -> bool:
        """Is there a Destination step: may this wizard install on this machine's disk? Not
        when it only rehearses (lab mode, --rehearse), nor under --target-pid, whose real
        switch is a namespace's: the machine's disk is not the namespace's to rewrite."""
        return not self.rehearse_only and self.backend.switch_target() is None

    @property
    def step_titles(self) -> tuple[str, ...]:
        """The steps this wizard walks, as the indicator shows them."""
        if self.asks_destination:
            return STEP_TITLES
        return tuple(title for title in STEP_TITLES if title != DESTINATION)

    @property
    def install_chosen(self) -> InstallChoices | None:
        """The install the Destination step chose, where there is one to choose."""
        return self.choices.install if self.asks_destination else None

    @property
    def switch_offered(self) -> bool:
        """Can the Confirm modal offer a real switch (no lab mode, no blocker)?"""
        return not self.rehearse_only and not self.choices.switch_blockers

    def default_revert(self) -> float | None:
        """The revert timer (minutes) the engine would set by itself for the real switch on
        offer: a remote session's, when this machine's PID 1 is the target. None: none."""
        report = self.choices.report
        if report is None or not self.switch_offered:
            return None
        engine = self.backend.switch_options(self.request(rehearse=False, options=RunOptions()))
        return engine.revert_minutes(report.session.remote)

    def install_revert_default(self) -> float | None:
        """The first boot's probation (minutes) the engine gives an install by itself."""
        engine = install_options(self.request(rehearse=False), InstallChoices())
        return engine.install_revert_minutes()

    def request(
        self,
        *,
        rehearse: bool,
        options: RunOptions | None = None,
        install: InstallChoices | None = None,
    ) -> RunRequest:
        """The run the choices so far describe (with ``options`` instead of the chosen ones);
        ``install``: the image onto this machine's disk, for a real run only."""
        choices = self.choices
        assert choices.image is not None, "the Images step chose an image"
        return RunRequest(
            image=choices.image,
            init_argv=list(choices.init_argv),
            rehearse=rehearse,
            options=options or choices.options,
            pause=self.pause_hook(rehearse=rehearse),
            install=None if rehearse else install,
        )

    def pause_hook(self, *, rehearse: bool) -> PauseHook | None:
        """What a run pauses on to teach: the front-end's hook, for a rehearsal while teaching
        is on (a real switch never pauses). The command line says --teach from it."""
        return self.pauser if rehearse and self.teach else None

    def command_line(
        self, options: RunOptions | None = None, install: InstallChoices | None = None
    ) -> str:
        """The `dboot` command that does what this wizard run would: the install when
        ``install`` is given, else the switch when one is on offer, else the rehearsal.
        ``BadInput`` (the engine's) for an option it refuses."""
        if install is not None:
            request = self.request(rehearse=False, options=options, install=install)
        else:
            request = self.request(rehearse=not self.switch_offered, options=options)
        return shlex.join(command_line(self.backend.switch_options(request)))
