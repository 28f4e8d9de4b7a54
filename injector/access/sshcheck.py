"""``--ssh-check PORT``: prove the new root can be logged in to before the point of no return.

After the copy and the carry-over, the image's own sshd runs chrooted in the RAM root on PORT,
with the host keys and authorized_keys the switch carried in. The user logs in from another
terminal with the line we print (``HostKeyAlias`` makes ssh check the host key against the
machine's known_hosts entry, so the login also proves the host key came along). The run goes
on once sshd logged an accepted login, or when the front-end says go (Enter); Ctrl-C calls
the switch off like any fault before the commit. The sshd is stopped before the injection.

The sshd runs through a small helper (``python -m injector.access.sshcheck serve``): it joins
the target's mount and network namespaces (the RAM root lives in the one, the address in the
other), then makes a mount and a PID namespace of its own. In them, ``/dev``, ``/proc`` and a
``/run`` with ``/run/sshd`` are mounted over the RAM root's, so the RAM root itself is left as
copied, and sshd is PID 1 of its namespace: stopping it ends every session it started too.
The helper is a fresh single-threaded process, as ``setns(CLONE_NEWNS)`` requires.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from initstage import linux
from injector.access.facts import AccessFacts
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.events import Event, Log, Notice, StepDone, StepStarted

SSHD = "/usr/sbin/sshd"
LISTENING = re.compile(r"Server listening on \S+ port (\d+)")
ACCEPTED = re.compile(r"Accepted (\S+) for (\S+) from (\S+) port \d+")
# The proving session's end; until then (or LOGIN_LINGER), sshd stays so that its command runs.
DISCONNECTED = re.compile(r"Disconnected from|Received disconnect from|Connection closed by")
LOGIN_LINGER = 5.0
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
LAST_LINES = 5


# Given the instruction line and an event set once a login was accepted (or sshd died);
# returns when either that event is set or the user said go. True: go on; False: call off.
GoCallback = Callable[[str, threading.Event], bool]


def check_port(port: int) -> None:
    if not 1 <= port <= 65535:
        raise BadInput(f"--ssh-check port {port} is not a TCP port", "give a port from 1 to 65535")


def login_address(access: AccessFacts | None) -> str:
    """Where the user reaches this machine: the local address of the SSH session we run in,
    else the first global address, else loopback (a console session on the machine)."""
    if access is not None and access.session is not None:
        return access.session.local_address.removeprefix("::ffff:")
    for interface in access.interfaces if access is not None else []:
        for item in interface.addresses:
            address = item.address.split("/")[0]
            if interface.name != "lo" and not address.startswith("fe80:"):
                return address
    return "127.0.0.1"


def login_command(port: int, address: str) -> str:
    # HostKeyAlias: the key must match the known_hosts entry of the machine itself (port 22),
    # the proof that the carried host key is the one clients already trust.
    return f"ssh -p {port} -o HostKeyAlias={address} root@{address}"


class CheckServer:
    """The image's sshd on ``port``, chrooted in ``root`` (a path in ``target``'s mount
    namespace), until ``stop``. Its stderr lines are kept; ``done`` is set once a login was
    accepted or sshd ended."""

    def __init__(self, target: int, root: Path, port: int) -> None:
        self.target, self.root, self.port = target, root, port
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        self.listening = threading.Event()
        self.done = threading.Event()
        self.session_over = threading.Event()
        self.login: str | None = None  # "root from 127.0.0.1 (publickey)"
        self.process: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None

    def __enter__(self) -> CheckServer:
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        in_root = Path(f"/proc/{self.target}/root{self.root}")
        if not (in_root / SSHD.lstrip("/")).exists():
            raise SafetyRefusal(
                f"--ssh-check: the image has no {SSHD}",
                "switch to an image with openssh-server (make rescue-image), or drop --ssh-check",
            )
        if not any((in_root / "etc/ssh").glob("ssh_host_*_key")):
            raise SafetyRefusal(
                "--ssh-check: the new root has no SSH host keys for its sshd",
                "keep the carry-over on (no --no-carry) on a machine with host keys, or put "
                "keys in the image",
            )
        command = [sys.executable, "-m", __name__, "serve", str(self.target), str(self.root)]
        self.process = subprocess.Popen(
            [*command, str(self.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            # Not in the terminal's process group: Ctrl-C reaches us, and we stop it in order.
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, name="dboot-sshcheck", daemon=True)
        self.reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.reader.join(1.0)
                last = "; ".join(self.seen[-LAST_LINES:]) or "no output"
                self.stop()
                raise EnvironmentFailure(
                    f"--ssh-check: the image's sshd did not start on port {self.port} ({last})",
                    "choose a free port, or check the image's sshd_config",
                )

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.rstrip("\n")
            self.seen.append(line)
            self.lines.put(line)
            if LISTENING.search(line):
                self.listening.set()
            accepted = ACCEPTED.search(line)
            if accepted and self.login is None:
                method, user, client = accepted.groups()
                self.login = f"{user} from {client} ({method})"
                self.done.set()
            elif self.login is not None and DISCONNECTED.search(line):
                self.session_over.set()
        self.done.set()  # sshd ended: nobody can log in any more
        self.session_over.set()

    def logs(self) -> Iterator[Event]:
        with contextlib.suppress(queue.Empty):
            while True:
                yield Log(f"ssh-check sshd: {self.lines.get_nowait()}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """End sshd and every session it started (its PID namespace), and wait for them."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()  # its sshd dies with it (parent-death signal)
                self.process.wait()
        if self.reader is not None:
            self.reader.join(STOP_TIMEOUT)


