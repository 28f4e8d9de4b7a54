"""Step 5: the modal that says plainly what cannot be undone. Cancel has the focus first."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from app.tui.widgets.chrome import Field
from app.tui.wizard import Outcome, Wizard


def consequences(wizard: Wizard) -> Text:
    choices = wizard.choices
    host = wizard.backend.hostname()
    text = Text()
    text.append("A real switch cannot be undone. ", style="bold red")
    text.append(
        f"Every process on {host} is killed, its userspace is replaced by "
        f"{choices.image} held in RAM, and `{' '.join(choices.init_argv)}` becomes PID 1. "
        "Unsaved work is lost; only a reboot brings the old system back.\n\n"
    )
    text.append("A rehearsal ", style="bold green")
    text.append(
        "does exactly the same inside a sandbox (new PID, mount, UTS, IPC and network "
        "namespaces) and shows you its console. This machine is not touched."
    )
    return text


class ConfirmScreen(ModalScreen[Outcome]):
    AUTO_FOCUS = "#confirm-cancel"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, wizard: Wizard) -> None:
        super().__init__()
        self.wizard = wizard
        self.hostname = wizard.backend.hostname()

    def switch_refusal(self) -> str | None:
        """Why the real switch is not offered, or None when typing the hostname enables it."""
        if self.wizard.rehearse_only:
            return f"Switch is off: {self.wizard.rehearse_only_reason}."
        blockers = self.wizard.choices.switch_blockers
        if blockers:
            return "Switch is off: " + "; ".join(n.message for n in blockers)
        return None

    def compose(self) -> ComposeResult:
        refusal = self.switch_refusal()
        with Vertical(id="confirm"):
            yield Label("[b]Rehearse or switch?[/b]", id="confirm-title")
            yield Static(consequences(self.wizard), id="confirm-text")
            if refusal is None:
                yield Label(f"To switch for real, type the hostname [b]{self.hostname}[/b]:")
                yield Field(placeholder=self.hostname, id="confirm-hostname")
            else:
                yield Label(Text(refusal, style="yellow"), id="confirm-refusal")
            with Horizontal(id="confirm-buttons"):
                yield Button("Cancel", id="confirm-cancel")
                yield Button("Rehearse", id="confirm-rehearse", variant="success")
                yield Button("Switch", id="confirm-switch", variant="error", disabled=True)

    def switch_allowed(self) -> bool:
        if self.switch_refusal() is not None:
            return False
        return self.query_one("#confirm-hostname", Input).value.strip() == self.hostname

    @on(Input.Changed, "#confirm-hostname")
    def typed(self, event: Input.Changed) -> None:
        self.query_one("#confirm-switch", Button).disabled = event.value.strip() != self.hostname

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "confirm-rehearse":
            self.dismiss(Outcome.REHEARSE)
        elif event.button.id == "confirm-switch" and self.switch_allowed():
            self.dismiss(Outcome.SWITCH)
        else:
            self.dismiss(Outcome.BACK)

    def action_cancel(self) -> None:
        self.dismiss(Outcome.BACK)
