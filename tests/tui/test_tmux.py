"""End to end, as a person would: `dboot-tui` in an 80x24 tmux, driven by keys.

A private tmux server (its own socket) keeps this away from anyone's tmux sessions; the
test kills only that server. Lab mode is on in every run. The rehearsal runs in a sandbox;
the real switch runs with --target-pid against the PID 1 of a namespace the test makes,
never this machine's PID 1.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from injector.rehearsal.sandbox import Sandbox
from tests.images import TINYBOX
from tests.sandbox.sandbox_checks import eventually, wait_for_output

# tinybox: ours, under the test prefix, with decoys named like it in the engine too.
pytestmark = [pytest.mark.root, pytest.mark.engine, pytest.mark.usefixtures("tinybox")]

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

    def keys_until(self, key: str, text: str, tries: int = 3, wait: float = 5) -> str:
        """Send ``key`` until ``text`` shows: for a key the screen may not be ready to take."""
        for attempt in range(tries):
            self.keys(key)
            try:
                return self.wait_for(text, timeout=wait)
            except AssertionError:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def alive(self) -> bool:
        return self.tmux("has-session", "-t", "wizard").returncode == 0


@pytest.fixture
def wizard(tmp_path: Path) -> Iterator[Callable[..., Terminal]]:
    """``wizard(*flags)`` starts dboot-tui with those flags, in lab mode, in a fresh tmux."""
    program = [str(SCRIPT)] if SCRIPT.exists() else [sys.executable, "-m", "app.tui.main"]
    started: list[Terminal] = []

    def start(*flags: str) -> Terminal:
        command = shlex.join(
            [
                "env",
                "DBOOT_REHEARSAL_ONLY=1",
                f"PYTHONPATH={REPO}",
                *program,
                *flags,
                "--state-dir",
                str(tmp_path / "state"),
                "--log-file",
                str(tmp_path / "tui.log"),
            ]
        )
        socket_name = f"dboot-tui-test-{os.getpid()}"
        started.append(Terminal(socket_name, f"cd {shlex.quote(str(REPO))} && {command}"))
        return started[-1]

    try:
        yield start
    finally:
        for term in started:
            term.tmux("kill-server")  # Our private server only.


@pytest.fixture
def terminal(wizard: Callable[..., Terminal]) -> Terminal:
    return wizard("--rehearse")


@pytest.mark.timeout(300)
def test_a_person_rehearses_tinybox_with_the_keyboard(terminal: Terminal, tmp_path: Path) -> None:
    # The list once loaded, whatever image is first: the engine may hold many (issue 20).
    shown = terminal.wait_for("Enter: continue with")
    assert "REHEARSAL ONLY" in shown
    # 1 Images: filter down to tinybox, then Enter takes it, as the nav line says.
    # Each key waits for the screen to answer the one before: a key that lands before the
    # filter field has focus goes to the table, and Enter there picks whatever row is first.
    terminal.keys("/")
    terminal.wait_for("filter: repository")
    terminal.keys(TINYBOX, literal=True)
    terminal.wait_for(f"Enter: continue with {TINYBOX}")
    terminal.keys("Enter")
    terminal.wait_for("Command for the new PID 1")
    # 2 Init: the image's own /sbin/init is suggested and found in the image; a shell instead.
    shown = terminal.wait_for("is an executable in the image")
    assert "/sbin/init" in shown
    terminal.keys("C-u")  # clears the field, as in a shell
    terminal.keys("/bin/sh", literal=True)
    terminal.wait_for("/bin/sh is an executable in the image")
    terminal.keys("Enter")
    # 3 Resources: the estimate against what is available.
    shown = terminal.wait_for("Enter: see the processes", timeout=60)
    assert "image in RAM (estimate)" in shown
    terminal.keys("Enter")
    # 4 Processes, 5 Options, then 6 the Confirm modal: Rehearse has the focus (the only run
    # on offer, and it touches nothing here), so Enter rehearses.
    terminal.wait_for("processes in")
    terminal.keys("Enter")
    shown = terminal.wait_for("The same rehearsal from a shell")
    assert f"{TINYBOX} /bin/sh" in shown
    terminal.keys("Enter")
    shown = terminal.wait_for("Rehearse or switch?")
    assert "Switch is off" in shown and "Enter rehearses; Escape cancels." in shown
    terminal.keys("Enter")
    # 7 Run: the sandboxed shell's console has the keyboard (issue 11 §2): it answers.
    terminal.wait_for("exec ['/bin/sh']", timeout=240)
    terminal.wait_for("/ #")
    terminal.keys("echo hi-$$", literal=True)
    terminal.keys("Enter")
    shown = terminal.wait_for("│hi-1 ")  # on a line of its own in the console
    assert "F6: steps ⇄ console" in shown
    terminal.keys("exit", literal=True)
    terminal.keys("Enter")
    shown = terminal.wait_for("── /bin/sh: exit status 0 ──")
    assert "r: rehearse again" in shown and "done" in shown
    assert "Steps" in shown  # the console let go of the keyboard and the whole body
    quit_wizard(terminal)
    log = (tmp_path / "tui.log").read_text()
    assert "Rehearsal finished" in log


@pytest.mark.timeout(300)
def test_enter_alone_takes_a_teaching_rehearsal_to_its_first_pause(
    wizard: Callable[..., Terminal],
) -> None:
    """Issue 20: `dboot-tui --rehearse --teach` as a teacher tries it before a class. Once the
    image is chosen (with the filter: the engine holds many), Enter alone goes from step to
    step, each doing what its nav line says, to the first teaching pause. No Tab, no loop."""
    terminal = wizard("--rehearse", "--teach")
    terminal.wait_for("Enter: continue with")
    terminal.keys("/")
    terminal.wait_for("filter: repository")
    terminal.keys(TINYBOX, literal=True)
    # Each Enter waits for the promise it keeps: the nav line (or the modal's) says it first.
    promises = [
        (f"Enter: continue with {TINYBOX}", "Command for the new PID 1"),
        ("Enter: check the resources", "image in RAM (estimate)"),
        ("Enter: see the processes", "processes in"),
        ("Enter: the options", "The same rehearsal from a shell"),
        ("Enter: confirm", "Rehearse or switch?"),
        ("Enter rehearses", "Step by step · host 1/"),
    ]
    for promise, kept in promises:
        shown = terminal.wait_for(promise, timeout=90)
        if promise in ("Enter: confirm", "Enter rehearses"):
            # The line that replays this run teaches too (issue 20 §2), before and in the modal.
            assert "dboot rehearse --teach " in shown, shown
        terminal.keys("Enter")
        terminal.wait_for(kept, timeout=90)
    shown = terminal.wait_for("Teaching pause:")
    assert "read(fd, buf, 1 MiB)" in shown, shown  # the first host step: reading the image
    # Done here: no more pauses, then stop tinybox's shell and leave.
    terminal.keys("c")
    terminal.wait_for("/ #", timeout=120)
    terminal.keys("F8")
    terminal.wait_for("── stopped: the sandbox is gone ──", timeout=60)
    quit_wizard(terminal)


def pid1_identity() -> tuple[str, str]:
    """This machine's PID 1: its name and its start time (fields 2 and 22 of its stat)."""
    head, _, rest = Path("/proc/1/stat").read_text().rpartition(")")
    return head.partition("(")[2], rest.split()[19]


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def quit_wizard(terminal: Terminal) -> None:
    terminal.keys("q")
    deadline = time.monotonic() + 15
    while terminal.alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not terminal.alive(), "the wizard did not quit on q"


