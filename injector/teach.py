"""The teaching rehearsal, host side: what each pause says, and the stage's channel.

A rehearsal given a ``pause`` hook (``SwitchOptions.pause``) calls it before each of its
steps with a :class:`Pause`: the step in plain words, the concrete system call and, at the
register swap, the registers before and after for this machine's architecture. The hook
blocks for as long as the class looks (the wizard waits for Space or Enter). Raising
:class:`StopTeaching` from it ends the pauses for the rest of the run, on both sides.

The stage pauses too (``initstage.teachpause``): the host listens on a unix socket in the
sandbox's private state dir, the plan names it, and :class:`StageListener` turns each
``about to <step>: <call>`` line into a :class:`Pause` and answers ``go`` once the hook
returns. Pauses are rehearsal-only: ``SwitchOptions`` and the plan refuse them otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Literal

from initstage import teachpause
from initstage.mounts import unescape_octal
from initstage.teachpause import execve_text
from injector.inject.arch import ARCHES, Arch
from injector.preflight import procinfo
from injector.stop.plan import StopPlan

logger = logging.getLogger(__name__)

Side = Literal["host", "stage"]
HOST_STEPS = (
    "source", "preflight", "copy", "stop", "seize", "interrupt", "entry-stop", "swap", "execve",
)  # fmt: skip
STAGE_STEPS = teachpause.STEPS
SOCKET_NAME = "teach.sock"
ACCEPT_POLL = 0.2  # seconds between looks at whether the listener was closed
CLOSE_WAIT = 2.0  # how long closing waits for the listener's thread

# step -> (title, two or three plain sentences). Host steps first, then the stage's.
LESSONS: Mapping[str, tuple[str, str]] = {
    "source": (
        "Reading the image",
        "dboot reads the image's tar stream once, headers first: the file list and sizes "
        "give the RAM estimate and prove the init exists. Nothing on this machine changes.",
    ),
    "preflight": (
        "The preflight",
        "Facts first, then verdicts: free RAM against the image, swap, the processes that "
        "will be ended, and whether PID 1 may be traced. Reading /proc changes nothing.",
    ),
    "copy": (
        "The copy into RAM",
        "A tmpfs sized to fit is mounted in the sandbox's mount namespace and the image is "
        "unpacked into it, with owners, modes and times exact. Then the plan for the init "
        "stage is written beside it.",
    ),
    "stop": (
        "The graceful stop",
        "Before anything is killed, the init stops its services its own way: the last "
        "started first, each with its stop command and its own timeout, the whole within a "
        "ceiling. On a real machine that is systemd, sysvinit or runit; here the stand-in. "
        "What ignores it is left to the stage's signals.",
    ),
    "seize": (
        "Seize PID 1",
        "ptrace attaches to the sandbox's PID 1 without stopping it. TRACESYSGOOD marks "
        "system call stops; TRACEEXEC reports a successful execve. No EXITKILL: if dboot "
        "dies, PID 1 lives on.",
    ),
    "interrupt": (
        "Interrupt it",
        "PTRACE_INTERRUPT stops PID 1 wherever it is, most likely asleep in a wait. A "
        "blocked call is restarted later, so PID 1 never sees the interruption.",
    ),
    "entry-stop": (
        "The entry stop",
        "dboot steps PID 1 to the entry of its next system call: the kernel has its number "
        "and arguments in registers, and has not run it yet. These are the registers as "
        "found.",
    ),
    "swap": (
        "The register swap",
        "execve's path, argv and envp are written below the stack pointer, and the call's "
        "number and arguments are replaced by execve's. This is the point of no return: "
        "from here PID 1 will run our execve.",
    ),
    "execve": (
        "The execve",
        "PID 1 resumes and the kernel runs execve instead of the call it made: the stand-in "
        "init becomes the init stage, a Python program, still PID 1 with the same children.",
    ),
    "sync": (
        "sync",
        "The stage, now the sandbox's PID 1, flushes every filesystem under a deadline, "
        "each in a child, so a hung disk cannot hang PID 1.",
    ),
    "SIGTERM": (
        "SIGTERM to everyone",
        "kill(-1) sends SIGTERM to every process in the PID namespace but PID 1. Watch "
        "the processes: the services that obey go now; one ignores SIGTERM.",
    ),
    "SIGKILL": (
        "SIGKILL to the rest",
        "The grace period is over. SIGKILL cannot be caught or ignored: whatever is left "
        "dies, and PID 1 reaps the zombies.",
    ),
    "pivot_root": (
        "pivot_root into RAM",
        "The tmpfs becomes /, and the old root is stacked on it and then detached. Watch "
        "the mounts: the old root's mounts disappear.",
    ),
    "API mounts": (
        "The API filesystems",
        "The new root gets its own /proc, a read-only /sys, a minimal /dev and /dev/pts, "
        "as a booting system would find them.",
    ),
    "exec": (
        "exec the image's init",
        "Signals, rlimits and the environment are reset as at boot, and PID 1 execs the "
        "image's init. The stage is gone; the new system runs.",
    ),
}


class StopTeaching(Exception):
    """Raised by a pause hook: no more pauses in this run, on either side."""


@dataclasses.dataclass(frozen=True)
class RegisterRow:
    """One register at the swap: its name, what it holds, and its value before and after
    (``after`` None: only the values as found are shown, at the entry stop)."""

    name: str
    role: str
    before: int
    after: int | None = None

    @property
    def changed(self) -> bool:
        return self.after is not None and self.after != self.before


@dataclasses.dataclass(frozen=True)
class Pause:
    """What a teaching pause shows: the step, in words, and the system call it makes."""

    side: Side
    step: str
    syscall: str
    target_pid: int | None = None  # the host pid of the sandbox's PID 1, for the panels
    arch: str = ""
    registers: tuple[RegisterRow, ...] = ()

    @property
    def title(self) -> str:
        return LESSONS.get(self.step, (self.step, ""))[0]

    @property
    def explanation(self) -> str:
        return LESSONS.get(self.step, ("", f"The next step: {self.step}."))[1]

    @property
    def position(self) -> str:
        """ "host 4/8" or "stage 2/6": where this pause sits in its side's steps."""
        steps = HOST_STEPS if self.side == "host" else STAGE_STEPS
        number = steps.index(self.step) + 1 if self.step in steps else "?"
        return f"{self.side} {number}/{len(steps)}"


