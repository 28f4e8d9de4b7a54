"""The Options step and the equivalent command line (issue 11 §4), with the fake engine and
with the real one; the Processes step's Enter on an empty table; the step titles at 80x24."""

from __future__ import annotations

import io
import logging
import shlex
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text
from textual.pilot import Pilot
from textual.widgets import Button, Checkbox, Input, RadioButton, Static

from app.cli import parse_command_line, switch_options
from app.tui.app import DbootApp, create_app
from app.tui.backend import EngineBackend, RunOptions, RunRequest
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.options import CHOOSE_REVERT, OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.run_panels import StepList
from app.tui.wizard import STEP_TITLES
from tests.tui.fakes import FakeBackend, SteppingClock
from tests.tui.helpers import (
    press,
    run_from_ram,
    screen_text,
    settle,
    take_the_options,
    wait_for_run_end,
    wait_for_screen,
    wait_until,
)
from tests.tui.test_engine import pick_tinybox, reach_the_report
from tests.tui.test_walk import to_options, to_processes, to_tinybox

SIZE = (80, 24)


def make(backend: FakeBackend | None = None, *, rehearse_only: bool = True) -> DbootApp:
    return create_app(
        backend or FakeBackend(), rehearse_only=rehearse_only, clock=SteppingClock(), blink=False
    )


def flat(text: str) -> str:
    """Screen text with its wrapped lines joined: every run of blanks one space."""
    return " ".join(text.split())


def command_shown(app: DbootApp) -> str:
    """The command line the Options step shows: its text, found on the screen too."""
    content = app.screen.query_one("#options-command", Static).content
    line = content.plain if isinstance(content, Text) else str(content)
    assert flat(line) in flat(screen_text(app)), line
    return line


async def set_field(pilot: Pilot[Any], field_id: str, value: str) -> None:
    """Type into an Options field as a person would: focus it, clear it, type, no Enter."""
    field = pilot.app.screen.query_one(field_id, Input)
    field.focus()
    field.value = ""
    await press(pilot, *value)


async def test_changed_options_reach_the_command_line_the_modal_and_the_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="app.tui.screens.confirm")
    backend = FakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        assert command_shown(app) == "dboot rehearse tinybox:latest /sbin/init"
        await set_field(pilot, "#opt-grace", "5")
        await set_field(pilot, "#opt-tmpfs", "512M")
        app.screen.query_one("#opt-modules", Checkbox).focus()
        await press(pilot, "space")  # unticks it
        expected = (
            "dboot rehearse --grace 5 --tmpfs-size 512M --no-modules tinybox:latest /sbin/init"
        )
        assert command_shown(app) == expected
        app.screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and confirm.command_line == expected
        assert "dboot rehearse --grace 5 --tmpfs-size 512M --no-modules" in screen_text(app)
        # The wizard's log keeps it, for a terminal that does not take OSC 52 copies.
        assert f"equivalent command line: {expected}" in caplog.text
        await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    chosen = RunOptions(grace=5.0, tmpfs_size="512M", modules=False)
    assert backend.requests == [
        RunRequest("tinybox:latest", ["/sbin/init"], rehearse=True, options=chosen)
    ]
    engine = backend.switch_options(backend.requests[0])
    assert (engine.grace, engine.tmpfs_size, engine.modules) == (5.0, 512 << 20, False)


@pytest.mark.parametrize(
    ("field_id", "value", "message"),
    [
        (
            "#opt-grace",
            "900",
            "grace period 900 s is not between 0 and 600 s: give --grace in seconds, from 0 to 600",
        ),
        ("#opt-grace", "soon", "grace period 'soon' is not a number: give seconds, e.g. 5"),
        (
            "#opt-tmpfs",
            "lots",
            "size 'lots' is not understood: write e.g. 1048576, 512M or 2G",
        ),
        ("#opt-tmpfs", "0M", "size '0M' is zero: give a positive size such as 512M"),
    ],
)
async def test_a_value_the_engine_refuses_is_shown_with_its_message_and_blocks_next(
    field_id: str, value: str, message: str
) -> None:
    backend = FakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        await set_field(pilot, field_id, value)
        assert "✗ " + message in flat(screen_text(app))
        assert app.screen.query_one("#nav-next", Button).disabled
        await press(pilot, "enter")
        app.screen.set_focus(None)
        await press(pilot, "n")
        assert isinstance(app.screen, OptionsScreen)
        await set_field(pilot, field_id, "7" if field_id == "#opt-grace" else "1G")
        assert not app.screen.query_one("#nav-next", Button).disabled
        assert message not in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
    assert backend.requests == []


