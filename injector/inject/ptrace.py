"""Make a PID 1 call execve() on our behalf, or leave it exactly as it was.

The sequence, for one target and all from the calling thread (ptrace belongs to the thread
that attached):

1. ``PTRACE_SEIZE`` with TRACESYSGOOD|TRACEEXEC, then ``PTRACE_INTERRUPT``. No EXITKILL:
   if this process dies half-way, the kernel detaches and PID 1 lives on.
2. Step with ``PTRACE_SYSCALL`` to a confirmed syscall-*entry* stop (``PTRACE_GET_SYSCALL_INFO``
   says which side of the call a stop is on). Signals that arrive meanwhile are handed back
   to the target; group-stops and our own interrupt stop are stepped over.
3. Save the registers and the stack bytes below the red zone, write path, argv and envp
   there, and swap the system call for execve.
4. Step to the other side. An exec event means it worked: detach. A syscall-exit stop means
   execve failed: put the bytes and the registers back with the instruction pointer moved
   back over the system call instruction, so that the target re-runs the call it was about
   to make, then detach. It never sees an error.

The commit point is the register swap in step 3. Before it, an error or an ending signal
(held back meanwhile, and looked for just before the swap) puts everything back and
detaches. From it on, the run is committed: we wait for the exec event or the exit stop
with no deadline (``on_wait`` hears how long), and a failed restore is retried with the
target kept stopped, never detached while its registers point into our block.

Killed outright (SIGKILL) at any moment, the kernel detaches us and the target goes on from
where it stands: before the swap it re-runs its own call (our bytes lie below the red zone,
dead by the ABI); after it, it executes our execve. So the caller must have everything that
execve needs (the RAM root, the plan) in place before calling ``inject_execve``.

``procinfo.ptrace_permission`` decides whether we may attach.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from ptrace.binding.func import ptrace as raw_ptrace
from ptrace.debugger.memory_mapping import readProcessMappings
from ptrace.error import PtraceError

from injector import labmode
from injector.errors import BadInput, EnvironmentFailure
from injector.events import Injection
from injector.inject import arch as archmod
from injector.inject.arch import Arch, RegisterEdit
from injector.inject.ptrace_ext import (
    NT_PRSTATUS,
    PTRACE_DETACH,
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_STOP,
    PTRACE_GET_SYSCALL_INFO,
    PTRACE_GETREGSET,
    PTRACE_INTERRUPT,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_SEIZE,
    PTRACE_SETREGSET,
    PTRACE_SYSCALL,
    PTRACE_SYSCALL_INFO_ENTRY,
    PTRACE_SYSCALL_INFO_EXIT,
    REQUEST_NAMES,
    WAIT_ALL,
    Iovec,
    SyscallInfo,
)
from injector.preflight import procinfo
from injector.signals import EndingSignal, pending_call_off, signals_deferred
from injector.teach import (
    Pause,
    PauseHook,
    RegisterRow,
    entry_stop_call,
    execve_call,
    interrupt_call,
    register_rows,
    seize_call,
    swap_call,
)
from injector.testhooks import pause_point

# TRACESYSGOOD: syscall stops report SIGTRAP|0x80, unlike a real SIGTRAP;
# TRACEEXEC: a successful execve stops with PTRACE_EVENT_EXEC.
SEIZE_OPTIONS = PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACEEXEC
SYSCALL_STOP_SIGNAL = signal.SIGTRAP | 0x80

# Lab mode: the CLI contract's switch for "never touch this machine's PID 1".

MAX_EXEC_BLOCK = 64 * 1024  # path+argv+envp; far below any stack, far above any init line
ENTRY_TIMEOUT = 10.0  # seconds for the target to reach a system call
# execve itself has no deadline (a slow disk, a network filesystem): once the swap is in,
# giving up would leave PID 1 in our execve anyway. The wait is reported this often instead.
EXEC_WAIT_REPORT_EVERY = 2.0
RESTORE_RETRY_PAUSE = 0.5  # seconds between attempts to put the registers back

Log = Callable[[str], None]
WaitReport = Callable[[float], None]  # seconds spent so far waiting for execve


@dataclasses.dataclass
class InjectionReport:
    """What the injector did, for ``--json`` and the wizard's teaching panel."""

    pid: int
    arch: str
    interrupted_syscall: str  # what the target was blocked in (or about to call)
    registers_before: dict[str, int]  # at the syscall-entry stop
    registers_after: dict[str, int]  # as swapped for execve, or as restored by the rollback
    elapsed_ms: float  # seize to detach
    replaced_syscall: str = ""  # the call execve took the place of (restart_syscall ...)
    outcome: Literal["executed", "rolled-back"] = "executed"
    error: str = ""  # execve's errno name on a rollback
    reinjected_signals: list[str] = dataclasses.field(default_factory=list)
    scratch_address: int = 0
    scratch_bytes: int = 0

    def to_event(self) -> Injection:
        return Injection(
            pid=self.pid,
            arch=self.arch,
            interrupted_syscall=self.interrupted_syscall,
            registers_before=dict(self.registers_before),
            registers_after=dict(self.registers_after),
            elapsed_ms=self.elapsed_ms,
            replaced_syscall=self.replaced_syscall,
            outcome=self.outcome,
        )


