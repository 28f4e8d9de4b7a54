"""SVG snapshots of every screen at 80x24 with the fake engine and a fixed clock.

Update them with `pytest tests/tui/test_snapshots.py --snapshot-update`, then look at the
changed SVGs before committing them.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any

from textual.pilot import Pilot
from textual.widgets import Checkbox, Input, RadioButton

from app.tui.app import DbootApp, create_app
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.destination import DestinationScreen
from app.tui.screens.images import ImagesScreen, OpenFileScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from tests.tui.fakes import HOSTNAME, FakeBackend, MiB, SteppingClock, sample_stop_plan
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

SnapCompare = Callable[..., bool]
Walk = Callable[[Pilot[Any]], Awaitable[None]]


def make(backend: FakeBackend | None = None, *, rehearse_only: bool = True) -> DbootApp:
    return create_app(
        backend or FakeBackend(), rehearse_only=rehearse_only, clock=SteppingClock(), blink=False
    )


async def images(pilot: Pilot[Any]) -> None:
    await settle(pilot)
    await wait_for_screen(pilot, ImagesScreen)
    await settle(pilot)


async def filtered(pilot: Pilot[Any]) -> None:
    await images(pilot)
    await press(pilot, "slash", *"tiny")


async def init(pilot: Pilot[Any]) -> None:
    await filtered(pilot)
    await press(pilot, "enter")  # in the filter: continue with the one match
    await wait_for_screen(pilot, InitScreen)
    await settle(pilot)


async def resources(pilot: Pilot[Any]) -> None:
    await init(pilot)
    await press(pilot, "enter")
    await wait_for_screen(pilot, ResourcesScreen)
    await settle(pilot)


async def processes(pilot: Pilot[Any]) -> None:
    await resources(pilot)
    await press(pilot, "enter")
    await wait_for_screen(pilot, ProcessesScreen)
    await settle(pilot)


async def options(pilot: Pilot[Any]) -> None:
    await processes(pilot)
    await press(pilot, "enter")
    await wait_for_screen(pilot, OptionsScreen)
    await settle(pilot)


async def confirm(pilot: Pilot[Any]) -> None:
    await options(pilot)
    await take_the_options(pilot)
    await wait_for_screen(pilot, ConfirmScreen)
    await settle(pilot)


async def rehearsing(pilot: Pilot[Any]) -> None:
    await confirm(pilot)
    await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
    await wait_for_screen(pilot, RunScreen)


async def rehearsed(pilot: Pilot[Any]) -> None:
    await rehearsing(pilot)
    app = pilot.app
    assert isinstance(app, DbootApp)
    await wait_for_run_end(pilot, 10)
    await settle(pilot)


def test_images(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=images)


def test_images_filtered(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=filtered)


def test_images_engine_down(snap_compare: SnapCompare) -> None:
    backend = FakeBackend(engine_down="Docker engine at unix:///var/run/docker.sock is down")
    assert snap_compare(make(backend), run_before=images)


def test_open_file_dialog(snap_compare: SnapCompare) -> None:
    async def opening(pilot: Pilot[Any]) -> None:
        await images(pilot)
        await press(pilot, "o")
        await wait_for_screen(pilot, OpenFileScreen)
        await press(pilot, *"/srv/images/rescue.tar")

    assert snap_compare(make(), run_before=opening)


def test_open_file_not_an_archive(snap_compare: SnapCompare) -> None:
    async def refused(pilot: Pilot[Any]) -> None:
        await images(pilot)
        await press(pilot, "o")
        await wait_for_screen(pilot, OpenFileScreen)
        await press(pilot, *"/srv/images/notes.txt", "enter")

    assert snap_compare(make(), run_before=refused)


def test_init_reading_an_archive(snap_compare: SnapCompare) -> None:
    hold = threading.Event()

    async def reading(pilot: Pilot[Any]) -> None:
        await images(pilot)
        await press(pilot, "o")
        await wait_for_screen(pilot, OpenFileScreen)
        await press(pilot, *"/srv/images/rescue.tar", "enter")
        await wait_for_screen(pilot, ImagesScreen)
        await wait_until(pilot, lambda: "rescue:1.0" in screen_text(pilot.app), 10, "the file")
        await pilot.press("enter")  # No settle(): it would wait for the held read.
        await wait_for_screen(pilot, InitScreen)
        text = "15.5 MiB of 31.0 MiB"
        await wait_until(pilot, lambda: text in screen_text(pilot.app), 10, "read progress")

    try:
        assert snap_compare(make(FakeBackend(hold_read=hold)), run_before=reading)
    finally:
        hold.set()


def test_init(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=init)


def test_init_not_in_the_image(snap_compare: SnapCompare) -> None:
    async def wrong(pilot: Pilot[Any]) -> None:
        await init(pilot)
        pilot.app.screen.query_one("#init-argv", Input).value = "/usr/lib/systemd/systemd"
        await settle(pilot)

    assert snap_compare(make(), run_before=wrong)


def test_resources(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=resources)


def test_resources_ram_blocker(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(FakeBackend(mem_available=16 * MiB)), run_before=resources)


def test_processes(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=processes)


def test_processes_in_the_graceful_stops_order(snap_compare: SnapCompare) -> None:
    # Issue 19: what the init stops first, in its order, then what it keeps, then the rest.
    assert snap_compare(make(FakeBackend(stop_plan=sample_stop_plan())), run_before=processes)


def test_options(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=options)


def test_options_real_switch_asks_for_the_revert_timer(snap_compare: SnapCompare) -> None:
    # Fake engine, lab mode off, a remote session: the revert timer is the user's choice.
    assert snap_compare(real_switch(), run_before=options)


def test_options_changed_with_an_engine_refusal(snap_compare: SnapCompare) -> None:
    async def changed(pilot: Pilot[Any]) -> None:
        await options(pilot)
        screen = pilot.app.screen
        screen.query_one("#opt-modules", Checkbox).value = False
        screen.query_one("#opt-tmpfs", Input).value = "512M"
        screen.query_one("#opt-grace", Input).value = "900"
        await settle(pilot)

    assert snap_compare(make(), run_before=changed)


def test_confirm_switch_with_its_command_line(snap_compare: SnapCompare) -> None:
    async def chosen(pilot: Pilot[Any]) -> None:
        await options(pilot)
        screen = pilot.app.screen
        screen.query_one("#revert-on", RadioButton).value = True
        screen.query_one("#opt-revert-minutes", Input).value = "30"
        screen.query_one("#opt-grace", Input).value = "10"
        screen.query_one("#opt-carry", Checkbox).value = False
        await settle(pilot)
        screen.set_focus(None)
        await press(pilot, "enter")
        await run_from_ram(pilot)
        await wait_for_screen(pilot, ConfirmScreen)
        await settle(pilot)

    assert snap_compare(real_switch(), run_before=chosen)


def test_confirm_rehearse_only(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=confirm)


# The real-switch modal in each state. Fake engine with lab mode off: only the modal is
# under test, nothing can switch.
def real_switch() -> DbootApp:
    return make(FakeBackend(lab=False), rehearse_only=False)


def test_confirm_switch_empty(snap_compare: SnapCompare) -> None:
    assert snap_compare(real_switch(), run_before=confirm)


def test_confirm_switch_wrong_hostname(snap_compare: SnapCompare) -> None:
    async def wrong(pilot: Pilot[Any]) -> None:
        await confirm(pilot)
        await press(pilot, *"labhots", "enter")

    assert snap_compare(real_switch(), run_before=wrong)


def test_confirm_switch_typed(snap_compare: SnapCompare) -> None:
    async def typed(pilot: Pilot[Any]) -> None:
        await confirm(pilot)
        await press(pilot, *HOSTNAME)

    assert snap_compare(real_switch(), run_before=typed)


# The Destination step (issue 17 §1), in a wizard that may install: lab mode off on the fake
# engine, whose boot chain is fixed data. Nothing is installed.
async def destination(pilot: Pilot[Any]) -> None:
    await options(pilot)
    pilot.app.screen.query_one("#revert-off", RadioButton).value = True  # the switch's timer
    await settle(pilot)
    pilot.app.screen.set_focus(None)
    await press(pilot, "enter")
    await wait_for_screen(pilot, DestinationScreen)
    await settle(pilot)


async def install_chosen(pilot: Pilot[Any]) -> None:
    await destination(pilot)
    await press(pilot, "down", "space")
    pilot.app.screen.query_one("#install-revert-on", RadioButton).value = True
    await settle(pilot)


def test_destination_run_from_ram(snap_compare: SnapCompare) -> None:
    assert snap_compare(real_switch(), run_before=destination)


def test_destination_install(snap_compare: SnapCompare) -> None:
    assert snap_compare(real_switch(), run_before=install_chosen)


def test_confirm_install(snap_compare: SnapCompare) -> None:
    async def confirming(pilot: Pilot[Any]) -> None:
        await install_chosen(pilot)
        pilot.app.screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *HOSTNAME)

    assert snap_compare(real_switch(), run_before=confirming)


def test_run_installed(snap_compare: SnapCompare) -> None:
    async def installed(pilot: Pilot[Any]) -> None:
        await install_chosen(pilot)
        pilot.app.screen.set_focus(None)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, *HOSTNAME, "enter")
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        await settle(pilot)

    backend = FakeBackend(lab=False)
    assert snap_compare(make(backend, rehearse_only=False), run_before=installed)
    assert [request.install is not None for request in backend.requests] == [True]


def test_run_in_flight(snap_compare: SnapCompare) -> None:
    hold = threading.Event()

    async def injected(pilot: Pilot[Any]) -> None:
        await rehearsing(pilot)
        await wait_until(pilot, lambda: "wait4" in screen_text(pilot.app), 10, "the injection")
        await settle(pilot)

    try:
        assert snap_compare(make(FakeBackend(hold=hold)), run_before=injected)
    finally:
        hold.set()


def test_run_rehearsed(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(), run_before=rehearsed)


def test_run_real_switch_last_words(snap_compare: SnapCompare) -> None:
    async def switched(pilot: Pilot[Any]) -> None:
        await confirm(pilot)
        await press(pilot, *HOSTNAME, "enter")  # typed into the focused field
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 10)
        await settle(pilot)

    backend = FakeBackend(lab=False)
    assert snap_compare(make(backend, rehearse_only=False), run_before=switched)
    assert [request.rehearse for request in backend.requests] == [False]
