"""Rehearsal sandboxes: a stand-in init as PID 1 of fresh namespaces, to inject into.

A rehearsal runs the real switch against the PID 1 of a :class:`Sandbox` instead of the
host's. The sandbox has new PID, mount, UTS, IPC and network namespaces; its PID 1 is
``injector/rehearsal/standin.py`` (see there for its services), with its own
``/proc``, private mount propagation, hostname ``dboot-rehearsal`` and only a loopback interface.

How it is built, and why:

- **PID 1 is our direct child**, so :meth:`Sandbox.wait` sees its exit status itself, not a
  relay's copy. ``unshare(CLONE_NEWPID)`` does not move the caller, it makes the caller's
  next child PID 1 of a new namespace; and it changes only the calling *thread*. So a
  dedicated owner thread unshares and spawns, which leaves every other thread's children
  where they were. The owner thread then lives exactly as long as PID 1: it blocks in
  ``waitpid`` and records the status.
- The child execs ``setpriv --pdeathsig KILL`` (PID 1 dies with its owner thread, hence
  with our process, even on SIGKILL) and then ``unshare --mount --uts --ipc --net
  --propagation private --mount-proc`` (util-linux; without ``--fork`` it execs in place,
  so the stand-in stays PID 1).
- **Nothing is left behind.** When the PID 1 of a PID namespace dies, the kernel kills
  every other process in it before PID 1 can be reaped; and a mount namespace, with every
  mount in it, is freed with its last process. So ending a sandbox is: SIGKILL our own
  child through a pidfd (no pid-reuse race), reap it, join the console thread.
- **Hermetic** (``initstage/hermetic.py``): PID 1 runs with the capabilities that act
  on the whole machine dropped from its bounding set (``setpriv --bounding-set``), with
  ``container=dboot`` in its environment, in a cgroup of its own made under ours (the
  delegated subtree, :class:`DelegatedCgroup`) and in a cgroup namespace rooted there; the
  stand-in then makes ``/proc/sys`` and ``/sys`` read-only and ``/dev`` minimal in its
  mount namespace. The cgroup is killed and removed when the sandbox ends.
- The child starts a new session, so a Ctrl-C typed at the terminal reaches us and not
  the sandbox; we then kill it on the way out.

Console: ``relay`` gives the sandbox a pty of its own when our stdout is a terminal, and a
thread copies it to our stdout and our stdin to it (what ``dboot rehearse`` shows on the
terminal: see :func:`_open_sandbox_terminal` for why not our terminal itself); otherwise it
inherits our stdin, stdout and stderr. ``capture`` sends stdout+stderr into a pipe read by
a thread (lines go to ``on_line`` and to :meth:`Sandbox.output`), and stdin comes from a
pipe fed by :meth:`Sandbox.send`. ``pty`` gives the sandbox a pty of its own as its
controlling terminal (``setsid --ctty``), hence its ``/dev/console`` too, and relays
nothing: a front-end takes the master end (:meth:`Sandbox.take_terminal`) and reads,
writes and sizes it itself (the wizard's console widget).

``python -m injector.rehearsal.sandbox`` starts one in relay mode and prints its pid, for labs with
``dboot switch --target-pid``.
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import itertools
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Literal, TypeVar

from initstage import hermetic, linux
from initstage.mounts import read_mounts
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal, system_call_failure
from injector.preflight import procinfo
from injector.preflight.procinfo import namespace_of, nspid_chain
from injector.rehearsal import standin

ConsoleMode = Literal["relay", "capture", "pty"]

WNOTHREAD = 0x20000000  # __WNOTHREAD, include/uapi/linux/wait.h; not in the os module
EXIT_STATUS_UNKNOWN = 255
DEFAULT_HOSTNAME = "dboot-rehearsal"
STANDIN_SCRIPT = Path(standin.__file__).resolve()
START_TIMEOUT = 15.0
CONSOLE_DRAIN_TIMEOUT = 5.0
RELAY_IDLE = 0.05
CGROUP_EMPTY_TIMEOUT = 5.0
CGROUP_PREFIX = "dboot-rehearsal-"
STOP_RESEND = 0.2  # seconds between stop signals until the stand-in answers
STOP_ANSWER_MARGIN = 5.0  # past the ceiling, before a silent stand-in is given up on
_cgroup_numbers = itertools.count(1)


# What a rehearsal shares with the host, and what it does not: one sentence for every
# front-end (the engine says it as an info notice when a rehearsal's sandbox starts).
SHARED_WITH_HOST = (
    "a rehearsal shares the host's kernel, CPU, RAM, page cache and the filesystems it"
    " reads; it has its own PID, mount, UTS, IPC, network and cgroup namespaces,"
    " /proc/sys and /sys are read-only, and it can load no kernel module and open no"
    " raw host device"
)


def default_kinds(count: int) -> list[str]:
    """``count`` services: one that ignores SIGTERM, one that makes zombies, then plain ones."""
    return (["stubborn", "zombies"] + ["plain"] * count)[:count]


def pids_in_namespace(kind: str, identity: str) -> list[int]:
    """Every process whose ``kind`` namespace is ``identity``: what a sandbox left behind."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if namespace_of(entry, kind) == identity:
                found.append(int(entry))
        except OSError:  # exited while we looked, or a kernel thread
            continue
    return found


