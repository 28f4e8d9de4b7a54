"""Thin ctypes wrappers for the syscalls the stdlib lacks: the project's one syscall module.

Every wrapper raises ``OSError`` with the errno and a message that names the call and
its path, e.g. ``[Errno 22] pivot_root('.', '.'): Invalid argument``. libc is loaded
once, at import: the stage imports this module before the pivot, when the old root
(and the libc file behind ``CDLL(None)``) is still reachable. ``injector/`` takes libc and
the mount, clone and prctl constants from here too (it may import initstage, not the reverse).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import struct

libc = ctypes.CDLL(None, use_errno=True)

# include/uapi/linux/mount.h
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 0x2
# include/uapi/linux/sched.h, prctl.h
CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1

# Magic numbers of include/uapi/linux/magic.h, for "is this already mounted here?".
PROC_SUPER_MAGIC = 0x9FA0
RAMFS_MAGIC = 0x858458F6

# The calls the stage itself makes by number. Kept by hand because initstage is stdlib only
# (it runs as PID 1, past the pivot); injector/inject/arch.py takes every number from
# python-ptrace's tables, and tests/unit/test_arch.py checks these three against them.
_SYSCALLS: dict[str, dict[str, int]] = {
    "x86_64": {"pivot_root": 155, "close_range": 436, "rt_sigaction": 13},
    "aarch64": {"pivot_root": 41, "close_range": 436, "rt_sigaction": 134},
}
MACHINE = os.uname().machine

# Console and VT ioctls (include/uapi/linux/vt.h, kd.h, asm-generic/ioctls.h).
VT_GETSTATE = 0x5603
VT_ACTIVATE = 0x5606
KDSETMODE = 0x4B3A
KD_TEXT = 0x00
TIOCSCTTY = 0x540E
TIOCGDEV = 0x80045432

libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
libc.unshare.argtypes = [ctypes.c_int]
libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
libc.syncfs.argtypes = [ctypes.c_int]


def _fail(call: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{call}: {os.strerror(err)}")


def _b(text: str | None) -> bytes | None:
    return None if text is None else os.fsencode(text)


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    if libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        raise _fail(f"mount({source!r} on {target!r}, type {fstype!r}, flags {flags:#x})")


def umount2(target: str, flags: int = 0) -> None:
    if libc.umount2(_b(target), flags) != 0:
        raise _fail(f"umount2({target!r}, {flags:#x})")


def syscall_number(name: str) -> int:
    try:
        return _SYSCALLS[MACHINE][name]
    except KeyError:
        raise OSError(errno.ENOSYS, f"{name}: no syscall number known for {MACHINE}") from None


def pivot_root(new_root: str, put_old: str) -> None:
    number = syscall_number("pivot_root")
    if libc.syscall(ctypes.c_long(number), _b(new_root), _b(put_old)) != 0:
        raise _fail(f"pivot_root({new_root!r}, {put_old!r})")


class _KernelSigaction(ctypes.Structure):
    """The kernel's struct sigaction (not libc's): handler, flags, restorer, 64-bit mask."""

    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("restorer", ctypes.c_void_p),
        ("mask", ctypes.c_uint64),
    ]


def default_disposition(signum: int) -> None:
    """SIG_DFL for ``signum`` through the raw syscall: libc (and so Python) refuses the
    signals it reserves for itself (32, 33), yet an ignored one is inherited across execve."""
    action = _KernelSigaction(None, 0, None, 0)
    number = syscall_number("rt_sigaction")
    if libc.syscall(ctypes.c_long(number), signum, ctypes.byref(action), None, 8) != 0:
        raise _fail(f"rt_sigaction({signum}, SIG_DFL)")


CLOSE_RANGE_CLOEXEC = 1 << 2


def close_range(first: int, last: int = 0xFFFFFFFF, *, cloexec: bool = False) -> None:
    """Close (or with ``cloexec`` mark close-on-exec) every fd in [first, last].

    Kernels before 5.9 (close_range) or 5.11 (CLOSE_RANGE_CLOEXEC) get a loop instead.
    """
    number = syscall_number("close_range")
    flags = CLOSE_RANGE_CLOEXEC if cloexec else 0
    args = (ctypes.c_uint(first), ctypes.c_uint(last), ctypes.c_uint(flags))
    if libc.syscall(ctypes.c_long(number), *args) == 0:
        return
    if ctypes.get_errno() not in (errno.ENOSYS, errno.EINVAL):
        raise _fail(f"close_range({first}, {last:#x}, {flags:#x})")
    for fd in range(first, min(last + 1, os.sysconf("SC_OPEN_MAX"))):
        try:
            if cloexec:
                os.set_inheritable(fd, False)
            else:
                os.close(fd)
        except OSError:
            pass  # EBADF: not open


def die_with_parent(parent: int | None = None) -> None:
    """SIGKILL this process when its parent dies; exit now, saying so on stderr, if the
    parent is already gone (we were reparented before prctl took effect).

    ``parent`` is the parent's pid, which the parent knows (its ``os.getpid()`` before it
    forked or spawned us): pass it whenever you can. Without it, a parent of pid 1 is taken
    for init having adopted us, which is wrong when the parent really is PID 1 (a dboot that
    is a container's entrypoint, or PID 1 of a namespace)."""
    expected = os.getppid() if parent is None else parent
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise _fail("prctl(PR_SET_PDEATHSIG)")
    now = os.getppid()
    if now != expected or (parent is None and now == 1):
        why = (
            f"pid {os.getpid()}: its parent pid {expected} is gone (now pid {now}): exiting"
            if now != expected
            else f"pid {os.getpid()}: its parent is pid 1, taken for init that adopted it"
            " (its caller must pass die_with_parent the parent's pid): exiting"
        )
        with contextlib.suppress(OSError):
            os.write(2, f"{why}\n".encode())
        os._exit(1)


def setns(fd: int, nstype: int) -> None:
    if libc.setns(fd, nstype) != 0:
        raise _fail(f"setns({fd}, {nstype:#x})")


def swapon(path: str) -> None:
    """Turn swap area ``path`` on at the default priority."""
    if libc.swapon(os.fsencode(path), 0) != 0:
        raise _fail(f"swapon({path!r})")


def swapoff(path: str) -> None:
    if libc.swapoff(os.fsencode(path)) != 0:
        raise _fail(f"swapoff({path!r})")


def unshare(flags: int) -> None:
    if libc.unshare(flags) != 0:
        raise _fail(f"unshare({flags:#x})")


def syncfs(path: str) -> None:
    """Flush the one filesystem that holds ``path`` (a directory)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if libc.syncfs(fd) != 0:
            raise _fail(f"syncfs({path!r})")
    finally:
        os.close(fd)


def statfs_type(path: str) -> int:
    """The filesystem magic of ``path`` (struct statfs starts with a long f_type)."""
    buffer = ctypes.create_string_buffer(256)  # sizeof(struct statfs) is 120 on 64-bit
    if libc.statfs(_b(path), buffer) != 0:
        raise _fail(f"statfs({path!r})")
    return int(ctypes.c_long.from_buffer(buffer).value)


def ioctl_int(fd: int, request: int, arg: int, what: str) -> int:
    """An ioctl taking an int argument; ``what`` names the device in the error."""
    try:
        return fcntl.ioctl(fd, request, arg)
    except OSError as error:
        raise OSError(error.errno, f"ioctl({what}, {request:#x}): {error.strerror}") from None


def active_vt(fd: int) -> int:
    """The number of the foreground VT (VT_GETSTATE fills struct vt_stat: 3 shorts)."""
    try:
        raw = fcntl.ioctl(fd, VT_GETSTATE, bytes(6))
    except OSError as error:
        raise OSError(error.errno, f"ioctl(VT_GETSTATE): {error.strerror}") from None
    return int(struct.unpack("HHH", raw)[0])


def tty_device(fd: int) -> tuple[int, int]:
    """The (major, minor) of the real terminal behind ``fd``: /dev/console -> ttyS0, tty0 ..."""
    raw = fcntl.ioctl(fd, TIOCGDEV, bytes(4))
    device = struct.unpack("I", raw)[0]
    return os.major(device), os.minor(device)
