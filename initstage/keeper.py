"""The keeper: a child the stage forks just before it execs the image's init, to watch over
the new system's first minutes (issue 9 §4). It does two things, each only when asked:

- **SSH** (``--ssh``): runs the image's SSH server with the carried host keys and starts it
  again whenever it dies, with a growing pause, never in a busy loop. This is what keeps a
  machine reachable when its new init is a shell or busybox init, which start no services.
- **The dead-man's switch** (``--revert-after MINUTES``): at the deadline, unless
  :data:`KEEP_FILE` exists (looked up by path: the new init may mount a fresh ``/run``, and
  that is the one the user touches), it syncs and reboots, so that the old system boots
  again from its disk. Only when the stage ran as the machine's own PID 1 of a real switch:
  anywhere else (a rehearsal, a ``--target-pid`` namespace) it logs that a real switch would
  reboot now and leaves :data:`REVERT_DUE_FILE`, nothing else.

It never takes the new system down for any other reason, logs every action to the kernel
log and to :data:`LOG_PATH`, and exits once nothing is left to do; once only the SSH server
is left, it hands it to the image's own shell (:data:`SHELL_KEEPER`), so that nothing runs
from the old root's files and its disk can be repartitioned. Like the stage it is
standard library only and imports nothing once forked: the stage imports this module (and
so all it uses) at start-up, before the pivot.

The revert fails safe, never open (issue 21 §1): the deadline is counted from the moment
the stage has read its plan, by :class:`RevertTimer` (a thread of PID 1) until the keeper
process takes it over; the deadline is looked at first on every tick, on its own; a keep
file that cannot be read, or that was there before the new system ran, does not count;
and the keeper never exits while a deadline is pending.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, Protocol

from initstage import bootstate, linux
from initstage.children import run_jobs
from initstage.console import Kmsg
from initstage.plan import KEEP_FILE as KEEP_FILE  # re-exported: the keeper's own file

REVERT_DUE_FILE = "/run/dboot/revert-due"
# Not under /run: a new init that mounts a fresh /run would hide a log kept there.
LOG_PATH = "/var/log/dboot-keeper.log"
PREFIX = "dboot-keeper: "
# How often the keep file and the SSH server are looked at between the events due.
POLL_SECONDS = 1.0
# The pause before an SSH server that died is started again: doubled each time it dies
# young, up to the longest, and back to the first once one has run for STABLE_SECONDS.
FIRST_RESPAWN_DELAY = 1.0
LONGEST_RESPAWN_DELAY = 60.0
STABLE_SECONDS = 60.0
SYNC_TIMEOUT = 10.0  # a sync that hangs (a dead NFS server) must not hold the revert back
SSH_KEYGEN = "/usr/bin/ssh-keygen"
IMAGE_SHELL = "/bin/sh"
SSHD_PRIVSEP_DIR = "/run/sshd"  # OpenSSH refuses to start without it; a fresh /run lacks it
HOST_KEY_PREFIX = "ssh_host_"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# include/uapi/linux/reboot.h: LINUX_REBOOT_CMD_RESTART, which glibc's reboot() calls RB_AUTOBOOT.
RB_AUTOBOOT = 0x01234567
_libc_reboot = linux.libc.reboot  # looked up now: after the pivot nothing may be loaded
# How long the stage waits for its timer thread to stop: long enough for a revert under way.
TIMER_JOIN_SECONDS = SYNC_TIMEOUT + 2.0
# What tells one keep file from another: a new file, or the same one touched (ctime) again.
FileIdentity = tuple[int, int, int]  # st_dev, st_ino, st_ctime_ns

# Once only the SSH server is left to keep, the image's own shell keeps it, and this
# interpreter, whose files are on the old root (keeping its disk busy), goes: exec'd as
# ``sh -c SCRIPT dboot-keeper OLD_PID DELAY CONSOLE SSH_ARGV...``. It waits for the server
# this keeper started (our child still: a zombie once it ends), then restarts it as above.
SHELL_KEEPER = """\
old=$1 delay=$2 console=$3
shift 3
say() {
    line="dboot-keeper: $(date -u +%H:%M:%S 2>/dev/null) $*"
    echo "$line" >> @LOG@
    echo "<7>$line" 2>/dev/null > /dev/kmsg
    echo "$line" 2>/dev/null > "$console"
}
say "the image's shell keeps the SSH server now (pid $$, as before)"
while [ -e "/proc/$old" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$old/status"; do
    sleep 2
done
[ "$old" = 0 ] || say "SSH server pid $old ended: starting it again in $delay s"
while :; do
    sleep "$delay"
    mkdir -p @PRIVSEP@
    say "SSH server started (by the shell)"
    started=$(date +%s 2>/dev/null || echo 0)
    "$@" >> @LOG@ 2>&1
    status=$?
    if [ $(($(date +%s 2>/dev/null || echo 0) - started)) -ge @STABLE@ ]; then
        delay=@FIRST@
    else
        delay=$((delay * 2))
    fi
    [ "$delay" -le @LONGEST@ ] || delay=@LONGEST@
    say "SSH server ended (exit status $status): starting it again in $delay s"
done
"""


@dataclass(frozen=True)
class KeeperSettings:
    """What the keeper is asked to do. ``may_reboot``: the plan says ``machine`` and the
    stage ran as the machine's own PID 1; in any other case the revert is only logged."""

    ssh_argv: tuple[str, ...] = ()
    revert_after_seconds: float = 0.0  # 0: no dead-man's switch
    may_reboot: bool = False
    # An installed machine's probation boot: the install's state file (seen from the new
    # system), marked kept once the keep file is there, so that every later boot is this one.
    boot_state_file: str = ""

    @property
    def has_work(self) -> bool:
        return bool(self.ssh_argv) or self.revert_after_seconds > 0


def utc_clock(epoch: float) -> str:
    """'21:42:05 UTC'."""
    return time.strftime("%H:%M:%S UTC", time.gmtime(epoch))


def keep_instructions(deadline: float) -> str:
    """How to keep the new system: one text for the CLI's last lines and the stage log."""
    return (
        f"to keep the new system, run `touch {KEEP_FILE}` in it before {utc_clock(deadline)};"
        " otherwise it reboots into the old system then. Do that before you wipe or"
        " repartition the old disk: after that there is nothing to revert to"
    )


class KeeperHost(Protocol):
    """What the keeper does to the system: the live one, or a fake in the unit tests."""

    def clock(self) -> float: ...
    def wall_clock(self) -> float: ...
    def identity(self, path: str) -> FileIdentity | None: ...
    def make_dir(self, path: str) -> bool: ...
    def prepare_ssh(self) -> list[str]: ...
    def start(self, argv: tuple[str, ...]) -> int: ...
    def exit_status(self, pid: int) -> int | None: ...
    def hand_over(self, argv: tuple[str, ...], pid: int | None, delay: float) -> str: ...
    def mark_revert_due(self) -> None: ...
    def sync(self) -> str: ...
    def reboot(self) -> None: ...


class Keeper:
    """The decisions, one :meth:`tick` at a time; all effects go through the host."""

    def __init__(
        self, settings: KeeperSettings, host: KeeperHost, log: Callable[[str], None]
    ) -> None:
        self.settings = settings
        self.host = host
        self.log = log
        now = host.clock()
        seconds = settings.revert_after_seconds
        self.deadline: float | None = now + seconds if seconds > 0 else None
        self.deadline_wall = host.wall_clock() + seconds
        self.sshd_pid: int | None = None
        self.sshd_started = 0.0
        self.next_start: float | None = now if settings.ssh_argv else None
        self.respawn_delay = FIRST_RESPAWN_DELAY
        self.starts = 0
        self.hand_over_refused = ""
        self.complaints: dict[str, str] = {}  # the last failure of each kind, logged once
        # A keep file there before the new system ran is not the user's: the image shipped
        # it. Only another file, or this one touched again (its ctime), keeps the system.
        self.keep_at_start = self.keep_identity() if self.deadline is not None else None

    def announce(self) -> None:
        if self.settings.ssh_argv:
            self.log(f"SSH: keeping {' '.join(self.settings.ssh_argv)} running")
        if self.deadline is None:
            self.log("revert: no timer (the new system stays)")
            return
        minutes = self.settings.revert_after_seconds / 60
        action = "sync and reboot" if self.settings.may_reboot else "only log it (not the machine)"
        self.log(f"revert: in {minutes:g} min, unless {KEEP_FILE} exists by then, {action}")
        self.log(keep_instructions(self.deadline_wall))
        if self.keep_at_start is not None:
            self.log(
                f"warning: {KEEP_FILE} was there before the new system ran (the image's):"
                " it does not count; touch it again to keep the new system"
            )

    def tick(self) -> float | None:
        """Do what is due now; return how long to sleep, or None when nothing is left."""
        now = self.host.clock()
        # First, and on its own: no failure of anything else may hold the revert back.
        self.watch_deadline(now)
        self.guarded("SSH server", self.watch_sshd, now)
        if self.next_start is not None and now >= self.next_start:
            self.guarded("SSH server", self.start_sshd, now)
        if self.deadline is None and not self.settings.ssh_argv:
            return None
        if self.deadline is None and not self.hand_over_refused:
            self.hand_over()
        due = [now + POLL_SECONDS]
        due += [moment for moment in (self.next_start, self.deadline) if moment is not None]
        return max(0.0, min(due) - now)

    def guarded(self, what: str, step: Callable[[float], None], now: float) -> None:
        """Run one step; a failure is logged (once while it stays the same) and the keeper
        goes on: it is tried again at the next tick."""
        try:
            step(now)
        except Exception as error:
            self.complain(what, f"{type(error).__name__}: {error}; trying again")

    def complain(self, what: str, message: str) -> None:
        if self.complaints.get(what) != message:
            self.complaints[what] = message
            self.log(f"warning: {what}: {message}")

    def watch_deadline(self, now: float) -> None:
        """Never raises: any failure to look at the keep file counts as "not kept"."""
        if self.deadline is None:
            return
        if self.kept():
            self.deadline = None
            self.log(f"{KEEP_FILE} found: the revert is off, the new system stays")
            self.record_kept()
        elif now >= self.deadline:
            self.deadline = None
            self.revert()
        else:
            self.make_keep_dir()

    def record_kept(self) -> None:
        """On an installed machine, write the keep to the disk: the boot shim then starts
        the new system at every boot. Never raises: the revert is off either way."""
        path = self.settings.boot_state_file
        if not path:
            return
        try:
            bootstate.mark_kept(path)
        except Exception as error:
            self.log(
                f"warning: could not mark {path} kept ({error}): the next boot will be the old"
                " system's; fix the cause, then run `dboot install` again from there"
            )
            return
        self.log(f"{path}: kept; every boot starts the new system from now on")

    def keep_identity(self) -> FileIdentity | None:
        try:
            return self.host.identity(KEEP_FILE)
        except Exception as error:
            self.complain("keep file", f"cannot look at {KEEP_FILE} ({error}): not kept")
            return None

    def kept(self) -> bool:
        found = self.keep_identity()
        return found is not None and found != self.keep_at_start

    def make_keep_dir(self) -> None:
        """A new init mounts a fresh /run: the directory must be there for a plain `touch`.
        When it cannot be made, nobody can keep the system: it reverts at the deadline."""
        keep_dir = os.path.dirname(KEEP_FILE)
        try:
            made = self.host.make_dir(keep_dir)
        except Exception as error:
            self.complain(
                "keep directory",
                f"cannot make {keep_dir} ({error}): `touch {KEEP_FILE}` fails until that is"
                " fixed, and the revert comes at the deadline",
            )
            return
        if made:
            self.log(f"made {keep_dir}, for the keep file")

    def revert(self) -> None:
        """Never raises: a marker that cannot be left or a sync that fails is logged."""
        if not self.settings.may_reboot:
            self.log(
                f"revert deadline passed without {KEEP_FILE}: a real switch would reboot now"
                f" (not the machine's PID 1: leaving {REVERT_DUE_FILE} instead)"
            )
            try:
                self.host.mark_revert_due()
            except Exception as error:
                self.log(f"warning: could not leave {REVERT_DUE_FILE}: {error}")
            return
        self.log(f"revert deadline passed without {KEEP_FILE}: sync, then reboot")
        try:
            synced = self.host.sync()
        except Exception as error:
            synced = f"failed ({error}): rebooting without it"
        self.log(f"sync: {synced}")
        self.log("reboot(RB_AUTOBOOT): the old system boots from its disk")
        self.host.reboot()  # returns only if the kernel refused

    def hand_over(self) -> None:
        """Only the SSH server is left: let the image's shell keep it (returns on failure)."""
        self.log(
            f"only the SSH server is left to keep: handing it to the image's {IMAGE_SHELL},"
            " so that nothing runs from the old root's files any more"
        )
        argv, delay = self.settings.ssh_argv, self.respawn_delay
        try:
            self.hand_over_refused = self.host.hand_over(argv, self.sshd_pid, delay)
        except Exception as error:
            self.hand_over_refused = f"{type(error).__name__}: {error}"
        self.log(f"hand-over failed ({self.hand_over_refused}): keeping it from here")

    def watch_sshd(self, now: float) -> None:
        if self.sshd_pid is None:
            return
        status = self.host.exit_status(self.sshd_pid)
        if status is None:
            return
        ran = now - self.sshd_started
        if ran >= STABLE_SECONDS:
            self.respawn_delay = FIRST_RESPAWN_DELAY
        self.log(
            f"SSH server pid {self.sshd_pid} ended ({describe_status(status)}) after {ran:.1f} s:"
            f" starting it again in {self.respawn_delay:g} s"
        )
        self.sshd_pid = None
        self.next_start = now + self.respawn_delay
        self.respawn_delay = min(self.respawn_delay * 2, LONGEST_RESPAWN_DELAY)

    def start_sshd(self, now: float) -> None:
        self.next_start = None
        for line in self.host.prepare_ssh():
            self.log(line)
        try:
            self.sshd_pid = self.host.start(self.settings.ssh_argv)
        except OSError as error:
            self.log(f"SSH server: cannot start it ({error}): trying again in 1 s")
            self.next_start = now + FIRST_RESPAWN_DELAY
            return
        self.sshd_started = now
        self.starts += 1
        again = "" if self.starts == 1 else f" (start {self.starts})"
        self.log(f"SSH server started{again}: pid {self.sshd_pid}")


def describe_status(status: int) -> str:
    code = os.waitstatus_to_exitcode(status)
    return f"exit status {code}" if code >= 0 else f"signal {-code}"


class LiveHost:
    """The keeper's effects on the running system, from inside the new root."""

    def __init__(self, log: Callable[[str], None], console: str | None = None) -> None:
        self.log = log
        self.console = console or "/dev/null"  # the shell keeper's third voice

    def clock(self) -> float:
        return time.monotonic()

    def wall_clock(self) -> float:
        return time.time()

    def identity(self, path: str) -> FileIdentity | None:
        try:
            found = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return (found.st_dev, found.st_ino, found.st_ctime_ns)

    def make_dir(self, path: str) -> bool:
        """Make ``path`` (0755) unless it is there; True if it was made."""
        if os.path.isdir(path):
            return False
        os.makedirs(path, mode=0o755, exist_ok=True)
        return True

    def prepare_ssh(self) -> list[str]:
        """What OpenSSH needs each time it starts: its privilege-separation directory (a
        fresh /run lacks it) and host keys (generated only when none were carried)."""
        lines = []
        if not os.path.isdir(SSHD_PRIVSEP_DIR):
            os.makedirs(SSHD_PRIVSEP_DIR, mode=0o755, exist_ok=True)
            lines.append(f"made {SSHD_PRIVSEP_DIR}")
        try:
            keys = [name for name in os.listdir("/etc/ssh") if name.startswith(HOST_KEY_PREFIX)]
        except OSError:
            keys = []
        if not keys and os.access(SSH_KEYGEN, os.X_OK):
            keygen = [("ssh-keygen -A", _exec_job([SSH_KEYGEN, "-A"]))]
            done = run_jobs(keygen, SYNC_TIMEOUT, time.monotonic, time.sleep).results[0].ok
            lines.append(f"no host keys in /etc/ssh: ssh-keygen -A {'done' if done else 'failed'}")
        return lines

    def start(self, argv: tuple[str, ...]) -> int:
        """The SSH server in a child: stdin /dev/null, its output into the keeper's log."""
        pid = os.fork()
        if pid == 0:
            try:
                fd = os.open(LOG_PATH, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                os.execve(argv[0], list(argv), {"PATH": DEFAULT_PATH})
            finally:
                os._exit(127)
        return pid

    def exit_status(self, pid: int) -> int | None:
        try:
            done, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return 0  # reaped already: it is gone all the same
        return status if done else None

    def hand_over(self, argv: tuple[str, ...], pid: int | None, delay: float) -> str:
        """Exec the image's shell with :data:`SHELL_KEEPER`; returns why it could not."""
        if not os.access(IMAGE_SHELL, os.X_OK):
            return f"the image has no {IMAGE_SHELL}"
        if not os.path.isdir("/proc/self"):
            return "no /proc to watch the running SSH server by"
        script = (
            SHELL_KEEPER.replace("@LOG@", LOG_PATH)
            .replace("@PRIVSEP@", SSHD_PRIVSEP_DIR)
            .replace("@STABLE@", f"{STABLE_SECONDS:.0f}")
            .replace("@FIRST@", f"{FIRST_RESPAWN_DELAY:.0f}")
            .replace("@LONGEST@", f"{LONGEST_RESPAWN_DELAY:.0f}")
        )
        words = ["dboot-keeper", str(pid or 0), f"{delay:.0f}", self.console, *argv]
        try:
            os.execve(IMAGE_SHELL, [IMAGE_SHELL, "-c", script, *words], {"PATH": DEFAULT_PATH})
        except OSError as error:
            return f"exec {IMAGE_SHELL}: {error.strerror}"

    def mark_revert_due(self) -> None:
        root = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            leave_revert_marker(root)
        finally:
            os.close(root)

    def sync(self) -> str:
        outcome = run_jobs([("sync", _sync_job)], SYNC_TIMEOUT, time.monotonic, time.sleep)
        if outcome.unfinished:
            return f"did not finish within {SYNC_TIMEOUT:g} s: rebooting without it"
        return f"done in {outcome.seconds * 1000:.0f} ms"

    def reboot(self) -> None:
        if _libc_reboot(RB_AUTOBOOT) != 0:
            self.log(
                f"reboot(RB_AUTOBOOT) refused: {os.strerror(ctypes.get_errno())}; nothing else"
                " can revert this switch: reboot the machine by other means"
            )


class CountdownHost(LiveHost):
    """For a deadline kept where no file may be reached by its path: by the stage's own
    thread (:class:`RevertTimer`, whose root is the old system's until the pivot), or by a
    keeper that a recovery starts before the pivot. Nobody can keep a new system that never
    ran, so no keep file is looked at; a sandbox's marker goes into the new root through a
    directory fd (``root_fd``, None when the new root could not be opened)."""

    def __init__(self, log: Callable[[str], None], root_fd: int | None) -> None:
        super().__init__(log)
        self.root_fd = root_fd

    def identity(self, path: str) -> FileIdentity | None:
        return None

    def make_dir(self, path: str) -> bool:
        return False

    def mark_revert_due(self) -> None:
        if self.root_fd is None:
            raise OSError("the new root could not be opened")
        leave_revert_marker(self.root_fd)


def leave_revert_marker(root_fd: int) -> None:
    """Write :data:`REVERT_DUE_FILE` under the directory ``root_fd``, one component at a
    time and following no symlink: before the pivot an absolute link of the image's would
    lead into the old root."""
    *directories, name = REVERT_DUE_FILE.strip("/").split("/")
    here = os.dup(root_fd)
    try:
        for directory in directories:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o755, dir_fd=here)
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
            inner = os.open(directory, flags, dir_fd=here)
            os.close(here)
            here = inner
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, 0o644, dir_fd=here)
        try:
            os.write(fd, f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        finally:
            os.close(fd)
    finally:
        os.close(here)


class RevertTimer:
    """The dead-man's switch while the stage itself runs (issue 21 §1): from the moment the
    plan is read until the stage hands the deadline to a keeper process (just before it
    execs the new init, or in a recovery), a thread of PID 1 counts it down with a
    :class:`Keeper` of its own. A thread, because kill(-1) spares the caller's whole thread
    group and nothing else: the kill phase cannot end it. It shares PID 1's root, so the
    pivot takes it along; it reaches no file by its path (:class:`CountdownHost`); and all
    it runs was imported with this module, before the pivot."""

    def __init__(
        self, seconds: float, may_reboot: bool, root_fd: int | None, log: Callable[[str], None]
    ) -> None:
        self.may_reboot = may_reboot
        self.root_fd = root_fd
        self.log = log
        settings = KeeperSettings(revert_after_seconds=seconds, may_reboot=may_reboot)
        self.keeper = Keeper(settings, CountdownHost(log, root_fd), log)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.count_down, name="dboot-revert", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def count_down(self) -> None:
        watch(self.keeper, self.stopping.wait)

    def seconds_left(self) -> float:
        """0.0 once it fired; otherwise at least a millisecond, so that it still fires."""
        deadline = self.keeper.deadline
        return 0.0 if deadline is None else max(0.001, deadline - self.keeper.host.clock())

    def stop(self) -> float:
        """End the thread (a revert under way finishes first); the seconds left."""
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(TIMER_JOIN_SECONDS)
        return self.seconds_left()

    def restarted(self) -> RevertTimer:
        """A running timer with what is left of this one's deadline."""
        timer = RevertTimer(self.seconds_left(), self.may_reboot, self.root_fd, self.log)
        timer.start()
        return timer


def _sync_job() -> str:
    os.sync()
    return ""


def _exec_job(argv: list[str]) -> Callable[[], str]:
    def job() -> str:
        os.execve(argv[0], argv, {"PATH": DEFAULT_PATH})

    return job


class KeeperLog:
    """Lines to the kernel log and to :data:`LOG_PATH` (opened for each line: the new init
    may mount /var/log over what was there) and, on the machine, to its console: the kernel
    log keeps them below the console's level, and a revert is worth seeing. Never raises:
    a log file that cannot be written (a dangling /var/log) only loses its copy.
    ``log_path`` None: no file at all (a keeper whose root is still the old system's)."""

    def __init__(
        self,
        log_path: str | None = LOG_PATH,
        console: str | None = None,
        *,
        kmsg: bool = True,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.wall_clock = wall_clock
        self.use_kmsg = kmsg
        self.kmsg: Kmsg | None = None
        self.console = console
        self.files = [] if log_path is None else [(log_path, os.O_CREAT | os.O_APPEND)]
        if console is not None:
            self.files.append((console, os.O_NOCTTY | os.O_NONBLOCK | os.O_APPEND))

    def __call__(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime(self.wall_clock()))
        line = f"{PREFIX}{stamp} {message}"
        with contextlib.suppress(OSError):
            if self.use_kmsg and self.kmsg is None:
                self.kmsg = Kmsg()
            if self.kmsg is not None:
                self.kmsg.write(line)
        data = (line + "\n").encode("utf-8", "replace")
        for path, flags in self.files:
            with contextlib.suppress(OSError):
                fd = _open_log(path, flags)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)


def _open_log(path: str, flags: int) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o640)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC | flags, 0o640)


