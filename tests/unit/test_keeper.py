"""The keeper's decisions (issue 9 §4) against a fake clock and a fake system, and the
options and plan fields that ask for it. The real keeper, forked by a real stage, is in
tests/sandbox/test_keeper.py."""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app import cli
from app.cli import parse_command_line, run_cli, switch_options
from initstage.keeper import (
    FIRST_RESPAWN_DELAY,
    LONGEST_RESPAWN_DELAY,
    POLL_SECONDS,
    STABLE_SECONDS,
    Keeper,
    KeeperLog,
    KeeperSettings,
    keep_instructions,
)
from initstage.plan import KEEP_FILE, Plan, PlanError, plan_from_dict
from injector.access import facts
from injector.errors import BadInput
from injector.switch import SwitchOptions, _keeper_words, keeper_ssh_argv

SSHD = ("/usr/sbin/sshd", "-D", "-e")


@dataclass
class FakeHost:
    """The system as the keeper sees it; every effect is recorded in ``done``."""

    now: float = 1000.0
    files: set[str] = field(default_factory=set)
    touched: dict[str, int] = field(default_factory=dict)  # path: its ctime
    running: set[int] = field(default_factory=set)
    done: list[str] = field(default_factory=list)
    next_pid: int = 100
    start_fails: bool = False
    handed: list[tuple[int | None, float]] = field(default_factory=list)
    broken: dict[str, OSError] = field(default_factory=dict)  # method name: what it raises

    def clock(self) -> float:
        return self.now

    def wall_clock(self) -> float:
        return 1_700_000_000.0 + self.now

    def identity(self, path: str) -> tuple[int, int, int] | None:
        if "identity" in self.broken:
            raise self.broken["identity"]
        return (1, hash(path), self.touched.get(path, 0)) if path in self.files else None

    def make_dir(self, path: str) -> bool:
        if "make_dir" in self.broken:
            raise self.broken["make_dir"]
        if path in self.files:
            return False
        self.files.add(path)
        return True

    def prepare_ssh(self) -> list[str]:
        return []

    def start(self, argv: tuple[str, ...]) -> int:
        if self.start_fails:
            raise OSError(2, "No such file or directory")
        self.next_pid += 1
        self.running.add(self.next_pid)
        self.done.append(f"start {self.next_pid}")
        return self.next_pid

    def exit_status(self, pid: int) -> int | None:
        return None if pid in self.running else 3 << 8

    def hand_over(self, argv: tuple[str, ...], pid: int | None, delay: float) -> str:
        self.handed.append((pid, delay))
        return "the fake has no shell"  # the live one returns only when it could not exec

    def mark_revert_due(self) -> None:
        if "mark_revert_due" in self.broken:
            raise self.broken["mark_revert_due"]
        self.done.append("marker")

    def sync(self) -> str:
        self.done.append("sync")
        return "done"

    def reboot(self) -> None:
        self.done.append("reboot")


def keeper(**settings: object) -> tuple[Keeper, FakeHost, list[str]]:
    host, lines = FakeHost(), list[str]()
    return Keeper(KeeperSettings(**settings), host, lines.append), host, lines  # type: ignore[arg-type]


def run_until(kept: Keeper, host: FakeHost, moment: float) -> list[float]:
    """Tick and sleep (the fake clock) until ``moment`` or the keeper ends; the sleeps."""
    sleeps = []
    while host.now < moment:
        pause = kept.tick()
        if pause is None:
            break
        assert pause > 0, "a busy loop"
        sleeps.append(pause)
        host.now += pause
    return sleeps


@pytest.mark.parametrize("may_reboot", [False, True])
def test_without_the_keep_file_the_deadline_reverts_once(may_reboot: bool) -> None:
    kept, host, lines = keeper(revert_after_seconds=600.0, may_reboot=may_reboot)
    run_until(kept, host, host.now + 599.9)
    assert host.done == [], "nothing may happen before the deadline"
    sleeps = run_until(kept, host, host.now + 60)
    assert host.done == (["sync", "reboot"] if may_reboot else ["marker"])
    assert kept.tick() is None, "nothing left to do after the revert"
    assert max(sleeps, default=0) <= POLL_SECONDS
    if may_reboot:
        assert f"revert deadline passed without {KEEP_FILE}: sync, then reboot" in lines
    else:
        assert any("a real switch would reboot now" in line for line in lines), lines


