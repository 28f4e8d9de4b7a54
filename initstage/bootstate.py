"""What an installed machine boots: the state file on the root filesystem, and the choice.

``dboot install`` puts the image's tree beside the old system, under :data:`DBOOT_DIR` on
the root filesystem, and makes the boot shim (``initstage.bootshim``) the path the kernel
runs as init. At every boot the shim reads :data:`STATE_FILE` and :func:`choose` says which
system starts. The rules, in the order of an install's life:

- ``probation`` with a boot left: the new system, once. The shim spends the boot *before*
  it starts it (written and fsynced), so that a new system that panics, hangs or never
  reaches its keeper cannot get a second try: the next boot is the old system's.
- ``probation`` with no boot left: nobody kept the new system in time. The old system,
  and the state says ``reverted`` with the reason.
- ``kept``: the new system, every boot (the keep file was touched in time).
- ``reverted``: the old system, every boot, until another install.

A state file that cannot be read or makes no sense boots the old system: the safe side is
the system that was there before. Standard library only, as for everything at boot.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import time
from dataclasses import asdict, dataclass, field
from typing import Any

STATE_VERSION = 1
# Everything an install writes on the root filesystem lives under this one directory.
DBOOT_DIR = "/dboot"
STATE_FILE = DBOOT_DIR + "/state.json"
TREES_DIR = DBOOT_DIR + "/trees"
SHIM_DIR = DBOOT_DIR + "/boot"  # the shim: its entry script and a copy of initstage
SHIM_ENTRY = SHIM_DIR + "/init"
REPORT_FILE = DBOOT_DIR + "/last-boot.json"
# Where the shim binds the physical root filesystem inside the new system, as ostree does:
# `dboot status`, `--revert` and the keeper's "kept" reach the state file through it.
SYSROOT = "/sysroot"
MAX_STATE_BYTES = 1 << 16

PROBATION, KEPT, REVERTED = "probation", "kept", "reverted"
KEEP_FILE_WORDS = "touch /run/dboot/keep"
STATES = (PROBATION, KEPT, REVERTED)


class StateError(Exception):
    """The state file is missing, unsafe or malformed: the old system boots."""


@dataclass
class BootState:
    """The installed machine's boot selection. Paths are as seen from the disk's root."""

    tree: str  # e.g. /dboot/trees/dboot-rescue-0123456789ab
    init_argv: list[str]  # the image's init, inside the tree
    old_init: str  # what the kernel's init path ran before the install
    init_path: str  # the path the kernel runs as init, now the shim (usually /sbin/init)
    old_link: str = ""  # the init path's symlink text before the install; "": it was a file
    state: str = PROBATION
    boots_left: int = 1
    revert_after_seconds: float = 0.0  # 0: no deadline, the first boot is kept at once
    image: str = ""
    installed_at: float = 0.0
    reason: str = ""  # why the state is what it is, in words, for `dboot status`
    history: list[str] = field(default_factory=list)
    version: int = STATE_VERSION

    def validate(self) -> None:
        if self.version != STATE_VERSION:
            raise StateError(f"state version {self.version!r} is not {STATE_VERSION}")
        if self.state not in STATES:
            raise StateError(f"state {self.state!r} is not one of {STATES}")
        for name in ("tree", "old_init", "init_path"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
                raise StateError(f"state {name} {value!r} is not an absolute path")
        if not self.tree.startswith(TREES_DIR + "/") or "/.." in self.tree:
            raise StateError(f"state tree {self.tree!r} is not under {TREES_DIR}")
        if not self.init_argv or not all(isinstance(arg, str) for arg in self.init_argv):
            raise StateError("state init_argv is empty or not a list of strings")
        if not self.init_argv[0].startswith("/"):
            raise StateError(f"state init {self.init_argv[0]!r} is not an absolute path")
        if not isinstance(self.boots_left, int) or isinstance(self.boots_left, bool):
            raise StateError("state boots_left is not an integer")
        seconds = self.revert_after_seconds
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds >= 0):
            raise StateError(f"state revert_after_seconds {seconds!r} is not >= 0")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def noted(self, event: str, when: float | None = None) -> None:
        """Append one dated line to the history (kept short: the last 20)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when or time.time()))
        self.history = [*self.history, f"{stamp} UTC {event}"][-20:]


