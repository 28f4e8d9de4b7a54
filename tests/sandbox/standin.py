"""A stand-in PID 1 for the injection tests: a tiny ``python -I -S`` script that runs as
PID 1 of a PID (and mount) namespace created for it, never the machine's own PID 1.

The script talks to the test over two pipes: it reads ``IN`` and writes ``OUT`` (their fd
numbers arrive as argv[1] and argv[2]) and a ``say()`` helper is predefined. It must
``say("<ready>")`` once it is set up.

Cleanup kills only the pids started here: the namespace's PID 1 (which takes the whole
namespace with it) and the ``unshare`` process that waits for it.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

from initstage import linux
from injector.preflight import procinfo

PROLOGUE = """\
import ctypes, os, signal, sys
IN, OUT = int(sys.argv[1]), int(sys.argv[2])
def say(text):
    os.write(OUT, text.encode() if isinstance(text, str) else text)
libc = ctypes.CDLL(None, use_errno=True)
"""


def syscall_in_progress(pid: int) -> int | None:
    """The number of the system call ``pid`` is blocked in, per /proc/PID/syscall."""
    first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    return None if first == "running" else int(first)


def ns_pid(pid: int) -> int:
    """``pid``'s number inside its own PID namespace (NSpid's last field)."""
    return procinfo.nspid_chain(pid)[-1]


class StandIn:
    """``with StandIn(script) as init:`` — ``init.pid`` is the host pid of the namespace's PID 1."""

    def __init__(self, script: str, ready_timeout: float = 10.0) -> None:
        self.script = PROLOGUE + script
        self.ready_timeout = ready_timeout
        self.pid = 0
        self._unshare: subprocess.Popen[bytes] | None = None
        self._to_init: int | None = None
        self._from_init: int | None = None
        self._buffer = b""
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())

    def __enter__(self) -> StandIn:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> int:
        in_read, self._to_init = os.pipe()
        self._from_init, out_write = os.pipe()
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        command = [unshare, "--pid", "--fork", "--kill-child", "--mount", "--mount-proc"]
        command += [sys.executable, "-I", "-S", "-c", self.script, str(in_read), str(out_write)]
        try:
            # stderr to a file: tracebacks end up in failure messages, and util-linux
            # 2.38's "sigprocmask unblock failed" (after SIGKILL of its child) stays quiet.
            self._unshare = subprocess.Popen(
                command,
                pass_fds=(in_read, out_write),
                # If the test process dies, so does unshare (and, through --kill-child,
                # the whole namespace).
                preexec_fn=linux.die_with_parent,
                stderr=self._stderr,
            )
        finally:
            os.close(in_read)
            os.close(out_write)
        self.read_until(b"<ready>", self.ready_timeout)
        self.pid = self._find_init()
        return self.pid

    def _find_init(self) -> int:
        """The host pid of unshare's child: PID 1 of the new namespace."""
        assert self._unshare is not None
        children = Path(f"/proc/{self._unshare.pid}/task/{self._unshare.pid}/children")
        (pid,) = (int(word) for word in children.read_text().split())
        if ns_pid(pid) != 1:
            raise AssertionError(f"PID {pid} is not PID 1 of its namespace")
        return pid

    # -- talking to it

    def send(self, data: bytes) -> None:
        assert self._to_init is not None
        os.write(self._to_init, data)

    def read_until(self, token: bytes, timeout: float = 5.0) -> bytes:
        """Everything the stand-in said up to and including ``token``."""
        assert self._from_init is not None
        deadline = time.monotonic() + timeout
        while token not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_init], [], [], remaining)[0]:
                raise TimeoutError(f"stand-in did not say {token!r}; {self._said()}")
            chunk = os.read(self._from_init, 65536)
            if not chunk:
                raise EOFError(f"stand-in closed its pipe; {self._said()}")
            self._buffer += chunk
        end = self._buffer.index(token) + len(token)
        said, self._buffer = self._buffer[:end], self._buffer[end:]
        return said

    def _said(self) -> str:
        return f"it said {self._buffer!r}, stderr: {self.stderr()!r}"

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def echo(self, data: bytes, timeout: float = 5.0) -> bytes:
        """Send ``data`` and return what came back, up to the same number of bytes."""
        self.send(data)
        return self.read_until(data, timeout)

    def wait_blocked_in(self, nr: int, timeout: float = 5.0) -> None:
        """Wait until the stand-in sits in system call ``nr`` (it may still be starting)."""
        deadline = time.monotonic() + timeout
        while syscall_in_progress(self.pid) != nr:
            if time.monotonic() > deadline:
                raise TimeoutError(f"PID {self.pid} is not blocked in syscall {nr}")
            time.sleep(0.01)

    # -- cleanup: only our own pids

    def stop(self) -> None:
        if self.pid and self._unshare is not None and _parent_of(self.pid) == self._unshare.pid:
            _kill(self.pid)
        if self._unshare is not None:
            try:
                self._unshare.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill(self._unshare.pid)
                self._unshare.wait(timeout=5)
            self._unshare = None
        for fd in (self._to_init, self._from_init):
            if fd is not None:
                os.close(fd)
        self._to_init = self._from_init = None
        self.pid = 0
        self._stderr.close()


def _parent_of(pid: int) -> int | None:
    stat = procinfo.read_stat(pid)
    return stat.ppid if stat is not None else None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- stand-in bodies, each idling in a known way ----------------------------------------

# read(2) on the IN pipe through libc, so that any error, EINTR included, is seen and told
# ("<error N>") instead of being retried by Python. Echoes what it reads; SIGUSR1 says so.
READ_ECHO = """\
signal.signal(signal.SIGUSR1, lambda *_: say("<usr1>"))
buf = ctypes.create_string_buffer(65536)
say("<ready>")
while True:
    n = libc.read(IN, buf, 65536)
    if n < 0:
        say("<error %d>" % ctypes.get_errno())
        continue
    if n == 0:
        break
    say(buf.raw[:n])
"""

# epoll_wait(2) through libc on the IN pipe, then read and echo.
EPOLL_ECHO = """\
epfd = libc.epoll_create1(0)
libc.epoll_ctl(epfd, 1, IN, (ctypes.c_uint32 * 4)(1, 0, 0, 0))  # EPOLL_CTL_ADD, EPOLLIN
ready = (ctypes.c_uint32 * 4)()
say("<ready>")
while True:
    if libc.epoll_wait(epfd, ready, 1, -1) < 0:
        say("<error %d>" % ctypes.get_errno())
        continue
    say(os.read(IN, 65536))
"""

# wait4(2) for a child that blocks on the pipe.
WAIT4 = """\
child = os.fork()
if child == 0:
    os.read(IN, 1)
    os._exit(0)
say("<ready>")
os.waitpid(child, 0)
"""

# A relative nanosleep: interrupted, the kernel restarts it through restart_syscall.
SLEEP_RELATIVE = """\
say("<ready>")
libc.nanosleep(ctypes.byref((ctypes.c_long * 2)(3600, 0)), None)
"""

# time.sleep: an absolute clock_nanosleep, which restarts as itself.
SLEEP_ABSOLUTE = """\
import time
say("<ready>")
time.sleep(3600)
"""

# Spinning in userspace, with a getpid(2) now and then.
BUSY = """\
say("<ready>")
while True:
    for _ in range(20000):
        pass
    os.getpid()
"""

# Spinning in userspace without ever making a system call.
SPIN = """\
say("<ready>")
while True:
    pass
"""
