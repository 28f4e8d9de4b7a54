"""The graceful stop on systemd (issue 19): the plan from what systemd itself says, and the stop
and its undo against a systemctl that answers as systemd would.

systemd cannot run here (this machine's PID 1 is not it, and no test may ask the host's init
to stop anything), so ``data/debian12-db-*.txt`` are the real outputs of `systemctl
list-units` and `systemctl show` on the VM tier's x86_64-db machine (Debian 12, systemd 252,
MariaDB and PostgreSQL busy with their load clients, over SSH: tests/vm/test_vm_dbstop.py keeps
them in its facts.json), and the stop's systemctl is a function playing systemd's part.
The real thing runs in QEMU: tests/vm/test_vm_dbstop.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Generator
from pathlib import Path

import pytest

from injector import labmode
from injector.errors import EnvironmentFailure, SafetyRefusal
from injector.events import Event, Log
from injector.inject.nsenter import Streamed
from injector.stop import systemd
from injector.stop.plan import EARLY_BOOT, Ancestor, StopOutcome, StopPlan

DATA = Path(__file__).parent / "data"
LIST_UNITS = (DATA / "debian12-db-list-units.txt").read_text()
SHOW = (DATA / "debian12-db-show.txt").read_text()
# dboot run over SSH as root on that machine: no logind there (no D-Bus), so the whole
# session, dboot included, is in ssh.service's cgroup.
OVER_SSH = [
    Ancestor(385, "dboot", "0::/system.slice/ssh.service\n"),
    Ancestor(372, "bash", "0::/system.slice/ssh.service\n"),
    Ancestor(371, "sshd", "0::/system.slice/ssh.service\n"),
    Ancestor(263, "sshd", "0::/system.slice/ssh.service\n"),
]


def recorded(args: list[str]) -> subprocess.CompletedProcess[str]:
    """systemctl, as recorded on that machine."""
    if args[0] == "list-units":
        return subprocess.CompletedProcess(args, 0, LIST_UNITS, "")
    assert args[0] == "show", args
    return subprocess.CompletedProcess(args, 0, SHOW, "")


def test_the_plan_from_debian_12_stops_clients_before_their_databases() -> None:
    plan = systemd.read_plan("graceful", None, OVER_SSH, recorded)
    steps = {unit.name: unit.step for unit in plan.units}
    # The client is ordered after its database: it stops first; the socket that started
    # MariaDB goes after it; postgresql.service (an exited oneshot) carries the order from
    # the client to the cluster, which is Before= it.
    assert steps["dboot-vm-mariaload.service"] < steps["mariadb.service"] < steps["mariadb.socket"]
    pg = ("dboot-vm-pgload.service", "postgresql.service", "postgresql@15-main.service")
    assert [steps[unit] for unit in pg] == [1, 2, 3]
    # Unrelated units stop side by side, in the first step.
    assert steps["dboot-vm-slowstop.service"] == steps["getty@tty1.service"] == 1
    assert "fstrim.timer" in steps and "serial-getty@ttyS0.service" in steps
    by_name = {unit.name: unit for unit in plan.units}
    assert by_name["mariadb.service"].timeout == 900  # TimeoutStopSec=900
    assert (
        by_name["dboot-vm-slowstop.service"].command == "ExecStop=/usr/local/sbin/dboot-vm-slowstop"
    )
    assert by_name["dboot-vm-slowstop.service"].worst == 180  # its ExecStop=, then the signal
    assert (
        by_name["postgresql.service"].worst == 0
        and "exited" in by_name["postgresql.service"].command
    )
    assert by_name["fstrim.timer"].worst == 0
    cluster = by_name["postgresql@15-main.service"]
    assert cluster.timeout == 3600 and cluster.command.startswith("ExecStop=/usr/bin/pg_ctlcluster")
    # The longest chain: the client (90 s), then the cluster's ExecStop= and signal (1 h
    # each: TimeoutStopSec=1h). By default the ceiling caps it at 5 min.
    assert plan.worst_case == 90 + 7200 and plan.ceiling == 300


def test_the_plan_keeps_the_session_the_network_and_the_plumbing() -> None:
    plan = systemd.read_plan("graceful", 60, OVER_SSH, recorded)
    kept = {unit.name: unit.why for unit in plan.kept}
    assert kept["ssh.service"] == "docker-boot runs in it"
    assert kept["systemd-networkd.service"].startswith("a network daemon")
    assert kept["systemd-networkd.socket"].startswith("a network daemon")
    assert kept["systemd-journald.service"].startswith("the init's own plumbing")
    assert kept["systemd-user-sessions.service"].startswith("the init's own plumbing")
    assert kept["systemd-remount-fs.service"] == EARLY_BOOT  # DefaultDependencies=no
    assert not {unit.name for unit in plan.units} & set(kept)
    assert plan.ceiling == 60


def test_a_unit_whose_main_process_carries_the_session_is_kept() -> None:
    # A console login with logind: agetty (pid 246 that boot) exec'd login, which moved itself
    # and the shell into a session scope. getty@tty1's main process is still that login:
    # stopping the unit would end the session.
    scope = "0::/user.slice/user-0.slice/session-1.scope\n"
    on_tty1 = [Ancestor(pid, comm, scope) for pid, comm in ((600, "dboot"), (246, "login"))]
    units = [systemd.unit_info(block) for block in systemd.parse_show(SHOW)]
    plan = systemd.plan_from_units(units, on_tty1, "graceful", None)
    kept = {unit.name: unit.why for unit in plan.kept}
    assert kept["getty@tty1.service"] == "its main process (pid 246) carries your session"
    stopped = {unit.name for unit in plan.units}
    assert {"ssh.service", "getty@tty2.service"} <= stopped  # nobody came in through them


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1min 30s", 90.0),
        ("15min", 900.0),
        ("1h", 3600.0),
        ("100ms", 0.1),
        ("2min 500ms", 120.5),
        ("1.500s", 1.5),
        ("infinity", None),
        ("0", None),
        ("", None),
        ("soon", None),
    ],
)
def test_time_spans_read_as_systemctl_prints_them(text: str, seconds: float | None) -> None:
    assert systemd.parse_timespan(text) == seconds


class FakeSystemd:
    """systemctl for the stop and the undo: units go down at given times once a stop is
    queued, and up again when started (``stay_down`` ones never do)."""

    def __init__(self, down_at: dict[str, float], stay_down: frozenset[str] = frozenset()):
        self.down_at, self.stay_down = down_at, stay_down
        self.now = 0.0
        self.stopped_at: float | None = None
        self.started: list[str] = []
        self.calls: list[list[str]] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(args)
        if args[0] == "stop":
            self.stopped_at = self.now
        elif args[0] == "start":
            self.started = args[args.index("--") + 1 :]
        elif args[0] == "show":
            names = args[args.index("--") + 1 :]
            blocks = [f"Id={name}\nActiveState={self.state(name)}\n" for name in names]
            return subprocess.CompletedProcess(args, 0, "\n".join(blocks), "")
        return subprocess.CompletedProcess(args, 0, "", "")

    def state(self, name: str) -> str:
        if name in self.started:
            return "failed" if name in self.stay_down else "active"
        gone = self.stopped_at is not None and self.now - self.stopped_at >= self.down_at[name]
        return "inactive" if gone else "active"


def driven(events: Generator[Event, None, StopOutcome]) -> tuple[list[str], StopOutcome]:
    """The stop's log lines, then what it did."""
    streamed = Streamed(events)
    logs = [event.text for event in streamed if isinstance(event, Log)]
    return logs, streamed.value