@dataclass(frozen=True)
class Choice:
    """What this boot starts, and the state to write *before* starting it."""

    new_system: bool
    probation: bool  # the new system, with a revert deadline
    state: BootState | None  # None: nothing to write
    why: str


def choose(state: BootState | None, problem: str = "") -> Choice:
    """The whole boot decision, as a pure function of the state file's contents."""
    if state is None:
        return Choice(False, False, None, f"no usable install state ({problem}): old system")
    if state.state == KEPT:
        return Choice(True, False, None, "kept: the new system")
    if state.state == REVERTED:
        return Choice(False, False, None, f"reverted ({state.reason}): the old system")
    following = BootState(**asdict(state))
    if state.boots_left <= 0:
        following.state, following.boots_left = REVERTED, 0
        following.reason = "the new system was not kept in time"
        following.noted("probation ran out: back to the old system")
        return Choice(False, False, following, "probation spent, not kept: the old system")
    following.boots_left = state.boots_left - 1
    if state.revert_after_seconds <= 0:
        # No deadline was asked for: the first boot that gets this far keeps it.
        following.state, following.reason = KEPT, "installed without a revert timer"
        following.noted("first boot of the new system, no revert timer: kept")
        return Choice(True, False, following, "first boot, no revert timer: the new system")
    following.noted("probation boot of the new system")
    return Choice(True, True, following, "probation: the new system, this boot only")


def mark_kept(path: str) -> BootState:
    """The keeper's "kept", written to the disk: every boot from now on is the new system."""
    state = read_state(path)
    if state.state != PROBATION:
        raise StateError(f"{path} says {state.state}, not {PROBATION}: nothing to keep")
    state.state, state.reason = KEPT, f"the keep file was there in time ({KEEP_FILE_WORDS})"
    state.noted("kept")
    write_state(state, path)
    return state


def state_from_dict(data: object) -> BootState:
    if not isinstance(data, dict):
        raise StateError("state is not a JSON object")
    known = {name for name in BootState.__dataclass_fields__}
    unknown = sorted(set(data) - known)
    if unknown:
        raise StateError(f"state has unknown fields {unknown}")
    try:
        state = BootState(**data)
    except TypeError as error:
        raise StateError(f"state lacks fields: {error}") from error
    state.validate()
    return state


def read_state(path: str = STATE_FILE, *, dir_fd: int | None = None) -> BootState:
    """Read and check the state. It must be a root-owned regular file that only root can
    write: it decides what runs as PID 1."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError as error:
        raise StateError(f"cannot open {path}: {error.strerror}") from error
    try:
        st = os.fstat(fd)
        if st.st_uid != 0 or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            raise StateError(f"{path} is not a root-owned regular file writable by root only")
        raw = os.read(fd, MAX_STATE_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path} is larger than {MAX_STATE_BYTES} bytes")
    try:
        data: Any = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise StateError(f"{path} is not valid JSON ({error})") from error
    return state_from_dict(data)


def write_state(state: BootState, path: str = STATE_FILE, *, dir_fd: int | None = None) -> None:
    """Atomically (:func:`write_atomically`): the old state or the new one, never half."""
    state.validate()
    write_atomically(path, state.to_json(), dir_fd=dir_fd)


def write_atomically(path: str, text: str, *, dir_fd: int | None = None) -> None:
    """A temp file of this process's own, fsync, rename, fsync the directory: a reader (or a
    power cut) finds the old file or the new one, never half of one."""
    directory, name = os.path.split(path)
    parent = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        temp = f".{name}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=parent)  # a leftover of a run that died here
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temp, flags, 0o644, dir_fd=parent)
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=parent, dst_dir_fd=parent)
        os.fsync(parent)
    finally:
        os.close(parent)
