"""The wizard on the real engine: real dockerd, the real preflight, a real rehearsal.

A rehearsal injects into the PID 1 of a fresh sandbox (new PID, mount, UTS, IPC and network
namespaces), never into this machine's PID 1: tests/conftest.py sets DBOOT_REHEARSAL_ONLY=1
and EngineBackend refuses anything else on top of the engine's own refusal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, Input, RichLog

from app.tui.app import DbootApp, create_app
from app.tui.backend import EngineBackend
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from tests.tui.helpers import (
    press,
    screen_text,
    settle,
    wait_for_run_end,
    wait_for_screen,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.engine]

SIZE = (80, 24)
# An init that ends by itself: tinybox's /sbin/init execs an interactive shell.
SAY_HELLO = "/bin/sh -c 'echo hello from PID $$; echo running $(cat /proc/1/comm)'"


def make(tmp_path: Path, **backend: Any) -> DbootApp:
    engine = EngineBackend(state_dir=tmp_path / "state", **backend)
    return create_app(engine, rehearse_only=True, blink=False)


async def pick_tinybox(pilot: Pilot[Any]) -> None:
    app = pilot.app
    await wait_until(pilot, lambda: "tinybox" in screen_text(app), 30, "the image list")
    await press(pilot, "slash", *"tinybox:latest", "enter")
    await wait_until(pilot, lambda: "history" in screen_text(app), 30, "tinybox's details")
    await press(pilot, "enter")
    await wait_for_screen(pilot, InitScreen)
    field = app.screen.query_one("#init-argv", Input)
    await wait_until(pilot, lambda: field.value != "", 30, "the suggested init")


async def test_images_init_and_resources_come_from_the_engine(tmp_path: Path) -> None:
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        assert app.screen.query_one("#init-argv", Input).value == "/sbin/init"
        await wait_until(pilot, lambda: "is an executable" in screen_text(app), 30, "validation")
        await press(pilot, "enter")
        await wait_for_screen(pilot, ResourcesScreen)
        await wait_until(pilot, lambda: app.wizard.choices.report is not None, 60, "the report")
        await settle(pilot)
        text = screen_text(app)
        assert "image in RAM (estimate)" in text
        report = app.wizard.choices.report
        assert report is not None and 1 << 20 < report.ram.estimated_bytes < 16 << 20
        assert not app.screen.query_one("#nav-next", Button).disabled
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        assert "processes in" in screen_text(app)


async def test_ram_blocker_from_a_tiny_mem_available(tmp_path: Path) -> None:
    app = make(tmp_path, mem_available=1 << 20)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        await wait_until(pilot, lambda: "is an executable" in screen_text(app), 30, "validation")
        await press(pilot, "enter")
        await wait_for_screen(pilot, ResourcesScreen)
        await wait_until(pilot, lambda: app.wizard.choices.report is not None, 60, "the report")
        await settle(pilot)
        assert app.screen.query_one("#nav-next", Button).disabled
        assert "blocked:" in screen_text(app)
        assert [n.code for n in app.wizard.choices.rehearsal_blockers if n.code.startswith("ram")]
        await press(pilot, "enter", "n")
        assert isinstance(app.screen, ResourcesScreen)


@pytest.mark.timeout(300)
async def test_a_whole_rehearsal_through_the_wizard(tmp_path: Path) -> None:
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        app.screen.query_one("#init-argv", Input).value = SAY_HELLO
        await wait_until(pilot, lambda: "is an executable" in screen_text(app), 30, "validation")
        await press(pilot, "enter")
        await wait_for_screen(pilot, ResourcesScreen)
        await wait_until(pilot, lambda: app.wizard.choices.report is not None, 60, "the report")
        await settle(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        assert app.screen.query_one("#confirm-switch", Button).disabled
        await press(pilot, "tab", "enter")  # Cancel -> Rehearse
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 240)
        console = app.screen.query_one("#run-console", RichLog)
        said = "\n".join(strip.text.rstrip() for strip in console.lines)
        log = "\n".join(
            strip.text.rstrip() for strip in app.screen.query_one("#run-log", RichLog).lines
        )
        assert "hello from PID 1" in said, said + "\n---\n" + log
        assert "running sh" in said, said
        assert "exit status 0" in said, said
        assert "wait4" in log or "Stopped in" in screen_text(app)
    # Nothing left behind: the state dir's RAM root is not mounted anywhere we can see.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path / "state") not in mounts


async def test_an_engine_that_does_not_answer_gets_the_how_to_start_it_screen(
    tmp_path: Path,
) -> None:
    # A real client against a socket nobody listens on: the real "engine down" path.
    app = make(tmp_path, docker_host=f"unix://{tmp_path}/no-engine.sock")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "does not answer" in screen_text(app), 30, "engine down")
        text = screen_text(app)
        assert "systemctl start docker" in text
        assert app.screen.query_one("#nav-next", Button).disabled
