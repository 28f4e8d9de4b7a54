"""The rehearsal's interactive console (issue 11 §2) with the fake engine: a real pty with a
scripted shell behind it (tests/tui/fakepty.py). The real sandbox is in test_engine.py."""

from __future__ import annotations

import fcntl
import struct
import termios
from typing import Any

from rich.color import Color
from textual.pilot import Pilot

from app.tui.app import DbootApp, create_app
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.console import ConsoleView, key_bytes, rich_colour
from tests.tui.fakepty import InteractiveFakeBackend
from tests.tui.fakes import SteppingClock
from tests.tui.helpers import (
    press,
    screen_text,
    settle,
    wait_for_run_end,
    wait_for_screen,
    wait_until,
)
from tests.tui.test_walk import to_processes

SIZE = (80, 24)


def make(backend: InteractiveFakeBackend) -> DbootApp:
    return create_app(backend, rehearse_only=True, clock=SteppingClock(), blink=False)


def console(app: DbootApp) -> ConsoleView:
    return app.screen.query_one(ConsoleView)


def keys_for(text: str) -> list[str]:
    """Textual key names that type ``text``."""
    names = {" ": "space", "$": "dollar_sign", "-": "minus", "/": "slash"}
    return [names.get(character, character) for character in text]


async def type_line(pilot: Pilot[Any], text: str) -> None:
    await press(pilot, *keys_for(text), "enter")


async def rehearse(pilot: Pilot[Any]) -> None:
    """From the start to a rehearsal whose console is attached to the pty."""
    await to_processes(pilot)
    app = pilot.app
    for _ in range(3):  # Processes (and the steps after it, if any) -> Confirm
        if not isinstance(app.screen, ConfirmScreen):
            await press(pilot, "enter")
    await wait_for_screen(pilot, ConfirmScreen)
    await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
    await wait_for_screen(pilot, RunScreen)
    assert isinstance(app, DbootApp)
    await wait_until(pilot, lambda: "/ #" in console(app).text(), 10, "the shell's prompt")


async def test_the_console_has_the_focus_and_a_shell_answers() -> None:
    backend = InteractiveFakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await rehearse(pilot)
        assert isinstance(app.focused, ConsoleView)
        await type_line(pilot, "echo hi-$$")
        await wait_until(pilot, lambda: "\nhi-1" in console(app).text(), 10, "hi-1")
        # Every key reached the shell as a terminal sends it, the wizard took none of them.
        assert backend.shells[0].lines == ["echo hi-$$"]
        assert isinstance(app.screen, RunScreen) and app.screen.running
        await type_line(pilot, "exit 3")
        await wait_for_run_end(pilot, 10)
        await settle(pilot)
        assert "── /sbin/init: exit status 3 ──" in console(app).text()
        text = screen_text(app)
        assert "r: rehearse again" in text and "b: back" in text
        assert app.focused is None  # the keys are the wizard's again


async def test_f6_moves_the_focus_away_from_the_console_and_back() -> None:
    app = make(InteractiveFakeBackend())
    async with app.run_test(size=SIZE) as pilot:
        await rehearse(pilot)
        # Focused, the console has the whole body; the steps are hidden.
        assert "Steps" not in screen_text(app)
        await press(pilot, "f6")
        assert app.focused is None
        assert "Steps" in screen_text(app) and "Sandbox console" in screen_text(app)
        await press(pilot, "b", "n")  # the wizard's keys, refused while the run is on
        assert isinstance(app.screen, RunScreen)
        await press(pilot, "f6")
        assert isinstance(app.focused, ConsoleView)
        await type_line(pilot, "exit")
        await wait_for_run_end(pilot, 10)


async def test_the_stop_key_ends_a_rehearsal_whose_init_never_exits() -> None:
    backend = InteractiveFakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await rehearse(pilot)
        await press(pilot, "f8")
        await wait_for_run_end(pilot, 10)
        await settle(pilot)
        assert backend.requests[0].stop.is_set()
        assert "── stopped: the sandbox is gone ──" in console(app).text()


