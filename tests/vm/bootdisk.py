"""A firmware bed's disk: partitioned, with GRUB installed on it, as Debian's installer leaves one.

``make_boot_disk`` turns the disk layer's tree (the x86_64 remote machine's tree, whose base
already holds GRUB's platform package from the ``grub-<firmware>`` layer) into ``disk.raw``:

1. ``/etc/fstab`` by UUID for every filesystem, and GRUB's defaults for the serial console;
2. the tree split by mount point (``/boot/efi``, ``/boot``, ``/``), each part sized from its files;
3. the partition table, written by sfdisk into the image file;
4. the image on a loop device with its partitions: ``losetup --partscan``, then ``partx --add``
   when the kernel read no table itself (this project's CI kernel has no MBR or GPT parser);
5. ext4 made from the files (``mkfs.ext4 -d``), FAT made empty;
6. in a child process with a mount namespace of its own (``python -m tests.vm.bootdisk``), the
   filesystems mounted as the guest mounts them, and in a chroot of them the tree's own
   ``grub-install`` and ``update-grub``, with a private ``/dev`` holding the loop devices and the
   ``/dev/disk/by-uuid`` links udev would make (without them update-grub writes
   ``root=/dev/loopNpM``, which the guest has not; the build checks for ``root=UUID=``);
7. the ESP without a kernel FAT driver (CI's kernel has none): grub-install checks that the
   ESP is FAT with GRUB's own FAT reader, on the device that ``/proc/self/mountinfo`` names for
   ``--efi-directory``. So a tmpfs is mounted there under the FAT partition's device name,
   grub-install checks the real FAT partition and writes its files into the tmpfs, and mtools
   copies them into the FAT filesystem, which the build then lists back;
8. ``layout.json`` beside the disk: each filesystem's mount point, type, UUID and guest device
   (``read_layout``, ``VmBed.filesystems``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.vm.build import (
    REPO,
    VARIANTS,
    BuildError,
    Filesystem,
    Firmware,
    Log,
    Partition,
    Variant,
    run,
)

LAYOUT = "layout.json"
MIB = 2**20
# Free room on the root filesystem, beyond its files: `dboot install` puts the image's tree
# beside the old one there. The disk is sparse and each machine writes to its own overlay, so
# room costs nothing until used.
ROOT_ROOM_MIB = 2048
GUEST_DISK = "/dev/vda"  # the virtio disk, as the guest names it
ROOT_LABEL = "dboot-vm"  # the -kernel bed's root has the same label
# The chroot's environment: the tree's own tools, no terminal to ask questions on.
CHROOT_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
}
# Character devices the chroot's tools open (grub-mkconfig's shell, mkfs' randomness).
CHROOT_CHAR_DEVICES = ("null", "zero", "full", "random", "urandom", "tty")


def grub_defaults(console: str) -> dict[str, str]:
    """What the firmware beds set in /etc/default/grub (the values are shell words)."""
    return {
        # A second of menu on the serial console: it shows GRUB read its grub.cfg, costs little.
        "GRUB_TIMEOUT": "1",
        "GRUB_TIMEOUT_STYLE": "menu",
        # No "quiet": the kernel's and systemd's lines reach the serial console the tests read.
        # No panic= either: as on a stock Debian, a kernel panic hangs the machine.
        "GRUB_CMDLINE_LINUX_DEFAULT": '""',
        "GRUB_CMDLINE_LINUX": f'"console={console}"',
        # GRUB on the serial port, which the tests read (QEMU has no display here). Not "serial
        # console": the console is the serial port as well here (SeaBIOS redirects its text
        # output there when QEMU has no VGA, OVMF's console includes it), so every line came
        # twice.
        "GRUB_TERMINAL": "serial",
        "GRUB_SERIAL_COMMAND": '"serial --unit=0 --speed=115200"',
    }


@dataclass(frozen=True)
class Planned:
    """A partition of the disk being built: where its files come from and what it becomes."""

    partition: Partition
    number: int  # 1-based, in disk order
    uuid: str
    content: Path  # its files (an empty directory for the ESP)
    size_mib: int = 0

    @property
    def filesystem(self) -> Filesystem:
        part = self.partition
        return Filesystem(part.mountpoint, part.fstype, self.uuid, f"{GUEST_DISK}{self.number}")


def make_boot_disk(tree: Path, image: Path, variant: Variant, log: Log) -> None:
    """The partitioned disk ``image`` from ``tree`` (which it takes apart), GRUB installed on it,
    and its ``layout.json``. Raises BuildError naming the failed step."""
    firmware = variant.firmware
    assert firmware is not None, f"{variant.name} is not a firmware bed"
    log(f"the {firmware.name} disk: {firmware.label} partitions, GRUB from the guest's tree")
    parts_dir = image.parent / "parts"
    parts_dir.mkdir()
    try:
        planned = plan(firmware, tree, parts_dir)
        (tree / "etc/fstab").write_text(fstab(planned))
        set_shell_variables(tree / "etc/default/grub", grub_defaults(variant.arch.console))
        split_tree(tree, planned)
        planned = [size(entry) for entry in planned]
        write_partition_table(image, firmware, planned)
        with loop_device(image, len(planned)) as disk:
            for entry in planned:
                make_filesystem(entry, partition_device(disk, entry))
            root = parts_dir / "mnt"
            root.mkdir()
            install_grub_privately(variant, disk, root, planned, log)
    finally:
        # Never delete through a mount that failed to go (the chroot's /proc and /sys).
        if not mounted_under(parts_dir):
            shutil.rmtree(parts_dir, ignore_errors=True)
    write_layout(image, firmware, [entry.filesystem for entry in planned])


def plan(firmware: Firmware, tree: Path, parts_dir: Path) -> list[Planned]:
    planned = []
    for number, part in enumerate(firmware.partitions, start=1):
        content = tree if part.mountpoint == "/" else parts_dir / str(number)
        planned.append(Planned(part, number, new_uuid(part.fstype), content))
    if sum(entry.partition.mountpoint == "/" for entry in planned) != 1:
        raise BuildError(f"the {firmware.name} layout needs exactly one / (tests/vm/build.py)")
    return planned


def new_uuid(fstype: str) -> str:
    """A fresh filesystem UUID, as blkid will show it (FAT has a 32-bit volume serial)."""
    if fstype == "vfat":
        serial = uuid.uuid4().hex[:8].upper()
        return f"{serial[:4]}-{serial[4:]}"
    return str(uuid.uuid4())


def root_uuid(planned: list[Planned]) -> str:
    return next(entry.uuid for entry in planned if entry.partition.mountpoint == "/")


def depth(mountpoint: str) -> int:
    return len(Path(mountpoint).parts)


def fstab(planned: list[Planned]) -> str:
    """By UUID, as Debian's installer writes it, outer mount points first."""
    lines = [
        "# <file system> <mount point> <type> <options> <dump> <pass>",
        "# By UUID, as Debian's installer writes it (tests/vm/bootdisk.py).",
    ]
    for entry in sorted(planned, key=lambda entry: depth(entry.partition.mountpoint)):
        part = entry.partition
        lines.append(
            f"UUID={entry.uuid} {part.mountpoint} {part.fstype} {part.options} 0 {part.fsck_pass}"
        )
    return "\n".join(lines) + "\n"


