"""The firmware beds' build logic, without building (fast, no ``vm`` mark): the layers they share
and keep, and what ``bootdisk.py`` writes into the tree before GRUB runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.vm import bootdisk, build


def test_firmware_beds_share_the_x86_64_base_and_have_disks_of_their_own():
    x86 = build.VARIANTS["x86_64"]
    for name in ("x86_64-bios", "x86_64-uefi"):
        variant = build.VARIANTS[name]
        assert variant.firmware is not None and variant.base == "x86_64"
        # The tree GRUB goes into is the remote machine's: the same base layer inputs.
        assert build.base_key(build.VARIANTS[variant.base]) == build.base_key(x86)
        assert variant.remote and variant.arch == x86.arch
    base = Path("base-0123456789abcdef")
    keys = {name: build.disk_key(base, build.VARIANTS[name]) for name in build.VARIANTS}
    assert len(set(keys.values())) == len(keys)
    bios, uefi = build.BIOS, build.UEFI
    assert build.grub_key(base, bios) != build.grub_key(base, uefi)
    tools = build.required_tools(build.VARIANTS["x86_64-uefi"])
    assert tools["mkfs.vfat"] == "dosfstools" and tools["mcopy"] == "mtools"
    assert "mcopy" not in build.required_tools(build.VARIANTS["x86_64-bios"])


def test_pruning_a_variants_old_disks_spares_the_variants_named_after_it(tmp_path, monkeypatch):
    """disk-x86_64's prune once globbed disk-x86_64-*: it would have removed the firmware beds'
    disks (disk-x86_64-uefi-<hash>) whenever the x86_64 disk was rebuilt."""
    monkeypatch.setattr(build, "CACHE", tmp_path)
    keep, old = tmp_path / f"disk-x86_64-{'a' * 16}", tmp_path / f"disk-x86_64-{'b' * 16}"
    uefi = tmp_path / f"disk-x86_64-uefi-{'c' * 16}"
    for layer in (keep, old, uefi):
        layer.mkdir()
    build.prune("disk-x86_64", keep)
    assert keep.exists() and not old.exists()
    assert uefi.exists(), "the x86_64 disk's prune removed the uefi bed's disk"


def planned(firmware: build.Firmware, tree: Path, parts: Path) -> list[bootdisk.Planned]:
    parts.mkdir()
    return bootdisk.plan(firmware, tree, parts)


def test_fstab_names_every_filesystem_by_uuid_outer_mount_points_first(tmp_path):
    entries = planned(build.UEFI, tmp_path / "tree", tmp_path / "parts")
    lines = bootdisk.fstab(entries).splitlines()
    mounts = [line.split() for line in lines if not line.startswith("#")]
    by_point = {fields[1]: fields for fields in mounts}
    assert [fields[1] for fields in mounts] == ["/", "/boot", "/boot/efi"]
    for entry in entries:
        fields = by_point[entry.partition.mountpoint]
        assert fields[0] == f"UUID={entry.uuid}" and fields[2] == entry.partition.fstype
    assert by_point["/boot/efi"][3:] == ["umask=0077", "0", "1"]
    assert by_point["/"][3:] == ["errors=remount-ro", "0", "1"]
    esp = next(entry for entry in entries if entry.partition.fstype == "vfat")
    assert re.fullmatch(r"[0-9A-F]{4}-[0-9A-F]{4}", esp.uuid), esp.uuid
    assert [entry.filesystem.device for entry in entries] == ["/dev/vda1", "/dev/vda2", "/dev/vda3"]


def test_grub_defaults_are_edited_in_place_as_an_administrator_would(tmp_path):
    default = tmp_path / "grub"
    default.write_text(
        "GRUB_DEFAULT=0\nGRUB_TIMEOUT=5\n"
        'GRUB_CMDLINE_LINUX_DEFAULT="quiet"\nGRUB_CMDLINE_LINUX=""\n'
        "# Uncomment to disable graphical terminal\n#GRUB_TERMINAL=console\n"
    )
    bootdisk.set_shell_variables(default, bootdisk.grub_defaults("ttyS0"))
    lines = default.read_text().splitlines()
    assert lines[:6] == [
        "GRUB_DEFAULT=0",
        "GRUB_TIMEOUT=1",
        'GRUB_CMDLINE_LINUX_DEFAULT=""',
        'GRUB_CMDLINE_LINUX="console=ttyS0"',
        "# Uncomment to disable graphical terminal",
        "GRUB_TERMINAL=serial",
    ]
    assert "GRUB_TIMEOUT_STYLE=menu" in lines and not any("panic=" in line for line in lines)
    assert sum(line.startswith("GRUB_TIMEOUT=") for line in lines) == 1


def test_the_tree_is_split_by_mount_point_leaving_the_mount_points_empty(tmp_path):
    tree = tmp_path / "tree"
    (tree / "boot/grub").mkdir(parents=True)
    (tree / "boot/vmlinuz-6.1").write_text("kernel")
    (tree / "etc").mkdir()
    entries = planned(build.UEFI, tree, tmp_path / "parts")
    bootdisk.split_tree(tree, entries)
    content = {entry.partition.mountpoint: entry.content for entry in entries}
    assert content["/"] == tree and sorted(p.name for p in tree.iterdir()) == ["boot", "etc"]
    assert list((tree / "boot").iterdir()) == []
    assert sorted(p.name for p in content["/boot"].iterdir()) == ["efi", "grub", "vmlinuz-6.1"]
    assert list((content["/boot"] / "efi").iterdir()) == []
    assert list(content["/boot/efi"].iterdir()) == []


def test_a_layout_without_one_root_is_refused(tmp_path):
    firmware = build.Firmware(
        name="broken",
        label="gpt",
        partitions=(build.Partition("/boot", "ext4", "linux"),),
        packages="packages-uefi.txt",
        grub_install=(),
        grub_install_to_disk=False,
        banner="",
    )
    with pytest.raises(build.BuildError, match="exactly one /"):
        planned(firmware, tmp_path / "tree", tmp_path / "parts")
