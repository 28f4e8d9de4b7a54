"""The running kernel's modules and firmware for the new root, on a fake host tree (this
machine may have no /lib/modules at all: a container, or a kernel without modules).

The fake modules are files whose bytes carry ``.modinfo``-style ``firmware=`` strings, plain
and xz-compressed as distributions ship them; the fake /proc/modules says which are loaded.
"""

from __future__ import annotations

import lzma
import os
import shutil
from pathlib import Path

import pytest

from injector.image.imageindex import ImageIndex, IndexEntry, pages
from injector.preflight import preflight
from injector.ramroot import kmodules
from injector.ramroot.kmodules import add_kernel_modules, firmware_names, gather_modules
from tests.unit.test_preflight import MiB, build, codes, run, server

RELEASE = "6.1.0-99-amd64"


def modinfo(*pairs: str) -> bytes:
    """Bytes of a fake module: ELF-ish noise around a .modinfo section."""
    return b"\x7fELF" + b"\x00" * 60 + b"".join(p.encode() + b"\x00" for p in pairs) + b"\x00" * 7


def fake_host(tmp_path: Path) -> Path:
    """A host root with /lib/modules/RELEASE, /lib/firmware and /proc/modules."""
    host = tmp_path / "host"
    modules = host / "lib/modules" / RELEASE
    (modules / "kernel/fs/fat").mkdir(parents=True)
    (modules / "kernel/drivers/net").mkdir(parents=True)
    (modules / "kernel/fs/fat/vfat.ko").write_bytes(modinfo("license=GPL", "alias=fs-vfat"))
    (modules / "kernel/fs/fat/fat.ko").write_bytes(modinfo("license=GPL") + os.urandom(9000))
    (modules / "kernel/drivers/net/fake-nic.ko.xz").write_bytes(
        lzma.compress(modinfo("firmware=fake/nic-1.bin", "firmware=fake/nic-2.bin", "license=GPL"))
    )
    (modules / "kernel/drivers/net/wifi.ko").write_bytes(
        modinfo("firmware=fake/wifi.ucode", "firmware=fake/absent.bin")
    )
    (modules / "modules.dep").write_text(
        "kernel/fs/fat/vfat.ko: kernel/fs/fat/fat.ko\nkernel/fs/fat/fat.ko:\n"
        "kernel/drivers/net/fake-nic.ko.xz:\nkernel/drivers/net/wifi.ko:\n"
    )
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")  # dangling here
    firmware = host / "lib/firmware"
    (firmware / "fake").mkdir(parents=True)
    (firmware / "fake/nic-1.bin").write_bytes(b"n" * 5000)
    (firmware / "fake/wifi.ucode.zst").write_bytes(b"z" * 300)  # compressed: found by suffix
    (firmware / "updates/fake").mkdir(parents=True)
    (firmware / "updates/fake/nic-2.bin").write_bytes(b"u" * 70)  # updates/ comes first
    (firmware / "fake/nic-2.bin").write_bytes(b"old")
    (firmware / "unrelated.bin").write_bytes(b"x" * 100_000)  # no loaded module wants it
    proc = tmp_path / "proc"
    proc.mkdir()
    # fake-nic's name as the kernel lists it; builtin_or_gone has no file.
    names = ["fake_nic", "vfat", "fat", "wifi", "builtin_or_gone"]
    (proc / "modules").write_text(
        "".join(f"{name} 16384 0 - Live 0x0000000000000000\n" for name in names)
    )
    return host


def entries(spec: dict[str, str]) -> ImageIndex:
    made = []
    for number, (path, kind) in enumerate(spec.items(), start=1):
        if kind.startswith("-> "):
            made.append(IndexEntry(path, "symlink", 0o777, 0, 0, 0, 0, kind[3:], number))
        else:
            made.append(IndexEntry(path, kind, 0o755, 0, 0, 0, 0, None, number))
    return ImageIndex(made)


MERGED_USR = entries({"/usr": "dir", "/usr/lib": "dir", "/lib": "-> usr/lib", "/etc": "dir"})


