"""Rounds of failed injections into a PID 1 blocked in ``read()``: the rollback proof.

One code path for two places: the sandbox tier runs it on this machine
(tests/sandbox/test_inject_rollback.py), and the VM tier inside the arm64 guest, where
``python -m tests.sandbox.rollback ROUNDS`` runs on Debian's Python 3.11.2 with docker-boot
installed (tests/vm/build.py copies this module, ``parking``, ``parked`` and their packages there).
Standard library and docker-boot only: the guest has no pytest.

Each round injects ``execve`` of a path that does not exist into the stand-in PID 1 of a new
PID namespace; execve fails with ENOENT, the injector rewinds PID 1 into its own ``read()``,
and PID 1 must then get every byte written to its pipe, with no EINTR in between.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable

from injector.inject import arch as archmod
from injector.inject.ptrace import InjectionRolledBack, inject_execve
from tests.sandbox.parking import READ_ECHO, StandIn, syscall_in_progress

MISSING = "/nonexistent/dboot-rollback-test"
ARCH = archmod.host_arch()
READ = archmod.syscall_number(ARCH, "read")

Log = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


class RollbackFailed(AssertionError):
    """PID 1 noticed the injection, or the injector did not roll back as it must."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise RollbackFailed(what)


def fail_to_inject(pid: int, log: Log = _quiet) -> InjectionRolledBack:
    """Inject an execve of a path that does not exist; return the rollback."""
    try:
        inject_execve(pid, MISSING, [MISSING, "--never"], ["DBOOT=1"], log)
    except InjectionRolledBack as rolled:
        return rolled
    raise RollbackFailed(f"execve of {MISSING} did not fail and roll back")


@dataclasses.dataclass
class Rounds:
    """What a run of rounds measured."""

    arch: str
    rounds: int
    latencies_ms: list[float]
    seconds: float
    last: InjectionRolledBack

    def summary(self) -> str:
        mean = sum(self.latencies_ms) / len(self.latencies_ms)
        return (
            f"arch={self.arch} rounds={self.rounds} total_s={self.seconds:.2f} "
            f"min_ms={min(self.latencies_ms):.2f} mean_ms={mean:.2f} "
            f"max_ms={max(self.latencies_ms):.2f}"
        )


def read_rounds(init: StandIn, rounds: int, on_round: Log = _quiet) -> Rounds:
    """``rounds`` failed injections into ``init`` (a READ_ECHO stand-in), each followed by an
    echo through PID 1's pipe; then the rewind's registers are checked. Raises RollbackFailed."""
    init.wait_blocked_in(READ)
    before = init.pid
    started = time.monotonic()
    latencies: list[float] = []
    for round_ in range(rounds):
        rolled = fail_to_inject(init.pid)
        latencies.append(rolled.report.elapsed_ms)
        # PID 1 gets exactly these bytes: no error ("<error 4>" is EINTR), nothing lost or doubled.
        message = f"ping {round_:03d};".encode()
        said = init.echo(message)
        check(said == message, f"round {round_}: PID 1 said {said!r}, not {message!r}")
        on_round(f"round {round_ + 1}/{rounds} ok {rolled.report.elapsed_ms:.2f} ms")
    seconds = time.monotonic() - started

    report = rolled.report
    check(init.pid == before and os.path.exists(f"/proc/{init.pid}"), "PID 1 is gone")
    check(rolled.exit_code == 2, f"exit code {rolled.exit_code}, not 2")
    check(report.arch == ARCH.name, f"the report names {report.arch!r}, not {ARCH.name}")
    check(report.outcome == "rolled-back", f"outcome {report.outcome}")
    check(report.error == "ENOENT", f"execve failed with {report.error}, not ENOENT")
    check(
        report.interrupted_syscall == report.replaced_syscall == "read",
        f"interrupted {report.interrupted_syscall}, replaced {report.replaced_syscall}",
    )
    # The rewind: same stack, instruction pointer back over the system call instruction, the
    # number register holding read's number (the kernel's own: -1, no restart fix-ups), the
    # arguments as they were.
    before_regs, after_regs = report.registers_before, report.registers_after
    check(
        after_regs[ARCH.ip] == before_regs[ARCH.ip] - ARCH.syscall_insn_len,
        f"{ARCH.ip} {after_regs[ARCH.ip]:#x}, expected {before_regs[ARCH.ip]:#x} - "
        f"{ARCH.syscall_insn_len}",
    )
    check(after_regs[ARCH.sp] == before_regs[ARCH.sp], f"{ARCH.sp} moved")
    check(after_regs[ARCH.nr] == READ, f"{ARCH.nr}={after_regs[ARCH.nr]}, not read ({READ})")
    changed = [name for name in ARCH.args[:3] if after_regs[name] != before_regs[name]]
    check(not changed, f"arguments changed: {changed}")
    check(syscall_in_progress(init.pid) == READ, "PID 1 is not back in read()")
    return Rounds(ARCH.name, rounds, latencies, seconds, rolled)


def main(argv: list[str]) -> int:
    """``python -m tests.sandbox.rollback [ROUNDS]``: "DBOOT-ROLLBACK: ..." lines, exit 0 or 1."""
    rounds = int(argv[1]) if len(argv) > 1 else 20

    def say(text: str) -> None:
        print(f"DBOOT-ROLLBACK: {text}", flush=True)

    say(f"start arch={platform.machine()} python={platform.python_version()} rounds={rounds}")
    try:
        with StandIn(READ_ECHO, ready_timeout=120) as init:
            result = read_rounds(init, rounds, say)
    except (RollbackFailed, OSError, TimeoutError, EOFError) as error:
        say(f"FAIL {type(error).__name__}: {error}")
        return 1
    registers = result.last.report.registers_after
    shown = " ".join(f"{name}={value:#x}" for name, value in registers.items())
    say(f"registers after the rewind: {shown}")
    say(f"done ok {result.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