PauseHook = Callable[[Pause], None]


class Teacher:
    """The run's pause hook, once :class:`StopTeaching` came: a no-op from then on.

    Host pauses come from the run's thread and the injection's, stage pauses from the
    listener's: they never overlap (each waits for the go), but the flag is shared."""

    def __init__(self, hook: PauseHook) -> None:
        self.hook = hook
        self.stopped = False

    def __call__(self, pause: Pause) -> None:
        if self.stopped:
            return
        try:
            self.hook(pause)
        except StopTeaching:
            self.stopped = True


# --- the system calls, as C would spell them -----------------------------------------


def seize_call(pid: int) -> str:
    return f"ptrace(PTRACE_SEIZE, {pid}, 0, PTRACE_O_TRACESYSGOOD|PTRACE_O_TRACEEXEC)"


def interrupt_call(pid: int) -> str:
    return f"ptrace(PTRACE_INTERRUPT, {pid}, 0, 0); waitpid({pid}, &status, __WALL)"


def entry_stop_call(pid: int, syscall: str) -> str:
    return (
        f"ptrace(PTRACE_SYSCALL, {pid}, 0, 0) until the entry of {syscall}(); "
        f"ptrace(PTRACE_GETREGSET, {pid}, NT_PRSTATUS, &iov)"
    )


def swap_call(arch: Arch, pid: int, base: int, size: int) -> str:
    text = (
        f"pwrite(/proc/{pid}/mem, block, {size}, {base:#x}); "
        f"ptrace(PTRACE_SETREGSET, {pid}, NT_PRSTATUS, &iov)"
    )
    if arch.kernel_nr_regset is not None:
        text += f"; ptrace(PTRACE_SETREGSET, {pid}, NT_ARM_SYSTEM_CALL, &nr)"
    return text


SHOWN_ARG_CHARS = 40  # the stage's bootstrap is a whole program passed with -c


def execve_call(pid: int, path: str, argv: list[str]) -> str:
    shown = [
        arg if len(arg) <= SHOWN_ARG_CHARS else arg[: SHOWN_ARG_CHARS - 1] + "…" for arg in argv
    ]
    return f"ptrace(PTRACE_SYSCALL, {pid}, 0, 0): PID 1 runs {execve_text(path, shown)}"