def facts(tmp_path: Path, *, wanted: bool = True) -> kmodules.ModulesFacts:
    host = fake_host(tmp_path)
    return gather_modules(
        MERGED_USR, wanted=wanted, host_root=host, release=RELEASE, proc=tmp_path / "proc"
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "/lib/firmware/a/b.bin"),
        ({"/lib": "-> usr/lib", "/usr": "dir", "/usr/lib": "dir"}, "/usr/lib/firmware/a/b.bin"),
        ({"/lib": "dir", "/lib/firmware": "-> /nowhere"}, None),  # would write through it
        ({"/lib": "dir", "/lib/firmware": "file"}, None),
        ({"/lib": "-> /nowhere"}, None),
    ],
)
def test_where_things_go_inside_the_image(spec: dict[str, str], expected: str | None) -> None:
    assert kmodules.resolve_in_image(entries(spec), "/lib/firmware/a/b.bin") == expected


def test_firmware_names_from_modinfo(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    net = host / "lib/modules" / RELEASE / "kernel/drivers/net"
    assert firmware_names(net / "fake-nic.ko.xz") == ["fake/nic-1.bin", "fake/nic-2.bin"]
    assert firmware_names(net / "wifi.ko") == ["fake/absent.bin", "fake/wifi.ucode"]
    assert firmware_names(net / "missing.ko") == []
    (net / "broken.ko.xz").write_bytes(b"not xz")
    assert firmware_names(net / "broken.ko.xz") == []


def test_the_modules_and_the_loaded_modules_firmware_are_counted(tmp_path: Path) -> None:
    found = facts(tmp_path)
    assert found.copy and found.supported and found.loaded == 5
    source = Path(found.source)
    assert source == tmp_path / "host/lib/modules" / RELEASE
    # merged /usr: /lib is a symlink in the image, resolved inside it.
    assert found.destination == f"/usr/lib/modules/{RELEASE}"
    walked = [Path(d, n) for d, dirs, files in os.walk(source) for n in dirs + files]
    assert found.files == len(walked) + 1 == 12  # and the directory itself
    data = sum(pages(p.lstat().st_size) for p in walked if p.is_file() and not p.is_symlink())
    # The copy makes /usr/lib/modules and /usr/lib/firmware{,/fake,/updates,/updates/fake}.
    assert found.bytes == data + (found.files + 5) * 1024
    by_name = {item.name: item for item in found.firmware}
    assert sorted(by_name) == ["fake/nic-1.bin", "fake/nic-2.bin", "fake/wifi.ucode"]
    assert by_name["fake/nic-2.bin"].source.endswith("lib/firmware/updates/fake/nic-2.bin")
    assert by_name["fake/nic-2.bin"].destination == "/usr/lib/firmware/updates/fake/nic-2.bin"
    # Compressed firmware keeps its suffix: the kernel's loader looks for NAME.zst itself.
    assert by_name["fake/wifi.ucode"].source.endswith("fake/wifi.ucode.zst")
    assert by_name["fake/wifi.ucode"].destination == "/usr/lib/firmware/fake/wifi.ucode.zst"
    assert found.firmware_missing == ["fake/absent.bin"]
    assert found.firmware_bytes == pages(5000) + pages(70) + pages(300) + 3 * 1024
    assert found.total_bytes == found.bytes + found.firmware_bytes


def test_when_nothing_is_copied(tmp_path: Path) -> None:
    left_out = facts(tmp_path, wanted=False)
    assert not left_out.copy and left_out.total_bytes == 0 and "--no-modules" in left_out.state
    own = entries({"/lib": "dir", "/lib/modules": "dir", f"/lib/modules/{RELEASE}": "dir"})
    has_own = gather_modules(
        own, host_root=tmp_path / "host", release=RELEASE, proc=tmp_path / "proc"
    )
    assert not has_own.copy and "the image has its own" in has_own.state
    file_lib = entries({"/lib": "file"})
    blocked = gather_modules(
        file_lib, host_root=tmp_path / "host", release=RELEASE, proc=tmp_path / "proc"
    )
    assert not blocked.copy and "cannot hold them" in blocked.state
    dangling = entries(
        {"/lib": "dir", "/lib/modules": "dir", f"/lib/modules/{RELEASE}": "-> /nowhere"}
    )
    pointless = gather_modules(
        dangling, host_root=tmp_path / "host", release=RELEASE, proc=tmp_path / "proc"
    )
    assert not pointless.copy and "cannot hold them" in pointless.state


def test_a_host_without_modules(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_text("")
    proc = tmp_path / "proc"
    none = gather_modules(None, host_root=tmp_path / "empty", release=RELEASE, proc=proc)
    assert not none.copy and none.supported and "host has no" in none.state
    (tmp_path / "proc/modules").unlink()
    monolithic = gather_modules(
        None, host_root=tmp_path / "empty", release=RELEASE, proc=tmp_path / "proc"
    )
    assert not monolithic.copy and not monolithic.supported


def test_the_copy(tmp_path: Path) -> None:
    found = facts(tmp_path)
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    (root / "lib").symlink_to("usr/lib")
    done = add_kernel_modules(root, found)
    assert len(done) == 1 + 3
    copied = root / "usr/lib/modules" / RELEASE
    assert (copied / "kernel/fs/fat/fat.ko").read_bytes() == (
        Path(found.source) / "kernel/fs/fat/fat.ko"
    ).read_bytes()
    assert os.readlink(copied / "build") == f"/usr/src/linux-headers-{RELEASE}"
    assert (root / "usr/lib/firmware/updates/fake/nic-2.bin").read_bytes() == b"u" * 70
    assert (root / "usr/lib/firmware/fake/wifi.ucode.zst").read_bytes() == b"z" * 300
    assert not (root / "usr/lib/firmware/unrelated.bin").exists()
    assert oct((root / "usr/lib/firmware").stat().st_mode & 0o777) == "0o755"
    (tmp_path / "again").mkdir()
    assert add_kernel_modules(root, facts(tmp_path / "again", wanted=False)) == []
    # Where the target's mount namespace does not show the host's modules: said, not fatal.
    (tmp_path / "gone").mkdir()
    gone = facts(tmp_path / "gone")
    shutil.rmtree(gone.source)
    [said] = add_kernel_modules(tmp_path / "gone", gone)
    assert "is not visible from the target" in said


# --- In the preflight report -------------------------------------------------------------------


def test_modules_count_in_the_ram_estimate(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    (tmp_path / "scene").mkdir()
    scene = build(tmp_path / "scene", server())
    (scene.proc / "modules").write_text((tmp_path / "proc/modules").read_text())
    report = run(scene, host_root=host, kernel=("x86_64", RELEASE))
    assert report.modules is not None and report.modules.copy
    assert report.ram.modules_bytes == report.modules.total_bytes > 0
    assert report.ram.estimated_bytes == 64 * MiB + report.ram.modules_bytes
    [notice] = [n for n in report.notices if n.code == "modules-copied"]
    assert notice.level == "info" and RELEASE in notice.message and "--no-modules" in notice.fix
    without = run(scene, host_root=host, kernel=("x86_64", RELEASE), modules=False)
    assert without.ram.estimated_bytes == 64 * MiB and without.ram.modules_bytes == 0
    assert codes(without)["modules-not-copied"] == "info"


def test_modules_that_do_not_fit_suggest_no_modules(tmp_path: Path) -> None:
    host = fake_host(tmp_path)
    (host / "lib/modules" / RELEASE / "big.ko").write_bytes(b"\0" * (8 * MiB))
    (tmp_path / "scene").mkdir()
    scene = build(tmp_path / "scene", server())
    (scene.proc / "modules").write_text("vfat 16384 0 - Live 0x0\n")
    image = 64 * MiB
    # The image and the copy margin fit, the modules on top do not (MemTotal is 8 GiB).
    fits_alone = image + preflight.copy_margin(8 << 30) + MiB
    report = run(scene, host_root=host, kernel=("x86_64", RELEASE), mem_available=fits_alone)
    [notice] = [n for n in report.notices if n.code == "ram-does-not-fit"]
    assert notice.level == "blocker"
    assert "kernel modules" in notice.message and "--no-modules" in (notice.fix or "")
    alone = run(
        scene, host_root=host, kernel=("x86_64", RELEASE), mem_available=fits_alone, modules=False
    )
    assert "ram-does-not-fit" not in codes(alone)


@pytest.mark.parametrize("proc_modules", [True, False])
def test_no_modules_on_the_host_is_a_fact_never_a_crash(tmp_path: Path, proc_modules: bool) -> None:
    scene = build(tmp_path, server())
    if proc_modules:
        (scene.proc / "modules").write_text("vfat 16384 0 - Live 0x0\n")
    report = run(scene, kernel=("x86_64", RELEASE))  # scene.root has no /lib/modules
    assert report.modules is not None and not report.modules.copy
    assert report.ram.modules_bytes == 0
    if proc_modules:
        assert codes(report)["modules-missing"] == "warning"
    else:
        assert not {"modules-missing", "modules-copied"} & set(codes(report))
