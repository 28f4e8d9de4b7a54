"""The mount table as the stage sees it: /proc/self/mountinfo, parsed once per question.

Used to flush each filesystem on its own (so that a hung one can be named), to find the
old system's block-backed filesystems for the read-only remount, and to tell whether a
path is a mount point.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from initstage import linux

# Filesystems with no backing store of their own: nothing to flush, nothing to protect
# with a read-only remount. (overlay is not here: syncfs on it flushes its upper layer.)
VIRTUAL_FSTYPES = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nsfs",
        "proc",
        "pstore",
        "ramfs",
        "rootfs",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "sysfs",
        "tmpfs",
        "tracefs",
    }
)
# Per-mount flags a remount must repeat, or it clears them (mount(2), MS_REMOUNT).
MOUNT_OPTION_FLAGS = {
    "nosuid": linux.MS_NOSUID,
    "nodev": linux.MS_NODEV,
    "noexec": linux.MS_NOEXEC,
    "noatime": linux.MS_NOATIME,
    "nodiratime": linux.MS_NODIRATIME,
    "relatime": linux.MS_RELATIME,
}


@dataclass(frozen=True)
class Mount:
    """One line of mountinfo (proc(5)): the fields the stage needs."""

    device: str  # "major:minor" of the superblock
    root: str  # the directory of the filesystem mounted here ("/" unless a bind mount)
    mount_point: str
    options: tuple[str, ...]  # per-mount options
    fstype: str
    source: str
    super_options: tuple[str, ...] = ()

    @property
    def flushable(self) -> bool:
        return self.fstype not in VIRTUAL_FSTYPES

    @property
    def block_backed(self) -> bool:
        """Backed by a block device: the device has a real major, or the source names a
        block device (btrfs reports an anonymous 0:N device for its own superblocks)."""
        if self.fstype in VIRTUAL_FSTYPES:
            return False
        if not self.device.startswith("0:"):
            return True
        return self.source.startswith("/dev/")

    @property
    def read_only(self) -> bool:
        return "ro" in self.options

    def flags(self) -> int:
        """The per-mount flags to repeat in a remount."""
        flags = 0
        for option in self.options:
            flags |= MOUNT_OPTION_FLAGS.get(option, 0)
        return flags

    def describe(self) -> str:
        return f"{self.mount_point} ({self.fstype} on {self.source}, {self.device})"

    def is_under(self, path: str) -> bool:
        base = path.rstrip("/")
        return self.mount_point == (base or "/") or self.mount_point.startswith(base + "/")


def unescape_octal(text: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo octal."""
    parts = text.split("\\")
    return parts[0] + "".join(chr(int(part[:3], 8)) + part[3:] for part in parts[1:])


def parse_mountinfo(raw: bytes) -> list[Mount]:
    mounts = []
    for line in raw.decode("utf-8", "surrogateescape").splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(
            Mount(
                device=fields[2],
                root=unescape_octal(fields[3]),
                mount_point=unescape_octal(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=tail[0],
                source=unescape_octal(tail[1]),
                super_options=tuple(tail[2].split(",")) if len(tail) > 2 else (),
            )
        )
    return mounts


def read_mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    with open(path, "rb") as mountinfo:
        return parse_mountinfo(mountinfo.read())


def one_per_superblock(mounts: list[Mount]) -> list[Mount]:
    """The first (outermost) mount of each superblock: syncing or remounting one mount of
    a superblock does it for all its bind mounts."""
    seen: set[str] = set()
    unique = []
    for mount in mounts:
        if mount.device not in seen:
            seen.add(mount.device)
            unique.append(mount)
    return unique


def mount_of(path: str, mounts: list[Mount]) -> Mount | None:
    """The mount that holds ``path``: the last (topmost) with the longest matching prefix."""
    wanted = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts:
        prefix = mount.mount_point.rstrip("/") + "/"
        holds = wanted == mount.mount_point or wanted.startswith(prefix)
        if holds and (best is None or len(mount.mount_point) >= len(best.mount_point)):
            best = mount
    return best


def is_mount_point(path: str) -> bool:
    """Exactly a mount point, per mountinfo (a bind mount keeps its st_dev)."""
    wanted = os.path.realpath(path)
    return any(mount.mount_point == wanted for mount in read_mounts())
