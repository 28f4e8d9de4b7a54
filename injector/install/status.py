"""`dboot status`: which system this is, the install's probation, the last boot's report.

It reads the same files wherever it runs: the old system finds them at ``/dboot``, the
installed one at ``/sysroot/dboot`` (the boot shim binds the disk there), and a RAM root
of a switch has neither and says so.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from initstage import bootstate, linux
from initstage.plan import KEEP_FILE
from injector.install.install import find_disk

TMPFS_MAGIC = 0x01021994


def read_status() -> dict[str, Any]:
    disk = find_disk()
    status: dict[str, Any] = {"system": _which_system(disk.root), "installed": False}
    try:
        state = bootstate.read_state(disk.path(bootstate.STATE_FILE))
    except bootstate.StateError as error:
        status["state_problem"] = str(error)
        state = None
    if state is not None:
        status["installed"] = True
        status["install"] = {
            "image": state.image,
            "tree": state.tree,
            "init": state.init_argv,
            "state": state.state,
            "boots_left": state.boots_left,
            "revert_after_minutes": state.revert_after_seconds / 60,
            "reason": state.reason,
            "old_init": state.old_init,
            "init_path": state.init_path,
            "history": state.history,
        }
    status["last_boot"] = _read_json(disk.path(bootstate.REPORT_FILE))
    status["keep_file"] = os.path.exists(KEEP_FILE)
    return status


def describe(status: dict[str, Any]) -> list[str]:
    lines = [f"this system: {status['system']}"]
    install = status.get("install")
    if install is None:
        lines.append("install: none" + _problem(status))
        return lines
    lines.append(f"install: {install['image']} in {install['tree']}, init {install['init']}")
    state = install["state"]
    words = {
        bootstate.PROBATION: f"on probation ({install['boots_left']} boot(s) left)",
        bootstate.KEPT: "kept: every boot starts it",
        bootstate.REVERTED: f"reverted: the old system boots ({install['reason']})",
    }
    lines.append(f"state: {words.get(state, state)}")
    report = status.get("last_boot")
    if isinstance(report, dict):
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(report.get("time", 0)))
        lines.append(f"last boot: {when}, the {report.get('booted')} system: {report.get('why')}")
        lines += _came_up(report.get("up"))
        deadline = report.get("revert_deadline")
        if deadline and state == bootstate.PROBATION:
            lines.append(
                "revert deadline: "
                + time.strftime("%H:%M:%S UTC", time.gmtime(deadline))
                + f" (keep file {'present' if status['keep_file'] else 'absent'})"
            )
    if state == bootstate.PROBATION and status["system"].startswith("the installed"):
        lines.append(f"to keep it: touch {KEEP_FILE}")
    if state != bootstate.REVERTED:
        lines.append("to go back: dboot install --revert, then reboot")
    return lines


def _came_up(up: Any) -> list[str]:
    """The reporter's half of the boot report (initstage.bootreport), once it wrote it."""
    if not isinstance(up, dict):
        return ["  not up yet, or never reported: the addresses come once the system is up"]
    lines = [f"  came up: {up.get('state')} after {up.get('up_after_seconds')} s"]
    lines.append(f"  addresses: {', '.join(up.get('addresses') or []) or 'none'}")
    failed = up.get("failed_units")
    if failed is not None:
        lines.append(f"  failed units: {', '.join(failed) or 'none'}")
    return lines


def _which_system(disk_root: str) -> str:
    if disk_root != "/":
        return f"the installed image (the old system's disk is at {bootstate.SYSROOT})"
    try:
        if linux.statfs_type("/") == TMPFS_MAGIC:
            return "a RAM root (dboot switch): nothing here survives a reboot"
    except OSError:
        pass
    return "the old system (booted from its disk)"


def _problem(status: dict[str, Any]) -> str:
    problem = status.get("state_problem", "")
    if "No such file" in problem:
        return ""
    return f" ({problem})" if problem else ""


def _read_json(path: str) -> Any:
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None