def a_plan(ceiling: float | None) -> StopPlan:
    return systemd.read_plan("graceful", ceiling, OVER_SSH, recorded)


@pytest.fixture
def unguarded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lab mode is on in every test and cannot be turned off from inside one (an ancestor's
    environment has it): the guard is lifted for the stop alone, whose systemctl is fake."""
    monkeypatch.setattr(labmode, "refuse", lambda *args, **kwargs: None)


def test_the_stop_is_one_transaction_watched_until_every_unit_is_down(unguarded: None) -> None:
    plan = a_plan(None)
    fake = FakeSystemd({unit.name: 0.0 for unit in plan.units})
    fake.down_at.update({"mariadb.service": 3.0, "dboot-vm-slowstop.service": 8.4})
    logs, outcome = driven(systemd.stop(plan, fake, fake.clock, fake.sleep))
    (queued,) = [call for call in fake.calls if call[0] == "stop"]
    assert queued[:3] == ["stop", "--no-block", "--job-mode=ignore-requirements"]
    assert queued[4:] == [unit.name for unit in plan.units]
    assert not outcome.left and outcome.asked == queued[4:]
    order = [name for name, _ in outcome.stopped]
    assert order[-2:] == ["mariadb.service", "dboot-vm-slowstop.service"]
    assert dict(outcome.stopped)["dboot-vm-slowstop.service"] == pytest.approx(8.5)
    assert 8.5 <= outcome.seconds < 9.0
    assert "stopped dboot-vm-slowstop.service after 8.5 s" in logs


def test_the_ceiling_ends_the_wait_and_names_what_is_still_up(unguarded: None) -> None:
    plan = a_plan(5.0)
    fake = FakeSystemd({unit.name: 0.0 for unit in plan.units})
    fake.down_at["mariadb.service"] = 600.0  # flushing its buffer pool
    _, outcome = driven(systemd.stop(plan, fake, fake.clock, fake.sleep))
    assert outcome.left == ["mariadb.service"]
    assert 5.0 <= outcome.seconds < 5.6


def test_a_refused_transaction_stops_the_switch_before_anything_stopped(unguarded: None) -> None:
    def refusing(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(args, 1, "", "Failed to stop x.service: Access denied")

    with pytest.raises(EnvironmentFailure, match="Access denied: fix or mask the unit"):
        driven(systemd.stop(a_plan(None), refusing))


def test_the_undo_starts_them_again_and_names_those_that_will_not(unguarded: None) -> None:
    fake = FakeSystemd({}, stay_down=frozenset({"mariadb.socket"}))
    names = ["dboot-vm-mariaload.service", "mariadb.service", "mariadb.socket"]
    lines = systemd.start_again(names, fake, fake.clock, fake.sleep)
    assert fake.started == names
    assert lines == [
        "services: started again: 2 of 3 units",
        "services: would not start: mariadb.socket (failed); see systemctl status mariadb.socket",
    ]


def test_this_machines_units_are_never_stopped_in_lab_mode() -> None:
    calls: list[list[str]] = []

    def systemctl(args: list[str]) -> subprocess.CompletedProcess[str]:
        calls.append(args)
        return subprocess.CompletedProcess(args, 0, "", "")

    with pytest.raises(SafetyRefusal, match="the host's services are left alone"):
        driven(systemd.stop(a_plan(None), systemctl))
    assert calls == []
