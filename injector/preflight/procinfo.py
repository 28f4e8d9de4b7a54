"""Reading ``/proc``: psutil where it covers the fact, small readers of its text formats where
it does not, with one set of conventions for both.

Readers return ``None`` for a process that vanished and raise ``Unreadable`` for a file the
kernel refused to show us (not root, ``hidepid=``, a PID 1 whose ``environ`` is protected), so
that the caller can say what it could not see instead of crashing.

Everything takes the proc root as a parameter (``proc=Path("/proc")`` by default), so a test
can hand it a crafted tree of the same shape; the psutil calls read that tree too, through
``procfs``, the one place that points psutil's ``PROCFS_PATH`` elsewhere.

psutil gives the process list, each process's user, command line and RSS, and the machine's
memory. It has no process flags (the kernel-thread rule), NSpid chain, PID namespace, cgroup
to unit mapping, swap areas with their types, tracer or capability sets, and its
``open_files()`` judges paths in our mount namespace: those readers stay here, each saying why.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import psutil

from initstage.mounts import unescape_octal
from initstage.procs import ProcInfo, parse_stat

PROC = Path("/proc")
T = TypeVar("T")

CAP_SYS_PTRACE = 19

SwapKind = Literal["disk", "zram", "file"]


class Unreadable(Exception):
    """A /proc file exists but the kernel would not let us read it (the message says why)."""


def read_text(path: str | Path) -> str | None:
    """The file's text; ``None`` when it is gone (a process that exited meanwhile)."""
    return _tolerant(path, _read_text)


