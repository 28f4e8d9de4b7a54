"""The hermetic rehearsal's host snapshot notices what it must, on crafted trees."""

from __future__ import annotations

import os
from pathlib import Path

from tests.sandbox.host_snapshot import HostSnapshot, read_dev, read_sysctls


def test_a_changed_sysctl_is_a_difference_and_a_volatile_one_is_not(tmp_path: Path) -> None:
    (tmp_path / "kernel" / "random").mkdir(parents=True)
    (tmp_path / "kernel" / "printk_ratelimit").write_text("5\n")
    (tmp_path / "kernel" / "random" / "uuid").write_text("a\n")
    (tmp_path / "kernel" / "write_only").write_text("")
    (tmp_path / "kernel" / "write_only").chmod(0o200)
    before = read_sysctls(str(tmp_path))
    assert before == {"kernel/printk_ratelimit": "5\n"}
    (tmp_path / "kernel" / "printk_ratelimit").write_text("1\n")
    (tmp_path / "kernel" / "random" / "uuid").write_text("b\n")
    after = read_sysctls(str(tmp_path))
    snapshot = HostSnapshot(before, None, {}, {})
    assert snapshot.differences(HostSnapshot(after, None, {}, {})) == [
        "sysctl kernel/printk_ratelimit: '5\\n' -> '1\\n'"
    ]


def test_dev_entries_are_compared_by_kind_and_number(tmp_path: Path) -> None:
    os.symlink("/proc/self/fd", tmp_path / "fd")
    (tmp_path / "pts").mkdir()
    (tmp_path / "pts" / "7").write_text("")  # another session's terminal: volatile
    before = read_dev(str(tmp_path))
    assert before == {"fd": "link /proc/self/fd", "pts": "d"}
    os.mknod(tmp_path / "sda", 0o600 | 0o060000, os.makedev(8, 0))
    after = read_dev(str(tmp_path))
    assert HostSnapshot({}, None, {}, before).differences(HostSnapshot({}, None, {}, after)) == [
        "/dev sda: None -> 'block 8:0'"
    ]


def test_cgroups_others_made_are_ignored_but_not_systemd_units_or_changed_controls() -> None:
    before = HostSnapshot({}, None, {"u:.": "cpu", "u:docker/abc": "", "u:gone": ""}, {})
    after = HostSnapshot(
        {}, None, {"u:.": "cpu memory", "u:docker/abc": "", "u:new": "", "u:init.scope": ""}, {}
    )
    assert before.differences(after) == [
        "cgroup u:.: 'cpu' -> 'cpu memory'",
        "cgroup u:init.scope: a systemd unit's cgroup appeared outside the sandbox",
    ]
