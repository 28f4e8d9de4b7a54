"""The graceful stop's plan (issue 19): order, timeouts, worst case, ceiling, what stays, and how
the preflight says it. Plain data, no init needed; systemd's own output is in
test_stop_systemd.py, sysvinit's scripts run for real in test_stop_sysv.py."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest

from app.cli import print_stop_plan
from injector.errors import BadInput
from injector.preflight.preflight import ProcessInfo
from injector.stop import step
from injector.stop.plan import (
    DEFAULT_CEILING_CAP,
    Candidate,
    KeptUnit,
    StopMode,
    cgroup_units,
    check_stop_options,
    kept_by_name,
    make_plan,
    order_steps,
    plan_notices,
    session_users,
)


def test_units_stop_in_the_reverse_of_their_start_order_and_side_by_side_when_unrelated() -> None:
    # app starts after db, db after storage; cron is unrelated to all of them.
    steps = order_steps({"storage": {"db"}, "db": {"app"}, "app": set(), "cron": set()})
    assert steps == {"app": 1, "cron": 1, "db": 2, "storage": 3}


def test_an_ordering_cycle_is_cut_and_every_unit_still_gets_a_step() -> None:
    steps = order_steps({"a": {"b"}, "b": {"a"}, "c": {"a"}})
    assert set(steps) == {"a", "b", "c"}
    assert steps["c"] > steps["a"]


def test_the_worst_case_is_the_longest_chain_of_timeouts_and_the_ceiling_caps_it() -> None:
    plan = make_plan(
        "systemd",
        "graceful",
        [
            Candidate("app.service", 90.0, "SIGTERM"),
            Candidate(
                "db.service", 90.0, "ExecStop=/x", phases=2, after=frozenset({"app.service"})
            ),
            Candidate("cron.service", 10.0, "SIGTERM"),
        ],
        [KeptUnit("ssh.service", "your session runs in it")],
        None,
    )
    assert [(unit.name, unit.step) for unit in plan.units] == [
        ("app.service", 1),
        ("cron.service", 1),
        ("db.service", 2),
    ]
    assert plan.worst_case == 90 + 2 * 90  # app, then both phases of db; cron beside app
    assert plan.ceiling == min(plan.worst_case, DEFAULT_CEILING_CAP) == 270
    assert plan.fate("db.service") == "stop 2/2"
    assert plan.fate("ssh.service") == "kept" and plan.fate("session-3.scope") == "signals"
    # A unit without a timeout of its own counts as the cap; --stop-timeout is the ceiling.
    endless = make_plan("systemd", "graceful", [Candidate("x.service", None, "SIGTERM")], [], 20)
    assert endless.worst_case == DEFAULT_CEILING_CAP and endless.ceiling == 20


def test_signal_mode_stops_nothing_and_says_what_the_signals_mean() -> None:
    plan = make_plan("systemd", "signal", [Candidate("db.service", 90.0, "SIGTERM")], [], None)
    assert not plan.stops and plan.fate("db.service") == "signals"
    (notice,) = plan_notices(plan)
    assert notice.level == "warning" and notice.code == "stop-signal-only"
    assert "SIGKILL" in notice.message and notice.scope == "host"


def test_the_plan_notice_names_the_ceiling_and_what_stays() -> None:
    kept = [KeptUnit("ssh.service", "your session runs in it")] + [
        KeptUnit(
            f"systemd-{n}.service",
            "early-boot plumbing (DefaultDependencies=no), which the init itself stops last",
        )
        for n in ("sysctl", "remount-fs")
    ]
    slow = Candidate("db.service", 3600.0, "ExecStop=/x", phases=2)
    plan = make_plan("systemd", "graceful", [slow], kept, None)
    notices = {notice.code: notice for notice in plan_notices(plan)}
    assert "stops 1 unit in 1 steps" in notices["stop-plan"].message
    assert "worst case 120 min, ceiling 5 min" in notices["stop-plan"].message
    assert (
        "it keeps ssh.service, and 2 units of the init's own plumbing"
        in notices["stop-plan"].message
    )
    assert notices["stop-ceiling"].fix.startswith("--stop-timeout 7200")


def test_dboot_check_prints_the_units_in_order_with_their_timeouts() -> None:
    plan = make_plan(
        "systemd",
        "graceful",
        [
            Candidate("app.service", 90.0, "SIGTERM"),
            Candidate(
                "db.service",
                3600.0,
                "ExecStop=/usr/bin/pg_ctlcluster stop",
                after=frozenset({"app.service"}),
            ),
        ],
        [KeptUnit("ssh.service", "your session runs in it")],
        None,
    )
    processes = [
        ProcessInfo(pid, 1, "root", command, 0, service, False, [])
        for pid, command, service in (
            (10, "app", "app.service"),
            (11, "postgres", "db.service"),
            (12, "sshd", "ssh.service"),
            (13, "bash", "session-1.scope"),
        )
    ]
    out = io.StringIO()
    print_stop_plan(plan, processes, out)
    text = out.getvalue()
    assert "systemd stops 2 units first, in order (worst case 61 min 30 s, ceiling 5 min)" in text
    assert text.index("1. app.service  90 s") < text.index("2. db.service  60 min")
    assert "kept     ssh.service: your session runs in it" in text
    assert "signals  2 of 4 processes" in text


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("systemd-networkd.service", True),
        ("NetworkManager.service", True),
        ("ifup@ens3.service", True),
        ("networking", True),  # a sysvinit script
        ("nftables.service", True),
        ("dbus.service", True),
        ("postgresql@15-main.service", False),
        ("cron.service", False),
        ("ssh.service", False),  # kept only when it carries the session
    ],
)
def test_network_firewall_and_plumbing_are_kept_by_name(name: str, kept: bool) -> None:
    assert (kept_by_name(name) is not None) == kept


def test_units_are_read_from_both_cgroup_hierarchies() -> None:
    v2 = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/tmux-spawn-1.scope\n"
    assert cgroup_units(v2) == ["user@1000.service", "tmux-spawn-1.scope"]
    assert session_users(v2) == ["1000"]
    v1 = "12:pids:/\n1:name=systemd:/system.slice/ssh.service\n0::/\n"
    assert cgroup_units(v1) == ["ssh.service"] and session_users(v1) == []


@pytest.mark.parametrize(
    ("mode", "timeout", "words"),
    [
        ("gentle", None, "--stop=gentle is not a stop mode"),
        ("graceful", -1.0, "stop timeout -1 s"),
        ("graceful", math.nan, "stop timeout nan s"),
        ("graceful", 3601.0, "not between 0 and 3600 s"),
    ],
)
def test_bad_stop_options_are_refused(mode: str, timeout: float | None, words: str) -> None:
    with pytest.raises(BadInput, match=words):
        check_stop_options(mode, timeout)


def test_the_stand_ins_plan_stops_the_last_started_first() -> None:
    plan = step.standin_plan(["slow", "stubborn", "plain"], "graceful", None)
    assert [(unit.name, unit.step) for unit in plan.units] == [
        ("svc-plain-3", 1),
        ("svc-stubborn-2", 2),
        ("svc-slow-1", 3),
    ]
    assert plan.worst_case == 2.0 + 1.0 + 2.0 and plan.ceiling == plan.worst_case
    assert plan.manager == "stand-in" and plan.scope == "any"


def write(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_host_init_is_told_apart_by_what_it_leaves(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "root"
    write(proc / "1" / "comm", "systemd\n")
    assert step.host_manager(proc, root) == ""  # no /run/systemd/system: not booted by it
    (root / "run/systemd/system").mkdir(parents=True)
    assert step.host_manager(proc, root) == "systemd"
    other = tmp_path / "other"
    write(proc / "1" / "comm", "runit\n")
    assert step.host_manager(proc, other) == "runit"
    write(proc / "1" / "comm", "init\n")
    assert step.host_manager(proc, other) == ""
    write(other / "etc/inittab")
    (other / "etc/init.d").mkdir()
    assert step.host_manager(proc, other) == "sysvinit"


def test_a_host_without_a_known_init_leaves_everything_to_the_signals(tmp_path: Path) -> None:
    write(tmp_path / "proc" / "1" / "comm", "process_api\n")
    plan = step.host_plan("graceful", None, tmp_path / "proc", tmp_path / "root")
    assert plan.manager == "" and not plan.stops
    assert plan.note.startswith("PID 1 is process_api, no service manager dboot can ask")
    (notice,) = plan_notices(plan)
    assert notice.code == "stop-no-manager" and notice.level == "info"


@pytest.mark.parametrize("mode", ["graceful", "signal"])
def test_a_database_the_init_stops_is_no_longer_killed_writing(tmp_path: Path, mode: str) -> None:
    # The preflight's crafted host (test_preflight.py): postgres holds its files open for
    # writing. When the init stops it its own way first, that is no longer a warning.
    from injector.preflight import preflight
    from tests.unit.test_preflight import blocked_scene

    report = blocked_scene(tmp_path)
    assert "processes-writing" in [notice.code for notice in report.notices]
    stop_mode: StopMode = "graceful" if mode == "graceful" else "signal"
    database = Candidate("postgresql.service", 90.0, "ExecStop=/x")
    plan = make_plan("systemd", stop_mode, [database], [], None)
    preflight.set_stop_plan(report, plan)
    codes = [notice.code for notice in report.notices]
    assert report.stop is plan
    assert ("processes-writing" in codes) == (mode == "signal")
    assert codes.index("stop-plan" if mode == "graceful" else "stop-signal-only") > codes.index(
        "ptrace-denied"
    )
