"""Per-architecture facts the injector needs, as one small table per architecture.

Everything here is a pure function of bytes and integers: no ptrace, no /proc. That is what
lets the aarch64 logic be unit-tested on an x86_64 machine. ``injector.inject.ptrace`` reads and
writes the register blocks; this module decides what goes into them.

The two ABIs, side by side:

=====================  ==========================  =================================
                       x86_64                       aarch64
=====================  ==========================  =================================
system call insn       ``syscall`` (2 bytes)        ``svc #0`` (4 bytes)
number, as the caller  ``rax``                      ``x8``
number, as the kernel  ``orig_rax`` (in the regs)   ``NT_ARM_SYSTEM_CALL`` regset
arguments              rdi rsi rdx r10 r8 r9        x0 .. x5
return value           ``rax``                      ``x0`` (overwrites argument 0)
execve                 59                           221
red zone below sp      128 bytes                    none
=====================  ==========================  =================================

At a syscall-entry stop the kernel has already copied the caller's number into the place it
dispatches from (``orig_rax`` / ``syscallno``); rewriting that place, not ``rax``/``x8``,
is what swaps the system call. To make a process re-run a system call after a stop, put
its number back where the *caller* keeps it and move the instruction pointer back over the
system call instruction; then mark the task as "not in a system call" (kernel number -1)
so that no signal-restart logic reinterprets the return register on the way out.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import platform
import struct
from collections.abc import Mapping, Sequence

from ptrace.syscall.linux import aarch64 as ptrace_aarch64
from ptrace.syscall.linux import x86_64 as ptrace_x86_64

from injector.inject.ptrace_ext import NT_ARM_SYSTEM_CALL

# -ERESTART* codes a blocking system call returns inside the kernel when a signal (or a
# ptrace interrupt) wakes it. They never reach userspace: the kernel either restarts the
# call or turns them into EINTR on the way out.
ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516
RESTART_CODES = frozenset({ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK})
EINTR = errno.EINTR

# The "waits" that answer a mere ptrace interrupt with EINTR instead of a restart code
# (ptrace(2), BUGS). Nothing has happened when they return EINTR, so running them again
# is exactly what the caller would do.
EINTR_ON_INTERRUPT = frozenset({"epoll_wait", "epoll_pwait", "epoll_pwait2", "rt_sigtimedwait"})

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7

U64_MASK = (1 << 64) - 1


def signed64(value: int) -> int:
    """A register read as u64, seen as the C ``long`` the kernel meant (-ENOENT, -1 ...)."""
    value &= U64_MASK
    return value - (1 << 64) if value >> 63 else value


def _u64_fields(names: Sequence[str]) -> list[tuple[str, type[ctypes.c_uint64]]]:
    return [(name, ctypes.c_uint64) for name in names]


# Both layouts stay here: python-ptrace's user_regs_struct exists only for the host's CPU, and
# the unit tests need the aarch64 one on x86_64 (tests/unit/test_arch.py checks the host's).
class X86_64Regs(ctypes.Structure):
    """``struct user_regs_struct`` from <sys/user.h>, the NT_PRSTATUS regset (216 bytes)."""

    _fields_ = _u64_fields(
        (
            "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
            "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
            "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs",
        )
    )  # fmt: skip


class AArch64Regs(ctypes.Structure):
    """``struct user_pt_regs`` from <asm/ptrace.h>, the NT_PRSTATUS regset (272 bytes).

    The kernel declares ``__u64 regs[31]; sp; pc; pstate``; naming the 31 slots x0..x30
    gives the same layout and lets both tables address registers by name.
    """

    _fields_ = _u64_fields([f"x{n}" for n in range(31)] + ["sp", "pc", "pstate"])


# System call names come from python-ptrace's per-architecture tables (generated from the
# kernel's), so that any call PID 1 sits in is named, not just the ones someone listed.
# x86_64's table also lists the x32 ABI's calls from 512 on: a 64-bit task never makes them.
X32_FIRST = 512
# Calls newer than python-ptrace 0.9.9's tables: numbered alike on every architecture since
# the tables were unified (Linux 5.1), up to Linux 6.1 (Debian 12).
NEWER_SYSCALLS: Mapping[int, str] = {
    440: "process_madvise", 441: "epoll_pwait2", 442: "mount_setattr", 443: "quotactl_fd",
    444: "landlock_create_ruleset", 445: "landlock_add_rule", 446: "landlock_restrict_self",
    447: "memfd_secret", 448: "process_mrelease", 449: "futex_waitv",
    450: "set_mempolicy_home_node",
}  # fmt: skip
X86_64_SYSCALLS: Mapping[int, str] = {
    **{nr: name for nr, name in ptrace_x86_64.SYSCALL_NAMES.items() if nr < X32_FIRST},
    283: "timerfd_create",  # python-ptrace 0.9.9 says "timerfd"
    **NEWER_SYSCALLS,
}
# aarch64 uses the asm-generic table: no legacy calls (no poll, select, pause, epoll_wait);
# their libc wrappers use ppoll, pselect6, ppoll and epoll_pwait instead.
AARCH64_SYSCALLS: Mapping[int, str] = {**ptrace_aarch64.SYSCALL_NAMES, **NEWER_SYSCALLS}


@dataclasses.dataclass(frozen=True)
class Arch:
    """What the injector must know about one architecture's system call ABI."""

    name: str
    audit_arch: int  # AUDIT_ARCH_* as PTRACE_GET_SYSCALL_INFO reports it
    regs_type: type[ctypes.Structure]  # the NT_PRSTATUS layout
    ip: str
    sp: str
    nr: str  # where the caller puts the system call number
    args: tuple[str, ...]
    ret: str
    syscall_insn_len: int
    red_zone: int  # bytes below sp that leaf functions may use without moving sp
    stack_align: int
    # Where the kernel keeps the number it dispatches on, and so how to change it:
    # a field of the NT_PRSTATUS block (x86_64 orig_rax), or a regset of its own.
    kernel_nr_field: str | None
    kernel_nr_regset: int | None
    syscalls: Mapping[int, str]
    pointer_size: int = 8
    notes: str = ""

    def __post_init__(self) -> None:
        if (self.kernel_nr_field is None) == (self.kernel_nr_regset is None):
            raise ValueError(f"{self.name}: set exactly one of kernel_nr_field/kernel_nr_regset")

    @property
    def execve_nr(self) -> int:
        return syscall_number(self, "execve")

    @property
    def regs_size(self) -> int:
        return ctypes.sizeof(self.regs_type)

    @property
    def return_clobbers_arg0(self) -> bool:
        """True when the return value lands in the first argument register (aarch64)."""
        return self.ret == self.args[0]

    @property
    def shown_registers(self) -> tuple[str, ...]:
        """The registers a report shows, in teaching order, each name once."""
        names = [self.ip, self.sp, self.nr]
        if self.kernel_nr_field:
            names.append(self.kernel_nr_field)
        names += [*self.args, self.ret]
        return tuple(dict.fromkeys(names))


