"""SVG snapshots at 80x24 of the rehearsal's interactive console (issue 11 §2), with the
fake engine's real pty and scripted shell (tests/tui/fakepty.py) and a fixed clock.

Update them with `pytest tests/tui/test_console_snapshots.py --snapshot-update`, then look
at the changed SVGs before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot

from app.tui.app import DbootApp
from tests.tui.fakepty import InteractiveFakeBackend
from tests.tui.helpers import settle, wait_for_run_end, wait_until
from tests.tui.test_console import console, make, rehearse, type_line

SnapCompare = Callable[..., bool]


async def answered(pilot: Pilot[Any]) -> None:
    """The console has the focus and the whole body; the shell answered a command."""
    await rehearse(pilot)
    app = pilot.app
    assert isinstance(app, DbootApp)
    await type_line(pilot, "echo hi-$$")
    await wait_until(pilot, lambda: "\nhi-1" in console(app).text(), 10, "hi-1")
    await settle(pilot)


async def ended(pilot: Pilot[Any]) -> None:
    """The shell exited: how it ended, and what the wizard offers next."""
    await answered(pilot)
    await type_line(pilot, "exit")
    await wait_for_run_end(pilot, 10)
    app = pilot.app
    assert isinstance(app, DbootApp)
    await wait_until(pilot, lambda: "exit status 0" in console(app).text(), 10, "the end")
    await settle(pilot)


def test_run_console_answers(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(InteractiveFakeBackend()), run_before=answered)


def test_run_console_ended(snap_compare: SnapCompare) -> None:
    assert snap_compare(make(InteractiveFakeBackend()), run_before=ended)
