"""The installed machine's boot decision (initstage.bootstate), as a pure function.

What must hold: a probation boot is spent before it runs, so a new system that never
comes back leads to the old one; anything unreadable boots the old system."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

from initstage import bootstate
from initstage.bootstate import BootState, StateError
from injector.install import deploy
from injector.install.fstab import new_fstab


def installed(**changes: object) -> BootState:
    state = BootState(
        tree="/dboot/trees/rescue-0123456789ab",
        init_argv=["/sbin/init"],
        old_init="/usr/lib/systemd/systemd",
        init_path="/sbin/init",
        old_link="/lib/systemd/systemd",
        revert_after_seconds=600.0,
        image="dboot-rescue:latest",
    )
    return dataclasses.replace(state, **changes)  # type: ignore[arg-type]


def test_probation_boot_is_spent_before_it_runs() -> None:
    choice = bootstate.choose(installed())
    assert choice.new_system and choice.probation
    assert choice.state is not None
    assert choice.state.boots_left == 0 and choice.state.state == bootstate.PROBATION


def test_a_spent_probation_boots_the_old_system_and_says_why() -> None:
    choice = bootstate.choose(installed(boots_left=0))
    assert not choice.new_system
    assert choice.state is not None and choice.state.state == bootstate.REVERTED
    assert "not kept in time" in choice.state.reason


def test_the_boot_after_a_probation_that_never_came_back_is_the_old_one() -> None:
    first = bootstate.choose(installed())
    assert first.state is not None
    # The new system panicked or hung: nobody wrote anything more. The next boot reads
    # what the first one wrote before it started.
    second = bootstate.choose(first.state)
    assert not second.new_system


def test_kept_boots_the_new_system_every_time_and_writes_nothing() -> None:
    choice = bootstate.choose(installed(state=bootstate.KEPT, boots_left=0))
    assert choice.new_system and not choice.probation and choice.state is None


def test_reverted_boots_the_old_system() -> None:
    choice = bootstate.choose(installed(state=bootstate.REVERTED, reason="on purpose"))
    assert not choice.new_system and "on purpose" in choice.why


def test_no_revert_timer_keeps_the_first_boot() -> None:
    choice = bootstate.choose(installed(revert_after_seconds=0.0))
    assert choice.new_system and not choice.probation
    assert choice.state is not None and choice.state.state == bootstate.KEPT


def test_no_state_boots_the_old_system() -> None:
    choice = bootstate.choose(None, "cannot open /dboot/state.json")
    assert not choice.new_system and "cannot open" in choice.why


@pytest.mark.parametrize(
    "changes",
    [
        {"tree": "/etc"},
        {"tree": "/dboot/trees/../../etc"},
        {"state": "maybe"},
        {"init_argv": []},
        {"init_argv": ["sbin/init"]},
        {"old_init": "relative"},
        {"revert_after_seconds": float("nan")},
        {"boots_left": True},
    ],
)
def test_nonsense_states_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(StateError):
        installed(**changes).validate()


def test_state_round_trips_atomically(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    state = installed()
    bootstate.write_state(state, path)
    assert bootstate.read_state(path) == state
    assert sorted(os.listdir(tmp_path)) == ["state.json"]  # no temp file left
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_a_state_anyone_could_write_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    bootstate.write_state(installed(), str(path))
    path.chmod(0o666)
    with pytest.raises(StateError, match="writable by root only"):
        bootstate.read_state(str(path))


def test_unknown_fields_and_broken_json_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({**dataclasses.asdict(installed()), "extra": 1}))
    with pytest.raises(StateError, match="unknown fields"):
        bootstate.read_state(str(path))
    path.write_text("{")
    with pytest.raises(StateError, match="not valid JSON"):
        bootstate.read_state(str(path))


def test_history_keeps_the_last_twenty_lines() -> None:
    state = installed()
    for number in range(30):
        state.noted(f"event {number}")
    assert len(state.history) == 20 and state.history[-1].endswith("event 29")


OLD_FSTAB = """\
# /etc/fstab: static file system information.
UUID=1111-root / ext4 errors=remount-ro 0 1
UUID=2222-boot /boot ext4 defaults 0 2
UUID=ABCD-EF01	/boot/efi vfat umask=0077 0 1
/swapfile none swap sw 0 0
/dev/sdb1 /data xfs
tmpfs /tmp tmpfs nofail,size=1g 0 0
"""


def test_fstab_keeps_every_mount_never_failing_the_boot_and_the_root_by_uuid() -> None:
    # nofail: a mount the image cannot make (no kmod for vfat) must not hold it in emergency.
    fstab = new_fstab(OLD_FSTAB, "1111-root", "/dev/vda2", "ext4")
    lines = [line for line in fstab.splitlines() if line and not line.startswith("#")]
    assert lines == [
        "UUID=1111-root / ext4 defaults 0 0",
        "UUID=2222-boot /boot ext4 defaults,nofail 0 2",
        "UUID=ABCD-EF01\t/boot/efi vfat umask=0077,nofail 0 1",
        "/swapfile none swap sw,nofail 0 0",
        "/dev/sdb1 /data xfs defaults,nofail",
        "tmpfs /tmp tmpfs nofail,size=1g 0 0",
    ]


def test_fstab_without_a_root_line_gets_one() -> None:
    fstab = new_fstab("", "", "/dev/vda", "ext4")
    assert "/dev/vda / ext4 defaults 0 0" in fstab.splitlines()


def test_the_init_path_resolves_inside_the_disk_as_at_boot(tmp_path: Path) -> None:
    """Debian 12: /sbin -> usr/sbin and /usr/sbin/init -> ../lib/systemd/systemd, which is
    /usr/lib/systemd/systemd (not /lib/...); an absolute link starts at the disk's root."""
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd").mkdir(parents=True)
    (tmp_path / "usr/lib/systemd/systemd").write_text("")
    (tmp_path / "sbin").symlink_to("usr/sbin")
    (tmp_path / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    (tmp_path / "usr/sbin/telinit").symlink_to("/sbin/init")
    disk = deploy.Disk(str(tmp_path))
    assert disk.resolve("/sbin/init") == "/usr/lib/systemd/systemd"
    assert disk.resolve("/usr/sbin/telinit") == "/usr/lib/systemd/systemd"
    assert deploy.old_init_for(disk, "/sbin/init") == (
        "/usr/lib/systemd/systemd",
        "../lib/systemd/systemd",
    )
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError, match="too many symbolic links"):
        disk.resolve("/loop/x")


def test_commit_and_uncommit_swap_the_init_path_in_one_rename(tmp_path: Path) -> None:
    (tmp_path / "usr/sbin").mkdir(parents=True)
    (tmp_path / "sbin").symlink_to("usr/sbin")
    (tmp_path / "usr/sbin/init").symlink_to("../lib/systemd/systemd")
    disk = deploy.Disk(str(tmp_path))
    deploy.make_dirs(disk)
    deploy.commit(disk, "/sbin/init")
    assert os.readlink(tmp_path / "usr/sbin/init") == "../../dboot/boot/init"
    state = installed(old_link="../lib/systemd/systemd")
    deploy.uncommit(disk, state)
    assert os.readlink(tmp_path / "usr/sbin/init") == "../lib/systemd/systemd"
    assert sorted(os.listdir(tmp_path / "usr/sbin")) == ["init"]  # no temp link left
