"""Before the point of no return, every ending undoes everything, and the log says so.

`dboot switch --target-pid` against the PID 1 of a sandbox we make, on a pseudo-terminal,
as a user on SSH runs it. At a named moment (the pause points of injector/testhooks.py:
during the copy, with the plan written, or with PID 1 stopped under us before the swap)
the terminal goes away (its master side closed: SIGHUP, then EIO on every write), or a
SIGTERM or a Ctrl-C comes. Afterwards the tmpfs is gone from the
target's mount namespace, the plan is gone, PID 1 is untouched, and the log file names
what was undone. Lab mode is on; no path reaches this machine's PID 1.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from injector import switch
from injector.inject import ptrace
from injector.rehearsal.sandbox import Sandbox
from injector.runlog import LOG_FILE_ENV, RunLog
from injector.testhooks import PAUSE_ENV, PAUSE_SECONDS_ENV
from tests.sandbox.parking import EXIT_ON_SIGUSR1, ParkedSandbox
from tests.sandbox.sandbox_checks import eventually, mounted_sources

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))
BUSYBOX = os.path.realpath(shutil.which("busybox") or "/bin/busybox")
STATE_DIR = "/run/dboot-faults"
# Python's own status when flushing stdout fails at exit: "nothing says what state it left".
PYTHON_FLUSH_FAILED = 120


def run_dir(state_dir: object) -> str:
    """A run's own subdirectory of ``state_dir`` (injector/ramroot/statedir.py), as a regular
    expression: the RAM root and the plan are in it."""
    return rf"{re.escape(str(state_dir))}/run-\d+-[0-9a-f]+"


def _no_controlling_terminal() -> None:
    """setsid alone: the pty is only where the output goes, so its hang-up sends no SIGHUP
    and only the next write notices (EIO), as with a process started by nohup."""


def _controlling_terminal() -> None:
    """In the child, after setsid: the pty on fd 0 becomes its controlling terminal, so
    closing the master hangs it up as a dropped SSH session does."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _drain(master: int, seen: list[bytes], stop: threading.Event) -> None:
    """Read what dboot writes until told to stop. Never sits in read(): a close() from
    another thread would then not release the master until the read returned."""
    while not stop.is_set():
        if not select.select([master], [], [], 0.05)[0]:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:
            return  # EIO: the slave side is closed everywhere
        if not chunk:
            return
        seen.append(chunk)


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid line for PID {pid}")


def end_a_switch_on_a_pty(
    target: int,
    state_dir: str,
    phase: str,
    ending: str,
    tmp_path: Path,
    ram_root_mounted: Callable[[], bool],
    pause_seconds: str | None,
) -> tuple[int, str]:
    """`dboot switch --target-pid` on a pty, ended by ``ending`` once paused at ``phase``.
    Returns its exit status and what it wrote to the terminal."""
    hangs_up = ending != "pty closed, no SIGHUP"
    pause = {PAUSE_SECONDS_ENV: pause_seconds} if pause_seconds else {}
    announce = tmp_path / "paused"
    master, slave = os.openpty()
    seen: list[bytes] = []
    try:
        dboot = subprocess.Popen(
            [DBOOT, "switch", "--yes", "--grace", "1", "--state-dir", state_dir,
             "--target-pid", str(target), "tinybox", "/bin/sh", "-c", "exec sleep 60"],
            stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True,
            preexec_fn=_controlling_terminal if hangs_up else _no_controlling_terminal,
            env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1",
                 LOG_FILE_ENV: str(tmp_path / "dboot.log"),
                 PAUSE_ENV: f"{phase}:{announce}", **pause},
        )  # fmt: skip
    finally:
        os.close(slave)
    stop_reading = threading.Event()
    reader = threading.Thread(target=_drain, args=(master, seen, stop_reading), daemon=True)
    reader.start()
    try:
        paused = eventually(lambda: announce.exists() or dboot.poll() is not None, 60)
        assert paused and announce.exists(), b"".join(seen).decode(errors="replace")
        # The RAM root is there, in the target's mount namespace, when the ending comes.
        assert ram_root_mounted()
        if ending.startswith("pty closed"):
            stop_reading.set()
            reader.join(5)
            os.close(master)
            master = -1
        else:
            dboot.send_signal(signal.Signals[ending])
        status = dboot.wait(60)
    finally:
        if dboot.poll() is None:
            dboot.kill()
            dboot.wait()
        stop_reading.set()
        reader.join(5)
        if master >= 0:
            os.close(master)
    return status, b"".join(seen).decode(errors="replace")