def children_of(pid: int) -> dict[int, str]:
    """Host pid -> comm of every child of ``pid``, zombies included."""
    children = {}
    for child in procinfo.list_pids():
        try:
            stat = procinfo.read_stat(child)
        except procinfo.Unreadable:
            continue
        if stat is not None and stat.ppid == pid:
            children[child] = stat.comm
    return children


def process_state(pid: int) -> str:
    """The one-letter state of a process (``S``, ``R``, ``Z``...), or ``""`` once it is gone."""
    stat = procinfo.read_stat(pid)
    return stat.state if stat is not None else ""


def _unshare_pid_namespace_for_this_thread() -> None:
    with system_call_failure(
        "cannot create a PID namespace",
        "run as root (sudo), outside a container that forbids namespaces",
    ):
        linux.unshare(linux.CLONE_NEWPID)


def _wait_for_exit(process: subprocess.Popen[bytes]) -> tuple[int, int | None]:
    """Block until our child PID 1 exits; its status, 128+N for a death by signal N, and
    that N (None for an exit).

    ``__WNOTHREAD``: wait only as the thread that spawned it. Without it this wait would
    also consume the ptrace stops meant for the injector's thread (a thread waits for the
    children and tracees of its whole process by default), and the injection would stall.
    """
    while True:
        try:
            _, status = os.waitpid(process.pid, WNOTHREAD)
        except ChildProcessError:
            # Reaped by a tracer of ours that saw it die while attached: status unknown.
            status_code, signal_number = EXIT_STATUS_UNKNOWN, None
            break
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            code = os.waitstatus_to_exitcode(status)
            status_code = code if code >= 0 else 128 - code
            signal_number = -code if code < 0 else None
            break
    # Popen must not reap this pid again later: by then it may be another process's.
    process.returncode = status_code
    return status_code, signal_number


@contextlib.contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back KeyboardInterrupt during a short critical section, then deliver it."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers run in the main thread only: nothing can interrupt us here
        return
    caught: list[FrameType | None] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])


def own_cgroup_directory() -> Path:
    """Where our own cgroup v2 directory is (the cgroup2 mount that shows it)."""
    with open("/proc/self/cgroup") as cgroup_file:
        entries = [line.rstrip("\n").split(":", 2) for line in cgroup_file]
    path = next((entry[2] for entry in entries if entry[:2] == ["0", ""]), None)
    for mount in read_mounts():
        root = mount.root.rstrip("/")
        if path is not None and mount.fstype == "cgroup2" and (path + "/").startswith(root + "/"):
            return Path(mount.mount_point) / path[len(root) :].lstrip("/")
    raise EnvironmentFailure(
        "no cgroup v2 hierarchy shows our cgroup: a rehearsal needs one to delegate",
        "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup/unified) or boot with cgroup v2",
    )


