"""The rehearsal sandbox is hermetic: what its processes try against the host fails.

Every command runs as a child of the sandbox's own PID 1 (the stand-in's ``run`` hook),
so it has exactly what the sandbox gives its processes: the bounding set, the cgroup and
mount namespaces, the environment. Nothing is entered from outside with our capabilities.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from initstage import hermetic
from injector.events import Finished
from injector.inject.arch import host_arch, syscall_number
from injector.preflight.procinfo import namespace_of
from injector.rehearsal.sandbox import CGROUP_PREFIX, Sandbox, own_cgroup_directory
from tests.images import build_tinybox
from tests.sandbox.parking import ParkedSandbox
from tests.sandbox.sandbox_checks import Footprint, eventually, wait_for_output
from tests.sandbox.test_switch import (  # noqa: F401 (nothing_left_behind: a fixture)
    console,
    finished,
    nothing_left_behind,
    rehearse,
)

pytestmark = pytest.mark.root

_markers = itertools.count(1)
SAFE_DEVICES = {"null", "zero", "full", "random", "urandom", "tty", "kmsg", "ptmx", "pts"}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with ParkedSandbox(1, idle="read") as started:
        footprint = Footprint(started)
        cgroup = started.cgroup
        assert cgroup is not None and cgroup.path.is_dir()
        yield started
    footprint.assert_gone()
    assert not cgroup.path.exists(), "the delegated cgroup outlived the sandbox"


def inside(sandbox: Sandbox, command: str) -> str:
    """Run ``command`` (sh) as a child of the sandbox's PID 1; its output, stderr included."""
    marker = f"--end-{next(_markers)}--"
    start = len(sandbox.output())
    sandbox.send(f"run ( {command} ) 2>&1; echo {marker}\n")
    assert wait_for_output(sandbox, f"\n{marker}\n", timeout=10), sandbox.output()[start:]
    text = sandbox.output()[start:].split(f"{marker}\n", 1)[0]
    # Without the stand-in's own lines ("read b'...'", and its reaper's, which may come
    # in between).
    return "".join(line for line in text.splitlines(True) if not line.startswith("standin: "))


