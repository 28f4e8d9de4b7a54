"""Preflight against this machine's real /proc.

Only processes these tests start are ever signalled or traced (by pid, never PID 1); PID 1 is
only read. ``FakeIndex`` stands in for the image index (which has its own tests) where the
image does not matter; the last test uses the real index of the ``tinybox`` engine image.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.inject.ptrace_ext import PTRACE_SEIZE
from injector.preflight import preflight
from tests.unit.test_preflight import FakeIndex

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


def _start(argv: list[str]) -> subprocess.Popen[str]:
    """A child that prints ``ready`` once it is set up."""
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "ready"
    return child


def _stop(child: subprocess.Popen[str]) -> None:
    assert child.pid != 1
    child.kill()
    child.wait(timeout=10)


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[int, Path, Path]]:
    """A child holding one file open for writing and another one for reading only."""
    written, read = tmp_path / "journal.db", tmp_path / "settings.conf"
    read.write_text("setting=1\n")
    code = (
        "import sys, time\n"
        f"w = open({str(written)!r}, 'a'); r = open({str(read)!r})\n"
        "print('ready', flush=True); time.sleep(120)\n"
    )
    child = _start([sys.executable, "-c", code])
    try:
        yield child.pid, written, read
    finally:
        _stop(child)


def test_a_process_writing_a_file_is_flagged(writer: tuple[int, Path, Path]) -> None:
    pid, written, _read = writer
    report = preflight.gather(FakeIndex(), ["/bin/sh"])
    [child] = [p for p in report.processes if p.pid == pid]
    assert child.writing == [str(written)]
    assert child.ppid == os.getpid()
    assert child.command.startswith(sys.executable)
    assert child.rss_bytes > 1 << 20
    assert child.user == "root"
    writers = [n for n in report.notices if n.code == "processes-writing"]
    assert writers and writers[0].level == "warning"


def test_a_file_written_in_another_mount_namespace_is_flagged(tmp_path: Path) -> None:
    # A container's view: the file exists only in the child's own mount namespace, so only a
    # stat through /proc/PID/fd (not of the path in ours, as psutil's open_files() does) sees it.
    private = tmp_path / "private"
    private.mkdir()
    script = f"mount -t tmpfs dboot-test {private} && exec 3>{private}/db; echo ready; sleep 120"
    child = _start(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
    try:
        assert not (private / "db").exists()
        report = preflight.gather(FakeIndex(), ["/bin/sh"])
        [listed] = [p for p in report.processes if p.pid == child.pid]
        assert listed.writing == [f"{private}/db"]
    finally:
        _stop(child)


def test_our_chain_is_marked_and_we_are_spared() -> None:
    report = preflight.gather(FakeIndex(), ["/bin/sh"])
    listed = {p.pid: p for p in report.processes}
    assert os.getpid() not in listed
    assert 1 not in listed
    # Walk our real ancestry: every ancestor but PID 1 is listed and marked, nobody else is.
    ancestors, pid = set(), os.getppid()
    while pid > 1:
        ancestors.add(pid)
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rpartition(")")[2].split()[1])
    assert {p.pid for p in report.processes if p.session_chain} == ancestors
    assert all(pid in listed for pid in ancestors)


def test_kernel_threads_are_not_listed() -> None:
    report = preflight.gather(FakeIndex(), ["/bin/sh"])
    assert 2 not in {p.pid for p in report.processes}
    assert all(p.ppid != 2 for p in report.processes)


def test_pid1_is_read_not_touched() -> None:
    pid1 = preflight.gather(FakeIndex(), ["/bin/sh"]).pid1
    cmdline = [a for a in Path("/proc/1/cmdline").read_text().split("\0") if a]
    assert (pid1.pid, pid1.cmdline) == (1, cmdline)
    try:
        assert pid1.exe == os.readlink("/proc/1/exe")
    except PermissionError:
        # Some hosts (this CI's micro-VM) deny even root: the fact says so instead of failing.
        assert pid1.exe.startswith("unreadable (/proc/1/exe: Permission denied")
        assert not pid1.ptrace_allowed
    assert pid1.ptrace_reason


def test_ptrace_verdict_matches_a_real_attach_to_our_child() -> None:
    # A real PTRACE_SEIZE of a child we started (never PID 1): the report must predict that the
    # attach works, then see the tracer we became.
    child = _start(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(120)"]
    )
    try:
        report = preflight.gather(FakeIndex(), ["/bin/sh"], target_pid=child.pid)
        assert report.pid1.ptrace_allowed, report.pid1.ptrace_reason
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        assert child.pid != 1
        assert libc.ptrace(PTRACE_SEIZE, child.pid, None, None) == 0, ctypes.get_errno()
        traced = preflight.gather(FakeIndex(), ["/bin/sh"], target_pid=child.pid)
        assert not traced.pid1.ptrace_allowed
        assert traced.pid1.ptrace_reason.startswith(f"already traced by pid {os.getpid()}")
        [denied] = [n for n in traced.notices if n.code == "ptrace-denied"]
        assert denied.level == "blocker"
        assert f"(pid {os.getpid()})" in denied.fix
    finally:
        _stop(child)  # the trace ends with the tracee


def _wait_for_children(pid: int, cmdline: bytes, count: int) -> None:
    """Until ``count`` children of ``pid`` have exec'd ``cmdline`` (a forked shell first runs
    as a copy of its parent)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        done = [c for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline]
        if len(done) == count:
            return
        time.sleep(0.01)
    raise AssertionError(f"the children of {pid} did not start in time")