def set_shell_variables(path: Path, values: dict[str, str]) -> None:
    """Set KEY=VALUE lines of a shell-sourced file in place (a commented-out default is
    replaced where it stands), as an administrator edits /etc/default/grub."""
    lines = path.read_text().splitlines()
    for key, value in values.items():
        pattern = re.compile(rf"^#?\s*{key}=")
        at = next((i for i, line in enumerate(lines) if pattern.match(line)), None)
        if at is None:
            lines.append(f"{key}={value}")
        else:
            lines[at] = f"{key}={value}"
    path.write_text("\n".join(lines) + "\n")


def split_tree(tree: Path, planned: list[Planned]) -> None:
    """Each filesystem's files into its own directory: the deepest mount points move out first,
    each leaving its empty mount point behind (so /boot keeps an empty efi/)."""
    for entry in sorted(planned, key=lambda entry: -depth(entry.partition.mountpoint)):
        if entry.content == tree:
            continue
        mountpoint = tree / entry.partition.mountpoint.lstrip("/")
        if mountpoint.exists():
            mountpoint.rename(entry.content)
        else:
            entry.content.mkdir()
        mountpoint.mkdir(mode=0o755)


def size(entry: Planned) -> Planned:
    """The partition's size: the layout's, or its files plus a quarter and the root's room."""
    size_mib = entry.partition.size_mib
    if not size_mib:
        used = int(run(["du", "-sb", str(entry.content)], "du of the disk tree").split()[0])
        size_mib = used * 5 // 4 // MIB + ROOT_ROOM_MIB
    return Planned(entry.partition, entry.number, entry.uuid, entry.content, size_mib)


