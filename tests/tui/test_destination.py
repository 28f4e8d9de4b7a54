"""The Destination step (issue 17 §1): run from RAM until the next reboot, or install on this
machine's disk with the old system kept as the way back (`dboot install`).

On the fake engine with lab mode off: the boot chain, the space and the verdicts are fixed
data (the real ``read_boot_chain`` reads whichever machine runs the tests), and the install's
run is the fake's event stream. Nothing is installed or switched here. The last tests hold
the real backend to its refusals: lab mode, and --target-pid.
"""

from __future__ import annotations

import io
import logging
import shlex
import threading
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, Checkbox, Input, RadioButton, RichLog

from app.cli import install_options, parse_command_line
from app.tui.app import DbootApp, create_app
from app.tui.backend import EngineBackend, InstallChoices, RunRequest
from app.tui.screens.base import StepScreen
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.destination import CHOOSE_PROBATION, DestinationScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.run_panels import StepList
from injector.errors import SafetyRefusal
from injector.install.install import InstallOptions
from tests.tui.fakes import HOSTNAME, NO_SPACE, FakeBackend, SteppingClock
from tests.tui.helpers import (
    press,
    screen_text,
    settle,
    take_the_options,
    wait_for_run_end,
    wait_for_screen,
    wait_until,
)
from tests.tui.test_options import flat
from tests.tui.test_walk import to_options

SIZE = (80, 24)
INSTALL_LINE = "dboot install --revert-after 10 tinybox:latest /sbin/init"


def make(backend: FakeBackend | None = None, *, rehearse_only: bool = False) -> DbootApp:
    return create_app(
        backend or FakeBackend(lab=False),
        rehearse_only=rehearse_only,
        clock=SteppingClock(),
        blink=False,
    )


def command_shown(app: DbootApp) -> str:
    content = app.screen.query_one("#destination-command").render()
    return str(content)


def shown(app: DbootApp) -> str:
    return flat(screen_text(app))


async def to_destination(pilot: Pilot[Any]) -> None:
    await to_options(pilot)
    app = pilot.app
    app.screen.query_one("#revert-off", RadioButton).value = True  # the switch's own timer
    await settle(pilot)
    app.screen.set_focus(None)
    await press(pilot, "enter")
    await wait_for_screen(pilot, DestinationScreen)
    await settle(pilot)


async def choose_install(pilot: Pilot[Any], revert: str | None = "on") -> None:
    """As a person would: down to Install, Space; then the revert timer, on or off."""
    await press(pilot, "down", "space")
    if revert is not None:
        pilot.app.screen.query_one(f"#install-revert-{revert}", RadioButton).value = True
        await settle(pilot)
        pilot.app.screen.set_focus(None)


def modal_text(confirm: ConfirmScreen) -> str:
    """The modal's words, whatever its scroll shows."""
    parts = [widget.render() for widget in confirm.query("Label, Static")]
    return flat(" ".join(getattr(part, "plain", str(part)) for part in parts))


def next_allowed(app: DbootApp) -> bool:
    return not app.screen.query_one("#nav-next", Button).disabled