def test_the_keep_file_seen_before_the_deadline_cancels_the_revert() -> None:
    kept, host, lines = keeper(revert_after_seconds=60.0, may_reboot=True)
    run_until(kept, host, host.now + 30)
    host.files.add(KEEP_FILE)
    assert kept.tick() is None  # no sshd to keep: the keeper ends
    run_until(kept, host, host.now + 120)
    assert host.done == []
    assert f"{KEEP_FILE} found: the revert is off, the new system stays" in lines


def test_the_keep_files_directory_is_made_again_after_a_fresh_run() -> None:
    kept, host, lines = keeper(revert_after_seconds=60.0)
    kept.tick()
    assert "/run/dboot" in host.files and lines[-1] == "made /run/dboot, for the keep file"
    host.files.clear()  # the new init mounted a fresh /run
    kept.tick()
    assert "/run/dboot" in host.files
    assert lines.count("made /run/dboot, for the keep file") == 2
    kept.tick()
    assert lines.count("made /run/dboot, for the keep file") == 2


def test_the_keep_file_is_looked_at_when_the_deadline_comes() -> None:
    kept, host, _ = keeper(revert_after_seconds=60.0, may_reboot=True)
    host.now += 61  # the keeper slept through (a busy machine): the file counts all the same
    host.files.add(KEEP_FILE)
    assert kept.tick() is None
    assert host.done == []


def test_a_keep_file_there_from_the_start_counts_only_once_touched_again() -> None:
    # An image that ships /run/dboot/keep must not turn the revert off by itself.
    host, lines = FakeHost(files={KEEP_FILE}), list[str]()
    kept = Keeper(KeeperSettings(revert_after_seconds=60.0), host, lines.append)
    kept.announce()
    assert any("was there before the new system ran" in line for line in lines), lines
    run_until(kept, host, host.now + 30)
    assert kept.deadline is not None, "the image's keep file turned the revert off"
    host.touched[KEEP_FILE] = 1  # `touch` changes its ctime
    assert kept.tick() is None and host.done == []
    # Untouched, it is the deadline that ends the timer: the revert comes.
    host, lines = FakeHost(files={KEEP_FILE}), []
    kept = Keeper(KeeperSettings(revert_after_seconds=60.0), host, lines.append)
    run_until(kept, host, host.now + 61)
    assert host.done == ["marker"]


@pytest.mark.parametrize(
    "broken",
    [
        # /run/dboot is a file or a dangling link: it cannot be made, on every tick.
        {"make_dir": FileExistsError(17, "File exists")},
        # The keep file cannot even be looked at: not kept.
        {"identity": PermissionError(13, "Permission denied")},
    ],
    ids=["no-keep-dir", "keep-file-unreadable"],
)
def test_the_deadline_fires_whatever_fails_around_it(broken: dict[str, OSError]) -> None:
    kept, host, lines = keeper(revert_after_seconds=60.0, may_reboot=True)
    host.broken.update(broken)
    run_until(kept, host, host.now + 59)
    assert host.done == [] and kept.deadline is not None
    run_until(kept, host, host.now + 5)
    assert host.done == ["sync", "reboot"], lines
    warnings = [line for line in lines if line.startswith("warning: ")]
    assert len(warnings) == 1, "a failure is logged once, not on every tick"
    if "make_dir" in broken:
        assert (
            "cannot make /run/dboot" in warnings[0]
            and "revert comes at the deadline" in (warnings[0])
        )


def test_a_marker_that_cannot_be_left_is_said_and_the_keeper_ends() -> None:
    kept, host, lines = keeper(revert_after_seconds=5.0)
    host.broken["mark_revert_due"] = NotADirectoryError(20, "Not a directory")
    run_until(kept, host, host.now + 10)
    assert "warning: could not leave /run/dboot/revert-due: [Errno 20] Not a directory" in lines
    assert any("a real switch would reboot now" in line for line in lines)


def test_nothing_asked_means_nothing_to_do() -> None:
    kept, host, lines = keeper()
    assert not kept.settings.has_work
    assert kept.tick() is None and host.done == []
    kept.announce()
    assert lines == ["revert: no timer (the new system stays)"]


