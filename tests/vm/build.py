"""Build the QEMU test bed: a Debian 12 disk with systemd, docker-boot and the test images.

One bed per ``Variant`` (``VARIANTS``): a guest architecture (``GuestArch``: the few facts that
differ between x86_64 and arm64, from the QEMU binary to the wheels' platform tag), the Debian
packages of its tree and what its disk carries. Everything else is shared; adding a machine
is adding a ``Variant``. Two layers per variant, cached under ``.cache/vm/`` (gitignored;
``DBOOT_VM_CACHE`` moves it):

``base-<variant>-<hash>/``
    ``tree/``, the debootstrap tree made by ``base.sh``, and its own ``vmlinuz`` and
    ``initrd.img``. Inputs: ``base.sh``, the package list, the architecture, the suite and the
    mirror. Slow (a minute or two; several under binfmt emulation for arm64), rarely rebuilt.
``disk-<variant>-<hash>/disk.raw``
    An ext4 image of a copy of the base tree plus docker-boot installed from the working tree
    into ``/opt/dboot`` (Debian's own Python 3.11.2, a venv), the scenario unit, and in
    ``/root`` the test images. Inputs: the base hash, this file, ``guest/``, ``image/``,
    ``scripts/build-tinybox.sh`` and docker-boot's sources as they are on disk now. Fast (about
    half a minute), rebuilt whenever any of those change, so every run tests the working tree.

A firmware bed (``Variant.firmware``: x86_64-bios, x86_64-uefi) starts from another variant's
base layer, adds ``grub-<firmware>-<hash>/tree`` (GRUB's platform package installed by the
tree's own apt) and makes its disk a partitioned one with GRUB installed (``bootdisk.py``).

Run ``python -m tests.vm.build [--variant arm64]`` to build (``--boot SCENARIO`` then boots it with
the console on stdout). Needs root, debootstrap, e2fsprogs, qemu-utils, a C compiler for the
guest with a static libc, a Docker engine, and for a foreign guest qemu-user-static.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI, before Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
GUEST_FILES = HERE / "guest"
IMAGE_FILES = HERE / "image"
CACHE = Path(os.environ.get("DBOOT_VM_CACHE", REPO / ".cache" / "vm"))

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
# What `pip wheel` turns into docker-boot's wheel: the package folders and the project metadata.
SOURCE_PATHS = ("pyproject.toml", "README.md", "LICENSE", "app", "injector", "initstage")
# Left out of the systemd image (a rootfs tarball copied into the guest's RAM): the kernel,
# its modules and the initramfs are the old system's business, not the new userspace's.
SYSTEMD_ROOT_EXCLUDES = (
    "./boot",
    "./lib/modules",
    "./usr/lib/modules",
    "./initrd.img*",
    "./vmlinuz*",
)
# The guest's interpreter is Debian 12's: wheels with compiled parts must be for CPython 3.11.
GUEST_PYTHON = (3, 11)
# The rollback proof runs inside the guest too (scenario "rollback"): these test modules, stdlib
# and docker-boot only, go to GUEST_TESTS, importable as ``tests.sandbox.rollback``.
GUEST_TEST_MODULES = (
    "tests/__init__.py",
    "tests/sandbox/__init__.py",
    "tests/sandbox/parking.py",
    "tests/sandbox/parked.py",
    "tests/sandbox/rollback.py",
)
GUEST_TESTS = "opt/dboot-tests"

Log = Callable[[str], None]


class BuildError(Exception):
    """The test bed could not be built; the message names the cause and the fix."""


@dataclass(frozen=True)
class GuestArch:
    """What differs between guest architectures: one small table each, like arch.py's."""

    name: str  # the guest's `uname -m`
    deb_arch: str  # debootstrap --arch
    kernel_package: str  # Debian's kernel for a virtual machine
    qemu: str
    qemu_package: str
    qemu_machine: tuple[str, ...]  # machine and CPU options
    console: str  # the serial console's device, for console=
    gcc: str  # compiles the test image's helpers for the guest
    gcc_package: str
    docker_platform: str  # of the test image
    # pip --platform tags for the guest's compiled wheels; empty: the host's own (same machine)
    wheel_platforms: tuple[str, ...] = ()
    # binfmt_misc entry that runs the tree's programs on this host (chroot), if foreign
    binfmt: str | None = None


X86_64 = GuestArch(
    name="x86_64",
    deb_arch="amd64",
    kernel_package="linux-image-cloud-amd64",
    qemu="qemu-system-x86_64",
    qemu_package="qemu-system-x86",
    qemu_machine=(),
    console="ttyS0",
    gcc="gcc",
    gcc_package="gcc libc6-dev",
    docker_platform="linux/amd64",
)
ARM64 = GuestArch(
    name="aarch64",
    deb_arch="arm64",
    # Has virtio-pci, the PL011 serial port and ext4 built in: what `-M virt` offers.
    kernel_package="linux-image-cloud-arm64",
    qemu="qemu-system-aarch64",
    qemu_package="qemu-system-arm",
    # pauth-impdef: pointer authentication with QEMU's cheap hash instead of QARMA, which
    # under TCG costs more than everything else on every function return.
    qemu_machine=("-M", "virt", "-cpu", "max,pauth-impdef=on"),
    console="ttyAMA0",
    gcc="aarch64-linux-gnu-gcc",
    gcc_package="gcc-aarch64-linux-gnu libc6-dev-arm64-cross",
    docker_platform="linux/arm64",
    wheel_platforms=("manylinux2014_aarch64", "manylinux_2_17_aarch64"),
    binfmt="qemu-aarch64",
)


