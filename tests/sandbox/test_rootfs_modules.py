"""The running kernel's modules in a real tmpfs, after a real image: the estimate against
what the tmpfs holds, and the copy landing inside the image's own /lib (a symlink to usr/lib
on merged-/usr Debian). This machine may have no /lib/modules (a container): the test
builds a host tree of the same shape, and also measures the real one where there is one."""

from __future__ import annotations

import lzma
import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.image.sources import open_source
from injector.ramroot.kmodules import ModulesFacts, add_kernel_modules, gather_modules
from injector.ramroot.rootfs import RamRoot, tmpfs_size_for
from tests import images

pytestmark = [pytest.mark.root, pytest.mark.engine]

RELEASE = "6.1.0-99-amd64"


@pytest.fixture(scope="module")
def debian_image() -> Iterator[str]:
    tag = images.build_debian_image(images.PREFIX + "debian-minbase:modules")
    yield tag
    images.remove_image(tag)


def fake_host(top: Path, *, files: int = 600) -> tuple[Path, Path]:
    """(host root, proc) with a modules tree of ``files`` modules of mixed sizes, a long and
    a short symlink, and the firmware of one loaded module."""
    rng = random.Random(8)
    modules = top / "host/lib/modules" / RELEASE
    dep = []
    for number in range(files):
        relative = f"kernel/drivers/group{number % 23}/sub{number % 5}/mod{number}.ko"
        path = modules / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(rng.choice([700, 5000, 40_000, 130_000])))
        dep.append(f"{relative}:")
    nic = modules / "kernel/drivers/net/nic.ko.xz"
    nic.parent.mkdir(parents=True)
    nic.write_bytes(lzma.compress(b"\0firmware=vendor/nic.bin\0license=GPL\0"))
    dep.append("kernel/drivers/net/nic.ko.xz:")
    (modules / "modules.dep").write_text("\n".join(dep) + "\n")
    (modules / "build").symlink_to(f"/usr/src/linux-headers-{RELEASE}")
    (modules / "long").symlink_to("/" + "x" * 200)  # longer than tmpfs keeps in the inode
    firmware = top / "host/lib/firmware/vendor"
    firmware.mkdir(parents=True)
    (firmware / "nic.bin").write_bytes(os.urandom(300_000))
    proc = top / "proc"
    proc.mkdir()
    (proc / "modules").write_text("nic 16384 0 - Live 0x0\nmod1 16384 0 - Live 0x0\n")
    return top / "host", proc


def copy_with_modules(
    ref: str, state: Path, host: Path, proc: Path, release: str
) -> tuple[ModulesFacts, int, int, Path]:
    """Copy ``ref`` and the modules into a tmpfs sized from the estimate; returns the facts,
    the estimate, what the tmpfs holds, and (inside the still-mounted tmpfs) the root."""
    with open_source(ref) as source:
        index = source.scan()
        facts = gather_modules(index, host_root=host, release=release, proc=proc)
        assert facts.copy, facts.state
        estimate = index.estimated_bytes + facts.total_bytes
        with RamRoot(state, tmpfs_size_for(estimate)) as ram:
            source.copy_into(ram.path, lambda done, total: None)
            add_kernel_modules(ram.path, facts)
            used = ram.used_bytes()
            tree = sorted(
                str(Path(d, n).relative_to(ram.path / facts.destination.lstrip("/")))
                for d, dirs, names in os.walk(ram.path / facts.destination.lstrip("/"))
                for n in dirs + names
            )
            firmware = [(ram.path / f.destination.lstrip("/")).read_bytes() for f in facts.firmware]
    source_tree = sorted(
        str(Path(d, n).relative_to(facts.source))
        for d, dirs, names in os.walk(facts.source)
        for n in dirs + names
    )
    assert tree == source_tree
    assert firmware == [Path(f.source).read_bytes() for f in facts.firmware]
    return facts, estimate, used, state


def test_modules_in_a_merged_usr_image_and_the_estimate(debian_image: str, tmp_path: Path) -> None:
    host, proc = fake_host(tmp_path)
    facts, estimate, used, _state = copy_with_modules(
        debian_image, tmp_path / "state", host, proc, RELEASE
    )
    # Debian 12's /lib is a symlink to usr/lib: the modules go where the image's /lib leads.
    assert facts.destination == f"/usr/lib/modules/{RELEASE}"
    assert [f.destination for f in facts.firmware] == ["/usr/lib/firmware/vendor/nic.bin"]
    print(f"estimate {estimate} vs tmpfs {used} bytes, modules {facts.total_bytes}")
    assert abs(estimate - used) <= 0.01 * used, (estimate, used)


def test_the_real_modules_where_this_host_has_them(tinybox_ref: str, tmp_path: Path) -> None:
    """Here the host's own /lib/modules/$(uname -r) when it exists, else the fake tree: the
    copy is exact and the estimate holds for the tiny tinybox image, where modules dominate."""
    release = os.uname().release
    host, proc = Path("/"), Path("/proc")
    if not Path("/lib/modules", release).is_dir():
        host, proc = fake_host(tmp_path)
        release = RELEASE
    facts, estimate, used, _state = copy_with_modules(
        tinybox_ref, tmp_path / "state", host, proc, release
    )
    print(f"{facts.source}: {facts.files} entries, {facts.bytes} bytes; tmpfs {used}")
    assert abs(estimate - used) <= 0.01 * used, (estimate, used)


@pytest.fixture
def tinybox_ref() -> str:
    return "tinybox"
