"""The wizard's equivalent command line (app.format.command_line) read back by dboot's own
parser gives the very options the wizard would run with: the two cannot drift apart."""

from __future__ import annotations

import dataclasses
import io
import shlex
from pathlib import Path
from typing import Any

import pytest

from app.cli import install_options, parse_command_line, switch_options
from app.format import command_line, number_arg, size_arg
from app.tui.backend import InstallChoices, RunOptions, RunRequest, engine_options
from injector.install.install import InstallOptions
from injector.switch import SwitchOptions

# Fields no command line word sets: callbacks and hooks, the wizard's own confirmation, the
# sandbox's stand-in services, the open image source, where the console goes. (The teaching
# pause is a hook too, but whether there is one is --teach: compared as such.)
NOT_ON_THE_COMMAND_LINE = {
    "confirm",
    "yes",
    "last_words",
    "ssh_check_go",
    "pause",
    "stop",
    "services",
    "service_kinds",
    "console",
    "log_file",
    "source",
}
# Options a rehearsal does not take: its command line leaves them out, and they do nothing in
# a rehearsal.
SWITCH_ONLY = {"carry", "ssh", "revert_after", "no_revert", "ssh_check", "dry_run", "target_pid"}

INIT = ["/bin/sh", "-c", "echo 'it''s --json' $HOME; exit 0"]


def compared(options: SwitchOptions) -> dict[str, Any]:
    skip = NOT_ON_THE_COMMAND_LINE | (SWITCH_ONLY if options.rehearse else set())
    fields = {
        field.name: getattr(options, field.name)
        for field in dataclasses.fields(options)
        if field.name not in skip
    }
    return {**fields, "teaches": options.pause is not None}


def a_pause(pause: Any) -> None:
    """A front-end's teaching pause hook (what it does is no word of the command line)."""


def read_back(words: list[str]) -> SwitchOptions:
    """What `dboot` itself makes of the words, as pasted into a shell."""
    assert words[0] == "dboot"
    pasted = shlex.split(shlex.join(words))
    return switch_options(parse_command_line(pasted[1:]), io.StringIO())


VARIANTS = [
    {},
    {"grace": 5.0},
    {"grace": 0.0},
    {"grace": 2.5},
    {"grace": 1 / 3},
    {"tmpfs_size": 512 << 20},
    {"tmpfs_size": 3 << 30},
    {"tmpfs_size": 1_000_003},
    {"api_mounts": False},
    {"modules": False},
    {"carry": False},
    {"ssh": True},
    {"revert_after": 10.0},
    {"revert_after": 2.5},
    {"no_revert": True},
    {"ssh_check": 2222},
    {"ssh_check": 1},
    {"ssh_check": 65535},
    {"target_pid": 4242},
    {"dry_run": True},
    {"force": True},
    {"state_dir": Path("/run/other dir")},
    {"docker_host": "unix:///run/docker.sock"},
    {"grace": 10.0, "tmpfs_size": 2 << 30, "api_mounts": False, "modules": False, "carry": False},
    {"ssh": True, "revert_after": 30.0, "target_pid": 4242, "state_dir": Path("/tmp/x")},
    # The wizard's remote session: timer chosen, the login check on its default port.
    {"revert_after": 10.0, "ssh_check": 2222, "carry": True},
    {"no_revert": True, "ssh_check": 2200, "target_pid": 4242},
    # The graceful stop (issue 19): rehearsals take it too (the stand-in's stop order).
    {"service_stop": "signal"},
    {"stop_timeout": 12.5},
    {"stop_timeout": 0.0},
    {"service_stop": "signal", "stop_timeout": 300.0, "grace": 10.0},
]


@pytest.mark.parametrize("rehearse", [False, True], ids=["switch", "rehearse"])
@pytest.mark.parametrize("changes", VARIANTS, ids=lambda changes: ",".join(changes) or "defaults")
def test_the_command_line_reads_back_as_the_same_options(
    changes: dict[str, Any], rehearse: bool
) -> None:
    options = SwitchOptions(image="tinybox:latest", init_argv=INIT, rehearse=rehearse, **changes)
    words = command_line(options)
    assert words[:2] == ["dboot", "rehearse" if rehearse else "switch"]
    assert compared(read_back(words)) == compared(options), shlex.join(words)


