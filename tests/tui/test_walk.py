"""Pilot walks through the wizard with the fake engine: every path a user can take."""

from __future__ import annotations

import sys
import threading
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, DataTable, Input, RichLog

from app.tui.app import DbootApp, create_app
from app.tui.backend import EngineBackend, RunOptions, RunRequest
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.destination import DestinationScreen
from app.tui.screens.images import ImagesScreen, OpenFileScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from injector.errors import SafetyRefusal
from injector.events import Notice
from injector.image.sources import ImageSummary
from injector.preflight.preflight import Report
from tests.tui.fakes import HOSTNAME, IMAGES, FakeBackend, MiB, SteppingClock
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

SIZE = (80, 24)
# A real switch from the fake's remote session: the walks turn the revert timer on (its
# default minutes), as the Options step asks them to choose.
REVERT_ON = RunOptions(revert_after=10.0)


def make(backend: FakeBackend | None = None, *, rehearse_only: bool = True) -> DbootApp:
    return create_app(
        backend or FakeBackend(), rehearse_only=rehearse_only, clock=SteppingClock(), blink=False
    )


async def to_tinybox(pilot) -> None:
    """Filter the image list down to tinybox, as a user would with `/` (the filter keeps the
    focus: Enter there continues with it)."""
    await settle(pilot)
    await press(pilot, "slash", *"tinybox")
    assert pilot.app.screen.selected == "tinybox:latest"


async def to_processes(pilot) -> None:
    await to_tinybox(pilot)
    await press(pilot, "enter")  # Images -> Init
    await wait_for_screen(pilot, InitScreen)
    await press(pilot, "enter")  # Init -> Resources
    await wait_for_screen(pilot, ResourcesScreen)
    await press(pilot, "enter")  # Resources -> Processes
    await wait_for_screen(pilot, ProcessesScreen)


async def to_options(pilot) -> None:
    await to_processes(pilot)
    await press(pilot, "enter")  # Processes -> Options
    await wait_for_screen(pilot, OptionsScreen)


async def test_whole_walk_ends_with_the_rehearsals_console_and_status() -> None:
    backend = FakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_tinybox(pilot)
        assert "tinybox:latest, tinybox:demo" in screen_text(app)  # the detail pane
        await press(pilot, "enter")
        await wait_for_screen(pilot, InitScreen)
        assert app.screen.query_one("#init-argv", Input).value == "/sbin/init"
        await press(pilot, "enter")
        await wait_for_screen(pilot, ResourcesScreen)
        assert "remains for the new system" in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        assert "8 processes in 5 services" in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, OptionsScreen)
        assert "dboot rehearse tinybox:latest /sbin/init" in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        # Rehearse-only: Rehearse has the focus, and Enter rehearses (issue 20).
        assert app.focused is not None and app.focused.id == "confirm-rehearse"
        assert "Enter rehearses; Escape cancels." in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        text = screen_text(app)
        assert "tinybox: hello from PID 1" in text
        assert "exit status 0" in text
        assert "stopped in wait4" in text.lower().replace("\n", " ") or "wait4" in text
    assert backend.requests == [RunRequest("tinybox:latest", ["/sbin/init"], rehearse=True)]


async def test_escape_goes_back_one_step_and_keeps_the_choices() -> None:
    app = make()
    async with app.run_test(size=SIZE) as pilot:
        await to_processes(pilot)
        await press(pilot, "escape")
        await wait_for_screen(pilot, ResourcesScreen)
        await press(pilot, "escape")
        await wait_for_screen(pilot, InitScreen)
        field = app.screen.query_one("#init-argv", Input)
        assert field.value == "/sbin/init"
        await press(pilot, "escape")
        await wait_for_screen(pilot, ImagesScreen)
        table = app.screen.query_one("#images", DataTable)
        assert (
            table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value == "tinybox:latest"
        )
        # Escape on the first step has nowhere to go (it only closes the filter).
        await press(pilot, "escape", "escape")
        assert isinstance(app.screen, ImagesScreen)


async def test_cancel_in_confirm_returns_to_options_and_runs_nothing() -> None:
    backend = FakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, "shift+tab", "enter")  # Rehearse has the focus; Cancel is before it
        await wait_for_screen(pilot, OptionsScreen)
        await press(pilot, "n")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, "escape")
        await wait_for_screen(pilot, OptionsScreen)
    assert backend.requests == []


