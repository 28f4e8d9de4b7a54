"""The frame every step shares: where you are (StepIndicator) and how to move (NavBar)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.content import Content
from textual.widget import Widget
from textual.widgets import Button, Checkbox, Input, Label, RadioButton, RadioSet


class StepIndicator(Widget):
    """'1 Images › 2 Init › …' with the current step highlighted and the done ones dimmed.

    Every title when they fit the width. When they do not (a narrow terminal, or the eight
    steps of a wizard that may install at 80 columns), the steps farthest from the current
    one are shown by number only, the earlier first: the current step's title is never cut,
    and its neighbours keep theirs as long as they can."""

    def __init__(self, titles: Sequence[str], current: str) -> None:
        super().__init__(id="step-indicator")
        self.titles = tuple(titles)
        self.current = self.titles.index(current)

    def render(self) -> Text:
        named = set(range(len(self.titles)))
        farthest_first = sorted(named, key=lambda number: (-abs(number - self.current), number))
        line = self.line(named)
        for number in farthest_first:
            if line.cell_len <= self.size.width or number == self.current:
                break
            named.discard(number)
            line = self.line(named)
        return line

    def line(self, named: set[int]) -> Text:
        text = Text(" ")
        for number, title in enumerate(self.titles):
            if number:
                text.append(" › ", style="dim")
            label = f"{number + 1} {title}"
            if number == self.current:
                text.append(f" {label} ", style="bold reverse")
                continue
            if number not in named:
                label = str(number + 1)
            text.append(label, style="green" if number < self.current else "dim")
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


def _plain_mark(button: Checkbox | RadioButton, mark: str) -> None:
    # The stock mark is the same glyph on or off, only its colour changes: a text capture, a
    # monochrome terminal or a screen reader could not tell. Off is blank here.
    button.BUTTON_INNER = mark if button.value else " "


# Space toggles an option; Enter is the step's own key ("Enter: confirm"), never a toggle that
# would change the run instead of going on with it.
TOGGLE = Binding("space", "toggle_button", "Toggle", show=False)


class Tick(Checkbox, inherit_bindings=False):
    """A checkbox whose mark is X when ticked and blank when not, in plain text too; Space
    toggles it, Enter goes to the step."""

    BINDINGS: ClassVar[list[BindingType]] = [TOGGLE]

    def render(self) -> Content:
        _plain_mark(self, "X")
        return super().render()


class Choice(RadioButton):
    """A radio button whose mark is ● when pressed and blank when not, in plain text too."""

    def render(self) -> Content:
        _plain_mark(self, "●")
        return super().render()


class ChoiceSet(RadioSet, inherit_bindings=False):
    """A radio set whose arrows move and Space presses; Enter goes to the step."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("down,right", "next_button", "Next option", show=False),
        TOGGLE,
        Binding("up,left", "previous_button", "Previous option", show=False),
    ]