def test_only_the_options_that_differ_from_the_defaults_are_written() -> None:
    plain = SwitchOptions(image="tinybox:latest", init_argv=["/sbin/init"], rehearse=True)
    assert command_line(plain) == ["dboot", "rehearse", "tinybox:latest", "/sbin/init"]
    changed = SwitchOptions(
        image="tinybox:latest",
        init_argv=["/sbin/init"],
        grace=5,
        tmpfs_size=512 << 20,
        modules=False,
        carry=False,
        target_pid=77,
    )
    assert shlex.join(command_line(changed)) == (
        "dboot switch --grace 5 --tmpfs-size 512M --no-modules --no-carry --target-pid 77 "
        "tinybox:latest /sbin/init"
    )
    # A rehearsal takes no carry-over nor target: its line says nothing of them.
    rehearsal = dataclasses.replace(changed, rehearse=True)
    assert shlex.join(command_line(rehearsal)) == (
        "dboot rehearse --grace 5 --tmpfs-size 512M --no-modules tinybox:latest /sbin/init"
    )


def test_numbers_and_sizes_are_written_as_a_person_would_type_them() -> None:
    assert [number_arg(value) for value in (5.0, 0.0, 2.5, 600.0)] == ["5", "0", "2.5", "600"]
    assert float(number_arg(1 / 3)) == 1 / 3
    assert [size_arg(size) for size in (512 << 20, 3 << 30, 64 << 10, 1000)] == [
        "512M",
        "3G",
        "64K",
        "1000",
    ]


@pytest.mark.parametrize(
    "changes", [{}, {"grace": 5.0}, {"modules": False, "state_dir": Path("/tmp/x")}], ids=str
)
def test_a_teaching_rehearsal_says_teach_and_reads_back(changes: dict[str, Any]) -> None:
    options = SwitchOptions(
        image="tinybox:latest", init_argv=INIT, rehearse=True, pause=a_pause, **changes
    )
    words = command_line(options)
    assert words[:3] == ["dboot", "rehearse", "--teach"]
    assert compared(read_back(words)) == compared(options), shlex.join(words)


@pytest.mark.parametrize("teach", [True, False], ids=["teach", "no-teach"])
def test_the_wizards_teaching_reaches_the_engine_and_reads_back(teach: bool) -> None:
    # The wizard's state (dboot-tui --teach, F7) is its request's pause hook: a rehearsal's
    # engine options carry it, and the command line says --teach from them.
    pause = a_pause if teach else None
    request = RunRequest("tinybox:latest", ["/sbin/init"], rehearse=True, pause=pause)
    options = engine_options(request)
    assert options.pause is pause
    words = command_line(options)
    assert ("--teach" in words) == teach
    assert compared(read_back(words)) == compared(options), shlex.join(words)
    # A real switch never pauses, whatever the wizard's state: no hook, no --teach.
    switch = engine_options(dataclasses.replace(request, rehearse=False))
    assert switch.pause is None and "--teach" not in command_line(switch)


@pytest.mark.parametrize(
    "chosen",
    [
        RunOptions(no_revert=True, ssh_check=2222),
        RunOptions(revert_after=10.0, ssh_check=4022, ssh=True),
        RunOptions(no_revert=True, no_ssh_check=True),
    ],
    ids=["login-check", "login-check-and-timer", "login-check-off"],
)
def test_the_wizards_login_check_reaches_the_engine_and_reads_back(chosen: RunOptions) -> None:
    request = RunRequest("tinybox:latest", ["/sbin/init"], rehearse=False, options=chosen)
    options = engine_options(request)
    assert options.ssh_check == chosen.ssh_check
    words = command_line(options)
    assert ("--ssh-check" in words) == (chosen.ssh_check is not None)
    assert compared(read_back(words)) == compared(options), shlex.join(words)