async def test_back_after_a_run_lands_on_the_init_step() -> None:
    app = make()
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        await press(pilot, "enter", "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        await press(pilot, "b")
        await wait_for_screen(pilot, InitScreen)


async def test_leaving_is_refused_while_a_run_is_in_flight() -> None:
    hold = threading.Event()
    app = make(FakeBackend(hold=hold))
    async with app.run_test(size=SIZE) as pilot:
        try:
            await to_options(pilot)
            await press(pilot, "enter", "enter")
            await wait_for_screen(pilot, RunScreen)
            await wait_until(pilot, lambda: "wait4" in screen_text(app), 10, "the injection")
            await press(pilot, "q", "b", "escape")
            assert isinstance(app.screen, RunScreen) and app.is_running
            assert app.screen.query_one("#nav-next", Button).disabled
        finally:
            hold.set()
        await wait_for_run_end(pilot, 10)
        await press(pilot, "q")
    assert app.return_code == 0


async def test_engine_down_says_how_to_start_it_and_blocks_next() -> None:
    app = make(FakeBackend(engine_down="Docker engine at unix:///var/run/docker.sock is down"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        text = screen_text(app)
        assert "The Docker engine does not answer." in text
        assert "systemctl start docker" in text
        assert "dockerd" in text
        assert app.screen.query_one("#nav-next", Button).disabled
        await press(pilot, "enter", "n")
        assert isinstance(app.screen, ImagesScreen)


async def test_a_docker_archive_can_be_opened_when_the_engine_is_down() -> None:
    backend = FakeBackend(engine_down="the engine is down")
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await press(pilot, "o")
        await wait_for_screen(pilot, OpenFileScreen)
        field = app.screen.query_one(Input)
        field.value = "docker-archive:/srv/images/rescue.tar"
        await press(pilot, "enter")
        await the_rescue_archive_opens(pilot, app)


async def test_ram_blocker_disables_next_and_says_why() -> None:
    app = make(FakeBackend(mem_available=16 * MiB))
    async with app.run_test(size=SIZE) as pilot:
        await to_tinybox(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, InitScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ResourcesScreen)
        await settle(pilot)
        assert app.screen.query_one("#nav-next", Button).disabled
        assert "blocked: the image needs 66.0 MiB of RAM" in screen_text(app)
        await press(pilot, "n", "enter")
        assert isinstance(app.screen, ResourcesScreen)


async def test_an_init_missing_from_the_image_blocks_next() -> None:
    app = make()
    async with app.run_test(size=SIZE) as pilot:
        await to_tinybox(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, InitScreen)
        field = app.screen.query_one("#init-argv", Input)
        field.value = "/sbin/nonesuch --verbose"
        await settle(pilot)
        assert "/sbin/nonesuch is not an executable in tinybox:latest" in screen_text(app)
        await press(pilot, "enter")
        assert isinstance(app.screen, InitScreen)
        field.value = "/bin/sh -c 'echo hi'"
        await settle(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ResourcesScreen)
        assert app.wizard.choices.init_argv == ["/bin/sh", "-c", "echo hi"]


async def test_rehearse_only_mode_offers_no_switch_and_says_why() -> None:
    app = make(FakeBackend(lab=False), rehearse_only=True)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        assert app.screen.query_one("#confirm-switch", Button).disabled
        assert "Switch is off: the wizard was started with --rehearse" in screen_text(app)
        assert not app.screen.query("#confirm-hostname")


async def test_switch_needs_the_typed_hostname() -> None:
    # Fake engine, lab mode off: this only checks the modal; nothing here can switch.
    backend = FakeBackend(lab=False)
    app = make(backend, rehearse_only=False)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        await take_the_options(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        switch = app.screen.query_one("#confirm-switch", Button)
        hostname = app.screen.query_one("#confirm-hostname", Input)
        hostname.value = "not-" + HOSTNAME
        await settle(pilot)
        assert switch.disabled
        hostname.value = HOSTNAME
        await settle(pilot)
        assert not switch.disabled
        switch.press()
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        console = app.screen.query_one("#run-console", RichLog)
        said = " ".join(strip.text.strip() for strip in console.lines)
        assert "this terminal closes" in said and "VT 3" in said and "/sbin/init" in said
    assert backend.requests == [
        RunRequest("tinybox:latest", ["/sbin/init"], rehearse=False, options=REVERT_ON)
    ]


def test_engine_backend_refuses_a_real_switch_in_lab_mode() -> None:
    # tests/conftest.py sets DBOOT_REHEARSAL_ONLY=1: the wizard's own guard must refuse
    # before the engine is even asked.
    backend = EngineBackend()
    assert backend.lab_mode()
    run = backend.run(RunRequest("tinybox:latest", ["/sbin/init"], rehearse=False), print)
    with pytest.raises(SafetyRefusal, match="lab mode"):
        next(iter(run))


async def test_a_missing_engine_module_is_shown_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates a broken install (mocked: the module exists here): the wizard must still
    # start and say what is wrong instead of dying with a traceback.
    import injector.image

    monkeypatch.setitem(sys.modules, "injector.image.sources", None)
    monkeypatch.delattr(injector.image, "sources", raising=False)
    app = create_app(EngineBackend(), rehearse_only=True, blink=False)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        text = screen_text(app)
        assert "the engine module injector.image.sources cannot be imported" in text
        assert app.screen.query_one("#nav-next", Button).disabled


# --- issue 13: the real switch's three traps ---------------------------------------------


async def open_file(pilot, path: str) -> None:
    """`o`, then the path typed key by key, as a person would, then Enter."""
    await press(pilot, "o")
    await wait_for_screen(pilot, OpenFileScreen)
    await press(pilot, *path, "enter")


async def test_a_plain_path_in_the_file_dialog_opens_the_archive() -> None:
    backend = FakeBackend(engine_down="the engine is down")
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await open_file(pilot, "/srv/images/rescue.tar")
        await the_rescue_archive_opens(pilot, app)


async def test_the_file_dialog_says_in_one_line_why_a_path_does_not_open() -> None:
    app = make(FakeBackend(engine_down="the engine is down"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await open_file(pilot, "/srv/images/notes.txt")
        assert isinstance(app.screen, OpenFileScreen)
        assert "/srv/images/notes.txt: not a tar archive" in screen_text(app)
        field = app.screen.query_one(Input)
        field.value = ""
        await press(pilot, *"/srv/nowhere.tar", "enter")
        assert isinstance(app.screen, OpenFileScreen)
        assert "cannot read /srv/nowhere.tar (No such file or directory)" in screen_text(app)
        field.value = ""
        await press(pilot, "enter")
        assert "Type the path of an image file first" in screen_text(app)
        await press(pilot, "escape")
        assert isinstance(app.screen, ImagesScreen)


async def to_real_confirm(pilot) -> ConfirmScreen:
    await to_options(pilot)
    await take_the_options(pilot)
    await wait_for_screen(pilot, ConfirmScreen)
    screen = pilot.app.screen
    assert isinstance(screen, ConfirmScreen)
    return screen


def real_switch_app(backend: FakeBackend) -> DbootApp:
    # Fake engine, lab mode off: the modal is under test; nothing here can switch anything.
    return make(backend, rehearse_only=False)


async def test_typing_the_hostname_then_enter_switches() -> None:
    backend = FakeBackend(lab=False)
    app = real_switch_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await to_real_confirm(pilot)
        field = screen.query_one("#confirm-hostname", Input)
        switch = screen.query_one("#confirm-switch", Button)
        assert app.focused is field
        await press(pilot, *HOSTNAME[:-1])
        assert field.value == HOSTNAME[:-1] and switch.disabled
        await press(pilot, HOSTNAME[-1])
        assert not switch.disabled
        assert "Enter switches for real" in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert backend.requests == [
        RunRequest("tinybox:latest", ["/sbin/init"], rehearse=False, options=REVERT_ON)
    ]


async def test_enter_with_a_wrong_hostname_says_what_is_wrong_and_switches_nothing() -> None:
    backend = FakeBackend(lab=False)
    app = real_switch_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await to_real_confirm(pilot)
        field = screen.query_one("#confirm-hostname", Input)
        await press(pilot, "enter")
        assert "Nothing typed: type labhost to switch" in screen_text(app)
        await press(pilot, *"labhots", "enter")
        assert app.screen is screen and field.value == "labhots"
        assert (
            "'labhots' is not labhost: type labhost exactly, or Escape to cancel."
            in screen_text(app)
        )
        assert screen.query_one("#confirm-switch", Button).disabled
        field.value = "LABHOST"
        await press(pilot, "enter")
        assert "'LABHOST' differs in case" in screen_text(app)
        assert app.screen is screen
        # A rehearsal needs no typing: its own key, from the hostname field.
        await press(pilot, "ctrl+r")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert backend.requests == [
        RunRequest("tinybox:latest", ["/sbin/init"], rehearse=True, options=REVERT_ON)
    ]


async def test_where_a_switch_is_possible_ctrl_r_rehearses_and_r_is_typed() -> None:
    # Issue 20: the hostname field keeps the focus (a real switch needs the typed name), and
    # Rehearse has a key of its own that works from the field; the modal names it.
    backend = FakeBackend(lab=False)
    app = real_switch_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await to_real_confirm(pilot)
        field = screen.query_one("#confirm-hostname", Input)
        assert app.focused is field
        assert "^R rehearses, with no typing; Escape cancels." in screen_text(app)
        await press(pilot, "r")  # a letter of a hostname: typed, never a rehearsal
        assert field.value == "r" and app.screen is screen
        await press(pilot, "ctrl+r")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert [request.rehearse for request in backend.requests] == [True]


class SwitchBlocked(FakeBackend):
    """Lab mode off, but a host blocker stops the real switch: only a rehearsal is offered."""

    def blockers(self, report: Report, *, rehearse: bool) -> list[Notice]:
        if rehearse:
            return []
        return [Notice("blocker", "pid1-ptrace", "ptrace of PID 1 is denied", "allow ptrace")]


async def test_when_blockers_leave_only_a_rehearsal_enter_rehearses() -> None:
    backend = SwitchBlocked(lab=False)
    app = make(backend, rehearse_only=False)
    async with app.run_test(size=SIZE) as pilot:
        await to_options(pilot)
        await press(pilot, "enter")
        await run_from_ram(pilot)  # an install needs no ptrace: the Destination step is asked
        await wait_for_screen(pilot, ConfirmScreen)
        assert "Switch is off: ptrace of PID 1 is denied" in screen_text(app)
        assert app.focused is not None and app.focused.id == "confirm-rehearse"
        await press(pilot, "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
    assert [request.rehearse for request in backend.requests] == [True]


async def test_enter_in_the_filter_continues_with_the_image_it_promises() -> None:
    # Issue 20: the nav line says "Enter: continue with X" while the filter has the focus;
    # Enter there takes X (it used to only hand the focus to the list, silently).
    app = make()
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await press(pilot, "slash", *"alpine")
        assert isinstance(app.focused, Input) and app.focused.id == "filter"
        assert "Enter: continue with alpine:3.20" in screen_text(app)
        await press(pilot, "enter")
        await wait_for_screen(pilot, InitScreen)
        assert app.wizard.choices.image == "alpine:3.20"


async def test_the_list_is_newest_first_as_docker_images_and_says_so() -> None:
    # The image just built or pulled is on top; images made together by name; untagged last.
    twins = [
        ImageSummary("zeta", "1", "sha256:" + "e" * 64, 1, "2026-12-01T00:00:00Z"),
        ImageSummary("beta", "1", "sha256:" + "b" * 64, 1, "2026-12-01T00:00:00Z"),
    ]

    class NewerImages(FakeBackend):
        def list_images(self) -> list[ImageSummary]:
            return [*IMAGES, *twins]

    app = make(NewerImages())
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        table = app.screen.query_one("#images", DataTable)
        rows = [str(key.value) for key in table.rows]
        assert rows == [
            "beta:1",
            "zeta:1",
            "tinybox:latest",
            "myapp:2.1",
            "debian:bookworm-slim",
            "alpine:3.20",
            "deadbeefdead",
        ]
        header = screen_text(app).splitlines()[2]
        assert header.split() == ["Repository", "Tag", "Image", "ID", "Size", "Newest", "first"]


async def test_escape_while_typing_the_hostname_cancels() -> None:
    backend = FakeBackend(lab=False)
    app = real_switch_app(backend)
    async with app.run_test(size=SIZE) as pilot:
        screen = await to_real_confirm(pilot)
        await press(pilot, *HOSTNAME)
        assert screen.query_one("#confirm-hostname", Input).value == HOSTNAME
        # Back to the step under the modal: the Destination step, where it may install.
        await press(pilot, "escape")
        await wait_for_screen(pilot, DestinationScreen)
        # Back again: Cancel too, with the mouse's button.
        await press(pilot, "n")
        await wait_for_screen(pilot, ConfirmScreen)
        app.screen.query_one("#confirm-cancel", Button).press()
        await wait_for_screen(pilot, DestinationScreen)
    assert backend.requests == []


async def test_reading_an_archive_shows_bytes_and_an_eta() -> None:
    hold = threading.Event()
    app = make(FakeBackend(engine_down="the engine is down", hold_read=hold))
    async with app.run_test(size=SIZE) as pilot:
        try:
            await settle(pilot)
            await open_file(pilot, "/srv/images/rescue.tar")
            await wait_for_screen(pilot, ImagesScreen)
            await settle(pilot)
            await pilot.press("enter")  # No settle(): it would wait for the held read.
            await wait_for_screen(pilot, InitScreen)
            await wait_until(
                pilot, lambda: "15.5 MiB of 31.0 MiB" in screen_text(app), 10, "read progress"
            )
            assert "Reading the image: 15.5 MiB of 31.0 MiB ·" in screen_text(app)
            assert "ETA" in screen_text(app)
            assert app.screen.query_one("#nav-next", Button).disabled
        finally:
            hold.set()
        await wait_until(pilot, lambda: "is an executable" in screen_text(app), 10, "the init")


async def the_rescue_archive_opens(pilot: Pilot[Any], app: DbootApp) -> None:
    """The fake's rescue archive is listed, and Enter takes it to the Init step by its kind."""
    await wait_for_screen(pilot, ImagesScreen)
    await settle(pilot)
    assert "rescue:1.0" in screen_text(app)
    await press(pilot, "enter")
    await wait_for_screen(pilot, InitScreen)
    assert app.wizard.choices.image == "docker-archive:/srv/images/rescue.tar"
