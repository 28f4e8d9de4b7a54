"""The machine's boot chain as found, and whether an install can ride on it.

An install changes one thing in the boot chain: the file the kernel runs as init. Firmware,
bootloader, kernel, initramfs, ``/boot`` and the ESP stay as they are, so every chain that
ends in "the kernel mounts (or an initramfs mounts) this root filesystem and runs its init"
is supported, whatever the firmware and bootloader. What is read here is what the plan
shows and what decides the refusals: a root that is not a disk filesystem, an init path
that is not on it, no space, no interpreter for the shim.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
from pathlib import Path

from initstage import bootstate
from injector.events import Notice

# Filesystems a machine's root can live on and keep a tree beside the old system. Not
# tmpfs, overlay, squashfs or nfs: those are a live image, a container or someone else's.
DISK_FILESYSTEMS = ("ext4", "ext3", "ext2", "xfs", "btrfs", "f2fs", "jfs")
DEFAULT_INIT_PATH = "/sbin/init"
# What an install needs beyond the image's own bytes: directories and inodes the estimate
# does not count, the kernel's modules and firmware, the journal of a first boot.
SPACE_MARGIN_BYTES = 256 << 20
INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")
MIN_PYTHON = (3, 9)


@dataclasses.dataclass
class RootFilesystem:
    device: str
    fstype: str
    uuid: str
    options: str
    free_bytes: int


@dataclasses.dataclass
class BootChain:
    """Facts, each as found (an empty string: not found)."""

    firmware: str  # "UEFI" or "BIOS"
    bootloader: str  # "GRUB", "systemd-boot", "extlinux", or ""
    kernel: str  # /boot/vmlinuz-RELEASE
    initramfs: str
    boot_partition: str  # the device of a separate /boot
    esp: str  # where the ESP is mounted (/boot/efi, /efi)
    kernel_cmdline: str
    init_path: str  # what the kernel runs as init: init= or /sbin/init
    init_target: str  # what that path runs today (a symlink's target, or the path itself)
    init_is_link: bool
    root: RootFilesystem | None
    interpreter: str  # the old system's Python the shim runs on, or ""
    interpreter_version: str

    def describe(self) -> list[str]:
        root = self.root
        lines = [
            f"firmware {self.firmware}, bootloader {self.bootloader or 'unknown'}",
            f"kernel {self.kernel or 'not found under /boot'}"
            f", initramfs {self.initramfs or 'none'}",
            f"separate /boot: {self.boot_partition or 'no'}; ESP: {self.esp or 'none'}",
            f"kernel command line: {self.kernel_cmdline}",
            f"init: {self.init_path} -> {self.init_target}",
        ]
        if root is not None:
            lines.append(
                f"root filesystem: {root.device} ({root.fstype}, UUID {root.uuid or '?'}),"
                f" {root.free_bytes >> 20} MiB free"
            )
        lines.append(f"shim interpreter: {self.interpreter or 'none'} {self.interpreter_version}")
        return lines


def read_boot_chain(root: str = "/") -> BootChain:
    cmdline = _read("/proc/cmdline").strip()
    release = os.uname().release
    init_path = _init_from_cmdline(cmdline) or DEFAULT_INIT_PATH
    is_link = os.path.islink(init_path)
    target = os.path.realpath(init_path) if is_link else init_path
    interpreter, version = find_interpreter()
    return BootChain(
        firmware="UEFI" if os.path.isdir("/sys/firmware/efi") else "BIOS",
        bootloader=_bootloader(),
        kernel=_existing(f"/boot/vmlinuz-{release}"),
        initramfs=_existing(f"/boot/initrd.img-{release}", f"/boot/initramfs-{release}.img"),
        boot_partition=_mount_source("/boot"),
        esp=next((p for p in ("/boot/efi", "/efi") if _mount_source(p)), ""),
        kernel_cmdline=cmdline,
        init_path=init_path,
        init_target=target,
        init_is_link=is_link,
        root=read_root_filesystem(root),
        interpreter=interpreter,
        interpreter_version=version,
    )


def read_root_filesystem(root: str = "/") -> RootFilesystem | None:
    try:
        pairs = subprocess.run(
            ["findmnt", "-n", "-P", "-o", "SOURCE,FSTYPE,UUID,OPTIONS", "-M", root],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    fields = dict(word.split("=", 1) for word in shlex.split(pairs) if "=" in word)
    stats = os.statvfs(root)
    return RootFilesystem(
        device=fields.get("SOURCE", ""),
        fstype=fields.get("FSTYPE", ""),
        uuid=fields.get("UUID", ""),
        options=fields.get("OPTIONS", ""),
        free_bytes=stats.f_bavail * stats.f_frsize,
    )


def find_interpreter() -> tuple[str, str]:
    """The old system's own python3, which the shim runs on at every boot: the distribution's
    unversioned name, so that an upgrade of the old system (3.11 to 3.13) keeps it."""
    for path in INTERPRETERS:
        if not os.path.isfile(path) or os.stat(path).st_uid != 0:
            continue
        try:
            version = subprocess.run(
                [path, "-I", "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        major, minor = (int(part) for part in version.split("."))
        if (major, minor) >= MIN_PYTHON:
            return path, version
    return "", ""


def notices(
    chain: BootChain, needed_bytes: int, installed: bootstate.BootState | None
) -> list[Notice]:
    """The install's own verdicts. The switch's RAM, swap and ptrace verdicts do not apply:
    nothing runs from RAM and nothing is injected."""
    found: list[Notice] = []
    root = chain.root
    if root is None:
        found.append(
            Notice(
                "blocker",
                "install-root-unknown",
                "the root filesystem could not be read",
                "check that findmnt (util-linux) is installed and / is mounted",
            )
        )
    elif root.fstype not in DISK_FILESYSTEMS:
        found.append(
            Notice(
                "blocker",
                "install-root-not-disk",
                f"the root filesystem is {root.fstype} ({root.device}), not a disk filesystem:"
                " a live system, a container or a network root has no disk to install on",
                "install from the machine's own system, booted from its disk",
            )
        )
    elif root.free_bytes < needed_bytes:
        found.append(
            Notice(
                "blocker",
                "install-no-space",
                f"the install needs {needed_bytes >> 20} MiB on {root.device} and"
                f" {root.free_bytes >> 20} MiB are free",
                "free space on the root filesystem, or use a smaller image",
            )
        )
    if not chain.interpreter:
        found.append(
            Notice(
                "blocker",
                "install-no-interpreter",
                f"no root-owned Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]}+ at"
                f" {' or '.join(INTERPRETERS)}: the boot shim runs on the old system's python3",
                "install the distribution's python3 (apt-get install python3-minimal)",
            )
        )
    if not os.path.lexists(chain.init_path):
        found.append(
            Notice(
                "blocker",
                "install-init-missing",
                f"the kernel's init path {chain.init_path} does not exist",
                "boot the machine with its usual init, then install",
            )
        )
    elif _mount_source_of(chain.init_path) != _mount_source_of("/"):
        found.append(
            Notice(
                "blocker",
                "install-init-elsewhere",
                f"the kernel's init path {chain.init_path} is not on the root filesystem",
                "install on a machine whose init lives on its root filesystem",
            )
        )
    if installed is not None and installed.state == bootstate.PROBATION:
        found.append(
            Notice(
                "blocker",
                "install-pending",
                f"an install of {installed.image} is still on probation",
                "keep it (touch /run/dboot/keep in it) or run `dboot install --revert` first",
            )
        )
    if os.path.realpath(chain.init_path) == os.path.realpath(bootstate.SHIM_ENTRY) and (
        installed is None or installed.state == bootstate.KEPT
    ):
        found.append(
            Notice(
                "blocker",
                "install-over-install",
                "this machine already boots an installed image",
                "run `dboot install --revert` to boot the old system first, then install again",
            )
        )
    if not chain.kernel:
        found.append(
            Notice(
                "warning",
                "install-kernel-elsewhere",
                f"no kernel for {os.uname().release} under /boot: the machine boots one from"
                " elsewhere (a hypervisor's direct kernel boot, a network boot)",
                "nothing of it changes; make sure it mounts this root and runs its init",
            )
        )
    if chain.bootloader == "":
        found.append(
            Notice(
                "warning",
                "install-bootloader-unknown",
                "no GRUB, systemd-boot or extlinux configuration was found",
                "nothing in the boot chain changes; check that the kernel boots this root",
            )
        )
    return found


def _init_from_cmdline(cmdline: str) -> str:
    # The kernel takes the last init= it sees, and stops reading its own words at "--".
    value = ""
    for word in cmdline.split():
        if word == "--":
            break
        if word.startswith("init="):
            value = word[len("init=") :]
    return value


def _bootloader() -> str:
    if any(os.path.exists(p) for p in ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg")):
        return "GRUB"
    if any(os.path.exists(p) for p in ("/boot/efi/loader/loader.conf", "/efi/loader/loader.conf")):
        return "systemd-boot"
    if os.path.exists("/boot/extlinux/extlinux.conf"):
        return "extlinux"
    return ""


def _existing(*paths: str) -> str:
    return next((p for p in paths if os.path.exists(p)), "")


_MOUNTINFO_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mount_source(mount_point: str) -> str:
    """The device mounted exactly at ``mount_point``, or ""."""
    for line in _read("/proc/self/mountinfo").splitlines():
        fields = line.split(" - ")
        if len(fields) != 2:
            continue
        point = _MOUNTINFO_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[0].split()[4])
        if point == mount_point:
            parts = fields[1].split()
            return parts[1] if len(parts) > 1 else ""
    return ""


def _mount_source_of(path: str) -> int:
    try:
        return os.stat(os.path.dirname(os.path.realpath(path))).st_dev
    except OSError:
        return -1


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
