"""The frame every step shares: where you are (StepIndicator) and how to move (NavBar)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Button, Input, Label, Static

from app.tui.wizard import STEP_TITLES


class StepIndicator(Static):
    """'1 Images › 2 Init › …' with the current step highlighted and the done ones dimmed."""

    def __init__(self, current: int) -> None:
        super().__init__(self._text(current), id="step-indicator")

    @staticmethod
    def _text(current: int) -> Text:
        text = Text(" ")
        for number, title in enumerate(STEP_TITLES):
            if number:
                text.append(" › ", style="dim")
            label = f"{number + 1} {title}"
            if number == current:
                text.append(f" {label} ", style="bold reverse")
            elif number < current:
                text.append(label, style="green")
            else:
                text.append(label, style="dim")
        return text


class NavBar(Horizontal):
    """One line: why Next is disabled (or a hint), then Back and Next for the mouse."""

    def __init__(self, *, back: bool = True, next_label: str = "Next ▸") -> None:
        super().__init__(id="nav")
        self._show_back = back
        self._next_label = next_label

    def compose(self) -> ComposeResult:
        yield Label("", id="nav-reason")
        if self._show_back:
            yield Button("◂ Back", id="nav-back", compact=True)
        yield Button(self._next_label, id="nav-next", variant="primary", compact=True)

    def show(self, message: str, *, blocked: bool) -> None:
        """A blocker reason (Next disabled) or a plain hint (Next enabled)."""
        reason = self.query_one("#nav-reason", Label)
        reason.update(Text(message, style="bold red" if blocked else "dim"))
        self.query_one("#nav-next", Button).disabled = blocked


class Field(Input):
    """An Input whose cursor blinks unless the app says not to (snapshots must be stable)."""

    def on_mount(self) -> None:
        self.cursor_blink = bool(getattr(self.app, "blink", True))