@dataclass(frozen=True)
class Partition:
    """One filesystem of a firmware bed's disk, in disk order (the guest's /dev/vda1, vda2...)."""

    mountpoint: str
    fstype: str  # ext4 or vfat
    sfdisk_type: str  # sfdisk's alias of the partition type: linux, uefi
    size_mib: int = 0  # 0: what its files take, plus ROOT_ROOM_MIB for the root
    options: str = "defaults"  # of its fstab line
    fsck_pass: int = 2
    bootable: bool = False  # the MBR's active flag, as Debian's installer sets it


@dataclass(frozen=True)
class Firmware:
    """How a firmware bed boots: QEMU's firmware, the disk's partition table and GRUB's platform,
    installed into the guest's tree from Debian's mirror and run in a chroot of it, as on a
    Debian installed on such a machine (tests/vm/bootdisk.py builds the disk)."""

    name: str  # bios, uefi
    label: str  # sfdisk's partition table: dos (MBR) or gpt
    partitions: tuple[Partition, ...]
    packages: str  # in tests/vm/: GRUB's platform package and what such a machine has with it
    grub_install: tuple[str, ...]  # grub-install's options
    grub_install_to_disk: bool  # BIOS: the whole disk's device follows (the MBR and its gap)
    banner: str  # the firmware's first line on the serial console (a regular expression)
    # OVMF: its code (a read-only pflash) and the template of each machine's own variable
    # store (a writable pflash); empty for SeaBIOS, QEMU's default firmware.
    code: str = ""
    vars_template: str = ""
    package: str = "seabios"  # the host's package of the firmware


BIOS = Firmware(
    name="bios",
    label="dos",
    partitions=(
        Partition("/", "ext4", "linux", options="errors=remount-ro", fsck_pass=1, bootable=True),
    ),
    packages="packages-bios.txt",
    grub_install=("--target=i386-pc",),
    grub_install_to_disk=True,
    # Through SeaBIOS's serial console, which QEMU turns on when there is no display.
    banner=r"SeaBIOS \(version ",
)
UEFI = Firmware(
    name="uefi",
    label="gpt",
    partitions=(
        Partition("/boot/efi", "vfat", "uefi", size_mib=64, options="umask=0077", fsck_pass=1),
        Partition("/boot", "ext4", "linux", size_mib=256),
        Partition("/", "ext4", "linux", options="errors=remount-ro", fsck_pass=1),
    ),
    packages="packages-uefi.txt",
    # The removable media path (EFI/BOOT/BOOTX64.EFI) is what a firmware boots with no boot
    # entry in its NVRAM, and a new machine's NVRAM (a fresh copy of OVMF_VARS) has none.
    grub_install=("--target=x86_64-efi", "--efi-directory=/boot/efi", "--removable", "--no-nvram"),
    grub_install_to_disk=False,
    # OVMF's boot manager, starting the removable path's loader (its own log goes elsewhere).
    banner=r"BdsDxe: starting Boot[0-9A-F]{4} ",
    # The 4 MiB builds: bookworm's 2 MiB OVMF_CODE.fd is the legacy one, gone after bookworm.
    code="/usr/share/OVMF/OVMF_CODE_4M.fd",
    vars_template="/usr/share/OVMF/OVMF_VARS_4M.fd",
    package="ovmf",
)


@dataclass(frozen=True)
class Variant:
    """One kind of test machine: its architecture, its tree's packages, what its disk carries."""

    name: str  # cache directories and pytest ids
    arch: GuestArch
    packages: str = "packages.txt"  # in tests/vm/; the kernel package comes from ``arch``
    # /root/systemd-root.tar, for the switch-systemd scenario (a big tarball: only where used)
    systemd_root: bool = True
    # the glibc program the recovery scenario execs in the busybox image
    recovery_init: bool = True
    # The remote scenarios' old machine (issue 9 §7): packages-remote.txt on top of the package
    # list (openssh-server, iproute2), systemd-networkd on DHCP, a test key in root's
    # authorized_keys (``VmBed.ssh_key``) and the rescue image's `docker save` in /root.
    remote: bool = False
    # A firmware bed (issue 17 §4): a partitioned disk that boots through QEMU's firmware and
    # the GRUB installed on it, not -kernel. Its tree is ``base``'s plus GRUB (a layer of its own).
    firmware: Firmware | None = None
    base: str = ""  # the variant whose base layer this one's tree starts from; "": its own
    # The graceful stop's old machine (issue 19 §2): packages-db.txt on top (PostgreSQL 15,
    # MariaDB 10.11 and their Python clients) and what tests/vm/dbbed.py adds to the disk.
    databases: bool = False


VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("x86_64", X86_64, remote=True),
        # The remote machine of x86_64 with two busy databases: the graceful stop's proof.
        Variant(
            "x86_64-db",
            X86_64,
            systemd_root=False,
            recovery_init=False,
            remote=True,
            databases=True,
        ),
        # The arm64 scenarios are switch-busybox and rollback: no systemd image, no recovery.
        Variant("arm64", ARM64, systemd_root=False, recovery_init=False),
        # The remote machine of x86_64, booted through SeaBIOS or OVMF and GRUB from its disk.
        *(
            Variant(
                f"x86_64-{firmware.name}",
                X86_64,
                systemd_root=False,
                remote=True,
                firmware=firmware,
                base="x86_64",
            )
            for firmware in (BIOS, UEFI)
        ),
    )
}
DEFAULT = VARIANTS["x86_64"]


@dataclass(frozen=True)
class VmBed:
    """A built test bed. Boot ``disk`` through a copy-on-write overlay, never directly."""

    kernel: Path
    initrd: Path
    disk: Path
    base_seconds: float  # time spent building the base layer in this call; 0 when cached
    disk_seconds: float  # time spent building the final disk in this call; 0 when cached
    variant: Variant = field(default=DEFAULT)
    ssh_key: Path | None = None  # private key of root's authorized_keys (remote variants)
    # A firmware bed's filesystems, in disk order, as the guest sees them; empty otherwise
    filesystems: tuple[Filesystem, ...] = ()

    @property
    def arch(self) -> GuestArch:
        return self.variant.arch

    @property
    def firmware(self) -> Firmware | None:
        return self.variant.firmware

    def filesystem(self, mountpoint: str) -> Filesystem:
        """The filesystem a firmware bed mounts at ``mountpoint`` ("/", "/boot", "/boot/efi")."""
        for found in self.filesystems:
            if found.mountpoint == mountpoint:
                return found
        raise KeyError(f"the {self.variant.name} bed mounts nothing at {mountpoint}")


@dataclass(frozen=True)
class Filesystem:
    """One filesystem of a built firmware bed (its disk's ``layout.json``)."""

    mountpoint: str
    fstype: str
    uuid: str  # as blkid and findmnt show it: a UUID for ext4, XXXX-XXXX for vfat
    device: str  # the guest's partition: /dev/vda1, ...


# --- Requirements ------------------------------------------------------------------------------

# Tool -> the Debian package that provides it (scripts/setup.sh installs all of them). Each
# variant adds its architecture's QEMU and C compiler (``required_tools``).
REQUIRED_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "docker": "docker.io",
    "tar": "tar",
    "chroot": "coreutils",
}
BINFMT = Path("/proc/sys/fs/binfmt_misc")


def required_tools(variant: Variant) -> dict[str, str]:
    arch = variant.arch
    tools = {**REQUIRED_TOOLS, arch.qemu: arch.qemu_package}
    tools[arch.gcc.split()[0]] = arch.gcc_package
    if arch.binfmt:
        tools[arch.binfmt + "-static"] = "qemu-user-static binfmt-support"
        tools["update-binfmts"] = "binfmt-support"
    if variant.firmware is not None:
        # The partitioned disk (tests/vm/bootdisk.py); GRUB itself runs from the guest's tree.
        tools.update({"sfdisk": "fdisk", "losetup": "mount", "partx": "util-linux"})
        if any(part.fstype == "vfat" for part in variant.firmware.partitions):
            tools.update({"mkfs.vfat": "dosfstools", "mcopy": "mtools"})
    return tools


def missing_firmware(variant: Variant) -> set[str]:
    """The host package of a firmware bed's firmware, if its files are missing (OVMF's)."""
    firmware = variant.firmware
    if firmware is None:
        return set()
    files = [name for name in (firmware.code, firmware.vars_template) if name]
    return {firmware.package} if any(not Path(name).is_file() for name in files) else set()


def check_requirements(variant: Variant = DEFAULT) -> None:
    """Fail with one line naming every missing tool and the package to install."""
    if os.geteuid() != 0:
        raise BuildError("the VM test bed needs root (debootstrap, chroot, mkfs): run as root")
    missing = sorted(
        {pkg for tool, pkg in required_tools(variant).items() if shutil.which(tool) is None}
        | missing_firmware(variant)
    )
    if missing:
        raise BuildError(
            "VM test bed tools missing: apt-get install "
            + " ".join(missing)
            + " (scripts/setup.sh)"
        )
    if sys.version_info[:2] != GUEST_PYTHON:
        raise BuildError(
            f"building the guest's wheels needs CPython {GUEST_PYTHON[0]}.{GUEST_PYTHON[1]} "
            f"(the guest's version), not {sys.version.split()[0]}: run with the project's .venv"
        )
    if variant.arch.binfmt:
        enable_binfmt(variant.arch.binfmt)