class InjectionRolledBack(EnvironmentFailure):
    """execve failed inside the target; its memory and registers were put back."""

    def __init__(self, cause: str, fix: str | None, report: InjectionReport) -> None:
        super().__init__(cause, fix)
        self.report = report


# --- the raw system call ---------------------------------------------------------------
# python-ptrace's raw binding: its higher layers (PtraceProcess) know neither PTRACE_SEIZE
# nor PTRACE_INTERRUPT nor other regsets, so every request goes through this one plain call.


def _ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """ptrace(2), raising OSError (with the request's name) on failure.

    Every ptrace call of this module goes through here: the lab-mode test replaces it to
    prove that a refusal happens before any of them.
    """
    try:
        result: int = raw_ptrace(request, pid, addr, data)
    except PtraceError as error:
        code = error.errno or errno.EIO
        name = REQUEST_NAMES.get(request, hex(request))
        raise OSError(code, f"{name}({pid}): {os.strerror(code)}") from None
    return result


@dataclasses.dataclass(frozen=True)
class _Stop:
    """One waitpid() status of the tracee, decoded."""

    status: int

    @property
    def gone(self) -> bool:
        return os.WIFEXITED(self.status) or os.WIFSIGNALED(self.status)

    @property
    def signal(self) -> int:
        return os.WSTOPSIG(self.status)

    @property
    def event(self) -> int:
        return (self.status >> 16) & 0xFF

    @property
    def is_syscall(self) -> bool:
        # Only TRACESYSGOOD's SIGTRAP|0x80 is a syscall stop; a plain SIGTRAP is a signal.
        return os.WIFSTOPPED(self.status) and self.signal == SYSCALL_STOP_SIGNAL and not self.event

    @property
    def is_signal_delivery(self) -> bool:
        """The target is about to receive signal ``self.signal``."""
        return os.WIFSTOPPED(self.status) and not self.event and not self.is_syscall

    def describe(self) -> str:
        if os.WIFEXITED(self.status):
            return f"exited with status {os.WEXITSTATUS(self.status)}"
        if os.WIFSIGNALED(self.status):
            return f"was killed by {signal.Signals(os.WTERMSIG(self.status)).name}"
        return f"stopped (signal {self.signal}, event {self.event})"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _errno_name(code: int) -> str:
    return errno.errorcode.get(code, f"errno {code}")


# --- /proc readers ------------------------------------------------------------------------


def _writable_mapping_holds(tracee: _Tracee, start: int, end: int) -> bool:
    """Does one writable mapping of the tracee hold all of [start, end)?"""
    try:
        mappings = readProcessMappings(tracee)
    except PtraceError as error:  # /proc/PID/maps unreadable or not understood
        raise OSError(errno.EIO, f"PID {tracee.pid}'s memory map: {error}") from None
    return any(
        mapping.start <= start and end <= mapping.end and mapping.permissions.startswith("rw")
        for mapping in mappings
    )


def _signals_pending(pid: int) -> bool:
    """Is a signal queued for ``pid`` that its mask lets through?"""
    fields = procinfo.parse_status(Path(f"/proc/{pid}/status").read_text())
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & ~int(fields["SigBlk"], 16))


# --- one traced target ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Entry:
    """The target at a syscall-entry stop, as found."""

    regs: ctypes.Structure
    nr: int
    name: str


