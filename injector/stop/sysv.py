"""sysvinit: the init scripts this runlevel started, stopped one by one with ``NAME stop``.

The order is the one the machine's own halt uses: its ``K`` links in ``/etc/rc0.d`` (insserv
numbers them from the scripts' ``Required-Stop:`` headers), lowest first; a script with no
``K`` link there comes last. Only scripts with an ``S`` link in the current runlevel's
directory are services (``/etc/rc2.d`` on Debian): the halt's own machinery (``sendsigs``,
``umountfs``, ``halt``...) lives in ``rcS.d`` and ``rc0.d`` alone and is never run here.
sysvinit gives a script no timeout of its own: ``SCRIPT_TIMEOUT`` bounds each one, and the
ceiling the whole stop. The undo runs ``NAME start`` for each stopped script, in reverse.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Generator
from pathlib import Path

from injector import labmode
from injector.events import Event, Log
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

SCRIPT_TIMEOUT = 30.0
START_TIMEOUT = 60.0
DEFAULT_RUNLEVEL = "2"
_LINK = re.compile(r"([SK])(\d\d)(.+)")
# Scripts that carry an SSH session, kept when one of our ancestors is their daemon.
SSH_SCRIPTS = {"sshd": ("ssh", "sshd", "openssh"), "dropbear": ("dropbear",)}


def runlevel(root: Path = Path("/")) -> str:
    """The current runlevel (``runlevel`` says "N 2"); Debian's default when it cannot tell."""
    if root != Path("/"):
        return DEFAULT_RUNLEVEL
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        words = subprocess.run(
            ["runlevel"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()
        if len(words) == 2 and words[1].isdigit():
            return words[1]
    return DEFAULT_RUNLEVEL


def links(directory: Path, kind: str) -> dict[str, int]:
    """script -> its number among ``kind`` ("S" or "K") links of one rcN.d directory."""
    found: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for entry in directory.iterdir():
            match = _LINK.fullmatch(entry.name)
            if match and match.group(1) == kind:
                found[match.group(3)] = int(match.group(2))
    return found


def read_plan(
    mode: StopMode,
    timeout: float | None,
    chain: list[Ancestor],
    root: Path = Path("/"),
    level: str | None = None,
) -> StopPlan:
    etc = root / "etc"
    started = links(etc / f"rc{level or runlevel(root)}.d", "S")
    halt_order = links(etc / "rc0.d", "K")
    kept: list[KeptUnit] = []
    ssh_daemons = {ancestor.comm for ancestor in chain}
    carrying = {
        name for comm, names in SSH_SCRIPTS.items() if comm in ssh_daemons for name in names
    }
    stopping: list[str] = []
    for script in sorted(started):
        if not (etc / "init.d" / script).is_file():
            continue
        why = kept_by_name(script)
        if why is None and script in carrying:
            why = "the SSH server your session came through"
        if why is not None:
            kept.append(KeptUnit(script, why))
        else:
            stopping.append(script)
    last = max(halt_order.values(), default=0) + 1
    ordered = sorted(stopping, key=lambda script: (halt_order.get(script, last), script))
    candidates = [
        Candidate(script, SCRIPT_TIMEOUT, f"/etc/init.d/{script} stop", 1,
                  frozenset(ordered[:index]))
        for index, script in enumerate(ordered)
    ]  # fmt: skip
    return make_plan("sysvinit", mode, candidates, kept, timeout)


def stop(
    plan: StopPlan,
    root: Path = Path("/"),
    clock: Callable[[], float] = time.monotonic,
) -> Generator[Event, None, StopOutcome]:
    """Run each script's ``stop``, in order, each bounded by its timeout and the ceiling.
    Refused in lab mode when ``root`` is this machine's."""
    if root == Path("/"):
        labmode.refuse(
            "the host's services are left alone",
            "only a real switch stops the host's services, and lab mode allows none",
        )
    started = clock()
    stopped: list[tuple[str, float]] = []
    left: list[str] = []
    for unit in plan.units:
        remaining = started + plan.ceiling - clock()
        if remaining <= 0:
            left.append(unit.name)
            continue
        bound = min(unit.timeout or SCRIPT_TIMEOUT, remaining)
        status = _run_script(root / "etc/init.d" / unit.name, "stop", bound)
        if status is None:
            left.append(unit.name)
            yield Log(f"{unit.name} stop: still running after {bound:.1f} s; left for the signals")
            continue
        stopped.append((unit.name, clock() - started))
        yield Log(f"stopped {unit.name} after {clock() - started:.1f} s (exit status {status})")
    return StopOutcome([unit.name for unit in plan.units], stopped, left, clock() - started)


def start_again(names: list[str], root: Path = Path("/")) -> list[str]:
    """The undo: ``NAME start`` for each, in reverse order; lines naming what failed."""
    failed = []
    for name in reversed(names):
        status = _run_script(root / "etc/init.d" / name, "start", START_TIMEOUT)
        if status != 0:
            failed.append(f"{name} ({'timed out' if status is None else f'exit {status}'})")
    lines = [f"services: started again: {len(names) - len(failed)} of {len(names)} scripts"]
    if failed:
        lines.append(f"services: would not start: {', '.join(failed)}")
    return lines


def _run_script(script: Path, action: str, timeout: float) -> int | None:
    """Its exit status, or None once ``timeout`` passed (its process group is then killed)."""
    try:
        process = subprocess.Popen(
            [str(script), action],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
        )
    except OSError:
        return 127
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # our own child's group, made for it
        process.wait()
        return None
