"""``--ssh-check PORT``: prove the new root can be logged in to before the point of no return.

After the copy and the carry-over, the image's own sshd runs in the RAM root on PORT, with
the host keys and authorized_keys the switch carried in. The user logs in from another
terminal with the line we print (``HostKeyAlias`` makes ssh check the host key against the
machine's known_hosts entry, so the login also proves the host key came along). The run goes
on once sshd logged an accepted login, or when the front-end says go (Enter); Ctrl-C calls
the switch off like any fault before the commit. The sshd is stopped before the injection.

The sshd runs through a helper, ``injector.access.sshserve`` (see there), isolated like the
stage (``python -I -S``: nothing from the working directory or site-packages is imported as
root). It confines sshd: a PID namespace of its own, ``pivot_root`` into the RAM root in a
mount namespace of its own, a minimal ``/dev``, a read-only ``/proc/sys``, and a bounding set
without what acts on the whole machine: a login there cannot reach the host's disks or knobs,
although this may be only a ``--dry-run``. Only sshd's own syslog messages, relayed one per
line on the helper's stdout, can prove a login: the whole line "Accepted <method> for <user>
from <address> port <n> ssh2", with the key and its fingerprint after it for a key. The
helper's stderr is shown, never trusted: a user name is free text, and there a newline in
it makes a line of its own.
"""

from __future__ import annotations

import contextlib
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

from initstage import launch
from injector.access.facts import AccessFacts
from injector.access.sshserve import SSHD
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.events import Event, Log, Notice, StepDone, StepStarted

# sshd's own messages (auth.c, sshd.c), matched whole on the trusted channel: a line that only
# holds one of them, e.g. in "Invalid user Accepted publickey for root from ...", is no login.
LISTENING = re.compile(r"Server listening on \S+ port (\d+)\.")
ACCEPTED = re.compile(r"Accepted (\S+) for (\S+) from (\S+) port \d+ ssh2(?:: (\S.*))?")
# The proving session's end; until then (or LOGIN_LINGER), sshd stays so that its command runs.
DISCONNECTED = re.compile(r"(?:Disconnected from|Received disconnect from|Connection closed by) ")
# The helper, run like the stage (initstage.launch): isolated, only our package folder added.
HELPER_BOOT = (
    "import sys; sys.path.append(sys.argv[1]); "
    "from injector.access.sshserve import main; main(sys.argv[2:])"
)
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


def helper_command(target: int, root: Path, port: int) -> list[str]:
    """The helper's command line: our interpreter with the stage's flags (``-I -S``), which
    appends only the folder that holds our packages to ``sys.path``."""
    return [
        sys.executable, *launch.INTERPRETER_FLAGS, "-c", HELPER_BOOT, launch.package_parent(),
        str(target), str(root), str(port),
    ]  # fmt: skip


class CheckServer:
    """The image's sshd on ``port``, confined in ``root`` (a path in ``target``'s mount
    namespace), until ``stop``. Its lines are kept; ``done`` is set once sshd logged an
    accepted login, or ended."""

    def __init__(self, target: int, root: Path, port: int) -> None:
        self.target, self.root, self.port = target, root, port
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.seen: list[str] = []
        self.listening = threading.Event()
        self.done = threading.Event()
        self.session_over = threading.Event()
        self.login: str | None = None  # "root from 127.0.0.1 (publickey ED25519 SHA256:...)"
        self.process: subprocess.Popen[str] | None = None
        self.readers: list[threading.Thread] = []

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
        self.process = subprocess.Popen(
            helper_command(self.target, self.root, self.port),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,  # sshd's syslog messages, one a line
            stderr=subprocess.PIPE,  # the helper's failures and sshd's start-up errors
            text=True,
            errors="replace",
            # Not in the terminal's process group: Ctrl-C reaches us, and we stop it in order.
            start_new_session=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self.readers = [
            threading.Thread(target=read, args=(stream,), name="dboot-sshcheck", daemon=True)
            for read, stream in (
                (self._read_log, self.process.stdout),
                (self._read_errors, self.process.stderr),
            )
        ]
        for reader in self.readers:
            reader.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.listening.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._join_readers(1.0)
                last = "; ".join(self.seen[-LAST_LINES:]) or "no output"
                self.stop()
                raise EnvironmentFailure(
                    f"--ssh-check: the image's sshd did not start on port {self.port} ({last})",
                    "choose a free port, or check the image's sshd_config",
                )

    def _keep(self, line: str) -> None:
        self.seen.append(line)
        self.lines.put(line)

    def _read_log(self, stream: IO[str]) -> None:
        """sshd's own messages: the only lines that can prove a login."""
        for raw in stream:
            line = raw.rstrip("\n")
            self._keep(line)
            if LISTENING.fullmatch(line):
                self.listening.set()
            accepted = ACCEPTED.fullmatch(line)
            if accepted and self.login is None:
                method, user, client, key = accepted.groups()
                self.login = f"{user} from {client} ({method}{' ' + key if key else ''})"
                self.done.set()
            elif self.login is not None and DISCONNECTED.match(line):
                self.session_over.set()
        self.done.set()  # the helper ended: nobody can log in any more
        self.session_over.set()

    def _read_errors(self, stream: IO[str]) -> None:
        for raw in stream:
            self._keep(raw.rstrip("\n"))

    def _join_readers(self, timeout: float) -> None:
        for reader in self.readers:
            reader.join(timeout)

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
        self._join_readers(STOP_TIMEOUT)


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
