"""The handoff contract between the injector and the init stage.

The injector writes ``<state>/plan.json`` (atomically, mode 0600, in a 0700 root-owned
state directory); the stage, running as PID 1, reads it back. The stage trusts nothing it
did not have to: a plan that someone else could have written (not owned by root, group- or
world-writable, in a writable directory, a symlink), an unknown version or an odd field
is refused with a :class:`PlanError` that says why.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import asdict, dataclass, field
from typing import Any

PLAN_VERSION = 1
CONSOLE_MODES = ("vt", "inherit")
# Longer than any sane shutdown; a typo like 3000 (ms meant as s) should not hang a switch.
MAX_GRACE_SECONDS = 600.0
# How long the old system's processes get between SIGTERM and SIGKILL, unless told.
DEFAULT_GRACE_SECONDS = 3.0
MAX_PLAN_BYTES = 1 << 20
_NETNS_NAME = re.compile(r"net:\[\d+\]")
# How long a teaching pause waits for the host's go before the stage goes on by itself.
DEFAULT_TEACH_TIMEOUT_SECONDS = 900.0
# The longest revert timer (the keeper's dead-man's switch): a day. A longer one was meant
# in seconds, or is no dead-man's switch at all.
MAX_REVERT_MINUTES = 1440.0
# The shortest one a user may ask for (--revert-after, the wizard): time to log in and keep
# the new system. A plan itself may hold a shorter one: the tests write their plans.
MIN_REVERT_MINUTES = 1.0
# A real switch from a remote session reverts after this long unless told otherwise.
DEFAULT_REMOTE_REVERT_MINUTES = 10.0
# What keeps the new system when the revert timer ends: the user touches it, the keeper looks.
KEEP_FILE = "/run/dboot/keep"


class PlanError(Exception):
    """The plan is missing, unsafe or malformed. The message is one line naming cause and fix."""


@dataclass
class Plan:
    """What the stage must do. Paths are absolute in the stage's view of the filesystem."""

    new_root: str
    init_argv: list[str]
    init_env: dict[str, str] = field(default_factory=dict)
    console: str = "inherit"  # "vt" on a real host, "inherit" in a rehearsal
    grace_seconds: float = DEFAULT_GRACE_SECONDS
    api_mounts: bool = True
    minimal_dev: bool = False  # a small tmpfs /dev instead of devtmpfs (rehearsals)
    log_path: str = "/var/log/dboot.log"  # inside the new root
    # True only when the target is the machine's own PID 1 (a real switch). A rehearsal or
    # a --target-pid lab namespace shares the host's filesystems: the stage must then never
    # remount a superblock read-only, and its recovery shell may end the namespace.
    machine: bool = False
    # How long sync (and each read-only remount) may take without making progress before
    # the stage names what did not finish and goes on: a hung NFS server must not hang PID 1.
    sync_timeout_seconds: float = 10.0
    # Keep the kernel's network state across the kill phase (initstage.netkeep): put back
    # the addresses and routes a stopping network daemon removes, make leased ones permanent.
    keep_network: bool = True
    # A sandbox's own network namespace ("net:[inode]"), checked by the injector not to be
    # the host's. A stage that is not the machine's PID 1 keeps the network only there.
    sandbox_netns: str = ""
    # A teaching rehearsal: the unix socket where the host says "go" before each of the
    # stage's steps (initstage.teachpause). Empty: no pauses. Never on the machine.
    teach_socket: str = ""
    teach_timeout_seconds: float = DEFAULT_TEACH_TIMEOUT_SECONDS
    # The keeper (initstage.keeper), forked just before the exec: the SSH server it runs and
    # restarts (empty: none), and the seconds after which it reverts to the old system unless
    # /run/dboot/keep exists (0: never). It reboots only when ``machine`` is true as well.
    keeper_ssh_argv: list[str] = field(default_factory=list)
    revert_after_seconds: float = 0.0
    # An installed machine's probation boot (initstage.bootshim): the install's state file,
    # as seen from the new system, which the keeper marks kept once the keep file exists.
    boot_state_file: str = ""
    version: int = PLAN_VERSION

    def validate(self) -> None:
        """Raise PlanError unless every field is usable as it stands."""
        if self.version != PLAN_VERSION:
            raise _unknown_version(self.version)
        _check_absolute("new_root", self.new_root)
        _check_absolute("log_path", self.log_path)
        if not self.init_argv:
            raise PlanError("plan init_argv is empty: name the image's init, e.g. /sbin/init")
        _check_absolute("init_argv[0]", self.init_argv[0])
        if self.console not in CONSOLE_MODES:
            raise PlanError(f"plan console {self.console!r} is not one of {CONSOLE_MODES}")
        if not (math.isfinite(self.grace_seconds) and self.grace_seconds >= 0):
            raise PlanError(f"plan grace_seconds {self.grace_seconds!r} must be >= 0")
        if self.grace_seconds > MAX_GRACE_SECONDS:
            raise PlanError(
                f"plan grace_seconds {self.grace_seconds} exceeds {MAX_GRACE_SECONDS:.0f}: "
                "give the grace period in seconds"
            )
        if not (
            math.isfinite(self.sync_timeout_seconds)
            and 0 < self.sync_timeout_seconds <= MAX_GRACE_SECONDS
        ):
            raise PlanError(
                f"plan sync_timeout_seconds {self.sync_timeout_seconds!r} must be > 0 and at"
                f" most {MAX_GRACE_SECONDS:.0f}"
            )
        if not (
            math.isfinite(self.revert_after_seconds)
            and 0 <= self.revert_after_seconds <= MAX_REVERT_MINUTES * 60
        ):
            raise PlanError(
                f"plan revert_after_seconds {self.revert_after_seconds!r} must be from 0 (none)"
                f" to {MAX_REVERT_MINUTES * 60:.0f}"
            )
        if self.keeper_ssh_argv:
            _check_absolute("keeper_ssh_argv[0]", self.keeper_ssh_argv[0])
        if self.boot_state_file:
            _check_absolute("boot_state_file", self.boot_state_file)
        if self.teach_socket:
            if self.machine:
                raise PlanError(
                    "plan teach_socket is set on a machine plan: a real switch never waits "
                    "on a UI; pause only in a rehearsal"
                )
            _check_absolute("teach_socket", self.teach_socket)
        if not (math.isfinite(self.teach_timeout_seconds) and self.teach_timeout_seconds > 0):
            raise PlanError(
                f"plan teach_timeout_seconds {self.teach_timeout_seconds!r} must be > 0"
            )
        if self.sandbox_netns and not _NETNS_NAME.fullmatch(self.sandbox_netns):
            raise PlanError(
                f"plan sandbox_netns {self.sandbox_netns!r} is not a namespace name like"
                " net:[4026532000] (readlink /proc/PID/ns/net)"
            )
        if any("=" in key or not key for key in self.init_env):
            raise PlanError("plan init_env has an empty key or a key containing '='")
        texts = (*self.init_argv, *self.init_env.values(), *self.keeper_ssh_argv)
        if any("\0" in text for text in texts):
            raise PlanError("plan init_argv, init_env or keeper_ssh_argv contains a NUL byte")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"