@pytest.mark.timeout(300)
def test_a_person_switches_a_namespaces_pid_1_from_a_plain_archive_path(
    wizard: Callable[..., Terminal], tmp_path: Path
) -> None:
    archive = tmp_path / "tinybox.tar"
    subprocess.run(["docker", "save", "-o", str(archive), TINYBOX], check=True)
    with Sandbox(services=1, console="capture") as target:
        # Never this machine's PID 1: the target is PID 1 of a PID namespace made here.
        assert target.pid != 1
        assert os.readlink(f"/proc/{target.pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        services = target.service_pids()
        machine_pid1 = pid1_identity()
        terminal = wizard("--target-pid", str(target.pid))
        shown = terminal.wait_for("Open file")
        assert "REHEARSAL ONLY" not in shown
        # 1 Images: open the docker save archive by its plain path; its kind is sniffed.
        terminal.keys("o")
        terminal.wait_for("Open an image file")
        terminal.keys(str(archive), literal=True)
        terminal.wait_for(archive.name)
        terminal.keys("Enter")
        shown = terminal.wait_for("(docker save)")
        assert TINYBOX in shown  # the archive's own tag, in the details pane
        terminal.keys("Enter")
        # 2 Init, 3 Resources, 4 Processes, 5 Options.
        shown = terminal.wait_for("is an executable in the image", timeout=60)
        assert "/sbin/init" in shown
        terminal.keys("Enter")
        terminal.wait_for("Enter: see the processes", timeout=60)
        terminal.keys("Enter")
        shown = terminal.wait_for("Enter: the options")
        assert "1 process in 1 service" in shown  # the namespace's own service, not ours
        terminal.keys("Enter")
        shown = terminal.wait_for("The same switch from a shell")
        assert f"--target-pid {target.pid}" in shown, shown
        terminal.keys("Enter")
        # 6 Confirm: the hostname field has the focus, so the typed name lands there.
        shown = terminal.wait_for("type the hostname")
        # A long archive path scrolls the modal's text: its lines wrap where they may.
        assert "namespace of" in shown and f"pid {target.pid}" in shown, shown
        assert "own PID 1 is not touched" in shown, shown
        hostname = socket.gethostname()
        terminal.keys(hostname, literal=True)
        terminal.wait_for("Enter switches for real")
        terminal.keys("Enter")
        # 7 Run: it starts, the injection lands, and the namespace's PID 1 runs tinybox.
        terminal.wait_for("Reading image")
        shown = terminal.wait_for("Finished: injected", timeout=120)
        assert f"Finished: injected. pid {target.pid} now" in shown, shown
        assert wait_for_output(target, "tinybox: init running as PID 1", timeout=30), (
            target.output()
        )
        assert eventually(lambda: os.readlink(f"/proc/{target.pid}/exe") == "/bin/busybox", 10)
        # The stage ended the namespace's other processes before it exec'd the new init (one
        # it could not reap in time stays a zombie of the new init: ended all the same).
        ended = eventually(lambda: all(not alive(pid) for pid in services), 10)
        assert ended, target.output()
        assert pid1_identity() == machine_pid1  # this machine's PID 1: untouched
        quit_wizard(terminal)
    log = (tmp_path / "tui.log").read_text()
    assert "Finished: injected" in log
