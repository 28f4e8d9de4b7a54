"""End to end, as a person would: `dboot-tui --rehearse` in an 80x24 tmux, driven by keys.

A private tmux server (its own socket) keeps this away from anyone's tmux sessions; the
test kills only that server. The rehearsal runs in a sandbox: lab mode is on.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "dboot-tui"


class Terminal:
    """One tmux pane of 80x24 running one command, on our own tmux server."""

    def __init__(self, socket: str, command: str) -> None:
        self.socket = socket
        self.tmux("new-session", "-d", "-s", "wizard", "-x", "80", "-y", "24", command)

    def tmux(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=False
        )

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "wizard").stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self.tmux("send-keys", "-t", "wizard", *(["-l"] if literal else []), *keys)

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.screen()
            if text in shown:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not on screen after {timeout} s:\n{shown}")
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "wizard").returncode == 0


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    program = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "app.tui.main"]
    command = shlex.join(
        [
            "env",
            "DBOOT_REHEARSAL_ONLY=1",
            f"PYTHONPATH={REPO}",
            *program,
            "--rehearse",
            "--state-dir",
            str(tmp_path / "state"),
            "--log-file",
            str(tmp_path / "tui.log"),
        ]
    )
    term = Terminal(f"dboot-tui-test-{os.getpid()}", f"cd {shlex.quote(str(REPO))} && {command}")
    try:
        yield term
    finally:
        term.tmux("kill-server")  # Our private server only.


@pytest.mark.timeout(300)
def test_a_person_rehearses_tinybox_with_the_keyboard(terminal: Terminal, tmp_path: Path) -> None:
    shown = terminal.wait_for("tinybox")
    assert "REHEARSAL ONLY" in shown
    # 1 Images: filter down to tinybox, then Enter on the table.
    # Each key waits for the screen to answer the one before: a key that lands before the
    # filter field has focus goes to the table, and Enter there picks whatever row is first.
    terminal.keys("/")
    terminal.wait_for("filter: repository")
    terminal.keys("tinybox:latest", literal=True)
    terminal.wait_for("Enter: continue with tinybox:latest")
    terminal.keys("Enter")
    terminal.wait_for("Enter: continue with tinybox:latest")
    terminal.keys("Enter")
    # 2 Init: the image's own /sbin/init is suggested and found in the image.
    shown = terminal.wait_for("is an executable in the image")
    assert "/sbin/init" in shown
    terminal.keys("Enter")
    # 3 Resources: the estimate against what is available.
    shown = terminal.wait_for("Enter: see the processes", timeout=60)
    assert "image in RAM (estimate)" in shown
    terminal.keys("Enter")
    # 4 Processes, then 5 the Confirm modal: Cancel has the focus, Tab moves to Rehearse.
    terminal.wait_for("processes in")
    terminal.keys("Enter")
    shown = terminal.wait_for("Rehearse or switch?")
    assert "Switch is off" in shown
    terminal.keys("Tab")
    terminal.keys("Enter")
    # 6 Run: the sandboxed system's console and its exit status.
    shown = terminal.wait_for("── exit status", timeout=240)
    assert "tinybox: init running as PID 1" in shown
    assert "exit status 0" in shown
    assert "done" in shown
    terminal.keys("q")
    deadline = time.monotonic() + 15
    while terminal.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not terminal.alive(), "the wizard did not quit on q"
    log = (tmp_path / "tui.log").read_text()
    assert "Rehearsal finished" in log