def enable_binfmt(entry: str) -> None:
    """The foreign tree's maintainer scripts run through qemu-user-static: make sure the kernel
    hands its ELF files to it. A container often starts without binfmt_misc mounted."""
    path = BINFMT / entry
    if path.exists():
        if not _enabled(path):
            path.write_text("1")
    else:
        if not (BINFMT / "register").exists():
            subprocess.run(
                ["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)],
                capture_output=True,
                check=False,
            )
        subprocess.run(["update-binfmts", "--enable", entry], capture_output=True, check=False)
    if not path.exists() or not _enabled(path):
        raise BuildError(
            f"binfmt_misc has no enabled {entry} entry, so the foreign tree cannot run: mount "
            f"-t binfmt_misc binfmt_misc {BINFMT} && update-binfmts --enable {entry}"
        )


def _enabled(entry: Path) -> bool:
    return entry.read_text().startswith("enabled")


# --- Small helpers -----------------------------------------------------------------------------


def run(
    cmd: list[str],
    what: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> str:
    """Run a build step; on failure, one line with the step, the exit status and the last error."""
    # The engine here only builds with the legacy builder (no BuildKit).
    env = {**(os.environ if env is None else env), "DOCKER_BUILDKIT": "0"}
    result = subprocess.run(
        cmd, cwd=cwd, env=env, input=stdin, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        raise BuildError(f"{what} failed (exit {result.returncode}): {lines[-1]}")
    return result.stdout


def digest(parts: Iterable[tuple[str, bytes]]) -> str:
    """A short stable hash of (name, content) pairs: the cache key of a layer."""
    h = hashlib.sha256()
    for name, content in parts:
        h.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return h.hexdigest()[:16]


def files_under(root: Path, relative: Iterable[str]) -> Iterator[tuple[str, bytes]]:
    """(path, content) of every file under the given paths, sorted, skipping bytecode caches."""
    for rel in relative:
        top = root / rel
        paths = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        for path in paths:
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                yield str(path.relative_to(root)), path.read_bytes()


@contextmanager
def cache_lock() -> Iterator[None]:
    """One build at a time per cache (two pytest runs must not debootstrap into the same tree)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prune(prefix: str, keep: Path, spare: int = 0) -> None:
    """Remove older cached layers of one kind: they are gigabytes and never used again. ``spare``
    newest others survive, for a concurrent session still booting overlays of its own disk."""
    # Exactly <prefix>-<hash>: disk-x86_64's prune must spare disk-x86_64-uefi-<hash>.
    others = sorted(
        (old for old in CACHE.glob(f"{prefix}-{'[0-9a-f]' * 16}") if old != keep and old.is_dir()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for old in others[spare:]:
        shutil.rmtree(old, ignore_errors=True)


# --- Base layer --------------------------------------------------------------------------------


REMOTE_PACKAGES = "packages-remote.txt"


DB_PACKAGES = "packages-db.txt"


def package_files(variant: Variant) -> list[str]:
    return [
        variant.packages,
        *([REMOTE_PACKAGES] if variant.remote else []),
        *([DB_PACKAGES] if variant.databases else []),
    ]


def base_key(variant: Variant = DEFAULT) -> str:
    return digest(
        [
            *files_under(HERE, ["base.sh", *package_files(variant)]),
            ("arch", variant.arch.deb_arch.encode()),
            ("kernel", variant.arch.kernel_package.encode()),
            ("suite", SUITE.encode()),
            ("mirror", MIRROR.encode()),
        ]
    )


def build_base(variant: Variant, log: Log) -> tuple[Path, float]:
    """The debootstrap tree with its kernel and initramfs copied beside it: (dir, seconds built)."""
    base = CACHE / f"base-{variant.name}-{base_key(variant)}"
    if (base / ".complete").exists():
        return base, 0.0
    started = time.monotonic()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log(f"building the {variant.arch.deb_arch} base tree in {base} (debootstrap, minutes)")
    packages = base / "packages.txt"  # the variant's lists, as one for base.sh
    packages.write_bytes(b"".join((HERE / name).read_bytes() for name in package_files(variant)))
    run_streaming(
        [
            "bash",
            str(HERE / "base.sh"),
            str(base / "tree"),
            str(packages),
            SUITE,
            MIRROR,
            variant.arch.deb_arch,
            variant.arch.kernel_package,
        ],
        "debootstrap of the base tree (tests/vm/base.sh)",
    )
    boot = base / "tree" / "boot"
    for name, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
        found = sorted(boot.glob(pattern))
        if not found:
            raise BuildError(
                f"no /boot/{pattern} in the base tree: is {variant.arch.kernel_package} a "
                f"{SUITE} package? (tests/vm/build.py, {variant.arch.name})"
            )
        shutil.copy2(found[-1], base / name)
    (base / ".complete").write_text(f"{SUITE} {variant.arch.deb_arch} {MIRROR}\n")
    prune(f"base-{variant.name}", base)
    return base, time.monotonic() - started


def grub_key(base: Path, firmware: Firmware) -> str:
    return digest(
        [
            ("base", base.name.encode()),
            ("firmware", firmware.name.encode()),
            *files_under(HERE, [firmware.packages]),
            ("mirror", MIRROR.encode()),
        ]
    )


def build_grub_tree(base: Path, firmware: Firmware, log: Log) -> tuple[Path, float]:
    """A copy of the base tree with GRUB's platform package for ``firmware`` installed from
    Debian's mirror by the tree's own apt: the Debian such a machine runs. A layer of its own,
    ``grub-<firmware>-<hash>/tree``, so the disk layer above it needs no network."""
    layer = CACHE / f"grub-{firmware.name}-{grub_key(base, firmware)}"
    if (layer / ".complete").exists():
        return layer, 0.0
    started = time.monotonic()
    shutil.rmtree(layer, ignore_errors=True)
    layer.mkdir(parents=True)
    tree = layer / "tree"
    packages = [
        line.strip()
        for line in (HERE / firmware.packages).read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    log(f"installing {' '.join(packages)} into a copy of the base tree (apt, {MIRROR})")
    run(["cp", "-a", "--reflink=auto", str(base / "tree"), str(tree)], "copy of the base tree")
    # No terminal: debconf must not ask for grub-pc's install devices (the disk build installs).
    apt_env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for apt in (["update"], ["install", "-y", "--no-install-recommends", *packages], ["clean"]):
        what = f"apt-get {apt[0]} in the guest tree"
        run(["chroot", str(tree), "apt-get", "-q", *apt], what, env=apt_env)
    for lists in (tree / "var/lib/apt/lists").iterdir():
        if lists.is_file():
            lists.unlink()
    (layer / ".complete").touch()
    prune(f"grub-{firmware.name}", layer)
    return layer, time.monotonic() - started


LEGACY_LAYER = re.compile(r"(base|disk|wheels)-[0-9a-f]{16}")


def prune_legacy() -> None:
    """Layers named before there were variants (``base-<hash>``): nothing uses them any more."""
    for old in CACHE.iterdir():
        if old.is_dir() and LEGACY_LAYER.fullmatch(old.name):
            shutil.rmtree(old, ignore_errors=True)


def run_streaming(cmd: list[str], what: str) -> None:
    """A long step whose progress lines (stderr) should reach the user as they come."""
    result = subprocess.run(cmd, stdout=subprocess.DEVNULL, check=False)
    if result.returncode != 0:
        raise BuildError(f"{what} failed (exit {result.returncode}): see the lines above")


# --- Final layer -------------------------------------------------------------------------------


def dependency_specs() -> list[str]:
    """docker-boot's runtime requirements, read from pyproject.toml."""
    with (REPO / "pyproject.toml").open("rb") as f:
        deps: list[str] = tomllib.load(f)["project"]["dependencies"]
    return deps


def disk_key(base: Path, variant: Variant = DEFAULT) -> str:
    return digest(
        [
            ("base", base.name.encode()),
            *([("rescue", rescue_image_id().encode())] if variant.remote else []),
            ("variant", repr(variant).encode()),
            *files_under(HERE, ["build.py", "guest", "image"]),
            *(files_under(HERE, ["bootdisk.py"]) if variant.firmware else []),
            *(files_under(HERE, ["dbbed.py"]) if variant.databases else []),
            *files_under(REPO, ["scripts/build-tinybox.sh", *GUEST_TEST_MODULES]),
            *(("src/" + name, content) for name, content in files_under(REPO, SOURCE_PATHS)),
        ]
    )


def pip_command() -> list[str]:
    return [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def dependency_wheels(arch: GuestArch, log: Log) -> Path:
    """docker-boot's dependencies as wheels for the guest, cached by requirements and platform.

    ``pip wheel`` on this host gives every pure wheel (and builds the sdist-only ones); for a
    foreign guest, each wheel with compiled parts (psutil ...) is then swapped for the same
    version's wheel for the guest's platform, downloaded from PyPI as a binary only.
    """
    specs = dependency_specs()
    key = digest(
        [("deps", json.dumps(specs).encode()), ("platforms", repr(arch.wheel_platforms).encode())]
    )
    deps = CACHE / f"wheels-{arch.name}-{key}"
    if (deps / ".complete").exists():
        return deps
    log(f"downloading docker-boot's dependency wheels for {arch.name} from PyPI")
    shutil.rmtree(deps, ignore_errors=True)
    run([*pip_command(), "wheel", "-w", str(deps), *specs], "pip wheel of the dependencies")
    if arch.wheel_platforms:
        for wheel in sorted(deps.glob("*.whl")):
            if wheel.name.endswith("-none-any.whl"):
                continue
            name, version = wheel.name.split("-")[:2]
            platforms = [arg for tag in arch.wheel_platforms for arg in ("--platform", tag)]
            run(
                [
                    *pip_command(),
                    "download",
                    "--no-deps",
                    "--only-binary=:all:",
                    *platforms,
                    "--python-version",
                    "".join(map(str, GUEST_PYTHON)),
                    "--implementation",
                    "cp",
                    "-d",
                    str(deps),
                    f"{name}=={version}",
                ],
                f"pip download of {name} {version} for {arch.name}",
            )
            wheel.unlink()
    (deps / ".complete").touch()
    prune(f"wheels-{arch.name}", deps)
    return deps


def build_wheelhouse(out: Path, arch: GuestArch, log: Log) -> None:
    """docker-boot's wheel from a pristine copy of the sources, plus its dependencies' wheels.

    Copying first keeps setuptools' ``build/`` leftovers (deleted modules included) out of the
    wheel. Dependency wheels are cached by the requirement list, so only docker-boot is rebuilt.
    """
    deps = dependency_wheels(arch, log)
    with tempfile.TemporaryDirectory(prefix="dboot-vm-src-") as src:
        for name, content in files_under(REPO, SOURCE_PATHS):
            dest = Path(src) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        run([*pip_command(), "wheel", "--no-deps", "-w", str(out), src], "pip wheel of docker-boot")
    for wheel in deps.glob("*.whl"):
        shutil.copy2(wheel, out)


def install_docker_boot(tree: Path, arch: GuestArch, log: Log) -> None:
    """A venv on the guest's own Python, with docker-boot from local wheels only (no index)."""
    log("installing docker-boot into the guest's /opt/dboot (chroot, Debian's python3)")
    wheels = tree / "tmp" / "wheels"
    wheels.mkdir(parents=True)
    build_wheelhouse(wheels, arch, log)
    # No pip inside the venv: ensurepip installing it cost 19 s under binfmt emulation (arm64).
    # Debian's own pip wheel, run in place, installs docker-boot into the venv instead.
    run(
        ["chroot", str(tree), "python3", "-m", "venv", "--without-pip", "/opt/dboot"],
        "python3 -m venv in the guest",
    )
    pip_wheels = sorted((tree / "usr/share/python-wheels").glob("pip-*.whl"))
    if not pip_wheels:
        raise BuildError("no /usr/share/python-wheels/pip-*.whl in the guest: add python3-venv")
    run(
        [
            "chroot",
            str(tree),
            "/opt/dboot/bin/python",
            f"/usr/share/python-wheels/{pip_wheels[-1].name}/pip",
            "install",
            "-q",
            "--no-index",
            "--disable-pip-version-check",
            "--find-links",
            "/tmp/wheels",
            "docker-boot",
        ],
        "pip install of docker-boot in the guest",
    )
    shutil.rmtree(wheels)
    for script in ("dboot", "dboot-tui"):
        link = tree / "usr" / "local" / "bin" / script
        link.unlink(missing_ok=True)
        link.symlink_to(f"/opt/dboot/bin/{script}")


def install_guest_tests(tree: Path) -> None:
    """The test modules the guest runs itself (the rollback proof), beside docker-boot."""
    for name, content in files_under(REPO, GUEST_TEST_MODULES):
        dest = tree / GUEST_TESTS / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content)


def install_scenario_unit(tree: Path) -> None:
    """The unit that, once multi-user.target is reached, runs the scenario named on the kernel
    command line (``dboot.test=NAME``), so one disk serves every scenario."""
    shutil.copy2(GUEST_FILES / "dboot-vm-scenario", tree / "usr/local/sbin/dboot-vm-scenario")
    (tree / "usr/local/sbin/dboot-vm-scenario").chmod(0o755)
    unit = tree / "etc/systemd/system/dboot-vm-scenario.service"
    shutil.copy2(GUEST_FILES / "dboot-vm-scenario.service", unit)
    wants = tree / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / unit.name).symlink_to(f"/etc/systemd/system/{unit.name}")


def compile_helpers(out: Path, variant: Variant) -> list[str]:
    """The test image's C programs, built for the guest (the host's gcc, or a cross gcc).

    ``dboot-excl-open`` is static (the image has no libc): busybox cannot open with O_EXCL.
    ``dboot-unrunnable-init`` (if the variant runs the recovery scenario) is deliberately
    dynamic: its ELF interpreter, glibc's loader, is absent from the busybox image, so execve()
    fails with ENOENT although the file exists and is executable, the failure a user gets moving
    a Debian binary into a scratch image. Returns the names built.
    """
    gcc = variant.arch.gcc
    run(
        [
            gcc,
            "-static",
            "-Os",
            "-o",
            str(out / "dboot-excl-open"),
            str(IMAGE_FILES / "excl_open.c"),
        ],
        f"{gcc} -static of tests/vm/image/excl_open.c (needs {variant.arch.gcc_package})",
    )
    if not variant.recovery_init:
        return ["dboot-excl-open"]
    run(
        [
            gcc,
            "-Os",
            "-o",
            str(out / "dboot-unrunnable-init"),
            str(IMAGE_FILES / "unrunnable_init.c"),
        ],
        f"{gcc} of tests/vm/image/unrunnable_init.c",
    )
    return ["dboot-excl-open", "dboot-unrunnable-init"]


def save_test_image(base_tree: Path, dest: Path, variant: Variant, log: Log) -> None:
    """`docker save` of tinybox, made of the base tree's own busybox (so of the guest's
    architecture), plus the test init and helpers, built with the running dockerd."""
    platform = variant.arch.docker_platform
    log(f"building the busybox test image ({platform}) with the local Docker engine")
    base_tag, tag = "dboot-vm-tinybox:build", "dboot-vm-test:build"
    with tempfile.TemporaryDirectory(prefix="dboot-vm-image-") as ctx:
        context = Path(ctx)
        helpers = compile_helpers(context, variant)
        shutil.copy2(IMAGE_FILES / "dboot-test-init", context / "dboot-test-init")
        for program in ("dboot-test-init", *helpers):
            (context / program).chmod(0o755)  # the legacy builder has no COPY --chmod
        inits = " ".join(["dboot-test-init", *(h for h in helpers if h.endswith("-init"))])
        (context / "Dockerfile").write_text(
            f"FROM {base_tag}\nCOPY {inits} /sbin/\nCOPY dboot-excl-open /usr/local/bin/\n"
        )
        tinybox_env = {
            **os.environ,
            "BUSYBOX": str(base_tree / "bin/busybox"),
            "DOCKER_PLATFORM": platform,
        }
        try:
            run(
                [str(REPO / "scripts/build-tinybox.sh"), base_tag],
                "scripts/build-tinybox.sh",
                env=tinybox_env,
            )
            run(
                ["docker", "build", "-q", "--platform", platform, "-t", tag, ctx],
                "docker build of the test image",
                cwd=context,
            )
            run(["docker", "save", "-o", str(dest), tag], "docker save of the test image")
        finally:
            # Leave the engine as we found it: other tiers list its images.
            subprocess.run(["docker", "rmi", "-f", tag, base_tag], capture_output=True, check=False)


def save_systemd_root(base_tree: Path, dest: Path, variant: Variant) -> None:
    """A plain rootfs tarball: the debootstrap tree (minbase + systemd) minus the kernel, plus a
    unit that reports on the console once the switched-to systemd reaches multi-user.target."""
    excludes = [f"--exclude={pattern}" for pattern in SYSTEMD_ROOT_EXCLUDES]
    run(
        ["tar", "-C", str(base_tree), "--numeric-owner", *excludes, "-cf", str(dest), "."],
        "tar of the systemd root",
    )
    with tempfile.TemporaryDirectory(prefix="dboot-vm-newroot-") as extra_dir:
        extra = Path(extra_dir)
        units = extra / "etc/systemd/system"
        (units / "multi-user.target.wants").mkdir(parents=True)
        (extra / "usr/local/sbin").mkdir(parents=True)
        shutil.copy2(GUEST_FILES / "dboot-newroot-report.service", units)
        (units / "multi-user.target.wants/dboot-newroot-report.service").symlink_to(
            "/etc/systemd/system/dboot-newroot-report.service"
        )
        report = extra / "usr/local/sbin/dboot-newroot-report"
        shutil.copy2(GUEST_FILES / "dboot-newroot-report", report)
        report.chmod(0o755)
        for helper in compile_helpers(extra / "usr/local/sbin", variant):
            if helper.endswith("-init"):
                (extra / "usr/local/sbin" / helper).unlink()
        run(
            [
                "tar",
                "-C",
                str(extra),
                "--numeric-owner",
                "--owner=0",
                "--group=0",
                "-rf",
                str(dest),
                "./etc/systemd/system",
                "./usr/local/sbin",
            ],
            "tar of the systemd root's extras",
        )


RESCUE_IMAGE = "dboot-rescue:latest"


def rescue_image() -> str:
    """``make rescue-image``'s image, built first if the engine lacks it (its debootstrap
    download is cached in .cache/rescue/); returns its tag."""
    inspect = subprocess.run(["docker", "image", "inspect", RESCUE_IMAGE], capture_output=True)
    if inspect.returncode != 0:
        script = REPO / "scripts/build-rescue-image.sh"
        run_streaming([str(script), RESCUE_IMAGE], "scripts/build-rescue-image.sh")
    return RESCUE_IMAGE


def rescue_image_id() -> str:
    return run(
        ["docker", "image", "inspect", "--format", "{{.Id}}", rescue_image()],
        "docker image inspect of the rescue image",
    ).strip()


def rescue_archive(log: Log) -> Path:
    """`docker save` of the rescue image, cached by its id (some 200 MB, saved once)."""
    image_id = rescue_image_id()
    archive = CACHE / f"rescue-{image_id.removeprefix('sha256:')[:16]}.tar"
    if not archive.exists():
        log(f"docker save {RESCUE_IMAGE} into {archive}")
        part = archive.with_suffix(".part")
        run(["docker", "save", "-o", str(part), RESCUE_IMAGE], "docker save of the rescue image")
        part.rename(archive)
        for old in CACHE.glob("rescue-*.tar"):
            if old != archive:
                old.unlink()
    return archive


SSH_KEY_NAME = "id_ed25519"
# The old machine's network: systemd-networkd takes a DHCP lease from QEMU's user network.
WIRED_NETWORK = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\n"


def make_remote_machine(tree: Path, key: Path, log: Log) -> None:
    """The old machine of the remote scenarios: networkd on DHCP, a fresh test key for root
    (its private half beside the disk), the rescue image's archive in /root."""
    log("the remote machine: networkd, a test key for root, the rescue image's archive")
    network = tree / "etc/systemd/network/20-wired.network"
    network.write_text(WIRED_NETWORK)
    run(
        ["chroot", str(tree), "systemctl", "enable", "systemd-networkd.service"],
        "systemctl enable systemd-networkd in the guest",
    )
    for old in (key, key.with_suffix(".pub")):
        old.unlink(missing_ok=True)
    run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dboot-vm-test", "-f", str(key)],
        "ssh-keygen of the test key",
    )
    ssh_dir = tree / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    shutil.copyfile(key.with_suffix(".pub"), ssh_dir / "authorized_keys")
    (ssh_dir / "authorized_keys").chmod(0o600)
    # A hard link when the cache and the tree share a filesystem: mkfs.ext4 -d copies it anyway.
    archive = rescue_archive(log)
    try:
        os.link(archive, tree / "root/rescue.tar")
    except OSError:
        shutil.copyfile(archive, tree / "root/rescue.tar")


def make_ext4(tree: Path, image: Path) -> None:
    """ext4 from a directory, no loop mount needed: the tree's size plus room to write."""
    used = int(run(["du", "-sb", str(tree)], "du of the disk tree").split()[0])
    size_mib = used * 5 // 4 // 2**20 + 512
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "dboot-vm", "-d", str(tree), str(image), f"{size_mib}M"],
        "mkfs.ext4 -d of the disk",
    )


