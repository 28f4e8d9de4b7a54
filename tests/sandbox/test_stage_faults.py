"""The init stage as PID 1 under faults (issue 8, section 2), in a fresh PID + mount
namespace as in test_stage.py: a device that stops taking writes, frozen cgroups, a
process whose main thread has exited, a filesystem frozen under a writer, and the
read-only remount of the old system.

The stalled device: device-mapper (``dmsetup suspend --nolockfs``) where the kernel has
it, else a loop device whose writes the blkio controller throttles to 1 byte/s (this
machine's kernel is built without device-mapper). Either way ext4 on it holds dirty data
that cannot reach the device, and ``sync`` waits on it for as long as the stall lasts.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sandbox.test_stage import (
    SERVICES,
    StageRun,
    busybox_tree,
    plan_for,
    run_stage,
)

__all__ = ["busybox_tree"]  # the fixture, re-exported for pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, mounts, cgroups"),
]

CGROUP_V1_FREEZER = Path("/sys/fs/cgroup/freezer")
BLKIO_THROTTLE = Path("/sys/fs/cgroup/blkio/blkio.throttle.write_bps_device")
SYNC_TIMEOUT = 1.0
DIRTY_MIB = 8


def has_device_mapper() -> bool:
    return subprocess.run(["dmsetup", "version"], capture_output=True, check=False).returncode == 0


def cgroup_v2_root() -> Path:
    """The cgroup2 hierarchy: /sys/fs/cgroup itself, or its 'unified' part on a hybrid."""
    for candidate in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (candidate / "cgroup.procs").exists() and (
            subprocess.run(
                ["stat", "-fc", "%T", str(candidate)], capture_output=True, text=True, check=True
            ).stdout.strip()
            == "cgroup2fs"
        ):
            return candidate
    pytest.fail("no cgroup2 hierarchy on this machine: the v2 freezer cannot be tested")


@dataclass
class StallableDisk:
    """ext4 on a block device that can be made to stop completing writes, and resumed."""

    device: str  # the node the filesystem is made on and mounted from
    loop: str
    how: str  # "device-mapper" or "blkio throttle"

    def stall(self) -> str:
        """Shell for the sandbox wrapper (before the stage): stop the device's writes."""
        if self.how == "device-mapper":
            return f"dmsetup suspend --nolockfs {os.path.basename(self.device)}"
        return f"echo '{self.major_minor()} 1' > {BLKIO_THROTTLE}"

    def resume(self) -> None:
        if self.how == "device-mapper":
            subprocess.run(["dmsetup", "resume", os.path.basename(self.device)], check=False)
        else:
            BLKIO_THROTTLE.write_text(f"{self.major_minor()} 0\n")

    def major_minor(self) -> str:
        rdev = os.stat(self.device).st_rdev
        return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.fixture