class _Tracee:
    """The target while we trace it. Knows whether it is attached and whether it is stopped."""

    def __init__(self, pid: int, arch: Arch, log: Log) -> None:
        self.pid = pid
        self.arch = arch
        self.log = log
        self.attached = False
        self.stopped = False
        self.blocked_in: int | None = None
        self.last_stop: _Stop | None = None
        self.reinjected: list[str] = []
        self._mem_fd: int | None = None
        self._have_syscall_info = True
        self._interrupt_seen = False
        self._next_syscall_stop_is_entry = True  # parity, for kernels without syscall info

    # -- attach, wait, resume, detach

    def seize(self, before_interrupt: Callable[[], None] | None = None) -> None:
        try:
            _ptrace(PTRACE_SEIZE, self.pid, 0, SEIZE_OPTIONS)
        except OSError as error:
            raise _attach_failure(self.pid, error) from None
        self.attached = True
        self.log(
            f"seized PID {self.pid} (TRACESYSGOOD|TRACEEXEC; no EXITKILL, so PID {self.pid} "
            "outlives us if we die)"
        )
        if before_interrupt is not None:
            before_interrupt()
        # SEIZE does not stop the target; INTERRUPT does, wherever it is.
        _ptrace(PTRACE_INTERRUPT, self.pid)

    def wait(self, deadline: float | None, on_wait: WaitReport | None = None) -> _Stop:
        """The next stop. Polls so that a target that never stops cannot hang us.

        With no deadline it waits for good, telling ``on_wait`` every
        ``EXEC_WAIT_REPORT_EVERY`` seconds how long it has been."""
        pause = 0.00005
        started = time.monotonic()
        next_report = started + EXEC_WAIT_REPORT_EVERY
        while True:
            waited, status = os.waitpid(self.pid, WAIT_ALL | os.WNOHANG)
            if waited == self.pid:
                break
            now = time.monotonic()
            if deadline is not None and now > deadline:
                raise TimeoutError(f"PID {self.pid} did not stop in time")
            if on_wait is not None and now >= next_report:
                next_report = now + EXEC_WAIT_REPORT_EVERY
                on_wait(now - started)
            time.sleep(pause)
            # Quick for the usual millisecond stop; gentle on the CPU for a long one.
            pause = min(pause * 2, 0.002 if now - started < 1.0 else 0.05)
        stop = _Stop(status)
        if stop.gone:
            self.attached = self.stopped = False
            raise EnvironmentFailure(
                f"PID {self.pid} {stop.describe()} while being injected",
                "see the target's own log; nothing of ours is left in it",
            )
        self.stopped = True
        self.last_stop = stop
        return stop

    def resume(self, deliver: int = 0) -> None:
        """Run to the next syscall stop, delivering ``deliver`` (a signal) if non-zero."""
        _ptrace(PTRACE_SYSCALL, self.pid, 0, deliver)
        self.stopped = False

    def detach(self, deliver: int = 0) -> None:
        _ptrace(PTRACE_DETACH, self.pid, 0, deliver)
        self.attached = self.stopped = False
        self.log(f"detached from PID {self.pid}")

    def abandon(self) -> None:
        """Best-effort detach after a failure, when nothing of ours is in the target."""
        if not self.attached:
            return
        try:
            if not self.stopped:
                _ptrace(PTRACE_INTERRUPT, self.pid)
                self.wait(time.monotonic() + 2.0)
            # Do not swallow a signal the target was about to receive.
            last = self.last_stop
            self.detach(last.signal if last is not None and last.is_signal_delivery else 0)
        except (OSError, TimeoutError, EnvironmentFailure) as error:
            # Our exit detaches us anyway; the target keeps running either way.
            self.log(f"could not detach cleanly ({error}); the kernel will when we exit")

    def close(self) -> None:
        if self._mem_fd is not None:
            os.close(self._mem_fd)
            self._mem_fd = None

    # -- registers, syscall info and memory

    def get_regs(self) -> ctypes.Structure:
        regs = self.arch.regs_type()
        self._regset(PTRACE_GETREGSET, NT_PRSTATUS, regs)
        return regs

    def set_regs(self, edit: RegisterEdit) -> None:
        self._regset(PTRACE_SETREGSET, NT_PRSTATUS, edit.regs)
        if edit.kernel_nr is not None and self.arch.kernel_nr_regset is not None:
            self._regset(PTRACE_SETREGSET, self.arch.kernel_nr_regset, ctypes.c_int(edit.kernel_nr))

    def kernel_nr(self, regs: ctypes.Structure) -> int:
        if self.arch.kernel_nr_regset is None:
            return archmod.kernel_nr_from(self.arch, regs, None)
        value = ctypes.c_int()
        self._regset(PTRACE_GETREGSET, self.arch.kernel_nr_regset, value)
        return value.value

    def _regset(self, request: int, note: int, buffer: ctypes.Structure | ctypes.c_int) -> None:
        iov = Iovec(ctypes.addressof(buffer), ctypes.sizeof(buffer))
        _ptrace(request, self.pid, note, ctypes.addressof(iov))

    def syscall_info(self) -> SyscallInfo | None:
        """PTRACE_GET_SYSCALL_INFO, or None on kernels before 5.3 (EIO)."""
        if not self._have_syscall_info:
            return None
        info = SyscallInfo()
        try:
            _ptrace(PTRACE_GET_SYSCALL_INFO, self.pid, ctypes.sizeof(info), ctypes.addressof(info))
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            self._have_syscall_info = False
            self.log(
                "PTRACE_GET_SYSCALL_INFO missing (kernel < 5.3): telling entry from exit by order"
            )
            return None
        return info

    def _mem(self) -> int:
        if self._mem_fd is None:
            self._mem_fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._mem_fd

    def read_mem(self, address: int, size: int) -> bytes:
        data = os.pread(self._mem(), size, address)
        if len(data) != size:
            raise OSError(errno.EIO, f"short read of PID {self.pid}'s memory at {address:#x}")
        return data

    def write_mem(self, address: int, data: bytes) -> None:
        if os.pwrite(self._mem(), data, address) != len(data):
            raise OSError(errno.EIO, f"short write to PID {self.pid}'s memory at {address:#x}")

    # -- stepping

    def _step_over_until(
        self,
        wanted: Callable[[_Stop], bool],
        deadline: float | None,
        on_wait: WaitReport | None = None,
    ) -> _Stop:
        """Wait for a stop ``wanted`` accepts; resume past every other one.

        Signals are handed back to the target (it must not lose a SIGCHLD because we
        happened to be looking), group-stops and our interrupt stop are stepped over.
        """
        while True:
            stop = self.wait(deadline, on_wait)
            if wanted(stop):
                return stop
            self.resume(self._deliverable(stop))

    def _deliverable(self, stop: _Stop) -> int:
        """The signal to pass on when resuming from ``stop`` (0 for none), logging the stop."""
        if stop.is_syscall:
            self.log("syscall-exit stop: stepping on to the next entry")
            return 0
        if stop.event != PTRACE_EVENT_EXEC:
            self._next_syscall_stop_is_entry = True  # any other stop happens outside a call
        if stop.event == PTRACE_EVENT_STOP and stop.signal == signal.SIGTRAP:
            if not self._interrupt_seen:  # ours is reported once; look at it only then
                self._interrupt_seen = True
                self._at_interrupt_stop()
            return 0
        if stop.event == PTRACE_EVENT_STOP:
            self.log(f"group-stop ({_signal_name(stop.signal)}): resuming")
            return 0
        if stop.event:
            self.log(f"ptrace event {stop.event}: resuming")
            return 0
        # A signal-delivery-stop: the target is about to receive this signal.
        name = _signal_name(stop.signal)
        self.reinjected.append(name)
        self.log(f"signal-delivery-stop: {name} arrived; handing it back to the target")
        return stop.signal

    def _at_interrupt_stop(self) -> None:
        """Our PTRACE_INTERRUPT landed: learn what the target was blocked in."""
        regs = self.get_regs()
        kernel_nr = self.kernel_nr(regs)
        self.blocked_in = archmod.blocked_syscall(self.arch, regs, kernel_nr)
        if self.blocked_in is None:
            self.log("interrupt stop in userspace: stepping to its next system call")
            return
        name = archmod.syscall_name(self.arch, self.blocked_in)
        self.log(f"interrupt stop: PID {self.pid} was blocked in {name}(); it will restart")
        # A few waits answer a bare interrupt with EINTR instead of restarting. Unless a
        # real signal explains the EINTR, rewind so that the wait simply runs again.
        rewind = archmod.undo_spurious_eintr(self.arch, regs, kernel_nr)
        if rewind is not None and not _signals_pending(self.pid):
            self.set_regs(rewind)
            self.log(f"{name}() got EINTR only from our interrupt: rewound it to run again")

    def _is_entry(self, info: SyscallInfo | None) -> bool:
        if info is not None:
            return int(info.op) == PTRACE_SYSCALL_INFO_ENTRY
        is_entry = self._next_syscall_stop_is_entry
        self._next_syscall_stop_is_entry = not is_entry
        return is_entry

    def stop_at_syscall_entry(self, deadline: float) -> _Entry:
        """Step until the target sits at the entry of a system call; swap-ready."""
        while True:
            stop = self._step_over_until(lambda stop: stop.is_syscall, deadline)
            info = self.syscall_info()
            if not self._is_entry(info):
                self.resume(self._deliverable(stop))
                continue
            if info is not None and info.arch != self.arch.audit_arch:
                raise EnvironmentFailure(
                    f"PID {self.pid} made a system call of another ABI (audit arch "
                    f"{info.arch:#x}, expected {self.arch.name})",
                    "only native 64-bit inits can be injected",
                )
            regs = self.get_regs()
            nr = int(info.data[0]) if info is not None else self.kernel_nr(regs)
            return _Entry(regs=regs, nr=nr, name=archmod.syscall_name(self.arch, nr))

    def run_execve(self, on_wait: WaitReport | None) -> int | None:
        """Let the swapped call run, for as long as it takes (no deadline: we are committed).
        None: exec happened. Else execve's (negative) return."""

        def exec_or_syscall_exit(stop: _Stop) -> bool:
            return stop.is_syscall or stop.event == PTRACE_EVENT_EXEC

        self.resume()
        pause_point("exec-wait")
        stop = self._step_over_until(exec_or_syscall_exit, None, on_wait)
        if stop.event == PTRACE_EVENT_EXEC:
            return None
        info = self.syscall_info()
        if info is not None and info.op == PTRACE_SYSCALL_INFO_EXIT:
            return archmod.signed64(int(info.data[0]))
        return archmod.signed64(archmod.get_reg(self.get_regs(), self.arch.ret))


