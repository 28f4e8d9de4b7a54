"""The stand-in init (``injector/rehearsal/standin.py``) with the injection tests' parking modes.

The one stand-in program, run as PID 1 of a PID namespace by ``tests/sandbox/parking.py``:
``python -I -S -c BOOT --idle MODE --ready-fd N ...`` calls :func:`main` with the engine's
folder and this repository's on ``sys.path`` (in the VM guest the engine is installed apart
from the tests). These modes are the tests' own (no rehearsal idles like this), so they live
here and are handed to ``standin.main``. Each one parks PID 1 in a known way, talks raw bytes
on stdout (the test's pipe) and says ``<ready>`` once nothing but its parking system call is
left to run:

``read-echo``   ``read(0)`` through libc, so that an error, EINTR included, is told
                (``<error N>``) instead of being retried by Python; echoes what it reads;
                SIGUSR1 only says ``<usr1>``;
``epoll-echo``  ``epoll_wait`` on stdin, then read and echo;
``wait4``       the rehearsal's own ``wait`` (with a service to wait for);
``nanosleep``   a relative nanosleep: interrupted, the kernel restarts it as restart_syscall;
``sleep``       ``time.sleep``: an absolute clock_nanosleep, which restarts as itself;
``busy``        spinning in userspace, with a getpid(2) now and then;
``spin``        spinning in userspace without ever making a system call.
"""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable

from injector.rehearsal import standin

READY = b"<ready>"
READ_ECHO, EPOLL_ECHO, WAIT4 = "read-echo", "epoll-echo", "wait4"
SLEEP_RELATIVE, SLEEP_ABSOLUTE, BUSY, SPIN = "nanosleep", "sleep", "busy", "spin"
EPOLL_CTL_ADD, EPOLLIN = 1, 1
libc = ctypes.CDLL(None, use_errno=True)


def tell(data: bytes) -> None:
    os.write(1, data)


def read_echo() -> None:
    signal.signal(signal.SIGUSR1, lambda signum, frame: tell(b"<usr1>"))
    buffer = ctypes.create_string_buffer(65536)
    tell(READY)
    while (count := libc.read(0, buffer, 65536)) != 0:
        tell(b"<error %d>" % ctypes.get_errno() if count < 0 else buffer.raw[:count])


def epoll_echo() -> None:
    epoll = libc.epoll_create1(0)
    libc.epoll_ctl(epoll, EPOLL_CTL_ADD, 0, (ctypes.c_uint32 * 4)(EPOLLIN, 0, 0, 0))
    ready = (ctypes.c_uint32 * 4)()
    tell(READY)
    while True:
        if libc.epoll_wait(epoll, ready, 1, -1) < 0:
            tell(b"<error %d>" % ctypes.get_errno())
            continue
        tell(os.read(0, 65536))


def wait4() -> None:
    tell(READY)
    standin.idle_waiting()


def nanosleep() -> None:
    hour = (ctypes.c_long * 2)(3600, 0)
    tell(READY)
    libc.nanosleep(ctypes.byref(hour), None)


def sleep() -> None:
    tell(READY)
    time.sleep(3600)


def busy() -> None:
    tell(READY)
    while True:
        for _ in range(20000):
            pass
        os.getpid()


def spin() -> None:
    tell(READY)
    while True:
        pass


PARKING: dict[str, Callable[[], None]] = {
    READ_ECHO: read_echo,
    EPOLL_ECHO: epoll_echo,
    WAIT4: wait4,
    SLEEP_RELATIVE: nanosleep,
    SLEEP_ABSOLUTE: sleep,
    BUSY: busy,
    SPIN: spin,
}


def main() -> None:
    standin.main({**standin.IDLES, **PARKING})
