"""runit: the services its ``runsvdir`` supervises, stopped all at once with ``sv stop``.

runit has no order between services (they start and stop side by side): one step. ``sv``
sends each its stop signal (TERM, then CONT), runs its ``control/t`` and ``finish`` scripts,
and ``-w`` waits up to the ceiling for all of them. The undo is ``sv start``.
"""

from __future__ import annotations

import contextlib
import math
import subprocess
import time
from collections.abc import Callable, Generator
from pathlib import Path

from injector import labmode
from injector.events import Event, Log
from injector.preflight import procinfo
from injector.preflight.procinfo import PROC, Unreadable
from injector.stop.plan import (
    Ancestor,
    Candidate,
    KeptUnit,
    StopMode,
    StopOutcome,
    StopPlan,
    kept_by_name,
    make_plan,
)

SERVICE_DIRS = ("etc/service", "var/service", "service", "etc/runit/runsvdir/current")
SV_TIMEOUT = 7.0  # sv's own default wait
SV = "sv"

Runner = Callable[[list[str], float], "subprocess.CompletedProcess[str]"]


def run_sv(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [SV, *args], capture_output=True, text=True, timeout=timeout + 10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return subprocess.CompletedProcess([SV, *args], 1, "", str(error))


def service_dir(root: Path = Path("/")) -> Path | None:
    for name in SERVICE_DIRS:
        if (root / name).is_dir():
            return root / name
    return None


def supervising(chain: list[Ancestor], proc: Path = PROC) -> set[str]:
    """The services whose ``runsv`` is one of our ancestors (``runsv sshd`` for a session
    that came in through that sshd)."""
    names = set()
    for ancestor in chain:
        if ancestor.comm != "runsv":
            continue
        with contextlib.suppress(Unreadable):
            argv = (procinfo.read_text(proc / str(ancestor.pid) / "cmdline") or "").split("\0")
            words = [word for word in argv if word]
            if len(words) > 1:
                names.add(Path(words[-1]).name)
    return names


def read_plan(
    mode: StopMode,
    timeout: float | None,
    chain: list[Ancestor],
    root: Path = Path("/"),
    run: Runner = run_sv,
    proc: Path = PROC,
) -> StopPlan:
    directory = service_dir(root)
    services = sorted(entry.name for entry in directory.iterdir()) if directory else []
    ours = supervising(chain, proc)
    kept: list[KeptUnit] = []
    candidates: list[Candidate] = []
    for name in services:
        assert directory is not None
        status = run(["status", str(directory / name)], SV_TIMEOUT).stdout
        if not status.startswith("run:"):
            continue
        why = kept_by_name(name) or ("your session runs under it" if name in ours else None)
        if why is not None:
            kept.append(KeptUnit(name, why))
        else:
            candidates.append(Candidate(name, SV_TIMEOUT, f"sv stop {name}"))
    return make_plan("runit", mode, candidates, kept, timeout)


def stop(
    plan: StopPlan,
    root: Path = Path("/"),
    run: Runner = run_sv,
    clock: Callable[[], float] = time.monotonic,
) -> Generator[Event, None, StopOutcome]:
    """``sv -w CEILING stop`` of every service at once, then ``sv status`` of each."""
    if root == Path("/"):
        labmode.refuse(
            "the host's services are left alone",
            "only a real switch stops the host's services, and lab mode allows none",
        )
    directory = service_dir(root)
    names = [unit.name for unit in plan.units]
    started = clock()
    if directory is None or not names:
        return StopOutcome(names, [], names, 0.0)
    wait = max(1, math.ceil(plan.ceiling))
    run(["-w", str(wait), "stop", *(str(directory / name) for name in names)], wait)
    seconds = clock() - started
    stopped, left = [], []
    for name in names:
        status = run(["status", str(directory / name)], SV_TIMEOUT).stdout
        if status.startswith("down:"):
            stopped.append((name, seconds))
            yield Log(f"stopped {name} ({status.split(';')[0].strip()})")
        else:
            left.append(name)
            yield Log(f"{name} still up after {seconds:.1f} s; left for the signals")
    return StopOutcome(names, stopped, left, seconds)


def start_again(names: list[str], root: Path = Path("/"), run: Runner = run_sv) -> list[str]:
    directory = service_dir(root)
    if directory is None or not names:
        return []
    run(
        ["-w", str(int(SV_TIMEOUT)), "start", *(str(directory / name) for name in names)],
        SV_TIMEOUT,
    )
    down = [
        name
        for name in names
        if not run(["status", str(directory / name)], SV_TIMEOUT).stdout.startswith("run:")
    ]
    lines = [f"services: started again: {len(names) - len(down)} of {len(names)} services"]
    if down:
        lines.append(f"services: would not start: {', '.join(down)}; see sv status")
    return lines