def _attach_failure(pid: int, error: OSError) -> EnvironmentFailure:
    if error.errno == errno.ESRCH:
        return EnvironmentFailure(f"no process with PID {pid}", "check the PID")
    if error.errno == errno.EPERM:
        return EnvironmentFailure(
            f"attaching to PID {pid} was denied (EPERM)",
            "run as root; if kernel.yama.ptrace_scope is 2 or 3, or a security module "
            "or kernel lockdown forbids ptrace, allow it and retry",
        )
    return EnvironmentFailure(f"attaching to PID {pid} failed: {error.strerror}")


# --- the public entry point ---------------------------------------------------------------


def _refuse_host_pid1_in_lab_mode(pid: int) -> None:
    """Defence in depth: in lab mode, this machine's PID 1 is never touched."""
    if pid == 1:
        labmode.refuse("this machine's PID 1 will not be replaced")


def _validate(arch: Arch, path: str, argv: Sequence[str], envp: Sequence[str]) -> None:
    if not path.startswith("/"):
        raise BadInput(f"execve path {path!r} is not absolute", "give the full path")
    if not argv:
        raise BadInput("execve needs at least argv[0]", "pass the program name as argv[0]")
    for text in (path, *argv, *envp):
        if "\0" in text:
            raise BadInput(f"{text!r} contains a NUL byte", "remove it")
    size = archmod.exec_block_size(arch, path, argv, envp)
    if size > MAX_EXEC_BLOCK:
        raise BadInput(
            f"path, argv and envp take {size} bytes", f"keep them under {MAX_EXEC_BLOCK}"
        )