def write_partition_table(image: Path, firmware: Firmware, planned: list[Planned]) -> None:
    """A sparse image with the partition table: 1 MiB before the first partition (the MBR gap
    GRUB's core.img goes in on BIOS, aligned as installers do), 1 MiB after the last (GPT's
    backup header)."""
    total_mib = 1 + sum(entry.size_mib for entry in planned) + 1
    with image.open("wb") as disk:
        disk.truncate(total_mib * MIB)
    lines = [f"label: {firmware.label}"]
    for entry in planned:
        fields = [f"size={entry.size_mib}MiB", f"type={entry.partition.sfdisk_type}"]
        if entry.partition.bootable:
            fields.append("bootable")
        lines.append(", ".join(fields))
    run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(image)],
        f"sfdisk of the {firmware.name} disk",
        stdin="\n".join(lines) + "\n",
    )


def partition_device(disk: str, entry: Planned) -> str:
    """The host's device of a partition of the loop disk (``partx`` names them so too)."""
    return f"{disk}p{entry.number}"


@contextmanager
def loop_device(image: Path, partitions: int) -> Iterator[str]:
    """The image on a loop device (its name is yielded), with a device per partition."""
    disk = run(
        ["losetup", "--find", "--show", "--partscan", str(image)], "losetup of the disk"
    ).strip()
    try:
        name = Path(disk).name
        if not Path(f"/sys/block/{name}/{name}p1").exists():
            # The kernel read no partition table (it may have no MBR or GPT parser): partx
            # reads it in userspace and adds each partition to the loop device.
            run(["partx", "--add", disk], f"partx --add {disk}")
        wait_for_nodes([f"{disk}p{number}" for number in range(1, partitions + 1)])
        yield disk
    finally:
        os.sync()
        run(["losetup", "--detach", disk], f"losetup --detach {disk}")


def wait_for_nodes(devices: list[str], timeout: float = 10.0) -> None:
    """devtmpfs makes the partitions' nodes at once; udev, where it runs, a moment later."""
    deadline = time.monotonic() + timeout
    while not all(Path(device).is_block_device() for device in devices):
        if time.monotonic() > deadline:
            missing = [device for device in devices if not Path(device).is_block_device()]
            raise BuildError(
                f"no block device {', '.join(missing)} within {timeout:.0f} s after partx: is "
                "/dev a devtmpfs? (mount -t devtmpfs devtmpfs /dev)"
            )
        time.sleep(0.1)


