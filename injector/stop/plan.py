"""The stop plan: which services the host's init stops before the injection, in which order,
each with its own timeout; the worst case; and what keeps running, and why.

The plan is plain data, the same for every init (systemd, sysvinit, runit, the rehearsal's
stand-in): the preflight reports it (``dboot check``, the wizard's Processes step), and the
switch's stop step re-reads it just before acting, since the services may have changed
during the copy.

**Order.** Units of one *step* stop side by side; a step starts once the one before it is
done. For systemd the steps are its own ordering, reversed, among the units that stop:
``A After=B`` starts A after B, so A stops before B. sysvinit's scripts run one by one (a
step each), runit's services all at once (one step).

**Worst case.** Each unit may take its own timeout once per phase of its stop (systemd:
its ``ExecStop=`` commands, then the signal, each bounded by ``TimeoutStopSec=``). The worst
case of the whole stop is the longest chain of those through the steps, a unit with no
timeout of its own counting as ``DEFAULT_CEILING_CAP``. The **ceiling** bounds the whole
stop: ``--stop-timeout``, else the worst case capped at 5 minutes. Past it the switch goes
on, names what did not stop, and the stage's SIGTERM and SIGKILL end it.

**What keeps running** (on every init): the user's session and the SSH server it came
through (the units of our ancestors), the network daemons (addresses and leases stay), the
firewall (its rules stay), the init's own plumbing (journal, D-Bus, logind, udev) and
docker-boot itself.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Literal, TypeVar

from injector.errors import BadInput
from injector.events import Fact, Level, Notice, Scope
from injector.preflight import procinfo
from injector.preflight.procinfo import PROC, Unreadable
from injector.units import duration_text

T = TypeVar("T")
StopMode = Literal["graceful", "signal"]
STOP_MODES: tuple[StopMode, ...] = ("graceful", "signal")
DEFAULT_STOP_MODE: StopMode = "graceful"
DEFAULT_CEILING_CAP = 300.0  # the default ceiling: what the units allow, at most 5 minutes
MAX_STOP_TIMEOUT = 3600.0

INIT_PLUMBING = "the init's own plumbing (logins, journal, D-Bus, devices)"
EARLY_BOOT = "early-boot plumbing (DefaultDependencies=no), which the init itself stops last"
# Kept by name on every init, with the reason the plan gives. Patterns match the unit's or
# the script's name without its suffix (``.service``, ``.socket``...).
KEPT_BY_NAME: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "a network daemon: the addresses and leases stay",
        (
            "systemd-networkd", "systemd-networkd-wait-online", "systemd-resolved",
            "NetworkManager", "NetworkManager-wait-online", "network-manager", "networking",
            "ifup@*", "ifupdown*", "dhclient*", "dhcpcd*", "wpa_supplicant*", "iwd",
            "connman*", "netplan*", "systemd-networkd.socket",
        ),
    ),
    (
        "the firewall: its rules stay",
        ("nftables", "netfilter-persistent", "iptables", "ip6tables", "ufw", "firewalld",
         "ferm", "shorewall*"),
    ),
    (
        INIT_PLUMBING,
        ("dbus", "dbus-broker", "systemd-journald", "systemd-logind", "systemd-udevd",
         "systemd-user-sessions", "udev", "eudev", "dbus.socket", "systemd-journald*.socket",
         "systemd-udevd-*.socket"),
    ),
)  # fmt: skip


class PlanUnreadable(Exception):
    """The init would not tell us its units (its tool failed): the plan cannot be made."""


@dataclasses.dataclass(frozen=True)
class UnitStop:
    """One unit the init stops. ``step`` 1 stops first; units of one step stop side by side.
    ``timeout`` is its own bound per phase (seconds; None: it has none), ``worst`` all its
    phases together as the plan counts them; ``command`` says how it stops."""

    name: str
    step: int
    timeout: float | None
    worst: float
    command: str


@dataclasses.dataclass(frozen=True)
class KeptUnit:
    name: str
    why: str


@dataclasses.dataclass
class StopPlan:
    """``manager``: the init that stops them ("systemd", "sysvinit", "runit", "stand-in"),
    "" when there is none we know (then ``note`` says why and everything gets the signals)."""

    manager: str
    mode: StopMode
    units: list[UnitStop]
    kept: list[KeptUnit]
    worst_case: float
    ceiling: float
    note: str = ""
    scope: Scope = "host"  # a sandbox's plan is "any": a rehearsal acts on it

    @property
    def stops(self) -> bool:
        """Will the stop step ask the init for anything?"""
        return self.mode == "graceful" and bool(self.manager) and bool(self.units)

    @property
    def steps(self) -> int:
        return max((unit.step for unit in self.units), default=0)

    def fate(self, unit: str) -> str:
        """What happens to a unit's processes, in a few words: "stop 2/5" (step), "kept"
        or "signals" (the stage's SIGTERM, then SIGKILL)."""
        if self.stops:
            for planned in self.units:
                if planned.name == unit:
                    return f"stop {planned.step}/{self.steps}"
        if any(kept.name == unit for kept in self.kept):
            return "kept"
        return "signals"


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A unit that would stop, before the plan orders it: ``after`` names the units that must
    have stopped before it starts stopping; ``phases`` how many times its timeout may run."""

    name: str
    timeout: float | None
    command: str
    phases: int = 1
    after: frozenset[str] = frozenset()


@dataclasses.dataclass
class StopOutcome:
    """What a stop did: ``asked`` every unit a stop was asked of, in plan order (the undo
    starts these again); ``stopped`` (unit, seconds from the start) in the order they
    stopped; ``left`` those still running at the ceiling, which the stage's signals end."""

    asked: list[str]
    stopped: list[tuple[str, float]]
    left: list[str]
    seconds: float


def check_stop_options(mode: str, timeout: float | None) -> None:
    """The rules of ``--stop`` and ``--stop-timeout``, before anything is read."""
    if mode not in STOP_MODES:
        raise BadInput(f"--stop={mode} is not a stop mode", "give --stop=graceful or --stop=signal")
    if timeout is not None and not (math.isfinite(timeout) and 0 <= timeout <= MAX_STOP_TIMEOUT):
        raise BadInput(
            f"stop timeout {timeout:g} s is not between 0 and {MAX_STOP_TIMEOUT:.0f} s",
            "give --stop-timeout in seconds, e.g. 120 (leave it out: what the units allow, at"
            f" most {DEFAULT_CEILING_CAP:.0f} s)",
        )


def make_plan(
    manager: str,
    mode: StopMode,
    candidates: Iterable[Candidate],
    kept: Iterable[KeptUnit],
    timeout: float | None,
    *,
    note: str = "",
    scope: Scope = "host",
) -> StopPlan:
    """Order the candidates into steps and bound the stop (see the module's docstring)."""
    by_name = {candidate.name: candidate for candidate in candidates}
    steps = order_steps({name: c.after & by_name.keys() for name, c in by_name.items()})
    finish: dict[str, float] = {}
    for name in sorted(by_name, key=lambda unit: (steps[unit], unit)):
        candidate = by_name[name]
        before = [finish[other] for other in candidate.after if other in finish]
        finish[name] = unit_worst(candidate) + max(before, default=0.0)
    worst_case = max(finish.values(), default=0.0)
    units = [
        UnitStop(name, steps[name], by_name[name].timeout, unit_worst(by_name[name]),
                 by_name[name].command)
        for name in sorted(by_name, key=lambda unit: (steps[unit], unit))
    ]  # fmt: skip
    ceiling = min(worst_case, DEFAULT_CEILING_CAP) if timeout is None else timeout
    kept_sorted = sorted(kept, key=lambda unit: unit.name)
    return StopPlan(manager, mode, units, kept_sorted, worst_case, ceiling, note, scope)


def unit_worst(candidate: Candidate) -> float:
    per_phase = DEFAULT_CEILING_CAP if candidate.timeout is None else candidate.timeout
    return per_phase * candidate.phases


def order_steps(must_wait_for: Mapping[str, Iterable[str]]) -> dict[str, int]:
    """unit -> step (1 first): each unit one step after the latest of those it waits for.
    An ordering cycle (an init breaks those too) is cut at its first unit by name."""
    waits = {name: set(others) - {name} for name, others in must_wait_for.items()}
    steps: dict[str, int] = {}
    while len(steps) < len(waits):
        ready = [n for n in waits if n not in steps and all(o in steps for o in waits[n])]
        if not ready:  # a cycle: take the first unit left, as if its waits were met
            ready = [min(n for n in waits if n not in steps)]
        for name in sorted(ready):
            steps[name] = 1 + max((steps[o] for o in waits[name] if o in steps), default=0)
    return steps


def none_plan(mode: StopMode, note: str, timeout: float | None = None) -> StopPlan:
    """Nothing for an init to stop: everything gets the stage's signals; ``note`` says why."""
    return make_plan("", mode, [], [], timeout, note=note)


def kept_by_name(name: str) -> str | None:
    """Why a unit or script is kept on every init, or None: see ``KEPT_BY_NAME``."""
    for reason, patterns in KEPT_BY_NAME:
        bare = name.rsplit(".", 1)[0] if name.endswith((".service", ".scope")) else name
        if any(fnmatch.fnmatchcase(bare, pattern) for pattern in patterns):
            return reason
    return None


# --- Our own chain of processes ------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Ancestor:
    """We, our parent, ... up to PID 1: what must keep running for this run and its session."""

    pid: int
    comm: str
    cgroup: str  # /proc/PID/cgroup as read


def our_chain(proc: Path = PROC, pid: int | None = None) -> list[Ancestor]:
    """This process and its ancestors, PID 1 left out (the init itself is never stopped)."""
    import os

    chain: list[Ancestor] = []
    current: int | None = os.getpid() if pid is None else pid
    while current is not None and current > 1 and all(a.pid != current for a in chain):
        try:
            stat = procinfo.read_stat(current, proc)
            cgroup = procinfo.read_text(proc / str(current) / "cgroup") or ""
        except Unreadable:
            break
        if stat is None:
            break
        chain.append(Ancestor(current, stat.comm, cgroup))
        current = stat.ppid
    return chain


def cgroup_units(cgroup: str) -> list[str]:
    """Every systemd unit on a process's cgroup path (v2 ``0::``, else v1 ``name=systemd``),
    outermost first: ``user@0.service`` and ``app.service`` below it, ``session-3.scope``."""
    paths = dict(
        (parts[1], parts[2])
        for line in cgroup.splitlines()
        if len(parts := line.split(":", 2)) == 3
    )
    for controllers in ("", "name=systemd"):
        units = [
            part
            for part in paths.get(controllers, "").split("/")
            if part.endswith((".service", ".scope"))
        ]
        if units:
            return units
    return []


def session_users(cgroup: str) -> list[str]:
    """The uids whose user slice a cgroup path is under (``user-1000.slice`` -> "1000")."""
    found = []
    for line in cgroup.splitlines():
        for part in line.split(":", 2)[-1].split("/"):
            if part.startswith("user-") and part.endswith(".slice"):
                uid = part[len("user-") : -len(".slice")]
                if uid.isdigit() and uid not in found:
                    found.append(uid)
    return found


# --- The plan as the preflight reports it --------------------------------------------------


def plan_facts(plan: StopPlan) -> Iterator[Fact]:
    yield Fact("stop", "manager", plan.manager)
    yield Fact("stop", "mode", plan.mode)
    yield Fact("stop", "units", [dataclasses.asdict(unit) for unit in plan.units])
    yield Fact("stop", "kept", [dataclasses.asdict(unit) for unit in plan.kept])
    yield Fact("stop", "worst_case_seconds", round(plan.worst_case, 3))
    yield Fact("stop", "ceiling_seconds", round(plan.ceiling, 3))
    yield Fact("stop", "note", plan.note)


def plan_notices(plan: StopPlan) -> list[Notice]:
    """The plan in one or two sentences a user reads before the copy."""
    if not plan.manager:
        return [Notice("info", "stop-no-manager", plan.note, scope=plan.scope)]
    who = "the sandbox's stand-in" if plan.manager == "stand-in" else f"the host's {plan.manager}"
    if not plan.units:
        text = f"{who} has no running unit to stop: everything gets the stage's signals"
        return [Notice("info", "stop-nothing", text, scope=plan.scope)]
    count = f"{len(plan.units)} units" if len(plan.units) != 1 else "1 unit"
    if plan.mode == "signal":
        text = (
            f"--stop=signal: {who} stops nothing; the processes of its {count} get the stage's "
            "SIGTERM and, after the grace period, SIGKILL, whatever their own stop commands"
        )
        fix = "leave --stop out (graceful) to have them stopped the way they are meant to"
        return [Notice("warning", "stop-signal-only", text, fix, scope=plan.scope)]
    named = [unit.name for unit in plan.kept if unit.why not in (INIT_PLUMBING, EARLY_BOOT)]
    kept = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
    plumbing = len(plan.kept) - len(named)
    if plumbing:
        kept += f"{', and ' if kept else ''}{plumbing} units of the init's own plumbing"
    text = (
        f"before the injection {who} stops {count} in {plan.steps} steps, each with its own stop"
        f" command and timeout: worst case {duration_text(plan.worst_case)}, ceiling"
        f" {duration_text(plan.ceiling)}" + (f"; it keeps {kept}" if kept else "")
    )
    notices = [
        Notice("info", "stop-plan", text, "--stop=signal skips it", scope=plan.scope),
    ]
    if plan.ceiling < plan.worst_case:
        level: Level = "info"
        notices.append(
            Notice(
                level,
                "stop-ceiling",
                f"the units may take up to {duration_text(plan.worst_case)} to stop; past the"
                f" ceiling of {duration_text(plan.ceiling)} the switch goes on and the stage's"
                " signals end what is still running",
                f"--stop-timeout {math.ceil(plan.worst_case)} lets every unit use its own timeout",
                scope=plan.scope,
            )
        )
    return notices


def kept_by_reason(plan: StopPlan) -> list[tuple[str, list[str]]]:
    """The kept units grouped by why, the init's own plumbing last."""
    groups: dict[str, list[str]] = {}
    for unit in plan.kept:
        groups.setdefault(unit.why, []).append(unit.name)
    return sorted(groups.items(), key=lambda group: group[0] in (INIT_PLUMBING, EARLY_BOOT))


def groups_in_stop_order(
    groups: Mapping[str, list[T]], plan: StopPlan | None
) -> list[tuple[str, list[T], str]]:
    """(unit, its processes, its fate) for the Processes step: the units the init stops, in
    its order, then those it keeps, then the rest, which only the stage's signals end."""

    def rank(unit: str) -> tuple[int, int]:
        if plan is None:
            return (0, 0)
        fate = plan.fate(unit)
        if fate.startswith("stop"):
            return (0, next(u.step for u in plan.units if u.name == unit))
        return (1, 0) if fate == "kept" else (2, 0)

    ordered = sorted(groups, key=rank)  # stable: the engine's own order within a rank
    return [(unit, groups[unit], plan.fate(unit) if plan else "") for unit in ordered]