@pytest.mark.parametrize("rehearse", [False, True], ids=["switch", "rehearse"])
@pytest.mark.parametrize(
    "chosen",
    [
        RunOptions(graceful_stop=False),
        RunOptions(stop_timeout=42.0),
        RunOptions(graceful_stop=False, stop_timeout=0.0),
    ],
    ids=["signal", "ceiling", "signal-and-ceiling"],
)
def test_the_wizards_stop_choice_reaches_the_engine_and_reads_back(
    chosen: RunOptions, rehearse: bool
) -> None:
    # The graceful stop is a rehearsal's too (the stand-in's stop order): both lines say it.
    request = RunRequest("tinybox:latest", ["/sbin/init"], rehearse=rehearse, options=chosen)
    options = engine_options(request)
    assert options.service_stop == ("graceful" if chosen.graceful_stop else "signal")
    assert options.stop_timeout == chosen.stop_timeout
    words = command_line(options)
    assert ("--stop=signal" in words) == (not chosen.graceful_stop)
    assert compared(read_back(words)) == compared(options), shlex.join(words)


# --- `dboot install` (issue 17 §1): the wizard's Destination step replays as this line ---


def read_back_install(words: list[str]) -> InstallOptions:
    """What `dboot install` makes of the words, as pasted into a shell."""
    assert words[:2] == ["dboot", "install"]
    pasted = shlex.split(shlex.join(words))
    return install_options(parse_command_line(pasted[1:]), io.StringIO())


INSTALL_VARIANTS = [
    {},
    {"revert_after": 10.0},
    {"revert_after": 2.5},
    {"no_revert": True},
    {"reboot": False},
    {"carry": False, "modules": False},
    {"no_revert": True, "reboot": False, "state_dir": Path("/run/other dir")},
    {"docker_host": "unix:///run/docker.sock", "force": True},
    {"dry_run": True, "revert_after": 30.0},
]


@pytest.mark.parametrize(
    "changes", INSTALL_VARIANTS, ids=lambda changes: ",".join(changes) or "defaults"
)
def test_an_installs_command_line_reads_back_as_the_same_options(changes: dict[str, Any]) -> None:
    options = InstallOptions(image="tinybox:latest", init_argv=INIT, **changes)
    words = command_line(options)
    assert ("--no-reboot" in words) == (not options.reboot)
    assert compared(read_back_install(words)) == compared(options), shlex.join(words)


@pytest.mark.parametrize(
    "install",
    [
        InstallChoices(revert_after=10.0),
        InstallChoices(revert_after=45.0, reboot=False),
        InstallChoices(no_revert=True),
    ],
    ids=["timer", "timer-no-reboot", "no-timer"],
)
@pytest.mark.parametrize(
    "chosen",
    [
        RunOptions(),
        RunOptions(
            grace=9.0,
            tmpfs_size="512M",
            api_mounts=False,
            modules=False,
            carry=False,
            ssh=True,
            revert_after=30.0,
            ssh_check=2222,
        ),
    ],
    ids=["default-options", "changed-options"],
)
def test_the_wizards_install_reaches_the_engine_and_reads_back(
    install: InstallChoices, chosen: RunOptions
) -> None:
    request = RunRequest(
        "tinybox:latest", ["/sbin/init"], rehearse=False, options=chosen, install=install
    )
    options = engine_options(request)
    assert isinstance(options, InstallOptions)
    # The Options step's carry-over and modules reach the install, the Destination step's
    # probation and reboot too; the RAM switch's own choices (grace, tmpfs, API mounts,
    # sshd, the login check, the switch's timer) are not an install's and stay out.
    assert (options.carry, options.modules) == (chosen.carry, chosen.modules)
    assert (options.revert_after, options.no_revert) == (install.revert_after, install.no_revert)
    assert options.reboot == install.reboot and options.yes
    plain = InstallOptions(image="tinybox:latest", init_argv=["/sbin/init"])
    for name in ("grace", "tmpfs_size", "api_mounts", "ssh", "ssh_check", "target_pid"):
        assert getattr(options, name) == getattr(plain, name), name
    words = command_line(options)
    assert compared(read_back_install(words)) == compared(options), shlex.join(words)
    # A rehearsal of the same choices is no install: the Confirm modal's Rehearse.
    rehearsal = engine_options(dataclasses.replace(request, rehearse=True))
    assert not isinstance(rehearsal, InstallOptions) and rehearsal.rehearse
