"""A rehearsal whose console is a pty handed to the front-end (console="pty", the wizard's).

Real engine, real sandbox, real pty: the rehearsed shell answers what is written to the
pty's master end, has it as its controlling terminal, and the stop event or a signal ends
it with nothing left behind. Never this machine's PID 1: every target is a Sandbox.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.events import ConsoleAttached, Event, Finished, Injection, StepDone
from injector.switch import SwitchOptions, run
from tests.images import build_tinybox
from tests.sandbox.test_switch import nothing_left_behind  # noqa: F401  (a fixture)

pytestmark = [
    pytest.mark.root,
    pytest.mark.engine,
    pytest.mark.usefixtures("nothing_left_behind"),
]

READ_TIMEOUT = 30.0


def read_until(fd: int, text: bytes, seen: bytearray) -> bytes:
    """Read the pty's master end into ``seen`` until ``text`` is in it."""
    deadline = time.monotonic() + READ_TIMEOUT
    while text not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"{text!r} never came: {bytes(seen)[-600:]!r}"
        readable, _, _ = select.select([fd], [], [], left)
        if readable:
            seen += os.read(fd, 65536)
    return bytes(seen)


def pty_rehearsal(
    tmp_path: Path, init: list[str], stop: threading.Event, image: str | None = None
) -> Iterator[Event]:
    options = SwitchOptions(
        image=image or build_tinybox(),
        init_argv=init,
        rehearse=True,
        console="pty",
        stop=stop,
        state_dir=tmp_path / "state",
        log_file=None,
    )
    return run(options)


@contextlib.contextmanager
def shell_on_pty(events: Iterator[Event]) -> Iterator[tuple[int, bytearray]]:
    """The pty's master end, once the rehearsed shell prompts there, and what it showed so
    far; the rehearsal's events and the master end are closed on the way out."""
    master = None
    try:
        for event in events:
            if isinstance(event, ConsoleAttached):
                master = event.fd
            if isinstance(event, StepDone) and event.step == "inject":
                break
        assert master is not None
        seen = bytearray()
        read_until(master, b"/ # ", seen)
        yield master, seen
    finally:
        events.close()  # type: ignore[attr-defined]
        if master is not None:
            os.close(master)


def test_a_shell_answers_on_the_pty_and_stop_ends_it(tmp_path: Path) -> None:
    stop = threading.Event()
    events = pty_rehearsal(tmp_path, ["/bin/sh"], stop)
    with shell_on_pty(events) as (master, seen):
        # Field 7 of /proc/1/stat is PID 1's controlling terminal: the pty, not none (0).
        os.write(master, b"echo hi-$$ ctty-$(cut -d' ' -f7 /proc/1/stat) $(tty)\r")
        shown = read_until(master, b"/dev/console\r\n", seen).decode()
        answer = shown.split("\r\nhi-")[1].split("\r\n")[0]
        assert answer.startswith("1 ctty-") and not answer.startswith("1 ctty-0 "), answer
        stop.set()
        rest = list(events)
    assert rest[-1] == Finished("rehearsed", exit_status=0, detail="stopped; the sandbox is gone")
    assert not (tmp_path / "state").exists()


def test_an_init_killed_by_a_signal_is_named(tmp_path: Path) -> None:
    events = list_until_killed(tmp_path)
    assert events[-1] == Finished("rehearsed", exit_status=137, detail="killed by SIGKILL")


def list_until_killed(tmp_path: Path) -> list[Event]:
    """A rehearsed shell whose PID 1 this test kills with SIGKILL once it runs."""
    seen: list[Event] = []
    master = None
    try:
        for event in pty_rehearsal(tmp_path, ["/bin/sh"], threading.Event()):
            seen.append(event)
            if isinstance(event, ConsoleAttached):
                master = event.fd
            if isinstance(event, Injection):
                # The sandbox's PID 1 (never ours: the engine checked it is PID 1 of a
                # namespace of its own), once its shell prompts.
                assert event.pid != 1
                assert os.readlink(f"/proc/{event.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
                assert master is not None
                read_until(master, b"/ # ", bytearray())
                os.kill(event.pid, signal.SIGKILL)
    finally:
        if master is not None:
            os.close(master)
    return seen
