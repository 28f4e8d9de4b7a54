"""One rule for what stops a run, the same in the engine, in --help and in the README:
blockers stop a run unless --force; warnings never stop a run; --yes skips only the typed
confirmation. Here the engine's side (``switch.blockers``) and the CLI's help text."""

from __future__ import annotations

import dataclasses

import pytest

from app import cli
from injector import switch
from injector.events import Notice
from injector.preflight import preflight
from injector.preflight.preflight import FORCE_RULE, Pid1Facts, RamFacts, Report, SessionFacts

MiB = 1 << 20
WARNINGS = [
    Notice("warning", "processes-writing", "2 processes hold files open for writing", "stop"),
    Notice("warning", "session-remote-no-ssh", "remote session, no sshd in the image", "x"),
    Notice("warning", "modules-missing", "no kernel modules to carry over", "x"),
    Notice("info", "modules-copied", "the kernel's modules go into the new root", "x"),
]
BLOCKER = Notice("blocker", "init-foreign-arch", "init is an aarch64 binary", "use amd64")


def report(notices: list[Notice]) -> Report:
    return Report(
        ram=RamFacts(64 * MiB, 8 << 30, 8 << 30, 128 * MiB, (8 << 30) - 64 * MiB),
        swap=[],
        processes=[],
        session=SessionFacts(False, "console", False),
        pid1=Pid1Facts(1, "/sbin/init", ["/sbin/init"], True, "root", False),
        init_argv=["/sbin/init"],
        notices=notices,
    )


@pytest.mark.parametrize("mode", ["switch", "target", "rehearse"])
def test_warnings_never_stop_a_run(mode: switch.Mode) -> None:
    assert switch.blockers(report(WARNINGS), mode) == []
    assert not report(WARNINGS).blocked


@pytest.mark.parametrize("mode", ["switch", "target", "rehearse"])
def test_an_init_that_cannot_run_here_blocks_every_mode(mode: switch.Mode) -> None:
    # The sandbox shares the kernel: an init it cannot exec fails a rehearsal just the same.
    assert switch.blockers(report([*WARNINGS, BLOCKER]), mode) == [BLOCKER]


def test_the_rule_is_one_text() -> None:
    assert FORCE_RULE == (
        "blockers stop a run unless --force; warnings never stop a run; "
        "--yes skips only the typed confirmation"
    )
    assert FORCE_RULE in (preflight.__doc__ or "") or "FORCE_RULE" in (preflight.__doc__ or "")


def test_help_says_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["switch", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ("warnings never stop a run", "only the typed confirmation", "blockers"):
        assert words in text and words in FORCE_RULE
    assert "despite warnings" not in text


def test_the_report_stays_plain_data() -> None:
    data = report([BLOCKER]).to_json()
    assert data["blocked"] is True and data["modules"] is None
    assert dataclasses.asdict(report([]))["host_files"] == []
