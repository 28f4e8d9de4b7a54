"""What keeps a rehearsal off the host: the mounts and capabilities of a hermetic sandbox.

A rehearsal's PID 1 shares the host's kernel. New namespaces (PID, mount, UTS, IPC,
network, cgroup) hide the host's processes, mounts, names and interfaces, but not the
kernel's global knobs. So, like systemd-nspawn does for a container:

- ``/proc/sys`` and ``/proc/sysrq-trigger`` are read-only bind mounts, ``/sys`` is a
  read-only sysfs (of the sandbox's own network namespace), and the only writable
  cgroup tree is the sandbox's delegated subtree (cgroup2 mounted in its cgroup
  namespace). systemd skips systemd-sysctl, udev's trigger and the like when these are
  read-only (their ``ConditionPathIsReadWrite=``).
- ``/dev`` is a small tmpfs with only harmless character devices: no host disk is there.
- Capabilities that reach the whole machine are dropped from the bounding set, so no
  process of the sandbox can ever hold them: see :data:`DROPPED_CAPABILITIES`.
- ``container=dboot`` is in PID 1's environment, which is how systemd and friends learn
  that they run in a container.

Not a security boundary against a hostile init: PID 1 keeps CAP_SYS_ADMIN (the init stage
needs mount and pivot_root), so it could remount what is read-only here. It keeps an
ordinary init (systemd) from changing the host.

Standard library only (the stand-in and the stage both use it).
"""

from __future__ import annotations

import contextlib
import os
import stat

from initstage import linux

CONTAINER_VARIABLE = "container"
CONTAINER_NAME = "dboot"

# include/uapi/linux/capability.h. Each one acts on the whole machine, whatever the
# namespaces: kernel modules, raw I/O ports and /dev/mem, the clock, kexec and reboot, the
# kernel log, MAC policy, wake alarms and suspend, BPF and perf, process accounting and
# the audit rules. The init stage needs none of them (it mounts, pivots, kills, makes
# device nodes and sets rlimits: CAP_SYS_ADMIN, CAP_KILL, CAP_MKNOD, CAP_SYS_RESOURCE).
DROPPED_CAPABILITIES = {
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_pacct": 20,
    "sys_boot": 22,
    "sys_time": 25,
    "audit_control": 30,
    "mac_override": 32,
    "mac_admin": 33,
    "syslog": 34,
    "wake_alarm": 35,
    "block_suspend": 36,
    "perfmon": 38,
    "bpf": 39,
}
CAP_MKNOD = 27
PR_CAPBSET_DROP = 24

CLONE_NEWCGROUP = 0x02000000
MNT_DETACH = 2
HARDENED = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
READ_ONLY_PROC_PATHS = ("/proc/sys", "/proc/sysrq-trigger")
STAGED_CONSOLE = "/.dboot-console"  # in the new root, from before the pivot until /dev exists
# A new file and nothing else: never one that exists, never through a symlink.
CREATE_ONLY = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# The minimal /dev of a rehearsal: no host devices beyond the harmless ones.
MINIMAL_DEV_NODES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
)
MINIMAL_DEV_LINKS = (
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)
# gid 5 is "tty" on Debian, Fedora and Alpine; systemd uses the same options.
DEVPTS_OPTIONS = "mode=0620,gid=5,ptmxmode=0666"


def drop_capability(number: int) -> None:
    """Drop one capability from the bounding set: no later execve can give it back."""
    if linux.libc.prctl(PR_CAPBSET_DROP, number, 0, 0, 0) != 0:
        raise linux._fail(f"prctl(PR_CAPBSET_DROP, {number})")


def make_proc_read_only(proc: str = "/proc") -> None:
    """Bind ``/proc/sys`` and ``/proc/sysrq-trigger`` onto themselves, read-only (a kernel
    without CONFIG_MAGIC_SYSRQ has no sysrq-trigger: nothing to protect there)."""
    for path in READ_ONLY_PROC_PATHS:
        path = proc + path.removeprefix("/proc")
        if not os.path.exists(path):
            continue
        linux.mount(path, path, None, linux.MS_BIND)
        linux.mount(None, path, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY | HARDENED)


