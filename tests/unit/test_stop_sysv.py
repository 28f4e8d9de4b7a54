"""sysvinit and runit hosts (issue 19): the plan from their own files, and for sysvinit the stop
itself, run for real: init scripts in a crafted root (never this machine's /etc/init.d) that
log what they were asked, one of them hanging. runit's `sv` is not on this machine: its
answers are given by a stand-in function, and said so."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from injector.errors import SafetyRefusal
from injector.stop import runit, sysv
from injector.stop.plan import Ancestor
from tests.unit.test_stop_systemd import driven

SCRIPT = """#!/bin/sh
echo "$(basename "$0") $1" >>{log}
[ "$1" = stop ] && [ "$(basename "$0")" = hangs ] && exec sleep 60.19
exit 0
"""


def make_root(tmp_path: Path, log: Path) -> Path:
    """Debian's layout: scripts in init.d, S links for runlevel 2, K links for the halt."""
    root = tmp_path / "root"
    for directory in ("init.d", "rc2.d", "rc0.d", "rcS.d"):
        (root / "etc" / directory).mkdir(parents=True)
    scripts = {
        # name: (S number in rc2.d or None, K number in rc0.d or None)
        "app": (3, 1),
        "postgresql": (2, 2),
        "hangs": (2, 2),
        "ssh": (2, 3),
        "networking": (None, 5),  # rcS.d only: never a runlevel service
        "network-manager": (2, 4),
        "sendsigs": (None, 6),  # the halt's own machinery
        "cron": (2, None),  # no K link: stops last
    }
    for name, (start, kill) in scripts.items():
        script = root / "etc/init.d" / name
        script.write_text(SCRIPT.format(log=log))
        script.chmod(0o755)
        if start is not None:
            (root / f"etc/rc2.d/S{start:02d}{name}").symlink_to(f"../init.d/{name}")
        if kill is not None:
            (root / f"etc/rc0.d/K{kill:02d}{name}").symlink_to(f"../init.d/{name}")
    (root / "etc/rcS.d/S01networking").symlink_to("../init.d/networking")
    return root


SSH_SESSION = [Ancestor(500, "bash", ""), Ancestor(400, "sshd", "")]


def test_scripts_stop_in_the_halts_k_order_and_the_session_and_network_stay(
    tmp_path: Path,
) -> None:
    log = tmp_path / "asked"
    root = make_root(tmp_path, log)
    plan = sysv.read_plan("graceful", 1.5 + 3, SSH_SESSION, root, level="2")
    assert [unit.name for unit in plan.units] == ["app", "hangs", "postgresql", "cron"]
    assert [unit.step for unit in plan.units] == [1, 2, 3, 4]  # one by one, as the halt does
    kept = {unit.name: unit.why for unit in plan.kept}
    assert set(kept) == {"ssh", "network-manager"}
    assert "SSH server your session came through" in kept["ssh"]
    # The hanging script gets what its timeout allows; lowered here to keep the test short.
    plan.units[1] = type(plan.units[1])("hangs", 2, 1.5, 1.5, "/etc/init.d/hangs stop")
    started = time.monotonic()
    logs, outcome = driven(sysv.stop(plan, root))
    took = time.monotonic() - started
    assert log.read_text().split("\n")[:-1] == [
        "app stop",
        "hangs stop",
        "postgresql stop",
        "cron stop",
    ]
    assert [name for name, _ in outcome.stopped] == ["app", "postgresql", "cron"]
    assert outcome.left == ["hangs"]
    assert 1.5 <= took < 4, took  # bounded by the hanging script's own timeout
    assert any("hangs stop: still running after 1.5 s" in line for line in logs), logs
    # Nothing of the hanging script is left running: its process group went with it.
    assert "sleep 60.19" not in subprocess.run(["ps", "-eo", "args"], capture_output=True,
                                            text=True).stdout  # fmt: skip
    # The undo starts them again, the last stopped first.
    log.write_text("")
    lines = sysv.start_again(outcome.asked, root)
    assert log.read_text().split("\n")[:-1] == [
        "cron start",
        "postgresql start",
        "hangs start",
        "app start",
    ]
    assert lines == ["services: started again: 4 of 4 scripts"]


def test_the_ceiling_cuts_the_stop_short_and_names_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "asked"
    root = make_root(tmp_path, log)
    plan = sysv.read_plan("graceful", 1.0, [], root, level="2")
    started = time.monotonic()
    _, outcome = driven(sysv.stop(plan, root))
    assert time.monotonic() - started < 2.5
    assert [name for name, _ in outcome.stopped] == ["app"]
    assert outcome.left == ["hangs", "postgresql", "ssh", "cron"]  # no SSH session here


def test_this_machines_scripts_are_never_run_in_lab_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DBOOT_REHEARSAL_ONLY", "1")
    plan = sysv.read_plan("graceful", None, [], make_root(tmp_path, tmp_path / "log"), level="2")
    with pytest.raises(SafetyRefusal, match="the host's services are left alone"):
        driven(sysv.stop(plan))  # root "/": this machine's
    assert not (tmp_path / "log").exists()


def fake_sv(states: dict[str, str], asked: list[list[str]]) -> runit.Runner:
    """runit's `sv`, which this machine lacks: answers from ``states``, records each call."""

    def run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        asked.append(args)
        if args[0] == "status":
            name = Path(args[1]).name
            return subprocess.CompletedProcess(
                args, 0, f"{states[name]}: {args[1]}: (pid 9) 5s", ""
            )
        if "stop" in args:
            for path in args[args.index("stop") + 1 :]:
                states[Path(path).name] = "down"
        return subprocess.CompletedProcess(args, 0, "", "")

    return run


def test_runit_stops_its_running_services_at_once_but_the_sessions_and_the_network(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    for name in ("sshd", "postgresql", "cron", "dhcpcd", "getty-tty1"):
        (root / "etc/service" / name).mkdir(parents=True)
    states = {"sshd": "run", "postgresql": "run", "cron": "run", "dhcpcd": "run",
              "getty-tty1": "down"}  # fmt: skip
    asked: list[list[str]] = []
    proc = tmp_path / "proc"
    (proc / "300").mkdir(parents=True)
    (proc / "300" / "cmdline").write_bytes(b"runsv\0sshd\0")
    plan = runit.read_plan(
        "graceful",
        None,
        [Ancestor(500, "bash", ""), Ancestor(400, "sshd", ""), Ancestor(300, "runsv", "")],
        root,
        fake_sv(states, asked),
        proc,
    )
    assert [(unit.name, unit.step) for unit in plan.units] == [("cron", 1), ("postgresql", 1)]
    assert {unit.name for unit in plan.kept} == {"sshd", "dhcpcd"}
    _, outcome = driven(runit.stop(plan, root, fake_sv(states, asked)))
    assert [name for name, _ in outcome.stopped] == ["cron", "postgresql"] and not outcome.left
    assert ["-w", "7", "stop", str(root / "etc/service/cron"),
            str(root / "etc/service/postgresql")] in asked  # fmt: skip
