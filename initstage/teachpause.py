"""The teaching rehearsal's stage-side pauses: wait for a go from the host before each step.

Only a teaching rehearsal's plan names a channel (``teach_socket``; a plan that says
``machine`` may not). The host listens on a unix socket in the sandbox's state dir; the stage
connects once, before its first step (the path is gone after the pivot, the connection is
not), and before each step writes one line ``about to <step>: <system call>`` and reads
one line back. ``go`` goes on. End of file, a timeout, anything else, or no listener at
all also goes on, and ends the pauses for the rest of the run: a closed wizard never
hangs a rehearsal, and PID 1 never waits on a host for good.

Standard library only, imported up front by the stage (nothing may be imported after
the pivot).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from initstage.procs import Signals

# The steps the stage pauses before, in order; the host explains each by this name.
STEPS = ("sync", "SIGTERM", "SIGKILL", "pivot_root", "API mounts", "exec")
GO = b"go"
MAX_LINE = 4096
# sun_path holds 108 bytes; a long state dir is reached through a short /proc/self/fd path.
SUN_PATH_MAX = 107


def short_socket_path(path: str) -> tuple[str, int | None]:
    """A path to ``path`` short enough for sun_path, and the directory fd that makes it
    work (the caller closes it), or ``None`` when ``path`` fits as it is."""
    if len(path.encode()) <= SUN_PATH_MAX:
        return path, None
    directory, name = os.path.split(path)
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{name}", fd


def execve_text(path: str, argv: list[str]) -> str:
    """``execve("/bin/sh", ["/bin/sh", "-l"], envp)``: the call as C would spell it."""
    strings = ", ".join(json.dumps(arg, ensure_ascii=False) for arg in argv)
    return f"execve({json.dumps(path, ensure_ascii=False)}, [{strings}], envp)"


class TeachChannel:
    """The stage's end of the channel. ``pause`` returns when the host says go, or will not."""

    def __init__(self, path: str, timeout: float, log: Callable[[str], None]) -> None:
        self.path = path
        self.timeout = timeout
        self.log = log
        self.sock: socket.socket | None = None
        self.done = not path  # no channel, or it ended: every pause returns at once

    def connect(self) -> None:
        """Connect now, while the path is reachable (before the pivot)."""
        if self.done or self.sock is not None:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            reachable, dir_fd = short_socket_path(self.path)
            try:
                sock.connect(reachable)
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)
        except OSError as error:
            sock.close()
            self.end(f"no host listening at {self.path} ({error.strerror or error})")
            return
        self.sock = sock
        self.log(f"teaching: connected to {self.path}; the host says go before each step")

    def pause(self, step: str, syscall: str) -> None:
        """Say what is about to happen, then wait for ``go`` (or give up and go on)."""
        self.connect()
        sock = self.sock
        if self.done or sock is None:
            return
        self.log(f"teaching: about to {step}: {syscall}; waiting for the host's go")
        try:
            sock.sendall(f"about to {step}: {syscall}\n".encode())
            answer = self._read_line(sock)
        except OSError as error:
            self.end(f"the host's channel failed ({error.strerror or error}): going on")
            return
        if answer is None:
            self.end(f"no go within {self.timeout:g} s: going on without pauses")
        elif answer != GO:
            self.end("the host closed the channel: going on without pauses")

    def _read_line(self, sock: socket.socket) -> bytes | None:
        """One line, stripped; b"" at end of file; None when the deadline passed."""
        deadline = time.monotonic() + self.timeout
        line = b""
        while not line.endswith(b"\n") and len(line) < MAX_LINE:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                return None
            chunk = sock.recv(MAX_LINE - len(line))
            if not chunk:
                return b""
            line += chunk
        return line.strip()

    def end(self, why: str) -> None:
        self.log(f"teaching: {why}")
        self.done = True
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class PausingSignals:
    """The stage's kill(-1) sender, pausing before SIGTERM and SIGKILL (not SIGCONT)."""

    def __init__(self, inner: Signals, channel: TeachChannel) -> None:
        self.inner = inner
        self.channel = channel

    def send_all(self, sig: int) -> None:
        if sig in (signal.SIGTERM, signal.SIGKILL):
            name = signal.Signals(sig).name
            self.channel.pause(name, f"kill(-1, {name})")
        self.inner.send_all(sig)

    def reap(self) -> int:
        return self.inner.reap()