def _unknown_version(version: object) -> PlanError:
    return PlanError(
        f"plan version {version!r} is unknown (this stage reads version {PLAN_VERSION}): "
        "use the same docker-boot for the injector and the stage"
    )


def _check_absolute(name: str, path: str) -> None:
    if not path.startswith("/") or "\0" in path:
        raise PlanError(f"plan {name} {path!r} must be an absolute path")


# Field name -> accepted JSON types. bool is checked before int/float: in Python
# True is an int, and a plan saying grace_seconds: true is a bug, not 1 second.
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "version": (int,),
    "new_root": (str,),
    "init_argv": (list,),
    "init_env": (dict,),
    "console": (str,),
    "grace_seconds": (int, float),
    "api_mounts": (bool,),
    "minimal_dev": (bool,),
    "log_path": (str,),
    "machine": (bool,),
    "sync_timeout_seconds": (int, float),
    "keep_network": (bool,),
    "sandbox_netns": (str,),
    "teach_socket": (str,),
    "teach_timeout_seconds": (int, float),
    "keeper_ssh_argv": (list,),
    "revert_after_seconds": (int, float),
    "boot_state_file": (str,),
}
_REQUIRED = ("version", "new_root", "init_argv")
# Seconds may be written as JSON integers; the Plan holds floats.
_SECONDS_FIELDS = (
    "grace_seconds",
    "sync_timeout_seconds",
    "revert_after_seconds",
    "teach_timeout_seconds",
)


