"""Ending every other process: SIGTERM, poll, SIGKILL, reap, and name what will not die.

The decisions (when to escalate, when to give up, what to report) live in
:func:`terminate_all`, which takes its process table, signals, clock and sleep as
arguments so that unit tests can drive it with fake process tables. :class:`ProcTable`
and :class:`KernelSignals` are the real ones, used by the stage as PID 1.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

# include/linux/sched.h: the task is a kernel thread. The flag, not "PPID 2": in a
# sandbox's PID namespace pid 2 is an ordinary service with ordinary children.
PF_KTHREAD = 0x00200000
# States of a task that is already dead: Z(ombie), X (dead), x (dead, old kernels).
DEAD_STATES = frozenset("ZXx")

STATE_NAMES = {
    "R": "running",
    "S": "sleeping",
    "D": "uninterruptible sleep: stuck in the kernel, usually on I/O or a frozen cgroup",
    "T": "stopped",
    "t": "traced",
    "I": "idle",
}


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    comm: str
    state: str
    kernel_thread: bool = False

    def describe(self) -> str:
        """One phrase naming the process, e.g. ``pid 42 (nfs-writer) state D (uninterr...)``."""
        meaning = STATE_NAMES.get(self.state)
        return f"pid {self.pid} ({self.comm}) state {self.state}" + (
            f" ({meaning})" if meaning else ""
        )


def parse_stat(pid: int, raw: bytes) -> ProcInfo:
    """Parse /proc/PID/stat. comm may contain spaces and ')': it ends at the LAST ')'."""
    text = raw.decode("utf-8", "replace")
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    # After the comm: state ppid pgrp session tty_nr tpgid flags ...
    state, ppid, flags = fields[0], int(fields[1]), int(fields[6])
    return ProcInfo(pid, ppid, comm, state, kernel_thread=bool(flags & PF_KTHREAD))


class ProcessTable(Protocol):
    def others(self) -> list[ProcInfo]:
        """Every process that still has to go: not us, not a kernel thread, not dead."""
        ...


class Signals(Protocol):
    def send_all(self, sig: int) -> None: ...

    def reap(self) -> int:
        """Collect every exited child without blocking; return how many."""
        ...


class ProcTable:
    """The live processes of our PID namespace, from a procfs mounted for it."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.own_pid = os.getpid()

    def others(self) -> list[ProcInfo]:
        found = []
        for name in os.listdir(self.proc):
            if not name.isdigit() or int(name) == self.own_pid:
                continue
            try:
                with open(f"{self.proc}/{name}/stat", "rb") as stat_file:
                    info = parse_stat(int(name), stat_file.read())
            except (OSError, ValueError):
                continue  # it exited between listdir and open: gone is what we want
            if not info.kernel_thread and info.state not in DEAD_STATES:
                found.append(info)
        return found


class KernelSignals:
    """kill(-1) and waitpid(WNOHANG). Only ever used by the stage while it is PID 1."""

    def send_all(self, sig: int) -> None:
        if os.getpid() != 1:  # belt and braces: kill(-1) outside PID 1 hits the whole host
            raise RuntimeError("refusing kill(-1): not PID 1")
        with contextlib.suppress(ProcessLookupError):  # ESRCH: nobody else is left
            os.kill(-1, sig)

    def reap(self) -> int:
        reaped = 0
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return reaped
            if pid == 0:
                return reaped
            reaped += 1


@dataclass
class TerminateReport:
    initial: int = 0  # processes there were when we started
    reaped: int = 0
    ignored_term: list[ProcInfo] = field(default_factory=list)  # alive at the end of the grace
    survivors: list[ProcInfo] = field(default_factory=list)  # alive even after SIGKILL
    term_seconds: float = 0.0  # time until all were gone, or the grace ran out
    total_seconds: float = 0.0


# Poll fast at first (most services exit within milliseconds of SIGTERM), then
# settle at 10 ms so a long grace period costs little CPU.
FIRST_POLL = 0.001
MAX_POLL = 0.010


def _wait_until_gone(
    table: ProcessTable,
    signals: Signals,
    deadline: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    report: TerminateReport,
) -> list[ProcInfo]:
    interval = FIRST_POLL
    while True:
        report.reaped += signals.reap()
        remaining = table.others()
        if not remaining:
            return []
        now = clock()
        if now >= deadline:
            return remaining
        sleep(min(interval, deadline - now))
        interval = min(interval * 2, MAX_POLL)


def terminate_all(
    table: ProcessTable,
    signals: Signals,
    grace: float,
    kill_timeout: float,
    log: Callable[[str], None],
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> TerminateReport:
    """SIGTERM everyone, poll until gone or ``grace`` ends, SIGKILL the rest, poll again
    for at most ``kill_timeout``, and name the survivors instead of hanging on them."""
    report = TerminateReport()
    start = clock()
    report.initial = len(table.others())
    signals.send_all(signal.SIGTERM)
    signals.send_all(signal.SIGCONT)  # a stopped process cannot act on its SIGTERM
    remaining = _wait_until_gone(table, signals, start + grace, clock, sleep, report)
    report.term_seconds = clock() - start
    if remaining:
        report.ignored_term = remaining
        log(
            f"{len(remaining)} still running after the {grace:g} s grace period, SIGKILL: "
            + ", ".join(info.describe() for info in remaining[:10])
            + (" ..." if len(remaining) > 10 else "")
        )
        signals.send_all(signal.SIGKILL)
        remaining = _wait_until_gone(table, signals, clock() + kill_timeout, clock, sleep, report)
    report.survivors = remaining
    for info in remaining:
        log(f"will not die, going on without it: {info.describe()}")
    report.total_seconds = clock() - start
    return report
