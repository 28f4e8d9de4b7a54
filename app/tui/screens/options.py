"""Step 5: the choices a run has besides the image and the init, and the same run as a
`dboot` command line, kept up to date as they change.

Each option shows its default and one line on what it means. The values are the engine's to
judge: every change builds the engine's own options (``Backend.switch_options``), and a
value it refuses blocks Next with the engine's one-line message. Options that only matter
for a real switch say so, and are off in a rehearse-only wizard. When the engine would set
a revert timer by itself (a remote session's real switch), the user must choose: on, after
how many minutes, or off. In a remote session a real switch checks a login first: the
image's sshd answers in the RAM root on port 2222 before the point of no return (the user
may turn it off).
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
from textual.widgets import Checkbox, Input, Label, RadioButton, RadioSet, Static

from app.format import human_bytes, number_arg
from app.tui.backend import RunOptions
from app.tui.screens.base import StepScreen
from app.tui.widgets.chrome import Choice, ChoiceSet, Field, Tick
from app.tui.wizard import Wizard
from initstage.plan import DEFAULT_REMOTE_REVERT_MINUTES, KEEP_FILE
from injector.errors import BadInput
from injector.units import duration_text

logger = logging.getLogger(__name__)

SWITCH_ONLY = "(real switch only)"
COPY_KEY = "ctrl+y"
CHOOSE_REVERT = "choose the revert timer: on, or off"
DEFAULT_CHECK_PORT = 2222  # not 22: the old system's sshd still holds that one


def copy_command(screen: Screen[Any], line: str) -> None:
    """Put the command line on the clipboard (OSC 52) and in the wizard's log file."""
    logger.info("equivalent command line: %s", line)
    screen.app.copy_to_clipboard(line)
    screen.notify("Command line copied (OSC 52; it is in the wizard's log file too).")


def read_number(text: str, what: str, example: str) -> float:
    """A number as typed; the engine judges its range."""
    try:
        return float(text.strip())
    except ValueError:
        raise BadInput(f"{what} {text.strip()!r} is not a number", f"give {example}") from None