def make_filesystem(entry: Planned, device: str) -> None:
    part = entry.partition
    if part.fstype == "ext4":
        label = ["-L", ROOT_LABEL] if part.mountpoint == "/" else []
        run(
            ["mkfs.ext4", "-q", "-F", "-U", entry.uuid, *label, "-d", str(entry.content), device],
            f"mkfs.ext4 -d of {part.mountpoint}",
        )
    elif part.fstype == "vfat":
        run(
            ["mkfs.vfat", "-i", entry.uuid.replace("-", ""), device],
            f"mkfs.vfat of {part.mountpoint}",
        )
    else:
        raise BuildError(
            f"no way to make {part.fstype} for {part.mountpoint} (tests/vm/bootdisk.py)"
        )


def mount(stack: ExitStack, command: list[str], target: Path) -> None:
    """Mount, and unmount when the stack closes (in reverse order, so children first)."""
    run(["mount", *command, str(target)], f"mount {' '.join(command)} {target}")
    stack.callback(run, ["umount", str(target)], f"umount {target}")


def mounted_under(directory: Path) -> list[str]:
    """Mount points at or below ``directory`` (octal escapes as mountinfo writes them)."""
    prefix = str(directory.resolve())
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            found.append(point)
    return found


def mount_guest_filesystems(
    stack: ExitStack, root: Path, disk: str, planned: list[Planned]
) -> None:
    """The filesystems where the guest mounts them, outer first. The ESP is a tmpfs under the
    FAT partition's device name, for grub-install (see the module's docstring)."""
    for entry in sorted(planned, key=lambda entry: depth(entry.partition.mountpoint)):
        device = partition_device(disk, entry)
        target = root / entry.partition.mountpoint.lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        if entry.partition.fstype == "vfat":
            mount(stack, ["-t", "tmpfs", "-o", "mode=0755", device], target)
        else:
            mount(stack, [device], target)


def prepare_chroot(stack: ExitStack, root: Path, disk: str, planned: list[Planned]) -> None:
    """/proc, /sys and a private /dev: the few character devices, the loop disk and its
    partitions, and /dev/disk/by-uuid as udev would make it. The host's /dev stays untouched."""
    mount(stack, ["-t", "proc", "proc"], root / "proc")
    mount(stack, ["-t", "sysfs", "sysfs"], root / "sys")
    dev = root / "dev"
    mount(stack, ["-t", "tmpfs", "-o", "mode=0755", "dboot-vm-dev"], dev)
    by_uuid = {entry.uuid: partition_device(disk, entry) for entry in planned}
    for device in [*(f"/dev/{name}" for name in CHROOT_CHAR_DEVICES), disk, *by_uuid.values()]:
        source = Path(device)
        if source.exists():
            found = source.stat()
            os.mknod(dev / source.name, stat.S_IFMT(found.st_mode) | 0o666, found.st_rdev)
    (dev / "fd").symlink_to("/proc/self/fd")
    for number, name in enumerate(("stdin", "stdout", "stderr")):
        (dev / name).symlink_to(f"/proc/self/fd/{number}")
    links = dev / "disk/by-uuid"
    links.mkdir(parents=True)
    for fs_uuid, device in by_uuid.items():
        (links / fs_uuid).symlink_to(f"../../{Path(device).name}")


def in_chroot(root: Path, command: list[str]) -> str:
    return run(["chroot", str(root), *command], f"{command[0]} in the guest tree", env=CHROOT_ENV)


def install_grub_privately(
    variant: Variant, disk: str, root: Path, planned: list[Planned], log: Log
) -> None:
    """Mount the disk's filesystems at ``root`` and install GRUB in a chroot of them, in a child
    process with a mount namespace of its own (``main`` below). No one else sees those mounts,
    so nothing else can hold them busy (a recursive grep in /proc did), and they all go with
    the child whatever happens to it."""
    firmware = variant.firmware
    assert firmware is not None
    target = [disk] if firmware.grub_install_to_disk else []
    log(f"grub-install {' '.join([*firmware.grub_install, *target])}, update-grub (chroot)")
    uuids = [entry.uuid for entry in planned]
    spec = {"variant": variant.name, "disk": disk, "root": str(root), "uuids": uuids}
    run(
        ["unshare", "--mount", "--propagation", "private",
         sys.executable, "-m", "tests.vm.bootdisk", json.dumps(spec)],
        "GRUB's install in a chroot of the disk (tests/vm/bootdisk.py)",
        cwd=REPO,
    )  # fmt: skip


