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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from initstage.mounts import Mount, read_mounts

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
    live_threads: int = 0  # threads still running while the main thread is a zombie

    def describe(self) -> str:
        """One phrase naming the process, e.g. ``pid 42 (nfs-writer) state D (uninterr...)``."""
        meaning = STATE_NAMES.get(self.state)
        if self.live_threads:
            meaning = f"main thread exited, {self.live_threads} threads still running"
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

    def __init__(self, proc: str = "/proc", ignore: list[int] | None = None) -> None:
        self.proc = proc
        self.own_pid = os.getpid()
        self.ignore = {self.own_pid, *(ignore or [])}

    def others(self) -> list[ProcInfo]:
        found = []
        for name in os.listdir(self.proc):
            if not name.isdigit() or int(name) in self.ignore:
                continue
            try:
                with open(f"{self.proc}/{name}/stat", "rb") as stat_file:
                    info = parse_stat(int(name), stat_file.read())
            except (OSError, ValueError):
                continue  # it exited between listdir and open: gone is what we want
            if info.kernel_thread:
                continue
            if info.state in DEAD_STATES:
                # A zombie main thread says nothing of the others: the process lives on
                # (and keeps its files open) until its last thread exits.
                threads = self.live_threads(info.pid)
                if not threads:
                    continue
                info = ProcInfo(info.pid, info.ppid, info.comm, info.state, live_threads=threads)
            found.append(info)
        return found

    def live_threads(self, pid: int) -> int:
        try:
            tids = os.listdir(f"{self.proc}/{pid}/task")
        except OSError:
            return 0
        live = 0
        for tid in tids:
            try:
                with open(f"{self.proc}/{pid}/task/{tid}/stat", "rb") as stat_file:
                    if parse_stat(int(tid), stat_file.read()).state not in DEAD_STATES:
                        live += 1
            except (OSError, ValueError):
                continue
        return live


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


class Cgroups(Protocol):
    def thaw(self, processes: list[ProcInfo]) -> list[str]:
        """Thaw the frozen cgroups that hold these processes; name what was thawed."""
        ...

    def kill(self, processes: list[ProcInfo]) -> list[str]:
        """cgroup.kill the cgroups of these processes that hold nothing but ours."""
        ...


class KernelCgroups:
    """The cgroup freezers (v1 and v2) and cgroup.kill, for the processes of our PID
    namespace only: in a sandbox the cgroup tree is the host's, and a cgroup.kill on a
    group that also holds host processes would kill them. A cgroup is killed only when
    every process in its subtree is visible here (outside ones read as pid 0) and none
    is us."""

    def __init__(self, proc: str = "/proc", mounts: list[Mount] | None = None) -> None:
        self.proc = proc
        self.own_pid = os.getpid()
        every = read_mounts(f"{proc}/self/mountinfo") if mounts is None else mounts
        self.v2 = [mount for mount in every if mount.fstype == "cgroup2"]
        self.v1_freezer = [
            mount
            for mount in every
            if mount.fstype == "cgroup" and "freezer" in mount.super_options
        ]

    def _dirs(self, pid: int) -> Iterator[tuple[str, str]]:
        """("v1" or "v2", directory) of each freezer-capable cgroup of ``pid``."""
        try:
            with open(f"{self.proc}/{pid}/cgroup", "rb") as cgroup_file:
                lines = cgroup_file.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return
        for line in lines:
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and controllers == "":
                yield from (("v2", found) for found in _under(self.v2, path))
            elif "freezer" in controllers.split(","):
                yield from (("v1", found) for found in _under(self.v1_freezer, path))

    def thaw(self, processes: list[ProcInfo]) -> list[str]:
        thawed: list[str] = []
        for info in processes:
            for version, directory in self._dirs(info.pid):
                for ancestor in _self_and_ancestors(directory, version, self.v2 + self.v1_freezer):
                    if ancestor not in thawed and _thaw_one(version, ancestor):
                        thawed.append(ancestor)
        return thawed

    def kill(self, processes: list[ProcInfo]) -> list[str]:
        killed: list[str] = []
        for info in processes:
            for version, directory in self._dirs(info.pid):
                control = f"{directory}/cgroup.kill"
                if version != "v2" or directory in killed or not os.path.exists(control):
                    continue
                if self._only_ours(directory):
                    with contextlib.suppress(OSError):
                        _write(control, "1")
                        killed.append(directory)
        return killed

    def _only_ours(self, directory: str) -> bool:
        for here, _subdirs, files in os.walk(directory):
            if "cgroup.procs" not in files:
                continue
            try:
                with open(f"{here}/cgroup.procs", "rb") as procs:
                    pids = [int(pid) for pid in procs.read().split()]
            except (OSError, ValueError):
                return False
            if any(pid in (0, self.own_pid) for pid in pids):
                return False
        return True


def _under(mounts: list[Mount], path: str) -> Iterator[str]:
    """Where cgroup ``path`` (as /proc/PID/cgroup names it) appears in these mounts."""
    for mount in mounts:
        root = mount.root.rstrip("/")
        if path == mount.root or path.startswith(root + "/"):
            yield mount.mount_point.rstrip("/") + path[len(root) :]


def _self_and_ancestors(directory: str, version: str, mounts: list[Mount]) -> Iterator[str]:
    """A frozen ancestor freezes its whole subtree: thawing it is the only way out."""
    tops = {mount.mount_point.rstrip("/") for mount in mounts}
    here = directory.rstrip("/")
    while here and here not in tops:
        yield here
        here = os.path.dirname(here)


def _thaw_one(version: str, directory: str) -> bool:
    control, thawed = ("cgroup.freeze", "0") if version == "v2" else ("freezer.state", "THAWED")
    try:
        with open(f"{directory}/{control}", "rb") as state:
            current = state.read().decode().strip()
        if current == thawed:
            return False
        _write(f"{directory}/{control}", thawed)
    except OSError:
        return False
    return True


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@dataclass
class TerminateReport:
    initial: int = 0  # processes there were when we started
    reaped: int = 0
    thawed: list[str] = field(default_factory=list)  # frozen cgroups thawed before SIGTERM
    cgroups_killed: list[str] = field(default_factory=list)  # cgroup.kill written
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
            # The table skips zombies: those that died since the reap above are collected
            # now, so none is handed to the new init (which may never reap it).
            report.reaped += signals.reap()
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
    cgroups: Cgroups | None = None,
) -> TerminateReport:
    """Thaw frozen cgroups, SIGTERM everyone, poll until gone or ``grace`` ends, then
    SIGKILL whatever is left (always: kill(-1) reaches what /proc may not show), poll
    again for at most ``kill_timeout``, and name the survivors instead of hanging on them."""
    report = TerminateReport()
    start = clock()
    initial = table.others()
    report.initial = len(initial)
    if cgroups is not None:
        # A frozen process can act on neither SIGTERM nor (cgroup v1) SIGKILL.
        report.thawed = cgroups.thaw(initial)
        if report.thawed:
            log(f"thawed frozen cgroups: {', '.join(report.thawed)}")
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
        if cgroups is not None:
            report.cgroups_killed = cgroups.kill(remaining)
            if report.cgroups_killed:
                log(f"cgroup.kill: {', '.join(report.cgroups_killed)}")
    signals.send_all(signal.SIGKILL)
    remaining = _wait_until_gone(table, signals, clock() + kill_timeout, clock, sleep, report)
    report.survivors = remaining
    for info in remaining:
        log(f"will not die, going on without it: {info.describe()}")
    report.total_seconds = clock() - start
    return report
