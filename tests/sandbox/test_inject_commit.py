"""Committed once the swap is in: no deadline on execve, and a restore that never gives up.

Every target is PID 1 of a PID namespace the test creates (tests/sandbox/parking.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.errors import EnvironmentFailure
from injector.inject import arch as archmod
from injector.inject import ptrace
from injector.inject.ptrace import InjectionReport, InjectionRolledBack, inject_execve
from tests.sandbox.parking import READ_ECHO, StandIn
from tests.sandbox.sandbox_checks import eventually

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace into a new PID namespace needs root"),
]

ARCH = archmod.host_arch()
READ = archmod.syscall_number(ARCH, "read")
MISSING = "/nonexistent/dboot-commit-test"
BUSYBOX = os.path.realpath(shutil.which("busybox") or "/bin/busybox")
READ_IOPS = Path("/sys/fs/cgroup/blkio/blkio.throttle.read_iops_device")
REPORTS = 2  # the disk stays slow until the injector has said this often that it waits


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid line for PID {pid}")


def test_a_failing_restore_is_retried_with_pid1_kept_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """execve fails, then putting the registers back fails twice (provoked: the kernel
    would not fail it here on its own). Detaching then would hand PID 1 execve's error as
    its read()'s result, with arguments pointing into our block: the injector keeps it
    stopped and tries again until the registers hold."""
    real_set_regs = ptrace._Tracee.set_regs
    calls: list[archmod.RegisterEdit] = []
    stopped_while_failing: list[str] = []

    def set_regs_failing_twice_after_the_swap(
        self: ptrace._Tracee, edit: archmod.RegisterEdit
    ) -> None:
        calls.append(edit)
        if len(calls) in (2, 3):  # 1 is the swap; 2 and 3 the first restores
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            stopped_while_failing.append(state)
            raise OSError(errno.EIO, "provoked PTRACE_SETREGSET failure")
        real_set_regs(self, edit)

    monkeypatch.setattr(ptrace._Tracee, "set_regs", set_regs_failing_twice_after_the_swap)
    monkeypatch.setattr(ptrace, "RESTORE_RETRY_PAUSE", 0.01)
    with StandIn(READ_ECHO) as init:
        init.wait_blocked_in(READ)
        log: list[str] = []
        with pytest.raises(InjectionRolledBack) as caught:
            inject_execve(init.pid, MISSING, [MISSING], [], log.append)
        assert caught.value.report.error == "ENOENT"
        assert len(calls) == 4, "two failed restores, then one that holds"
        assert stopped_while_failing == ["t", "t"], "PID 1 stays in its tracing stop"
        retries = [line for line in log if "registers failed" in line]
        assert len(retries) == 2 and "attempt 2" in retries[1], log
        assert tracer_of(init.pid) == 0
        # read() runs again and gets exactly these bytes: never execve's ENOENT.
        assert init.echo(b"as before") == b"as before"


@contextlib.contextmanager
def slow_disk_with_busybox(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """busybox on ext4 on a loop device, freshly mounted (nothing of it cached), and the
    blkio file whose rule makes that device answer at most one read per second.

    Yields (the busybox path, the loop device). The mount lives in our mount namespace;
    a StandIn started inside the block inherits it."""
    image, mount_point = tmp_path / "disk.img", tmp_path / "mnt"
    mount_point.mkdir()
    with image.open("wb") as image_file:
        image_file.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    loop = subprocess.run(
        ["losetup", "--find", "--show", str(image)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["mount", loop, str(mount_point)], check=True)
        (mount_point / "slow").mkdir()
        shutil.copy2(BUSYBOX, mount_point / "slow" / "busybox")
        # Unmounting drops every cached block of the device: the next mount starts cold.
        subprocess.run(["umount", str(mount_point)], check=True)
        subprocess.run(["mount", "-o", "ro", loop, str(mount_point)], check=True)
        yield mount_point / "slow" / "busybox", Path(loop)
    finally:
        with contextlib.suppress(OSError):
            set_read_iops(Path(loop), 0)
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        subprocess.run(["losetup", "-d", loop], check=False)


def set_read_iops(device: Path, iops: int) -> None:
    """Limit reads from ``device`` to ``iops`` per second (0: no limit)."""
    rdev = os.stat(device).st_rdev
    READ_IOPS.write_text(f"{os.major(rdev)}:{os.minor(rdev)} {iops}\n")


@pytest.mark.skipif(not READ_IOPS.exists(), reason="no blkio throttle (cgroup v1) here")
def test_a_slow_execve_is_waited_for_and_reported(tmp_path: Path) -> None:
    """The new program's disk answers one read a second while PID 1 is in our execve,
    until the injector has reported its wait REPORTS times. The injector waits (no
    deadline: PID 1 may exec at any moment, so it would be wrong to undo anything) and says
    every few seconds how long it has been waiting; then the exec happens."""
    proof = tmp_path / "proof"
    with slow_disk_with_busybox(tmp_path) as (busybox, device), StandIn(READ_ECHO) as init:
        init.wait_blocked_in(READ)
        waits: list[float] = []
        outcome: list[InjectionReport | BaseException] = []
        committed = threading.Event()

        def inject() -> None:
            try:
                outcome.append(
                    inject_execve(
                        init.pid,
                        str(busybox),
                        ["sh", "-c", f"echo slow $$ > {proof}; exec {BUSYBOX} sleep 600"],
                        ["PATH=/usr/bin:/bin"],
                        lambda line: None,
                        on_commit=committed.set,
                        on_wait=waits.append,
                    )
                )
            except BaseException as error:
                outcome.append(error)

        set_read_iops(device, 1)
        worker = threading.Thread(target=inject)
        started = time.monotonic()
        worker.start()
        try:
            assert committed.wait(5), "the swap never happened"
            limit = REPORTS * ptrace.EXEC_WAIT_REPORT_EVERY + 10
            assert eventually(lambda: len(waits) >= REPORTS, limit), waits
            assert not outcome, f"the injector gave up while PID 1 was in execve: {outcome}"
        finally:
            set_read_iops(device, 0)
            worker.join(60)
        took = time.monotonic() - started
        (report,) = outcome
        assert isinstance(report, InjectionReport), report
        assert report.outcome == "executed"
        assert eventually(lambda: proof.exists() and proof.read_text() == "slow 1\n", 10)
        assert waits == sorted(waits) and waits[0] >= ptrace.EXEC_WAIT_REPORT_EVERY - 0.1
        print(f"\nslow execve: {took:.1f} s, reported at {[round(s, 1) for s in waits]} s")


def test_a_swap_that_fails_half_way_is_undone_with_pid1_kept_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The swap's register write reports a failure although the registers went in (as when
    aarch64's second register set fails), and the first restore at the entry stop fails too
    (both provoked). Detaching then would let PID 1 run our execve: the injector keeps it
    stopped until the original registers hold, and PID 1's read() runs again."""
    real_set_regs = ptrace._Tracee.set_regs
    calls: list[archmod.RegisterEdit] = []

    def set_regs_half_then_failing(self: ptrace._Tracee, edit: archmod.RegisterEdit) -> None:
        calls.append(edit)
        if len(calls) == 1:
            real_set_regs(self, edit)
            raise OSError(errno.EIO, "provoked: the second register set failed")
        if len(calls) == 2:
            raise OSError(errno.EIO, "provoked PTRACE_SETREGSET failure")
        real_set_regs(self, edit)

    monkeypatch.setattr(ptrace._Tracee, "set_regs", set_regs_half_then_failing)
    monkeypatch.setattr(ptrace, "RESTORE_RETRY_PAUSE", 0.01)
    with StandIn(READ_ECHO) as init:
        init.wait_blocked_in(READ)
        log: list[str] = []
        with pytest.raises(EnvironmentFailure, match="second register set"):
            inject_execve(init.pid, MISSING, [MISSING], [], log.append)
        assert len(calls) == 3, "the swap, one failed restore, then one that holds"
        assert any("attempt 1" in line for line in log), log
        assert eventually(lambda: tracer_of(init.pid) == 0, 5)
        assert init.echo(b"as before") == b"as before"