def build_disk(base: Path, variant: Variant, log: Log) -> tuple[Path, float]:
    disk_dir = CACHE / f"disk-{variant.name}-{disk_key(base, variant)}"
    disk = disk_dir / "disk.raw"
    if (disk_dir / ".complete").exists():
        return disk, 0.0
    started = time.monotonic()
    shutil.rmtree(disk_dir, ignore_errors=True)
    disk_dir.mkdir(parents=True)
    tree = disk_dir / "tree"
    try:
        log(f"building the disk in {disk_dir}")
        run(["cp", "-a", "--reflink=auto", str(base / "tree"), str(tree)], "copy of the base tree")
        install_docker_boot(tree, variant.arch, log)
        install_guest_tests(tree)
        install_scenario_unit(tree)
        save_test_image(base / "tree", tree / "root/test-image.tar", variant, log)
        if variant.systemd_root:
            log("packing the systemd root (rootfs tarball of the base tree)")
            save_systemd_root(base / "tree", tree / "root/systemd-root.tar", variant)
        if variant.remote:
            make_remote_machine(tree, disk_dir / SSH_KEY_NAME, log)
        if variant.databases:
            from tests.vm.dbbed import make_database_machine

            make_database_machine(tree, log)
        if variant.firmware is not None:
            from tests.vm.bootdisk import make_boot_disk

            make_boot_disk(tree, disk, variant, log)
        else:
            log("mkfs.ext4 -d")
            make_ext4(tree, disk)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    (disk_dir / ".complete").touch()
    prune(f"disk-{variant.name}", disk_dir, spare=1)
    return disk, time.monotonic() - started


