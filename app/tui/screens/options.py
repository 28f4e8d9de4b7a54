"""Step 5: the choices a run has besides the image and the init, and the same run as a
`dboot` command line, kept up to date as they change.

Each option shows its default and one line on what it means. The values are the engine's to
judge: every change builds the engine's own options (``Backend.switch_options``), and a
value it refuses blocks Next with the engine's one-line message. Options that only matter
for a real switch say so, and are off in a rehearse-only wizard.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Checkbox, Input, Label, Static

from app.format import human_bytes, number_arg
from app.tui.backend import RunOptions
from app.tui.screens.base import StepScreen
from app.tui.widgets.chrome import Field
from injector.errors import BadInput

logger = logging.getLogger(__name__)

SWITCH_ONLY = "real switch only"
COPY_KEY = "ctrl+y"


def copy_command(screen: Screen[Any], line: str) -> None:
    """Put the command line on the clipboard (OSC 52) and in the wizard's log file."""
    logger.info("equivalent command line: %s", line)
    screen.app.copy_to_clipboard(line)
    screen.notify("Command line copied (OSC 52; it is in the wizard's log file too).")


def read_grace(text: str) -> float:
    """The grace period as typed; the engine judges its range."""
    try:
        return float(text.strip())
    except ValueError:
        raise BadInput(
            f"grace period {text.strip()!r} is not a number", "give seconds, e.g. 5 or 0.5"
        ) from None


class OptionsScreen(StepScreen):
    STEP = 4
    # Nothing has the focus at first: Enter takes the defaults, and n, b and q move as on
    # every step instead of landing in a field. Tab reaches the options.
    AUTO_FOCUS = None
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(COPY_KEY, "copy_command", "Copy command line"),
    ]

    def body(self) -> ComposeResult:
        chosen = self.wizard.choices.options
        switch_only = not self.wizard.rehearse_only
        with VerticalScroll(id="options-body"):
            yield Static(
                Text(
                    "Each option shows its default; changed ones go on the command line.",
                    style="dim",
                ),
                id="options-intro",
            )
            with Horizontal(classes="option"):
                yield Label("Grace period", classes="option-name")
                yield Field(number_arg(chosen.grace), id="opt-grace", compact=True)
                yield Static(
                    f"Default {number_arg(RunOptions.grace)}: seconds from SIGTERM to SIGKILL",
                    classes="option-help",
                )
            with Horizontal(classes="option"):
                yield Label("tmpfs size", classes="option-name")
                yield Field(chosen.tmpfs_size, id="opt-tmpfs", compact=True, placeholder="auto")
                yield Static(self.tmpfs_help(), classes="option-help")
            with Horizontal(classes="option"):
                yield Checkbox("API mounts", chosen.api_mounts, id="opt-api", compact=True)
                yield Static(
                    "Default on: /proc, /sys, /dev, /dev/pts in the new root",
                    classes="option-help",
                )
            with Horizontal(classes="option"):
                yield Checkbox("Kernel modules", chosen.modules, id="opt-modules", compact=True)
                yield Static(
                    "Default on: add this kernel's modules and firmware",
                    classes="option-help",
                )
            with Horizontal(classes="option"):
                yield Checkbox(
                    "Carry-over",
                    chosen.carry,
                    id="opt-carry",
                    compact=True,
                    disabled=not switch_only,
                )
                yield Static(
                    self.switch_only_help("Default on: SSH keys, machine-id, DNS, network files"),
                    classes="option-help",
                )
            yield Static("", id="options-error")
            with Vertical(id="command-box", classes="section"):
                yield Static("", id="options-command")

    def tmpfs_help(self) -> str:
        report = self.wizard.choices.report
        fits = f" ({human_bytes(report.ram.tmpfs_size)} here)" if report is not None else ""
        return f"Default auto: the image plus headroom{fits}"

    def switch_only_help(self, text: str) -> Text:
        help_text = Text(text)
        help_text.append(f"\n({SWITCH_ONLY})", style="italic")
        if self.wizard.rehearse_only:
            help_text.stylize("dim")
        return help_text

    def on_mount(self) -> None:
        super().on_mount()
        rehearse = not self.wizard.switch_offered
        self.query_one("#command-box").border_title = (
            "The same rehearsal from a shell" if rehearse else "The same switch from a shell"
        )
        self.changed()

    # --- reading and checking --------------------------------------------------------------
    def read(self) -> RunOptions:
        """The options as the widgets hold them; ``BadInput`` for a grace that is no number."""
        return RunOptions(
            grace=read_grace(self.query_one("#opt-grace", Input).value),
            tmpfs_size=self.query_one("#opt-tmpfs", Input).value.strip(),
            api_mounts=self.query_one("#opt-api", Checkbox).value,
            modules=self.query_one("#opt-modules", Checkbox).value,
            carry=self.query_one("#opt-carry", Checkbox).value,
        )

    @on(Input.Changed)
    @on(Checkbox.Changed)
    def changed(self) -> None:
        error = self.query_one("#options-error", Static)
        command = self.query_one("#options-command", Static)
        try:
            options = self.read()
            line = self.wizard.command_line(options)
        except BadInput as refused:
            error.update(Text(f"✗ {refused}", style="bold red"))
            error.display = True
            command.update(Text("(fix the option above first)", style="dim"))
            self.block(f"✗ {refused.cause}")
            return
        error.display = False
        self.wizard.choices.options = options
        command.update(Text(line, style="bold"))
        self.unblock(f"Enter: confirm · {COPY_KEY.replace('ctrl+', '^')}: copy the command line")

    def command_line(self) -> str | None:
        try:
            return self.wizard.command_line()
        except BadInput:
            return None

    def action_copy_command(self) -> None:
        line = self.command_line()
        if self.blocked_reason is None and line is not None:
            copy_command(self, line)

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_next()