async def test_install_shows_the_machine_asks_for_the_timer_and_runs_after_the_hostname(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.tui.screens.run")
    backend = FakeBackend(lab=False)
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_destination(pilot)
        text = shown(app)
        assert "Run from RAM until the next reboot" in text
        assert "Install on this machine's disk" in text
        # Run from RAM, today's switch, is the default: its line, and Next is on.
        assert app.screen.query_one("#dest-ram", RadioButton).value
        assert command_shown(app) == "dboot switch --no-revert tinybox:latest /sbin/init"
        assert "/dev/vda1" not in text and next_allowed(app)

        await choose_install(pilot, revert=None)
        text = shown(app)
        # What the engine found here (the fake's boot chain): the space against the need,
        # firmware, bootloader, kernel, initramfs, the separate /boot and the ESP, the init.
        for fact in (
            "/dev/vda1 (ext4): 18.0 GiB free, the install needs 260.3 MiB",
            "UEFI, bootloader GRUB",
            "/boot/vmlinuz-6.1.0-28-amd64",
            "/boot/initrd.img-6.1.0-28-amd64",
            "its own partition /dev/vda2; ESP /boot/efi",
            "/sbin/init → /lib/systemd/systemd",
            "you are connected over SSH and the image has no SSH server",
        ):
            assert fact in text, fact
        # The first boot's probation is the user's to choose, as the switch's timer is.
        assert CHOOSE_PROBATION in text and not next_allowed(app)
        await press(pilot, "enter")
        assert isinstance(app.screen, DestinationScreen)
        app.screen.query_one("#install-revert-on", RadioButton).value = True
        await settle(pilot)
        assert command_shown(app) == INSTALL_LINE and next_allowed(app)

        app.screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and confirm.command_line == INSTALL_LINE
        text = modal_text(confirm)
        for words in (
            "Rehearse or install?",
            "An install changes what this machine boots.",
            "/sbin/init is repointed at the boot shim",
            "Only a revert undoes that; the old system stays whole on the disk as the way back"
            " (`dboot install --revert`)",
            "Without /run/dboot/keep within 10 min of the first boot",
            "This machine reboots when it is done.",
            INSTALL_LINE,
            "To install for real, type the hostname labhost",
        ):
            assert words in text, words
        assert str(confirm.query_one("#confirm-switch", Button).label) == "Install"
        await press(pilot, *"labhots", "enter")
        assert "✗ 'labhots' is not labhost" in modal_text(confirm) and not backend.requests
        confirm.query_one("#confirm-hostname", Input).value = ""
        await press(pilot, *HOSTNAME)
        assert "✓ labhost: Enter installs for real." in modal_text(confirm)
        caplog.clear()
        await press(pilot, "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        log = [record.getMessage() for record in caplog.records]
        # The plan reads as lines, not as notices; the boot chain one fact a line.
        assert "new /etc/fstab:" in log and "  UUID=4f1c0ffe / ext4 rw,relatime 0 1" in log
        assert not [line for line in log if line.startswith("info:")]
        assert "install.boot_chain:" in log and "  firmware UEFI, bootloader GRUB" in log
        assert log[-1] == "Installed: the next boot starts the image on probation."
        # What to expect next: the check to run from outside after the reboot.
        expect = app.screen.query_one("#run-console", RichLog)
        assert "touch /run/dboot/keep" in flat(" ".join(s.text for s in expect.lines))
        steps = app.screen.query_one(StepList).steps
        assert list(steps) == ["source", "preflight", "plan", "tree", "shim", "commit"]
        assert {line.state for line in steps.values()} == {"done"}
    assert backend.requests == [
        RunRequest(
            "tinybox:latest",
            ["/sbin/init"],
            rehearse=False,
            options=backend.requests[0].options,
            install=InstallChoices(revert_after=10.0),
        )
    ]


async def test_no_timer_and_no_reboot_reach_the_line_the_modal_and_the_engine() -> None:
    backend = FakeBackend(lab=False)
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_destination(pilot)
        await choose_install(pilot, revert="off")
        app.screen.query_one("#install-reboot", Checkbox).value = False
        await settle(pilot)
        line = "dboot install --no-revert --no-reboot tinybox:latest /sbin/init"
        assert command_shown(app) == line
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        assert isinstance(app.screen, ConfirmScreen)
        text = modal_text(app.screen)
        assert "No revert timer: the first boot is kept at once." in text
        assert "Reboot it yourself when it is done." in text
        await press(pilot, *HOSTNAME, "enter")
        await wait_for_run_end(pilot, 10)
    assert backend.requests[0].install == InstallChoices(no_revert=True, reboot=False)
    # What the engine would run is what `dboot` makes of the line.
    engine = backend.switch_options(backend.requests[0])
    from_the_line = install_options(parse_command_line(shlex.split(line)[1:]), io.StringIO())
    assert isinstance(engine, InstallOptions)
    assert (engine.no_revert, engine.reboot) == (from_the_line.no_revert, from_the_line.reboot)
    assert (engine.no_revert, engine.reboot) == (True, False)


async def test_an_install_blocker_stops_next_and_run_from_ram_stays_open() -> None:
    backend = FakeBackend(lab=False, install_notices=[NO_SPACE])
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_destination(pilot)
        await choose_install(pilot)
        assert "install blocked: the install needs 260 MiB on /dev/vda1" in shown(app)
        assert not next_allowed(app)
        await press(pilot, "enter")
        assert isinstance(app.screen, DestinationScreen)
        app.screen.query_one("#dest-ram", RadioButton).value = True
        await settle(pilot)
        assert next_allowed(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        assert "Rehearse or switch?" in shown(app)
    assert backend.requests == []


async def test_back_and_forth_keeps_the_install_and_escape_in_the_modal_returns_here() -> None:
    backend = FakeBackend(lab=False)
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_destination(pilot)
        await choose_install(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, "escape")
        await wait_for_screen(pilot, DestinationScreen)
        assert command_shown(app) == INSTALL_LINE
        await press(pilot, "escape")
        await wait_for_screen(pilot, OptionsScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, DestinationScreen)
        await settle(pilot)
        assert app.screen.query_one("#dest-disk", RadioButton).value
        assert command_shown(app) == INSTALL_LINE
        # The boot chain was read once: the facts are the wizard's until the report changes.
        assert backend.facts_read == 1
        back: list[type[StepScreen]] = [OptionsScreen, ProcessesScreen, ResourcesScreen, InitScreen]
        forth: list[type[StepScreen]] = [
            ResourcesScreen,
            ProcessesScreen,
            OptionsScreen,
            DestinationScreen,
        ]
        for step in back:
            await press(pilot, "escape")
            await wait_for_screen(pilot, step)
        for step in forth:
            await press(pilot, "enter")  # a new preflight report, judged again for an install
            await wait_for_screen(pilot, step)
        await settle(pilot)
        assert backend.facts_read == 2
    assert backend.requests == []


@pytest.mark.parametrize(
    ("backend", "rehearse_only", "why"),
    [
        (FakeBackend(lab=True), False, "lab mode"),
        (FakeBackend(lab=False), True, "--rehearse"),
        (FakeBackend(lab=False, target_pid=4242), False, "--target-pid"),
    ],
    ids=["lab-mode", "rehearse-only", "target-pid"],
)
async def test_no_destination_where_the_wizard_cannot_install(
    backend: FakeBackend, rehearse_only: bool, why: str
) -> None:
    # Lab mode and --rehearse only rehearse; --target-pid switches a namespace's PID 1,
    # whose disk is this machine's: none of them may install, so none asks where.
    app = make(backend, rehearse_only=rehearse_only)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        assert "Destination" not in screen_text(app), why
        assert not app.wizard.asks_destination
        await take_the_options(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        assert isinstance(app.screen, ConfirmScreen)
        assert "Rehearse or switch?" in modal_text(app.screen)
        assert "install" not in modal_text(app.screen).lower()
    assert backend.facts_read == 0


def test_the_real_backend_refuses_an_install_in_lab_mode_and_under_target_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Defence in depth: the wizard never asks in lab mode, and the engine refuses too; the
    # backend refuses before the engine is reached. The test suite runs in lab mode.
    monkeypatch.setenv("DBOOT_REHEARSAL_ONLY", "1")
    request = RunRequest(
        "tinybox:latest", ["/sbin/init"], rehearse=False, install=InstallChoices(revert_after=10)
    )
    backend = EngineBackend()
    with pytest.raises(SafetyRefusal, match="disk and boot chain will not be changed"):
        list(backend.run(request, lambda words: None))
    backend.target_pid = 4242  # as --target-pid, without a namespace to check
    with pytest.raises(SafetyRefusal, match="--target-pid only aims a switch"):
        list(backend.run(request, lambda words: None))


async def test_the_indicator_names_the_neighbours_of_each_step_at_80_columns() -> None:
    app = make(FakeBackend(lab=False))
    async with app.run_test(size=SIZE) as pilot:
        await to_destination(pilot)
        line = " ".join(screen_text(app).splitlines()[1].split())
        assert line == "1 › 2 › 3 › 4 Processes › 5 Options › 6 Destination › 7 Confirm › 8 Run"
        await pilot.resize_terminal(60, 24)
        await settle(pilot)
        line = " ".join(screen_text(app).splitlines()[1].split())
        assert line == "1 › 2 › 3 › 4 › 5 Options › 6 Destination › 7 Confirm › 8", line


async def test_next_waits_for_the_boot_chain_read_in_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The boot chain is read in a worker (findmnt, the old system's python3): while it is,
    # the install's Next is off and says why; the wizard itself stays live.
    release = threading.Event()
    backend = FakeBackend(lab=False)
    fast = backend.install_facts

    def slow(ref: str, report: Any) -> Any:
        release.wait(10)
        return fast(ref, report)

    monkeypatch.setattr(backend, "install_facts", slow)
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        try:
            await to_options(pilot)
            app.screen.query_one("#revert-off", RadioButton).value = True
            await pilot.pause(0.1)
            app.screen.set_focus(None)
            await pilot.press("enter")  # no settle(): it would wait for the held read
            await wait_for_screen(pilot, DestinationScreen)
            await pilot.press("down", "space")
            app.screen.query_one("#install-revert-on", RadioButton).value = True
            reading = "reading this machine's boot chain"
            await wait_until(pilot, lambda: reading in shown(app), 5, "the read")
            assert not next_allowed(app)
        finally:
            release.set()
        await wait_until(pilot, lambda: next_allowed(app), 5, "the facts")