def source_call(image: str) -> str:
    return f"read(fd, buf, 1 MiB) on {image}'s tar stream: headers and sizes, no file data kept"


def preflight_call(pid: int) -> str:
    return (
        f'open("/proc/meminfo"), open("/proc/swaps"), open("/proc/{pid}/status"), '
        'readlink("/proc/*/exe"): reads only'
    )


def copy_call(root: Path, size: int) -> str:
    return (
        f'mount("dboot", "{root}", "tmpfs", 0, "size={size},mode=0755,uid=0,gid=0"); '
        "then per file openat, write, fchownat, utimensat"
    )


def stop_call(plan: StopPlan, pid: int) -> str:
    """The stand-in's stop order (teaching is for rehearsals); on a machine with systemd it
    would be `systemctl stop --no-block --job-mode=ignore-requirements -- UNIT...`."""
    order = ", ".join(unit.name for unit in plan.units)
    return f'send(control, "stop {plan.ceiling:g}"); kill({pid}, SIGUSR2): then {order}'


def describe(pause: Pause) -> list[str]:
    """The pause as plain lines, for a terminal (``dboot rehearse --teach``)."""
    lines = [f"── {pause.position}: {pause.title} ──", pause.explanation, f"  {pause.syscall}"]
    if pause.registers:
        arch = ARCHES[pause.arch]
        lines += [f"  registers ({arch.name}):"] + [
            f"  {line}" for line in render_registers(arch, pause.registers)
        ]
    return lines


# --- registers -------------------------------------------------------------------------

KERNEL_NR_ROW = "syscallno"  # aarch64: the kernel's number lives in NT_ARM_SYSTEM_CALL


def register_roles(arch: Arch) -> dict[str, str]:
    """What each shown register holds at a syscall stop, for this architecture."""
    roles = {arch.ip: "instruction pointer", arch.sp: "stack pointer"}
    roles[arch.nr] = "syscall number (caller)"
    if arch.kernel_nr_field:
        roles[arch.kernel_nr_field] = "syscall number (kernel)"
    for number, name in enumerate(arch.args, start=1):
        roles.setdefault(name, f"argument {number}")
    roles.setdefault(arch.ret, "return value")
    return roles


def register_rows(
    arch: Arch,
    before: Mapping[str, int],
    after: Mapping[str, int] | None = None,
    *,
    kernel_nr: tuple[int, int | None] | None = None,
) -> tuple[RegisterRow, ...]:
    """The rows a pause shows, in ``arch.shown_registers`` order. ``kernel_nr`` (before,
    after) adds the number an architecture keeps outside the register block (aarch64)."""
    roles = register_roles(arch)
    rows = [
        RegisterRow(name, roles.get(name, ""), value, None if after is None else after[name])
        for name, value in before.items()
    ]
    if kernel_nr is not None and arch.kernel_nr_regset is not None:
        rows.insert(3, RegisterRow(KERNEL_NR_ROW, "syscall number (kernel)", *kernel_nr))
    return tuple(rows)


def _is_number_row(arch: Arch, name: str) -> bool:
    return name in (arch.nr, arch.kernel_nr_field, KERNEL_NR_ROW)


def register_text(arch: Arch, name: str, value: int) -> str:
    """Addresses in hex; negative values (-ENOSYS) in decimal; syscall numbers named."""
    if value < 0 or value >= 1 << 63:
        return str(value - (1 << 64) if value >= 1 << 63 else value)
    if _is_number_row(arch, name):
        named = arch.syscalls.get(value)
        return f"{value} {named}" if named else str(value)
    return f"{value:#x}"


def render_registers(arch: Arch, rows: tuple[RegisterRow, ...]) -> list[str]:
    """One plain line per register: ``* orig_rax  7 poll → 59 execve``; ``*`` marks a
    change. Rows without an ``after`` show the value as found."""
    lines = []
    for row in rows:
        mark = "*" if row.changed else " "
        text = f"{mark} {row.name:<9} {register_text(arch, row.name, row.before)}"
        if row.after is not None:
            text += f" → {register_text(arch, row.name, row.after)}"
        lines.append(text)
    return lines


# --- what the class watches: the sandbox's processes and mounts, read from the host --------


@dataclasses.dataclass(frozen=True)
class SandboxProcess:
    pid: int  # as the sandbox sees it
    host_pid: int
    comm: str
    state: str  # R, S, Z ... as in /proc/PID/stat


