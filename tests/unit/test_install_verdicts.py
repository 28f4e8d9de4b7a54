"""Which of the switch preflight's verdicts an install keeps, and how it weighs them."""

from __future__ import annotations

from injector.events import Notice
from injector.install.install import switch_verdicts_for_install


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