class DelegatedCgroup:
    """The rehearsal's cgroup: a child of ours, the root of its cgroup namespace.

    Everything the rehearsed system creates (systemd's slices and scopes) lives under it,
    so ending it is: cgroup.kill, wait until nothing is left in it, remove it bottom-up."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def make(cls) -> DelegatedCgroup:
        """A new one under our own cgroup (after removing what killed rehearsals left)."""
        parent = own_cgroup_directory()
        cls._remove_stale(parent)
        cgroup = cls(parent / f"{CGROUP_PREFIX}{os.getpid()}-{next(_cgroup_numbers)}")
        with system_call_failure(
            f"cannot make the rehearsal's cgroup {cgroup.path}", "run as root, with cgroup v2"
        ):
            cgroup.path.mkdir()
        return cgroup

    @classmethod
    def _remove_stale(cls, parent: Path) -> None:
        """Remove the empty rehearsal cgroups of dboot processes that are gone: one killed
        outright (SIGKILL, a hang-up) had no chance to remove its own."""
        for path in parent.glob(f"{CGROUP_PREFIX}*"):
            owner = path.name.removeprefix(CGROUP_PREFIX).split("-")[0]
            stale = cls(path)
            if owner.isdigit() and not Path(f"/proc/{owner}").exists() and not stale.populated():
                with contextlib.suppress(EnvironmentFailure):
                    stale.remove()

    def populated(self) -> bool:
        try:
            events = (self.path / "cgroup.events").read_text()
        except FileNotFoundError:
            return False
        return "populated 1" in events.splitlines()

    def remove(self) -> None:
        """Kill what is left in it and remove it with its subtree. Idempotent."""
        if not self.path.exists():
            return
        with contextlib.suppress(OSError):  # no cgroup.kill before Linux 5.14
            (self.path / "cgroup.kill").write_text("1")
        deadline = time.monotonic() + CGROUP_EMPTY_TIMEOUT
        while self.populated() and time.monotonic() < deadline:
            time.sleep(0.01)
        for here, _subdirs, _files in sorted(os.walk(self.path), key=lambda w: -len(w[0])):
            with system_call_failure(
                f"cannot remove the rehearsal's cgroup {here}",
                "see which processes are still in it (cgroup.procs) and end them",
            ):
                os.rmdir(here)


SandboxT = TypeVar("SandboxT", bound="Sandbox")  # typing.Self, which Python 3.9 lacks


class Sandbox:
    """A stand-in init as PID 1 of new PID, mount, UTS, IPC and network namespaces.

    ``with Sandbox() as sandbox:`` starts it (``sandbox.pid``; ``start()`` returns the same
    pid); leaving the block, by any path, kills the sandbox and everything in it.
    """

    # The stand-in's command line after ``python -I -S``, ``idle`` one of its modes; tests
    # name one with their own modes and hooks added (``tests/sandbox/parking.py``).
    program: Sequence[str] = (str(STANDIN_SCRIPT),)

    def __init__(
        self,
        services: int = 3,
        console: ConsoleMode = "capture",
        *,
        on_line: Callable[[str], None] | None = None,
        kinds: Sequence[str] | None = None,
        idle: str = "wait",
        hostname: str = DEFAULT_HOSTNAME,
        zombie_period: float = 0.2,
        python: str = sys.executable,
    ) -> None:
        """``kinds`` overrides ``services`` with an explicit list of service kinds
        (``stubborn``, ``zombies``, ``plain``), e.g. 50 plain ones for a downtime bench."""
        self.kinds = list(kinds) if kinds is not None else default_kinds(services)
        if services < 0 or any(kind not in standin.SERVICE_KINDS for kind in self.kinds):
            raise BadInput(
                f"bad sandbox services {services} {self.kinds}",
                f"use a count >= 0 or kinds from {', '.join(standin.SERVICE_KINDS)}",
            )
        if console not in ("relay", "capture", "pty"):
            raise BadInput(f"unknown console mode {console!r}", "use 'relay', 'capture' or 'pty'")
        self.console: ConsoleMode = console
        self.idle = idle
        self.hostname = hostname
        self.zombie_period = zombie_period
        self.python = python
        self._on_line = on_line

        self._pid: int | None = None
        self._pidfd: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self.cgroup: DelegatedCgroup | None = None
        self._status: int | None = None
        # The signal that ended PID 1, None when it exited (or its status is unknown).
        self.exit_signal: int | None = None
        self._started = False
        self._spawned = threading.Event()  # the owner thread tried: _pidfd is set or it failed
        self._exited = threading.Event()
        self._owner: threading.Thread | None = None
        self._relay: threading.Thread | None = None
        # relay mode on a terminal, and pty mode: the sandbox pty's master
        self._terminal: int | None = None
        self._text: list[str] = []
        self._lines: list[str] = []
        self._console_changed = threading.Condition()
        self._console_closed = False
        self.pid_namespace = ""
        # Our end of the stand-in's control socket: its stop orders (see stop_services).
        self._control: socket.socket | None = None

    # -- lifetime -------------------------------------------------------------------------

    def __enter__(self: SandboxT) -> SandboxT:
        """Start the sandbox (if :meth:`start` was not called yet)."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> int:
        """Start the sandbox; return the host pid of its PID 1 once the services run.

        Starting a started sandbox returns its pid; a sandbox is started only once."""
        if self._started:
            return self.pid
        if self._owner is not None:
            raise BadInput("this sandbox already ended or failed to start", "use a new Sandbox")
        try:
            pid = self._start()
        except BaseException:
            self.close()
            raise
        self._started = True
        return pid

    def _start(self) -> int:
        self.cgroup = DelegatedCgroup.make()
        ready_read, ready_write = os.pipe()
        self._control, standin_control = socket.socketpair()
        failure: list[BaseException] = []

        def own() -> None:
            try:
                _unshare_pid_namespace_for_this_thread()
                process = self._spawn(ready_write, standin_control.fileno())
                try:
                    self._pidfd = os.pidfd_open(process.pid)
                except OSError:
                    process.kill()  # our unreaped child: no pid-reuse race here
                    process.wait()
                    raise
                self._process, self._pid = process, process.pid
            except BaseException as error:
                failure.append(error)
                return
            finally:
                os.close(ready_write)
                standin_control.close()
                self._spawned.set()
            self._status, self.exit_signal = _wait_for_exit(process)
            self._exited.set()

        try:
            # A Ctrl-C inside Thread.start() could leave a thread running that close() cannot
            # join: it waits until both threads run and PID 1 exists (a few milliseconds).
            with _sigint_deferred():
                self._owner = threading.Thread(target=own, name="dboot-sandbox-owner", daemon=True)
                self._owner.start()
                self._spawned.wait()
                if failure:
                    raise failure[0]
                relay = self.console == "relay" and self._terminal is not None
                if self.console == "capture" or relay:
                    capture = self.console == "capture"
                    self._relay = threading.Thread(
                        target=self._read_console if capture else self._relay_terminal,
                        name="dboot-sandbox-console",
                        daemon=True,
                    )
                    self._relay.start()
            self._await_ready(ready_read)
        finally:
            os.close(ready_read)
        return self._check_isolated()

    def _spawn(self, ready_fd: int, control_fd: int) -> subprocess.Popen[bytes]:
        assert self.cgroup is not None
        dropped = ",".join(f"-{name}" for name in hermetic.DROPPED_CAPABILITIES)
        argv = [
            "setpriv", "--pdeathsig", "KILL", "--inh-caps", "-all", "--bounding-set", dropped,
            "--",
            # pty: a session of its own whose controlling terminal is the pty on its stdin,
            # so that a shell as PID 1 gets job control and ^C; Popen makes no ctty itself.
            *(["setsid", "--ctty", "--"] if self.console == "pty" else []),
            "unshare", "--mount", "--uts", "--ipc", "--net",
            "--propagation", "private", "--mount-proc", "--",
            self.python, "-I", "-S", *self.program,
            "--hostname", self.hostname,
            "--services", ",".join(self.kinds),
            "--zombie-period", str(self.zombie_period),
            "--idle", self.idle,
            "--ready-fd", str(ready_fd),
            "--control-fd", str(control_fd),
            "--cgroup", str(self.cgroup.path),
        ]  # fmt: skip
        capture = self.console == "capture"
        stdin: int | None = subprocess.PIPE if capture else None
        stdout: int | None = subprocess.PIPE if capture else None
        stderr: int | None = subprocess.STDOUT if capture else None
        terminal_end = None
        if self.console == "pty" or (self.console == "relay" and os.isatty(1)):
            self._terminal, terminal_end = _open_sandbox_terminal(echo=self.console == "pty")
            stdin = stdout = stderr = terminal_end
        try:
            return subprocess.Popen(
                argv,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                pass_fds=(ready_fd, control_fd),
                start_new_session=self.console != "pty",  # pty: setsid --ctty does it
                env={**os.environ, hermetic.CONTAINER_VARIABLE: hermetic.CONTAINER_NAME},
            )
        except OSError as error:
            raise EnvironmentFailure(
                f"cannot start the sandbox: {error}", "install util-linux (setpriv, unshare)"
            ) from error
        finally:
            if terminal_end is not None:
                os.close(terminal_end)

    def _await_ready(self, ready_read: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([ready_read], [], [], left)
            if readable:
                if os.read(ready_read, 64).decode().strip() == standin.READY_LINE:
                    self._await_idle(deadline)
                    return
                break  # EOF: the stand-in died before it was ready
        if self._exited.wait(1.0):
            tail = " | ".join(self.output().strip().splitlines()[-3:])
            raise EnvironmentFailure(
                f"the sandbox exited with status {self.wait()} before it was ready"
                + (f" ({tail})" if tail else ""),
                "check that util-linux and namespaces work here: unshare --pid --fork true",
            )
        raise EnvironmentFailure(
            f"the sandbox was not ready after {START_TIMEOUT:.0f} s", "check the machine's load"
        )

    def _await_idle(self, deadline: float) -> None:
        """Return once PID 1 sleeps: after its ready line, the only place it sleeps is its
        idle syscall, so an injector started now finds it there, not on the way."""
        while process_state(self.pid) not in ("S", "") and time.monotonic() < deadline:
            time.sleep(0.001)

    def _check_isolated(self) -> int:
        """SAFETY: the pid we hand out must be PID 1 of a namespace that is not ours."""
        pid = self.pid
        self.pid_namespace = namespace_of(pid, "pid")
        if pid == 1 or self.pid_namespace == namespace_of("self", "pid"):
            raise SafetyRefusal(
                f"the sandbox (pid {pid}) shares our PID namespace", "this is a bug: report it"
            )
        if nspid_chain(pid)[-1] != 1:
            raise SafetyRefusal(
                f"the sandbox (pid {pid}) is not PID 1 of its namespace", "this is a bug: report it"
            )
        # Its own cgroup namespace keeps systemd off the host's tree; its own network
        # namespace keeps the stage's network restore (initstage/netkeep.py) off the host's.
        for kind in ("cgroup", "net"):
            if namespace_of(pid, kind) == namespace_of("self", kind):
                raise SafetyRefusal(
                    f"the sandbox (pid {pid}) shares our {kind} namespace",
                    "this is a bug: report it",
                )
        return pid

    def close(self) -> None:
        """Kill the sandbox (SIGKILL to PID 1 ends its whole namespace), reap it, and join the
        console thread. Idempotent; safe after a failed or interrupted start."""
        if self._owner is not None:
            # A Ctrl-C may have cut start() short while the owner thread was still spawning.
            self._spawned.wait()
        if self._pidfd is not None:
            try:
                if not self._exited.is_set():
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass  # already dead
            self._exited.wait()
            os.close(self._pidfd)
            self._pidfd = None
        if self._owner is not None:
            self._owner.join()
        if self.cgroup is not None:
            self.cgroup.remove()
        self._join_console()
        if self._process is not None and self._process.stdin is not None:
            self._process.stdin.close()
        if self._control is not None:
            self._control.close()
            self._control = None

    # -- state ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        """Host pid of the sandbox's PID 1."""
        if self._pid is None:
            raise BadInput("the sandbox is not started", "call start() first")
        return self._pid

    def wait(self, timeout: float | None = None) -> int:
        """Exit status of the sandbox's PID 1; 128+N when signal N killed it, like a shell.

        Raises TimeoutError when it is still running after ``timeout`` seconds."""
        if self._owner is None:
            raise BadInput("the sandbox is not started", "call start() first")
        if not self._exited.wait(timeout):
            raise TimeoutError(f"the sandbox (pid {self._pid}) still runs after {timeout} s")
        self._join_console()
        assert self._status is not None
        return self._status

    def running(self) -> bool:
        return self._owner is not None and not self._exited.is_set()

    def services(self) -> dict[int, str]:
        """Host pid -> kind of the stand-in's services still alive (zombies excluded)."""
        found = {}
        for child, comm in children_of(self.pid).items():
            if comm.startswith("svc-") and process_state(child) not in ("Z", ""):
                found[child] = comm.removeprefix("svc-")
        return found

    def service_pids(self) -> list[int]:
        """Host pids of the stand-in's services."""
        return sorted(self.services())

    def stop_services(self, ceiling: float) -> Iterator[str]:
        """Give the stand-in its stop order (see ``standin``): its answer, line by line as
        it comes, up to its last, ``done SECONDS``. The signal is sent again every
        ``STOP_RESEND`` seconds until the first answer: one that lands just before PID 1
        enters its wait is only acted on when the next one interrupts that wait."""
        if self._control is None or self._pidfd is None:
            raise BadInput("the sandbox is not started", "call start() first")
        self._control.sendall(f"stop {ceiling:.3f}\n".encode())
        deadline = time.monotonic() + ceiling + STOP_ANSWER_MARGIN
        pending, answered = b"", False
        while time.monotonic() < deadline:
            if not answered:
                signal.pidfd_send_signal(self._pidfd, standin.STOP_SIGNAL)
            readable, _, _ = select.select([self._control], [], [], STOP_RESEND)
            if not readable:
                continue
            chunk = self._control.recv(4096)
            if not chunk:
                return  # the stand-in is gone
            answered = True
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                yield line.decode(errors="replace")
                if line.startswith(b"done"):
                    return
        raise EnvironmentFailure(
            f"the sandbox's stand-in did not finish its stop order within {ceiling:.1f} s",
            "check the machine's load, or rehearse with --stop=signal",
        )

    # -- console --------------------------------------------------------------------------

    def _read_console(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""
        try:
            while chunk := os.read(self._process.stdout.fileno(), 65536):
                text = decoder.decode(chunk)
                *complete, partial = (partial + text).split("\n")
                self._publish(text, complete)
            self._publish(decoder.decode(b"", final=True), [partial] if partial else [])
        finally:
            with self._console_changed:
                self._console_closed = True
                self._console_changed.notify_all()
            self._process.stdout.close()

    def _publish(self, text: str, lines: list[str]) -> None:
        with self._console_changed:
            self._text.append(text)
            self._lines.extend(lines)
            self._console_changed.notify_all()
        if self._on_line is not None:
            for line in lines:
                self._on_line(line)

    def _relay_terminal(self) -> None:
        """Copy the sandbox's terminal to our stdout and our stdin to it, until the sandbox
        has ended and its terminal has nothing more to say."""
        assert self._terminal is not None
        terminal = self._terminal
        sources = [terminal, 0]
        while True:
            readable, _, _ = select.select(sources, [], [], RELAY_IDLE)
            if terminal in readable:
                try:
                    data = os.read(terminal, 65536)
                except OSError:  # EIO: no process holds the sandbox's end just now
                    data = b""
                if data:
                    try:
                        _write_all(1, data)
                    except OSError:
                        return  # our own terminal is gone: dboot says so itself
                    continue
                if self._exited.is_set():
                    return
                # A hang-up (a getty's) until someone opens the console again.
                time.sleep(RELAY_IDLE)
            elif not readable and self._exited.is_set():
                return  # drained
            if 0 in readable:
                typed = os.read(0, 4096)
                if typed:
                    with contextlib.suppress(OSError):
                        _write_all(terminal, typed)
                else:
                    sources.remove(0)

    def _join_console(self) -> None:
        if self._relay is not None:
            self._relay.join(CONSOLE_DRAIN_TIMEOUT)
        relaying = self._relay is not None and self._relay.is_alive()
        if self._terminal is not None and self._exited.is_set() and not relaying:
            os.close(self._terminal)
            self._terminal = None

    def take_terminal(self) -> int:
        """pty mode: a descriptor of the sandbox pty's master end, for the caller to read,
        write, size (TIOCSWINSZ) and close; reads fail with EIO once the sandbox has ended."""
        if self.console != "pty" or self._terminal is None:
            raise BadInput("this sandbox has no pty console", "use console='pty'")
        return os.dup(self._terminal)

    def output(self) -> str:
        """Everything the sandbox wrote so far (capture mode), partial last line included."""
        with self._console_changed:
            return "".join(self._text)

    def console_lines(self, timeout: float | None = None) -> Iterator[str]:
        """Console lines from the first one on, as they arrive, until the console closes
        (or nothing arrives for ``timeout`` seconds)."""
        index = 0
        while True:
            with self._console_changed:
                arrived = self._console_changed.wait_for(self._more_than(index), timeout)
                batch = self._lines[index:]
                finished = self._console_closed or not arrived
            index += len(batch)
            yield from batch
            if finished and not batch:
                return

    def _more_than(self, seen: int) -> Callable[[], bool]:
        return lambda: len(self._lines) > seen or self._console_closed

    def send(self, text: str) -> None:
        """Write ``text`` to the sandbox's stdin (capture mode)."""
        stdin = self._stdin()
        stdin.write(text.encode())
        stdin.flush()

    def close_stdin(self) -> None:
        """End of file on the sandbox's stdin (capture mode)."""
        self._stdin().close()

    def _stdin(self) -> IO[bytes]:
        if self._process is None or self._process.stdin is None:
            raise BadInput("this sandbox has no stdin pipe", "use console='capture'")
        return self._process.stdin


def _open_sandbox_terminal(*, echo: bool) -> tuple[int, int]:
    """A pty of the sandbox's own, sized like ours: (our master end, the sandbox's end).

    The rehearsed system never gets our terminal itself: a getty on its console takes the
    terminal as its controlling one (TIOCSCTTY with CAP_SYS_ADMIN) and hangs it up when it
    exits, which would cut the user's shell off. Relayed, its end does not echo, as our own
    terminal already echoes what is typed (line by line: Ctrl-C stays ours); a front-end
    that sends keys one by one (pty mode) needs the echo."""
    master, sandbox_end = pty.openpty()
    with contextlib.suppress(OSError):
        fcntl.ioctl(sandbox_end, termios.TIOCSWINSZ, fcntl.ioctl(1, termios.TIOCGWINSZ, b"\0" * 8))
    if not echo:
        attributes = termios.tcgetattr(sandbox_end)
        attributes[3] &= ~termios.ECHO
        termios.tcsetattr(sandbox_end, termios.TCSANOW, attributes)
    return master, sandbox_end


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]


def main() -> None:
    """``python -m injector.rehearsal.sandbox [SERVICES]``: a sandbox to aim ``--target-pid`` at."""
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with Sandbox(count, console="relay") as sandbox:
        pid = sandbox.start()
        print(f"sandbox PID 1 is host pid {pid}; Ctrl-C ends it", file=sys.stderr, flush=True)
        try:
            status = sandbox.wait()
        except KeyboardInterrupt:
            return
    sys.exit(status)


if __name__ == "__main__":
    main()
