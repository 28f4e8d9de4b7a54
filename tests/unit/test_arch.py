"""The per-architecture tables and the register logic, for x86_64 and aarch64.

Pure functions on bytes: the aarch64 cases run here on x86_64 because nothing in them
touches a process. Register blocks are built from raw bytes laid out as the kernel's
NT_PRSTATUS regset would hand them over.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import struct
from pathlib import Path

import pytest

from initstage import linux
from injector.inject import arch as archmod
from injector.inject.arch import AARCH64, X86_64, Arch

U64_MAX = (1 << 64) - 1


def x86_64_regs(**values: int) -> bytes:
    """A user_regs_struct as bytes, fields by name (27 u64, kernel order)."""
    names = [name for name, _ in archmod.X86_64Regs._fields_]
    return struct.pack("<27Q", *(values.get(name, 0) & U64_MAX for name in names))


def aarch64_regs(x: dict[int, int], sp: int, pc: int, pstate: int = 0) -> bytes:
    """A user_pt_regs as bytes: regs[31], sp, pc, pstate."""
    return struct.pack("<34Q", *(x.get(n, 0) & U64_MAX for n in range(31)), sp, pc, pstate)


# --- the tables ---------------------------------------------------------------------------


def test_x86_64_table() -> None:
    assert X86_64.regs_size == 216
    assert (X86_64.ip, X86_64.sp, X86_64.nr, X86_64.ret) == ("rip", "rsp", "rax", "rax")
    assert X86_64.args == ("rdi", "rsi", "rdx", "r10", "r8", "r9")
    assert (X86_64.syscall_insn_len, X86_64.execve_nr, X86_64.red_zone) == (2, 59, 128)
    assert X86_64.stack_align == 16
    assert (X86_64.kernel_nr_field, X86_64.kernel_nr_regset) == ("orig_rax", None)
    assert X86_64.audit_arch == 0xC000003E
    assert not X86_64.return_clobbers_arg0


def test_aarch64_table() -> None:
    assert AARCH64.regs_size == 272
    assert (AARCH64.ip, AARCH64.sp, AARCH64.nr, AARCH64.ret) == ("pc", "sp", "x8", "x0")
    assert AARCH64.args == ("x0", "x1", "x2", "x3", "x4", "x5")
    assert (AARCH64.syscall_insn_len, AARCH64.execve_nr, AARCH64.red_zone) == (4, 221, 0)
    assert AARCH64.stack_align == 16
    assert (AARCH64.kernel_nr_field, AARCH64.kernel_nr_regset) == (None, 0x404)
    assert AARCH64.audit_arch == 0xC00000B7
    assert AARCH64.return_clobbers_arg0


def test_a_table_must_say_how_the_number_is_changed() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(X86_64, kernel_nr_regset=0x404)
    with pytest.raises(ValueError, match="exactly one"):
        dataclasses.replace(AARCH64, kernel_nr_regset=None)


def test_register_layouts_match_the_kernel_offsets() -> None:
    # Offsets from <sys/user.h> and <asm/ptrace.h>.
    x86 = archmod.X86_64Regs
    assert (x86.rax.offset, x86.orig_rax.offset, x86.rip.offset, x86.rsp.offset) == (
        80,
        120,
        128,
        152,
    )
    arm = archmod.AArch64Regs
    assert (arm.x0.offset, arm.x8.offset, arm.sp.offset, arm.pc.offset) == (0, 64, 248, 256)


@pytest.mark.parametrize(
    ("arch", "expected"),
    [
        (X86_64, {"read": 0, "wait4": 61, "epoll_wait": 232, "restart_syscall": 219}),
        (AARCH64, {"read": 63, "wait4": 260, "epoll_pwait": 22, "restart_syscall": 128}),
    ],
)
def test_syscall_names_where_pid1_idles(arch: Arch, expected: dict[str, int]) -> None:
    for name, nr in expected.items():
        assert archmod.syscall_name(arch, nr) == name
        assert archmod.syscall_number(arch, name) == nr
    assert archmod.syscall_name(arch, arch.execve_nr) == "execve"
    assert archmod.syscall_name(arch, 99999) == "syscall_99999"
    with pytest.raises(KeyError):
        archmod.syscall_number(arch, "no_such_call")


HEADERS = {
    "x86_64": Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
    "aarch64": Path("/usr/include/asm-generic/unistd.h"),
}
# asm-generic's generic name where the 64-bit kernel (and strace) use another.
HEADER_SPELLING = {("aarch64", "newfstatat"): "fstatat"}


def header_syscalls(arch: Arch) -> dict[int, str]:
    """Number -> name as the kernel headers define them for a 64-bit task of ``arch``."""
    header = HEADERS[arch.name]
    if not header.exists():
        pytest.fail(f"{header} not installed: apt-get install linux-libc-dev", pytrace=False)
    # asm-generic spells a few as __NR3264_<name> (fcntl ...); the 64-bit time calls (403 to
    # 423: clock_gettime64 ...) and the table's own size exist only for 32-bit tasks.
    defined = re.findall(r"^#define __NR(?:3264)?_(\w+)\s+(\d+)\s*$", header.read_text(), re.M)
    return {
        int(nr): name
        for name, nr in defined
        if not 403 <= int(nr) <= 423 and name not in ("syscalls", "arch_specific_syscall")
    }


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda arch: arch.name)
def test_syscall_numbers_agree_with_the_kernel_headers(arch: Arch) -> None:
    kernel = header_syscalls(arch)
    for nr, name in arch.syscalls.items():
        assert kernel.get(nr) == HEADER_SPELLING.get((arch.name, name), name), f"{nr} {name}"


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda arch: arch.name)
def test_every_system_call_of_the_kernel_headers_has_a_name(arch: Arch) -> None:
    """A report must never say ``syscall_178``: an arm64 run once named gettid so."""
    unnamed = {nr: name for nr, name in header_syscalls(arch).items() if nr not in arch.syscalls}
    assert not unnamed, f"{arch.name} table lacks {unnamed}"
    assert archmod.syscall_name(AARCH64, 178) == "gettid"


def test_host_arch_names() -> None:
    assert archmod.host_arch("x86_64") is X86_64
    assert archmod.host_arch("amd64") is X86_64
    assert archmod.host_arch("aarch64") is AARCH64
    assert archmod.host_arch("arm64") is AARCH64
    with pytest.raises(archmod.UnsupportedArch, match="riscv64 is not supported"):
        archmod.host_arch("riscv64")


# --- x86_64 register logic ----------------------------------------------------------------

READ_ENTRY_X86 = x86_64_regs(
    rip=0x7F0000001002,
    rsp=0x7FFD00001000,
    rax=-38,  # -ENOSYS, as at every syscall-entry stop
    orig_rax=0,  # read
    rdi=3,
    rsi=0x5555000,
    rdx=4096,
    rcx=0x7F0000001002,
    r11=0x246,
)


def test_x86_64_execve_substitution() -> None:
    entry = archmod.regs_from_bytes(X86_64, READ_ENTRY_X86)
    edit = archmod.substitute_execve(X86_64, entry, path=0x1000, argv=0x2000, envp=0x3000)
    assert edit.kernel_nr is None  # the number travels in orig_rax
    regs = edit.regs
    assert (regs.orig_rax, regs.rdi, regs.rsi, regs.rdx) == (59, 0x1000, 0x2000, 0x3000)
    assert (regs.rip, regs.rsp, regs.rax) == (entry.rip, entry.rsp, entry.rax)
    assert entry.orig_rax == 0, "the saved entry registers must not change"
    undone = archmod.restore_at_entry(X86_64, entry, 0)
    assert archmod.regs_to_bytes(undone.regs) == READ_ENTRY_X86


def test_x86_64_rollback_rewinds_to_the_syscall_instruction() -> None:
    entry = archmod.regs_from_bytes(X86_64, READ_ENTRY_X86)
    edit = archmod.rewind_to_syscall(X86_64, entry, 0)
    regs = edit.regs
    assert regs.rip == 0x7F0000001000  # back over `syscall`
    assert regs.rax == 0  # read's number, where the caller keeps it
    assert regs.orig_rax == U64_MAX  # -1: not in a system call, no restart fix-ups
    assert (regs.rdi, regs.rsi, regs.rdx, regs.rsp) == (3, 0x5555000, 4096, 0x7FFD00001000)
    assert edit.kernel_nr is None
    shown = archmod.shown(X86_64, regs)
    assert list(shown) == ["rip", "rsp", "rax", "orig_rax", "rdi", "rsi", "rdx", "r10", "r8", "r9"]
    assert (shown["rax"], shown["orig_rax"]) == (0, -1)


def test_x86_64_interrupt_stop_analysis() -> None:
    def at_stop(orig_rax: int, rax: int) -> tuple[int | None, bool]:
        regs = archmod.regs_from_bytes(X86_64, x86_64_regs(orig_rax=orig_rax, rax=rax, rip=0x10))
        kernel_nr = archmod.kernel_nr_from(X86_64, regs, None)
        rewind = archmod.undo_spurious_eintr(X86_64, regs, kernel_nr)
        return archmod.blocked_syscall(X86_64, regs, kernel_nr), rewind is not None

    assert at_stop(orig_rax=0, rax=-512) == (0, False)  # read: -ERESTARTSYS, kernel restarts
    assert at_stop(orig_rax=230, rax=-516) == (230, False)  # sleep: via restart_syscall
    assert at_stop(orig_rax=232, rax=-4) == (232, True)  # epoll_wait: EINTR, we rewind
    assert at_stop(orig_rax=0, rax=-4) == (0, False)  # read's EINTR is real: leave it
    assert at_stop(orig_rax=-1, rax=123) == (None, False)  # was in userspace
    assert at_stop(orig_rax=39, rax=4242) == (None, False)  # getpid had just returned


# --- aarch64 register logic ---------------------------------------------------------------

READ_ENTRY_ARM = aarch64_regs(
    {0: 3, 1: 0x5555000, 2: 4096, 7: 0, 8: 63}, sp=0xFFFF0000, pc=0x400104
)


def test_aarch64_regs_from_bytes() -> None:
    regs = archmod.regs_from_bytes(AARCH64, READ_ENTRY_ARM)
    assert (regs.x0, regs.x8, regs.sp, regs.pc) == (3, 63, 0xFFFF0000, 0x400104)
    assert archmod.regs_to_bytes(regs) == READ_ENTRY_ARM
    with pytest.raises(ValueError, match="272 bytes"):
        archmod.regs_from_bytes(AARCH64, READ_ENTRY_ARM[:-8])


def test_aarch64_execve_substitution_goes_through_the_system_call_regset() -> None:
    entry = archmod.regs_from_bytes(AARCH64, READ_ENTRY_ARM)
    edit = archmod.substitute_execve(AARCH64, entry, path=0x1000, argv=0x2000, envp=0x3000)
    assert edit.kernel_nr == 221  # written with PTRACE_SETREGSET NT_ARM_SYSTEM_CALL
    regs = edit.regs
    assert (regs.x0, regs.x1, regs.x2) == (0x1000, 0x2000, 0x3000)
    assert (regs.x8, regs.pc, regs.sp) == (63, 0x400104, 0xFFFF0000)  # x8 is not the lever


def test_aarch64_rollback_rewinds_over_svc_and_restores_x0() -> None:
    entry = archmod.regs_from_bytes(AARCH64, READ_ENTRY_ARM)
    # At the exit stop the failed execve's -ENOENT sits in x0; the rewind starts from the
    # registers saved at entry, so x0 is the original first argument again.
    edit = archmod.rewind_to_syscall(AARCH64, entry, 63)
    regs = edit.regs
    assert regs.pc == 0x400100  # back over `svc #0`
    assert (regs.x8, regs.x0, regs.x1, regs.x2) == (63, 3, 0x5555000, 4096)
    assert edit.kernel_nr == -1  # NT_ARM_SYSTEM_CALL: not in a system call any more
    assert list(archmod.shown(AARCH64, regs)) == [
        "pc",
        "sp",
        "x8",
        "x0",
        "x1",
        "x2",
        "x3",
        "x4",
        "x5",
    ]


def test_aarch64_interrupt_stop_analysis() -> None:
    regs = archmod.regs_from_bytes(AARCH64, aarch64_regs({0: -512, 8: 63}, sp=0, pc=0x10))
    with pytest.raises(ValueError, match="regset"):
        archmod.kernel_nr_from(AARCH64, regs, None)
    assert archmod.kernel_nr_from(AARCH64, regs, 63) == 63
    assert archmod.blocked_syscall(AARCH64, regs, 63) == 63
    assert archmod.blocked_syscall(AARCH64, regs, -1) is None
    # epoll_pwait's EINTR cannot be undone here: x0 (its first argument) is overwritten.
    eintr = archmod.regs_from_bytes(AARCH64, aarch64_regs({0: -4, 8: 22}, sp=0, pc=0x10))
    assert archmod.blocked_syscall(AARCH64, eintr, 22) == 22
    assert archmod.undo_spurious_eintr(AARCH64, eintr, 22) is None


# --- the execve block ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda arch: arch.name)
def test_exec_block_layout(arch: Arch) -> None:
    path, argv, envp = "/usr/bin/python3", ["python3", "-I", "-m", "initstage"], ["A=1", "B="]
    size = archmod.exec_block_size(arch, path, argv, envp)
    sp = 0x7FFD0000123C
    base = archmod.scratch_base(arch, sp, size)
    assert base % arch.stack_align == 0
    assert base + size <= sp - arch.red_zone  # nothing in the red zone
    assert sp - arch.red_zone - base - size < arch.stack_align

    block = archmod.build_exec_block(arch, base, path, argv, envp)
    assert len(block.data) == size and block.base == base and block.argv == base

    def at(address: int, length: int) -> bytes:
        return block.data[address - base : address - base + length]

    def string_at(address: int) -> str:
        rest = block.data[address - base :]
        return rest[: rest.index(b"\0")].decode()

    def pointers_at(address: int) -> list[int]:
        found = []
        while (value := struct.unpack("<Q", at(address, 8))[0]) != 0:
            found.append(value)
            address += 8
        return found

    assert string_at(block.path) == path
    assert [string_at(p) for p in pointers_at(block.argv)] == argv
    assert [string_at(p) for p in pointers_at(block.envp)] == envp
    assert block.envp == block.argv + (len(argv) + 1) * 8


def test_exec_block_with_empty_environment() -> None:
    block = archmod.build_exec_block(X86_64, 0x1000, "/bin/sh", ["sh"], [])
    assert struct.unpack_from("<QQQ", block.data) == (block.path + len(b"/bin/sh\0"), 0, 0)
    assert block.envp == 0x1010


def test_signed64() -> None:
    assert archmod.signed64(U64_MAX) == -1
    assert archmod.signed64((-2) & U64_MAX) == -2
    assert archmod.signed64(59) == 59


@pytest.mark.parametrize("arch", [X86_64, AARCH64], ids=lambda arch: arch.name)
def test_the_stages_hand_kept_syscall_numbers_agree_with_the_tables(arch: Arch) -> None:
    """initstage is stdlib only, so it keeps the few numbers it calls; they must not drift."""
    for name, nr in linux._SYSCALLS[arch.name].items():
        assert archmod.syscall_number(arch, name) == nr, name


def test_the_host_register_layout_matches_python_ptraces() -> None:
    """arch.py keeps both layouts (python-ptrace has only the host's); the host's must agree."""
    from ptrace.binding.linux_struct import user_regs_struct

    host = archmod.host_arch()
    assert ctypes.sizeof(host.regs_type) == ctypes.sizeof(user_regs_struct)
