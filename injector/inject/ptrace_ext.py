"""python-ptrace, plus the few ptrace(2) pieces it lacks.

python-ptrace 0.9.9 gives the classic requests, options, events, ``NT_PRSTATUS`` and
``struct iovec``; it predates ``PTRACE_SEIZE``/``PTRACE_INTERRUPT`` (Linux 3.4),
``PTRACE_GET_SYSCALL_INFO`` (5.3) and arm64's ``NT_ARM_SYSTEM_CALL`` regset. Those are
defined here, on top of its raw ``ptrace()``, and nowhere else (<linux/ptrace.h>, <elf.h>).
"""

from __future__ import annotations

import ctypes

from ptrace.binding.func import (
    NT_PRSTATUS,
    PTRACE_DETACH,
    PTRACE_EVENT_EXEC,
    PTRACE_GETREGSET,
    PTRACE_O_TRACEEXEC,
    PTRACE_O_TRACESYSGOOD,
    PTRACE_SETREGSET,
    PTRACE_SYSCALL,
)
from ptrace.binding.linux_struct import iovec_struct as Iovec

__all__ = [
    "NT_PRSTATUS",
    "PTRACE_DETACH",
    "PTRACE_EVENT_EXEC",
    "PTRACE_GETREGSET",
    "PTRACE_O_TRACEEXEC",
    "PTRACE_O_TRACESYSGOOD",
    "PTRACE_SETREGSET",
    "PTRACE_SYSCALL",
    "Iovec",
]

PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_EVENT_STOP = 128  # a group-stop or PTRACE_INTERRUPT's stop of a seized tracee

PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2

NT_ARM_SYSTEM_CALL = 0x404  # arm64: the number the kernel dispatches on, as an int regset

WAIT_ALL = 0x40000000  # __WALL: a tracee is reported whatever kind of child it is

REQUEST_NAMES = {
    PTRACE_SYSCALL: "PTRACE_SYSCALL",
    PTRACE_DETACH: "PTRACE_DETACH",
    PTRACE_GETREGSET: "PTRACE_GETREGSET",
    PTRACE_SETREGSET: "PTRACE_SETREGSET",
    PTRACE_SEIZE: "PTRACE_SEIZE",
    PTRACE_INTERRUPT: "PTRACE_INTERRUPT",
    PTRACE_GET_SYSCALL_INFO: "PTRACE_GET_SYSCALL_INFO",
}


class SyscallInfo(ctypes.Structure):
    """``struct ptrace_syscall_info``: 24 bytes of header, then a union of six u64 args+."""

    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("data", ctypes.c_uint64 * 8),  # entry: nr, args[6]; exit: rval, is_error
    ]
