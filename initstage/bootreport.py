"""The second half of a boot report: what the system came up with.

The boot shim writes the first half (which system, why, the probation and its deadline)
before it hands over; what only the running system can tell comes later. So the shim forks
this reporter just before it execs either init. The reporter waits until the system is up,
then adds to the report its addresses and, for a systemd image, its failed units, and says
so on the console and in the kernel log, where someone at a serial console or reading the
boot report with ``dboot status`` finds it.

"Up" is systemd's own word, ``systemctl is-system-running`` leaving ``initializing`` and
``starting`` (the default target reached, or failed), within :data:`UP_CEILING_SECONDS`.
Another init has no such word: its report comes :data:`SETTLE_SECONDS` after the exec (the
kernel command line's ``DBOOT_REPORT_SETTLE=SECONDS``, which the kernel puts in PID 1's
environment, changes it).

Standard library only and imported up front with the shim: by the time this runs, the code
it was loaded from may be out of reach behind the pivot. systemctl's output is read as bytes
and decoded as UTF-8, whose codec is loaded at start-up, for the same reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import time
from collections.abc import Callable

from initstage.bootstate import write_atomically
from initstage.netlink import RT_SCOPE_UNIVERSE, Rtnetlink

UP_CEILING_SECONDS = 900.0
POLL_SECONDS = 2.0
SETTLE_SECONDS = 30.0
SETTLE_VARIABLE = "DBOOT_REPORT_SETTLE"
SYSTEMCTL_TIMEOUT_SECONDS = 20.0
# systemctl is-system-running: still on its way up, or up (the target reached or failed).
COMING_UP = frozenset({"initializing", "starting"})
SYSTEMCTL_PATHS = ("/usr/bin/systemctl", "/bin/systemctl")

Log = Callable[[str], None]
# argv -> (exit status, stdout); raises OSError or subprocess.TimeoutExpired.
Runner = Callable[[list[str]], tuple[int, str]]


@dataclasses.dataclass
class Outcome:
    state: str  # systemd's word once up, "timed out", or "not systemd"
    up_after_seconds: float
    addresses: list[str]  # "ens2 10.0.2.15/24", global scope only
    failed_units: list[str] | None  # None where the init is not systemd

    def summary(self) -> str:
        addresses = ", ".join(self.addresses) or "none"
        line = (
            f"boot report: {self.state} after {self.up_after_seconds:.0f} s; addresses: {addresses}"
        )
        if self.failed_units is not None:
            line += f"; failed units: {', '.join(self.failed_units) or 'none'}"
        return line


def run_command(argv: list[str]) -> tuple[int, str]:
    done = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        timeout=SYSTEMCTL_TIMEOUT_SECONDS,
        check=False,
    )
    return done.returncode, done.stdout.decode("utf-8", "replace")


def systemctl() -> str | None:
    return next((path for path in SYSTEMCTL_PATHS if os.access(path, os.X_OK)), None)


def is_systemd(init: str) -> bool:
    return os.path.basename(os.path.realpath(init)) == "systemd"


def wait_until_up(
    systemctl_path: str,
    run: Runner,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    ceiling: float = UP_CEILING_SECONDS,
) -> str:
    """systemd's state once it is up, or "timed out". Until systemd listens, systemctl fails
    or says "offline": that is waited through like "starting"."""
    deadline = clock() + ceiling
    while True:
        try:
            _status, output = run([systemctl_path, "is-system-running"])
            state = output.strip() or "no answer"
        except (OSError, subprocess.SubprocessError) as error:
            state = f"no answer ({error})"
        if state not in COMING_UP and not state.startswith("no answer") and state != "offline":
            return state
        if clock() >= deadline:
            return "timed out"
        sleep(POLL_SECONDS)


def failed_units(systemctl_path: str, run: Runner) -> list[str]:
    _status, output = run(
        [systemctl_path, "list-units", "--state=failed", "--plain", "--no-legend", "--no-pager"]
    )
    return [line.split()[0] for line in output.splitlines() if line.split()]


def global_addresses() -> list[str]:
    """Every address of global scope, by interface: what someone reaches the machine at."""
    with Rtnetlink() as kernel:
        names = {link.index: link.name for link in kernel.links()}
        return [
            f"{names.get(item.index, item.index)} {item.address}/{item.prefixlen}"
            for item in kernel.addresses()
            if item.scope == RT_SCOPE_UNIVERSE
        ]


def observe(init: str, run: Runner = run_command, settle: float = SETTLE_SECONDS) -> Outcome:
    started = time.monotonic()
    tool = systemctl() if is_systemd(init) else None
    if tool is not None:
        state = wait_until_up(tool, run)
    else:
        time.sleep(settle)
        state = "not systemd"
    up_after = time.monotonic() - started
    try:
        addresses = global_addresses()
    except OSError as error:
        addresses = [f"unreadable ({error})"]
    units: list[str] | None = None
    if tool is not None:
        try:
            units = failed_units(tool, run)
        except (OSError, subprocess.SubprocessError) as error:
            units = [f"unreadable ({error})"]
    return Outcome(state, round(up_after, 1), addresses, units)


def add_to_report(path: str, outcome: Outcome) -> None:
    """The shim's report with ``up`` added, replaced in one rename (a reader never sees half)."""
    try:
        with open(path) as handle:
            report = json.load(handle)
    except (OSError, ValueError):
        report = {}
    if not isinstance(report, dict):
        report = {}
    report["up"] = {**dataclasses.asdict(outcome), "host": socket.gethostname()}
    write_atomically(path, json.dumps(report, indent=2) + "\n")


def settle_seconds(environ: dict[str, str]) -> float:
    try:
        return max(0.0, float(environ.get(SETTLE_VARIABLE, SETTLE_SECONDS)))
    except ValueError:
        return SETTLE_SECONDS


def start(report_path: str, init: str, log: Log) -> int | None:
    """Fork the reporter (a child of PID 1, so of the init about to be exec'd, which reaps
    it); its pid, or None when it cannot start: the boot goes on without it, and says so."""
    settle = settle_seconds(dict(os.environ))
    try:
        pid = os.fork()
    except OSError as error:
        log(f"warning: boot report: cannot fork the reporter ({error.strerror}): no addresses")
        return None
    if pid != 0:
        log(f"boot report: pid {pid} adds the addresses and failed units once the system is up")
        return pid
    status = 0
    try:
        os.setsid()
        outcome = observe(init, settle=settle)
        log(outcome.summary())
        add_to_report(report_path, outcome)
    except BaseException as error:  # a child of PID 1: whatever happens, it only exits
        status = 1
        with contextlib.suppress(BaseException):
            log(f"warning: boot report: {type(error).__name__}: {error}")
    os._exit(status)