def stallable_disk(tmp_path: Path) -> Iterator[StallableDisk]:
    image = tmp_path / "disk.img"
    with image.open("wb") as image_file:
        image_file.truncate(128 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    name = f"dboot-stall-{os.getpid()}"
    disk = StallableDisk(loop, loop, "blkio throttle")
    try:
        if has_device_mapper():
            sectors = (128 << 20) // 512
            table = f"0 {sectors} linear {loop} 0"
            subprocess.run(["dmsetup", "create", name, "--table", table], check=True)
            disk = StallableDisk(f"/dev/mapper/{name}", loop, "device-mapper")
        elif not BLKIO_THROTTLE.exists():
            pytest.fail("neither device-mapper nor the blkio throttle: no way to stall a disk")
        subprocess.run(["mkfs.ext4", "-q", disk.device], check=True)
        yield disk
    finally:
        disk.resume()
        if disk.how == "device-mapper":
            _retry(["dmsetup", "remove", name])
        _retry(["losetup", "-d", loop])


def _retry(command: list[str]) -> None:
    """Detach after the namespace (and its lazily unmounted filesystem) is gone."""
    deadline = time.monotonic() + 20
    while subprocess.run(command, capture_output=True, check=False).returncode != 0:
        if time.monotonic() > deadline:
            subprocess.run(command, check=True)
        time.sleep(0.2)


def once_init_is_up(action: Callable[[], None]) -> Callable[[StageRun], bool]:
    """A ``while_running`` hook: ``action`` once the init has printed INIT-UP, then done."""

    def hook(run: StageRun) -> bool:
        if any("INIT-UP" in line for _, line in run.stdout):
            action()
            return True
        return False

    return hook


def log_seconds(run: StageRun, pattern: str) -> float:
    """The stage's own clock (+N.NNNs) on its first log line matching ``pattern``."""
    for line in run.log_lines:
        if re.search(pattern, line):
            return float(re.search(r"\+([\d.]+)s ", line).group(1))  # type: ignore[union-attr]
    raise AssertionError(f"no log line matches {pattern!r}:\n{run.err}")


def test_sync_on_a_stalled_device_is_named_and_the_stage_goes_on(
    tmp_path: Path, busybox_tree: Path, stallable_disk: StallableDisk
):
    mount_point = tmp_path / "stalled"
    mount_point.mkdir()
    before = (
        f"mount {stallable_disk.device} {mount_point}\n"
        f"dd if=/dev/urandom of={mount_point}/dirty bs=1M count={DIRTY_MIB} status=none\n"
        f"{stallable_disk.stall()}\n"
    )

    plan = plan_for(tmp_path, ["/bin/sh", "-c", "echo INIT-UP"], sync_timeout_seconds=SYNC_TIMEOUT)
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan,
        before=before,
        # The stall blocks every sync on the machine: keep it short.
        while_running=once_init_is_up(stallable_disk.resume),
    )
    assert run.returncode == 0, run.err
    assert "INIT-UP" in run.out, run.err
    # Named: the filesystem on the stalled device, and the global sync that waits on it.
    assert re.search(
        rf"warning: sync did not finish within 1 s, going on without it: .*{mount_point} "
        rf"\(ext4 on {re.escape(stallable_disk.device)}, {stallable_disk.major_minor()}\)",
        run.err,
    ), run.err
    waited = log_seconds(run, r"sync: \d+ of \d+ done") - log_seconds(run, r"step 3/8")
    print(
        f"\nstalled device ({stallable_disk.how}, {DIRTY_MIB} MiB dirty): the stage waited"
        f" {waited:.3f} s for sync, deadline {SYNC_TIMEOUT:g} s; init up"
        f" {run.arrival('INIT-UP') - run.started:.3f} s after the namespace started"
    )
    assert SYNC_TIMEOUT - 0.002 <= waited < SYNC_TIMEOUT + 1.0  # log stamps are in ms


def test_a_flush_that_finishes_is_not_cut_short(tmp_path: Path, busybox_tree: Path):
    run = run_stage(
        tmp_path, busybox_tree, plan_for(tmp_path, ["/bin/echo", "INIT-UP"]), before=SERVICES
    )
    assert run.returncode == 0, run.err
    assert re.search(r"sync: (\d+) of \1 done in [\d.]+ ms", run.err), run.err
    assert "did not finish" not in run.err


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_a_frozen_process_is_thawed_and_ends_on_sigterm(
    tmp_path: Path, busybox_tree: Path, version: str
):
    """A frozen service cannot act on SIGTERM (a v1-frozen one not even on SIGKILL): the
    stage thaws its cgroup first, so it shuts down as it should. The stubborn one in the
    same group ignores SIGTERM: cgroup.kill (v2) and SIGKILL end it."""
    if version == "v1":
        if not (CGROUP_V1_FREEZER / "freezer.state").exists() and not CGROUP_V1_FREEZER.is_dir():
            pytest.fail("no cgroup v1 freezer on this machine")
        group = CGROUP_V1_FREEZER / f"dboot-stage-test-{os.getpid()}"
        freeze, frozen, thaw = "freezer.state", "FROZEN", "THAWED"
    else:
        group = cgroup_v2_root() / f"dboot-stage-test-{os.getpid()}"
        freeze, frozen, thaw = "cgroup.freeze", "1", "0"
    group.mkdir()
    marker = tmp_path / "root" / "clean-exit"
    polite = f"sh -c 'trap \"echo CLEAN > {marker}; exit 0\" TERM; while :; do sleep 0.05; done'"
    stubborn = "sh -c 'trap \"\" TERM; exec sleep 1000'"
    settle = (
        f"grep -q FROZEN {group}/freezer.state"
        if version == "v1"
        else f"grep -q 'frozen 1' {group}/cgroup.events"
    )
    before = (
        f"{polite} & echo $! > {group}/cgroup.procs\n"
        f"{stubborn} & echo $! > {group}/cgroup.procs\n"
        f"sleep 0.1; echo {frozen} > {group}/{freeze}\n"
        f"while ! {settle}; do sleep 0.01; done\n"
    )
    try:
        run = run_stage(
            tmp_path,
            busybox_tree,
            plan_for(
                tmp_path,
                ["/bin/sh", "-c", "echo pids: /proc/[0-9]*; cat /clean-exit"],
                grace_seconds=0.5,
            ),
            before=before,
        )
    finally:
        (group / freeze).write_text(f"{thaw}\n")
        deadline = time.monotonic() + 10
        while group.exists():
            try:
                group.rmdir()
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    assert run.returncode == 0, run.err
    assert f"thawed frozen cgroups: {group}" in run.err, run.err
    assert "CLEAN" in run.out, "the frozen service never ran its SIGTERM handler"
    assert "pids: /proc/1\n" in run.out + "\n", run.out
    assert "0 will not die" in run.err
    if version == "v2":
        assert f"cgroup.kill: {group}" in run.err, run.err


