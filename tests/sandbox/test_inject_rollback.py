"""A failed execve must leave PID 1 exactly as it was: it re-runs its own system call.

Every target is PID 1 of a PID namespace the test creates (tests/sandbox/parking.py).
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from injector.errors import EnvironmentFailure
from injector.inject import arch as archmod
from injector.inject import ptrace
from injector.inject.ptrace import InjectionRolledBack, inject_execve
from tests.sandbox.parking import EPOLL_ECHO, READ_ECHO, SPIN, StandIn
from tests.sandbox.rollback import ARCH, MISSING, fail_to_inject, read_rounds

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace into a new PID namespace needs root"),
]


def test_failed_execve_rolls_back_so_read_reruns_100_times() -> None:
    """The same rounds the arm64 guest runs (tests/vm/test_vm_arm64.py), here on the host's
    architecture: PID 1 gets every byte, no EINTR, and the registers show the rewind."""
    with StandIn(READ_ECHO) as init:
        result = read_rounds(init, 100)
    print(f"\nrollback x100: {result.summary()}")
    assert result.seconds < 30, f"100 rollbacks took {result.seconds:.1f} s"


def test_rollback_restores_the_stack_bytes_it_borrowed() -> None:
    with StandIn(READ_ECHO) as init:
        init.wait_blocked_in(archmod.syscall_number(ARCH, "read"))
        # Read the area the injector will borrow while PID 1 sleeps (it is not running, so
        # the bytes are stable), then compare after the rollback.
        sp = int(Path(f"/proc/{init.pid}/syscall").read_text().split()[-2], 16)
        low = sp - 4096
        with open(f"/proc/{init.pid}/mem", "rb") as mem:
            mem.seek(low)
            original = mem.read(4096)
        rolled = fail_to_inject(init.pid)
        assert low <= rolled.report.scratch_address < sp - ARCH.red_zone
        with open(f"/proc/{init.pid}/mem", "rb") as mem:
            mem.seek(low)
            assert mem.read(4096) == original
        assert init.echo(b"still here") == b"still here"


def test_epoll_wait_sees_no_eintr_from_the_attach() -> None:
    """epoll_wait answers a ptrace interrupt with EINTR (ptrace(2), BUGS); the injector
    rewinds it at the interrupt stop, so PID 1 never sees the error."""
    with StandIn(EPOLL_ECHO) as init:
        for round_ in range(20):
            # Blocked in it, not on its way back there after the last echo.
            init.wait_blocked_in(archmod.syscall_number(ARCH, "epoll_wait"))
            log: list[str] = []
            report = fail_to_inject(init.pid, log.append).report
            assert report.interrupted_syscall == report.replaced_syscall == "epoll_wait"
            assert any("rewound it to run again" in line for line in log), log
            message = f"epoll {round_};".encode()
            said = init.echo(message)
            assert said == message, f"PID 1 saw {said!r}"


@pytest.mark.parametrize("when", ["interrupt stop", "swapped"])
def test_signals_arriving_during_injection_still_reach_pid1(when: str) -> None:
    """SIGUSR1 sent while PID 1 is stopped under us: its handler must still run.

    At the interrupt stop, the signal is delivered on the next resume: the injector sees
    a signal-delivery-stop and hands the signal back. At the entry stop (after the swap),
    it stays pending through the failed execve and arrives after the detach.
    """
    with StandIn(READ_ECHO) as init:
        init.wait_blocked_in(archmod.syscall_number(ARCH, "read"))
        sent: list[str] = []

        def log(line: str) -> None:
            if line.startswith(when) and not sent:
                os.kill(init.pid, signal.SIGUSR1)
                sent.append(line)

        report = fail_to_inject(init.pid, log).report
        assert sent, "the hook never fired"
        said = init.echo(b"after the signal")
        assert b"<usr1>" in said
        if when == "interrupt stop":
            assert report.reinjected_signals == ["SIGUSR1"]
            # The handler's return (rt_sigreturn) was the next system call.
            assert report.replaced_syscall == "rt_sigreturn"
            # read() really was interrupted by a handled signal: EINTR is the truth here.
            assert said.replace(b"<error 4>", b"") == b"<usr1>after the signal"
        else:
            assert report.reinjected_signals == []
            # The restarted read() runs again after the handler, so no EINTR at all.
            assert said == b"<usr1>after the signal"


def tracer_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(
        next(line for line in status.splitlines() if line.startswith("TracerPid:")).split()[1]
    )


def test_failure_at_the_entry_stop_undoes_the_swap(monkeypatch: pytest.MonkeyPatch) -> None:
    """The register write that swaps in execve fails (provoked: the kernel would not fail it
    here on its own). The injector puts back memory and registers and detaches; the
    original read() then runs as if nothing happened."""
    real_set_regs = ptrace._Tracee.set_regs
    calls = []

    def set_regs_failing_once(self: ptrace._Tracee, edit: archmod.RegisterEdit) -> None:
        calls.append(edit)
        if len(calls) == 1:
            raise OSError(errno.EIO, "provoked PTRACE_SETREGSET failure")
        real_set_regs(self, edit)

    monkeypatch.setattr(ptrace._Tracee, "set_regs", set_regs_failing_once)
    with StandIn(READ_ECHO) as init:
        init.wait_blocked_in(archmod.syscall_number(ARCH, "read"))
        log: list[str] = []
        with pytest.raises(EnvironmentFailure, match="provoked") as caught:
            inject_execve(init.pid, MISSING, [MISSING], [], log.append)
        assert not isinstance(caught.value, InjectionRolledBack)
        assert len(calls) == 2, "the undo must rewrite the saved registers"
        assert tracer_of(init.pid) == 0
        assert any(line.startswith("detached") for line in log), log
        assert init.echo(b"as before") == b"as before"


def test_target_that_makes_no_syscall_is_left_running() -> None:
    with StandIn(SPIN) as init:
        with pytest.raises(EnvironmentFailure, match=r"made no system call within 0\.3 s"):
            inject_execve(init.pid, MISSING, [MISSING], [], lambda line: None, entry_timeout=0.3)
        assert tracer_of(init.pid) == 0
        state = Path(f"/proc/{init.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert state == "R", f"PID 1 should still spin, it is in state {state}"
