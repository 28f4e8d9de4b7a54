"""Shared checks for the sandbox tests: polling, and "did it leave anything behind?"."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from injector.sandbox import Sandbox, namespace_of, pids_in_namespace


def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; its last verdict."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Footprint:
    """What a running sandbox is made of, to check later that none of it survived."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.pid = sandbox.pid
        self.pid_namespace = namespace_of(self.pid, "pid")
        self.mount_namespace = namespace_of(self.pid, "mnt")

    def assert_gone(self, *mount_sources: str) -> None:
        assert pids_in_namespace("pid", self.pid_namespace) == []
        # No process anywhere keeps the sandbox's mount namespace (so its mounts are freed).
        assert pids_in_namespace("mnt", self.mount_namespace) == []
        assert not Path(f"/proc/{self.pid}").exists() or self.pid_reused()
        host_mounts = Path("/proc/self/mountinfo").read_text()
        for source in mount_sources:
            assert f" {source} " not in host_mounts

    def pid_reused(self) -> bool:
        try:
            return namespace_of(self.pid, "pid") != self.pid_namespace
        except FileNotFoundError:
            return True


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
