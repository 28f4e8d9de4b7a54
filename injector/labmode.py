"""Lab mode: this machine's own PID 1 is never to be replaced (labs, teaching, tests, CI).

One definition, asked by every layer that could reach the host's PID 1: the switch, the
injector, the swap-off step and the wizard.

Lab mode is on when any of these holds:

* ``/etc/dboot/rehearsal-only`` exists: the dependable switch, since no environment
  handling (sudo, su, systemd-run, cron) can lose a file;
* ``DBOOT_REHEARSAL_ONLY`` is set (and not ``0``) in our environment;
* it is set in the environment that one of our ancestor processes was started with.
  ``sudo`` resets the environment of the command it runs, but the variable the user
  exported is still in the environment ``sudo`` itself was started with, so
  ``DBOOT_REHEARSAL_ONLY=1 sudo dboot switch ...`` and ``export DBOOT_REHEARSAL_ONLY=1;
  sudo dboot ...`` stay in lab mode. Failing to read an ancestor only means that witness is
  missing; it never turns lab mode off.

Everything only ever turns lab mode *on*: a setting further out cannot be undone by a
``DBOOT_REHEARSAL_ONLY=0`` closer in.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from initstage.procs import ProcInfo
from injector.errors import SafetyRefusal
from injector.preflight import procinfo

LAB_MODE_ENV = "DBOOT_REHEARSAL_ONLY"
LAB_MODE_FLAG = Path("/etc/dboot/rehearsal-only")
# Where the ancestors are looked up (tests point it at a crafted tree).
ANCESTOR_PROC = procinfo.PROC
MAX_ANCESTORS = 64
# What a lab-mode refusal tells the user to do instead, unless the caller knows better.
REFUSAL_FIX = "use `dboot rehearse`, or --target-pid with the PID 1 of a namespace you made"


def _is_set(value: str | None) -> bool:
    return value not in (None, "", "0")


def lab_mode_reason(environ: Mapping[str, str] | None = None, pid: int | None = None) -> str | None:
    """Why lab mode is on, in words for a user; None when it is off."""
    environ = os.environ if environ is None else environ
    if LAB_MODE_FLAG.exists():
        return f"lab mode is on ({LAB_MODE_FLAG} exists)"
    if _is_set(environ.get(LAB_MODE_ENV)):
        return f"{LAB_MODE_ENV} is set (lab mode)"
    ancestor = ancestor_with_lab_mode(os.getpid() if pid is None else pid)
    if ancestor is not None:
        ancestor_pid, comm = ancestor
        return (
            f"{LAB_MODE_ENV} is set in the environment of pid {ancestor_pid} ({comm}), "
            "which started dboot (lab mode survives sudo)"
        )
    return None


def ancestor_with_lab_mode(pid: int, proc: Path | None = None) -> tuple[int, str] | None:
    """The nearest ancestor of ``pid`` (pid, command name) that was started with the
    variable set; None when none was, or their environments cannot be read."""
    found = ancestor_variable(pid, LAB_MODE_ENV, proc, accept=_is_set)
    return None if found is None else (found[0], found[1])


def ancestor_variable(
    pid: int,
    name: str,
    proc: Path | None = None,
    accept: Callable[[str], bool] = bool,
) -> tuple[int, str, str] | None:
    """The nearest ancestor of ``pid`` that was started with ``name`` set to a value
    ``accept`` takes: (its pid, its command name, the value). None when none was, or their
    environments cannot be read. What survives ``sudo``: the environment it reset is still
    in the one sudo itself was started with."""
    proc = ANCESTOR_PROC if proc is None else proc
    current = pid
    for _hop in range(MAX_ANCESTORS):
        stat = _stat(proc, current)
        if stat is None or stat.ppid <= 0:
            return None
        current = stat.ppid
        value = _environ_value(proc / str(current) / "environ", name)
        if value is not None and accept(value):
            parent = _stat(proc, current)
            return current, parent.comm if parent is not None else "?", value
    return None


def _stat(proc: Path, pid: int) -> ProcInfo | None:
    try:
        return procinfo.read_stat(pid, proc)
    except procinfo.Unreadable:
        return None


def _environ_value(path: Path, name: str) -> str | None:
    try:
        text = procinfo.read_text(path) or ""
    except procinfo.Unreadable:
        return None
    prefix = name + "="
    for entry in text.split("\0"):
        if entry.startswith(prefix):
            return entry[len(prefix) :]
    return None


def lab_mode() -> bool:
    return lab_mode_reason() is not None


def refuse(what_is_kept: str, fix: str = REFUSAL_FIX) -> None:
    """The one lab-mode refusal: raise ``SafetyRefusal`` ("<why lab mode is on>: <what is
    kept>", exit 3) when lab mode is on; return when it is off. Every layer that could reach
    the host's PID 1 or its swap asks this: the switch, the injector, swap-off, the wizard."""
    reason = lab_mode_reason()
    if reason is not None:
        raise SafetyRefusal(f"{reason}: {what_is_kept}", fix)