X86_64 = Arch(
    name="x86_64",
    audit_arch=AUDIT_ARCH_X86_64,
    regs_type=X86_64Regs,
    ip="rip",
    sp="rsp",
    nr="rax",
    args=("rdi", "rsi", "rdx", "r10", "r8", "r9"),
    ret="rax",
    syscall_insn_len=2,  # 0f 05; int 0x80 (cd 80) is also 2, but that is the i386 ABI
    red_zone=128,
    stack_align=16,
    kernel_nr_field="orig_rax",
    kernel_nr_regset=None,
    syscalls=X86_64_SYSCALLS,
    notes="At a syscall-entry stop rax already holds -ENOSYS, the number is in orig_rax.",
)

AARCH64 = Arch(
    name="aarch64",
    audit_arch=AUDIT_ARCH_AARCH64,
    regs_type=AArch64Regs,
    ip="pc",
    sp="sp",
    nr="x8",
    args=("x0", "x1", "x2", "x3", "x4", "x5"),
    ret="x0",
    syscall_insn_len=4,  # svc #0
    red_zone=0,
    stack_align=16,
    kernel_nr_field=None,
    kernel_nr_regset=NT_ARM_SYSTEM_CALL,
    syscalls=AARCH64_SYSCALLS,
    notes=(
        "At syscall stops the kernel reports x7 as 0 (entry) or 1 (exit) and puts the real "
        "x7 back after the stop, so writes to x7 there are discarded. The return value "
        "overwrites x0; the original x0 (orig_x0) is not in user_pt_regs."
    ),
)