def proof(
    target: int, root: Path, port: int, access: AccessFacts | None, go: GoCallback | None
) -> Iterator[Event]:
    """The ``ssh-check`` step: sshd up, the login line shown, a login (or go) awaited, sshd
    stopped. Raises ``SafetyRefusal`` when called off or when sshd died before any login."""
    yield StepStarted("ssh-check", f"Starting the image's sshd in the RAM root on port {port}")
    command = login_command(port, login_address(access))
    with CheckServer(target, root, port) as server:
        yield from server.logs()
        yield Notice(
            "info",
            "ssh-check",
            f"log in to the new root from another terminal: {command}",
            "the switch goes on once a login there succeeds, whose session ends a few seconds "
            "later, or when you say go",
        )
        went = go(command, server.done) if go is not None else server.done.wait()
        if server.login is not None:
            server.session_over.wait(LOGIN_LINGER)
        ended = not server.running  # before stop(): then it ends anyway
        server.stop()
        yield from server.logs()
    if server.login is not None:
        yield StepDone("ssh-check", f"login by {server.login} accepted; sshd stopped")
    elif not went:
        raise SafetyRefusal("--ssh-check: the switch was called off", "run it again when ready")
    elif not ended:
        yield StepDone("ssh-check", "no login seen, going on as told; sshd stopped")
    else:
        last = "; ".join(server.seen[-LAST_LINES:]) or "no output"
        raise EnvironmentFailure(
            f"--ssh-check: the image's sshd ended before any login ({last})",
            "check the image's sshd_config, or drop --ssh-check",
        )


# --- The helper: runs as its own process --------------------------------------------------


def _fail(message: str) -> NoReturn:
    print(f"ssh-check helper: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _join_namespaces(target: int) -> None:
    # Both opened first: once in the target's mount namespace, /proc may be another's.
    paths = {kind: f"/proc/{target}/ns/{kind}" for kind in ("net", "mnt")}
    fds = {
        kind: os.open(path, os.O_RDONLY)
        for kind, path in paths.items()
        if os.readlink(path) != os.readlink(f"/proc/self/ns/{kind}")
    }
    for kind, flag in (("net", linux.CLONE_NEWNET), ("mnt", linux.CLONE_NEWNS)):
        if kind in fds:
            linux.setns(fds[kind], flag)
            os.close(fds[kind])


def _mount_api(root: str) -> None:
    """Mounts that sshd needs, in our private mount namespace only."""
    linux.mount("/dev", f"{root}/dev", None, linux.MS_BIND | linux.MS_REC)
    linux.mount("proc", f"{root}/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
    linux.mount("tmpfs", f"{root}/run", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    os.mkdir(f"{root}/run/sshd", 0o755)


def serve(target: int, root: str, port: int) -> NoReturn:
    """Run the image's sshd as PID 1 of a new PID namespace; SIGTERM ends it and its sessions."""
    try:
        # A dboot that dies (SIGKILL) takes its check along: sshd dies with us in turn.
        linux.die_with_parent()
        _join_namespaces(target)
        linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID)
        linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    except OSError as error:
        _fail(f"namespaces: {error}")
    child = os.fork()
    if child == 0:
        try:
            linux.die_with_parent()
            _mount_api(root)
            os.chroot(root)
            os.chdir("/")
            os.execv(SSHD, [SSHD, "-D", "-e", "-p", str(port)])
        except OSError as error:
            _fail(f"sshd: {error}")
    # SIGTERM: kill sshd; its PID namespace's end takes every session with it, and waitpid
    # returns once they are all gone.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(child, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            break
        except ChildProcessError:
            os._exit(0)
        except InterruptedError:
            continue
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    if len(sys.argv) != 5 or sys.argv[1] != "serve":
        _fail("usage: python -m injector.access.sshcheck serve TARGET_PID ROOT PORT")
    serve(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