@pytest.mark.parametrize(
    ("phase", "ending"),
    [
        ("copy", "pty closed"),
        ("copy", "pty closed, no SIGHUP"),
        ("prepared", "pty closed"),
        ("prepared", "SIGTERM"),
        ("prepared", "SIGINT"),
        ("entry-stop", "pty closed"),
        ("entry-stop", "SIGTERM"),
    ],
)
def test_an_ending_before_the_commit_point_undoes_everything(
    phase: str, ending: str, tmp_path: Path
) -> None:
    log_file = tmp_path / "dboot.log"
    # Without a hang-up, dboot must go on to meet the dead terminal at its next write. At
    # the entry stop, the injection holds ending signals back: it must go on to see them.
    in_injection = phase == "entry-stop"
    hangs_up = ending != "pty closed, no SIGHUP"
    with Sandbox(services=2, console="capture") as sandbox:
        pid = sandbox.pid
        exe_before = os.readlink(f"/proc/{pid}/exe")
        services = sandbox.service_pids()
        status, said = end_a_switch_on_a_pty(
            pid,
            STATE_DIR,
            phase,
            ending,
            tmp_path,
            lambda: "dboot" in mounted_sources(pid),
            "1" if in_injection or not hangs_up else None,
        )

        # The tmpfs, the plan and the run's own directory are gone from the target's mount
        # namespace ...
        assert "dboot" not in mounted_sources(pid), said
        assert not list(Path(f"/proc/{pid}/root{STATE_DIR}").glob("run-*"))
        # ... PID 1 is untouched: the same stand-in, untraced, its services alive ...
        assert sandbox.running() and os.readlink(f"/proc/{pid}/exe") == exe_before
        assert tracer_of(pid) == 0
        assert all(Path(f"/proc/{service}").exists() for service in services)
        # ... and the log says what was undone, and why.
        log = log_file.read_text()
        assert "undoing (" in log and "nothing was injected" in log, log
        assert re.search(rf"undone: RAM root {run_dir(STATE_DIR)}/root:", log), log
        assert re.search(rf"undone: plan {run_dir(STATE_DIR)}/plan.json:", log), log
        # Removed by the copy's own clean-up, or by the undo once the copy was done.
        assert re.search(rf"undone: directory {run_dir(STATE_DIR)}: (removed|not there)", log)
        if phase != "copy":
            assert re.search(rf"undone: plan {run_dir(STATE_DIR)}/plan.json: removed", log), log
        if in_injection:
            # Held back while PID 1 was stopped under us, seen before the swap: called off.
            assert "at the entry stop, before the swap: calling the injection off" in log, log
            assert re.search(rf"undone: RAM root {run_dir(STATE_DIR)}/root: unmounted", log)
        assert "undo finished" in log, log
        assert "committed" not in log, log
        print(f"\n{ending} at {phase}: exit status {status}; the log says:")
        print("".join(line for line in log.splitlines(True) if "undo" in line))
        assert status != PYTHON_FLUSH_FAILED, said
        # A terminal gone, by SIGHUP or by EIO, is an environment failure; SIGTERM and Ctrl-C
        # keep the shell's 128+N.
        expected = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
        assert status == expected.get(ending, 2), (ending, status, said)
    with pytest.raises(FileNotFoundError):
        os.stat(f"/proc/{pid}")  # the sandbox ended with the test, as sandboxes do


