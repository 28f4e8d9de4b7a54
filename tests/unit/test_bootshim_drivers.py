"""Which drivers the boot shim loads with the old system's modprobe before the pivot."""

from __future__ import annotations

from initstage.bootshim import drivers_to_load

# /proc/filesystems of a Debian 12 cloud kernel that mounted its root and nothing else yet.
FILESYSTEMS = "nodev\tsysfs\nnodev\ttmpfs\nnodev\tproc\n\text4\nnodev\tdevpts\n"


def test_the_esp_and_a_data_disk_need_their_drivers_and_fat_its_code_pages() -> None:
    fstab = (
        "# a comment\n"
        "UUID=1 / ext4 defaults 0 0\n"
        "UUID=2 /boot ext4 defaults,nofail 0 2\n"
        "UUID=3 /boot/efi vfat umask=0077,codepage=850,iocharset=iso8859-1,nofail 0 1\n"
        "/dev/sdb1 /data xfs\n"
        "/swapfile none swap sw 0 0\n"
        "tmpfs /tmp tmpfs size=1g 0 0\n"
    )
    assert drivers_to_load(fstab, FILESYSTEMS) == [
        "fs-vfat", "nls_cp437", "nls_ascii", "nls_utf8", "nls_cp850", "nls_iso8859-1", "fs-xfs",
    ]  # fmt: skip


def test_nothing_to_load_when_the_kernel_knows_every_filesystem() -> None:
    fstab = "UUID=1 / btrfs defaults 0 0\nUUID=2 /boot ext4 defaults 0 2\n"
    assert drivers_to_load(fstab, FILESYSTEMS) == []
    assert drivers_to_load("", FILESYSTEMS) == []
