"""Step 6, where the wizard may install: where the image runs. From RAM until the next
reboot (the switch the Options step set up), or installed on this machine's disk with the
old system kept beside it as the way back (`dboot install`).

For an install the step shows what the engine finds here (``Backend.install_facts``, read
in a worker): the root filesystem's free space against what the install needs, the boot
chain that stays as found, and the engine's verdicts, whose blockers stop Next. The first
boot's probation is the user's to choose, on (after how many minutes) or off, as the
Options step asks for a remote switch's revert timer; and whether to reboot when done. The
same run as a `dboot` command line sits below, kept up to date.

The step exists only where an install may happen: not in a wizard that only rehearses (lab
mode, --rehearse), where there is nothing to choose, nor under --target-pid, whose real
switch is a namespace's and not this machine's disk (``Wizard.asks_destination``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Checkbox, Input, Label, RadioButton, RadioSet, Static

from app.format import human_bytes, number_arg
from app.tui.backend import InstallChoices
from app.tui.messages import InstallFactsRead
from app.tui.screens.base import StepScreen
from app.tui.screens.options import COPY_KEY, copy_command, read_number
from app.tui.screens.resources import notice_text
from app.tui.widgets.chrome import Choice, ChoiceSet, Field, Tick
from app.tui.wizard import Wizard
from initstage.plan import KEEP_FILE
from injector.errors import BadInput, DbootError

if TYPE_CHECKING:
    from injector.install.bootchain import BootChain
    from injector.install.install import InstallFacts
    from injector.preflight.preflight import Report

RAM_LABEL = "Run from RAM until the next reboot"
DISK_LABEL = "Install on this machine's disk"
CHOOSE_PROBATION = "choose the first boot's revert timer: on, or off"
READING = "reading this machine's boot chain…"


def machine_text(facts: InstallFacts) -> Text:
    """The disk and the boot chain an install rides on, one fact a line."""
    chain, root = facts.chain, facts.chain.root
    text = Text()

    def row(name: str, value: str, style: str = "") -> None:
        text.append(f"{name:<9}", style="dim")
        text.append(f"{value}\n", style=style)

    if root is None:
        row("disk", "the root filesystem could not be read", "bold red")
    else:
        fits = root.free_bytes >= facts.needed_bytes
        row(
            "disk",
            f"{root.device} ({root.fstype}): {human_bytes(root.free_bytes)} free, the install"
            f" needs {human_bytes(facts.needed_bytes)}",
            "green" if fits else "bold red",
        )
    row("firmware", f"{chain.firmware}, bootloader {chain.bootloader or 'unknown'}")
    row("kernel", chain.kernel or "not under /boot (booted from elsewhere)")
    row("initrd", chain.initramfs or "none")
    row("/boot", separate_parts(chain))
    row("init", f"{chain.init_path} → {chain.init_target} (the boot shim after the install)")
    text.rstrip()
    return text


def separate_parts(chain: BootChain) -> str:
    boot = f"its own partition {chain.boot_partition}" if chain.boot_partition else "on the root"
    return f"{boot}; ESP {chain.esp or 'none'}"


class DestinationScreen(StepScreen):
    STEP = 5
    # The destination has the focus: arrows move, Space chooses, Enter goes on.
    AUTO_FOCUS = "#destination"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(COPY_KEY, "copy_command", "Copy command line"),
    ]

    def __init__(self, wizard: Wizard) -> None:
        super().__init__(wizard)
        self.facts: InstallFacts | None = wizard.choices.install_facts
        self.facts_error: str | None = None
        self.default_minutes = wizard.install_revert_default()

    def body(self) -> ComposeResult:
        chosen = self.wizard.choices.install
        with VerticalScroll(id="destination-body"):
            with ChoiceSet(id="destination", compact=True):
                yield Choice(RAM_LABEL, chosen is None, id="dest-ram")
                yield Choice(DISK_LABEL, chosen is not None, id="dest-disk")
            yield Static("", id="destination-what")
            with Vertical(id="install-box"):
                with Vertical(id="machine-box", classes="section"):
                    yield Static(Text(READING, style="dim"), id="install-machine")
                yield from self.probation_row(chosen)
                with Horizontal(classes="option"):
                    reboot = chosen is None or chosen.reboot
                    yield Tick("Reboot when done", reboot, id="install-reboot", compact=True)
                    yield Static(
                        "Default on: the host's init reboots it into the image",
                        classes="option-help",
                    )
                yield Static("", id="install-verdicts")
            yield Static("", id="destination-error")
        with Vertical(id="command-box", classes="section"):
            yield Static("", id="destination-command")

    def probation_row(self, chosen: InstallChoices | None) -> ComposeResult:
        minutes = (chosen and chosen.revert_after) or self.default_minutes or 10
        # Pressed: the user's earlier choice (Back and forth); at first neither: choose.
        turned_on = chosen is not None and not chosen.no_revert
        turned_off = chosen is not None and chosen.no_revert
        with Horizontal(classes="option", id="probation-row"):
            yield Label("Revert timer", classes="option-name")
            with ChoiceSet(id="install-revert", compact=True):
                yield Choice("on", turned_on, id="install-revert-on")
                yield Choice("off", turned_off, id="install-revert-off")
            yield Field(number_arg(minutes), id="install-revert-minutes", compact=True)
            yield Static(
                f"minutes, then the old system boots again unless {KEEP_FILE} exists",
                classes="option-help",
            )

    def on_mount(self) -> None:
        super().on_mount()
        self.query_one("#machine-box").border_title = "This machine (its boot chain stays)"
        if self.facts is None:
            choices = self.wizard.choices
            assert choices.image is not None and choices.report is not None
            self.read_facts(choices.image, choices.report)
        else:
            self.show_facts()
        self.changed()

    # --- the engine's facts, read once -----------------------------------------------------
    @work(thread=True, exclusive=True, group="install-facts")
    def read_facts(self, ref: str, report: Report) -> None:
        try:
            facts = self.wizard.backend.install_facts(ref, report)
        except DbootError as error:
            self.post_message(InstallFactsRead(None, str(error)))
            return
        self.post_message(InstallFactsRead(facts, None))

    def on_install_facts_read(self, message: InstallFactsRead) -> None:
        self.facts, self.facts_error = message.facts, message.error
        self.wizard.choices.install_facts = message.facts
        self.show_facts()
        self.changed()

    def show_facts(self) -> None:
        machine = self.query_one("#install-machine", Static)
        verdicts = self.query_one("#install-verdicts", Static)
        if self.facts is None:
            machine.update(Text(self.facts_error or READING, style="bold red"))
            return
        machine.update(machine_text(self.facts))
        shown = [n for n in self.facts.notices if n.level != "info"]
        text = Text("\n").join(notice_text(notice) for notice in shown)
        verdicts.update(text if shown else Text("✓ nothing blocks an install", style="green"))

    # --- reading and checking --------------------------------------------------------------
    def installing(self) -> bool:
        return self.query_one("#dest-disk", RadioButton).value

    def blockers(self) -> list[str]:
        facts = self.facts
        return [n.message for n in facts.notices if n.level == "blocker"] if facts else []

    def read_install(self) -> InstallChoices:
        """The install as the widgets say; ``BadInput`` for minutes that are no number."""
        reboot = self.query_one("#install-reboot", Checkbox).value
        if self.query_one("#install-revert-off", RadioButton).value:
            return InstallChoices(no_revert=True, reboot=reboot)
        text = self.query_one("#install-revert-minutes", Input).value
        minutes = read_number(text, "revert timer", "minutes, e.g. 10 or 2.5")
        return InstallChoices(revert_after=minutes, reboot=reboot)

    def what_text(self) -> Text:
        image = self.wizard.choices.image
        if self.installing():
            return Text(
                f"{image} goes beside the old system on its root filesystem; the old system"
                " stays whole as the way back (`dboot install --revert`).",
                style="dim",
            )
        if not self.wizard.switch_offered:
            blockers = "; ".join(n.message for n in self.wizard.choices.switch_blockers)
            return Text(f"The switch is off here ({blockers}): only a rehearsal.", style="yellow")
        return Text(
            f"The switch the Options step set up: {image} runs from RAM and this machine's"
            " disk is not written; a reboot brings the old system back.",
            style="dim",
        )

    @on(Input.Changed)
    @on(Checkbox.Changed)
    @on(RadioSet.Changed)
    def changed(self) -> None:
        installing = self.installing()
        self.query_one("#install-box").display = installing
        self.query_one("#destination-what", Static).update(self.what_text())
        error = self.query_one("#destination-error", Static)
        command = self.query_one("#destination-command", Static)
        box = self.query_one("#command-box")
        box.border_title = "The same install from a shell" if installing else self.ram_title()
        error.display = False
        if not installing:
            command.update(Text(self.wizard.command_line(), style="bold"))
            self.unblock(f"Enter: confirm · ↓ Space: {DISK_LABEL[0].lower()}{DISK_LABEL[1:]}")
            return
        try:
            line = self.wizard.command_line(install=self.read_install())
        except BadInput as refused:
            self.refused(refused, error, command, "fix the revert timer")
            return
        if self.query_one("#install-revert", RadioSet).pressed_button is None:
            command.update(Text("(choose the revert timer first)", style="dim"))
            self.block(CHOOSE_PROBATION)
            return
        command.update(Text(line, style="bold"))
        blockers = self.blockers()
        if self.facts is None:
            self.block(self.facts_error or READING)
        elif blockers:
            more = f" (+{len(blockers) - 1} more)" if len(blockers) > 1 else ""
            self.block(f"install blocked: {blockers[0]}{more}")
        else:
            self.unblock(f"Enter: confirm the install · {COPY_KEY.replace('ctrl+', '^')}: copy")

    def ram_title(self) -> str:
        run = "switch" if self.wizard.switch_offered else "rehearsal"
        return f"The same {run} from a shell"

    # --- moving ----------------------------------------------------------------------------
    def commit(self) -> bool:
        self.wizard.choices.install = self.read_install() if self.installing() else None
        return True

    def action_copy_command(self) -> None:
        if self.blocked_reason is None:
            copy_command(self, self.current_line())

    def current_line(self) -> str:
        install = self.read_install() if self.installing() else None
        return self.wizard.command_line(install=install)

    @on(Input.Submitted)
    def submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_next()
