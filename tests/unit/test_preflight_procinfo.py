"""The /proc parsers and readers behind preflight, on crafted text and crafted trees."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import psutil
import pytest

from injector.preflight import procinfo
from injector.preflight.procinfo import SwapDevice


def test_psutil_reads_a_crafted_tree_only_for_the_duration(tmp_path: Path) -> None:
    (tmp_path / "4242").mkdir()
    with procinfo.procfs(tmp_path):
        assert psutil.pids() == [4242]
    assert psutil.PROCFS_PATH == "/proc"
    with pytest.raises(RuntimeError), procinfo.procfs(tmp_path):
        raise RuntimeError("the caller fails")
    assert psutil.PROCFS_PATH == "/proc"
    assert procinfo.list_pids(tmp_path) == [4242]
    assert os.getpid() in procinfo.list_pids()


def test_memory_of_a_tree_without_meminfo_is_unknown(tmp_path: Path) -> None:
    assert procinfo.memory(tmp_path) is None
    (tmp_path / "meminfo").mkdir()  # EISDIR stands in for a refusal (root reads through modes)
    with pytest.raises(procinfo.Unreadable, match="meminfo"):
        procinfo.memory(tmp_path)


def test_details_of_a_process_that_is_gone_are_none(tmp_path: Path) -> None:
    assert procinfo.process_details(4242, tmp_path) is None


def test_a_refused_detail_names_its_file(monkeypatch: pytest.MonkeyPatch) -> None:
    # As psutil reports hidepid= or a protected file: AccessDenied, raised from the OSError.
    def refuse(process: psutil.Process) -> None:
        try:
            raise PermissionError(13, "Permission denied", f"/proc/{process.pid}/cmdline")
        except PermissionError as error:
            raise psutil.AccessDenied(process.pid) from error

    monkeypatch.setattr(psutil.Process, "cmdline", refuse)
    with pytest.raises(procinfo.Unreadable) as caught:
        procinfo.process_details(os.getpid())
    assert str(caught.value) == f"/proc/{os.getpid()}/cmdline: Permission denied"


def test_our_own_details_through_psutil() -> None:
    details = procinfo.process_details(os.getpid())
    assert details is not None
    assert details.user == pwd.getpwuid(os.getuid()).pw_name
    cmdline = Path("/proc/self/cmdline").read_bytes().decode()
    assert details.argv == [arg for arg in cmdline.split("\0") if arg]
    assert details.rss_bytes > 1 << 20


SWAPS = (
    "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"
    "/dev/sda3                               partition\t8388604\t\t102400\t\t-2\n"
    "/swap\\040file                           file\t\t1048572\t\t0\t\t-3\n"
    "/dev/zram0                              partition\t4194300\t\t2048\t\t100\n"
    "/dev/dm-1                               partition\t1024\t\t0\t\t-4\n"
)


def test_swaps_are_classified_and_sized() -> None:
    assert procinfo.parse_swaps(SWAPS) == [
        SwapDevice("/dev/sda3", "disk", 8388604 * 1024, 102400 * 1024),
        # The kernel escapes the blank as \040.
        SwapDevice("/swap file", "file", 1048572 * 1024, 0),
        SwapDevice("/dev/zram0", "zram", 4194300 * 1024, 2048 * 1024),
        SwapDevice("/dev/dm-1", "disk", 1024 * 1024, 0),
    ]


def test_only_zram_may_stay_on() -> None:
    kinds = {device.path: device.must_go_off for device in procinfo.parse_swaps(SWAPS)}
    assert kinds == {"/dev/sda3": True, "/swap file": True, "/dev/zram0": False, "/dev/dm-1": True}


def test_no_swap_is_an_empty_list() -> None:
    assert procinfo.parse_swaps("Filename\tType\tSize\tUsed\tPriority\n") == []


@pytest.mark.parametrize(
    ("line", "kernel"),
    [
        ("2 (kthreadd) S 0 0 0 0 -1 2129984 0", True),  # kthreadd: PF_KTHREAD, ppid 0
        ("15 (rcu_preempt) I 2 0 0 0 -1 2129984 0", True),
        # The stage's rule, now the only one: the flag, not "PPID 2" (a sandbox's pid 2 is
        # an ordinary service).
        ("99 (odd) S 2 0 0 0 -1 0 0", False),
        ("1 (systemd) S 0 1 1 0 -1 4194560 0", False),
        ("812 (a) b (c) S 1 812 812 0 -1 4194560 0", False),
    ],
)
def test_read_stat_uses_the_stages_parser(tmp_path: Path, line: str, kernel: bool) -> None:
    pid = int(line.split()[0])
    (tmp_path / str(pid)).mkdir()
    (tmp_path / str(pid) / "stat").write_text(line)
    stat = procinfo.read_stat(pid, tmp_path)
    assert stat is not None and stat.kernel_thread is kernel
    assert procinfo.read_stat(pid + 1, tmp_path) is None  # gone


@pytest.mark.parametrize(
    ("cgroup", "service"),
    [
        ("0::/system.slice/ssh.service\n", "ssh.service"),
        ("0::/user.slice/user-1000.slice/session-3.scope\n", "session-3.scope"),
        # A user's own services sit below user@UID.service: the deepest unit wins.
        ("0::/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service\n", "foo.service"),
        # A delegated service may create sub-cgroups below its unit.
        ("0::/system.slice/docker.service/payload\n", "docker.service"),
        ("0::/init.scope\n", "init.scope"),
        # cgroup v1 (or hybrid): the name=systemd hierarchy.
        ("4:memory:/\n1:name=systemd:/system.slice/cron.service\n", "cron.service"),
        ("12:pids:/\n1:name=systemd:/system.slice/cron.service\n0::/\n", "cron.service"),
        ("0::/\n", "-"),
        ("4:memory:/process_api/761aad8c\n0::/\n", "-"),
        ("", "-"),
    ],
)
def test_service_from_cgroup(cgroup: str, service: str) -> None:
    assert procinfo.service_from_cgroup(cgroup) == service


@pytest.mark.parametrize(
    ("flags", "writable"),
    [
        ("0100000", False),  # O_RDONLY|O_LARGEFILE
        ("02101", True),  # O_WRONLY|O_APPEND|O_CREAT... (octal)
        ("0100002", True),  # O_RDWR|O_LARGEFILE
        ("02000000", False),  # O_CLOEXEC only: read-only
    ],
)
def test_fdinfo_access_mode(flags: str, writable: bool) -> None:
    assert procinfo.fdinfo_writable(f"pos:\t0\nflags:\t{flags}\nmnt_id:\t25\n") is writable


def _fd(proc: Path, pid: int, fd: int, target: str, flags: str) -> None:
    (proc / str(pid) / "fd").mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "fdinfo").mkdir(parents=True, exist_ok=True)
    os.symlink(target, proc / str(pid) / "fd" / str(fd))
    (proc / str(pid) / "fdinfo" / str(fd)).write_text(f"pos:\t0\nflags:\t{flags}\n")


def test_only_regular_files_open_for_writing_are_data_at_risk(tmp_path: Path) -> None:
    # A crafted /proc/PID/fd: the links point at real objects so that stat() works as on /proc.
    proc = tmp_path / "proc"
    data = tmp_path / "data"
    data.mkdir()
    (data / "db").write_text("x")
    (data / "config").write_text("x")
    _fd(proc, 7, 3, str(data / "db"), "0100002")  # O_RDWR: flagged
    _fd(proc, 7, 4, str(data / "db"), "0100001")  # the same file twice: listed once
    _fd(proc, 7, 5, str(data / "config"), "0100000")  # read-only
    _fd(proc, 7, 6, "pipe:[4242]", "01")
    _fd(proc, 7, 7, "socket:[4243]", "02")
    _fd(proc, 7, 8, "/dev/null", "0100002")
    _fd(proc, 7, 9, str(data / "gone") + " (deleted)", "0100002")
    _fd(proc, 7, 10, str(data), "0200000")  # a directory
    assert procinfo.files_open_for_writing(7, proc) == [str(data / "db")]


def test_a_process_that_is_gone_holds_nothing(tmp_path: Path) -> None:
    assert procinfo.files_open_for_writing(4242, tmp_path) == []


def test_an_unreadable_file_is_named_not_raised_as_oserror(tmp_path: Path) -> None:
    # Root reads through chmod 000, so a directory where a file should be stands in for the
    # EACCES that an unprivileged user gets (the real case is in tests/sandbox).
    (tmp_path / "status").mkdir()
    with pytest.raises(procinfo.Unreadable, match="status"):
        procinfo.read_text(tmp_path / "status")
    assert procinfo.read_text(tmp_path / "missing") is None


def test_status_fields() -> None:
    status = procinfo.parse_status("Name:\tsshd\nUid:\t0\t0\t0\t0\nTracerPid:\t  812\n")
    assert (status["Name"], status["TracerPid"]) == ("sshd", "812")
    assert procinfo.has_capability({"CapEff": "000001ffffffffff"}, procinfo.CAP_SYS_PTRACE)
    assert not procinfo.has_capability({"CapEff": "0000000000000000"}, procinfo.CAP_SYS_PTRACE)
