"""A fake engine whose rehearsal has an interactive console: a real pty, a scripted shell.

Mocked on purpose, like the rest of fakes.py: the snapshots need a console whose every byte
is the same on every machine. The pty is real (the wizard reads, writes and sizes it as it
does the sandbox's), and so is its line discipline (echo, ^C); only the shell behind it is
a script: ``echo WORDS`` (``$$`` is 1, as for a shell that is PID 1) and ``exit [N]``. The
real shell in a real sandbox is test_console.py's engine test and the tmux walk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pty
import select
import threading
from collections.abc import Callable, Iterator

from app.tui.backend import RunRequest
from injector.events import (
    Console,
    ConsoleAttached,
    Event,
    Finished,
    StepDone,
    StepStarted,
)
from tests.tui.fakes import FakeBackend, rehearsal_events

BANNER = "tinybox: hello from PID 1\r\n"
PROMPT = "/ # "
POLL_SECONDS = 0.02


class ScriptedShell:
    """The far end of a real pty, answering like a tiny shell until ``exit`` or a stop."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.lines: list[str] = []  # what it was given, line by line

    def say(self, text: str) -> None:
        os.write(self.slave, text.encode())

    def serve(self, stop: threading.Event) -> int | None:
        """Answer lines until ``exit`` (its status) or ``stop`` (None); then hang up."""
        self.say(BANNER + PROMPT)
        pending = b""
        try:
            while not stop.is_set():
                readable, _, _ = select.select([self.slave], [], [], POLL_SECONDS)
                if not readable:
                    continue
                pending += os.read(self.slave, 4096)
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    status = self.answer(line.decode().strip())
                    if status is not None:
                        return status
            return None
        finally:
            os.close(self.slave)

    def answer(self, line: str) -> int | None:
        self.lines.append(line)
        word, _, rest = line.partition(" ")
        if word == "exit":
            return int(rest or 0)
        if word == "echo":
            self.say(rest.replace("$$", "1") + "\r\n")
        elif word:
            self.say(f"sh: {word}: not found\r\n")
        self.say(PROMPT)
        return None


@dataclasses.dataclass
class InteractiveFakeBackend(FakeBackend):
    """FakeBackend whose rehearsal hands the wizard a pty at the stage step, as the engine
    does with ``console="pty"``, and ends when the script's shell exits or on stop."""

    shells: list[ScriptedShell] = dataclasses.field(default_factory=list)

    def run(self, request: RunRequest, last_words: Callable[[str], None]) -> Iterator[Event]:
        self.requests.append(request)
        for event in rehearsal_events(request):
            if isinstance(event, Console):
                continue  # the stage and the init speak on the pty instead
            if isinstance(event, StepStarted) and event.step == "stage":
                yield event
                yield from self.serve(request)
                return
            yield event

    def serve(self, request: RunRequest) -> Iterator[Event]:
        shell = ScriptedShell()
        self.shells.append(shell)
        try:
            yield ConsoleAttached(os.dup(shell.master))
            status = shell.serve(request.stop)
        finally:
            with contextlib.suppress(OSError):
                os.close(shell.master)
        if status is None:
            yield StepDone("stage", "stopped: the sandbox's processes were killed")
            yield Finished("rehearsed", exit_status=0, detail="stopped; the sandbox is gone")
        else:
            yield StepDone("stage", f"sandboxed init exited with status {status}")
            yield Finished("rehearsed", exit_status=status)
