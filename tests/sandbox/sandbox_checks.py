"""Shared checks for the sandbox tests: polling, and "did it leave anything behind?"."""

from __future__ import annotations

import os
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from injector.errors import SafetyRefusal
from injector.inject.ptrace_ext import PTRACE_SEIZE
from injector.preflight.procinfo import namespace_of
from injector.rehearsal.sandbox import Sandbox, pids_in_namespace


def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; its last verdict."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# A tracer of our own: seizes the pid given as argv[1], says "seized" and holds on until its
# stdin closes (start it with stdin=PIPE). Run with -I: it needs nothing of ours.
SEIZE_AND_HOLD = textwrap.dedent(
    f"""
    import ctypes, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace({PTRACE_SEIZE}, int(sys.argv[1]), None, None) != 0:  # PTRACE_SEIZE
        sys.exit("seize failed: errno %d" % ctypes.get_errno())
    print("seized", flush=True)
    sys.stdin.read()
    """
)


def wait_for_output(sandbox: Sandbox, text: str, timeout: float = 5.0) -> bool:
    """Whether ``text`` shows up on the sandbox's console within ``timeout`` seconds."""
    return eventually(lambda: text in sandbox.output(), timeout)


def signal_service(sandbox: Sandbox, pid: int, signum: int) -> None:
    """Send ``signum`` to a process of ``sandbox``, refusing anything outside it."""
    # SAFETY: a pid that is not in the sandbox's namespace (the host's PID 1 above all)
    # is refused, whatever the caller passes.
    if pid == 1 or not sandbox.running() or namespace_of(pid, "pid") != sandbox.pid_namespace:
        raise SafetyRefusal(
            f"pid {pid} is not a process of the sandbox {sandbox.pid}",
            "signal only processes inside the sandbox",
        )
    os.kill(pid, signum)


class Footprint:
    """What a running sandbox is made of, to check later that none of it survived.

    It holds its namespaces open: a dead namespace's inode number is soon given to a new
    one (other tests make namespaces too), and an open namespace keeps its number. Holding
    the mount namespace keeps its mounts in the kernel, but in no process's mount table.
    """

    def __init__(self, sandbox: Sandbox) -> None:
        self.pid = sandbox.pid
        self.pid_namespace = namespace_of(self.pid, "pid")
        self.mount_namespace = namespace_of(self.pid, "mnt")
        self._held = [
            os.open(f"/proc/{self.pid}/ns/{kind}", os.O_RDONLY) for kind in ("pid", "mnt")
        ]

    def assert_gone(self, *mount_sources: str) -> None:
        try:
            assert describe(pids_in_namespace("pid", self.pid_namespace)) == []
            # No process anywhere keeps its mount namespace, so its mounts go with our fds.
            assert describe(pids_in_namespace("mnt", self.mount_namespace)) == []
            host_mounts = Path("/proc/self/mountinfo").read_text()
            for source in mount_sources:
                assert f" {source} " not in host_mounts
        finally:
            for fd in self._held:
                os.close(fd)
            self._held = []


def describe(pids: list[int]) -> list[str]:
    """Pids with their state and command line, for a readable assertion message."""
    described = []
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text().splitlines()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # gone meanwhile
        state = next(line for line in status if line.startswith("State:"))
        ppid = next(line for line in status if line.startswith("PPid:"))
        described.append(f"{pid} {state} {ppid} {cmdline.decode(errors='replace')}")
    return described


def mounted_sources(pid: int | str) -> list[str]:
    """The mount sources (field 10 of mountinfo) in ``pid``'s mount namespace."""
    sources = []
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        after_separator = line.split(" - ", 1)[1].split()
        sources.append(after_separator[1])
    return sources


def our_children() -> set[int]:
    children = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2 :].split()[1]) == os.getpid():
                children.add(int(entry))
    return children