def inject_execve(
    pid: int,
    path: str,
    argv: list[str],
    envp: list[str],
    log: Callable[[str], None],
    *,
    entry_timeout: float = ENTRY_TIMEOUT,
    on_commit: Callable[[], None] | None = None,
    on_wait: WaitReport | None = None,
    pause: PauseHook | None = None,
) -> InjectionReport:
    """Make ``pid`` call ``execve(path, argv, envp)``.

    Returns a report once the exec event is seen and the target is detached. If execve
    fails inside the target, raises InjectionRolledBack (carrying the report) after
    putting back its memory and registers so that it re-runs its own system call.
    Attach denied, already traced, no such process: EnvironmentFailure. An ending signal
    (SIGINT, SIGTERM, SIGHUP) that arrives before the swap: EndingSignal, with the
    target left as it was; one that arrives later waits until we are done.

    ``on_commit`` is called as soon as the swap is in: from then on PID 1 may exec, and only
    an InjectionRolledBack means that it will not. ``on_wait`` hears how long execve takes
    when it takes seconds. ``pause`` (a teaching rehearsal only) is called, in this thread,
    before the seize, the interrupt, at the entry stop, before the swap and before execve
    runs, and blocks the injection until it returns.
    """
    _refuse_host_pid1_in_lab_mode(pid)  # before any ptrace call, on purpose
    try:
        arch = archmod.host_arch()
    except archmod.UnsupportedArch as error:
        raise EnvironmentFailure(str(error)) from None
    _validate(arch, path, argv, envp)
    verdict = procinfo.ptrace_permission(pid)
    if not verdict.allowed:
        raise EnvironmentFailure(verdict.reason, verdict.fix)

    tracee = _Tracee(pid, arch, log)
    started = time.monotonic()
    try:
        with signals_deferred():
            injection = _Injection(tracee, path, argv, envp, started, pause)
            return injection.run(entry_timeout, on_commit, on_wait)
    except OSError as error:
        # A ptrace request or /proc access the kernel refused half-way (the target died,
        # memory vanished): name it. Whatever we had changed was undone on the way out.
        raise EnvironmentFailure(
            f"injecting into PID {pid} failed: {error}", "see the log for the last step"
        ) from error
    finally:
        tracee.close()