ZOMBIE_LEADER = """
import ctypes, os, signal, sys, threading, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)

def live_on() -> None:
    # /proc/self is the thread group, whose state is its leader's: wait for the Z.
    while "Z" not in open("/proc/self/stat").read().rsplit(")", 1)[1].split()[0]:
        time.sleep(0.01)
    open(sys.argv[1], "w").close()
    while True:
        time.sleep(1)

threading.Thread(target=live_on).start()
# exit(2) of the main thread only (not exit_group): the leader turns Z, the thread lives.
ctypes.CDLL(None).syscall({"x86_64": 60, "aarch64": 93}[os.uname().machine], 0)
"""


def test_a_process_whose_main_thread_exited_is_not_taken_for_dead(
    tmp_path: Path, busybox_tree: Path
):
    script = tmp_path / "zombie_leader.py"
    script.write_text(ZOMBIE_LEADER)
    ready = tmp_path / "leader-is-a-zombie"
    before = (
        f"{sys.executable} -I {script} {ready} &\nwhile ! test -e {ready}; do sleep 0.01; done\n"
    )
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", "echo pids: /proc/[0-9]*"], grace_seconds=0.3),
        before=before,
    )
    assert run.returncode == 0, run.err
    assert re.search(
        r"1 still running after the 0\.3 s grace period, SIGKILL: pid \d+ \(python3?[^)]*\)"
        r" state Z \(main thread exited, 1 threads still running\)",
        run.err,
    ), run.err
    assert "pids: /proc/1\n" in run.out + "\n", "the process with a live thread survived"


def test_a_process_that_cannot_die_is_named_and_the_stage_goes_on(
    tmp_path: Path, busybox_tree: Path, stallable_disk: StallableDisk
):
    # A writer on a frozen filesystem (FIFREEZE) sleeps uninterruptibly in the kernel and
    # ignores even SIGKILL until the thaw: a real stand-in for a process stuck on dead NFS.
    mount_point = tmp_path / "frozen"
    mount_point.mkdir()
    before = (
        f"mount {stallable_disk.device} {mount_point}\n"
        f"fsfreeze -f {mount_point}\n"
        f"sh -c 'touch {tmp_path}/writing; echo data > {mount_point}/file' &\n"
        # The wrapper's /proc is the host's (its pids are not ours): wait for the writer
        # to start, then give it a moment to block on the frozen filesystem.
        f"while ! test -e {tmp_path}/writing; do sleep 0.01; done; sleep 0.2\n"
    )

    try:
        run = run_stage(
            tmp_path,
            busybox_tree,
            plan_for(
                tmp_path,
                ["/bin/sh", "-c", "echo INIT-UP; sleep 0.3"],
                grace_seconds=0.2,
                sync_timeout_seconds=SYNC_TIMEOUT,
            ),
            before=before,
            while_running=once_init_is_up(lambda: thaw_filesystem(stallable_disk.device)),
        )
    finally:
        thaw_filesystem(stallable_disk.device)
    assert run.returncode == 0, run.err
    assert re.search(r"will not die, going on without it: pid \d+ \(sh\) state D", run.err), run.err
    assert "1 will not die" in run.err
    assert "INIT-UP" in run.out


def thaw_filesystem(device: str) -> None:
    """FITHAW through a second mount of the same superblock, in a mount namespace of its
    own (the sandbox's mount is unreachable once its stage has pivoted)."""
    script = (
        f'set -e; dir=$(mktemp -d); mount {device} "$dir"; '
        'fsfreeze -u "$dir" 2>/dev/null || true; umount "$dir"; rmdir "$dir"'
    )
    subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True,
        check=False,
        timeout=30,
    )


