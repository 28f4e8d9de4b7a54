"""Preflight facts and verdicts on a crafted /proc tree and a fake image index.

The tree has the shape of the real /proc (stat, status, statm, cmdline, cgroup, fd/, fdinfo/,
ns/pid, meminfo) so that the very same readers run, psutil's included (``procinfo.procfs``
points it at the tree); tests/sandbox/test_preflight_host.py runs them on this machine's real
/proc. ``FakeIndex`` stands in for ``injector.ramroot.rootfs.ImageIndex``, which has
its own tests: here only ``estimated_bytes``, ``lookup`` and ``executable`` matter.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import resource
from pathlib import Path

import pytest

from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.events import Fact, Notice, to_json
from injector.preflight import preflight
from injector.preflight.preflight import Report

MiB = 1 << 20
GiB = 1 << 30
HOST_NS = "pid:[4026531836]"
USER_FLAGS = 0x400100  # PF_RANDOMIZE | PF_FORKNOEXEC: an ordinary process
KTHREAD_FLAGS = 0x208040
ROOT_CAPS, NO_CAPS = "000001ffffffffff", "0000000000000000"


class FakeIndex:
    """Stands in for ``injector.ramroot.rootfs.ImageIndex``: ``files`` maps an absolute path to
    ``"x"`` (executable file), ``"f"`` (plain file), ``"d"`` (directory) or ``"-> TARGET"``
    (a symlink, resolved inside the image like the real index does)."""

    def __init__(self, files: dict[str, str] | None = None, estimated_bytes: int = 64 * MiB):
        self.files = {"/bin/busybox": "x", "/bin/sh": "-> busybox", **(files or {})}
        self.estimated_bytes = estimated_bytes

    def lookup(self, path: str) -> str | None:
        for _ in range(40):
            kind = self.files.get(path)
            if kind is None or not kind.startswith("-> "):
                return kind
            path = posixpath.normpath(posixpath.join(posixpath.dirname(path), kind[3:]))
        return None

    def executable(self, path: str) -> bool:
        return self.lookup(path) == "x"


@dataclasses.dataclass
class FakeProcess:
    pid: int
    ppid: int
    comm: str
    cmdline: list[str]
    uid: int = 0
    state: str = "S"
    flags: int = USER_FLAGS
    cgroup: str = "0::/\n"
    rss_kib: int = 1000
    tracer: int = 0
    ns: str = HOST_NS
    writing: tuple[str, ...] = ()  # names of files under the scene's data dir
    tty: str | None = None


@dataclasses.dataclass
class Scene:
    """A crafted /proc (``proc``), an empty root for container hints (``root``), and the data
    directory whose files the fake processes hold open."""

    proc: Path
    root: Path
    data: Path


# Every line psutil's virtual_memory() reads (it warns about a missing one).
MEMINFO = "".join(
    f"{key}:{size // 1024:>16} kB\n"
    for key, size in [
        ("MemTotal", 8 * GiB),
        ("MemFree", 2 * GiB),
        ("MemAvailable", 6 * GiB),
        ("Buffers", 64 * MiB),
        ("Cached", 3 * GiB),
        ("Active", 2 * GiB),
        ("Inactive", 2 * GiB),
        ("Shmem", 16 * MiB),
        ("Slab", 256 * MiB),
        ("SReclaimable", 200 * MiB),
    ]
)
NO_SWAP = "Filename\tType\tSize\tUsed\tPriority\n"
HOST_ETC = {
    "hostname": "server\n",
    "hosts": "127.0.0.1 localhost\n",
    "resolv.conf": "nameserver 192.0.2.53\n",
    "machine-id": "0123456789abcdef0123456789abcdef\n",
}


def build(
    tmp_path: Path,
    processes: list[FakeProcess],
    *,
    meminfo: str | None = MEMINFO,
    swaps: str = NO_SWAP,
    yama: str | None = None,
    pid1_environ: str = "",
) -> Scene:
    scene = Scene(tmp_path / "proc", tmp_path / "root", tmp_path / "data")
    for directory in (scene.proc, scene.root, scene.data):
        directory.mkdir()
    # The host files of an ordinary install (tests/unit/test_preflight_hostfiles.py tries
    # every odd state of them).
    (scene.root / "etc").mkdir()
    for name, content in HOST_ETC.items():
        (scene.root / "etc" / name).write_text(content)
    if meminfo is not None:
        (scene.proc / "meminfo").write_text(meminfo)
    (scene.proc / "stat").write_text("cpu  0 0 0 0 0 0 0 0 0 0\nbtime 1700000000\n")
    (scene.proc / "swaps").write_text(swaps)
    if yama is not None:
        (scene.proc / "sys/kernel/yama").mkdir(parents=True)
        (scene.proc / "sys/kernel/yama/ptrace_scope").write_text(yama + "\n")
    for process in processes:
        base = scene.proc / str(process.pid)
        (base / "fd").mkdir(parents=True)
        (base / "fdinfo").mkdir()
        (base / "ns").mkdir()
        # The kernel's 52 fields (psutil reads up to the 42nd): ppid .. flags, the times,
        # priority, nice, threads, itrealvalue, starttime, then zeros.
        rest = [process.ppid, process.pid, process.pid, 0, -1, process.flags, *[0] * 8, 20, 0, 1]
        rest += [0, 100, *[0] * 30]
        (base / "stat").write_text(
            f"{process.pid} ({process.comm}) {process.state} {' '.join(map(str, rest))}\n"
        )
        (base / "status").write_text(
            f"Name:\t{process.comm}\nState:\t{process.state}\nPid:\t{process.pid}\n"
            f"PPid:\t{process.ppid}\nTracerPid:\t{process.tracer}\n"
            f"Uid:\t{process.uid}\t{process.uid}\t{process.uid}\t{process.uid}\n"
            f"CapEff:\t{ROOT_CAPS if process.uid == 0 else NO_CAPS}\n"
        )
        pages = process.rss_kib * 1024 // resource.getpagesize()
        (base / "statm").write_text(f"{pages * 2} {pages} 0 0 0 {pages} 0\n")
        (base / "cmdline").write_text("".join(arg + "\0" for arg in process.cmdline))
        (base / "cgroup").write_text(process.cgroup)
        (base / "environ").write_text(pid1_environ if process.pid == 1 else "")
        os.symlink(process.ns, base / "ns" / "pid")
        os.symlink(process.cmdline[0] if process.cmdline else "/nonexistent", base / "exe")
        if process.tty:
            os.symlink(process.tty, base / "fd" / "0")
            (base / "fdinfo" / "0").write_text("flags:\t0100002\n")
        for fd, name in enumerate(process.writing, start=3):
            (scene.data / name).write_text("rows")
            os.symlink(scene.data / name, base / "fd" / str(fd))
            (base / "fdinfo" / str(fd)).write_text("pos:\t0\nflags:\t0100002\n")
    return scene


OUR_PID = 603


def server(changes: dict[int, dict[str, object]] | None = None) -> list[FakeProcess]:
    """A small server: systemd, kernel threads, sshd with our login chain, a database."""
    session = "0::/user.slice/user-65534.slice/session-3.scope\n"
    processes = [
        FakeProcess(1, 0, "systemd", ["/sbin/init", "splash"], cgroup="0::/init.scope\n"),
        FakeProcess(2, 0, "kthreadd", [], flags=KTHREAD_FLAGS),
        FakeProcess(15, 2, "rcu_preempt", [], flags=KTHREAD_FLAGS),
        FakeProcess(
            500, 1, "sshd", ["/usr/sbin/sshd", "-D"], cgroup="0::/system.slice/ssh.service\n"
        ),
        FakeProcess(600, 500, "sshd", ["sshd: nobody [priv]"], cgroup=session),
        FakeProcess(601, 600, "bash", ["-bash"], uid=65534, cgroup=session, rss_kib=4000),
        FakeProcess(602, 601, "sudo", ["sudo", "dboot", "check"], cgroup=session),
        FakeProcess(
            OUR_PID, 602, "dboot", ["/usr/bin/python3", "dboot"], cgroup=session, tty="/dev/pts/0"
        ),
        FakeProcess(
            700,
            1,
            "postgres",
            ["/usr/lib/postgresql/15/bin/postgres"],
            uid=65534,
            cgroup="0::/system.slice/postgresql.service\n",
            writing=("base.db", "wal.log"),
            rss_kib=200_000,
        ),
        FakeProcess(701, 700, "postgres", [], state="Z"),
        FakeProcess(
            800, 1, "cron", ["/usr/sbin/cron", "-f"], cgroup="0::/system.slice/cron.service\n"
        ),
    ]
    changes = changes or {}
    return [dataclasses.replace(p, **changes.get(p.pid, {})) for p in processes]  # type: ignore[arg-type]


def run(
    scene: Scene, index: FakeIndex | None = None, init: list[str] | None = None, **kwargs: object
) -> Report:
    options: dict[str, object] = {"our_pid": OUR_PID, "environ": {}, "host_root": scene.root}
    options.update(kwargs)
    return preflight.gather(
        index or FakeIndex(),
        ["/bin/sh"] if init is None else init,
        proc=scene.proc,
        **options,  # type: ignore[arg-type]
    )


def codes(report: Report) -> dict[str, str]:
    return {notice.code: notice.level for notice in report.notices}


# --- Processes -----------------------------------------------------------------------------


def test_who_will_be_killed(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()))
    # Not PID 1 (the target), not kernel threads, not ourselves, not the zombie.
    assert [p.pid for p in report.processes] == [500, 600, 601, 602, 700, 800]


def test_our_session_chain_is_marked(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()))
    assert {p.pid for p in report.processes if p.session_chain} == {500, 600, 601, 602}


def test_process_details(tmp_path: Path) -> None:
    scene = build(tmp_path, server())
    by_pid = {p.pid: p for p in run(scene).processes}
    bash, database = by_pid[601], by_pid[700]
    assert (bash.user, bash.command, bash.rss_bytes, bash.service) == (
        "nobody",
        "-bash",
        4000 * 1024,
        "session-3.scope",
    )
    assert database.service == "postgresql.service"
    assert database.writing == [str(scene.data / "base.db"), str(scene.data / "wal.log")]
    assert by_pid[500].writing == []


def test_a_process_without_command_line_shows_its_name(tmp_path: Path) -> None:
    report = run(build(tmp_path, [*server(), FakeProcess(900, 1, "kworkerish", [])]))
    assert report.processes[-1].command == "[kworkerish]"


def test_writers_are_a_data_loss_warning_naming_the_units(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()))
    [notice] = [n for n in report.notices if n.code == "processes-writing"]
    assert notice.level == "warning"
    assert "700 /usr/lib/postgresql/15/bin/postgres" in notice.message
    assert notice.fix.startswith("systemctl stop postgresql.service")


def test_grouped_by_service_with_unitless_last(tmp_path: Path) -> None:
    processes = [*server(), FakeProcess(900, 1, "loose", ["/opt/loose"])]
    groups = preflight.processes_by_service(run(build(tmp_path, processes)).processes)
    assert list(groups) == [
        "cron.service",
        "postgresql.service",
        "session-3.scope",
        "ssh.service",
        "-",
    ]
    assert [p.pid for p in groups["session-3.scope"]] == [600, 601, 602]


def test_a_namespace_target_lists_its_namespace_only(tmp_path: Path) -> None:
    sandbox, nested = "pid:[4026532999]", "pid:[4026533000]"
    processes = [
        *server(),
        FakeProcess(900, 601, "unshare", ["unshare", "--pid", "--fork"]),
        FakeProcess(901, 900, "init", ["/sbin/init"], ns=sandbox),
        FakeProcess(902, 901, "service", ["/bin/service"], ns=sandbox),
        # A container nested in the sandbox: its own namespace, but still below the target.
        FakeProcess(903, 902, "nested", ["/bin/nested"], ns=nested),
        # Entered with setns: its parent is outside, its namespace is the target's.
        FakeProcess(904, 601, "joined", ["/bin/joined"], ns=sandbox),
        FakeProcess(905, 901, "dead", [], ns=sandbox, state="Z"),
    ]
    report = run(build(tmp_path, processes), target_pid=901)
    assert [p.pid for p in report.processes] == [902, 903, 904]
    assert report.pid1.pid == 901
    assert report.pid1.cmdline == ["/sbin/init"]


def test_an_unknown_target_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no process with pid 4242"):
        run(build(tmp_path, server()), target_pid=4242)


def test_unreadable_fd_tables_are_reported_not_fatal(tmp_path: Path) -> None:
    scene = build(tmp_path, server())
    # A file where the fd directory should be stands in for EACCES (root reads through
    # permissions; the real unprivileged case is in tests/sandbox/test_preflight_host.py).
    (scene.proc / "800" / "fd").rmdir()
    (scene.proc / "800" / "fd").write_text("")
    report = run(scene)
    assert 800 in [p.pid for p in report.processes]
    assert report.unreadable == ["open files of 1 processes (pids 800)"]
    assert codes(report)["facts-incomplete"] == "warning"


# --- Session -------------------------------------------------------------------------------


def test_remote_through_sshd_in_the_chain(tmp_path: Path) -> None:
    session = run(build(tmp_path, server())).session
    assert (session.remote, session.via, session.image_has_ssh) == (
        True,
        "sshd[600] in the session chain",
        False,
    )


def test_remote_through_ssh_connection(tmp_path: Path) -> None:
    environ = {"SSH_CONNECTION": "10.1.2.3 50122 10.1.2.4 22"}
    session = run(build(tmp_path, server()), environ=environ).session
    assert (session.remote, session.via) == (True, "ssh from 10.1.2.3")


def test_local_console(tmp_path: Path) -> None:
    session = run(build(tmp_path, server({OUR_PID: {"ppid": 1}}))).session
    assert (session.remote, session.via) == (False, "console /dev/pts/0")


def test_remote_without_ssh_in_the_image_blocks(tmp_path: Path) -> None:
    """Issue 9: nobody gets back in, and nothing reverts: a blocker (--force overrides)."""
    report = run(build(tmp_path, server()))
    assert codes(report)["session-remote-no-ssh"] == "blocker"
    assert report.blocked


@pytest.mark.parametrize("sshd", ["/usr/sbin/sshd", "/usr/sbin/dropbear"])
def test_remote_with_ssh_in_the_image_only_explains(tmp_path: Path, sshd: str) -> None:
    index = FakeIndex({sshd: "x"})
    report = run(build(tmp_path, server()), index)
    assert report.session.image_has_ssh
    assert codes(report)["session-remote-ends"] == "info"
    assert "session-remote-no-ssh" not in codes(report)


def test_a_non_executable_sshd_is_no_ssh_server(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()), FakeIndex({"/usr/sbin/sshd": "f"}))
    assert not report.session.image_has_ssh


# --- PID 1 ---------------------------------------------------------------------------------


def test_pid1_identity(tmp_path: Path) -> None:
    pid1 = run(build(tmp_path, server())).pid1
    assert (pid1.pid, pid1.exe, pid1.cmdline) == (1, "/sbin/init", ["/sbin/init", "splash"])
    assert pid1.ptrace_allowed
    assert not pid1.in_container


@pytest.mark.parametrize(
    ("yama", "our_uid", "tracer", "allowed", "reason"),
    [
        (None, 0, 0, True, "no Yama restriction, we have CAP_SYS_PTRACE"),
        ("0", 0, 0, True, "Yama ptrace_scope is 0, we have CAP_SYS_PTRACE"),
        ("1", 0, 0, True, "Yama ptrace_scope is 1, we have CAP_SYS_PTRACE"),
        ("2", 0, 0, True, "Yama ptrace_scope is 2, we have CAP_SYS_PTRACE"),
        ("3", 0, 0, False, "Yama ptrace_scope is 3"),
        ("1", 65534, 0, False, "Yama ptrace_scope is 1: attaching needs CAP_SYS_PTRACE"),
        (None, 65534, 0, False, "another user"),
        (None, 0, 4242, False, "already traced by pid 4242"),
    ],
)
def test_ptrace_permission(
    tmp_path: Path, yama: str | None, our_uid: int, tracer: int, allowed: bool, reason: str
) -> None:
    processes = server({1: {"tracer": tracer}, OUR_PID: {"uid": our_uid}})
    # An sshd in the image: the remote session alone does not block (issue 9).
    report = run(build(tmp_path, processes, yama=yama), FakeIndex({"/usr/sbin/sshd": "x"}))
    assert report.pid1.ptrace_allowed is allowed
    assert reason in report.pid1.ptrace_reason
    assert ("ptrace-denied" in codes(report)) is not allowed
    assert report.blocked is not allowed
    assert bool(report.pid1.ptrace_fix) is not allowed


def test_container_hint_from_a_marker_file(tmp_path: Path) -> None:
    scene = build(tmp_path, server())
    (scene.root / ".dockerenv").write_text("")
    report = run(scene)
    assert report.pid1.in_container
    assert report.pid1.container_hint == "/.dockerenv exists"
    assert codes(report)["container-detected"] == "warning"


def test_container_hint_from_pid1_environment(tmp_path: Path) -> None:
    scene = build(tmp_path, server(), pid1_environ="PATH=/bin\0container=podman\0")
    assert run(scene).pid1.container_hint == "PID 1 has container=podman in its environment"


def test_container_hint_from_pid1_cgroup(tmp_path: Path) -> None:
    scene = build(tmp_path, server({1: {"cgroup": "0::/docker/0123abcd\n"}}))
    assert run(scene).pid1.container_hint == "PID 1's cgroup is /docker/0123abcd"


def test_a_namespace_target_is_not_judged_by_where_we_run(tmp_path: Path) -> None:
    scene = build(tmp_path, [*server(), FakeProcess(901, 601, "init", ["/sbin/init"])])
    (scene.root / ".dockerenv").write_text("")
    report = run(scene, target_pid=901)
    assert report.pid1.in_container
    assert "container-detected" not in codes(report)


# --- RAM -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("estimated", "available", "code"),
    [
        (64 * MiB, 6 * GiB, None),
        # 8 GiB of RAM: the copy margin is 256 MiB (1/32), "tight" below 819 MiB (1/10).
        (5 * GiB, 6 * GiB, None),
        (5 * GiB + 512 * MiB, 6 * GiB, "ram-tight"),
        (6 * GiB - 300 * MiB, 6 * GiB, "ram-tight"),
        (6 * GiB - 200 * MiB, 6 * GiB, "ram-does-not-fit"),
        (7 * GiB, 6 * GiB, "ram-does-not-fit"),
    ],
)
def test_ram_verdict(tmp_path: Path, estimated: int, available: int, code: str | None) -> None:
    report = run(
        build(tmp_path, server()), FakeIndex(estimated_bytes=estimated), mem_available=available
    )
    ram_codes = {c: level for c, level in codes(report).items() if c.startswith("ram")}
    assert ram_codes == ({} if code is None else {code: "blocker" if "fit" in code else "warning"})
    assert report.ram.remaining_bytes == available - estimated


def test_ram_facts_come_from_meminfo(tmp_path: Path) -> None:
    ram = run(build(tmp_path, server()), tmpfs_size=80 * MiB).ram
    assert (ram.estimated_bytes, ram.available_bytes, ram.total_bytes, ram.tmpfs_size) == (
        64 * MiB,
        6 * GiB,
        8 * GiB,
        80 * MiB,
    )
    assert ram.remaining_bytes == 6 * GiB - 64 * MiB


def test_a_tmpfs_smaller_than_the_image_blocks(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()), tmpfs_size=32 * MiB)
    assert codes(report)["ram-tmpfs-too-small"] == "blocker"


def test_unknown_memory_is_a_warning(tmp_path: Path) -> None:
    report = run(build(tmp_path, server(), meminfo=None))
    assert report.ram.available_bytes == 0
    assert codes(report)["ram-unknown"] == "warning"
    assert "ram-does-not-fit" not in codes(report)


# --- Swap ----------------------------------------------------------------------------------


def swaps(*rows: tuple[str, str, int, int]) -> str:
    lines = [f"{path} {kind} {size // 1024} {used // 1024} -2" for path, kind, size, used in rows]
    return "\n".join([NO_SWAP.rstrip("\n"), *lines]) + "\n"


def test_disk_swap_that_ram_absorbs_is_a_warning(tmp_path: Path) -> None:
    text = swaps(
        ("/dev/sda3", "partition", 8 * GiB, 1 * GiB), ("/dev/zram0", "partition", GiB, MiB)
    )
    report = run(build(tmp_path, server(), swaps=text))
    assert [(d.path, d.kind) for d in report.swap] == [
        ("/dev/sda3", "disk"),
        ("/dev/zram0", "zram"),
    ]
    [notice] = [n for n in report.notices if n.code.startswith("swap")]
    assert (notice.code, notice.level) == ("swap-disk-active", "warning")
    assert "/dev/sda3" in notice.message and "zram0" not in notice.message
    assert "RAM can absorb its 1.0 GiB" in notice.message


def test_disk_swap_that_ram_cannot_absorb_blocks(tmp_path: Path) -> None:
    # 6 GiB available - 64 MiB image - 256 MiB margin leaves about 5.7 GiB: 5.8 GiB is too much.
    text = swaps(("/swapfile", "file", 8 * GiB, 5 * GiB + 800 * MiB))
    report = run(build(tmp_path, server(), swaps=text))
    assert codes(report)["swap-cannot-absorb"] == "blocker"
    assert "swap-disk-active" not in codes(report)


def test_zram_alone_needs_nothing(tmp_path: Path) -> None:
    report = run(build(tmp_path, server(), swaps=swaps(("/dev/zram0", "partition", GiB, GiB))))
    assert not [code for code in codes(report) if code.startswith("swap")]


def test_swap_that_appeared_after_the_preflight_stops_the_switch(tmp_path: Path) -> None:
    report = run(build(tmp_path, server(), swaps=swaps(("/dev/sda3", "partition", GiB, 0))))
    now = swaps(("/dev/sda3", "partition", GiB, 0), ("/dev/sdb1", "partition", GiB, 0))
    with pytest.raises(EnvironmentFailure, match="disk swap /dev/sdb1 appeared after"):
        preflight.swaps_still_to_turn_off(report, now)
    # Gone since the preflight: nothing to do for it; zram is never turned off.
    later = swaps(("/dev/zram0", "partition", GiB, 0))
    assert preflight.swaps_still_to_turn_off(report, later) == []
    assert [
        d.path for d in preflight.swaps_still_to_turn_off(report, now.replace("sdb1", "sda3"))
    ] == [
        "/dev/sda3",
        "/dev/sda3",
    ]


def test_swapoff_refuses_in_lab_mode(tmp_path: Path) -> None:
    # tests/conftest.py turns lab mode on: the host's swap can never be touched by a test.
    report = run(build(tmp_path, server()))
    with pytest.raises(SafetyRefusal, match="lab mode"):
        preflight.swapoff_disk_swaps(report, proc=tmp_path / "proc")


# --- The init command ----------------------------------------------------------------------


IMAGE = FakeIndex(
    {
        "/sbin/init": "-> ../lib/systemd/systemd",
        "/lib/systemd/systemd": "x",
        "/etc/passwd": "f",
        "/usr/bin": "d",
        "/bin/dangling": "-> /nowhere",
    }
)


@pytest.mark.parametrize("argv", [["/sbin/init"], ["/bin/sh", "-c", "echo hi"], ["/bin/busybox"]])
def test_valid_init(argv: list[str]) -> None:
    preflight.validate_init(IMAGE, argv)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "no init command given: name the new PID 1"),
        ([""], "no init command given"),
        (["sbin/init"], "init 'sbin/init' is not an absolute path: give the full path"),
        (["/sbin/nope"], "init /sbin/nope does not exist in the image"),
        (["/bin/dangling"], "init /bin/dangling does not exist in the image (or is a dangling"),
        (["/etc/passwd"], "init /etc/passwd is not an executable file in the image"),
        (["/usr/bin"], "init /usr/bin is not an executable file"),
    ],
)
def test_invalid_init(argv: list[str], message: str) -> None:
    with pytest.raises(BadInput) as caught:
        preflight.validate_init(IMAGE, argv)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert caught.value.fix


def test_a_bad_init_is_a_blocker_in_the_report(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()), init=["/sbin/nope"])
    [notice] = [n for n in report.notices if n.code == "init-invalid"]
    assert (notice.level, notice.fix) == ("blocker", "pick a program the image has, e.g. /bin/sh")
    assert report.blocked


def test_no_init_is_not_judged(tmp_path: Path) -> None:
    report = run(build(tmp_path, server()), init=[])
    assert "init-invalid" not in codes(report)


# --- The report as data and as events --------------------------------------------------------


def blocked_scene(tmp_path: Path) -> Report:
    """A report with a blocker, warnings and an info notice, in that order."""
    text = swaps(("/dev/sda3", "partition", GiB, MiB))
    scene = build(tmp_path, server(), swaps=text, yama="3")
    return run(scene, FakeIndex({"/usr/sbin/sshd": "x"}), init=["/sbin/nope"])


def test_notices_come_blockers_first(tmp_path: Path) -> None:
    report = blocked_scene(tmp_path)
    assert [(n.level, n.code) for n in report.notices] == [
        ("blocker", "ptrace-denied"),
        ("blocker", "init-invalid"),
        ("warning", "swap-disk-active"),
        ("warning", "processes-writing"),
        ("warning", "remote-no-keys"),
        ("info", "session-remote-ends"),
    ]
    assert report.blocked


ACCESS_FACT_KEYS = (
    "interfaces",
    "routes",
    "dns",
    "session",
    "host_keys",
    "authorized_keys",
    "image_init",
    "network_state",
)
MODULES_FACT_KEYS = (
    "release",
    "source",
    "destination",
    "copy",
    "state",
    "files",
    "bytes",
    "loaded",
    "supported",
    "firmware",
    "firmware_missing",
    "firmware_bytes",
    "total_bytes",
)


def test_report_events_are_facts_then_notices_in_a_stable_order(tmp_path: Path) -> None:
    report = blocked_scene(tmp_path)
    events = list(preflight.report_events(report))
    facts = [e for e in events if isinstance(e, Fact)]
    notices = [e for e in events if isinstance(e, Notice)]
    assert events == facts + notices
    assert notices == report.notices
    assert [(f.section, f.key) for f in facts] == [
        ("ram", "estimated_bytes"),
        ("ram", "available_bytes"),
        ("ram", "total_bytes"),
        ("ram", "tmpfs_size"),
        ("ram", "remaining_bytes"),
        ("ram", "modules_bytes"),
        ("swap", "devices"),
        ("processes", "count"),
        ("processes", "rss_bytes"),
        ("processes", "services"),
        ("processes", "session_chain"),
        ("processes", "writing"),
        ("processes", "list"),
        ("session", "remote"),
        ("session", "via"),
        ("session", "image_has_ssh"),
        ("pid1", "pid"),
        ("pid1", "exe"),
        ("pid1", "cmdline"),
        ("pid1", "ptrace_allowed"),
        ("pid1", "ptrace_reason"),
        ("pid1", "in_container"),
        ("pid1", "container_hint"),
        ("pid1", "ptrace_fix"),
        ("init", "argv"),
        ("image", "architecture"),
        ("kernel", "machine"),
        *[("modules", key) for key in MODULES_FACT_KEYS],
        ("host_files", "files"),
        *[("access", key) for key in ACCESS_FACT_KEYS],
        ("preflight", "unreadable"),
    ]
    assert events == list(preflight.report_events(report))


def test_events_as_json_lines(tmp_path: Path) -> None:
    lines = [json.dumps(to_json(e)) for e in preflight.report_events(blocked_scene(tmp_path))]
    decoded = [json.loads(line) for line in lines]
    by_key = {(d["section"], d["key"]): d["value"] for d in decoded if d["event"] == "fact"}
    assert by_key[("processes", "count")] == 6
    assert by_key[("processes", "session_chain")] == [500, 600, 601, 602]
    assert by_key[("processes", "writing")] == [700]
    assert by_key[("swap", "devices")] == [
        {"path": "/dev/sda3", "kind": "disk", "size_bytes": GiB, "used_bytes": MiB}
    ]
    assert decoded[-1] == {
        "event": "notice",
        "level": "info",
        "code": "session-remote-ends",
        "message": "this remote session (sshd[600] in the session chain) ends at the switch",
        "fix": "reconnect once the new system's init has started its SSH server",
        "scope": "host",
    }


def test_report_to_json(tmp_path: Path) -> None:
    data = blocked_scene(tmp_path).to_json()
    assert json.loads(json.dumps(data)) == data
    assert data["blocked"] is True
    assert list(data) == [
        "ram",
        "swap",
        "processes",
        "session",
        "pid1",
        "init_argv",
        "notices",
        "unreadable",
        "modules",
        "host_files",
        "image_architecture",
        "kernel_machine",
        "access",
        "stop",
        "blocked",
    ]
    assert data["processes"][4]["writing"][0].endswith("/data/base.db")
    assert data["notices"][0] == {
        "level": "blocker",
        "code": "ptrace-denied",
        "message": "cannot attach to pid 1: Yama ptrace_scope is 3: "
        "no attaching at all until the next reboot",
        "fix": "reboot (scope 3 cannot be lowered at run time), with kernel.yama.ptrace_scope<=2",
        "scope": "host",
    }


def test_a_clean_report_is_not_blocked(tmp_path: Path) -> None:
    report = run(build(tmp_path, server({OUR_PID: {"ppid": 1}, 700: {"writing": ()}})))
    assert report.notices == []
    assert not report.blocked
    assert report.to_json()["blocked"] is False