def detach(keep: int | None = None) -> None:
    """A session of its own, / as its directory, and none of the stage's files but ``keep``:
    not the console, and above all not the old root's directory fd, which would keep it busy."""
    os.setsid()
    os.chdir("/")
    if keep is None:
        linux.close_range(0)
    else:
        if keep > 0:
            linux.close_range(0, keep - 1)
        linux.close_range(keep + 1)
    try:
        null = os.open("/dev/null", os.O_RDWR)
    except OSError:
        return  # no /dev/null (no API mounts): the SSH server gets none either
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)


def watch(keeper: Keeper, wait: Callable[[float], bool]) -> None:
    """Tick until nothing is left to keep, or ``wait`` (given each pause) says stop. A
    failed tick is logged and tried again: a pending deadline never ends this loop."""
    while True:
        try:
            pause = keeper.tick()
        except Exception as error:  # the timer must outlive a failed step
            keeper.complain("keeper", f"{type(error).__name__}: {error}; going on")
            pause = POLL_SECONDS
        if pause is None or wait(pause):
            return


def _sleep(seconds: float) -> bool:
    time.sleep(seconds)
    return False


def run(
    settings: KeeperSettings, *, before_pivot: bool = False, root_fd: int | None = None
) -> NoReturn:
    """The keeper's whole life, in the child the stage forked. Never returns, and never
    ends while a deadline is pending.

    ``before_pivot``: a recovery started the keeper before the pivot, so its root is still
    the old system's: it counts down reaching no file by its path (:class:`CountdownHost`,
    its marker through ``root_fd``, the new root), and logs to the kernel log and console."""
    console = "/dev/console" if settings.may_reboot else None
    log = KeeperLog(None if before_pivot else LOG_PATH, console)
    try:
        with contextlib.suppress(Exception):
            detach(keep=root_fd)
        host = CountdownHost(log, root_fd) if before_pivot else LiveHost(log, console)
        keeper = Keeper(settings, host, log)
        keeper.announce()
        watch(keeper, _sleep)
        log("nothing left to do: exiting")
    finally:
        os._exit(0)
