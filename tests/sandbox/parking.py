"""Park the one stand-in init (``injector/rehearsal/standin.py``, with the injection tests'
modes: ``tests/sandbox/parked.py``) as PID 1 of a PID namespace created for it, never the
machine's own PID 1, and talk to it; or run it as the PID 1 of a rehearsal sandbox.

``with StandIn(READ_ECHO) as init:`` starts it; ``init.pid`` is its host pid. Its stdin and
stdout are the test's pipes (``send``, ``read_until``, ``echo``). It has its own PID, mount,
UTS and IPC namespaces (it names its system and makes its mounts hermetic, as in a rehearsal).

Cleanup kills only the pids started here: the namespace's PID 1 (which takes the whole
namespace with it) and the ``unshare`` process that waits for it.

``ParkedSandbox`` is the rehearsal's :class:`Sandbox` with this program as its PID 1, for the
tests that use its hooks: ``idle="read"`` (``send("run ...")``, ``send("exit N")``) and
:meth:`ParkedSandbox.request_exit`.
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
from injector.rehearsal import standin
from injector.rehearsal.sandbox import Sandbox
from tests.sandbox import parked
from tests.sandbox.parked import (
    BUSY,
    EPOLL_ECHO,
    EXIT_ON_SIGUSR1,
    READ_ECHO,
    READY,
    SLEEP_ABSOLUTE,
    SLEEP_RELATIVE,
    SPIN,
    WAIT4,
)

# The parking modes are the tests' names for how the stand-in idles.
__all__ = [
    "BUSY",
    "EPOLL_ECHO",
    "EXIT_ON_SIGUSR1",
    "READ_ECHO",
    "SLEEP_ABSOLUTE",
    "SLEEP_RELATIVE",
    "SPIN",
    "WAIT4",
    "ParkedSandbox",
    "StandIn",
    "ns_pid",
    "syscall_in_progress",
]

# ``python -I -S -c BOOT``: the stand-in's own imports only, from wherever the engine is.
BOOT = (
    "import sys; sys.path[:0] = sys.argv[1:3]; del sys.argv[1:3]; "
    "from tests.sandbox.parked import main; main()"
)
ENGINE_PARENT = str(Path(standin.__file__).resolve().parents[2])  # holds injector/, initstage/
TESTS_PARENT = str(Path(parked.__file__).resolve().parents[2])  # holds tests/
PARKED_PROGRAM = ("-c", BOOT, ENGINE_PARENT, TESTS_PARENT)
HOSTNAME = "dboot-parked"
REPEAT_SIGNAL_EVERY = 0.05
# wait4 needs a child to wait for: one service that just waits for signals.
SERVICES = {WAIT4: "plain"}


def syscall_in_progress(pid: int) -> int | None:
    """The number of the system call ``pid`` is blocked in, per /proc/PID/syscall."""
    first = Path(f"/proc/{pid}/syscall").read_text().split()[0]
    return None if first == "running" else int(first)


def ns_pid(pid: int) -> int:
    """``pid``'s number inside its own PID namespace (NSpid's last field)."""
    return procinfo.nspid_chain(pid)[-1]


class StandIn:
    """``with StandIn(mode) as init:`` — ``init.pid`` is the host pid of the namespace's PID 1."""

    def __init__(self, mode: str, ready_timeout: float = 10.0) -> None:
        self.mode = mode
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
        ready_read, ready_write = os.pipe()
        unshare = shutil.which("unshare") or "/usr/bin/unshare"
        # --uts and --mount: the stand-in names its system and remounts /sys and /dev.
        command = [
            unshare, "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc", "--mount-proc",
            sys.executable, "-I", "-S", *PARKED_PROGRAM,
            "--idle", self.mode, "--services", SERVICES.get(self.mode, ""),
            "--hostname", HOSTNAME, "--ready-fd", str(ready_write),
        ]  # fmt: skip
        try:
            # stderr to a file: tracebacks end up in failure messages, and util-linux
            # 2.38's "sigprocmask unblock failed" (after SIGKILL of its child) stays quiet.
            self._unshare = subprocess.Popen(
                command,
                stdin=in_read,
                stdout=out_write,
                pass_fds=(ready_write,),
                # If the test process dies, so does unshare (and, through --kill-child,
                # the whole namespace).
                preexec_fn=linux.die_with_parent,
                stderr=self._stderr,
            )
        finally:
            os.close(in_read)
            os.close(out_write)
            os.close(ready_write)
        try:
            self._await_ready_line(ready_read)
        finally:
            os.close(ready_read)
        self.read_until(READY, self.ready_timeout)
        self.pid = self._find_init()
        return self.pid

    def _await_ready_line(self, ready_read: int) -> None:
        """The stand-in's own ready line: its services run (its ``<ready>`` comes next)."""
        if not select.select([ready_read], [], [], self.ready_timeout)[0]:
            raise TimeoutError(f"stand-in was not ready; {self._said()}")
        if os.read(ready_read, 64).decode().strip() != standin.READY_LINE:
            raise EOFError(f"stand-in died before it was ready; {self._said()}")

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


class ParkedSandbox(Sandbox):
    """A rehearsal sandbox whose PID 1 is the stand-in with the tests' modes and hooks."""

    program = PARKED_PROGRAM

    def request_exit(self, timeout: float = 5.0) -> int:
        """Make the stand-in exit with ``EXIT_ON_SIGUSR1`` (its hook); its status.

        A SIGUSR1 that lands just before the stand-in enters ``wait4`` is only acted upon
        once something interrupts that ``wait4`` (Python runs handlers between bytecodes),
        so the signal is repeated until PID 1 is gone. Only the stand-in has this hook: an
        injected PID 1 ignores SIGUSR1 and this raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while self._pidfd is not None and not self._exited.wait(REPEAT_SIGNAL_EVERY):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the sandbox (pid {self._pid}) ignored SIGUSR1")
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGUSR1)
        return self.wait(max(deadline - time.monotonic(), 0))


def _parent_of(pid: int) -> int | None:
    stat = procinfo.read_stat(pid)
    return stat.ppid if stat is not None else None


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
