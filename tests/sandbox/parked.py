"""The stand-in init (``injector/rehearsal/standin.py``) with the tests' own modes and hooks.

The one stand-in program, run as PID 1 of a PID namespace by ``tests/sandbox/parking.py``
(``StandIn``, and ``ParkedSandbox``: a rehearsal sandbox running this program):
``python -I -S -c BOOT --idle MODE --ready-fd N ...`` calls :func:`main` with the engine's
folder and this repository's on ``sys.path`` (in the VM guest the engine is installed apart
from the tests). What is here is the tests' own (no rehearsal idles like this), so it lives
here and is handed to ``standin.main``.

Hooks, in every mode: SIGUSR1 makes PID 1 exit with status ``EXIT_ON_SIGUSR1`` (7), saying
so (modes with their own SIGUSR1 handler replace it). Python runs a handler between
bytecodes, so a SIGUSR1 that lands just before ``wait4`` is entered waits there until
something else interrupts it: senders repeat it (``ParkedSandbox.request_exit``).

``read``        the rehearsal's stand-in, but idling in ``read(0)``: echoes what arrives on
                stdin as ``standin: read b'...'``; the line ``exit N`` makes it exit N, and
                ``run COMMAND`` runs ``/bin/sh -c COMMAND`` as a child of PID 1 (so with
                everything PID 1's children get), its output on the console; reaps in a
                SIGCHLD handler; on end of file it falls back to ``wait``.

The parking modes each park PID 1 in a known way, talk raw bytes on stdout (the test's pipe)
and say ``<ready>`` once nothing but their parking system call is left to run:

``read-echo``   ``read(0)`` through libc, so that an error, EINTR included, is told
                (``<error N>``) instead of being retried by Python; echoes what it reads;
                SIGUSR1 only says ``<usr1>``;
``epoll-echo``  ``epoll_wait`` on stdin, then read and echo;
``wait4``       the rehearsal's own ``wait`` (with a service to wait for);
``nanosleep``   a relative nanosleep: interrupted, the kernel restarts it as restart_syscall;
``sleep``       an absolute clock_nanosleep (``time.sleep``'s from Python 3.11), which restarts
                as itself;
``busy``        spinning in userspace, with a getpid(2) now and then;
``spin``        spinning in userspace without ever making a system call.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

from injector.rehearsal import standin

EXIT_ON_SIGUSR1 = 7
RUN_PREFIX = b"run "
READ = "read"
READY = b"<ready>"
READ_ECHO, EPOLL_ECHO, WAIT4 = "read-echo", "epoll-echo", "wait4"
SLEEP_RELATIVE, SLEEP_ABSOLUTE, BUSY, SPIN = "nanosleep", "sleep", "busy", "spin"
EPOLL_CTL_ADD, EPOLLIN = 1, 1
CLOCK_MONOTONIC, TIMER_ABSTIME = 1, 1
libc = ctypes.CDLL(None, use_errno=True)


def tell(data: bytes) -> None:
    os.write(1, data)


def exit_on_sigusr1(signum: int, frame: object) -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # once: the sender may repeat it
    standin.say(f"SIGUSR1: exiting {EXIT_ON_SIGUSR1}")
    sys.exit(EXIT_ON_SIGUSR1)


def read_then_wait() -> None:
    """The ``read`` mode: stdin's lines until its end, then the rehearsal's own ``wait``."""
    signal.signal(signal.SIGCHLD, lambda signum, frame: standin.reap_all(block=False))
    while data := os.read(0, 4096):
        standin.say(f"read {data!r}")
        if data.startswith(RUN_PREFIX):
            run_command(data.removeprefix(RUN_PREFIX).decode().strip())
            continue
        words = data.split()
        if len(words) == 2 and words[0] == b"exit" and words[1].isdigit():
            sys.exit(int(words[1]))
    standin.say("stdin closed, idling in wait4")
    signal.signal(signal.SIGCHLD, standin.ignore)
    standin.idle_waiting()


def run_command(command: str) -> None:
    """The ``run`` hook: ``/bin/sh -c COMMAND`` as a child of PID 1; not waited for here
    (the SIGCHLD reaper says how it ended)."""
    if os.fork() == 0:
        try:
            standin.become_child()
            os.execv("/bin/sh", ["/bin/sh", "-c", command])
        finally:
            os._exit(127)


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
    # Through libc: Python's own time.sleep is this only from 3.11 (before, it waits in select).
    deadline = (ctypes.c_long * 2)()
    libc.clock_gettime(CLOCK_MONOTONIC, deadline)
    deadline[0] += 3600
    tell(READY)
    while libc.clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, deadline, None) != 0:
        pass  # EINTR: a handler runs here; then back to sleep until the same deadline


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


MODES: dict[str, Callable[[], None]] = {
    **standin.IDLES,
    READ: read_then_wait,
    READ_ECHO: read_echo,
    EPOLL_ECHO: epoll_echo,
    WAIT4: wait4,
    SLEEP_RELATIVE: nanosleep,
    SLEEP_ABSOLUTE: sleep,
    BUSY: busy,
    SPIN: spin,
}


def main() -> None:
    # Before the services start: become_child() takes it off them, as any handler of PID 1.
    signal.signal(signal.SIGUSR1, exit_on_sigusr1)
    standin.main(MODES)
