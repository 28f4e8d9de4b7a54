"""The graceful stop in a rehearsal (issue 19): the sandbox's stand-in gets a stop order after
the copy and before the injection, and stops its services as an init would, the last started
first, each within its own timeout, the whole within the ceiling; a service that ignores it is
named and left to the stage's signals. A dry run of this machine stops nothing.

Real engine, real sandbox, real stand-in as PID 1 of its own PID namespace, real injection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from injector.events import Console, Event, Fact, Log, Notice, StepDone, StepStarted
from injector.switch import SwitchOptions, run

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))
# Started in this order: slow first, plain last. An init stops them the other way round.
KINDS = ["slow", "stubborn", "plain"]


def rehearse(**options: Any) -> list[Event]:
    given = SwitchOptions("tinybox", ["/bin/true"], rehearse=True, service_kinds=KINDS, **options)
    return list(run(given))


def steps(events: list[Event]) -> list[str]:
    return [event.step for event in events if isinstance(event, StepStarted)]


def fact(events: list[Event], key: str) -> object:
    (value,) = [
        e.value for e in events if isinstance(e, Fact) and (e.section, e.key) == ("stop", key)
    ]
    return value


def stage_lines(events: list[Event]) -> list[str]:
    return [event.text for event in events if isinstance(event, Console)]


def test_the_stand_in_stops_its_services_in_order_before_the_injection() -> None:
    events = rehearse()
    assert steps(events) == ["source", "preflight", "ramroot", "stop", "inject", "stage"]
    # The plan the preflight reported: the last started first, each with its own timeout.
    units = fact(events, "units")
    assert [(unit["name"], unit["step"], unit["timeout"]) for unit in units] == [  # type: ignore[attr-defined]
        ("svc-plain-3", 1, 2.0),
        ("svc-stubborn-2", 2, 1.0),
        ("svc-slow-1", 3, 2.0),
    ]
    assert fact(events, "worst_case_seconds") == 5.0 and fact(events, "ceiling_seconds") == 5.0
    # What it did: plain at once, stubborn ignored SIGTERM for its whole second, then slow
    # took its half second to write its state, and exited by itself.
    stopped = fact(events, "stopped")
    assert [name for name, _ in stopped] == ["svc-plain-3", "svc-slow-1"]  # type: ignore[attr-defined]
    assert fact(events, "left") == ["svc-stubborn-2"]
    seconds = fact(events, "seconds")
    assert isinstance(seconds, float) and 1.5 <= seconds < 3.0, seconds
    (left,) = [e for e in events if isinstance(e, Notice) and e.code == "stop-left"]
    assert left.level == "warning" and "svc-stubborn-2" in left.message
    done = next(e for e in events if isinstance(e, StepDone) and e.step == "stop")
    assert done.detail.startswith("2 of 3 stopped in ") and "svc-stubborn-2" in done.detail
    # The stand-in said it on its console, in that order; the stage then had only the stubborn
    # one to kill.
    console = stage_lines(events)
    orders = [line for line in console if "stop order:" in line and "SIGTERM," in line]
    assert [line.split()[3] for line in orders] == ["svc-plain-3", "svc-stubborn-2", "svc-slow-1"]
    assert any("svc-slow-1" in line and "stopped (exit 0)" in line for line in console), console
    killed = [line for line in console if "SIGKILL:" in line]
    assert len(killed) == 1 and "svc-stubborn" in killed[0], console


def test_the_ceiling_bounds_the_whole_stop_and_names_what_it_cut_short() -> None:
    events = rehearse(stop_timeout=0.5)
    assert fact(events, "ceiling_seconds") == 0.5
    assert [name for name, _ in fact(events, "stopped")] == ["svc-plain-3"]  # type: ignore[attr-defined]
    assert fact(events, "left") == ["svc-stubborn-2", "svc-slow-1"]
    seconds = fact(events, "seconds")
    assert isinstance(seconds, float) and 0.5 <= seconds < 1.0, seconds
    logs = [event.text for event in events if isinstance(event, Log)]
    assert "svc-slow-1 still runs after the ceiling; left for the signals" in logs, logs


def test_stop_signal_gives_the_stand_in_no_stop_order() -> None:
    events = rehearse(service_stop="signal")
    assert "stop" not in steps(events)
    assert not any("stop order:" in line for line in stage_lines(events))
    (notice,) = [e for e in events if isinstance(e, Notice) and e.code == "stop-signal-only"]
    assert notice.level == "warning" and "3 units" in notice.message


def test_a_dry_run_of_this_machine_stops_nothing(tmp_path: Path) -> None:
    # Lab mode allows a dry run of the real switch: every step up to the injection, undone.
    # The stop is not one of them, whatever this machine's init (and here PID 1 is no
    # service manager at all: the plan says so).
    result = subprocess.run(
        # --force: some hosts deny a ptrace of their PID 1, which a dry run only reports.
        [
            DBOOT,
            "switch",
            "--dry-run",
            "--yes",
            "--force",
            "--json",
            "--state-dir",
            str(tmp_path / "state"),
            "tinybox",
            "/bin/sh",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert "stop" not in [e["step"] for e in events if e["event"] == "step_started"]
    facts = {(e["section"], e["key"]): e["value"] for e in events if e["event"] == "fact"}
    comm = Path("/proc/1/comm").read_text().strip()
    assert facts[("stop", "mode")] == "graceful"
    if not Path("/run/systemd/system").is_dir():
        assert facts[("stop", "manager")] == ""
        assert facts[("stop", "note")].startswith(f"PID 1 is {comm}, no service manager")
    assert events[-1]["event"] == "finished" and events[-1]["outcome"] == "dry-run"


def test_a_teaching_rehearsal_pauses_before_the_stop_order() -> None:
    from injector import teach

    pauses: list[tuple[str, int]] = []  # step, the stand-in's services alive at its pause

    def hook(pause: teach.Pause) -> None:
        if pause.side == "host" and pause.target_pid is not None:
            alive = [p for p in teach.sandbox_processes(pause.target_pid) if p.pid != 1]
            pauses.append((pause.step, len([p for p in alive if p.state not in ("Z", "X")])))
        if pause.step == "stop":
            assert pause.title == "The graceful stop" and pause.position == "host 4/9"
            assert pause.syscall.startswith('send(control, "stop 5"); kill(')
            assert pause.syscall.endswith("then svc-plain-3, svc-stubborn-2, svc-slow-1")

    events = rehearse(pause=hook)
    steps = [step for step, _ in pauses]
    assert steps[steps.index("copy") + 1 : steps.index("copy") + 3] == ["stop", "seize"]
    # The stop order waits for the go: all three run at its pause, one is left at the seize.
    alive = dict(pauses)
    assert alive["stop"] == 3 and alive["seize"] == 1
    assert fact(events, "left") == ["svc-stubborn-2"]
