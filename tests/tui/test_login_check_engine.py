"""The wizard's login check on the real engine: a switch with ``--target-pid`` at the PID 1 of
a namespace this test made, the image's sshd in the RAM root on port 2222 of that namespace's
network, a real ssh login over its 127.0.0.1, and the wizard going on by itself once sshd
accepted it. The image and the client come from tests/sandbox/test_ssh_check.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from textual.widgets import Checkbox, Input, RadioButton, RadioSet, RichLog

from app.tui.app import create_app
from app.tui.backend import EngineBackend
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.login_check import LoginCheckScreen
from injector.rehearsal.sandbox import Sandbox
from tests.sandbox.test_ssh_check import (  # noqa: F401 (fixtures)
    MARKER,
    PORT,
    check_servers,
    keyed_image,
    sandbox,
    ssh_in_sandbox,
)
from tests.tui.helpers import press, screen_text, settle, wait_for_screen, wait_until
from tests.tui.test_engine import pick_image, reach_the_report
from tests.tui.test_options import flat, set_field

pytestmark = pytest.mark.root

SIZE = (80, 24)


async def test_a_real_login_lets_the_wizards_switch_go_on(
    sandbox: Sandbox,  # noqa: F811
    keyed_image: tuple[str, Path],  # noqa: F811
    tmp_path: Path,
) -> None:
    image, keys = keyed_image
    engine = EngineBackend(state_dir=tmp_path / "state", target_pid=sandbox.pid)
    app = create_app(engine, rehearse_only=False, blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await pick_image(pilot, image)
        app.screen.query_one("#init-argv", Input).value = "/bin/sh -c 'exec sleep 60'"
        await reach_the_report(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, OptionsScreen)
        # This test's session may be local: the check is then off by default, turned on here.
        app.screen.query_one("#opt-login-check", Checkbox).value = True
        await set_field(pilot, "#opt-login-port", str(PORT))
        await set_field(pilot, "#opt-grace", "1")
        if app.screen.query_one("#opt-revert", RadioSet).pressed_button is None:
            app.screen.query_one("#revert-off", RadioButton).value = True
        await settle(pilot)
        assert f"--ssh-check {PORT}" in app.wizard.command_line()
        app.screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *engine.hostname(), "enter")
        await wait_for_screen(pilot, LoginCheckScreen, timeout=180)
        assert f"ssh -p {PORT} " in flat(screen_text(app))
        assert check_servers(), "the check's sshd is not running while the wizard waits"
        login = await asyncio.to_thread(ssh_in_sandbox, sandbox, keys, f"cat {MARKER}")
        # Nobody pressed a key: the accepted login closes the wait, and the switch goes on.
        await wait_for_screen(pilot, RunScreen, timeout=30)
        run = app.screen
        await wait_until(pilot, lambda: not app.run_in_progress(), 120, "the run's end")
        log = "\n".join(strip.text for strip in run.query_one("#run-log", RichLog).lines)
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == "in-the-ram-root"
    assert "login by root from 127.0.0.1" in flat(log), log
    assert "injected execve into pid" in flat(log), log  # past the commit point, after it
    assert check_servers() == []
