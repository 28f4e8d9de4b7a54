"""The switch's stop step, whatever does the stopping: the host's init (systemd, sysvinit,
runit) for a real switch, the sandbox's stand-in for a rehearsal, nobody for a ``--target-pid``
lab (a namespace's init is no service manager we can ask).

``host_plan`` is what the preflight reports; ``run_plan`` is read again by the step itself,
just before it acts (the services may have changed during the copy). ``stop`` asks the right
init and streams what it does; ``Restart`` is the step's undo.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING

from injector.events import Event, Log
from injector.preflight import procinfo
from injector.preflight.procinfo import PROC, Unreadable
from injector.stop import runit, systemd, sysv
from injector.stop.plan import (
    Candidate,
    PlanUnreadable,
    StopMode,
    StopOutcome,
    StopPlan,
    make_plan,
    none_plan,
    our_chain,
)

if TYPE_CHECKING:
    from injector.rehearsal.sandbox import Sandbox

STANDIN = "stand-in"


def host_manager(proc: Path = PROC, root: Path = Path("/")) -> str:
    """The service manager running as this machine's PID 1 that we know how to ask, or ""."""
    if (root / "run/systemd/system").is_dir():  # sd_booted(3): how systemd's own tools tell
        return "systemd"
    try:
        comm = (procinfo.read_text(proc / "1" / "comm") or "").strip()
    except Unreadable:
        comm = ""
    if comm in ("runit", "runit-init"):
        return "runit"
    if comm == "init" and (root / "etc/inittab").is_file() and (root / "etc/init.d").is_dir():
        return "sysvinit"
    return ""


def host_plan(
    mode: StopMode, timeout: float | None, proc: Path = PROC, root: Path = Path("/")
) -> StopPlan:
    """What a real switch of this machine would ask its init to stop (reads only)."""
    manager = host_manager(proc, root)
    if not manager:
        try:
            comm = (procinfo.read_text(proc / "1" / "comm") or "?").strip()
        except Unreadable:
            comm = "unreadable"
        return none_plan(
            mode,
            f"PID 1 is {comm}, no service manager dboot can ask (systemd, sysvinit, runit):"
            " every process gets the stage's SIGTERM, then SIGKILL",
            timeout,
        )
    chain = our_chain(proc)
    try:
        if manager == "systemd":
            return systemd.read_plan(mode, timeout, chain)
        if manager == "sysvinit":
            return sysv.read_plan(mode, timeout, chain, root)
        return runit.read_plan(mode, timeout, chain, root, proc=proc)
    except PlanUnreadable as error:
        return none_plan(mode, f"{error}: every process gets the stage's signals", timeout)


def standin_plan(kinds: list[str], mode: StopMode, timeout: float | None) -> StopPlan:
    """The sandbox's stand-in stops its services one by one, the last started first."""
    from injector.rehearsal import standin  # rehearsals only

    started = [standin.service_name(kind, number) for number, kind in enumerate(kinds, 1)]
    candidates = [
        Candidate(
            name,
            standin.STOP_TIMEOUTS[kind],
            standin.STOP_COMMANDS[kind],
            after=frozenset(started[index + 1 :]),
        )
        for index, (name, kind) in enumerate(zip(started, kinds))
    ]
    return make_plan(STANDIN, mode, candidates, [], timeout, scope="any")


def target_plan(mode: StopMode, timeout: float | None) -> StopPlan:
    return none_plan(
        mode,
        "--target-pid: the namespace's init is not asked to stop anything; its processes get"
        " the stage's SIGTERM, then SIGKILL",
        timeout,
    )


def run_plan(
    mode: str, stop_mode: StopMode, timeout: float | None, sandbox: Sandbox | None
) -> StopPlan:
    """The plan the stop step carries out, read afresh: ``mode`` is the switch's."""
    if sandbox is not None:
        return standin_plan(sandbox.kinds, stop_mode, timeout)
    if mode != "switch":
        return target_plan(stop_mode, timeout)
    return host_plan(stop_mode, timeout)


def stop(plan: StopPlan, sandbox: Sandbox | None = None) -> Generator[Event, None, StopOutcome]:
    """Have the plan's init stop its units; what it does as events, then what it did."""
    if plan.manager == STANDIN:
        assert sandbox is not None, "a stand-in's plan needs its sandbox"
        return (yield from _stop_standin(plan, sandbox))
    if plan.manager == "systemd":
        return (yield from systemd.stop(plan))
    if plan.manager == "sysvinit":
        return (yield from sysv.stop(plan))
    return (yield from runit.stop(plan))


def _stop_standin(plan: StopPlan, sandbox: Sandbox) -> Generator[Event, None, StopOutcome]:
    asked = [unit.name for unit in plan.units]
    stopped: list[tuple[str, float]] = []
    left: list[str] = []
    seconds = 0.0
    for line in sandbox.stop_services(plan.ceiling):
        words = line.split()
        if words[:1] == ["stopped"] and len(words) == 4:
            stopped.append((words[1], float(words[3])))
            yield Log(f"stopped {words[1]} after {float(words[3]):.2f} s")
        elif words[:1] == ["left"] and len(words) == 4:
            left.append(words[1])
            why = "its own timeout" if words[3] == "timeout" else "the ceiling"
            yield Log(f"{words[1]} still runs after {why}; left for the signals")
        elif words[:1] == ["done"] and len(words) == 2:
            seconds = float(words[1])
    return StopOutcome(asked, stopped, left, seconds)


@dataclasses.dataclass
class Restart:
    """The stop step's undo: the init starts again what it was asked to stop."""

    manager: str
    names: list[str]

    def __call__(self) -> list[str]:
        if self.manager == "systemd":
            return systemd.start_again(self.names)
        if self.manager == "sysvinit":
            return sysv.start_again(self.names)
        if self.manager == "runit":
            return runit.start_again(self.names)
        # A rehearsal's sandbox goes as a whole, its services with it.
        return []