@dataclasses.dataclass
class _Swap:
    """What step 3 changed in the target, and all that a rollback needs to put it back."""

    entry: _Entry
    base: int  # where our block lies, below the red zone
    size: int
    saved: bytes  # the target's own bytes at base, before ours
    substituted: RegisterEdit  # the registers as swapped for execve


class _Injection:
    """One injection, as the design's steps 5.1 to 5.4: each a method, run in order by
    :meth:`run`. Every method leaves the target as it found it when it raises, up to the
    swap; after the swap only :meth:`roll_back` may touch it."""

    def __init__(
        self,
        tracee: _Tracee,
        path: str,
        argv: list[str],
        envp: list[str],
        started: float,
        pause: PauseHook | None,
    ) -> None:
        self.tracee = tracee
        self.arch = tracee.arch
        self.pid = tracee.pid
        self.log = tracee.log
        self.path, self.argv, self.envp = path, argv, envp
        self.started = started
        self.pause = pause

    def run(
        self,
        entry_timeout: float,
        on_commit: Callable[[], None] | None,
        on_wait: WaitReport | None,
    ) -> InjectionReport:
        entry = self.reach_syscall_entry(entry_timeout)
        swap = self.swap_in_execve(entry)
        # Committed: were we to die now, PID 1 would still run our execve.
        self.log("committed: from here on PID 1 may exec; no deadline, no undo unless execve fails")
        if on_commit is not None:
            on_commit()
        pause_point("swapped")
        self.teach("execve", execve_call(self.pid, self.path, self.argv))
        report = self.report_at_commit(entry)
        result = self.tracee.run_execve(self.wait_reporter(on_wait))
        if result is None:
            return self.executed(swap, report)
        raise self.roll_back(swap, report, -result)

    def teach(self, step: str, syscall: str, registers: tuple[RegisterRow, ...] = ()) -> None:
        if self.pause is not None:
            self.pause(Pause("host", step, syscall, self.pid, self.arch.name, registers))

    # 1-2. Seize and reach a syscall entry. Nothing of ours is in the target yet, so any
    # failure here only needs a detach.
    def reach_syscall_entry(self, entry_timeout: float) -> _Entry:
        tracee, arch, pid = self.tracee, self.arch, self.pid
        pause_point("before-seize")
        _stop_if_asked_to_end(self.log, "before the attach")
        self.teach("seize", seize_call(pid))
        try:
            tracee.seize(lambda: self.teach("interrupt", interrupt_call(pid)))
            entry = tracee.stop_at_syscall_entry(time.monotonic() + entry_timeout)
            pause_point("entry-stop")
            self.teach(
                "entry-stop",
                entry_stop_call(pid, entry.name),
                registers=register_rows(
                    arch, archmod.shown(arch, entry.regs), kernel_nr=(entry.nr, None)
                ),
            )
        except TimeoutError:
            tracee.abandon()
            raise EnvironmentFailure(
                f"PID {pid} made no system call within {entry_timeout:g} s",
                "retry; a target spinning in userspace cannot be injected",
            ) from None
        except BaseException:
            tracee.abandon()
            raise
        ip = archmod.shown(arch, entry.regs)[arch.ip]
        self.log(f"syscall-entry stop: {entry.name}() at {arch.ip}={ip:#x}")
        return entry

    # 3. Place the block below the stack pointer, past the red zone, and swap the call.
    # Any failure, or an ending signal held back since the attach, puts back what was
    # changed: the target then runs its own call as if nothing happened.
    def swap_in_execve(self, entry: _Entry) -> _Swap:
        tracee, arch, pid = self.tracee, self.arch, self.pid
        path, argv, envp = self.path, self.argv, self.envp
        sp = archmod.get_reg(entry.regs, arch.sp)
        size = archmod.exec_block_size(arch, path, argv, envp)
        base = archmod.scratch_base(arch, sp, size)
        block = archmod.build_exec_block(arch, base, path, argv, envp)
        saved: bytes | None = None
        swapped = False
        try:
            if not _writable_mapping_holds(tracee, base, base + size):
                raise EnvironmentFailure(
                    f"PID {pid}'s stack has no {size} writable bytes below {arch.sp}={sp:#x}",
                    "use a shorter init command line and environment",
                )
            saved = tracee.read_mem(base, size)
            tracee.write_mem(base, block.data)
            self.log(
                f"wrote {size} bytes at {base:#x} ({arch.sp} - {sp - base}): path, "
                f"{len(argv)} argv and {len(envp)} envp strings; the original bytes are saved"
            )
            substituted = archmod.substitute_execve(
                arch, entry.regs, block.path, block.argv, block.envp
            )
            self.teach(
                "swap",
                swap_call(arch, pid, base, size),
                registers=register_rows(
                    arch,
                    archmod.shown(arch, entry.regs),
                    archmod.shown(arch, substituted.regs),
                    kernel_nr=(entry.nr, substituted.kernel_nr),
                ),
            )
            # The last moment to call it off: a Ctrl-C or a hang-up held back since the attach.
            _stop_if_asked_to_end(self.log, "at the entry stop, before the swap")
            swapped = True
            tracee.set_regs(substituted)
            self.log(f"swapped {entry.name} ({entry.nr}) for execve ({arch.execve_nr}): {path}")
        except BaseException:
            _undo_at_entry(tracee, entry, base, saved, swapped)
            raise
        return _Swap(entry, base, size, saved, substituted)

    def report_at_commit(self, entry: _Entry) -> InjectionReport:
        interrupted = archmod.syscall_name(
            self.arch, self.tracee.blocked_in if self.tracee.blocked_in is not None else entry.nr
        )
        return InjectionReport(
            pid=self.pid,
            arch=self.arch.name,
            interrupted_syscall=interrupted,
            registers_before=archmod.shown(self.arch, entry.regs),
            registers_after={},
            elapsed_ms=0.0,
            replaced_syscall=entry.name,
            reinjected_signals=self.tracee.reinjected,
        )

    # 4. Let execve run, however long it takes: an exec event, or its exit stop with an error.
    def wait_reporter(self, on_wait: WaitReport | None) -> WaitReport:
        def waiting(seconds: float) -> None:
            self.log(f"waiting for execve in PID {self.pid}: {seconds:.0f} s")
            if on_wait is not None:
                on_wait(seconds)

        return waiting

    def executed(self, swap: _Swap, report: InjectionReport) -> InjectionReport:
        """Success. The old image, our block with it, is gone: nothing to restore."""
        self.log(f"exec event: PID {self.pid} now runs {self.path}")
        # What teaches is the swap itself: the syscall number and arguments we set at the
        # entry stop (after the exec the registers belong to the new program).
        try:
            report.registers_after = archmod.shown(self.arch, swap.substituted.regs)
            if swap.substituted.kernel_nr is not None:
                report.registers_after[self.arch.nr] = swap.substituted.kernel_nr
        finally:
            self.tracee.detach()
        return self.finished(report, swap)

    def roll_back(self, swap: _Swap, report: InjectionReport, errno_: int) -> InjectionRolledBack:
        """execve failed: PID 1 must re-run its own call as if we had never been there.

        Registers first, as at the entry stop but rewound over the system call instruction:
        they decide whether PID 1 sees an error, and with them it re-runs its own call
        instead. Then the bytes: below the red zone they are dead by the ABI, but they go
        back all the same so that nothing can tell we were there."""
        arch, tracee, entry = self.arch, self.tracee, swap.entry
        error_name = _errno_name(errno_)
        self.log(f"execve failed with {error_name}: rolling back")
        rewound = archmod.rewind_to_syscall(arch, entry.regs, entry.nr)
        _restore_registers(tracee, rewound)
        try:
            report.registers_after = archmod.shown(arch, tracee.get_regs())
        except OSError:  # only the report misses them: never stay attached for that
            report.registers_after = archmod.shown(arch, rewound.regs)
        try:
            tracee.write_mem(swap.base, swap.saved)
            restored = f"the registers and {swap.size} bytes"
        except OSError as error:
            restored = f"the registers (the {swap.size} scratch bytes stay: {error})"
        before_ip = report.registers_before[arch.ip]
        self.log(
            f"restored {restored}; {arch.ip} {before_ip:#x} -> "
            f"{report.registers_after[arch.ip]:#x}, {arch.nr}={entry.nr}: "
            f"{entry.name}() will run again"
        )
        tracee.detach()
        report.outcome = "rolled-back"
        report.error = error_name
        return InjectionRolledBack(
            f"execve({self.path}) failed in PID {self.pid} with {error_name}; "
            f"PID {self.pid} was left as it was",
            "check that the interpreter and the stage's files exist inside the target's root",
            self.finished(report, swap),
        )

    def finished(self, report: InjectionReport, swap: _Swap) -> InjectionReport:
        report.scratch_address = swap.base
        report.scratch_bytes = swap.size
        report.elapsed_ms = (time.monotonic() - self.started) * 1000
        return report


