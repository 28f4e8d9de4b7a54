"""The confirmation: the modal that says plainly what cannot be undone, and gives the same
run as a `dboot` command line, ready to copy: one wizard run can be replayed from a script.
Where the Destination step chose an install, the real run on offer is that install (`dboot
install`).

For a real switch the hostname field has the focus: what the user types lands there, Switch
stays off until it matches exactly, and Enter in it either switches or says what is wrong;
Ctrl-R rehearses without typing. Otherwise (rehearse-only, or blockers) only a rehearsal is on
offer, which touches nothing on this machine: Rehearse has the focus, and Enter rehearses, as
the Options step's "Enter: confirm" promised. Escape cancels in every case.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from app.format import number_arg
from app.tui.backend import InstallChoices
from app.tui.screens.options import COPY_KEY, copy_command
from app.tui.widgets.chrome import Field
from app.tui.wizard import Outcome, Wizard
from initstage.plan import KEEP_FILE

logger = logging.getLogger(__name__)

REHEARSE_KEY = "ctrl+r"


def consequences(wizard: Wizard) -> Text:
    if wizard.install_chosen is not None:
        return install_consequences(wizard, wizard.install_chosen)
    choices = wizard.choices
    init = " ".join(choices.init_argv)
    target = wizard.backend.switch_target()
    text = Text()
    text.append("A real switch cannot be undone. ", style="bold red")
    if target is None:
        host = wizard.backend.hostname()
        text.append(
            f"Every process on {host} is killed, its userspace is replaced by "
            f"{choices.image} held in RAM, and `{init}` becomes PID 1. "
            "Unsaved work is lost; only a reboot brings the old system back.\n\n"
        )
    else:
        text.append(
            f"Every process in the namespace of pid {target} is killed, its userspace is "
            f"replaced by {choices.image} held in RAM, and `{init}` becomes its PID 1 "
            "(--target-pid: this machine's own PID 1 is not touched).\n\n"
        )
    text.append("A rehearsal ", style="bold green")
    text.append(
        "does exactly the same inside a sandbox (new PID, mount, UTS, IPC and network "
        "namespaces) and shows you its console. This machine is not touched."
    )
    return text


def install_consequences(wizard: Wizard, install: InstallChoices) -> Text:
    choices = wizard.choices
    facts = choices.install_facts
    init_path = facts.chain.init_path if facts is not None else "the kernel's init path"
    root = facts.chain.root if facts is not None else None
    where = f" on {root.device}" if root is not None else ""
    text = Text()
    text.append("An install changes what this machine boots. ", style="bold red")
    text.append(
        f"{choices.image} is copied beside the old system{where}, then {init_path} is"
        " repointed at the boot shim: from the next boot on, the machine starts the image's"
        f" `{' '.join(choices.init_argv)}`. Only a revert undoes that; the old system stays"
        " whole on the disk as the way back (`dboot install --revert`). "
    )
    if install.no_revert:
        text.append("No revert timer: the first boot is kept at once. ")
    else:
        minutes = install.revert_after or wizard.install_revert_default() or 0
        text.append(
            f"Without {KEEP_FILE} within {number_arg(minutes)} min of the first boot, the old"
            " system comes back by itself. "
        )
    text.append(
        "This machine reboots when it is done.\n\n"
        if install.reboot
        else "Reboot it yourself when it is done.\n\n"
    )
    text.append("A rehearsal ", style="bold green")
    text.append("runs the image from RAM in a sandbox: does its init start? Nothing is written.")
    return text


class ConfirmScreen(ModalScreen[Outcome]):
    # The first match in screen order: the hostname field when a real switch is on offer
    # (it comes before the buttons), else Rehearse.
    AUTO_FOCUS = "#confirm-hostname, #confirm-rehearse"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "cancel", "Cancel"),
        Binding(COPY_KEY, "copy_command", "Copy command line"),
        # Priority: it works while the hostname field has the focus (r is typed there).
        Binding(REHEARSE_KEY, "rehearse", "Rehearse", priority=True),
        Binding("r", "rehearse", "Rehearse"),
    ]

    def __init__(self, wizard: Wizard) -> None:
        super().__init__()
        self.wizard = wizard
        self.hostname = wizard.backend.hostname()
        # The Destination step's install, where it chose one: the real run on offer.
        self.install = wizard.install_chosen
        self.verb = "install" if self.install is not None else "switch"
        self.refusal = self.switch_refusal()
        # The Options (and Destination) step checked these options: the engine accepted them.
        self.command_line = wizard.command_line(install=self.install)
        logger.info("equivalent command line: %s", self.command_line)

    def switch_refusal(self) -> str | None:
        """Why the real switch is not offered, or None when typing the hostname enables it."""
        if self.wizard.rehearse_only:
            return f"Switch is off: {self.wizard.rehearse_only_reason}."
        blockers = self.wizard.choices.switch_blockers
        if self.install is not None:
            facts = self.wizard.choices.install_facts
            found = facts.notices if facts is not None else []
            blockers = [n for n in found if n.level == "blocker"]
            if facts is None:
                return "Install is off: this machine's boot chain was not read."
        if blockers:
            return f"{self.verb.capitalize()} is off: " + "; ".join(n.message for n in blockers)
        return None

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(f"[b]Rehearse or {self.verb}?[/b]", id="confirm-title")
            # Scrolls rather than pushing the hostname field and the buttons off an 80x24
            # screen when the command line is long (many options, a long archive path).
            with VerticalScroll(id="confirm-scroll", can_focus=False):
                yield Static(consequences(self.wizard), id="confirm-text")
                yield Static(self.command_text(), id="confirm-command")
            if self.refusal is None:
                yield Label(
                    f"To {self.verb} for real, type the hostname [b]{self.hostname}[/b] and"
                    " press Enter:"
                )
                # No placeholder: a dimmed hostname in the field would read as already typed.
                yield Field(id="confirm-hostname", compact=True)
                yield Static(self.hint(""), id="confirm-status")
            else:
                yield Label(Text(self.refusal, style="yellow"), id="confirm-refusal")
                yield Static(
                    Text("Enter rehearses; Escape cancels.", style="dim"), id="confirm-status"
                )
            with Horizontal(id="confirm-buttons"):
                yield Button("Cancel", id="confirm-cancel", compact=True)
                yield Button("Rehearse", id="confirm-rehearse", variant="success", compact=True)
                yield Button(
                    self.verb.capitalize(),
                    id="confirm-switch",
                    variant="error",
                    disabled=True,
                    compact=True,
                )

    def command_text(self) -> Text:
        key = COPY_KEY.replace("ctrl+", "^")
        text = Text(f"The same from a shell ({key} copies it):\n", style="dim")
        text.append(self.command_line, style="bold")
        return text

    def action_copy_command(self) -> None:
        copy_command(self, self.command_line)

    # --- the typed hostname --------------------------------------------------------------
    def typed(self) -> str:
        return self.query_one("#confirm-hostname", Input).value

    def switch_allowed(self) -> bool:
        return self.refusal is None and self.typed() == self.hostname

    def hint(self, value: str) -> Text:
        """What Enter would do now, before the user presses it."""
        if value == self.hostname:
            does = "installs" if self.install is not None else "switches"
            return Text(f"✓ {self.hostname}: Enter {does} for real.", style="bold green")
        key = REHEARSE_KEY.replace("ctrl+", "^").upper()
        return Text(f"{key} rehearses, with no typing; Escape cancels.", style="dim")

    def mismatch(self, value: str) -> Text:
        """Why Enter did not switch, in one line."""
        if not value:
            why = f"Nothing typed: type {self.hostname} to {self.verb}"
        elif value.strip() == self.hostname:
            why = f"{value!r} has spaces around it: type just {self.hostname}"
        elif value.lower() == self.hostname.lower():
            why = f"{value!r} differs in case: type {self.hostname} exactly"
        else:
            why = f"{value!r} is not {self.hostname}: type {self.hostname} exactly"
        return Text(f"✗ {why}, or Escape to cancel.", style="bold red")

    @on(Input.Changed, "#confirm-hostname")
    def hostname_changed(self, event: Input.Changed) -> None:
        self.query_one("#confirm-switch", Button).disabled = not self.switch_allowed()
        self.query_one("#confirm-status", Static).update(self.hint(event.value))

    @on(Input.Submitted, "#confirm-hostname")
    def hostname_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if self.switch_allowed():
            self.dismiss(self.real_outcome())
        else:
            self.query_one("#confirm-status", Static).update(self.mismatch(event.value))

    # --- buttons and Escape ----------------------------------------------------------------
    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "confirm-rehearse":
            self.dismiss(Outcome.REHEARSE)
        elif event.button.id == "confirm-switch" and self.switch_allowed():
            self.dismiss(self.real_outcome())
        else:
            self.dismiss(Outcome.BACK)

    def real_outcome(self) -> Outcome:
        return Outcome.INSTALL if self.install is not None else Outcome.SWITCH

    def action_cancel(self) -> None:
        self.dismiss(Outcome.BACK)

    def action_rehearse(self) -> None:
        self.dismiss(Outcome.REHEARSE)