def mount_read_only_sys(sys: str = "/sys") -> None:
    """A read-only sysfs at ``sys`` and a writable cgroup2 at ``sys/fs/cgroup``.

    Mounted from inside a cgroup namespace, that cgroup2 shows the namespace's root cgroup
    as its root: the delegated subtree, and nothing of the host's tree above it."""
    linux.mount("sysfs", sys, "sysfs", HARDENED | linux.MS_RDONLY)
    linux.mount("cgroup2", f"{sys}/fs/cgroup", "cgroup2", HARDENED)


def mount_minimal_dev(dev: str = "/dev") -> None:
    """A small tmpfs at ``dev`` with only :data:`MINIMAL_DEV_NODES` and their usual links."""
    linux.mount("tmpfs", dev, "tmpfs", linux.MS_NOSUID | linux.MS_NOEXEC, "mode=0755,size=1m")
    for name, major, minor in MINIMAL_DEV_NODES:
        path = f"{dev}/{name}"
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(path, 0o666)  # mknod's mode went through the umask
    for name, target in MINIMAL_DEV_LINKS:
        os.symlink(target, f"{dev}/{name}")
    os.mkdir(f"{dev}/pts", 0o755)
    os.mkdir(f"{dev}/shm", 0o1777)
    os.chmod(f"{dev}/shm", 0o1777)


def open_console(fd: int, path: str) -> int | None:
    """An O_PATH fd, opened in our mount namespace, of the terminal on ``fd`` as ``path``
    names it; None when ``fd`` is no terminal or ``path`` is another device.

    A mount can only be bound from a path of our own mount namespace: the fd itself was
    opened in the host's (or another) one, so the terminal is opened again here by name."""
    try:
        if not os.isatty(fd) or os.stat(path).st_rdev != os.fstat(fd).st_rdev:
            return None
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return None


def bind_console(terminal: int, target: str) -> None:
    """Bind ``terminal`` (from :func:`open_console`) onto a file made at ``target``: a
    container's /dev/console. systemd writes its status lines there and, as PID 1 of a
    container, its log. The fd is closed.

    ``target`` is in the new root, before the pivot: by path, an image's symlink there
    (``/.dboot-console -> /run/nologin``) would lead to the host's files. So the name is made
    afresh in its directory (whatever the image had there is removed, never followed) with
    O_EXCL|O_NOFOLLOW, and the mount goes onto that very file, through its fd."""
    directory, name = os.path.split(target)
    try:
        parent = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)
            made = os.open(name, CREATE_ONLY, 0o600, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            linux.mount(f"/proc/self/fd/{terminal}", f"/proc/self/fd/{made}", None, linux.MS_BIND)
        finally:
            os.close(made)
    finally:
        os.close(terminal)


def move_staged_console(dev: str = "/dev") -> None:
    """Move the console :func:`bind_console` staged at :data:`STAGED_CONSOLE` (before the
    pivot: the terminal's devpts is the old root's, which the pivot detaches, and a
    detached mount cannot be bound from) to ``dev/console``."""
    console = f"{dev}/console"
    os.close(os.open(console, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    linux.mount(STAGED_CONSOLE, console, None, linux.MS_MOVE)
    os.unlink(STAGED_CONSOLE)


def drop_staged_console() -> None:
    """No /dev to move the staged console to: take it away."""
    linux.umount2(STAGED_CONSOLE, MNT_DETACH)
    os.unlink(STAGED_CONSOLE)


def mount_devpts(pts: str = "/dev/pts") -> None:
    """A devpts instance of our own (its ptys are not the host's)."""
    linux.mount("devpts", pts, "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, DEVPTS_OPTIONS)