def build(log: Log = print, variant: Variant = DEFAULT) -> VmBed:
    """Build (or reuse) the layers of one variant and return the bed. Raises BuildError."""
    check_requirements(variant)
    with cache_lock():
        prune_legacy()
        if variant.remote:
            rescue_image()
        base, base_seconds = build_base(VARIANTS[variant.base] if variant.base else variant, log)
        tree_layer = base
        if variant.firmware is not None:
            tree_layer, grub_seconds = build_grub_tree(base, variant.firmware, log)
            base_seconds += grub_seconds
        disk, disk_seconds = build_disk(tree_layer, variant, log)
    ssh_key = disk.parent / SSH_KEY_NAME if variant.remote else None
    filesystems: tuple[Filesystem, ...] = ()
    if variant.firmware is not None:
        from tests.vm.bootdisk import read_layout

        filesystems = read_layout(disk)
    return VmBed(
        base / "vmlinuz",
        base / "initrd.img",
        disk,
        base_seconds,
        disk_seconds,
        variant,
        ssh_key,
        filesystems,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--boot", metavar="SCENARIO", help="then boot it (smoke, switch-busybox, ...)"
    )
    parser.add_argument("--variant", choices=sorted(VARIANTS), default=DEFAULT.name)
    args = parser.parse_args()
    log: Log = lambda text: print(f"build-vm: {text}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        bed = build(log, VARIANTS[args.variant])
    except BuildError as e:
        log(str(e))
        return 2
    log(f"kernel {bed.kernel}\nbuild-vm: disk   {bed.disk}")
    log(f"built in {bed.base_seconds:.0f} s (base) + {bed.disk_seconds:.0f} s (disk)")
    if args.boot:
        from tests.vm.machine import boot_interactively

        return boot_interactively(bed, args.boot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