ARCHES: Mapping[str, Arch] = {arch.name: arch for arch in (X86_64, AARCH64)}
_MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


class UnsupportedArch(Exception):
    pass


def host_arch(machine: str | None = None) -> Arch:
    """The table for this kernel's architecture (``uname -m``)."""
    machine = machine or platform.machine()
    name = _MACHINE_ALIASES.get(machine.lower(), machine.lower())
    try:
        return ARCHES[name]
    except KeyError:
        supported = ", ".join(ARCHES)
        raise UnsupportedArch(f"architecture {machine} is not supported ({supported})") from None


def syscall_name(arch: Arch, nr: int) -> str:
    return arch.syscalls.get(nr, f"syscall_{nr}")


def syscall_number(arch: Arch, name: str) -> int:
    for nr, known in arch.syscalls.items():
        if known == name:
            return nr
    raise KeyError(f"{arch.name} has no system call named {name} in its table")


# --- register blocks -------------------------------------------------------------------


def regs_from_bytes(arch: Arch, data: bytes) -> ctypes.Structure:
    if len(data) != arch.regs_size:
        raise ValueError(f"{arch.name} register block is {arch.regs_size} bytes, got {len(data)}")
    return arch.regs_type.from_buffer_copy(data)


def regs_to_bytes(regs: ctypes.Structure) -> bytes:
    return bytes(memoryview(regs).cast("B"))


def get_reg(regs: ctypes.Structure, name: str) -> int:
    value: int = getattr(regs, name)
    return value


def _with(arch: Arch, regs: ctypes.Structure, changes: Mapping[str, int]) -> ctypes.Structure:
    """A copy of ``regs`` with ``changes`` applied (values masked to 64 bits)."""
    copy = regs_from_bytes(arch, regs_to_bytes(regs))
    for name, value in changes.items():
        setattr(copy, name, value & U64_MASK)
    return copy


def shown(arch: Arch, regs: ctypes.Structure) -> dict[str, int]:
    """The registers a report shows; the number and return registers as signed values."""
    signed = {arch.nr, arch.ret, arch.kernel_nr_field}
    return {
        name: signed64(get_reg(regs, name)) if name in signed else get_reg(regs, name)
        for name in arch.shown_registers
    }


@dataclasses.dataclass(frozen=True)
class RegisterEdit:
    """New register contents, plus, on regset architectures, the kernel's syscall number.

    ``kernel_nr`` is None when the number travels inside ``regs`` (x86_64 orig_rax).
    """

    regs: ctypes.Structure
    kernel_nr: int | None


def _edit(arch: Arch, regs: ctypes.Structure, changes: dict[str, int], nr: int) -> RegisterEdit:
    if arch.kernel_nr_field:
        return RegisterEdit(_with(arch, regs, {**changes, arch.kernel_nr_field: nr}), None)
    return RegisterEdit(_with(arch, regs, changes), nr)


def kernel_nr_from(arch: Arch, regs: ctypes.Structure, regset_value: int | None) -> int:
    """The number the kernel dispatches on (-1: not in a system call)."""
    if arch.kernel_nr_field:
        return signed64(get_reg(regs, arch.kernel_nr_field))
    if regset_value is None:
        raise ValueError(f"{arch.name} keeps the syscall number in a regset: pass its value")
    return regset_value


def substitute_execve(
    arch: Arch, entry_regs: ctypes.Structure, path: int, argv: int, envp: int
) -> RegisterEdit:
    """At a syscall-entry stop: turn whatever call this was into execve(path, argv, envp)."""
    first, second, third = arch.args[:3]
    return _edit(arch, entry_regs, {first: path, second: argv, third: envp}, arch.execve_nr)