def test_the_ssh_server_is_restarted_with_a_pause_that_grows_and_resets() -> None:
    kept, host, lines = keeper(ssh_argv=SSHD)
    kept.tick()
    assert host.done == ["start 101"]
    pauses = []
    for _ in range(9):  # it dies at once, every time
        host.running.clear()
        died, starts = host.now, len(host.done)
        while (pause := kept.tick()) is not None and len(host.done) == starts:
            assert pause > 0, "a busy loop"
            assert host.now - died < 2 * LONGEST_RESPAWN_DELAY, "never started again"
            host.now += pause
        pauses.append(host.now - died)
        host.now += 0.5
    # A pause before each start, growing, capped.
    assert pauses == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    # One that ran a long time starts the pauses afresh.
    host.now += STABLE_SECONDS
    host.running.clear()
    kept.tick()
    assert f"starting it again in {FIRST_RESPAWN_DELAY:g} s" in lines[-1]
    assert LONGEST_RESPAWN_DELAY == 60.0
    assert kept.tick() == pytest.approx(POLL_SECONDS)  # with sshd to keep it never ends


def test_an_ssh_server_that_cannot_start_is_tried_again_later() -> None:
    kept, host, lines = keeper(ssh_argv=SSHD)
    host.start_fails = True
    assert kept.tick() == pytest.approx(FIRST_RESPAWN_DELAY)
    assert any("cannot start it" in line for line in lines), lines
    host.start_fails = False
    host.now += 1
    kept.tick()
    assert host.done == ["start 101"]


def test_ssh_and_a_revert_together() -> None:
    kept, host, lines = keeper(ssh_argv=SSHD, revert_after_seconds=5.0)
    run_until(kept, host, host.now + 4.9)
    assert host.handed == [], "no hand-over while the timer runs: the shell has none"
    run_until(kept, host, host.now + 5)
    assert host.done == ["start 101", "marker"]
    # Only the SSH server is left: the image's shell is asked to keep it, once.
    assert host.handed == [(101, FIRST_RESPAWN_DELAY)]
    assert "hand-over failed (the fake has no shell): keeping it from here" in lines
    assert kept.tick() is not None, "the SSH server is still kept after the revert"
    assert len(host.handed) == 1


def test_with_only_ssh_the_shell_takes_over_at_once() -> None:
    kept, host, _ = keeper(ssh_argv=SSHD)
    kept.tick()
    assert host.done == ["start 101"] and host.handed == [(101, FIRST_RESPAWN_DELAY)]
    kept, host, _ = keeper(ssh_argv=SSHD, revert_after_seconds=60.0)
    host.files.add(KEEP_FILE)
    host.start_fails = True
    kept.tick()
    assert host.handed == [(None, FIRST_RESPAWN_DELAY)]  # none running: the shell starts it


def test_the_instructions_name_the_file_the_time_and_the_wipe() -> None:
    text = keep_instructions(1_700_000_000.0)  # 22:13:20 UTC
    assert f"`touch {KEEP_FILE}`" in text and "before 22:13:20 UTC" in text
    assert "nothing to revert to" in text


def test_the_log_lines_go_to_the_file_and_on_the_machine_to_the_console(tmp_path: Path) -> None:
    console = tmp_path / "console"
    console.write_text("")  # the console is never created, only written to
    log = KeeperLog(str(tmp_path / "keeper.log"), str(console), kmsg=False, wall_clock=lambda: 0.0)
    log("revert deadline passed")
    log("second line")
    expected = "dboot-keeper: 00:00:00 revert deadline passed\ndboot-keeper: 00:00:00 second line\n"
    assert (tmp_path / "keeper.log").read_text() == expected
    assert console.read_text() == expected
    KeeperLog(str(tmp_path / "other.log"), str(tmp_path / "none"), kmsg=False)("no console")
    assert not (tmp_path / "none").exists()


# --- The plan fields --------------------------------------------------------------------


def plan_dict(**fields: object) -> dict[str, object]:
    base = json.loads(Plan(new_root="/run/dboot/root", init_argv=["/bin/sh"]).to_json())
    return {**base, **fields}


