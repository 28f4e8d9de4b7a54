"""The rehearsal's console: a terminal emulator (pyte) in a widget, on the sandbox's pty.

The engine hands the wizard the pty's master end (``ConsoleAttached``); this widget reads it
through the event loop's ``add_reader`` (a non-blocking read of what is there, never a wait),
feeds the bytes to a ``pyte`` screen and draws that screen with its colours and cursor. Keys
typed while it has the focus become the bytes a terminal sends (Enter is ``\\r``, Ctrl-C
``\\x03``, arrows are escape sequences) and go to the pty; a resize sets the pty's size
(TIOCSWINSZ, which sends SIGWINCH to the sandbox's foreground processes) and pyte's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import struct
import termios
from typing import Any, ClassVar

import pyte
from rich.color import Color, ColorParseError
from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.message import Message
from textual.strip import Strip
from textual.widget import Widget

# Keys whose bytes are not their character (or that have none), as a VT220/xterm sends them.
KEY_BYTES = {
    "enter": b"\r",
    "tab": b"\t",
    "shift+tab": b"\x1b[Z",
    "backspace": b"\x7f",
    "escape": b"\x1b",
    "home": b"\x1b[H",
    "end": b"\x1b[F",
    "pageup": b"\x1b[5~",
    "pagedown": b"\x1b[6~",
    "insert": b"\x1b[2~",
    "delete": b"\x1b[3~",
    "f1": b"\x1bOP",
    "f2": b"\x1bOQ",
    "f3": b"\x1bOR",
    "f4": b"\x1bOS",
    "f5": b"\x1b[15~",
    "f7": b"\x1b[18~",
    "f9": b"\x1b[20~",
    "f10": b"\x1b[21~",
    "f11": b"\x1b[23~",
    "f12": b"\x1b[24~",
    "ctrl+space": b"\x00",
    "ctrl+@": b"\x00",
}
# Cursor keys: "normal" mode, or "application" mode (DECCKM) that full-screen programs set.
ARROWS = {"up": "A", "down": "B", "right": "C", "left": "D"}
# pyte's colour names (and its typo for bright magenta) in Rich's words.
PYTE_COLOURS = {
    "brown": "yellow",
    "brightbrown": "bright_yellow",
    "bfightmagenta": "bright_magenta",
}
# DECCKM, private mode 1, as pyte stores private modes (shifted by 5); pyte names it not.
APPLICATION_CURSOR_MODE = 1 << 5
READ_CHUNK = 65536


def key_bytes(key: str, character: str | None, *, application_cursor: bool = False) -> bytes | None:
    """The bytes a terminal sends for a key (Textual's name and character); None for a key
    that has no meaning to a terminal, which the wizard may then use itself."""
    if key in ARROWS:
        return ("\x1bO" if application_cursor else "\x1b[").encode() + ARROWS[key].encode()
    if key in KEY_BYTES:
        return KEY_BYTES[key]
    if key.startswith("ctrl+") and len(key) == len("ctrl+") + 1 and key[-1].isalpha():
        return bytes([ord(key[-1].lower()) - ord("a") + 1])  # Ctrl-C is 0x03, Ctrl-D 0x04
    if key.startswith("alt+") and character and len(character) == 1:
        return b"\x1b" + character.encode()
    if character and (character.isprintable() or ord(character[0]) < 0x20):
        return character.encode()
    return None


def rich_colour(name: str) -> Color | None:
    """A pyte colour (a name, or six hex digits for 256 and true colours) as Rich's."""
    if name == "default":
        return None
    name = PYTE_COLOURS.get(name, name)
    if name.startswith("bright") and not name.startswith("bright_"):
        name = "bright_" + name.removeprefix("bright")
    if len(name) == 6 and all(digit in "0123456789abcdefABCDEF" for digit in name):
        name = "#" + name
    try:
        return Color.parse(name)
    except ColorParseError:
        return None


class _PtyScreen(pyte.Screen):
    """pyte's screen, whose answers to the program's queries (cursor position, device
    attributes) go back to the pty."""

    def __init__(self, columns: int, lines: int) -> None:
        super().__init__(columns, lines)
        self.answer_fd: int | None = None

    def write_process_input(self, data: str) -> None:
        if self.answer_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.answer_fd, data.encode())