async def test_rehearse_again_and_go_back() -> None:
    backend = InteractiveFakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await rehearse(pilot)
        await type_line(pilot, "exit")
        await wait_for_run_end(pilot, 10)
        first = app.screen
        await press(pilot, "r")
        await wait_until(pilot, lambda: app.screen is not first, 10, "a new run screen")
        await wait_until(pilot, lambda: "/ #" in console(app).text(), 10, "the prompt again")
        assert len(backend.requests) == 2 and backend.requests[0] == backend.requests[1]
        assert not backend.requests[1].stop.is_set()
        await type_line(pilot, "exit")
        await wait_for_run_end(pilot, 10)
        await press(pilot, "b")  # back to the init step, as after any run
        await wait_for_screen(pilot, InitScreen)


async def test_the_pty_has_the_consoles_size() -> None:
    backend = InteractiveFakeBackend()
    app = make(backend)
    async with app.run_test(size=SIZE) as pilot:
        await rehearse(pilot)
        view = console(app)

        def pty_size() -> tuple[int, int]:
            packed = fcntl.ioctl(backend.shells[0].master, termios.TIOCGWINSZ, b"\0" * 8)
            rows, columns, _, _ = struct.unpack("HHHH", packed)
            return rows, columns

        assert pty_size() == (view.content_size.height, view.content_size.width)
        big = pty_size()
        await press(pilot, "f6")  # the steps come back: the console shrinks, and so does the pty
        await wait_until(pilot, lambda: pty_size() != big, 10, "a smaller pty")
        assert pty_size() == (view.terminal.lines, view.terminal.columns)
        assert pty_size() == (view.content_size.height, view.content_size.width)
        assert "/ #" in view.text()  # the prompt's row stays in view
        await press(pilot, "f6")
        await type_line(pilot, "exit")
        await wait_for_run_end(pilot, 10)


async def test_colours_and_the_cursor_are_drawn() -> None:
    app = make(InteractiveFakeBackend())
    async with app.run_test(size=SIZE) as pilot:
        await rehearse(pilot)
        view = console(app)
        view.feed_text("\x1b[31mred\x1b[0m \x1b[1;44mbold on blue\x1b[0m")
        await settle(pilot)
        row = view.terminal.cursor.y
        segments = list(view.render_line(row))
        styles = {segment.text: segment.style for segment in segments}
        red = styles["red"]
        assert red is not None and red.color == Color.parse("red")
        blue = styles["bold on blue"]
        assert blue is not None and blue.bold and blue.bgcolor == Color.parse("blue")
        # The cursor: the one reversed cell, right after the text.
        reversed_cells = [s for s in segments if s.style is not None and s.style.reverse]
        assert len(reversed_cells) == 1 and reversed_cells[0].text[0] == " "
        await type_line(pilot, "exit")
        await wait_for_run_end(pilot, 10)


def test_keys_become_the_bytes_a_terminal_sends() -> None:
    assert key_bytes("enter", "\r") == b"\r"
    assert key_bytes("ctrl+c", "\x03") == b"\x03"
    assert key_bytes("ctrl+d", None) == b"\x04"
    assert key_bytes("backspace", "\x08") == b"\x7f"
    assert key_bytes("tab", "\t") == b"\t"
    assert key_bytes("up", None) == b"\x1b[A"
    assert key_bytes("up", None, application_cursor=True) == b"\x1bOA"
    assert key_bytes("left", None) == b"\x1b[D"
    assert key_bytes("a", "a") == b"a"
    assert key_bytes("dollar_sign", "$") == b"$"
    assert key_bytes("alt+b", "b") == b"\x1bb"
    assert key_bytes("f6", None) is None  # the wizard's own key
    assert rich_colour("brown") == Color.parse("yellow")
    assert rich_colour("ff8700") == Color.parse("#ff8700")
    assert rich_colour("brightred") == Color.parse("bright_red")
    assert rich_colour("default") is None