def test_the_keeper_fields_travel_in_the_plan() -> None:
    plan = plan_from_dict(plan_dict(keeper_ssh_argv=list(SSHD), revert_after_seconds=3))
    assert plan.keeper_ssh_argv == list(SSHD)
    assert plan.revert_after_seconds == 3.0 and isinstance(plan.revert_after_seconds, float)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"revert_after_seconds": -1}, "revert_after_seconds -1.0 must be from 0"),
        ({"revert_after_seconds": 86401}, "must be from 0 (none) to 86400"),
        ({"revert_after_seconds": True}, "field revert_after_seconds has type bool"),
        ({"keeper_ssh_argv": ["sshd"]}, "keeper_ssh_argv[0] 'sshd' must be an absolute path"),
        ({"keeper_ssh_argv": ["/usr/sbin/sshd", 1]}, "keeper_ssh_argv must be a list of strings"),
        ({"keeper_ssh_argv": ["/usr/sbin/sshd", "a\0"]}, "contains a NUL byte"),
    ],
)
def test_bad_keeper_fields_are_refused(fields: dict[str, object], words: str) -> None:
    with pytest.raises(PlanError, match=re.escape(words)):
        plan_from_dict(plan_dict(**fields))


# --- The options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ({"revert_after": 0.0}, "revert timer 0 min is not between 1 and 1440 min"),
        ({"revert_after": -2.0}, "revert timer -2 min"),
        ({"revert_after": math.nan}, "revert timer nan min"),
        ({"revert_after": math.inf}, "revert timer inf min"),
        ({"revert_after": 1441.0}, "not between 1 and 1440 min"),
        # 0.01 min is 0.6 s: nobody could log in and keep the new system in time.
        ({"revert_after": 0.01}, "revert timer 0.01 min is too short: the new system would"),
        ({"revert_after": 0.99}, "at least 1, e.g. 10"),
        ({"revert_after": 5.0, "no_revert": True}, "--revert-after and --no-revert contradict"),
    ],
)
def test_bad_revert_timers_are_refused_when_made(given: dict[str, object], words: str) -> None:
    with pytest.raises(BadInput, match=re.escape(words)):
        SwitchOptions("tinybox", ["/sbin/init"], **given)  # type: ignore[arg-type]


def test_the_revert_timer_is_10_minutes_for_a_remote_switch_only() -> None:
    plain = SwitchOptions("tinybox", ["/sbin/init"])
    assert plain.revert_minutes(remote=True) == 10.0
    assert plain.revert_minutes(remote=False) is None
    assert SwitchOptions("tinybox", ["/sbin/init"], no_revert=True).revert_minutes(True) is None
    given = SwitchOptions("tinybox", ["/sbin/init"], revert_after=1.5)
    assert given.revert_minutes(remote=False) == 1.5
    # A --target-pid lab is no remote machine's switch: no timer unless asked.
    lab = SwitchOptions("tinybox", ["/sbin/init"], target_pid=1234)
    assert lab.revert_minutes(remote=True) is None


def test_the_command_line_gives_the_keeper_options() -> None:
    args = parse_command_line(
        ["switch", "--ssh", "--revert-after", "1.5", "tinybox", "/bin/sh", "--no-revert"]
    )
    options = switch_options(args, io.StringIO())
    assert (options.ssh, options.revert_after, options.no_revert) == (True, 1.5, False)
    assert options.init_argv == ["/bin/sh", "--no-revert"]  # the init's own argument
    options = switch_options(
        parse_command_line(["switch", "--no-revert", "x", "/i"]), io.StringIO()
    )
    assert (options.ssh, options.revert_after, options.no_revert) == (False, None, True)


