"""Build the QEMU test bed: a Debian 12 disk with systemd, docker-boot and the test images.

Two layers, cached under ``.cache/vm/`` (gitignored; ``DBOOT_VM_CACHE`` moves it):

``base-<hash>/``
    ``tree/``, the debootstrap tree made by ``base.sh``, and its own ``vmlinuz`` and
    ``initrd.img``. Inputs: ``base.sh``, ``packages.txt``, the suite and the mirror. Slow (about a
    minute or two), rarely rebuilt.
``disk-<hash>/disk.raw``
    An ext4 image of a copy of the base tree plus docker-boot installed from the working tree
    into ``/opt/dboot`` (Debian's own Python 3.11.2, a venv), the scenario unit, and in
    ``/root`` the test images. Inputs: the base hash, this file, ``guest/``, ``image/``,
    ``scripts/build-tinybox.sh`` and docker-boot's sources as they are on disk now. Fast (about
    half a minute), rebuilt whenever any of those change, so every run tests the working tree.

Run ``python -m tests.vm.build`` to build (``--boot SCENARIO`` then boots it with the console on
stdout). Needs root, debootstrap, e2fsprogs, qemu-utils, gcc with a static libc and a Docker engine.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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

Log = Callable[[str], None]


class BuildError(Exception):
    """The test bed could not be built; the message names the cause and the fix."""


@dataclass(frozen=True)
class VmBed:
    """A built test bed. Boot ``disk`` through a copy-on-write overlay, never directly."""

    kernel: Path
    initrd: Path
    disk: Path
    base_seconds: float  # time spent building the base layer in this call; 0 when cached
    disk_seconds: float  # time spent building the final disk in this call; 0 when cached


# --- Requirements ------------------------------------------------------------------------------

# Tool -> the Debian package that provides it (scripts/setup.sh installs all of them).
REQUIRED_TOOLS = {
    "debootstrap": "debootstrap",
    "mkfs.ext4": "e2fsprogs",
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "gcc": "gcc libc6-dev",
    "docker": "docker.io",
    "tar": "tar",
    "chroot": "coreutils",
}


def check_requirements() -> None:
    """Fail with one line naming every missing tool and the package to install."""
    if os.geteuid() != 0:
        raise BuildError("the VM test bed needs root (debootstrap, chroot, mkfs): run as root")
    missing = sorted({pkg for tool, pkg in REQUIRED_TOOLS.items() if shutil.which(tool) is None})
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


# --- Small helpers -----------------------------------------------------------------------------


def run(cmd: list[str], what: str, *, cwd: Path | None = None) -> str:
    """Run a build step; on failure, one line with the step, the exit status and the last error."""
    # The engine here only builds with the legacy builder (no BuildKit).
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
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
    others = sorted(
        (old for old in CACHE.glob(prefix + "-*") if old != keep and old.is_dir()),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for old in others[spare:]:
        shutil.rmtree(old, ignore_errors=True)


# --- Base layer --------------------------------------------------------------------------------


def base_key() -> str:
    return digest(
        [
            *files_under(HERE, ["base.sh", "packages.txt"]),
            ("suite", SUITE.encode()),
            ("mirror", MIRROR.encode()),
        ]
    )


def build_base(log: Log) -> tuple[Path, float]:
    """The debootstrap tree with its kernel and initramfs copied beside it: (dir, seconds built)."""
    base = CACHE / f"base-{base_key()}"
    if (base / ".complete").exists():
        return base, 0.0
    started = time.monotonic()
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    log(f"building the base tree in {base} (debootstrap, a minute or two)")
    run_streaming(
        [
            "bash",
            str(HERE / "base.sh"),
            str(base / "tree"),
            str(HERE / "packages.txt"),
            SUITE,
            MIRROR,
        ],
        "debootstrap of the base tree (tests/vm/base.sh)",
    )
    boot = base / "tree" / "boot"
    for name, pattern in (("vmlinuz", "vmlinuz-*"), ("initrd.img", "initrd.img-*")):
        found = sorted(boot.glob(pattern))
        if not found:
            raise BuildError(
                f"no /boot/{pattern} in the base tree: add linux-image-cloud-amd64 to packages.txt"
            )
        shutil.copy2(found[-1], base / name)
    (base / ".complete").write_text(f"{SUITE} {MIRROR}\n")
    prune("base", base)
    return base, time.monotonic() - started


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


def disk_key(base: Path) -> str:
    return digest(
        [
            ("base", base.name.encode()),
            *files_under(HERE, ["build.py", "guest", "image"]),
            *files_under(REPO, ["scripts/build-tinybox.sh"]),
            *(("src/" + name, content) for name, content in files_under(REPO, SOURCE_PATHS)),
        ]
    )


def build_wheelhouse(out: Path, log: Log) -> None:
    """docker-boot's wheel from a pristine copy of the sources, plus its dependencies' wheels.

    Copying first keeps setuptools' ``build/`` leftovers (deleted modules included) out of the
    wheel. Dependency wheels are cached by the requirement list, so only docker-boot is rebuilt.
    """
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    specs = dependency_specs()
    deps = CACHE / f"wheels-{digest([('deps', json.dumps(specs).encode())])}"
    if not (deps / ".complete").exists():
        log("downloading docker-boot's dependency wheels from PyPI")
        shutil.rmtree(deps, ignore_errors=True)
        run([*pip, "wheel", "-w", str(deps), *specs], "pip wheel of the dependencies")
        (deps / ".complete").touch()
        prune("wheels", deps)
    with tempfile.TemporaryDirectory(prefix="dboot-vm-src-") as src:
        for name, content in files_under(REPO, SOURCE_PATHS):
            dest = Path(src) / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(content)
        run([*pip, "wheel", "--no-deps", "-w", str(out), src], "pip wheel of docker-boot")
    for wheel in deps.glob("*.whl"):
        shutil.copy2(wheel, out)


def install_docker_boot(tree: Path, log: Log) -> None:
    """A venv on the guest's own Python, with docker-boot from local wheels only (no index)."""
    log("installing docker-boot into the guest's /opt/dboot (chroot, Debian's python3)")
    wheels = tree / "tmp" / "wheels"
    wheels.mkdir(parents=True)
    build_wheelhouse(wheels, log)
    run(
        ["chroot", str(tree), "python3", "-m", "venv", "/opt/dboot"], "python3 -m venv in the guest"
    )
    run(
        [
            "chroot",
            str(tree),
            "/opt/dboot/bin/pip",
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


def compile_helpers(out: Path) -> None:
    """The test image's two C programs, built with the host's gcc.

    ``dboot-excl-open`` is static (the image has no libc): busybox cannot open with O_EXCL.
    ``dboot-unrunnable-init`` is deliberately dynamic: its ELF interpreter, glibc's loader, is
    absent from the busybox image, so execve() fails with ENOENT although the file exists and is
    executable, the failure a user gets moving a Debian binary into a scratch image.
    """
    run(
        [
            "gcc",
            "-static",
            "-Os",
            "-o",
            str(out / "dboot-excl-open"),
            str(IMAGE_FILES / "excl_open.c"),
        ],
        "gcc -static of tests/vm/image/excl_open.c (needs libc6-dev)",
    )
    run(
        [
            "gcc",
            "-Os",
            "-o",
            str(out / "dboot-unrunnable-init"),
            str(IMAGE_FILES / "unrunnable_init.c"),
        ],
        "gcc of tests/vm/image/unrunnable_init.c",
    )


def save_test_image(dest: Path, log: Log) -> None:
    """`docker save` of tinybox plus the test init and helpers, built with the running dockerd."""
    log("building the busybox test image with the local Docker engine")
    base_tag, tag = "dboot-vm-tinybox:build", "dboot-vm-test:build"
    with tempfile.TemporaryDirectory(prefix="dboot-vm-image-") as ctx:
        context = Path(ctx)
        compile_helpers(context)
        shutil.copy2(IMAGE_FILES / "dboot-test-init", context / "dboot-test-init")
        for program in ("dboot-test-init", "dboot-unrunnable-init", "dboot-excl-open"):
            (context / program).chmod(0o755)  # the legacy builder has no COPY --chmod
        (context / "Dockerfile").write_text(
            f"FROM {base_tag}\n"
            "COPY dboot-test-init dboot-unrunnable-init /sbin/\n"
            "COPY dboot-excl-open /usr/local/bin/\n"
        )
        try:
            run([str(REPO / "scripts/build-tinybox.sh"), base_tag], "scripts/build-tinybox.sh")
            run(
                ["docker", "build", "-q", "-t", tag, ctx],
                "docker build of the test image",
                cwd=context,
            )
            run(["docker", "save", "-o", str(dest), tag], "docker save of the test image")
        finally:
            # Leave the engine as we found it: other tiers list its images.
            subprocess.run(["docker", "rmi", "-f", tag, base_tag], capture_output=True, check=False)


def save_systemd_root(base_tree: Path, dest: Path) -> None:
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
        compile_helpers(extra / "usr/local/sbin")
        (extra / "usr/local/sbin/dboot-unrunnable-init").unlink()
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


def make_ext4(tree: Path, image: Path) -> None:
    """ext4 from a directory, no loop mount needed: the tree's size plus room to write."""
    used = int(run(["du", "-sb", str(tree)], "du of the disk tree").split()[0])
    size_mib = used * 5 // 4 // 2**20 + 512
    run(
        ["mkfs.ext4", "-q", "-F", "-L", "dboot-vm", "-d", str(tree), str(image), f"{size_mib}M"],
        "mkfs.ext4 -d of the disk",
    )


def build_disk(base: Path, log: Log) -> tuple[Path, float]:
    disk_dir = CACHE / f"disk-{disk_key(base)}"
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
        install_docker_boot(tree, log)
        install_scenario_unit(tree)
        save_test_image(tree / "root/test-image.tar", log)
        log("packing the systemd root (rootfs tarball of the base tree)")
        save_systemd_root(base / "tree", tree / "root/systemd-root.tar")
        log("mkfs.ext4 -d")
        make_ext4(tree, disk)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    (disk_dir / ".complete").touch()
    prune("disk", disk_dir, spare=1)
    return disk, time.monotonic() - started


def build(log: Log = print) -> VmBed:
    """Build (or reuse) both layers and return the bed. Raises BuildError."""
    check_requirements()
    with cache_lock():
        base, base_seconds = build_base(log)
        disk, disk_seconds = build_disk(base, log)
    return VmBed(base / "vmlinuz", base / "initrd.img", disk, base_seconds, disk_seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--boot", metavar="SCENARIO", help="then boot it (smoke, switch-busybox, ...)"
    )
    args = parser.parse_args()
    log: Log = lambda text: print(f"build-vm: {text}", file=sys.stderr, flush=True)  # noqa: E731
    try:
        bed = build(log)
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
