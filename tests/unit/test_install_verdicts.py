"""What an install keeps of the switch preflight's verdicts, and what it tells the user to run."""

from __future__ import annotations

import pytest

from injector.events import Notice
from injector.install.install import after_reboot_lines, switch_verdicts_for_install


def notice(code: str, level: str = "warning") -> Notice:
    return Notice(level, code, f"{code} says so")  # type: ignore[arg-type]


def test_what_only_a_switch_does_is_left_out() -> None:
    switch_only = ["ram-short", "swap-disk", "ptrace-denied", "processes-writing", "stop-plan",
                   "stop-ceiling", "stop-signal-only"]  # fmt: skip
    kept = ["image-arch", "modules-missing", "carry-ssh"]
    verdicts = switch_verdicts_for_install([notice(code) for code in switch_only + kept])
    assert [verdict.code for verdict in verdicts] == kept


def test_a_container_root_blocks_an_install() -> None:
    (verdict,) = switch_verdicts_for_install([notice("container-detected")])
    assert verdict.level == "blocker" and verdict.message == "container-detected says so"


def test_the_line_to_run_after_the_reboot_names_this_sessions_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSH_CONNECTION", "10.0.2.2 50022 10.0.2.15 22")
    assert after_reboot_lines(10)[0] == (
        "after the reboot, within 10 min: ssh -p 22 -o HostKeyAlias=10.0.2.15 root@10.0.2.15"
        " touch /run/dboot/keep"
    )
    monkeypatch.setenv("SSH_CONNECTION", "::ffff:192.0.2.9 50022 ::ffff:192.0.2.1 2200")
    assert "ssh -p 2200 -o HostKeyAlias=[192.0.2.1]:2200 root@192.0.2.1" in after_reboot_lines(5)[0]
    monkeypatch.delenv("SSH_CONNECTION")
    assert after_reboot_lines(None) == [
        "after the reboot: ssh root@HOST dboot status (no revert timer: kept at once)"
    ]
