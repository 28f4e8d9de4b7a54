"""Driving the wizard in tests: wait for workers, read the screen as text, walk the steps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from textual.app import App
from textual.pilot import Pilot
from textual.screen import Screen
from textual.widgets import RadioButton, RadioSet

from app.tui.screens.destination import DestinationScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.run import RunScreen


def screen_text(app: App[Any]) -> str:
    """What the terminal shows now, one line per row (styles dropped)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def settle(pilot: Pilot[Any], delay: float = 0.05) -> None:
    """Let workers answer and the screen re-render."""
    await pilot.pause(delay)
    # Not the wizard's own loop (it never ends) nor a run (a test may be holding it).
    asking = [w for w in pilot.app.workers if w.group not in ("wizard", "run")]
    if asking:  # An empty list would mean "all of them" to wait_for_complete.
        await pilot.app.workers.wait_for_complete(asking)
    await pilot.pause(delay)


async def wait_until(
    pilot: Pilot[Any], condition: Callable[[], bool], timeout: float, what: str
) -> None:
    """Poll (while the app keeps running) until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            shown = screen_text(pilot.app)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{shown}")
        await asyncio.sleep(0.05)
    await pilot.pause(0.05)


async def wait_for_screen(pilot: Pilot[Any], kind: type[Screen[Any]], timeout: float = 10) -> None:
    await wait_until(pilot, lambda: isinstance(pilot.app.screen, kind), timeout, kind.__name__)


async def press(pilot: Pilot[Any], *keys: str) -> None:
    for key in keys:
        await pilot.press(key)
        await settle(pilot)


def run_ended(app: App[Any]) -> bool:
    """The Run screen is showing and the engine's iterator has finished."""
    screen = app.screen
    return isinstance(screen, RunScreen) and not screen.running


async def wait_for_run_end(pilot: Pilot[Any], timeout: float = 10) -> None:
    await wait_until(pilot, lambda: run_ended(pilot.app), timeout, "the run to end")


async def take_the_options(pilot: Pilot[Any]) -> None:
    """On the Options step: keep the defaults, turning the revert timer on where the engine
    asks for a choice (a remote session's real switch), then Enter; and where the wizard
    asks for the destination next, keep running from RAM."""
    if pilot.app.screen.query_one("#opt-revert", RadioSet).pressed_button is None:
        pilot.app.screen.query_one("#revert-on", RadioButton).value = True
        await settle(pilot)
    await press(pilot, "enter")
    await run_from_ram(pilot)


async def run_from_ram(pilot: Pilot[Any]) -> None:
    """Just after Enter on the Options step: where the Destination step follows (a wizard
    that may install on this machine), keep its default, Run from RAM, with Enter."""
    app = pilot.app
    await wait_until(pilot, lambda: not isinstance(app.screen, OptionsScreen), 10, "Next")
    if isinstance(app.screen, DestinationScreen):
        assert app.screen.query_one("#dest-ram", RadioButton).value
        await press(pilot, "enter")