def test_a_namespace_target_lists_only_its_namespace() -> None:
    script = "sleep 120 & sleep 120 & echo ready; wait"
    unshare = _start(["unshare", "--pid", "--fork", "/bin/sh", "-c", script])
    try:
        children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
        [inner_init] = [int(pid) for pid in children]
        _wait_for_children(inner_init, b"sleep\x00120\x00", count=2)
        report = preflight.gather(FakeIndex(), ["/bin/sh"], target_pid=inner_init)
        assert report.pid1.cmdline == ["/bin/sh", "-c", script]
        assert [p.command for p in report.processes] == ["sleep 120", "sleep 120"]
        assert {p.ppid for p in report.processes} == {inner_init}
        assert not any(p.session_chain for p in report.processes)
    finally:
        # Killing the namespace's init takes the whole namespace with it.
        os.kill(inner_init, signal.SIGKILL)
        unshare.wait(timeout=10)


def test_gather_as_an_unprivileged_user_says_what_it_could_not_read() -> None:
    # Debian's own interpreter: the venv's lives under /root, which nobody may enter. Its
    # psutil is Debian's python3-psutil (5.9, the oldest pyproject allows). The index is
    # inline because this interpreter has no pytest to import the tests with.
    code = (
        "import json\n"
        "from injector.preflight import preflight\n"
        "class Index:\n"
        "    estimated_bytes = 1 << 20\n"
        "    def lookup(self, path): return None\n"
        "    def executable(self, path): return False\n"
        "print(json.dumps(preflight.gather(Index(), []).to_json()))\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        ["/usr/bin/python3", "-c", code],
        user=65534,
        group=65534,
        extra_groups=[],
        cwd=REPO,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 30
    report = json.loads(result.stdout)
    assert report["processes"], "processes are still listed from what is readable"
    assert any(line.startswith("open files of ") for line in report["unreadable"])
    assert "facts-incomplete" in [n["code"] for n in report["notices"]]
    assert report["pid1"]["ptrace_allowed"] is False
    assert report["pid1"]["ptrace_reason"] == "the target belongs to another user"
    assert report["pid1"]["ptrace_fix"] == "run dboot as root"
    assert report["pid1"]["exe"].startswith("unreadable")
