"""systemd: the units that stop, and systemd stopping them its own way.

**How.** One job transaction, ``systemctl stop --no-block --job-mode=ignore-requirements --
UNIT...``, with every unit of the plan in it: systemd orders the stop jobs by the units'
``After=``/``Before=`` (reversed), runs each one's ``ExecStop=`` and waits its
``TimeoutStopSec=`` (then SIGKILL), exactly as at a shutdown. ``--no-block`` lets us watch
the units go down one by one (each is named as it stops) and bound the whole stop by the
ceiling; ``ignore-requirements`` keeps the transaction to the listed units, so that no
requirement pulls in a unit the plan keeps (a mount, the SSH server) or one it does not know.

**Why not** ``systemctl isolate`` of a transient target that wants only the kept units:
isolating also starts what that target pulls in (``basic.target`` brings back every socket
and timer), stops mounts, swap and devices it does not reach, and honours
``IgnoreOnIsolate=``: what it would stop can only be known by running it. An explicit list is
the plan the preflight showed, the same units, in systemd's order.

**Which units.** Every active service, socket, timer and path unit (a socket or timer left
running could start its service again in the middle of the stop) except those kept: the
units of our own chain of processes (docker-boot's, the SSH server and the session it came
through, that user's manager), those whose main process is one of our ancestors (a getty
whose ``login`` carries the session), the network daemons and the firewall, units with
``DefaultDependencies=no`` (early-boot plumbing: journald, udev, storage daemons, fsck,
cryptsetup... that systemd itself stops last, after the services, and that the stage ends),
units that refuse a manual stop, the sockets, timers and paths that would start a kept unit,
and what a kept unit requires. Exited oneshot services are in the transaction too: stopping
them runs their ``ExecStop=``, and they carry ordering between the units around them
(``postgresql.service`` between an application and ``postgresql@15-main.service``).

**Undo.** ``systemctl start --no-block`` of every unit a stop was asked of, then wait (up to
``UNDO_WAIT_SECONDS``) for each to be active again; those that are not are named.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Generator, Iterable

from injector import labmode
from injector.errors import EnvironmentFailure
from injector.events import Event, Log
from injector.stop.plan import (
    EARLY_BOOT,
    Ancestor,
    Candidate,
    KeptUnit,
    PlanUnreadable,
    StopMode,
    StopOutcome,
    StopPlan,
    cgroup_units,
    kept_by_name,
    make_plan,
    session_users,
)

UNIT_TYPES = ("service", "socket", "timer", "path")
# ActiveState values of a unit that is (still) up: a stop job applies to all of them.
UP_STATES = frozenset({"active", "reloading", "activating", "deactivating", "refreshing"})
DOWN_STATES = frozenset({"inactive", "failed", "maintenance"})
PROPERTIES = (
    "Id", "ActiveState", "SubState", "CanStop", "DefaultDependencies", "TimeoutStopUSec",
    "TimeoutUSec", "ExecStop", "ExecStopPre", "ExecStopPost", "MainPID", "After", "Before",
    "Requires", "BindsTo", "Requisite", "Triggers", "TriggeredBy",
)  # fmt: skip
POLL_SECONDS = 0.5
UNDO_WAIT_SECONDS = 90.0
SYSTEMCTL_TIMEOUT = 60.0  # one systemctl call: it only talks to PID 1

Runner = Callable[[list[str]], "subprocess.CompletedProcess[str]"]


def run_systemctl(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``systemctl ARGS`` with no pager, no colours, no password prompt."""
    program = shutil.which("systemctl") or "/bin/systemctl"
    env = {**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "LC_ALL": "C"}
    try:
        return subprocess.run(
            [program, "--no-pager", "--no-ask-password", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=SYSTEMCTL_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return subprocess.CompletedProcess([program, *args], 1, "", str(error))


# --- Reading the units ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UnitInfo:
    """What the plan needs of one unit, from ``systemctl show``."""

    name: str
    active_state: str
    sub_state: str  # "exited": a oneshot that ran, no process left
    can_stop: bool
    default_dependencies: bool
    timeout: float | None  # per phase of its stop; None: infinity
    stop_commands: list[str]  # ExecStop= (and a socket's ExecStopPre=) argv lines
    stop_post: int  # ExecStopPost= commands
    main_pid: int
    after: frozenset[str]
    before: frozenset[str]
    requires: frozenset[str]  # Requires=, BindsTo=, Requisite=
    triggers: frozenset[str]

    @property
    def kind(self) -> str:
        return self.name.rsplit(".", 1)[-1]


def parse_show(text: str) -> list[dict[str, list[str]]]:
    """``systemctl show`` of several units: one block each, separated by a blank line.
    A property may come more than once (one ``ExecStop=`` line per command)."""
    blocks: list[dict[str, list[str]]] = []
    current: dict[str, list[str]] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return blocks


_SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "µs": 1e-6, "ms": 1e-3, "msec": 1e-3,
    "s": 1.0, "sec": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0, "w": 604800.0, "week": 604800.0,
    "weeks": 604800.0, "M": 2630016.0, "month": 2630016.0, "months": 2630016.0,
    "y": 31557600.0, "year": 31557600.0, "years": 31557600.0,
}  # fmt: skip
_SPAN_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([a-zA-Zµ]*)")


def parse_timespan(text: str) -> float | None:
    """systemd's time span as ``systemctl show`` prints it ("1min 30s", "90s", "100ms",
    "infinity") -> seconds; None for no limit (infinity, 0, or text it cannot read)."""
    text = text.strip()
    if not text or text == "infinity":
        return None
    total, at = 0.0, 0
    for found in _SPAN_PART.finditer(text):
        if text[at : found.start()].strip():
            return None
        number, unit = found.groups()
        scale = _SPAN_UNITS.get(unit or "s")
        if scale is None:
            return None
        total += float(number) * scale
        at = found.end()
    if text[at:].strip() or total <= 0:
        return None
    return total


def command_argv(value: str) -> str:
    """``{ path=/usr/bin/x ; argv[]=/usr/bin/x stop ; ignore_errors=no ; ... }`` -> the argv."""
    found = re.search(r"argv\[\]=(.*?) ;", value)
    return found.group(1).strip() if found else value.strip("{} ").split(" ;")[0]


def unit_info(block: dict[str, list[str]]) -> UnitInfo:
    def one(key: str) -> str:
        return block.get(key, [""])[-1].strip()

    def names(*keys: str) -> frozenset[str]:
        return frozenset(
            word for key in keys for line in block.get(key, []) for word in line.split()
        )

    name = one("Id")
    kind = name.rsplit(".", 1)[-1]
    commands = [
        command_argv(line)
        for key in (("ExecStop",) if kind == "service" else ("ExecStopPre",))
        for line in block.get(key, [])
        if line.strip()
    ]
    timeout_key = "TimeoutStopUSec" if kind == "service" else "TimeoutUSec"
    main_pid = one("MainPID")
    return UnitInfo(
        name=name,
        active_state=one("ActiveState"),
        sub_state=one("SubState"),
        can_stop=one("CanStop") != "no",
        default_dependencies=one("DefaultDependencies") != "no",
        timeout=parse_timespan(one(timeout_key)),
        stop_commands=commands,
        stop_post=sum(1 for line in block.get("ExecStopPost", []) if line.strip()),
        main_pid=int(main_pid) if main_pid.isdigit() else 0,
        after=names("After"),
        before=names("Before"),
        requires=names("Requires", "BindsTo", "Requisite"),
        triggers=names("Triggers"),
    )


def list_up_units(run: Runner) -> list[str]:
    """The service, socket, timer and path units that are up now."""
    listed = run(
        ["list-units", f"--type={','.join(UNIT_TYPES)}", "--no-legend", "--plain", "--full"]
    )
    if listed.returncode != 0:
        raise PlanUnreadable(f"systemctl list-units failed: {_last_line(listed)}")
    found = []
    for line in listed.stdout.splitlines():
        words = line.replace("●", " ").split()
        if len(words) >= 3 and words[2] in UP_STATES:
            found.append(words[0])
    return found


def show(run: Runner, names: list[str], properties: Iterable[str]) -> list[dict[str, list[str]]]:
    if not names:
        return []
    shown = run(["show", f"--property={','.join(properties)}", "--", *names])
    if shown.returncode != 0:
        raise PlanUnreadable(f"systemctl show failed: {_last_line(shown)}")
    return parse_show(shown.stdout)


def read_plan(
    mode: StopMode, timeout: float | None, chain: list[Ancestor], run: Runner = run_systemctl
) -> StopPlan:
    names = list_up_units(run)
    units = [unit_info(block) for block in show(run, names, PROPERTIES)]
    return plan_from_units(units, chain, mode, timeout)


def plan_from_units(
    units: list[UnitInfo], chain: list[Ancestor], mode: StopMode, timeout: float | None
) -> StopPlan:
    """The plan from what ``systemctl show`` said (see the module's docstring for the rules)."""
    up = {unit.name: unit for unit in units if unit.active_state in UP_STATES}
    kept = _kept(up, chain)
    stopping = [unit for name, unit in up.items() if name not in kept]
    stop_names = {unit.name for unit in stopping}
    # Starts after -> stops before: A After=B, or B Before=A, means B waits for A to stop.
    waits: dict[str, set[str]] = {name: set() for name in stop_names}
    for unit in stopping:
        for other in unit.after & stop_names:
            waits[other].add(unit.name)
        for other in unit.before & stop_names:
            waits[unit.name].add(other)
    candidates = [
        Candidate(unit.name, _timeout(unit), _command(unit), _phases(unit),
                  frozenset(waits[unit.name]))
        for unit in stopping
    ]  # fmt: skip
    return make_plan(
        "systemd",
        mode,
        candidates,
        [KeptUnit(name, why) for name, why in kept.items()],
        timeout,
    )


def _kept(up: dict[str, UnitInfo], chain: list[Ancestor]) -> dict[str, str]:
    kept: dict[str, str] = {}

    def keep(name: str, why: str) -> None:
        if name in up and name not in kept:
            kept[name] = why

    ours = chain[0].pid if chain else os.getpid()
    for ancestor in chain:
        for name in cgroup_units(ancestor.cgroup):
            keep(
                name,
                "docker-boot runs in it" if ancestor.pid == ours else "your session runs in it",
            )
        for uid in session_users(ancestor.cgroup):
            keep(f"user@{uid}.service", "the service manager of your session's user")
            keep(f"user-runtime-dir@{uid}.service", "your session's /run/user directory")
    pids = {ancestor.pid for ancestor in chain}
    for unit in up.values():
        if unit.main_pid in pids:
            keep(unit.name, f"its main process (pid {unit.main_pid}) carries your session")
        elif (why := kept_by_name(unit.name)) is not None:
            keep(unit.name, why)
        elif not unit.default_dependencies:
            keep(unit.name, EARLY_BOOT)
        elif not unit.can_stop:
            keep(unit.name, "it refuses a manual stop (RefuseManualStop=)")
    # What starts a kept unit, and what a kept unit needs, stay too (until nothing changes).
    grown = True
    while grown:
        before = len(kept)
        for unit in up.values():
            started = sorted(unit.triggers & kept.keys())
            if started:
                keep(unit.name, f"it would start {started[0]}, which stays")
        for name in list(kept):
            for needed in sorted(up[name].requires):
                keep(needed, f"{name} needs it (Requires=)")
        grown = len(kept) > before
    return kept


def _timeout(unit: UnitInfo) -> float | None:
    if unit.kind == "service" and unit.sub_state != "exited":
        return unit.timeout
    # A socket's own commands are bounded by its TimeoutSec=; closing it, or stopping a timer
    # or a path, takes no time.
    return unit.timeout if unit.stop_commands or unit.stop_post else 0.0


def _phases(unit: UnitInfo) -> int:
    """How many times its timeout may run out: each ExecStop= command (skipped once one
    times out: one phase for all), the signal (services), and ExecStopPost=."""
    signal_phase = 1 if unit.kind == "service" and unit.sub_state != "exited" else 0
    return (1 if unit.stop_commands else 0) + signal_phase + (1 if unit.stop_post else 0)


def _command(unit: UnitInfo) -> str:
    if unit.stop_commands:
        return "ExecStop=" + " ; ".join(unit.stop_commands)
    if unit.kind == "service" and unit.sub_state == "exited":
        return "ran and exited: nothing to end, it keeps the order between its neighbours"
    return {
        "service": "its stop signal (SIGTERM)",
        "socket": "closes its socket",
        "timer": "stops the timer",
        "path": "stops watching",
    }.get(unit.kind, "stop")


# --- The stop ------------------------------------------------------------------------------


def stop(
    plan: StopPlan,
    run: Runner = run_systemctl,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Generator[Event, None, StopOutcome]:
    """Ask systemd to stop the plan's units, in one transaction; watch them go down until
    all did or the ceiling passed. Refused in lab mode: no test stops this machine's units."""
    labmode.refuse(
        "the host's services are left alone",
        "only a real switch stops the host's services, and lab mode allows none",
    )
    names = [unit.name for unit in plan.units]
    started = clock()
    queued = run(["stop", "--no-block", "--job-mode=ignore-requirements", "--", *names])
    if queued.returncode != 0:
        raise EnvironmentFailure(
            f"systemd refused to stop the services: {_last_line(queued)}",
            "fix or mask the unit it names, or switch with --stop=signal",
        )
    yield Log(f"systemctl stop --no-block: {len(names)} units queued in one transaction")
    up = set(names)
    stopped: list[tuple[str, float]] = []
    deadline = started + plan.ceiling
    while up:
        states = _active_states(run, sorted(up))
        now = clock()
        for name in [name for name in names if name in up]:
            state = states.get(name)
            if state is not None and state in DOWN_STATES:
                up.discard(name)
                stopped.append((name, now - started))
                how = " (failed: its stop command failed or timed out)" if state == "failed" else ""
                yield Log(f"stopped {name} after {now - started:.1f} s{how}")
        if not up or now >= deadline:
            break
        sleep(min(POLL_SECONDS, deadline - now))
    return StopOutcome(names, stopped, [name for name in names if name in up], clock() - started)


def start_again(
    names: list[str],
    run: Runner = run_systemctl,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[str]:
    """The undo: start the units again; lines that name those that are not up after it."""
    if not names:
        return []
    queued = run(["start", "--no-block", "--", *names])
    if queued.returncode != 0:
        return [
            f"services: systemctl start failed ({_last_line(queued)}); start them by hand:"
            f" systemctl start {' '.join(names)}"
        ]
    deadline = clock() + UNDO_WAIT_SECONDS
    waiting = set(names)
    while waiting:
        states = _active_states(run, sorted(waiting))
        busy = _units_with_jobs(run)
        for name in sorted(waiting):
            if states.get(name) == "active" or (name not in busy and name in states):
                waiting.discard(name)
        if not waiting or clock() >= deadline:
            break
        sleep(POLL_SECONDS)
    final = _active_states(run, names)
    down = [name for name in names if final.get(name) != "active"]
    lines = [f"services: started again: {len(names) - len(down)} of {len(names)} units"]
    if down:
        named = ", ".join(f"{name} ({final.get(name, 'unknown')})" for name in down)
        lines.append(f"services: would not start: {named}; see systemctl status {' '.join(down)}")
    return lines


def _active_states(run: Runner, names: list[str]) -> dict[str, str]:
    """unit -> ActiveState now; a systemctl that fails says nothing (the caller waits on)."""
    try:
        blocks = show(run, names, ("Id", "ActiveState"))
    except PlanUnreadable:
        return {}
    return {
        block["Id"][-1]: block.get("ActiveState", [""])[-1] for block in blocks if "Id" in block
    }


def _units_with_jobs(run: Runner) -> set[str]:
    jobs = run(["list-jobs", "--no-legend", "--plain"])
    return {line.split()[1] for line in jobs.stdout.splitlines() if len(line.split()) > 1}


def _last_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = (result.stderr or result.stdout or "").strip().splitlines()
    return lines[-1] if lines else f"exit status {result.returncode}"
