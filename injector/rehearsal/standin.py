"""The stand-in init: PID 1 of a rehearsal sandbox, the process a rehearsal injects into.

Run as ``python -I -S standin.py ...`` by ``injector.rehearsal.sandbox``: stdlib only, imports
nothing from this package (``-I`` leaves the script's folder off ``sys.path``). It behaves like a
small, slightly careless init so that the init stage meets the same things it meets on a
real host:

- it names its system (``--hostname``) and starts a few child "services", each a forked
  copy of itself named ``svc-<kind>`` (``/proc/PID/comm``):
    ``stubborn``  ignores SIGTERM: only the stage's SIGKILL ends it;
    ``zombies``   forks a short-lived child every ``--zombie-period`` seconds and never
                  reaps it (a buggy daemon): its zombies pile up under it, at most
                  ``MAX_ZOMBIES``; when it dies they are reparented to PID 1, which reaps them;
    ``plain``     exits on SIGTERM like a well-behaved daemon;
    ``slow``      on SIGTERM takes ``SLOW_STOP_SECONDS`` to write its state, then exits (a
                  database's shutdown checkpoint);
- given ``--control-fd``, it obeys a **stop order** (the rehearsal's graceful stop, issue 19):
  the host writes ``stop CEILING`` on that socket and sends ``STOP_SIGNAL``; PID 1 stops its
  services as an init would, in the reverse of their start order, each with SIGTERM and its
  own timeout (``STOP_TIMEOUTS``), the whole bounded by the ceiling, and answers a line per
  service, named ``svc-KIND-N`` (the Nth started): ``stopped NAME PID SECONDS``, or ``left
  NAME PID timeout|ceiling`` (still running, for the stage's signals); then ``done SECONDS``.
  Then it idles again;
- it then idles in ``wait4(-1)``, where ptrace finds it: it reaps every child and orphan
  and says so (``--idle wait``, the one mode a rehearsal uses).
  ``main`` takes the table of idle modes: the tests run this same program with their own
  modes and hooks added (``tests/sandbox/parked.py``: reading stdin, epoll_wait, sleeps,
  spins, an exit on SIGUSR1...), so that only what a rehearsal uses lives here.

Hermetic (``initstage/hermetic.py``): before anything else it joins the delegated cgroup
``--cgroup`` and takes a cgroup namespace of its own, makes ``/proc/sys`` and
``/proc/sysrq-trigger`` read-only, replaces ``/sys`` by a read-only sysfs with the
delegated cgroup2 under it and ``/dev`` by a minimal one (plus ``kmsg``, where the init
stage logs, and ``console`` when the console is a terminal). Its children get no
CAP_MKNOD: only PID 1 keeps it, for the init stage's own minimal ``/dev``.

PID 1 of a PID namespace only receives the signals it has a handler for, so nothing
else can end it short of SIGKILL from outside.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import stat
import sys
import time
from collections.abc import Callable, Mapping

if not __package__:  # run as a script with -I: the repository is not on sys.path
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from initstage import hermetic, linux

MAX_ZOMBIES = 5
KMSG_NODE = ("kmsg", 1, 11)
SERVICE_KINDS = ("stubborn", "zombies", "plain", "slow")
# The stop order: each kind's own timeout (seconds), and how it stops.
STOP_TIMEOUTS = {"stubborn": 1.0, "zombies": 2.0, "plain": 2.0, "slow": 2.0}
SLOW_STOP_SECONDS = 0.5
STOP_COMMANDS = {
    "stubborn": "SIGTERM, which it ignores",
    "zombies": "SIGTERM",
    "plain": "SIGTERM",
    "slow": f"SIGTERM, then {SLOW_STOP_SECONDS:g} s writing its state",
}
STOP_SIGNAL = signal.SIGUSR2
STOP_POLL = 0.005
READY_LINE = "ready"


def say(text: str) -> None:
    """One line on the console. A single unbuffered write: the console is usually a pipe,
    and the SIGCHLD handler may say something while the main loop is saying something else."""
    os.write(1, f"standin: {text}\n".encode())


def become_child() -> None:
    """What every child of PID 1 gets: default signals (none of the handlers PID 1 set,
    the tests' hooks included), and no CAP_MKNOD (so no device node of its own making,
    hence no raw host device)."""
    hermetic.drop_capability(hermetic.CAP_MKNOD)
    for sig in signal.valid_signals():
        if callable(signal.getsignal(sig)):
            signal.signal(sig, signal.SIG_DFL)


def become_service(kind: str) -> None:
    """Turn a freshly forked child into a service: its name and signal dispositions."""
    become_child()
    if kind == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    elif kind == "slow":
        signal.signal(signal.SIGTERM, stop_slowly)
    with open("/proc/self/comm", "w") as comm:
        comm.write(f"svc-{kind}")


def stop_slowly(signum: int, frame: object) -> None:
    """A ``slow`` service's SIGTERM: its state written (time passes), then a clean exit."""
    time.sleep(SLOW_STOP_SECONDS)
    os._exit(0)