def main(argv: list[str]) -> int:
    """In a private mount namespace: mount, install GRUB, fill the ESP, unmount."""
    spec = json.loads(argv[0])
    firmware = VARIANTS[spec["variant"]].firmware
    assert firmware is not None
    disk, root = spec["disk"], Path(spec["root"])
    planned = [
        Planned(part, number, spec["uuids"][number - 1], root)
        for number, part in enumerate(firmware.partitions, start=1)
    ]
    try:
        with ExitStack() as stack:
            mount_guest_filesystems(stack, root, disk, planned)
            prepare_chroot(stack, root, disk, planned)
            install_grub(root, firmware, disk, root_uuid(planned))
            for entry in planned:
                if entry.partition.fstype == "vfat":
                    staged = root / entry.partition.mountpoint.lstrip("/")
                    copy_into_fat(staged, partition_device(disk, entry))
    except BuildError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


def install_grub(root: Path, firmware: Firmware, disk: str, root_fs_uuid: str) -> None:
    """The tree's own grub-install and update-grub, then a check that grub.cfg finds the root
    by UUID (the guest has no /dev/loop*)."""
    target = [disk] if firmware.grub_install_to_disk else []
    in_chroot(root, ["grub-install", *firmware.grub_install, *target])
    in_chroot(root, ["update-grub"])
    config = (root / "boot/grub/grub.cfg").read_text()
    if f"root=UUID={root_fs_uuid}" not in config or "root=/dev/loop" in config:
        raise BuildError(
            f"update-grub wrote no root=UUID={root_fs_uuid} into /boot/grub/grub.cfg: is "
            f"/dev/disk/by-uuid/{root_fs_uuid} in the chroot? (tests/vm/bootdisk.py)"
        )


def copy_into_fat(staged: Path, device: str) -> None:
    """What grub-install wrote into the stand-in ESP, into the FAT filesystem (mtools: no
    kernel FAT driver needed), then listed back from it."""
    mtools_env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    entries = sorted(str(path) for path in staged.iterdir())
    if not entries:
        raise BuildError(f"grub-install wrote nothing into {staged} (tests/vm/bootdisk.py)")
    run(
        ["mcopy", "-s", "-p", "-Q", "-i", device, *entries, "::/"],
        f"mcopy into {device}",
        env=mtools_env,
    )
    listed = run(["mdir", "-/", "-b", "-i", device, "::/"], f"mdir of {device}", env=mtools_env)
    on_fat = {line.strip().removeprefix("::/").lower() for line in listed.splitlines()}
    wanted = {str(path.relative_to(staged)).lower() for path in staged.rglob("*") if path.is_file()}
    if not wanted <= on_fat:
        raise BuildError(f"the ESP {device} lacks {', '.join(sorted(wanted - on_fat))} after mcopy")


def write_layout(image: Path, firmware: Firmware, filesystems: list[Filesystem]) -> None:
    layout = {
        "firmware": firmware.name,
        "filesystems": [
            {"mountpoint": fs.mountpoint, "fstype": fs.fstype, "uuid": fs.uuid, "device": fs.device}
            for fs in filesystems
        ],
    }
    (image.parent / LAYOUT).write_text(json.dumps(layout, indent=2) + "\n")


def read_layout(image: Path) -> tuple[Filesystem, ...]:
    """The filesystems of a built firmware bed's disk, in disk order."""
    layout = json.loads((image.parent / LAYOUT).read_text())
    return tuple(Filesystem(**entry) for entry in layout["filesystems"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