def restore_at_entry(arch: Arch, entry_regs: ctypes.Structure, nr: int) -> RegisterEdit:
    """At the same entry stop: undo ``substitute_execve``; the original call then runs."""
    return _edit(arch, entry_regs, {}, nr)


def rewind_to_syscall(arch: Arch, regs: ctypes.Structure, nr: int) -> RegisterEdit:
    """Registers that make the task execute system call ``nr`` again when it resumes.

    ``regs`` must hold the call's arguments (the registers saved at its entry stop). The
    instruction pointer goes back over the system call instruction, the caller's number
    register gets ``nr`` back, and the kernel number becomes -1 so that the exit path does
    no restart fix-ups of its own.
    """
    ip = (get_reg(regs, arch.ip) - arch.syscall_insn_len) & U64_MASK
    return _edit(arch, regs, {arch.ip: ip, arch.nr: nr}, -1)


def blocked_syscall(arch: Arch, regs: ctypes.Structure, kernel_nr: int) -> int | None:
    """At an interrupt stop: the call the task was blocked in, if the interrupt woke one.

    A task woken out of a blocking call stops with its number still in the kernel's slot
    and a restart code (or, for a few waits, -EINTR) in the return register. A task that
    was running in userspace stops with kernel number -1.
    """
    if kernel_nr < 0:
        return None
    returned = -signed64(get_reg(regs, arch.ret))
    if returned in RESTART_CODES or returned == EINTR:
        return kernel_nr
    return None


def undo_spurious_eintr(arch: Arch, regs: ctypes.Structure, kernel_nr: int) -> RegisterEdit | None:
    """At an interrupt stop: registers that re-run a wait our interrupt made fail with EINTR.

    Only for the waits in ``EINTR_ON_INTERRUPT``, and only where the arguments are still in
    their registers (not aarch64, whose return value has overwritten x0). The caller must
    also have checked that no signal is pending that would explain the EINTR.
    """
    if arch.return_clobbers_arg0 or kernel_nr < 0:
        return None
    if signed64(get_reg(regs, arch.ret)) != -EINTR:
        return None
    if syscall_name(arch, kernel_nr) not in EINTR_ON_INTERRUPT:
        return None
    return rewind_to_syscall(arch, regs, kernel_nr)


# --- the execve block written below the stack pointer ----------------------------------


@dataclasses.dataclass(frozen=True)
class ExecBlock:
    """``argv[]``, ``envp[]`` and their strings, laid out for one address ``base``."""

    base: int
    data: bytes
    path: int
    argv: int
    envp: int


def exec_block_size(arch: Arch, path: str, argv: Sequence[str], envp: Sequence[str]) -> int:
    pointers = (len(argv) + 1 + len(envp) + 1) * arch.pointer_size
    strings = sum(len(text.encode()) + 1 for text in (path, *argv, *envp))
    return pointers + strings


def scratch_base(arch: Arch, sp: int, size: int) -> int:
    """Where the block goes: below sp, past the red zone, aligned down."""
    return (sp - arch.red_zone - size) & ~(arch.stack_align - 1)


def build_exec_block(
    arch: Arch, base: int, path: str, argv: Sequence[str], envp: Sequence[str]
) -> ExecBlock:
    """Layout: argv pointers, NULL, envp pointers, NULL, then the NUL-terminated strings.

    The pointer arrays come first so that they sit on the aligned ``base``.
    """
    pointer = {8: "<Q", 4: "<I"}[arch.pointer_size]
    argv_at = base
    envp_at = argv_at + (len(argv) + 1) * arch.pointer_size
    cursor = envp_at + (len(envp) + 1) * arch.pointer_size

    strings = bytearray()
    addresses: list[int] = []
    for text in (path, *argv, *envp):
        addresses.append(cursor + len(strings))
        strings += text.encode() + b"\0"
    path_at, argv_addrs, envp_addrs = (
        addresses[0],
        addresses[1 : 1 + len(argv)],
        addresses[1 + len(argv) :],
    )

    data = b"".join(struct.pack(pointer, a) for a in (*argv_addrs, 0, *envp_addrs, 0))
    return ExecBlock(
        base=base, data=data + bytes(strings), path=path_at, argv=argv_at, envp=envp_at
    )
