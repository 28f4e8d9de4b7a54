"""The stage's voice: a log that goes to the console, to /dev/kmsg and, at the end, to a file.

Logging must never be the reason a switch fails: every write here swallows its OSError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from initstage import linux

PREFIX = "dboot-stage: "
VT_NUMBER = 3
VT_SWITCH_TIMEOUT = 0.5
TTY_MAJOR = 4
# /dev/kmsg allows a burst of 10 records per open file every 5 s, then drops lines
# ("N output lines suppressed due to ratelimiting"); a fresh open gets a fresh budget.
KMSG_BURST = 10
# KERN_DEBUG: kept in the kernel log (dmesg, journalctl -k) but below the default console
# level, so the kernel does not echo onto the console each line the stage already wrote
# there itself (the echo doubled them, often cut into the middle of the stage's own line).
KMSG_PRIORITY = b"<7>"


def _write_all(fd: int, data: bytes) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


class Kmsg:
    """Lines into the kernel log, reopening /dev/kmsg to stay under its rate limit."""

    FLAGS = os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK

    def __init__(self, path: str = "/dev/kmsg") -> None:
        self.path = path
        self.fd = os.open(path, self.FLAGS)
        self.written = 0
        self.spares: list[int] = []

    def stock_spares(self, count: int) -> None:
        """Open spare fds while /dev/kmsg is reachable. After the pivot it is not, until
        /dev is mounted again (and a minimal /dev has none): the lazily detached old
        root no longer reaches its own /dev mount."""
        while len(self.spares) < count:
            self.spares.append(os.open(self.path, self.FLAGS))

    def _reopen(self) -> int:
        try:
            return os.open(self.path, self.FLAGS)
        except OSError:
            if not self.spares:
                raise
            return self.spares.pop()

    def write(self, line: str) -> None:
        if self.written >= KMSG_BURST:
            try:
                fresh = self._reopen()
            except OSError:
                pass  # keep the old fd: lines may be rate-limited, the console still has them
            else:
                os.close(self.fd)
                self.fd, self.written = fresh, 0
        # One write() is one record; the kernel caps a record at ~1 KiB.
        os.write(self.fd, KMSG_PRIORITY + line.encode("utf-8", "replace")[:900])
        self.written += 1


class StageLog:
    """Timestamped lines, kept in memory for the log file and copied to every sink."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start = clock()
        self.lines: list[str] = []
        self.sinks: list[int] = []
        self.kmsg: Kmsg | None = None
        self.saved = 0  # lines already in the log file

    def __call__(self, message: str) -> None:
        line = f"{PREFIX}+{self.clock() - self.start:.3f}s {message}"
        self.lines.append(line)
        for fd in self.sinks:
            self._to_fd(fd, [line])
        self._to_kmsg([line])

    def add_sink(self, fd: int) -> None:
        """Write to ``fd`` from now on, starting with the lines it missed."""
        self._to_fd(fd, self.lines)
        self.sinks.append(fd)

    def open_kmsg(self) -> None:
        try:
            self.kmsg = Kmsg()
        except OSError as error:
            self(f"no /dev/kmsg ({error.strerror}): logging to the console only")
        else:
            self._to_kmsg(self.lines)

    @staticmethod
    def _to_fd(fd: int, lines: list[str]) -> None:
        with contextlib.suppress(OSError):
            _write_all(fd, "".join(line + "\n" for line in lines).encode("utf-8", "replace"))

    def _to_kmsg(self, lines: list[str]) -> None:
        for line in lines:
            if self.kmsg is None:
                return
            with contextlib.suppress(OSError):
                self.kmsg.write(line)

    def save(self, path: str) -> None:
        """Append the lines not saved yet to ``path``, creating its directory if needed."""
        os.makedirs(os.path.dirname(path) or "/", mode=0o755, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            pending = self.lines[self.saved :]
            _write_all(fd, "".join(line + "\n" for line in pending).encode("utf-8", "replace"))
            self.saved += len(pending)
        finally:
            os.close(fd)


@dataclass
class Console:
    """The fds the stage keeps: ``stdio`` becomes the new init's 0/1/2 (None: keep ours)."""

    stdio: int | None = None
    vt: int | None = None


def _open_tty(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as error:
        # ENOENT: no such node; ENXIO/ENODEV: the kernel has no VT or no console driver.
        if error.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None
        raise


def _activate_vt(fd: int, log: Callable[[str], None]) -> None:
    """Switch to our VT in text mode. Never blocks: a display server that holds its VT
    in VT_PROCESS mode may refuse the switch until it is killed, so poll instead of
    VT_WAITACTIVE, and try again after the kill step."""
    linux.ioctl_int(fd, linux.VT_ACTIVATE, VT_NUMBER, f"/dev/tty{VT_NUMBER}")
    deadline = time.monotonic() + VT_SWITCH_TIMEOUT
    while linux.active_vt(fd) != VT_NUMBER and time.monotonic() < deadline:
        time.sleep(0.01)
    linux.ioctl_int(fd, linux.KDSETMODE, linux.KD_TEXT, f"/dev/tty{VT_NUMBER}")
    active = linux.active_vt(fd)
    state = "active" if active == VT_NUMBER else f"not active yet (VT {active} holds on)"
    log(f"console: VT {VT_NUMBER} {state}, text mode")


def retry_vt(console: Console, log: Callable[[str], None]) -> None:
    """After the kill step nothing can hold the VT any more; make sure we are on it."""
    if console.vt is not None and linux.active_vt(console.vt) != VT_NUMBER:
        _activate_vt(console.vt, log)


def take_console(mode: str, sandboxed: bool, log: StageLog) -> Console:
    """Step 2. "inherit" keeps stdio; "vt" takes VT 3 plus /dev/console. A missing VT or
    console (headless server, serial console) is logged, never an error."""
    if mode == "inherit" or sandboxed:
        if mode == "vt":
            log("console: in a sandbox the machine's VTs are not ours: keeping stdio")
        return Console()  # stdio (fd 2) is a log sink from the start
    console = Console(stdio=_open_tty("/dev/console"), vt=_open_tty(f"/dev/tty{VT_NUMBER}"))
    if console.vt is not None:
        log.add_sink(console.vt)
        try:
            _activate_vt(console.vt, log)
        except OSError as error:
            log(f"console: VT {VT_NUMBER} did not switch ({error}); writing to it anyway")
    else:
        log(f"console: no /dev/tty{VT_NUMBER} (headless or serial console): /dev/console only")
    # With console=tty0 the console shows the foreground VT, ours: one copy is enough.
    if console.stdio is not None and not (
        console.vt is not None and _console_is_shown_vt(console.stdio)
    ):
        log.add_sink(console.stdio)
    if console.stdio is None:
        log("console: no /dev/console: the init keeps the old stdio")
    return console


def _console_is_shown_vt(fd: int) -> bool:
    """True when /dev/console is tty0 or our VT: writing to both would double every line."""
    try:
        major, minor = linux.tty_device(fd)
    except OSError:
        return False
    return major == TTY_MAJOR and minor in (0, VT_NUMBER)