def test_in_a_sandbox_the_old_mounts_go_read_only_per_mount_and_the_host_stays_writable(
    tmp_path: Path, busybox_tree: Path, stallable_disk: StallableDisk
):
    """The old root's block-backed mounts (copies in the stage's mount namespace) turn
    read-only one by one (MS_BIND | MS_REMOUNT). The superblocks, shared with the host,
    are never remounted: the host's / and the disk stay writable for everyone."""
    disk = tmp_path / "disk"
    disk.mkdir()
    probe = (
        "grep -E ' (/|/proc|/sys|/dev|/dev/pts) ' /proc/self/mountinfo > /dev/null; echo INIT-UP"
    )
    host_root_before = _mount_options("/")
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", probe]),
        before=f"mount {stallable_disk.device} {disk}\n",
    )
    assert run.returncode == 0, run.err
    assert "INIT-UP" in run.out
    assert _mount_options("/") == host_root_before and "rw" in host_root_before.split(",")
    assert "read-only remount, per mount (sandbox" in run.err, run.err
    assert re.search(r"read-only: / \(\S+ on \S+, \d+:\d+\)", run.err), run.err
    device = re.escape(stallable_disk.device)
    assert re.search(rf"read-only: {disk} \(ext4 on {device}, ", run.err), run.err
    # The superblock is untouched: the host can still write to the same filesystem.
    check = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount {stallable_disk.device} {disk} && touch {disk}/host-writes && umount {disk}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "old root's devices: a sandbox shares them with the host: not checked" in run.err


def test_what_holds_a_filesystem_writable_is_named(tmp_path: Path):
    """What the stage names when a read-only remount is refused (EBUSY): a process writing
    a file, and a loop device backed by a file, on that filesystem. Read-only look-ups of
    /proc and /sys on the host."""
    from initstage.mounts import mount_of, read_mounts
    from initstage.stage import holders

    mount = mount_of(str(tmp_path), read_mounts())
    assert mount is not None
    backing = tmp_path / "backing.img"
    with backing.open("wb") as image_file:
        image_file.truncate(1 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    writer = subprocess.Popen(["sh", "-c", f"exec 3>{tmp_path}/open-for-writing; sleep 60"])
    try:
        deadline = time.monotonic() + 5
        while not (tmp_path / "open-for-writing").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        named = holders(mount, limit=None)  # a shared host has many writers on /
    finally:
        writer.kill()
        writer.wait()
        subprocess.run(["losetup", "-d", loop], check=False)
    assert f"pid {writer.pid} (sh) writing {tmp_path}/open-for-writing" in named, named
    assert f"{os.path.basename(loop)} backed by {backing}" in named, named


def _mount_options(mount_point: str) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == mount_point:
            return fields[5]
    raise AssertionError(f"{mount_point} is not mounted")


def test_the_old_devices_report_names_busy_free_and_their_users(
    tmp_path: Path, stallable_disk: StallableDisk
):
    """What the stage logs after the pivot about the old root's devices, asked on the host
    (read-only: an O_EXCL open and /proc look-ups): a mounted disk is busy and the process
    working on it is named; a loop device nobody mounted is free."""
    from initstage.stage import device_state, users_of

    mount_point = tmp_path / "busy"
    mount_point.mkdir()
    ready = tmp_path / "mounted"
    # Mounted in a mount namespace of its own, by a process that then works in it.
    squatter = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f"mount {stallable_disk.device} {mount_point} && cd {mount_point}"
         f" && touch {ready} && exec sleep 60"],
    )  # fmt: skip
    image = tmp_path / "free.img"
    with image.open("wb") as image_file:
        image_file.truncate(1 << 20)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        deadline = time.monotonic() + 5
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        busy = stallable_disk.major_minor()
        assert " still busy (held by " in device_state(busy), device_state(busy)
        assert f"pid {squatter.pid} (sleep)" in users_of(busy)
        rdev = os.stat(loop).st_rdev
        assert device_state(f"{os.major(rdev)}:{os.minor(rdev)}") == (
            f"{loop} free (opens with O_EXCL)"
        )
    finally:
        squatter.kill()
        squatter.wait()
        subprocess.run(["losetup", "-d", loop], check=False)
