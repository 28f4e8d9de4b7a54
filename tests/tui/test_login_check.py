"""The login check (``--ssh-check``) in the wizard: on by default for a remote session's real
switch, on the command line, and the Run screen's wait for a login before the commit, with
the fake engine calling the wizard's go callback as the real one does (sshcheck.proof)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Checkbox, RadioButton, RichLog

from app.tui.app import DbootApp, create_app
from app.tui.backend import RunOptions
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.login_check import LoginCheckScreen
from tests.tui.fakes import HOSTNAME, FakeBackend, SteppingClock
from tests.tui.helpers import (
    press,
    run_from_ram,
    screen_text,
    settle,
    wait_for_run_end,
    wait_for_screen,
)
from tests.tui.test_options import command_shown, flat, set_field
from tests.tui.test_walk import to_options

SIZE = (80, 24)
LINE = "ssh -p 2222 -o HostKeyAlias=10.0.2.15 root@10.0.2.15"
SnapCompare = Callable[..., bool]


def remote_switch(backend: FakeBackend | None = None) -> DbootApp:
    """A remote session (the fake's), an image with sshd, lab mode off on the fake engine."""
    return create_app(
        backend or FakeBackend(lab=False, image_has_ssh=True),
        rehearse_only=False,
        clock=SteppingClock(),
        blink=False,
    )


async def to_the_login_check(pilot: Pilot[Any]) -> None:
    """Options with their defaults (revert off), confirm the switch, wait for the check."""
    await to_options(pilot)
    pilot.app.screen.query_one("#revert-off", RadioButton).value = True
    await settle(pilot)
    pilot.app.screen.set_focus(None)
    await press(pilot, "enter")
    await run_from_ram(pilot)
    await wait_for_screen(pilot, ConfirmScreen)
    await press(pilot, *HOSTNAME, "enter")
    await wait_for_screen(pilot, LoginCheckScreen)


async def command_at_the_end(pilot: Pilot[Any]) -> str:
    """The Options step's command line, scrolled into view below a focused field."""
    pilot.app.screen.query_one("#options-body").scroll_end(animate=False)
    await settle(pilot)
    assert isinstance(pilot.app, DbootApp)
    return command_shown(pilot.app)


def run_log(app: DbootApp) -> str:
    screen = app.screen_stack[-1] if isinstance(app.screen, RunScreen) else app.screen_stack[-2]
    return "\n".join(strip.text for strip in screen.query_one("#run-log", RichLog).lines)


async def test_a_remote_switch_checks_a_login_on_port_2222_by_default_and_enter_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    backend = FakeBackend(lab=False, image_has_ssh=True)
    app = remote_switch(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        assert app.screen.query_one("#opt-login-check", Checkbox).value
        app.screen.query_one("#revert-off", RadioButton).value = True
        await settle(pilot)
        line = "dboot switch --no-revert --ssh-check 2222 tinybox:latest /sbin/init"
        assert command_shown(app) == line
        app.screen.set_focus(None)
        await press(pilot, "enter")
        await run_from_ram(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *HOSTNAME, "enter")
        await wait_for_screen(pilot, LoginCheckScreen)
        shown = flat(screen_text(app))
        assert LINE in shown
        assert "Waiting for a login" in shown
        assert "Enter: go on without one · Escape: call the switch off" in shown
        # The engine's worker waits: nothing went past the check yet.
        assert backend.went == []
        assert LINE in flat(run_log(app))
        await press(pilot, "enter")
        await wait_for_run_end(pilot)
        assert "no login seen, going on as told" in flat(run_log(app))
    assert backend.went == [True]
    assert backend.requests[0].options == RunOptions(no_revert=True, ssh_check=2222)
    assert f"waiting for a login with: {LINE}" in caplog.text


async def test_escape_calls_the_switch_off_before_the_commit() -> None:
    backend = FakeBackend(lab=False, image_has_ssh=True)
    app = remote_switch(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_the_login_check(pilot)
        await press(pilot, "escape")
        await wait_for_run_end(pilot)
        assert "the switch was called off" in flat(run_log(app))
        # Called off before the point of no return: no injection step ran.
        assert "Injecting" not in run_log(app)
    assert backend.went == [False]


async def test_an_accepted_login_closes_the_wait_by_itself() -> None:
    backend = FakeBackend(lab=False, image_has_ssh=True)
    app = remote_switch(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_the_login_check(pilot)
        backend.login.set()  # what sshd's "Accepted publickey for root" sets in the engine
        await wait_for_run_end(pilot)
        assert not isinstance(app.screen, LoginCheckScreen)
        assert "login by root from 10.0.2.2 (publickey) accepted" in flat(run_log(app))
    assert backend.went == [True]


async def test_a_wizard_that_stops_while_waiting_calls_the_switch_off() -> None:
    backend = FakeBackend(lab=False, image_has_ssh=True)
    app = remote_switch(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_the_login_check(pilot)
        app.exit()
    # The engine's thread sees the wizard gone within a poll and answers for it.
    deadline = time.monotonic() + 5
    while not backend.went and time.monotonic() < deadline:
        time.sleep(0.05)
    assert backend.went == [False]


async def test_the_login_check_can_be_turned_off_and_has_its_port_judged_by_the_engine() -> None:
    backend = FakeBackend(lab=False, image_has_ssh=True)
    app = remote_switch(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        app.screen.query_one("#revert-off", RadioButton).value = True
        await set_field(pilot, "#opt-login-port", "70000")
        assert "✗ --ssh-check port 70000 is not a TCP port: give a port from 1 to 65535" in flat(
            screen_text(app)
        )
        await set_field(pilot, "#opt-login-port", "2200")
        assert "--ssh-check 2200" in await command_at_the_end(pilot)
        app.screen.query_one("#opt-login-check", Checkbox).value = False
        await settle(pilot)
        assert (
            await command_at_the_end(pilot) == "dboot switch --no-revert tinybox:latest /sbin/init"
        )
        app.screen.set_focus(None)
        await press(pilot, "enter")
        await run_from_ram(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *HOSTNAME, "enter")
        await wait_for_run_end(pilot)
    assert backend.went == []
    assert backend.requests[0].options == RunOptions(no_revert=True, no_ssh_check=True)


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param(FakeBackend(lab=False, image_has_ssh=False), id="image-without-sshd"),
        pytest.param(FakeBackend(lab=True, image_has_ssh=True), id="rehearsal"),
    ],
)
async def test_no_login_check_without_an_sshd_or_in_a_rehearsal(backend: FakeBackend) -> None:
    app = remote_switch(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        tick = app.screen.query_one("#opt-login-check", Checkbox)
        assert tick.disabled and not tick.value
        # A rehearsal's step leaves the row out; a switch's says why it is off.
        rehearsal = backend.lab
        assert app.screen.query_one("#login-check-row").display is not rehearsal
        assert ("Off: the image has no SSH server" in screen_text(app)) is not rehearsal
        assert "--ssh-check" not in command_shown(app)


def test_snapshot_waiting_for_a_login(snap_compare: SnapCompare) -> None:
    assert snap_compare(remote_switch(), run_before=to_the_login_check, terminal_size=SIZE)