def _stop_if_asked_to_end(log: Log, where: str) -> None:
    """Before the swap, a Ctrl-C or hang-up held back by ``signals_deferred`` calls it off;
    it is delivered as soon as we let it, and the caller's undo runs."""
    signum = pending_call_off()
    if signum is not None:
        log(f"{signum.name} arrived {where}: calling the injection off")
        raise EndingSignal(signum)


def _restore_registers(tracee: _Tracee, edit: RegisterEdit) -> None:
    """Put PID 1's registers back after a failed execve, however many attempts it takes.

    Detaching first would let PID 1 go on with its arguments pointing into our block and
    execve's error as its call's result: the target stays stopped until the write holds.
    Only a target that is gone (ESRCH: killed meanwhile) ends the attempts."""
    attempt = 0
    while True:
        try:
            tracee.set_regs(edit)
            return
        except OSError as error:
            if error.errno == errno.ESRCH:
                raise
            attempt += 1
            tracee.log(
                f"restoring PID {tracee.pid}'s registers failed ({error}), attempt {attempt}: "
                "it stays stopped under us; retrying"
            )
            time.sleep(RESTORE_RETRY_PAUSE)


def _undo_at_entry(
    tracee: _Tracee, entry: _Entry, base: int, saved: bytes | None, swapped: bool
) -> None:
    """Still at the entry stop: put back what we changed; the original call then runs."""
    try:
        if swapped:
            # The swap may have half-happened (aarch64 writes two register sets): detaching
            # before the original registers hold would let PID 1 run our execve.
            _restore_registers(tracee, archmod.restore_at_entry(tracee.arch, entry.regs, entry.nr))
        if saved is not None:
            tracee.write_mem(base, saved)
    except (OSError, EnvironmentFailure) as error:
        tracee.log(f"undo at the entry stop failed: {error}")
    finally:
        try:
            tracee.detach()
        except OSError as error:
            tracee.log(f"detach failed ({error}); the kernel detaches when we exit")
