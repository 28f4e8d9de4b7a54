"""A snapshot of what a rehearsal must never change on the host, to compare before and after.

Four parts (issue 11): the host's ``/proc/sys`` values, ``/proc/modules``, the cgroup tree
outside the rehearsal's delegated subtree, and ``/dev``. Other sessions share this machine
and change some of these on their own; what is left out, and why, is said where it is.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from initstage.mounts import read_mounts

# Values the kernel changes by itself, whatever anyone does: counters, random numbers and
# the like. Patterns relative to /proc/sys.
VOLATILE_SYSCTLS = (
    "kernel/random/*",  # entropy_avail, uuid (new at each read), urandom_min_reseed_secs...
    "kernel/ns_last_pid",  # the last pid handed out: moves with every fork on the machine
    "kernel/pty/nr",  # ptys open now: other sessions' terminals
    "kernel/tainted",  # not volatile in itself, but another session's module or oops sets it
    "fs/dentry-state",  # dcache counters
    "fs/inode-nr",  # inode counters
    "fs/inode-state",
    "fs/file-nr",  # open files on the machine
    "fs/aio-nr",  # AIO contexts in use
    "fs/dquot-nr",
    "fs/quota/*",  # quota statistics
    "fs/binfmt_misc/*",  # a mount of its own, where other sessions register qemu-user
    "net/netfilter/nf_conntrack_count",  # tracked connections now
    "vm/stat_refresh",  # write-only trigger whose read says nothing
)
# /dev entries that come and go with other sessions: their terminals, shared memory and
# message queues, the loop and device-mapper devices the VM tier and image tests attach.
VOLATILE_DEV = ("pts/*", "shm/*", "mqueue/*", "loop[0-9]*", "dm-*", "mapper/*", "disk/*", "block/*")
# A cgroup named like a systemd unit outside the rehearsal's subtree would be the rehearsed
# systemd reaching past its cgroup namespace: those names may never appear.
SYSTEMD_UNIT_PATTERNS = ("*.slice", "*.scope", "*.service", "*.mount", "*.socket", "*.swap")


@dataclass
class HostSnapshot:
    sysctls: dict[str, str]
    modules: str | None  # None: this kernel has no /proc/modules (no module support)
    cgroups: dict[str, str]  # "mount point:relative dir" -> its controls, read as text
    dev: dict[str, str]  # relative path -> kind and device number (or symlink target)

    @classmethod
    def take(cls, cgroup_excluded: str = "dboot-rehearsal-") -> HostSnapshot:
        return cls(read_sysctls(), read_modules(), read_cgroups(cgroup_excluded), read_dev())

    def differences(self, after: HostSnapshot) -> list[str]:
        """What changed from this snapshot to ``after``, as readable lines.

        For cgroups, only the ones present in both are compared (other sessions make and
        remove theirs all the time); a new one is a difference only under a systemd unit name.
        """
        found = _compare("sysctl", self.sysctls, after.sysctls)
        if self.modules != after.modules:
            found.append(f"/proc/modules: {self.modules!r} -> {after.modules!r}")
        shared = self.cgroups.keys() & after.cgroups.keys()
        found += _compare(
            "cgroup",
            {key: self.cgroups[key] for key in shared},
            {key: after.cgroups[key] for key in shared},
        )
        for key in sorted(after.cgroups.keys() - self.cgroups.keys()):
            name = key.rstrip("/").rsplit("/", 1)[-1]
            if any(fnmatch.fnmatch(name, pattern) for pattern in SYSTEMD_UNIT_PATTERNS):
                found.append(f"cgroup {key}: a systemd unit's cgroup appeared outside the sandbox")
        found += _compare("/dev", self.dev, after.dev)
        return found


def _compare(kind: str, before: dict[str, str], after: dict[str, str]) -> list[str]:
    return [
        f"{kind} {key}: {before.get(key)!r} -> {after.get(key)!r}"
        for key in sorted(before.keys() | after.keys())
        if before.get(key) != after.get(key)
    ]


def _volatile(relative: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(relative, pattern) for pattern in patterns)


def read_sysctls(root: str = "/proc/sys") -> dict[str, str]:
    """Every readable sysctl's value (or the error its read gives), but the volatile ones."""
    values = {}
    for directory, subdirs, files in os.walk(root):
        relative_dir = os.path.relpath(directory, root)
        subdirs[:] = [
            name
            for name in subdirs
            if not _volatile(os.path.normpath(f"{relative_dir}/{name}") + "/*", VOLATILE_SYSCTLS)
        ]
        for name in files:
            relative = os.path.normpath(f"{relative_dir}/{name}")
            path = f"{directory}/{name}"
            if _volatile(relative, VOLATILE_SYSCTLS) or not os.stat(path).st_mode & 0o444:
                continue
            try:
                with open(path, "rb") as sysctl:
                    values[relative] = sysctl.read().decode(errors="replace")
            except OSError as error:
                values[relative] = f"<{errno.errorcode.get(error.errno or 0, error.errno)}>"
    return values


def read_modules() -> str | None:
    try:
        return Path("/proc/modules").read_text()
    except FileNotFoundError:
        return None


def read_cgroups(excluded_prefix: str) -> dict[str, str]:
    """Each cgroup directory of every cgroup mount of ours (v1 and v2), with the controls
    a rehearsal could change: v2's cgroup.subtree_control and cgroup.type; the subtrees
    whose name starts with ``excluded_prefix`` (rehearsals' delegated cgroups) left out."""
    found = {}
    for mount in read_mounts():
        if mount.fstype not in ("cgroup", "cgroup2"):
            continue
        for directory, subdirs, _files in os.walk(mount.mount_point):
            subdirs[:] = [name for name in subdirs if not name.startswith(excluded_prefix)]
            controls = []
            for control in ("cgroup.subtree_control", "cgroup.type"):
                try:
                    controls.append(Path(directory, control).read_text().strip())
                except OSError:
                    continue  # v1, or the root (which has no cgroup.type)
            relative = os.path.relpath(directory, mount.mount_point)
            found[f"{mount.mount_point}:{relative}"] = " | ".join(controls)
    return found


def read_dev(root: str = "/dev") -> dict[str, str]:
    """Names, kinds and device numbers (or link targets) under /dev, but the volatile ones."""
    found = {}
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            path = f"{directory}/{name}"
            relative = os.path.relpath(path, root)
            if _volatile(relative, VOLATILE_DEV):
                continue
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                kind = "char" if stat.S_ISCHR(info.st_mode) else "block"
                found[relative] = f"{kind} {os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
            elif stat.S_ISLNK(info.st_mode):
                found[relative] = f"link {os.readlink(path)}"
            else:
                found[relative] = stat.filemode(info.st_mode)[0]
    return found