class OptionsScreen(StepScreen):
    STEP = 4
    # Nothing has the focus at first: Enter takes the defaults, and n, b and q move as on
    # every step instead of landing in a field. Tab reaches the options.
    AUTO_FOCUS = None
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(COPY_KEY, "copy_command", "Copy command line"),
    ]

    def __init__(self, wizard: Wizard) -> None:
        super().__init__(wizard)
        # The timer the engine would set by itself for this switch (None: none). When there
        # is one, the user must choose, and the modal's command line says what was chosen.
        self.engine_revert = wizard.default_revert()
        report = wizard.choices.report
        self.image_has_ssh = report is not None and report.session.image_has_ssh
        # A remote session's real switch checks a login into the new root before the commit.
        self.check_by_default = (
            wizard.switch_offered
            and self.image_has_ssh
            and report is not None
            and report.session.remote
        )

    def body(self) -> ComposeResult:
        chosen = self.wizard.choices.options
        switch_off = self.wizard.rehearse_only
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
                yield Tick("API mounts", chosen.api_mounts, id="opt-api", compact=True)
                yield Static(
                    "Default on: mount /proc, /sys, /dev, /dev/pts for it",
                    classes="option-help",
                )
            with Horizontal(classes="option"):
                yield Tick("Kernel modules", chosen.modules, id="opt-modules", compact=True)
                yield Static(
                    "Default on: add this kernel's modules and firmware",
                    classes="option-help",
                )
            with Horizontal(classes="option", id="stop-row"):
                yield Tick("Graceful stop", chosen.graceful_stop, id="opt-graceful", compact=True)
                timeout = "" if chosen.stop_timeout is None else number_arg(chosen.stop_timeout)
                yield Field(timeout, id="opt-stop-timeout", compact=True, placeholder="auto")
                yield Static(self.stop_help(), classes="option-help")
            with Horizontal(classes="option"):
                yield Tick(
                    "Carry-over", chosen.carry, id="opt-carry", compact=True, disabled=switch_off
                )
                yield Static(
                    self.switch_only_help("Default on: SSH keys, machine-id, DNS, network files"),
                    classes="option-help",
                )
            with Horizontal(classes="option"):
                yield Tick(
                    "SSH server",
                    chosen.ssh,
                    id="opt-ssh",
                    compact=True,
                    disabled=switch_off or not self.image_has_ssh,
                )
                yield Static(self.ssh_help(), classes="option-help")
            yield from self.revert_row(chosen)
            yield from self.login_check_row(chosen)
            yield Static("", id="options-error")
        # Below the options, never scrolled away: the line is what this step is for.
        with Vertical(id="command-box", classes="section"):
            yield Static("", id="options-command")

    def revert_row(self, chosen: RunOptions) -> ComposeResult:
        switch_off = self.wizard.rehearse_only
        minutes = chosen.revert_after or self.engine_revert or DEFAULT_REMOTE_REVERT_MINUTES
        # Pressed: the user's earlier choice (Back and forth), else none when the engine
        # would set a timer (the user must choose), else off, the engine's default here.
        turned_on = chosen.revert_after is not None
        turned_off = chosen.no_revert or (not turned_on and self.engine_revert is None)
        with Horizontal(classes="option", id="revert-row"):
            yield Label("Revert timer", classes="option-name")
            with ChoiceSet(id="opt-revert", compact=True, disabled=switch_off):
                yield Choice("on", turned_on, id="revert-on")
                yield Choice("off", turned_off, id="revert-off")
            yield Field(
                number_arg(minutes), id="opt-revert-minutes", compact=True, disabled=switch_off
            )
            yield Static(
                self.switch_only_help(
                    f"minutes, then the old system boots again unless {KEEP_FILE} exists"
                ),
                classes="option-help",
            )
        default = (
            f"on, {number_arg(self.engine_revert)} min (remote session): choose"
            if self.engine_revert is not None
            else "off"
        )
        warning = Text(f"Default {default}. ", style="dim")
        warning.append(
            "! After wiping the old disk there is nothing to revert to: turn it off then.",
            style="dim" if switch_off else "yellow",
        )
        yield Static(warning, id="revert-warning")

    def login_check_row(self, chosen: RunOptions) -> ComposeResult:
        # A real switch's only; unlike the others it is left out of a rehearsal's step, whose
        # 80x24 then keeps room for a long command line.
        unavailable = self.wizard.rehearse_only or not self.image_has_ssh
        turned_on = chosen.ssh_check is not None or (
            self.check_by_default and not chosen.no_ssh_check
        )
        if not self.image_has_ssh:
            help_text = "Off: the image has no SSH server"
        elif self.check_by_default:
            help_text = "Default on (remote session): log in first"
        else:
            help_text = "Default off: log in to the new root first"
        with Horizontal(classes="option", id="login-check-row") as row:
            row.display = not self.wizard.rehearse_only
            yield Tick(
                "Login check",
                turned_on and not unavailable,
                id="opt-login-check",
                compact=True,
                disabled=unavailable,
            )
            port = str(chosen.ssh_check or DEFAULT_CHECK_PORT)
            yield Field(port, id="opt-login-port", compact=True, disabled=unavailable)
            yield Static(help_text, classes="option-help")

    def stop_help(self) -> str:
        """What the graceful stop does here: the ceiling it would take by default."""
        report = self.wizard.choices.report
        plan = report.stop if report is not None else None
        ceiling = f", ceiling auto: {duration_text(plan.ceiling)}" if plan and plan.units else ""
        return f"Default on: the init stops its services first{ceiling}"

    def tmpfs_help(self) -> str:
        report = self.wizard.choices.report
        fits = f" ({human_bytes(report.ram.tmpfs_size)} here)" if report is not None else ""
        return f"Default auto: the image plus headroom{fits}"

    def ssh_help(self) -> Text:
        if self.wizard.choices.report is not None and not self.image_has_ssh:
            return self.switch_only_help("Off: the image has no SSH server")
        return self.switch_only_help("Default off: keep the image's sshd running")

    def switch_only_help(self, text: str) -> Text:
        help_text = Text(text)
        help_text.append(f" {SWITCH_ONLY}", style="italic")
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
    def revert_choice(self) -> tuple[float | None, bool]:
        """(revert_after, no_revert) as the radio buttons and the minutes say."""
        if self.query_one("#revert-on", RadioButton).value:
            text = self.query_one("#opt-revert-minutes", Input).value
            return read_number(text, "revert timer", "minutes, e.g. 10 or 2.5"), False
        # Off where the engine would set a timer says so; elsewhere off is the default.
        return None, self.engine_revert is not None

    def login_check_choice(self) -> tuple[int | None, bool]:
        """(ssh_check, no_ssh_check) as the tick and the port say; the engine judges the port."""
        if not self.query_one("#opt-login-check", Checkbox).value:
            return None, self.check_by_default
        text = self.query_one("#opt-login-port", Input).value.strip()
        try:
            return int(text), False
        except ValueError:
            raise BadInput(
                f"login check port {text!r} is not a number", "give a TCP port, e.g. 2222"
            ) from None

    def stop_timeout(self) -> float | None:
        text = self.query_one("#opt-stop-timeout", Input).value
        return read_number(text, "stop timeout", "seconds, e.g. 120") if text.strip() else None

    def read(self) -> RunOptions:
        """The options as the widgets hold them; ``BadInput`` for a number that is none."""
        revert_after, no_revert = self.revert_choice()
        ssh_check, no_ssh_check = self.login_check_choice()
        return RunOptions(
            grace=read_number(
                self.query_one("#opt-grace", Input).value, "grace period", "seconds, e.g. 5"
            ),
            tmpfs_size=self.query_one("#opt-tmpfs", Input).value.strip(),
            api_mounts=self.query_one("#opt-api", Checkbox).value,
            modules=self.query_one("#opt-modules", Checkbox).value,
            graceful_stop=self.query_one("#opt-graceful", Checkbox).value,
            stop_timeout=self.stop_timeout(),
            carry=self.query_one("#opt-carry", Checkbox).value,
            ssh=self.query_one("#opt-ssh", Checkbox).value,
            revert_after=revert_after,
            no_revert=no_revert,
            ssh_check=ssh_check,
            no_ssh_check=no_ssh_check,
        )

    def revert_unchosen(self) -> bool:
        """A switch the engine would give a timer, and neither on nor off pressed yet."""
        if self.engine_revert is None:
            return False
        return self.query_one("#opt-revert", RadioSet).pressed_button is None

    @on(Input.Changed)
    @on(Checkbox.Changed)
    @on(RadioSet.Changed)
    def changed(self) -> None:
        error = self.query_one("#options-error", Static)
        command = self.query_one("#options-command", Static)
        try:
            options = self.read()
            line = self.wizard.command_line(options)
        except BadInput as refused:
            self.refused(refused, error, command, "fix the option above")
            # Below the options (more of them than 24 lines show), the line may be out of view.
            self.call_after_refresh(error.scroll_visible)
            return
        error.display = False
        self.wizard.choices.options = options
        if self.revert_unchosen():
            command.update(Text("(choose the revert timer first)", style="dim"))
            self.block(CHOOSE_REVERT)
            return
        command.update(Text(line, style="bold"))
        self.unblock(f"Enter: confirm · {COPY_KEY.replace('ctrl+', '^')}: copy the command")

    def action_copy_command(self) -> None:
        if self.blocked_reason is None:
            copy_command(self, self.wizard.command_line())

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_next()