async def test_a_remote_switch_asks_for_the_revert_timer_and_names_it_on_the_command_line() -> None:
    # Fake engine with lab mode off: nothing can switch here. The fake's session is remote.
    backend = FakeBackend(lab=False)
    app = make(backend, rehearse_only=False)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        assert CHOOSE_REVERT in screen_text(app)
        assert "nothing to revert to" in screen_text(app)
        assert app.screen.query_one("#nav-next", Button).disabled
        await press(pilot, "enter")
        assert isinstance(app.screen, OptionsScreen)
        app.screen.query_one("#revert-off", RadioButton).value = True
        await settle(pilot)
        assert command_shown(app) == "dboot switch --no-revert tinybox:latest /sbin/init"
        app.screen.query_one("#revert-on", RadioButton).value = True
        await set_field(pilot, "#opt-revert-minutes", "30")
        app.screen.query_one("#opt-carry", Checkbox).value = False
        await settle(pilot)
        line = "dboot switch --no-carry --revert-after 30 tinybox:latest /sbin/init"
        assert command_shown(app) == line
        await set_field(pilot, "#opt-revert-minutes", "0.5")
        assert "revert timer 0.5 min is too short" in screen_text(app)
        assert app.screen.query_one("#nav-next", Button).disabled
        await set_field(pilot, "#opt-revert-minutes", "30")
        app.screen.set_focus(None)
        await press(pilot, "enter")
        await run_from_ram(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *"labhost", "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    chosen = RunOptions(carry=False, revert_after=30.0)
    assert backend.requests == [
        RunRequest("tinybox:latest", ["/sbin/init"], rehearse=False, options=chosen)
    ]


async def test_a_rehearsal_shows_the_real_switch_options_as_such_and_leaves_them_out() -> None:
    app = make(FakeBackend())
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        for option in ("#opt-carry", "#opt-ssh", "#opt-revert", "#opt-revert-minutes"):
            assert app.screen.query_one(option).disabled, option
        assert flat(screen_text(app)).count("(real switch only)") >= 3
        # Not asked in a rehearsal: Next is on with the defaults.
        assert not app.screen.query_one("#nav-next", Button).disabled
        assert "The same rehearsal from a shell" in screen_text(app)


def teaching_in_the_line(line: str) -> bool:
    """What `dboot` itself makes of the line, pasted into a shell: a run that teaches?"""
    parsed = switch_options(parse_command_line(shlex.split(line)[1:]), io.StringIO())
    return parsed.pause is not None


async def test_a_teaching_wizard_says_teach_on_its_command_line() -> None:
    # Issue 20: `dboot-tui --teach` rehearses step by step; the line that replays the run says
    # so, and reads back through dboot's own parser as a run that pauses.
    backend = FakeBackend()
    app = make(backend)
    app.wizard.teach = True
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        line = command_shown(app)
        assert line == "dboot rehearse --teach tinybox:latest /sbin/init"
        assert teaching_in_the_line(line)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen) and confirm.command_line == line
        assert line in flat(screen_text(app))
        await press(pilot, "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert [request.pause is not None for request in backend.requests] == [True]


async def test_f7_on_the_run_screen_reaches_the_next_runs_command_line() -> None:
    backend = FakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        assert command_shown(app) == "dboot rehearse tinybox:latest /sbin/init"
        await press(pilot, "enter", "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        await press(pilot, "f7")  # teaching on, for the next rehearsal
        await press(pilot, "b")
        await wait_for_screen(pilot, InitScreen)
        for step in (ResourcesScreen, ProcessesScreen, OptionsScreen):
            await press(pilot, "enter")
            await wait_for_screen(pilot, step)
        line = command_shown(app)
        assert line == "dboot rehearse --teach tinybox:latest /sbin/init"
        assert teaching_in_the_line(line)
        await press(pilot, "enter", "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        await press(pilot, "f7", "r")  # off again: "rehearse again" does not pause
        await wait_until(pilot, lambda: len(backend.requests) == 3, 10, "the third run")
        await wait_for_run_end(pilot, 10)
    assert [request.pause is not None for request in backend.requests] == [False, True, False]


async def test_a_real_switch_never_teaches_so_its_line_says_no_teach() -> None:
    backend = FakeBackend(lab=False, target_pid=4242)
    app = make(backend, rehearse_only=False)
    app.wizard.teach = True
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        line = command_shown(app)
        assert line == "dboot switch --target-pid 4242 tinybox:latest /sbin/init"
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, "ctrl+r")  # the rehearsal it also offers does teach
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert [(r.rehearse, r.pause is not None) for r in backend.requests] == [(True, True)]


async def test_enter_on_an_option_goes_on_and_space_toggles_it() -> None:
    # Issue 20: the nav line says "Enter: confirm"; Enter on a focused option used to toggle
    # it instead (a run changed without a word). Space toggles; Enter confirms.
    backend = FakeBackend(lab=False)
    app = make(backend, rehearse_only=False)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        modules = app.screen.query_one("#opt-modules", Checkbox)
        modules.focus()
        await press(pilot, "space")
        assert modules.value is False
        await press(pilot, "space")
        assert modules.value is True
        revert = app.screen.query_one("#opt-revert")
        revert.focus()
        await press(pilot, "space")  # presses the highlighted choice: on
        assert app.screen.query_one("#revert-on", RadioButton).value
        await press(pilot, "enter")
        await run_from_ram(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen)
        # Modules as they were (Enter toggled nothing), the timer Space pressed on.
        assert confirm.command_line == "dboot switch --revert-after 10 tinybox:latest /sbin/init"
    assert backend.requests == []


async def test_target_pid_is_on_the_switch_command_line() -> None:
    backend = FakeBackend(lab=False, target_pid=4242)
    app = make(backend, rehearse_only=False)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        # A namespace's PID 1, not this machine's: no timer by default, nothing to choose.
        assert not app.screen.query_one("#nav-next", Button).disabled
        assert command_shown(app) == "dboot switch --target-pid 4242 tinybox:latest /sbin/init"


LONG_INIT = (
    "/bin/sh -c 'echo the new system is up, and the old userspace is gone; "
    "echo its disk may be wiped and partitioned again; exec /bin/sh'"
)


async def test_a_long_command_line_leaves_the_modal_usable_at_80x24() -> None:
    backend = FakeBackend(lab=False, target_pid=123456)
    app = make(backend, rehearse_only=False)
    async with app.run_test(size=SIZE) as pilot:
        await to_tinybox(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, InitScreen)
        app.screen.query_one("#init-argv", Input).value = LONG_INIT
        await settle(pilot)
        for step in (ResourcesScreen, ProcessesScreen, OptionsScreen):
            await press(pilot, "enter")
            await wait_for_screen(pilot, step)
        screen = app.screen
        screen.query_one("#opt-grace", Input).value = "12.5"
        screen.query_one("#opt-tmpfs", Input).value = "1536M"
        for box in ("#opt-api", "#opt-modules", "#opt-carry"):
            screen.query_one(box, Checkbox).value = False
        screen.query_one("#revert-on", RadioButton).value = True
        screen.query_one("#opt-revert-minutes", Input).value = "45"
        await settle(pilot)
        screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        confirm = app.screen
        assert isinstance(confirm, ConfirmScreen)
        assert confirm.command_line == (
            "dboot switch --grace 12.5 --tmpfs-size 1536M --no-api-mounts --no-modules "
            "--no-carry --revert-after 45 --target-pid 123456 tinybox:latest " + LONG_INIT
        )
        text = screen_text(app)
        for seen in ("type the hostname labhost", "Cancel", "Rehearse", "Switch"):
            assert seen in text, text
        await press(pilot, *"labhost", "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert [request.options.revert_after for request in backend.requests] == [45.0]


async def test_enter_on_an_empty_processes_table_moves_on() -> None:
    app = make(FakeBackend(processes=[]))
    async with app.run_test(size=SIZE) as pilot:
        await to_processes(pilot)
        assert "No process to stop" in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, OptionsScreen)


async def test_every_steps_title_fits_at_80_columns_and_a_narrow_one_keeps_its_own() -> None:
    # Seven steps: a real switch with no Destination step (--target-pid's is a namespace's).
    # The eight of a wizard that may install: tests/tui/test_destination.py.
    app = make(FakeBackend(lab=False, target_pid=4242), rehearse_only=False)
    titles = app.wizard.step_titles
    assert len(titles) == len(STEP_TITLES) - 1
    full = " › ".join(f"{number} {title}" for number, title in enumerate(titles, 1))
    async with app.run_test(size=SIZE) as pilot:
        shown: list[str] = []
        await to_processes(pilot)
        shown.append(screen_text(app).splitlines()[1])
        await press(pilot, "enter")
        await wait_for_screen(pilot, OptionsScreen)
        shown.append(screen_text(app).splitlines()[1])
        await take_the_options(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *"labhost", "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        shown.append(screen_text(app).splitlines()[1])
        for line in shown:
            # The highlight pads the current title with a space each side.
            assert " ".join(line.split()) == full, line
        await pilot.resize_terminal(60, 24)
        await settle(pilot)
        narrow = screen_text(app).splitlines()[1]
        assert "7 Run" in narrow and "1 › 2 › 3" in narrow, narrow


# --- the real engine ---------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.engine
@pytest.mark.usefixtures("tinybox")
@pytest.mark.timeout(300)
async def test_the_real_engine_judges_the_options_and_runs_with_them(tmp_path: Path) -> None:
    engine = EngineBackend(state_dir=tmp_path / "state")
    app = create_app(engine, rehearse_only=True, blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        app.screen.query_one("#init-argv", Input).value = "/bin/sh -c 'echo options-ok'"
        await reach_the_report(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, OptionsScreen)
        await set_field(pilot, "#opt-grace", "-1")
        assert "grace period -1 s is not between 0 and 600 s" in screen_text(app)
        await set_field(pilot, "#opt-grace", "0.5")
        await set_field(pilot, "#opt-tmpfs", "48M")
        app.screen.query_one("#opt-api", Checkbox).value = False
        await settle(pilot)
        line = command_shown(app)
        # dboot's own parser reads the line back as the options the wizard runs with.
        words = shlex.split(line)
        from_the_cli = switch_options(parse_command_line(words[1:]), io.StringIO())
        request = app.wizard.request(rehearse=True)
        from_the_wizard = engine.switch_options(request)
        for name in ("image", "init_argv", "state_dir", "grace", "tmpfs_size", "api_mounts"):
            assert getattr(from_the_cli, name) == getattr(from_the_wizard, name), name
        assert (from_the_cli.grace, from_the_cli.tmpfs_size) == (0.5, 48 << 20)
        assert from_the_cli.api_mounts is False
        app.screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
        await wait_for_screen(pilot, RunScreen)
        # The engine's copy step names the tmpfs size the Options step chose.
        copy_step = "Copying the image into a 48 MiB tmpfs"
        await wait_until(pilot, lambda: copy_step in step_titles(app), 120, "the copy step")
        await wait_until(pilot, lambda: not app.run_in_progress(), 240, "the run's end")
    assert str(tmp_path / "state") not in Path("/proc/self/mountinfo").read_text()


def step_titles(app: DbootApp) -> str:
    """The engine's step titles as the Run screen lists them."""
    return " | ".join(line.title for line in app.screen.query_one(StepList).steps.values())