def plan_from_dict(data: object) -> Plan:
    """Build a Plan from decoded JSON, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise PlanError("plan is not a JSON object: rewrite it with the injector")
    unknown = sorted(set(data) - set(_FIELD_TYPES))
    if unknown:
        raise PlanError(f"plan has unknown fields {unknown}: is the stage older than the injector?")
    # The version first: a future plan deserves "unknown version", not a type complaint.
    if "version" in data and (data["version"] != PLAN_VERSION or type(data["version"]) is not int):
        raise _unknown_version(data["version"])
    missing = [key for key in _REQUIRED if key not in data]
    if missing:
        raise PlanError(f"plan lacks the fields {missing}")
    for key, value in data.items():
        wanted = _FIELD_TYPES[key]
        if isinstance(value, bool) != (bool in wanted) or not isinstance(value, wanted):
            raise PlanError(f"plan field {key} has type {type(value).__name__}")
    for key in ("init_argv", "keeper_ssh_argv"):
        if not all(isinstance(arg, str) for arg in data.get(key, [])):
            raise PlanError(f"plan {key} must be a list of strings")
    env: dict[str, Any] = data.get("init_env", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise PlanError("plan init_env must map strings to strings")
    seconds = {key: float(data[key]) for key in _SECONDS_FIELDS if key in data}
    plan = Plan(**{**data, **seconds})
    plan.validate()
    return plan


def write_plan(plan: Plan, path: str | os.PathLike[str]) -> None:
    """Write the plan atomically: a 0600 temp file, fsync, rename over ``path``, fsync the dir.

    A crash at any point leaves either the old plan or the new one, never half of one.
    """
    plan.validate()
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    temp = os.path.join(directory, f".{os.path.basename(target)}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may not be 022; the mode must be exact
        os.write(fd, plan.to_json().encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    try:
        os.rename(temp, target)
    except BaseException:
        os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_owner_and_mode(what: str, path: str, st: os.stat_result, owner_uid: int) -> None:
    if st.st_uid != owner_uid:
        raise PlanError(
            f"{what} {path} is owned by uid {st.st_uid}, not {owner_uid}: "
            "someone else could have written it; rewrite it as root"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise PlanError(
            f"{what} {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}): "
            "chmod go-w, then rewrite the plan"
        )


def read_plan(path: str | os.PathLike[str], *, owner_uid: int = 0) -> Plan:
    """Read and check a plan. ``owner_uid`` exists for tests; the stage uses root's 0."""
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        _check_owner_and_mode("plan directory", directory, os.stat(directory), owner_uid)
        # O_NOFOLLOW: a symlink planted in place of the plan is refused (ELOOP), and
        # checking the opened fd (not the path) leaves no window to swap the file.
        fd = os.open(target, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise PlanError(f"cannot open plan {target}: {error.strerror}") from error
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PlanError(f"plan {target} is not a regular file")
        _check_owner_and_mode("plan", target, st, owner_uid)
        raw = os.read(fd, MAX_PLAN_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_PLAN_BYTES:
        raise PlanError(f"plan {target} is larger than {MAX_PLAN_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise PlanError(f"plan {target} is not valid JSON ({error})") from error
    return plan_from_dict(data)
