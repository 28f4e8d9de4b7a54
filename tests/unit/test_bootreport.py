"""The boot reporter's pure parts: waiting for systemd's "up", the failed units, the report."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from initstage import bootreport
from initstage.bootreport import Outcome


class Systemd:
    """systemctl's answers in turn, then the last one again; a clock that the sleeps move."""

    def __init__(self, *answers: str | Exception) -> None:
        self.answers = list(answers)
        self.now = 0.0
        self.calls: list[list[str]] = []

    def run(self, argv: list[str]) -> tuple[int, str]:
        self.calls.append(argv)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        return (0 if answer == "running" else 1), answer + "\n"

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def wait(self, ceiling: float = 60.0) -> str:
        return bootreport.wait_until_up(
            "/usr/bin/systemctl", self.run, lambda: self.now, self.sleep, ceiling
        )


def test_waits_through_a_systemd_that_is_not_listening_yet_then_starting() -> None:
    timeout = subprocess.TimeoutExpired(["systemctl"], 20)
    systemd = Systemd(FileNotFoundError(2, "no socket"), timeout, "offline", "initializing",
                      "starting", "degraded")  # fmt: skip
    assert systemd.wait() == "degraded"
    assert systemd.now == 5 * bootreport.POLL_SECONDS
    assert systemd.calls[0] == ["/usr/bin/systemctl", "is-system-running"]


def test_a_system_that_never_comes_up_is_reported_at_the_ceiling() -> None:
    systemd = Systemd("starting")
    assert systemd.wait(ceiling=10) == "timed out"
    assert 10 <= systemd.now <= 10 + bootreport.POLL_SECONDS


def test_failed_units_are_the_first_column() -> None:
    output = (
        "ssh.service loaded failed failed OpenBSD Secure Shell server\n"
        "x.mount     loaded failed failed X\n"
    )
    assert bootreport.failed_units("systemctl", lambda argv: (0, output)) == [
        "ssh.service",
        "x.mount",
    ]
    assert bootreport.failed_units("systemctl", lambda argv: (0, "")) == []


def test_the_summary_says_what_a_person_at_the_console_needs() -> None:
    outcome = Outcome("running", 41.6, ["ens2 10.0.2.15/24"], [])
    assert outcome.summary() == (
        "boot report: running after 42 s; addresses: ens2 10.0.2.15/24; failed units: none"
    )
    assert Outcome("not systemd", 30.0, [], None).summary() == (
        "boot report: not systemd after 30 s; addresses: none"
    )


def test_the_report_keeps_the_shims_half(tmp_path: Path) -> None:
    path = tmp_path / "last-boot.json"
    path.write_text(json.dumps({"booted": "new", "tree": "/dboot/trees/x"}))
    bootreport.add_to_report(str(path), Outcome("degraded", 12.0, [], ["a.service"]))
    report = json.loads(path.read_text())
    assert report["booted"] == "new" and report["tree"] == "/dboot/trees/x"
    assert report["up"]["state"] == "degraded" and report["up"]["failed_units"] == ["a.service"]
    assert not list(tmp_path.glob("*.tmp"))
    path.write_text("{")  # a report the shim could not finish: the reporter's half still lands
    bootreport.add_to_report(str(path), Outcome("running", 1.0, [], []))
    assert json.loads(path.read_text())["up"]["state"] == "running"


def test_the_settle_time_from_the_kernel_command_line() -> None:
    assert bootreport.settle_seconds({}) == bootreport.SETTLE_SECONDS
    assert bootreport.settle_seconds({"DBOOT_REPORT_SETTLE": "5"}) == 5.0
    assert bootreport.settle_seconds({"DBOOT_REPORT_SETTLE": "-1"}) == 0.0
    assert bootreport.settle_seconds({"DBOOT_REPORT_SETTLE": "soon"}) == bootreport.SETTLE_SECONDS