def serve(kind: str, zombie_period: float) -> None:
    """The body of one service; never returns."""
    if kind != "zombies":
        while True:
            signal.pause()
    zombies: list[int] = []
    while True:
        child = os.fork()
        if child == 0:
            os._exit(0)
        zombies.append(child)
        # Bounded, so a long rehearsal cannot run the namespace out of pids.
        if len(zombies) > MAX_ZOMBIES:
            os.waitpid(zombies.pop(0), 0)
        time.sleep(zombie_period)


def spawn_services(kinds: list[str], zombie_period: float, ready_fd: int) -> list[int]:
    """Fork the services; return once each has taken its name and signal dispositions."""
    started_read, started_write = os.pipe()
    pids = []
    for kind in kinds:
        pid = os.fork()
        if pid == 0:
            try:
                os.close(ready_fd)
                os.close(started_read)
                become_service(kind)
                os.write(started_write, b".")
                os.close(started_write)
                serve(kind, zombie_period)
            finally:
                os._exit(1)
        pids.append(pid)
    os.close(started_write)
    started = b""
    while len(started) < len(kinds) and (byte := os.read(started_read, 1)):
        started += byte
    os.close(started_read)
    return pids


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"


def reap_all(block: bool) -> None:
    """Reap children (services and orphans reparented to us), blocking in wait4 if asked."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            if not block:
                return
            # No child left: wait for one (an orphan reparented to us) without spinning.
            signal.pause()
            continue
        if pid == 0:
            return
        say(f"reaped pid {pid} ({describe(status)})")


def harden(cgroup: str | None) -> None:
    """Enter the delegated cgroup and a cgroup namespace, then the hermetic mounts (in our
    own, private mount namespace: ``unshare --mount --propagation private``)."""
    if cgroup:
        with open(f"{cgroup}/cgroup.procs", "w") as procs:
            procs.write("0")  # 0: the writer itself
        linux.unshare(hermetic.CLONE_NEWCGROUP)
    hermetic.make_proc_read_only()
    linux.umount2("/sys", hermetic.MNT_DETACH)
    hermetic.mount_read_only_sys()
    terminal = hermetic.open_console(1, os.ttyname(1)) if os.isatty(1) else None
    hermetic.mount_minimal_dev()
    name, major, minor = KMSG_NODE
    os.mknod(f"/dev/{name}", stat.S_IFCHR | 0o600, os.makedev(major, minor))
    hermetic.mount_devpts()
    if terminal is not None:
        hermetic.bind_console(terminal, "/dev/console")


class StopOrders:
    """PID 1's side of the stop order: the services it started (kind, pid), in start order,
    and the socket the orders come on. ``__call__`` is the STOP_SIGNAL handler."""

    def __init__(self, control_fd: int, services: list[tuple[str, int]]) -> None:
        self.control = socket.socket(fileno=control_fd)
        self.control.setblocking(False)
        self.services = services

    def __call__(self, signum: int, frame: object) -> None:
        try:
            order = self.control.recv(256).decode()
        except BlockingIOError:
            return  # a repeated signal (the host's, until we answer): no new order
        words = order.split()
        if len(words) != 2 or words[0] != "stop":
            self.reply(f"refused {order.strip()!r}")
            return
        self.stop_all(float(words[1]))

    def stop_all(self, ceiling: float) -> None:
        started = time.monotonic()
        deadline = started + ceiling
        self.reply(f"begin {len(self.services)}")
        for number, (kind, pid) in reversed(list(enumerate(self.services, 1))):
            name = service_name(kind, number)
            bound = min(STOP_TIMEOUTS[kind], deadline - time.monotonic())
            if bound <= 0:
                self.reply(f"left {name} {pid} ceiling")
                continue
            say(f"stop order: {name} (pid {pid}): SIGTERM, {bound:.1f} s to stop")
            os.kill(pid, signal.SIGTERM)
            status = wait_for_exit(pid, bound)
            if status is None:
                say(f"stop order: {name} (pid {pid}) still runs after {bound:.1f} s")
                why = "timeout" if bound >= STOP_TIMEOUTS[kind] else "ceiling"
                self.reply(f"left {name} {pid} {why}")
                continue
            say(f"stop order: {name} (pid {pid}) stopped ({describe(status)})")
            self.reply(f"stopped {name} {pid} {time.monotonic() - started:.3f}")
        self.reply(f"done {time.monotonic() - started:.3f}")

    def reply(self, line: str) -> None:
        self.control.setblocking(True)
        try:
            self.control.sendall(f"{line}\n".encode())
        finally:
            self.control.setblocking(False)


def service_name(kind: str, number: int) -> str:
    """How the stop order names a service: its kind and its place in the start order."""
    return f"svc-{kind}-{number}"


def wait_for_exit(pid: int, timeout: float) -> int | None:
    """Reap ``pid`` once it exits within ``timeout`` seconds: its wait status, else None."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # reaped already (by the idle loop): it is gone
        if reaped:
            return status
        if time.monotonic() >= deadline:
            return None
        time.sleep(STOP_POLL)