def _read_text(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        return file.read()


def read_link(path: str | Path) -> str | None:
    """``readlink``, with the same conventions as ``read_text``."""
    return _tolerant(path, os.readlink)


def _tolerant(path: str | Path, read: Callable[[str | Path], T]) -> T | None:
    try:
        return read(path)
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError as error:
        # ESRCH shows up for files of a process that is exiting; treat it as gone.
        if error.errno == errno.ESRCH:
            return None
        raise Unreadable(f"{path}: {error.strerror or error}") from error


# --- psutil on the same proc tree -------------------------------------------------------------


@contextlib.contextmanager
def procfs(proc: Path) -> Iterator[None]:
    """Point psutil at ``proc`` for the duration: ``PROCFS_PATH`` is one module global, set
    only for a crafted tree (the real /proc leaves it alone, so threads never race on it)."""
    if str(proc) == psutil.PROCFS_PATH:
        yield
        return
    previous, psutil.PROCFS_PATH = psutil.PROCFS_PATH, str(proc)
    try:
        yield
    finally:
        psutil.PROCFS_PATH = previous


def _refused(error: psutil.AccessDenied | OSError, where: str) -> Unreadable:
    """psutil's AccessDenied (or a bare OSError) as our ``Unreadable``, naming the file."""
    cause = error if isinstance(error, OSError) else (error.__cause__ or error.__context__)
    if isinstance(cause, OSError) and cause.filename:
        return Unreadable(f"{cause.filename}: {cause.strerror or cause}")
    return Unreadable(f"{where}: {getattr(error, 'msg', None) or 'access denied'}")


class ProcessDetails(NamedTuple):
    user: str
    argv: list[str]  # empty for kernel threads and processes that cleared it
    rss_bytes: int


def process_details(pid: int, proc: Path = PROC) -> ProcessDetails | None:
    """A process's user (its real uid's name), command line and RSS, from psutil."""
    with procfs(proc):
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                return ProcessDetails(
                    process.username(),
                    [arg for arg in process.cmdline() if arg],
                    process.memory_info().rss,
                )
        except psutil.NoSuchProcess:  # zombies too: already dead
            return None
        except (psutil.AccessDenied, OSError) as error:
            raise _refused(error, f"{proc}/{pid}") from error


class Memory(NamedTuple):
    available_bytes: int  # MemAvailable
    total_bytes: int


def memory(proc: Path = PROC) -> Memory | None:
    """The machine's memory from psutil; ``None`` when there is no meminfo to read."""
    with procfs(proc):
        try:
            found = psutil.virtual_memory()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise _refused(error, f"{proc}/meminfo") from error
    return Memory(found.available, found.total)


# --- /proc/swaps -----------------------------------------------------------------------------


@dataclasses.dataclass
class SwapDevice:
    """One active swap area, as listed by ``/proc/swaps``."""

    path: str
    kind: SwapKind
    size_bytes: int
    used_bytes: int

    @property
    def must_go_off(self) -> bool:
        """Disk partitions and swap files live on the disks the switch leaves behind; zram is
        RAM and may stay."""
        return self.kind != "zram"


def classify_swap(path: str, swap_type: str) -> SwapKind:
    if re.fullmatch(r"/dev/zram\d+", path):
        return "zram"
    return "file" if swap_type == "file" else "disk"


def parse_swaps(text: str) -> list[SwapDevice]:
    """Parse ``/proc/swaps`` (header line, then ``Filename Type Size Used Priority`` in KiB).

    By hand: psutil's ``swap_memory()`` has the totals only, not the areas and their types."""
    devices = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4:
            continue
        path = unescape_octal(fields[0])
        devices.append(
            SwapDevice(
                path=path,
                kind=classify_swap(path, fields[1]),
                size_bytes=int(fields[2]) * 1024,
                used_bytes=int(fields[3]) * 1024,
            )
        )
    return devices


# --- /proc/PID/stat, status, cgroup ---------------------------------------------------------


def read_stat(pid: int, proc: Path = PROC) -> ProcInfo | None:
    """``/proc/PID/stat`` through the stage's parser: one reader, one kernel-thread rule
    (PF_KTHREAD, a flag psutil does not expose); ``None`` for a process that is gone."""
    return _tolerant(f"{proc}/{pid}/stat", lambda path: parse_stat(pid, _read_bytes(path)))


def _read_bytes(path: str | Path) -> bytes:
    with open(path, "rb") as file:
        return file.read()


def parse_status(text: str) -> dict[str, str]:
    """``/proc/PID/status`` as ``{"Uid": "0\\t0\\t0\\t0", ...}`` (psutil has no TracerPid,
    CapEff or NSpid)."""
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value.strip()
    return fields


def has_capability(status: dict[str, str], capability: int) -> bool:
    return bool(int(status.get("CapEff", "0"), 16) >> capability & 1)


# Only these unit types hold processes; slices are just the tree around them.
_UNIT_SUFFIXES = (".service", ".scope")


def service_from_cgroup(text: str) -> str:
    """The systemd unit a process runs in, from ``/proc/PID/cgroup``; ``-`` when none (psutil
    has no cgroups).

    Prefer the unified (v2, ``0::``) path, else the ``name=systemd`` v1 hierarchy. The unit is
    the *deepest* ``.service``/``.scope`` component: a user's services sit below
    ``user@1000.service`` and a delegated service may create sub-cgroups below its unit.
    """
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            paths[parts[1]] = parts[2]
    for controllers in ("", "name=systemd"):
        path = paths.get(controllers, "")
        units = [part for part in path.split("/") if part.endswith(_UNIT_SUFFIXES)]
        if units:
            return units[-1]
    return "-"


# --- /proc/PID/fd + fdinfo: files held open for writing ------------------------------------

# Pseudo filesystems: writing there is not data on a disk.
_NOT_DATA_PREFIXES = ("/dev/", "/proc/", "/sys/", "/memfd:")


def fdinfo_writable(text: str) -> bool:
    """``flags:\\t0100002`` (octal) -> opened O_WRONLY or O_RDWR."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "flags":
            return (int(value.strip(), 8) & os.O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)
    return False


def files_open_for_writing(pid: int, proc: Path = PROC) -> list[str]:
    """Regular files the process holds open for writing: what a kill may leave half-written.

    Pipes, sockets and anonymous inodes have no ``/`` path; pseudo filesystems and deleted
    files (nobody can see them after the switch anyway) are left out. Raises ``Unreadable``
    when the fd table is hidden from us. Not psutil's ``open_files()``: it stats each link's
    path in *our* mount namespace, so a container's files would be missed.
    """
    # Plain strings, not Path joins: this runs for every fd of every process.
    fd_dir = f"{proc}/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except (FileNotFoundError, ProcessLookupError):
        return []
    except OSError as error:
        raise Unreadable(f"{fd_dir}: {error.strerror or error}") from error
    found = set()
    for fd in fds:
        target = read_link(f"{fd_dir}/{fd}")
        if (
            target is None
            or not target.startswith("/")
            or target.startswith(_NOT_DATA_PREFIXES)
            or target.endswith(" (deleted)")
        ):
            continue
        info = read_text(f"{proc}/{pid}/fdinfo/{fd}")
        if info is None or not fdinfo_writable(info):
            continue
        # stat through the magic link: the open file itself, even if its path was reused.
        try:
            if not stat.S_ISREG(os.stat(f"{fd_dir}/{fd}").st_mode):
                continue
        except OSError:
            continue
        found.add(target)
    return sorted(found)


def list_pids(proc: Path = PROC) -> list[int]:
    with procfs(proc):
        return sorted(psutil.pids())


def pid_namespace(pid: int, proc: Path = PROC) -> str | None:
    """``pid:[4026531836]``: equal strings mean the same PID namespace (psutil has none)."""
    return read_link(proc / str(pid) / "ns" / "pid")


def namespace_of(pid: int | str, kind: str) -> str:
    """The identity of a namespace, e.g. ``pid:[4026531836]`` (``pid`` may be ``"self"``)."""
    return os.readlink(f"/proc/{pid}/ns/{kind}")


def nspid_chain(pid: int, proc: Path = PROC) -> list[int]:
    """The ``NSpid`` line of a process: its pid in each PID namespace, outermost first (psutil
    has no NSpid)."""
    for line in (proc / str(pid) / "status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(field) for field in line.split()[1:]]
    raise Unreadable(f"{proc}/{pid}/status has no NSpid line (Linux 4.1 or later has it)")


def is_pid1_of_its_namespace(pid: int) -> bool:
    """True when ``pid`` is PID 1 inside its own PID namespace (NSpid's last field is 1)."""
    try:
        return nspid_chain(pid)[-1:] == [1]
    except (OSError, Unreadable):
        return False


# --- may we ptrace it? ----------------------------------------------------------------------


class PtraceVerdict(NamedTuple):
    allowed: bool
    reason: str
    fix: str = ""


def ptrace_permission(
    target_pid: int, our_pid: int | None = None, proc: Path = PROC
) -> PtraceVerdict:
    """Would PTRACE_SEIZE of the target be allowed? (Yama, an existing tracer, privileges.)

    Read-only: it never attaches; it opens and closes ``/proc/PID/mem`` (see below). The
    preflight report and ``inject_execve`` (right before the attach) both ask it.
    """
    as_root = "run dboot as root"
    our_pid = os.getpid() if our_pid is None else our_pid
    try:
        target_text = read_text(proc / str(target_pid) / "status")
        our_text = read_text(proc / str(our_pid) / "status")
        yama = read_text(proc / "sys" / "kernel" / "yama" / "ptrace_scope")
    except Unreadable as error:
        return PtraceVerdict(False, f"cannot tell: {error}", as_root)
    if target_text is None:
        return PtraceVerdict(False, f"pid {target_pid} does not exist", "check the target pid")
    target = parse_status(target_text)
    ours = parse_status(our_text or "")
    tracer = int(target.get("TracerPid", "0"))
    if tracer:
        try:
            name = (read_text(proc / str(tracer) / "comm") or "gone").strip()
        except Unreadable:
            name = "unknown"
        return PtraceVerdict(
            False,
            f"already traced by pid {tracer} ({name}): a process has only one tracer",
            f"end the debugger or strace that traces it (pid {tracer}), then retry",
        )
    privileged = has_capability(ours, CAP_SYS_PTRACE)
    scope = (yama or "").strip()
    if scope == "3":
        return PtraceVerdict(
            False,
            "Yama ptrace_scope is 3: no attaching at all until the next reboot",
            "reboot (scope 3 cannot be lowered at run time), with kernel.yama.ptrace_scope<=2",
        )
    if scope in ("1", "2") and not privileged:
        return PtraceVerdict(
            False, f"Yama ptrace_scope is {scope}: attaching needs CAP_SYS_PTRACE", as_root
        )
    same_user = target.get("Uid", "").split()[:1] == ours.get("Uid", "").split()[:1]
    if not privileged and not same_user:
        return PtraceVerdict(False, "the target belongs to another user", as_root)
    if not privileged:  # an init runs with every capability: a tracer needs them too
        return PtraceVerdict(False, "no CAP_SYS_PTRACE: run as root", as_root)
    # The kernel's own answer: opening /proc/PID/mem runs the same ptrace_may_access() check
    # (PTRACE_MODE_ATTACH, LSMs and Yama included) as an attach, without touching the target.
    try:
        os.close(os.open(proc / str(target_pid) / "mem", os.O_RDONLY | os.O_CLOEXEC))
    except FileNotFoundError:
        pass  # no such file in a crafted tree (or the process just exited): the rules held
    except OSError as error:
        return PtraceVerdict(
            False,
            f"the kernel refuses ptrace access (opening {proc}/{target_pid}/mem: "
            f"{error.strerror}): a security module, lockdown or a user namespace boundary",
            "run dboot unconfined in the machine's initial namespaces (not in a container)",
        )
    capability = ", we have CAP_SYS_PTRACE" if privileged else ""
    if scope:
        return PtraceVerdict(True, f"Yama ptrace_scope is {scope}{capability}")
    return PtraceVerdict(True, f"no Yama restriction{capability}")
