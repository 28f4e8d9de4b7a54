"""The kill/poll loop's decisions and the "will not die" naming, on FAKE process tables.

Mocked on purpose: the loop runs as PID 1 and sends kill(-1), which no unit test may do;
and a process that survives SIGKILL cannot be made on demand everywhere. The fakes below
model processes that exit some time after a signal (or never), on a fake clock. The real
thing is exercised in tests/sandbox/test_stage.py (a cgroup-frozen process in D state).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest

from initstage.mounts import Mount
from initstage.procs import (
    MAX_POLL,
    PF_KTHREAD,
    KernelCgroups,
    KernelSignals,
    ProcInfo,
    ProcTable,
    parse_stat,
    terminate_all,
)

NEVER = None


@dataclass
class FakeProcess:
    pid: int
    comm: str
    dies_after_term: float | None  # seconds after SIGTERM; None: ignores it
    dies_after_kill: float | None = 0.0  # None: stuck in D state, SIGKILL cannot end it
    state: str = "S"
    death: float | None = None


class FakeWorld:
    """A fake clock, process table and kill(-1) that agree with each other."""

    def __init__(self, processes: list[FakeProcess]) -> None:
        self.now = 100.0
        self.processes = {p.pid: p for p in processes}
        self.sent: list[tuple[float, int]] = []
        self.sleeps: list[float] = []
        self.scans = 0
        self.log: list[str] = []

    # Clock
    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds

    # Signals
    def send_all(self, sig: int) -> None:
        self.sent.append((self.now, sig))
        for process in self.processes.values():
            delay: dict[int, float | None] = {
                signal.SIGTERM: process.dies_after_term,
                signal.SIGKILL: process.dies_after_kill,
            }
            after = delay.get(sig, NEVER)  # SIGCONT ends nobody
            if after is not None and process.death is None:
                process.death = self.now + after
            if sig == signal.SIGKILL and after is None:
                process.state = "D"

    def reap(self) -> int:
        dead = [
            pid for pid, p in self.processes.items() if p.death is not None and p.death <= self.now
        ]
        for pid in dead:
            del self.processes[pid]
        return len(dead)

    # Process table
    def others(self) -> list[ProcInfo]:
        self.scans += 1
        return [ProcInfo(p.pid, 1, p.comm, p.state) for p in self.processes.values()]

    def run(self, grace: float = 3.0, kill_timeout: float = 2.0):
        return terminate_all(
            self, self, grace, kill_timeout, self.log.append, self.clock, self.sleep
        )

    def signals(self) -> list[int]:
        return [sig for _, sig in self.sent]


def services(count: int, dies_after: float | None) -> list[FakeProcess]:
    return [FakeProcess(100 + i, f"svc{i}", dies_after) for i in range(count)]


def test_services_that_exit_on_sigterm_end_the_step_within_milliseconds():
    world = FakeWorld(services(50, dies_after=0.004))
    report = world.run(grace=3.0)
    # SIGKILL goes out even when /proc shows nobody: kill(-1) reaches what a scan can miss
    # (issue 8); to the polite services it costs nothing, they are gone.
    assert world.signals() == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]
    assert report.initial == 50 and report.reaped == 50
    assert report.term_seconds < 0.010, "polling must notice them right away, not after a sleep"
    assert not report.ignored_term and not report.survivors
    assert world.log == []


def test_polling_starts_fast_and_settles_at_10_ms():
    world = FakeWorld(services(1, dies_after=NEVER))
    world.run(grace=1.0)
    assert world.sleeps[:5] == pytest.approx([0.001, 0.002, 0.004, 0.008, MAX_POLL])
    assert set(world.sleeps[4:-1]) == {MAX_POLL}
    assert world.scans < 200, "1 s of grace should cost about 100 scans of /proc"


def test_a_process_ignoring_sigterm_gets_sigkill_exactly_at_the_end_of_the_grace():
    stubborn = FakeProcess(7, "stubborn", dies_after_term=NEVER)
    world = FakeWorld([*services(3, dies_after=0.002), stubborn])
    start = world.now
    report = world.run(grace=0.5)
    kill_time = next(t for t, sig in world.sent if sig == signal.SIGKILL)
    assert kill_time - start == pytest.approx(0.5, abs=1e-9)
    assert [p.pid for p in report.ignored_term] == [7]
    assert report.survivors == []
    assert report.total_seconds < 0.5 + MAX_POLL + 1e-9
    assert "SIGKILL: pid 7 (stubborn) state S (sleeping)" in world.log[0]


def test_a_process_stuck_in_d_state_is_named_and_the_loop_gives_up_in_time():
    stuck = FakeProcess(42, "nfs writer", dies_after_term=NEVER, dies_after_kill=NEVER)
    world = FakeWorld([stuck, *services(2, dies_after=0.001)])
    report = world.run(grace=1.0, kill_timeout=2.0)
    assert [p.pid for p in report.survivors] == [42]
    assert report.total_seconds == pytest.approx(3.0, abs=MAX_POLL)
    assert world.log[-1] == (
        "will not die, going on without it: pid 42 (nfs writer) state D "
        "(uninterruptible sleep: stuck in the kernel, usually on I/O or a frozen cgroup)"
    )


def test_a_zero_grace_period_sends_sigkill_at_once():
    world = FakeWorld(services(2, dies_after=NEVER))
    report = world.run(grace=0.0)
    assert world.signals() == [signal.SIGTERM, signal.SIGCONT, signal.SIGKILL]
    assert report.term_seconds == 0.0 and report.survivors == []


def test_nothing_to_end_costs_no_sleep():
    world = FakeWorld([])
    report = world.run()
    assert world.sleeps == [] and report.initial == 0 and report.total_seconds == 0.0


def test_a_long_list_of_survivors_is_cut_short_in_the_sigkill_line():
    world = FakeWorld(services(15, dies_after=NEVER))
    world.run(grace=0.1)
    assert world.log[0].startswith("15 still running after the 0.1 s grace period, SIGKILL: ")
    assert world.log[0].count("pid ") == 10 and world.log[0].endswith(" ...")


def test_describe_names_pid_comm_and_state():
    assert ProcInfo(3, 1, "sleep", "T").describe() == "pid 3 (sleep) state T (stopped)"
    assert ProcInfo(4, 1, "odd", "W").describe() == "pid 4 (odd) state W"


def test_parse_stat_handles_a_comm_with_spaces_and_parentheses():
    raw = b"1234 (evil) (name )) S 1 1234 1234 0 -1 4194560 100 0 0 0"
    info = parse_stat(1234, raw)
    assert (info.pid, info.comm, info.state, info.ppid, info.kernel_thread) == (
        1234,
        "evil) (name )",
        "S",
        1,
        False,
    )


def test_parse_stat_recognises_kernel_threads_by_pf_kthread():
    raw = f"17 (kworker/0:1) I 2 0 0 0 -1 {PF_KTHREAD | 0x40} 0 0".encode()
    assert parse_stat(17, raw).kernel_thread
    # PPID 2 alone means nothing: in a sandbox pid 2 is an ordinary service.
    assert not parse_stat(18, b"18 (child) S 2 0 0 0 -1 4194304 0 0").kernel_thread


def fake_proc(tmp_path: Path, entries: dict[str, str]) -> Path:
    """A fake /proc directory: {pid: stat line}; plus non-pid noise."""
    proc = tmp_path / "proc"
    for pid, stat_line in entries.items():
        (proc / pid).mkdir(parents=True)
        (proc / pid / "stat").write_text(stat_line)
    (proc / "self").mkdir(exist_ok=True)
    (proc / "meminfo").write_text("MemTotal: 1 kB\n")
    (proc / "99").mkdir()  # vanished between listdir and open: no stat file
    return proc


def test_proc_table_skips_itself_kernel_threads_zombies_and_vanished(tmp_path: Path):
    own = str(os.getpid())
    proc = fake_proc(
        tmp_path,
        {
            own: f"{own} (python) R 0 0 0 0 -1 4194304 0",
            "2": f"2 (kthreadd) S 0 0 0 0 -1 {PF_KTHREAD} 0",
            "30": "30 (sshd) S 1 30 30 0 -1 4194560 0",
            "31": "31 (defunct) Z 30 30 30 0 -1 4194564 0",
            "32": "32 (dd) D 30 30 30 0 -1 4194560 0",
        },
    )
    found = ProcTable(str(proc)).others()
    assert sorted((p.pid, p.comm, p.state) for p in found) == [(30, "sshd", "S"), (32, "dd", "D")]


def test_kill_all_refuses_outside_pid_1_before_sending_anything():
    # Safe to run anywhere: the PID check comes first, kill(-1) is never reached.
    assert os.getpid() != 1
    with pytest.raises(RuntimeError, match="not PID 1"):
        KernelSignals().send_all(0)


def test_a_zombie_main_thread_with_live_threads_is_still_a_process(tmp_path: Path):
    proc = fake_proc(
        tmp_path,
        {
            "40": "40 (postgres) Z 1 40 40 0 -1 4194564 0",  # main thread gone, one left
            "41": "41 (defunct) Z 1 41 41 0 -1 4194564 0",  # a plain zombie: all gone
        },
    )
    for pid, states in (("40", {"40": "Z", "43": "S"}), ("41", {"41": "Z"})):
        for tid, state in states.items():
            (proc / pid / "task" / tid).mkdir(parents=True)
            (proc / pid / "task" / tid / "stat").write_text(f"{tid} (t) {state} 1 0 0 0 -1 0 0")
    found = ProcTable(str(proc)).others()
    assert [(p.pid, p.state, p.live_threads) for p in found] == [(40, "Z", 1)]
    assert found[0].describe() == (
        "pid 40 (postgres) state Z (main thread exited, 1 threads still running)"
    )


def test_the_table_leaves_out_what_it_is_told_to(tmp_path: Path):
    proc = fake_proc(tmp_path, {"30": "30 (sync) D 1 30 30 0 -1 4194560 0"})
    assert ProcTable(str(proc), ignore=[30]).others() == []


class FakeCgroups:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[int]]] = []

    def thaw(self, processes: list[ProcInfo]) -> list[str]:
        self.calls.append(("thaw", [p.pid for p in processes]))
        return ["/sys/fs/cgroup/frozen"]

    def kill(self, processes: list[ProcInfo]) -> list[str]:
        self.calls.append(("kill", [p.pid for p in processes]))
        return ["/sys/fs/cgroup/stubborn"]


def test_cgroups_are_thawed_before_sigterm_and_killed_after_the_grace():
    world = FakeWorld([FakeProcess(7, "stubborn", dies_after_term=NEVER)])
    cgroups = FakeCgroups()
    terminate_all(
        world, world, 0.5, 2.0, world.log.append, world.clock, world.sleep, cgroups=cgroups
    )
    assert cgroups.calls == [("thaw", [7]), ("kill", [7])]
    assert world.log[0] == "thawed frozen cgroups: /sys/fs/cgroup/frozen"
    assert world.log[-1] == "cgroup.kill: /sys/fs/cgroup/stubborn"


def cgroup_tree(tmp_path: Path) -> tuple[Path, Path, list[Mount]]:
    """A fake hybrid cgroup tree: v2 at unified/, v1 freezer at freezer/, one group each,
    and a /proc/70/cgroup placing pid 70 in both."""
    v2, v1 = tmp_path / "unified", tmp_path / "freezer"
    for group, files in (
        (v2 / "svc" / "inner", {"cgroup.freeze": "0\n", "cgroup.procs": "70\n"}),
        (v2 / "svc", {"cgroup.freeze": "1\n", "cgroup.procs": "", "cgroup.kill": ""}),
        (v1 / "svc", {"freezer.state": "FROZEN\n", "cgroup.procs": "70\n"}),
    ):
        group.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (group / name).write_text(text)
    proc = tmp_path / "proc" / "70"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("6:freezer:/svc\n0::/svc/inner\n")
    mounts = [
        Mount("0:38", "/", str(v2), ("rw",), "cgroup2", "cgroup2", ("rw",)),
        Mount("0:34", "/", str(v1), ("rw",), "cgroup", "cgroup", ("rw", "freezer")),
    ]
    return v2, v1, mounts


def test_kernel_cgroups_thaw_the_frozen_ancestors_in_v1_and_v2(tmp_path: Path):
    v2, v1, mounts = cgroup_tree(tmp_path)
    cgroups = KernelCgroups(str(tmp_path / "proc"), mounts)
    thawed = cgroups.thaw([ProcInfo(70, 1, "svc", "D")])
    assert thawed == [str(v1 / "svc"), str(v2 / "svc")]
    # (A fake file keeps the tail of what was there before; cgroupfs takes the write.)
    assert (v2 / "svc" / "cgroup.freeze").read_text().strip() == "0"
    assert (v1 / "svc" / "freezer.state").read_text().startswith("THAWED")


def test_cgroup_kill_only_for_a_group_holding_nothing_but_our_processes(tmp_path: Path):
    v2, _v1, mounts = cgroup_tree(tmp_path)
    (v2 / "svc" / "inner" / "cgroup.kill").write_text("")
    cgroups = KernelCgroups(str(tmp_path / "proc"), mounts)
    cgroups.own_pid = 1
    # A process outside our PID namespace reads as pid 0: never kill that group (in a
    # sandbox the cgroup tree is the host's).
    (v2 / "svc" / "inner" / "cgroup.procs").write_text("70\n0\n")
    assert cgroups.kill([ProcInfo(70, 1, "svc", "S")]) == []
    (v2 / "svc" / "inner" / "cgroup.procs").write_text("70\n1\n")  # and never our own
    assert cgroups.kill([ProcInfo(70, 1, "svc", "S")]) == []
    (v2 / "svc" / "inner" / "cgroup.procs").write_text("70\n")
    assert cgroups.kill([ProcInfo(70, 1, "svc", "S")]) == [str(v2 / "svc" / "inner")]
    assert (v2 / "svc" / "inner" / "cgroup.kill").read_text() == "1"


class ZombieSkippingWorld(FakeWorld):
    """Like ProcTable: a dead but unreaped process (a zombie) is not listed, and each scan of
    /proc takes a little time, during which a killed process may die."""

    def others(self) -> list[ProcInfo]:
        self.now += 2e-6
        alive = [p for p in self.processes.values() if p.death is None or p.death > self.now]
        self.scans += 1
        return [ProcInfo(p.pid, 1, p.comm, p.state) for p in alive]


def test_processes_that_die_during_the_last_scan_are_reaped_not_handed_to_the_new_init():
    # Each dies 1 us after SIGKILL: after the loop's reap, before its scan sees them as zombies.
    late = [FakeProcess(200 + i, f"late{i}", dies_after_term=NEVER, dies_after_kill=1e-6)
            for i in range(3)]  # fmt: skip
    world = ZombieSkippingWorld(late)
    report = world.run(grace=0.0)
    assert report.survivors == []
    assert world.processes == {}, "zombies left for the new init, which may never reap them"
    assert report.reaped == 3