def ignore(signum: int, frame: object) -> None:
    """A handler that does nothing: SIGCHLD then wakes pause() (SIG_DFL would not)."""


def idle_waiting() -> None:
    reap_all(block=True)


# --idle MODE: what PID 1 does once it is ready, where ptrace finds it.
IDLES: Mapping[str, Callable[[], None]] = {"wait": idle_waiting}


def main(idles: Mapping[str, Callable[[], None]] = IDLES) -> None:
    parser = argparse.ArgumentParser(description="stand-in init for a dboot rehearsal")
    parser.add_argument("--hostname", default="dboot-rehearsal")
    parser.add_argument("--services", default="", help="comma-separated kinds")
    parser.add_argument("--zombie-period", type=float, default=0.2)
    parser.add_argument("--idle", choices=sorted(idles), default="wait")
    parser.add_argument("--ready-fd", type=int, required=True)
    parser.add_argument("--cgroup", help="the delegated cgroup (a host path) to join")
    parser.add_argument("--control-fd", type=int, help="the socket stop orders come on")
    args = parser.parse_args()
    kinds = [kind for kind in args.services.split(",") if kind]

    # Safety: everything below assumes new namespaces; as anything but a namespace's PID 1
    # (someone running this file by hand) it would rename the host.
    if os.getpid() != 1:
        print("standin: refusing to run: not PID 1 of a PID namespace", file=sys.stderr)
        sys.exit(3)
    harden(args.cgroup)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, ignore)
    socket.sethostname(args.hostname)
    pids = spawn_services(kinds, args.zombie_period, args.ready_fd)
    listing = "".join(f" {kind}={pid}" for kind, pid in zip(kinds, pids))
    say(f"pid 1 on {socket.gethostname()}, {len(pids)} services{listing}")
    if args.control_fd is not None:
        signal.signal(STOP_SIGNAL, StopOrders(args.control_fd, list(zip(kinds, pids))))
    os.write(args.ready_fd, f"{READY_LINE}\n".encode())
    os.close(args.ready_fd)

    idles[args.idle]()


if __name__ == "__main__":
    main()
