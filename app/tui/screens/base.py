"""The common frame of a step: header, step indicator, body, nav bar, footer.

A step never pops itself: it resolves ``outcome`` and the wizard loop in ``app.py`` decides
what to show next. Going back keeps the earlier screens (and their cursor, their typed
text) alive on the screen stack; going forward always builds the next step afresh, because
it depends on what was chosen here.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Static

from app.tui.widgets.chrome import NavBar, StepIndicator
from app.tui.wizard import STEP_TITLES, Outcome, Wizard
from injector.errors import BadInput


class StepScreen(Screen[None]):
    """One step of the wizard. Subclasses compose ``body`` and call ``block``/``unblock``."""

    # Its index in ``STEP_TITLES``.
    STEP: ClassVar[int] = 0
    NEXT_LABEL: ClassVar[str] = "Next ▸"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,b", "back", "Back"),
        Binding("n", "next", "Next"),
        # Focused widgets see Enter first (Input submits, DataTable selects, Button presses).
        Binding("enter", "next", "Next", show=False),
        Binding("q", "app.quit", "Quit"),
    ]

    def __init__(self, wizard: Wizard) -> None:
        super().__init__()
        self.wizard = wizard
        self.blocked_reason: str | None = "working…"
        self._outcome: asyncio.Future[Outcome] | None = None

    # --- the contract with the wizard loop ---------------------------------------------
    def wait_outcome(self) -> asyncio.Future[Outcome]:
        """A fresh future for this visit of the step (a step can be revisited with Back)."""
        self._outcome = asyncio.get_running_loop().create_future()
        return self._outcome

    def leave(self, outcome: Outcome) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(outcome)

    # --- layout ---------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        yield StepIndicator(self.wizard.step_titles, STEP_TITLES[self.STEP])
        with Vertical(id="body"):
            yield from self.body()
        yield NavBar(back=self.STEP > 0, next_label=self.NEXT_LABEL)
        yield Footer()

    def body(self) -> ComposeResult:
        raise NotImplementedError

    def on_mount(self) -> None:
        self.title = "docker-boot"
        if self.wizard.rehearse_only:
            self.sub_title = "REHEARSAL ONLY"
        elif self.wizard.asks_destination:
            self.sub_title = "switch, install or rehearse"
        else:
            self.sub_title = "switch or rehearse"

    # --- Next enabled or not, and why -----------------------------------------------------
    def block(self, reason: str) -> None:
        self.blocked_reason = reason
        self.query_one(NavBar).show(reason, blocked=True)
        self.refresh_bindings()

    def refused(self, refused: BadInput, error: Static, command: Static, first: str) -> None:
        """A value the engine refused: its one line in ``error``, no command line in
        ``command`` until ``first`` is done, and Next off with the cause."""
        error.update(Text(f"✗ {refused}", style="bold red"))
        error.display = True
        command.update(Text(f"({first} first)", style="dim"))
        self.block(f"✗ {refused.cause}")

    def unblock(self, hint: str = "") -> None:
        self.blocked_reason = None
        self.query_one(NavBar).show(hint, blocked=False)
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # None shows the key dimmed in the footer: visible, but not available right now.
        if action == "next" and self.blocked_reason is not None:
            return None
        # There is no step before the first one.
        return not (action == "back" and self.STEP == 0)

    # --- moving ---------------------------------------------------------------------------
    def commit(self) -> bool:
        """Write this step's choice into ``wizard.choices``; False keeps the user here."""
        return True

    def action_next(self) -> None:
        if self.blocked_reason is None and self.commit():
            self.leave(Outcome.NEXT)

    def action_back(self) -> None:
        if self.STEP > 0:
            self.leave(Outcome.BACK)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "nav-next":
            event.stop()
            self.action_next()
        elif event.button.id == "nav-back":
            event.stop()
            self.action_back()
