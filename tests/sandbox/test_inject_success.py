"""A successful injection: the same PID 1 runs the new program, whatever it was doing.

Every target is PID 1 of a PID namespace the test creates (tests/sandbox/parking.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

import pytest

from injector.inject import arch as archmod
from injector.inject.ptrace import inject_execve
from tests.sandbox import parking
from tests.sandbox.parking import StandIn, ns_pid

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace into a new PID namespace needs root"),
]

ARCH = archmod.host_arch()
BUSYBOX = shutil.which("busybox") or "/bin/busybox"

# (stand-in body, the call it blocks in or None when busy, what we expect to replace)
IDLE_WAYS = {
    "read": (parking.READ_ECHO, "read", "read"),
    "epoll_wait": (parking.EPOLL_ECHO, "epoll_wait", "epoll_wait"),
    "wait4": (parking.WAIT4, "wait4", "wait4"),
    "nanosleep-relative": (parking.SLEEP_RELATIVE, "clock_nanosleep", "restart_syscall"),
    "sleep-absolute": (parking.SLEEP_ABSOLUTE, "clock_nanosleep", "clock_nanosleep"),
    "busy": (parking.BUSY, None, "getpid"),
}


def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while not (path.exists() and path.read_text().endswith("\n")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} was not written")
        time.sleep(0.01)
    return path.read_text()


@pytest.mark.parametrize("way", IDLE_WAYS)
def test_injected_pid1_runs_the_new_program(way: str, tmp_path: Path) -> None:
    body, blocked_in, replaced = IDLE_WAYS[way]
    proof = tmp_path / "proof"
    script = f'echo injected $$ "$DBOOT_MARK" > {proof}; exec {BUSYBOX} sleep 600'
    with StandIn(body) as init:
        if blocked_in is not None:
            init.wait_blocked_in(archmod.syscall_number(ARCH, blocked_in))
        host_pid = init.pid
        log: list[str] = []
        report = inject_execve(
            host_pid,
            BUSYBOX,
            ["sh", "-c", script],
            ["PATH=/usr/bin:/bin", f"DBOOT_MARK={way}"],
            log.append,
        )

        # Same host pid, still PID 1 of its namespace, now the new program.
        assert wait_for_file(proof) == f"injected 1 {way}\n"
        assert os.path.realpath(f"/proc/{host_pid}/exe") == os.path.realpath(BUSYBOX)
        assert ns_pid(host_pid) == 1

        assert report.outcome == "executed"
        assert report.interrupted_syscall == (blocked_in or replaced)
        assert report.replaced_syscall == replaced
        if ARCH.name == "x86_64":
            assert report.registers_before["rax"] == -errno.ENOSYS  # as at every entry stop
        # "after" is the swap itself: same place, same stack, execve and its arguments,
        # which live below the stack pointer, past the red zone.
        after, before = report.registers_after, report.registers_before
        assert after[ARCH.ip] == before[ARCH.ip] and after[ARCH.sp] == before[ARCH.sp]
        assert after[ARCH.kernel_nr_field or ARCH.nr] == ARCH.execve_nr
        assert all(after[arg] < after[ARCH.sp] - ARCH.red_zone for arg in ARCH.args[:3])
        assert any(line.startswith("exec event") for line in log), log
        assert 0 < report.elapsed_ms < 2000
        print(f"\n{way}: injection {report.elapsed_ms:.2f} ms ({report.replaced_syscall})")


def test_report_becomes_an_injection_event() -> None:
    with StandIn(parking.READ_ECHO) as init:
        init.wait_blocked_in(archmod.syscall_number(ARCH, "read"))
        report = inject_execve(init.pid, BUSYBOX, ["sleep", "600"], [], lambda line: None)
        event = report.to_event()
        assert (event.pid, event.arch, event.interrupted_syscall) == (init.pid, ARCH.name, "read")
        assert event.registers_before == report.registers_before
        assert os.path.realpath(f"/proc/{init.pid}/exe") == os.path.realpath(BUSYBOX)
