"""The RAM root: a tmpfs sized for the image, and the host files the new system needs.

``RamRoot`` mounts a tmpfs at ``<dir>/root``, ``<dir>`` being the run's own subdirectory of
the state dir (mode 0700, see ``injector.ramroot.statedir``), with an explicit size, never
the kernel's default of half the RAM. It is a context manager: any exception,
Ctrl-C included, unmounts it and removes the directories it made; only ``keep()`` (called
once the new init owns it) leaves it in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import socket
import stat
from pathlib import Path

from initstage import linux
from injector.access.facts import choose_resolv_conf, upstream_files
from injector.errors import BadInput, EnvironmentFailure, system_call_failure
from injector.image.imageindex import INODE_BYTES
from injector.signals import signals_deferred

MiB = 1 << 20
MIN_HEADROOM = 64 * MiB  # logs, package caches and the like written in the first hours
HEADROOM_FRACTION = 4  # ... or a quarter of the image, whichever is larger
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def tmpfs_size_for(estimated_bytes: int) -> int:
    """The tmpfs size for an image: the estimate plus headroom, in whole MiB."""
    size = estimated_bytes + max(estimated_bytes // HEADROOM_FRACTION, MIN_HEADROOM)
    return -(-size // MiB) * MiB


def parse_size(text: str) -> int:
    """Bytes from "1048576", "512M", "2G", "1.5G", "512MiB" (units are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if match is None:
        raise BadInput(f"size {text!r} is not understood", "write e.g. 1048576, 512M or 2G")
    number, unit = match.groups()
    size = int(float(number) * SIZE_UNITS[unit.upper()])
    if size <= 0:
        raise BadInput(f"size {text!r} is zero", "give a positive size such as 512M")
    return size


class RamRoot:
    """A tmpfs at ``state_dir/"root"``; see the module docstring."""

    def __init__(self, state_dir: Path, size_bytes: int) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / "root"
        self.size_bytes = size_bytes
        self._created: list[Path] = []  # directories we made, outermost first
        self._mounted = False
        self._kept = False

    def __enter__(self) -> RamRoot:
        self.mount()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._kept:
            self.unmount()

    def mount(self) -> None:
        if os.geteuid() != 0:
            raise EnvironmentFailure("mounting the RAM root needs root", "run dboot with sudo")
        if self.size_bytes <= 0:
            raise BadInput(
                f"tmpfs size {self.size_bytes} is not positive", "give e.g. --tmpfs-size 1G"
            )
        try:
            self._make_dirs()
            if os.path.ismount(self.path):
                raise EnvironmentFailure(
                    f"{self.path} is already a mount point (a previous run?)",
                    f"unmount it (umount {self.path}) or choose another --state-dir",
                )
            if any(self.path.iterdir()):
                raise EnvironmentFailure(
                    f"{self.path} is not empty", "empty it or choose another --state-dir"
                )
            options = f"size={self.size_bytes},mode=0755,uid=0,gid=0"
            with system_call_failure(
                f"cannot mount a tmpfs on {self.path}",
                "run as root on the host (CAP_SYS_ADMIN), or choose another --state-dir",
            ):
                linux.mount("dboot", str(self.path), "tmpfs", 0, options)
            self._mounted = True
        except BaseException:
            self.unmount()
            raise

    def _make_dirs(self) -> None:
        missing = []
        for directory in (self.path, *self.path.parents):
            if directory.exists() or directory.is_symlink():
                break
            missing.append(directory)
        for directory in reversed(missing):
            directory.mkdir(mode=0o700)
            self._created.append(directory)
        # Never chmod what is there: the run's own subdirectory was made root's alone.
        state = os.lstat(self.state_dir)
        if not stat.S_ISDIR(state.st_mode) or state.st_uid != 0:
            raise EnvironmentFailure(
                f"{self.state_dir} is not a root-owned directory", "choose another --state-dir"
            )
        if self.path.is_symlink() or not self.path.is_dir():
            raise EnvironmentFailure(
                f"{self.path} is not a directory", "choose another --state-dir"
            )

    def keep(self) -> None:
        """The new init owns the tmpfs now: leaving the context must not unmount it."""
        self._kept = True

    def unmount(self) -> None:
        """Unmount (if we mounted) and remove the directories we created. Idempotent."""
        with signals_deferred():
            if self._mounted:
                try:
                    linux.umount2(str(self.path))
                except OSError as error:
                    if error.errno != errno.EINVAL:  # EINVAL: no longer mounted
                        # Busy: detach it now; the kernel frees it with its last user.
                        with contextlib.suppress(OSError):
                            linux.umount2(str(self.path), linux.MNT_DETACH)
                self._mounted = False
            for directory in reversed(self._created):
                with contextlib.suppress(OSError):
                    directory.rmdir()
            self._created.clear()

    def used_bytes(self) -> int:
        """What the tmpfs holds in RAM: its data pages (what ``df`` shows) plus the kernel's
        per-inode charge (see ``injector.image.imageindex``)."""
        usage = os.statvfs(self.path)
        data = (usage.f_blocks - usage.f_bfree) * usage.f_frsize
        return data + (usage.f_files - usage.f_ffree) * INODE_BYTES

    def data_bytes(self) -> int:
        """Only the data pages, as ``df`` reports them."""
        usage = os.statvfs(self.path)
        return (usage.f_blocks - usage.f_bfree) * usage.f_frsize


# ---------------------------------------------------------------------------------------
# Host files
# ---------------------------------------------------------------------------------------


# The host files a new root gets, by name in /etc. machine-id keeps the machine's identity
# (journal, DHCP client id, D-Bus) across the switch.
HOST_FILES = ("hostname", "hosts", "resolv.conf", "machine-id")
# Bigger than any sane hosts table: a host file this large is a mistake, not data to copy.
HOST_FILE_MAX = 4 * MiB
MACHINE_ID = re.compile(rb"[0-9a-f]{32}\n?")


@dataclasses.dataclass(frozen=True)
class HostFile:
    """One host file as found: ``content`` is None when it cannot be carried over, and
    ``state`` says why in words (``missing``, ``a dangling symlink to ...``, ``a directory``)."""

    name: str
    state: str
    content: bytes | None


def read_host_file(path: Path) -> tuple[str, bytes | None]:
    """(state, content) of a host file, whatever it is: never raises for a bad file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as error:
        return f"unreadable ({error.strerror or error})", None
    link = ""
    if stat.S_ISLNK(info.st_mode):
        target = os.readlink(path)
        try:
            info = os.stat(path)
        except OSError:
            return f"a dangling symlink to {target}", None
        link = f" (via a symlink to {target})"
    if stat.S_ISDIR(info.st_mode):
        return f"a directory{link}", None
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file{link}", None
    if info.st_size > HOST_FILE_MAX:
        return f"{info.st_size} bytes, too large{link}", None
    try:
        content = path.read_bytes()
    except OSError as error:
        return f"unreadable ({error.strerror or error}){link}", None
    return ("empty" if not content else "ok") + link, content


def upstream_resolv_conf(
    resolv_conf: Path = Path("/etc/resolv.conf"), resolved_upstream: Path | None = None
) -> bytes:
    """The host's resolv.conf with real upstream servers: when it points at a local
    resolver (systemd-resolved's stub, dnsmasq, 127.0.0.1), that resolver's own upstream
    list instead, by ``injector.access.facts.choose_resolv_conf`` (the one rule);
    ``resolved_upstream`` replaces the usual state files. What there is when none names a
    real server (the preflight warns). Raises OSError when the host has no readable
    resolv.conf (see ``host_files``)."""
    content = resolv_conf.read_bytes()
    host_root = resolv_conf.parent.parent
    files = upstream_files(host_root) if resolved_upstream is None else [resolved_upstream]
    chosen, _ = choose_resolv_conf(content, files)
    return content if chosen is None else chosen


def host_files(
    etc: Path = Path("/etc"),
    resolved_upstream: Path | None = None,
) -> list[HostFile]:
    """What each of ``HOST_FILES`` is on this host and what the new root gets from it.

    Any of them may be missing, empty, a dangling symlink or a directory (a minimal
    debootstrap has no /etc/hosts): that is a fact, never an error. The hostname falls back
    to the kernel's; a machine-id that is not 32 hex digits is not carried over (the new
    system's init makes its own); resolv.conf is the real upstream list, never a local stub.
    """
    found = []
    for name in HOST_FILES:
        state, content = read_host_file(etc / name)
        if name == "hostname" and not (content or b"").strip():
            content = socket.gethostname().encode() + b"\n"
            state += ", the kernel's hostname is used"
        elif name == "machine-id" and content is not None and not MACHINE_ID.fullmatch(content):
            state, content = f"{state}, not a machine id", None
        elif name == "resolv.conf" and content is not None:
            with contextlib.suppress(OSError):
                content = upstream_resolv_conf(etc / name, resolved_upstream)
        found.append(HostFile(name, state, content))
    return found


def add_host_files(
    root: Path,
    *,
    etc: Path = Path("/etc"),
    resolved_upstream: Path | None = None,
) -> list[str]:
    """Give the new root this host's name, hosts table, upstream DNS servers and machine id.

    A host file that cannot be carried over (see ``host_files``) leaves the image's own in
    place; so does an image whose file there is a directory. The files are written inside
    ``root`` without following any symlink the image has there (an image's
    ``/etc/resolv.conf`` is often a symlink into ``/run``: followed from the host, it would
    write into the *host's* ``/run``). Returns the paths written.
    """
    written = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        etc_fd = _open_etc(root_fd, root)
        try:
            for host_file in host_files(etc, resolved_upstream):
                if host_file.content is None:
                    continue
                try:
                    replace_file(etc_fd, host_file.name, host_file.content)
                except IsADirectoryError:
                    continue  # the image made it a directory: its choice, left alone
                written.append(f"/etc/{host_file.name}")
        finally:
            os.close(etc_fd)
    finally:
        os.close(root_fd)
    return written


def _open_etc(root_fd: int, root: Path) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir("etc", 0o755, dir_fd=root_fd)
    try:
        return os.open("etc", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=root_fd)
    except OSError:
        raise EnvironmentFailure(
            f"{root}/etc is not a directory (a symlink?)", "use an image with a real /etc"
        ) from None


def replace_file(
    dir_fd: int,
    name: str,
    content: bytes,
    mode: int | None = None,
    owner: tuple[int, int] | None = None,
) -> None:
    """Write ``name`` in ``dir_fd`` as a fresh regular file, then rename it into place:
    an existing symlink is replaced, never followed. Raises IsADirectoryError, leaving
    nothing behind, when ``name`` is a directory there. ``mode`` defaults to 0644 (0444
    for machine-id); ``owner`` (uid, gid) is set before the file is in place."""
    temporary = f".{name}.dboot"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary, dir_fd=dir_fd)
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd
    )
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        if mode is None:
            mode = 0o444 if name == "machine-id" else 0o644  # as systemd makes it
        if owner is not None:
            os.fchown(fd, *owner)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    try:
        os.rename(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except OSError:
        os.unlink(temporary, dir_fd=dir_fd)
        raise


def write_etc_file(root: Path, name: str, content: bytes) -> None:
    """Write ``/etc/NAME`` inside ``root`` as :func:`add_host_files` does: no symlink the
    image has there (``/etc`` itself included) is ever followed."""
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        etc_fd = _open_etc(root_fd, root)
        try:
            replace_file(etc_fd, name, content)
        finally:
            os.close(etc_fd)
    finally:
        os.close(root_fd)