def sandbox_processes(sandbox_pid: int) -> list[SandboxProcess]:
    """The processes of the sandbox's PID namespace, by their pid in it (its PID 1 first);
    empty once the sandbox is gone."""
    namespace = _pid_namespace(sandbox_pid)
    if namespace is None:
        return []
    found = []
    for host_pid in procinfo.list_pids():
        if _pid_namespace(host_pid) != namespace:
            continue
        info = procinfo.read_stat(host_pid)
        try:
            chain = procinfo.nspid_chain(host_pid)
        except (OSError, procinfo.Unreadable):
            continue  # gone meanwhile
        if info is not None and chain:
            found.append(SandboxProcess(chain[-1], host_pid, info.comm, info.state))
    return sorted(found, key=lambda process: process.pid)


def _pid_namespace(pid: int) -> str | None:
    try:
        return procinfo.pid_namespace(pid)
    except procinfo.Unreadable:
        return None  # hidden from us (the host's PID 1 on some hosts): not the sandbox's


def sandbox_mounts(sandbox_pid: int) -> list[str]:
    """The mount points of the sandbox's PID 1, as its mount namespace has them (so after
    the stage's pivot_root, the new root's); empty once it is gone."""
    text = procinfo.read_text(f"/proc/{sandbox_pid}/mountinfo") or ""
    return [unescape_octal(line.split()[4]) for line in text.splitlines() if len(line.split()) > 4]


# --- the stage's channel ---------------------------------------------------------------


class StageListener:
    """Listens in the sandbox's state dir; each stage pause becomes a :class:`Pause`.

    ``start`` binds once the sandbox's private state dir is mounted (after the copy),
    reached from the host through ``/proc/<sandbox pid 1>/root``. One thread accepts the
    stage's one connection and answers each pause; ``close`` ends it (the stage then reads
    end of file and goes on)."""

    def __init__(self, teacher: Teacher, sandbox_pid: int, state_dir: Path) -> None:
        self.teacher = teacher
        self.sandbox_pid = sandbox_pid
        self.stage_path = state_dir / SOCKET_NAME  # as the stage sees it
        self.host_path = Path(f"/proc/{sandbox_pid}/root{self.stage_path}")
        self._server: socket.socket | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            reachable, dir_fd = teachpause.short_socket_path(str(self.host_path))
            try:
                server.bind(reachable)
            finally:
                if dir_fd is not None:
                    os.close(dir_fd)
            os.chmod(self.host_path, 0o600)
            server.listen(1)
        except BaseException:
            server.close()
            raise
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="dboot-teach", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT)
        if self._server is not None:
            self._server.close()
            self._server = None

    def _serve(self) -> None:
        server = self._server
        assert server is not None
        while not self._closing.is_set():
            readable, _, _ = select.select([server], [], [], ACCEPT_POLL)
            if readable:
                connection, _ = server.accept()
                with connection:
                    self._answer(connection)
                return

    def _answer(self, connection: socket.socket) -> None:
        reader = connection.makefile("rb")
        while not self._closing.is_set():
            try:
                line = reader.readline(teachpause.MAX_LINE).decode("utf-8", "replace")
            except OSError:
                return
            if not line:
                return  # the stage exec'd its init (close-on-exec) or gave up
            step, syscall = parse_stage_line(line)
            try:
                self.teacher(Pause("stage", step, syscall, target_pid=self.sandbox_pid))
            except Exception:
                logger.exception("the pause hook failed; the stage goes on")
            if self.teacher.stopped or self._closing.is_set():
                return  # closing without a go: the stage reads end of file and goes on
            try:
                connection.sendall(teachpause.GO + b"\n")
            except OSError:
                return


def parse_stage_line(line: str) -> tuple[str, str]:
    """``about to SIGTERM: kill(-1, SIGTERM)`` -> ("SIGTERM", "kill(-1, SIGTERM)")."""
    text = line.strip().removeprefix("about to ")
    step, _, syscall = text.partition(": ")
    return step, syscall


@contextlib.contextmanager
def stage_listener(
    teacher: Teacher | None, sandbox_pid: int, state_dir: Path
) -> Iterator[StageListener | None]:
    """A listener for a teaching rehearsal (``start`` it after the copy), else None."""
    if teacher is None:
        yield None
        return
    listener = StageListener(teacher, sandbox_pid, state_dir)
    try:
        yield listener
    finally:
        listener.close()