def capability_bits(status: str, field: str) -> int:
    match = re.search(rf"^{field}:\s*([0-9a-f]+)$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1), 16)


def rewrite(path: str) -> str:
    """A write of a sysctl's own value: refused when hermetic, and harmless when not (this
    test must not change the host even when the sandbox is broken)."""
    return f"value=$(cat {path}); echo $value > {path}; echo status=$?"


def test_proc_sys_is_read_only(sandbox: Sandbox) -> None:
    seen = inside(sandbox, rewrite("/proc/sys/kernel/printk_ratelimit"))
    assert "Read-only file system" in seen and "status=2" in seen
    # The network's sysctls too, although the network namespace is the sandbox's own.
    assert "Read-only file system" in inside(sandbox, rewrite("/proc/sys/net/ipv4/ip_forward"))


def test_sysrq_trigger_cannot_be_written(sandbox: Sandbox) -> None:
    seen = inside(sandbox, "echo h > /proc/sysrq-trigger; echo status=$?")
    assert "status=2" in seen
    # Read-only where the kernel has one; where it has none, it cannot be made either.
    expected = "Read-only" if Path("/proc/sysrq-trigger").exists() else "nonexistent"
    assert expected in seen


def test_sys_is_a_read_only_sysfs_of_its_own(sandbox: Sandbox) -> None:
    seen = inside(sandbox, "touch /sys/kernel/x; echo status=$?; ls /sys/class/net")
    assert "Read-only file system" in seen and "status=1" in seen
    # Its own network namespace's sysfs: only a loopback, not the host's interfaces.
    assert seen.split("status=1\n", 1)[1].split() == ["lo"]
    mounts = inside(sandbox, "awk '$5 ~ \"^/sys(/fs/cgroup)?$\"' /proc/self/mountinfo")
    sys_line, cgroup_line = mounts.splitlines()
    assert " /sys ro," in sys_line and "- sysfs " in sys_line
    assert " /sys/fs/cgroup rw," in cgroup_line and "- cgroup2 " in cgroup_line


def test_dev_has_no_host_device_and_no_device_can_be_made(sandbox: Sandbox, tmp_path: Path) -> None:
    listing = inside(sandbox, "ls -A /dev; ls -l /dev | grep '^b' | wc -l").split()
    assert listing[-1] == "0"  # no block device at all
    assert set(listing[:-1]) - {"fd", "stdin", "stdout", "stderr", "shm"} <= SAFE_DEVICES
    # In a directory of this test (the host's /tmp is the sandbox's too): a broken sandbox
    # makes a node that goes with tmp_path, never one in the host's /dev.
    node = tmp_path / "disk"
    try:
        seen = inside(sandbox, f"mknod {node} b 8 0; echo status=$?")
        assert "Operation not permitted" in seen and "status=1" in seen, seen
        assert not node.exists()
    finally:
        node.unlink(missing_ok=True)
    # Its children hold no CAP_MKNOD at all, in any set.
    status = inside(sandbox, "cat /proc/self/status")
    assert not capability_bits(status, "CapBnd") & (1 << hermetic.CAP_MKNOD)


def test_no_module_loading_and_no_machine_wide_capability(sandbox: Sandbox) -> None:
    dropped = sum(1 << number for number in hermetic.DROPPED_CAPABILITIES.values())
    for pid in (sandbox.pid, *sandbox.service_pids()):
        status = Path(f"/proc/{pid}/status").read_text()
        for field in ("CapBnd", "CapPrm", "CapEff", "CapInh", "CapAmb"):
            assert not capability_bits(status, field) & dropped, (pid, field)
    # The system call itself: EPERM, or ENOSYS on a kernel built without modules.
    number = syscall_number(host_arch(), "finit_module")
    seen = inside(
        sandbox,
        "python3 -c 'import ctypes; libc = ctypes.CDLL(None, use_errno=True);"
        f' print(libc.syscall({number}, 0, b"", 0), ctypes.get_errno())\'',
    )
    assert seen.split() in (["-1", str(errno.EPERM)], ["-1", str(errno.ENOSYS)])


def test_container_is_set_for_pid1_and_its_children(sandbox: Sandbox) -> None:
    environ = Path(f"/proc/{sandbox.pid}/environ").read_bytes().split(b"\0")
    assert f"container={hermetic.CONTAINER_NAME}".encode() in environ
    assert inside(sandbox, "echo $container").strip() == hermetic.CONTAINER_NAME


def test_own_cgroup_namespace_rooted_at_a_delegated_subtree(sandbox: Sandbox) -> None:
    assert sandbox.cgroup is not None
    delegated = sandbox.cgroup.path
    assert namespace_of(sandbox.pid, "cgroup") != namespace_of("self", "cgroup")
    # The host sees PID 1 and its services in the delegated cgroup...
    members = {int(pid) for pid in (delegated / "cgroup.procs").read_text().split()}
    assert {sandbox.pid, *sandbox.service_pids()} <= members
    # ...the sandbox sees that cgroup as its root, and can make children in it.
    assert "0::/\n" in inside(sandbox, "cat /proc/self/cgroup")
    seen = inside(sandbox, "mkdir /sys/fs/cgroup/system.slice && echo made")
    assert seen.strip() == "made"
    assert (delegated / "system.slice").is_dir()
    # The host's cgroups above it are out of sight.
    assert delegated.name not in inside(sandbox, "ls /sys/fs/cgroup")


def test_the_delegated_cgroup_goes_with_its_subtree(sandbox: Sandbox) -> None:
    """Children the sandbox made, with a process still in one: closing removes them all."""
    assert sandbox.cgroup is not None
    delegated = sandbox.cgroup.path
    inside(sandbox, "mkdir -p /sys/fs/cgroup/a/b")
    sandbox.send("run echo 0 > /sys/fs/cgroup/a/b/cgroup.procs; exec sleep 600\n")
    assert eventually(lambda: (delegated / "a/b/cgroup.procs").read_text().strip() != "")
    sandbox.close()
    assert not delegated.exists()
    assert not [name for name in os.listdir(delegated.parent) if name == delegated.name]


def test_a_killed_rehearsals_empty_cgroup_is_removed_by_the_next_one() -> None:
    """A dboot killed outright cannot remove its cgroup; the next sandbox does, if empty."""
    parent = own_cgroup_directory()
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone now
    stale = parent / f"{CGROUP_PREFIX}{dead.pid}-1"
    stale.mkdir()
    (stale / "left-by-systemd.slice").mkdir()
    with Sandbox(0) as started:
        assert started.cgroup is not None and started.cgroup.path.is_dir()
        assert not stale.exists()


REHEARSED_CHECKS = "; ".join(
    [
        "echo container=$container",
        "grep CapBnd /proc/self/status",
        "v=$(cat /proc/sys/kernel/printk_ratelimit)",  # its own value: harmless if written
        "(echo $v > /proc/sys/kernel/printk_ratelimit) 2>/dev/null && echo sysctl=written"
        " || echo sysctl=refused",
        "touch /sys/kernel/x 2>/dev/null && echo sys=written || echo sys=refused",
        # In the RAM root's /tmp: even a made node would go with the rehearsal.
        "mknod /tmp/disk b 8 0 2>/dev/null && echo mknod=made || echo mknod=refused",
        "grep '^0::' /proc/self/cgroup",
        "echo dev: $(ls /dev)",
    ]
)


def test_the_rehearsed_init_gets_the_same_walls(
    nothing_left_behind: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Past the stage's pivot_root and its own API mounts, the image's init still has them."""
    events = rehearse(
        build_tinybox(), ["/bin/sh", "-c", REHEARSED_CHECKS], state_dir=tmp_path / "state"
    )
    lines = console(events)
    assert f"container={hermetic.CONTAINER_NAME}" in lines
    bounding = next(line for line in lines if line.startswith("CapBnd:"))
    dropped = {hermetic.CAP_MKNOD, *hermetic.DROPPED_CAPABILITIES.values()}
    assert not capability_bits(bounding, "CapBnd") & sum(1 << number for number in dropped)
    assert {"sysctl=refused", "sys=refused", "mknod=refused", "0::/"} <= set(lines), lines
    devices = next(line for line in lines if line.startswith("dev:")).split()[1:]
    assert set(devices) - {"fd", "stdin", "stdout", "stderr", "shm"} <= SAFE_DEVICES | {"console"}
    assert finished(events) == Finished("rehearsed", exit_status=0)