def test_a_bad_revert_timer_stops_the_cli_before_the_image_is_opened(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh output guard on this test's stderr (run_cli keeps the first one it makes).
    monkeypatch.setattr(cli, "_guard", None)
    argv = ["switch", "--dry-run", "--revert-after", "0", "no-such-image", "/bin/sh"]
    assert run_cli(argv, out=io.StringIO()) == 1
    said = capsys.readouterr().err.strip()
    assert said.startswith("dboot: revert timer 0 min is not between 1 and 1440 min"), said
    assert "--revert-after" in said and said.count("\n") == 0


@dataclass
class FakeIndex:
    executables: set[str]

    def executable(self, path: str) -> bool:
        return path in self.executables


@pytest.mark.parametrize(
    ("files", "argv"),
    [
        ({"/usr/sbin/sshd", "/usr/sbin/dropbear"}, ["/usr/sbin/sshd", "-D", "-e"]),
        ({"/usr/sbin/dropbear"}, ["/usr/sbin/dropbear", "-F", "-E", "-R"]),
        ({"/usr/bin/dropbearmulti"}, ["/usr/bin/dropbearmulti", "dropbear", "-F", "-E", "-R"]),
    ],
)
def test_the_ssh_server_of_the_image(files: set[str], argv: list[str]) -> None:
    assert keeper_ssh_argv(FakeIndex(files)) == argv  # type: ignore[arg-type]


def test_ssh_without_an_ssh_server_in_the_image_is_refused() -> None:
    with pytest.raises(BadInput, match="--ssh: the image has no SSH server") as refused:
        keeper_ssh_argv(FakeIndex({"/bin/sh"}))  # type: ignore[arg-type]
    assert "openssh-server or dropbear" in str(refused.value)


def test_the_last_words_say_how_to_keep_the_new_system() -> None:
    words = _keeper_words(list(SSHD), 10.0)
    assert "The new system runs /usr/sbin/sshd, restarted if it dies." in words
    assert re.search(r"Revert timer of 10 min: .*`touch /run/dboot/keep`.* before \d\d:\d\d", words)
    assert "nothing to revert to" in words
    assert _keeper_words([], None) == ""


def test_a_remote_session_warns_only_with_neither_carry_over_nor_a_timer() -> None:
    assert [n.code for n in facts.carry_verdicts(True, False, None)] == ["remote-no-carry"]
    assert facts.carry_verdicts(True, False, 10.0) == []
    assert facts.carry_verdicts(True, True, None) == []
    (notice,) = facts.revert_notices(0.5)
    assert notice.code == "revert-timer" and "0.5 min" in notice.message
    assert KEEP_FILE in notice.fix
    assert facts.revert_notices(None) == []


def test_ssh_with_an_init_that_starts_services_is_warned_about() -> None:
    systemd = facts.ImageInit("/sbin/init", "/lib/systemd/systemd", "systemd", True)
    shell = facts.ImageInit("/bin/sh", "/bin/busybox", "shell", False)
    (notice,) = facts.ssh_keeper_notices(list(SSHD), systemd)
    assert notice.code == "keeper-ssh-twice" and notice.level == "warning"
    assert "compete for port 22" in notice.message
    assert facts.ssh_keeper_notices(list(SSHD), shell) == []
    assert facts.ssh_keeper_notices([], systemd) == []


def test_a_keeper_that_cannot_be_forked_stops_the_switch_only_when_a_deadline_is_pending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from initstage.console import StageLog
    from initstage.keeper import RevertTimer
    from initstage.stage import Stage, StageError

    def no_fork() -> int:
        raise OSError(12, "Cannot allocate memory")

    log = StageLog()
    stage = Stage("/run/dboot/plan.json", log)
    monkeypatch.setattr("initstage.stage.os.fork", no_fork)
    # Only an SSH server to keep: the exec of the new init goes on without it.
    plan = Plan(new_root="/run/dboot/root", init_argv=["/bin/sh"], keeper_ssh_argv=list(SSHD))
    stage.start_keeper(plan)
    assert "keeper: fork failed" in log.lines[-1] and "no SSH server kept" in log.lines[-1]
    # A deadline pending (the stage's timer thread, nothing but a clock here): the exec
    # would end the thread, so the stage goes to recovery instead, the timer still running.
    timer = RevertTimer(60.0, False, None, log)
    timer.start()
    stage.revert_timer = timer
    with pytest.raises(StageError, match="the revert timer would not outlive the exec"):
        stage.start_keeper(Plan(new_root="/run/dboot/root", init_argv=["/bin/sh"]))
    restarted = stage.revert_timer
    assert restarted is not None and restarted.thread.is_alive()
    assert 55 < restarted.stop() <= 60