class ConsoleView(Widget, can_focus=True):
    """A terminal: the sandbox's console on a pty, or console lines the engine relayed."""

    DEFAULT_CSS: ClassVar[str] = """
    ConsoleView {
        background: black;
        color: white;
    }
    """

    class Closed(Message):
        """The pty has nothing more to say: every process of the sandbox let go of it."""

    def __init__(self, *, columns: int = 80, rows: int = 24, id: str | None = None) -> None:
        super().__init__(id=id)
        self.terminal = _PtyScreen(columns, rows)
        self.stream = pyte.ByteStream(self.terminal)
        self.fd: int | None = None
        self._styles: dict[tuple[Any, ...], Style] = {}

    # --- the pty ------------------------------------------------------------------------------
    def attach(self, fd: int) -> None:
        """Show the pty whose master end is ``fd`` (this widget owns and closes it)."""
        self.detach()
        os.set_blocking(fd, False)
        self.fd = fd
        self.terminal.answer_fd = fd
        self._set_pty_size()
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def detach(self) -> None:
        """Stop reading the pty and close it. Idempotent."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        self.terminal.answer_fd = None
        with contextlib.suppress(RuntimeError, ValueError):
            asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)

    def _readable(self) -> None:
        if self.fd is None:
            return
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:  # EIO: no process holds the sandbox's end any more
            data = b""
        if not data:
            self.detach()
            self.post_message(self.Closed())
            return
        self.stream.feed(data)
        self.refresh()

    def send(self, data: bytes) -> None:
        """Bytes typed into the console, to the pty (dropped when nothing is attached)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # a full pty (nothing reads it) or a gone one
            os.write(self.fd, data)

    def _set_pty_size(self) -> None:
        if self.fd is None:
            return
        size = struct.pack("HHHH", self.terminal.lines, self.terminal.columns, 0, 0)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self.fd, termios.TIOCSWINSZ, size)

    # --- text that does not come from the pty -----------------------------------------------------
    def feed_text(self, text: str) -> None:
        """Console output the engine relayed as text (one line, or a few)."""
        self.stream.feed(text.replace("\r\n", "\n").replace("\n", "\r\n").encode())
        self.refresh()

    def note(self, text: str) -> None:
        """A line of the wizard's own on its own line, in bold: how the init ended."""
        start = "\r\n" if self.terminal.cursor.x else ""
        self.stream.feed(f"{start}\x1b[1m{text}\x1b[0m\r\n".encode())
        self.refresh()

    def text(self) -> str:
        """What the console shows, one line per row, trailing blanks dropped."""
        return "\n".join(line.rstrip() for line in self.terminal.display).rstrip("\n")

    # --- Textual --------------------------------------------------------------------------
    def on_resize(self, event: events.Resize) -> None:
        content = self.content_size  # event.size counts the border in
        columns, rows = max(content.width, 2), max(content.height, 1)
        if (columns, rows) != (self.terminal.columns, self.terminal.lines):
            self._fit(rows, columns)
            self._set_pty_size()
        self.refresh()

    def _fit(self, rows: int, columns: int) -> None:
        """Resize pyte's screen, keeping the cursor's row and the rows above it in view
        (pyte alone drops rows from the top: a half-empty screen would lose its text)."""
        terminal = self.terminal
        if rows < terminal.lines:
            drop = max(0, terminal.cursor.y + 1 - rows)
            buffer = terminal.buffer
            for y in range(terminal.lines):  # upwards: each row is read before it is replaced
                buffer[y] = buffer[y + drop]
            for y in [y for y in buffer if y >= rows]:
                del buffer[y]
            terminal.cursor.y -= drop
            terminal.lines = rows
        terminal.resize(rows, columns)
        terminal.cursor.x = min(terminal.cursor.x, columns - 1)

    def on_key(self, event: events.Key) -> None:
        if self.fd is None:
            return  # no sandbox to type to (ended): the wizard's keys work, Enter as the nav says
        application_cursor = APPLICATION_CURSOR_MODE in self.terminal.mode
        data = key_bytes(event.key, event.character, application_cursor=application_cursor)
        if data is None:
            return  # the wizard's own keys (F6, F8) bubble up to the screen
        event.stop()
        event.prevent_default()
        self.send(data)

    def on_paste(self, event: events.Paste) -> None:
        event.stop()
        self.send(event.text.replace("\n", "\r").encode())

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def on_unmount(self) -> None:
        self.detach()

    def render_line(self, y: int) -> Strip:
        terminal = self.terminal
        if y >= terminal.lines:
            return Strip.blank(self.content_size.width)
        row = terminal.buffer[y]
        cursor = terminal.cursor
        show_cursor = self.has_focus and not cursor.hidden and cursor.y == y
        segments: list[Segment] = []
        run_text, run_style = "", None
        for x in range(terminal.columns):
            char = row[x]
            style = self._style(char, show_cursor and x == cursor.x)
            if style is not run_style and run_text:
                segments.append(Segment(run_text, run_style))
                run_text = ""
            run_style = style
            run_text += char.data or " "
        if run_text:
            segments.append(Segment(run_text, run_style))
        return Strip(segments, terminal.columns).crop_extend(0, self.content_size.width, None)

    def _style(self, char: Any, cursor: bool) -> Style:
        key = (char.fg, char.bg, char.bold, char.italics, char.underscore, char.reverse, cursor)
        style = self._styles.get(key)
        if style is None:
            style = Style(
                color=rich_colour(char.fg),
                bgcolor=rich_colour(char.bg),
                bold=char.bold or None,
                italic=char.italics or None,
                underline=char.underscore or None,
                reverse=(char.reverse != cursor) or None,
            )
            self._styles[key] = style
        return style