def test_the_undo_turns_disk_swap_back_on(tmp_path: Path) -> None:
    """The real switch turns disk swap off before the copy (lab mode forbids that here, so
    the test turns off a swap area of its own: 16 MiB on a loop device, never the host's).
    The undo must turn it back on, and the log must say so."""
    image = tmp_path / "swap.img"
    with image.open("wb") as image_file:
        image_file.truncate(16 << 20)
    subprocess.run(["mkswap", "-q", str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    runlog = RunLog(tmp_path / "dboot.log")
    try:
        subprocess.run(["swapon", loop], check=True)
        subprocess.run(["swapoff", loop], check=True)  # as preflight.swapoff_disk_swaps does
        assert loop not in active_swaps()
        lines = switch._Undo(runlog, swaps=[loop]).run("a test")
        assert loop in active_swaps()
        assert lines == [f"swap {loop}: turned back on"]
        log = (tmp_path / "dboot.log").read_text()
        assert f"undone: swap {loop}: turned back on" in log, log
    finally:
        runlog.close()
        subprocess.run(["swapoff", loop], capture_output=True, check=False)
        subprocess.run(["losetup", "-d", loop], check=False)
    assert loop not in active_swaps()


def active_swaps() -> list[str]:
    return [line.split()[0] for line in Path("/proc/swaps").read_text().splitlines()[1:]]


def test_a_failed_execve_rolls_back_then_undoes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """execve fails inside PID 1 (the stage command names a missing program: provoked, as
    the switch checks that the real one is reachable). PID 1 re-runs its own call; only then
    are the RAM root and the plan taken down, and the log says it in that order."""
    real_stage_command = switch._stage_command

    def missing_program(target: int, plan_path: Path) -> tuple[str, list[str], list[str]]:
        _, argv, envp = real_stage_command(target, plan_path)
        return "/nonexistent/dboot-python", argv, envp

    monkeypatch.setattr(switch, "_stage_command", missing_program)
    log_file = tmp_path / "dboot.log"
    with ParkedSandbox(services=1, console="capture") as sandbox:
        pid = sandbox.pid
        exe_before = os.readlink(f"/proc/{pid}/exe")
        options = switch.SwitchOptions(
            "tinybox", ["/bin/sh"], target_pid=pid, yes=True, grace=1,
            state_dir=Path(STATE_DIR), log_file=log_file,
        )  # fmt: skip
        with pytest.raises(ptrace.InjectionRolledBack, match="ENOENT"):
            list(switch.run(options))
        assert "dboot" not in mounted_sources(pid)
        assert not list(Path(f"/proc/{pid}/root{STATE_DIR}").glob("run-*"))
        assert tracer_of(pid) == 0 and os.readlink(f"/proc/{pid}/exe") == exe_before
        assert sandbox.request_exit() == EXIT_ON_SIGUSR1  # still its own code
    log = log_file.read_text()
    rolled_back = log.index("restored the registers")
    undoing = log.index("undoing (InjectionRolledBack")
    plan_removed = re.search(rf"undone: plan {run_dir(STATE_DIR)}/plan.json: removed", log)
    assert plan_removed is not None and rolled_back < undoing < plan_removed.start(), log
    assert re.search(rf"undone: RAM root {run_dir(STATE_DIR)}/root: unmounted", log), log
    assert "committed: PID" not in log, log


@contextlib.contextmanager
def pid1_sharing_our_mount_namespace() -> Iterator[int]:
    """PID 1 of a new PID namespace in our own mount namespace, as the host's PID 1 shares
    dboot's: the RAM root is then prepared by a thread of dboot, not by a forked child."""
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", BUSYBOX, "sleep", "600"],
        stdin=subprocess.DEVNULL,
    )
    try:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
        assert eventually(lambda: children.read_text().split() != [], 10)
        (pid,) = (int(word) for word in children.read_text().split())
        assert eventually(lambda: os.path.realpath(f"/proc/{pid}/exe") == BUSYBOX, 10)
        yield pid
    finally:
        unshare.kill()  # --kill-child: its PID 1 goes with it
        unshare.wait(10)


def test_an_ending_in_our_own_mount_namespace_undoes_everything(tmp_path: Path) -> None:
    """The real switch's case: PID 1 shares dboot's mount namespace, and the copy runs in
    a thread of dboot that only notices a cancel at its next event."""
    state_dir = tmp_path / "state"
    with pid1_sharing_our_mount_namespace() as pid:
        try:
            status, said = end_a_switch_on_a_pty(
                pid,
                str(state_dir),
                "copy",
                "pty closed",
                tmp_path,
                lambda: any(os.path.ismount(run / "root") for run in state_dir.glob("run-*")),
                "1",  # the copy thread must go on to its next event to see the cancel
            )
        finally:
            for run in state_dir.glob("run-*"):
                if os.path.ismount(run / "root"):
                    subprocess.run(["umount", "-l", str(run / "root")], check=False)
        assert not state_dir.exists(), said  # made for the run, with its subdirectory
        assert os.path.realpath(f"/proc/{pid}/exe") == BUSYBOX and tracer_of(pid) == 0
    log = (tmp_path / "dboot.log").read_text()
    assert "undoing (EndingSignal: SIGHUP received)" in log, log
    assert re.search(rf"undone: RAM root {run_dir(state_dir)}/root:", log), log
    assert "undo finished" in log and "committed" not in log, log
    assert status != PYTHON_FLUSH_FAILED, said
