"""Test images, built offline, and the tools to compare trees. Importable by any test.

Images are tagged under ``dboot-test/`` so that a stray one is easy to spot and remove.
The slow input (a debootstrap tree) is cached as a tarball under ``<repo>/.cache/``
(gitignored), keyed by its inputs, so reruns only pay for ``docker import``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import stat
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
PREFIX = "dboot-test/"
BUSYBOX = Path("/bin/busybox")

# What `docker export` adds from the container's init layer (moby daemon/initlayer):
# empty placeholder files, the /etc/mtab symlink, and the API mount points, whose
# metadata (mode, mtime) is the container's, not the image's. Comparisons drop these
# entries entirely ...
EXPORT_ARTIFACTS = frozenset(
    {".dockerenv", "etc/hostname", "etc/hosts", "etc/resolv.conf", "etc/mtab", "dev/console"}
    | {"dev/pts", "dev/shm", "proc", "sys"}
)
# ... and compare only the type of these directories (their contents are compared).
INIT_LAYER_DIRS = frozenset({"dev", "etc"})

# security.capability = cap_net_raw+ep (VFS_CAP_REVISION_2, effective bit set)
CAP_NET_RAW_EP = b"\x01\x00\x00\x02" + (1 << 13).to_bytes(4, "little") + b"\x00" * 12


def docker(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the docker CLI; raise with its stderr on failure."""
    result = subprocess.run(["docker", *args], input=input, capture_output=True)
    if result.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {result.stderr.decode().strip()}")
    return result


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def remove_image(tag: str) -> None:
    subprocess.run(["docker", "rmi", "-f", tag], capture_output=True)


def import_tar(tar_path: Path, tag: str) -> str:
    """``docker import`` a filesystem tarball (no CMD, no ENTRYPOINT)."""
    docker("import", str(tar_path), tag)
    return tag


@contextlib.contextmanager
def temporary_container(image: str) -> Iterator[str]:
    """A created, never started container (a dummy command: images may have none)."""
    container = docker("create", image, "/dboot-test-placeholder").stdout.decode().strip()
    try:
        yield container
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)


def export_tar(image: str, destination: Path) -> Path:
    """``docker export`` of the image (through a temporary container) into a file."""
    with temporary_container(image) as container:
        docker("export", "-o", str(destination), container)
    return destination


def extract_export(image: str, destination: Path) -> None:
    """The reference tree: GNU tar extraction of ``docker export``."""
    destination.mkdir(parents=True, exist_ok=True)
    with temporary_container(image) as container:
        export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
        untar = subprocess.run(
            ["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf", "-"],
            stdin=export.stdout,
            cwd=destination,
            capture_output=True,
        )
        assert export.stdout is not None
        export.stdout.close()
        if export.wait() != 0 or untar.returncode != 0:
            raise RuntimeError(f"export | tar x failed: {untar.stderr.decode().strip()}")


# ---------------------------------------------------------------------------------------
# The fidelity image: every kind of entry and metadata docker export carries
# ---------------------------------------------------------------------------------------

ODD_NAMES = [
    "with space",
    "new\nline",
    "tab\tname",
    "ünïcødé-名前",
    os.fsdecode(b"latin1-\xe9t\xe9-\xff"),  # not UTF-8 at all
    "n" * 200,  # longer than ustar's 100-byte name field
    "back\\slash",
    "-dash",
    ".hidden",
    "colon:star*question?",
    "quote'\"",
]


def fidelity_tar(path: Path) -> None:
    """Write a PAX tarball with setuid/setgid/sticky modes, numeric owners, hardlinks,
    symlinks (relative, absolute, dangling, long, looping), devices, a fifo, xattrs,
    sub-second and odd mtimes, empty dirs and files, and odd names."""
    rng = random.Random(1234)
    mtime = iter(range(1_500_000_000, 1_600_000_000, 7919))

    def add(
        name: str,
        kind: bytes,
        mode: int,
        data: bytes = b"",
        *,
        uid: int = 0,
        gid: int = 0,
        link: str = "",
        dev: tuple[int, int] = (0, 0),
        xattrs: dict[str, bytes] | None = None,
        when: int | str | None = None,
    ) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid, info.gid = uid, gid
        info.uname = info.gname = ""
        info.linkname = link
        info.devmajor, info.devminor = dev
        info.mtime = next(mtime) if when is None else int(str(when).split(".")[0])
        info.size = len(data) if kind == tarfile.REGTYPE else 0
        pax = {
            "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
            for k, v in (xattrs or {}).items()
        }
        if isinstance(when, str):  # sub-second: exact digits, no float rounding
            pax["mtime"] = when
        info.pax_headers = pax
        tar.addfile(info, io.BytesIO(data) if info.size else None)

    dirs = ["bin", "etc", "usr", "usr/bin", "data", "odd", "dev", "empty-dir", "deep"]
    dirs += ["deep/a", "deep/a/b", "deep/a/b/c", "opaque-me", "opaque-me/sub"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
        for directory in dirs:
            add(directory, tarfile.DIRTYPE, 0o755)
        add("tmp", tarfile.DIRTYPE, 0o1777)
        add("sgid-dir", tarfile.DIRTYPE, 0o2775, gid=50)
        add("private-dir", tarfile.DIRTYPE, 0o700, uid=1000, gid=1000)
        add("bin/busybox", tarfile.REGTYPE, 0o755, BUSYBOX.read_bytes())
        for applet in ("sh", "rm", "mkdir", "ln", "cat", "touch", "echo"):
            add(f"bin/{applet}", tarfile.SYMTYPE, 0o777, link="busybox")
        add("usr/bin/env", tarfile.SYMTYPE, 0o777, link="/bin/busybox")
        # Hardlinks share the inode, so the capability is on both names.
        add("usr/bin/ping", tarfile.REGTYPE, 0o755, b"#!/bin/sh\necho ping\n",
            xattrs={"security.capability": CAP_NET_RAW_EP}, when=1_550_000_000)  # fmt: skip
        add("usr/bin/ping6", tarfile.LNKTYPE, 0o755, link="usr/bin/ping")
        add("usr/bin/arping", tarfile.REGTYPE, 0o755, b"#!/bin/sh\necho arping\n",
            xattrs={"security.capability": CAP_NET_RAW_EP})  # fmt: skip
        add("usr/bin/suid", tarfile.REGTYPE, 0o4755, b"suid")
        add("usr/bin/sgid", tarfile.REGTYPE, 0o2711, b"sgid", gid=42)
        add("usr/bin/sticky", tarfile.REGTYPE, 0o1644, b"sticky")
        add("data/owned", tarfile.REGTYPE, 0o640, b"owned", uid=1234, gid=5678)
        add("data/no-access", tarfile.REGTYPE, 0o000, b"secret")
        add("data/empty", tarfile.REGTYPE, 0o644)
        add("data/big", tarfile.REGTYPE, 0o644, rng.randbytes(3 << 20))
        add("data/a", tarfile.REGTYPE, 0o644, b"shared inode")
        add("data/b", tarfile.LNKTYPE, 0o644, link="data/a")
        add("data/c", tarfile.LNKTYPE, 0o644, link="data/a")
        add("data/fraction", tarfile.REGTYPE, 0o644, b"ns", when="1600000000.987654321")
        add("data/old", tarfile.REGTYPE, 0o644, b"1970", when=1)
        add("data/user-xattr", tarfile.REGTYPE, 0o644, b"x", xattrs={"user.note": b"dropped"})
        add("data/fifo", tarfile.FIFOTYPE, 0o600)
        add("dev/null", tarfile.CHRTYPE, 0o666, dev=(1, 3))
        add("dev/sda", tarfile.BLKTYPE, 0o660, gid=6, dev=(8, 0))
        for index, name in enumerate(ODD_NAMES):
            add(f"odd/{name}", tarfile.REGTYPE, 0o644, f"odd {index}".encode())
        add("odd/dangling", tarfile.SYMTYPE, 0o777, link="/nonexistent/target")
        add("odd/long-link", tarfile.SYMTYPE, 0o777, link="/" + "l" * 300)
        add("odd/up-link", tarfile.SYMTYPE, 0o777, link="../bin/busybox")
        add("odd/loop1", tarfile.SYMTYPE, 0o777, link="loop2")
        add("odd/loop2", tarfile.SYMTYPE, 0o777, link="loop1")
        add("odd/symlink-owner", tarfile.SYMTYPE, 0o777, link="x", uid=99, gid=98)
        add("etc/removed-file", tarfile.REGTYPE, 0o644, b"gone in layer 2")
        add("etc/changed", tarfile.REGTYPE, 0o644, b"before")
        add("etc/passwd", tarfile.REGTYPE, 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
        add("opaque-me/old-file", tarfile.REGTYPE, 0o644, b"hidden by an opaque dir")
        add("opaque-me/sub/old", tarfile.REGTYPE, 0o644, b"hidden too")


# The second layer: a whiteout, an opaque directory, a changed file and a new hardlink,
# all with nanosecond mtimes (docker export rounds them down to seconds).
LAYER_TWO = (
    "rm /etc/removed-file && rm -rf /opaque-me && mkdir /opaque-me && "
    "echo new > /opaque-me/new && ln /opaque-me/new /opaque-me/new-link && "
    "echo after > /etc/changed"
)


def build_fidelity_image(tag: str = PREFIX + "fidelity:latest") -> str:
    """The fidelity image, two layers, no CMD. Rebuilt only when missing."""
    if image_exists(tag):
        return tag
    base = tag.rsplit(":", 1)[0] + ":base"
    with tempfile.TemporaryDirectory() as work:
        tar_path = Path(work) / "base.tar"
        fidelity_tar(tar_path)
        import_tar(tar_path, base)
        (Path(work) / "Dockerfile").write_text(f"FROM {base}\nRUN {LAYER_TWO}\n")
        result = subprocess.run(
            ["docker", "build", "-q", "--network", "none", "-t", tag, work],
            capture_output=True,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
        )
        if result.returncode != 0:
            raise RuntimeError(f"docker build: {result.stderr.decode().strip()}")
    remove_image(base)  # the tag only; the layers stay with the fidelity image
    return tag


# ---------------------------------------------------------------------------------------
# A real distribution tree: debootstrap, cached
# ---------------------------------------------------------------------------------------

DEBOOTSTRAP_ARGS = ("--variant=minbase", "bookworm")
DEBIAN_MIRROR = "http://deb.debian.org/debian"


def debootstrap_tarball(args: tuple[str, ...] = DEBOOTSTRAP_ARGS) -> Path:
    """A Debian bookworm minbase tree as a tarball (numeric owners, xattrs), cached."""
    key = hashlib.sha256(" ".join((*args, DEBIAN_MIRROR, "v1")).encode()).hexdigest()
    cached = CACHE / f"debootstrap-{key[:16]}.tar"
    if cached.exists():
        return cached
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as work:
        tree = Path(work) / "tree"
        subprocess.run(
            ["debootstrap", *args, str(tree), DEBIAN_MIRROR],
            check=True,
            capture_output=True,
        )
        partial = Path(work) / "tree.tar"
        subprocess.run(
            [
                "tar",
                "--xattrs",
                "--xattrs-include=*",
                "--numeric-owner",
                "-C",
                str(tree),
                "-cf",
                str(partial),
                ".",
            ],
            check=True,
        )
        partial.rename(cached)
    return cached


def build_debian_image(tag: str = PREFIX + "debian-minbase:latest") -> str:
    if not image_exists(tag):
        import_tar(debootstrap_tarball(), tag)
    return tag


# ---------------------------------------------------------------------------------------
# The benchmark's image: ~1 GB in ~20k files
# ---------------------------------------------------------------------------------------


def bench_tarball(path: Path, *, files: int = 20_000, total_bytes: int = 1 << 30) -> None:
    """Random files with a realistic spread: most small, a few large, ~``total_bytes``."""
    rng = random.Random(42)
    big = max(files // 200, 1)  # 0.5% of the files hold ~80% of the bytes
    small_budget = total_bytes // 5
    block = rng.randbytes(1 << 20)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for index in range(files):
            directory = f"d{index % 97:02d}/s{index % 13}"
            if index < big:
                size = (total_bytes - small_budget) // big
            else:
                size = int(rng.paretovariate(1.5) * small_budget / (files - big) / 3)
            info = tarfile.TarInfo(f"{directory}/f{index}")
            info.size = size
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, _RepeatingReader(block, size, index))


class _RepeatingReader(io.RawIOBase):
    """``size`` bytes of pseudo-random data without holding them all in memory."""

    def __init__(self, block: bytes, size: int, seed: int) -> None:
        self._block, self._left, self._offset = block, size, seed * 4099 % len(block)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        out = bytearray()
        while len(out) < size:
            take = min(size - len(out), len(self._block) - self._offset)
            out += self._block[self._offset : self._offset + take]
            self._offset = (self._offset + take) % len(self._block)
        self._left -= size
        return bytes(out)


# ---------------------------------------------------------------------------------------
# Comparing trees
# ---------------------------------------------------------------------------------------


def tree_metadata(root: Path, *, content: bool = True) -> dict[str, dict[str, Any]]:
    """Everything about every entry under ``root`` (the root itself excluded), keyed by
    relative path: type, mode bits, numeric owner, mtime (ns), size, a digest of the data,
    symlink target, device numbers, xattrs, and which names share an inode."""
    found: dict[str, dict[str, Any]] = {}
    inodes: dict[int, list[str]] = {}
    root_dev = os.lstat(root).st_dev
    for directory, subdirs, files in os.walk(root):
        for name in subdirs + files:
            full = os.path.join(directory, name)
            relative = os.path.relpath(full, root)
            st = os.lstat(full)
            assert st.st_dev == root_dev, f"{relative} is on another filesystem"
            meta: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": oct(stat.S_IMODE(st.st_mode)),
                "uid": st.st_uid,
                "gid": st.st_gid,
                "mtime_ns": st.st_mtime_ns,
                "xattrs": {
                    key: os.getxattr(full, key, follow_symlinks=False)
                    for key in os.listxattr(full, follow_symlinks=False)
                },
            }
            if stat.S_ISREG(st.st_mode):
                meta["size"] = st.st_size
                if content:
                    meta["sha256"] = _digest(full)
                inodes.setdefault(st.st_ino, []).append(relative)
            elif stat.S_ISLNK(st.st_mode):
                meta["target"] = os.readlink(full)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                meta["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            found[relative] = meta
    for names in inodes.values():
        for name in names:
            found[name]["links"] = sorted(names)
    return found


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def without_export_artifacts(tree: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``tree`` minus what the container's init layer puts into ``docker export``."""
    kept = {}
    for path, meta in tree.items():
        if path in EXPORT_ARTIFACTS:
            continue
        kept[path] = {"type": meta["type"]} if path in INIT_LAYER_DIRS else meta
    return kept


def export_reference(image: str, work: Path) -> dict[str, dict[str, Any]]:
    """What a copy of ``image`` must equal: `docker export` extracted by GNU tar under
    ``work``, as metadata, less the export artifacts; the tree itself is removed again."""
    tree = work / "root"
    extract_export(image, tree)
    metadata = tree_metadata(tree)
    remove_tree(tree)
    return without_export_artifacts(metadata)


def differences(expected: dict[str, Any], actual: dict[str, Any], limit: int = 20) -> list[str]:
    """Readable differences between two ``tree_metadata`` results."""
    out = [f"missing: {path!r}" for path in sorted(expected.keys() - actual.keys())]
    out += [f"extra: {path!r}" for path in sorted(actual.keys() - expected.keys())]
    for path in sorted(expected.keys() & actual.keys()):
        for key in sorted(expected[path].keys() | actual[path].keys()):
            want, got = expected[path].get(key), actual[path].get(key)
            if want != got:
                out.append(f"{path!r} {key}: expected {want!r}, got {got!r}")
    return out[:limit]


def remove_tree(path: Path) -> None:
    """rm -rf that also copes with mode-000 directories (we are root, but be explicit)."""
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# An archive without parent directory entries
# ---------------------------------------------------------------------------------------

# Entries whose parents the tar never names: whoever extracts it must make them up.
PARENTLESS_ENTRIES: tuple[tuple[str, bytes, int, int], ...] = (
    # (name, type, mode, uid)
    ("hello", tarfile.REGTYPE, 0o644, 0),
    ("usr/local/share/deep/file", tarfile.REGTYPE, 0o644, 1000),
    ("opt/app/bin/tool", tarfile.REGTYPE, 0o755, 0),
    ("var/lib/explicit", tarfile.DIRTYPE, 0o700, 1000),
    ("srv/data", tarfile.DIRTYPE, 0o750, 0),
    ("srv/data/sub/x/file", tarfile.REGTYPE, 0o600, 33),
)
# The directories only implied by PARENTLESS_ENTRIES.
PARENTLESS_IMPLIED = (
    "usr", "usr/local", "usr/local/share", "usr/local/share/deep", "opt", "opt/app",
    "opt/app/bin", "var", "var/lib", "srv", "srv/data/sub", "srv/data/sub/x",
)  # fmt: skip


def parentless_tar(path: Path) -> Path:
    """A filesystem tarball that names files and directories but not their parents."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, uid in PARENTLESS_ENTRIES:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, uid, uid
            info.mtime = 1_700_000_000
            data = f"{name}\n".encode() if kind == tarfile.REGTYPE else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
    return path


def build_parentless_image(tar_path: Path, tag: str = PREFIX + "parentless:latest") -> str:
    """``docker import`` of :func:`parentless_tar` (written to ``tar_path``), one layer."""
    remove_image(tag)
    return import_tar(parentless_tar(tar_path), tag)


# ---------------------------------------------------------------------------------------
# Inits that cannot run here: another architecture, a missing #! interpreter or loader
# ---------------------------------------------------------------------------------------

ARM64_APT = CACHE / "apt-arm64"
# A static x86-64 ELF with a PT_INTERP would be odd; a dynamic one from the host is real.
DYNAMIC_BINARY = Path("/bin/true")


def arm64_busybox() -> Path:
    """Debian's busybox-static for arm64: a real aarch64 ELF, fetched once with apt into
    a private apt state under .cache (the host's dpkg architectures are left alone)."""
    binary = ARM64_APT / "busybox"
    if binary.exists():
        return binary
    lists, cache = ARM64_APT / "lists", ARM64_APT / "cache"
    for directory in (lists / "partial", cache / "archives" / "partial"):
        directory.mkdir(parents=True, exist_ok=True)
    apt = [
        "apt-get",
        "-q",
        f"-o=Dir::State::Lists={lists}",
        f"-o=Dir::Cache={cache}",
        "-o=APT::Architecture=arm64",
        "-o=APT::Architectures::=arm64",
        "-o=Acquire::Languages=none",
    ]
    debs = list(ARM64_APT.glob("busybox-static_*_arm64.deb"))
    if not debs:
        subprocess.run([*apt, "update"], check=True, capture_output=True)
        subprocess.run(
            [*apt, "download", "busybox-static:arm64"],
            check=True,
            capture_output=True,
            cwd=ARM64_APT,
        )
        debs = list(ARM64_APT.glob("busybox-static_*_arm64.deb"))
    with tempfile.TemporaryDirectory(dir=ARM64_APT) as work:
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), work], check=True)
        shutil.copy2(Path(work) / "bin" / "busybox", binary)
    return binary


def _small_root_tar(path: Path, files: dict[str, Path | bytes | str]) -> Path:
    """A tarball of a few entries: a Path is copied in (mode 0755), bytes become a file
    (0755), a str is a symlink target. Parent directories are listed (0755)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        made: set[str] = set()
        for name in sorted(files):
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in made:
                    made.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            value = files[name]
            info = tarfile.TarInfo(name)
            info.mode = 0o755
            if isinstance(value, str):
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
                continue
            data = value.read_bytes() if isinstance(value, Path) else value
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _import_small_root(
    tag: str, files: dict[str, Path | bytes | str], architecture: str | None = None
) -> str:
    """``docker import`` the files; with ``architecture``, ``docker load`` of a one-layer
    ``docker save`` archive that declares it (20.10's import --platform needs experimental)."""
    remove_image(tag)
    with tempfile.TemporaryDirectory() as work:
        tar_path = _small_root_tar(Path(work) / "root.tar", files)
        if architecture is None:
            docker("import", str(tar_path), tag)
        else:
            archive = single_layer_archive(Path(work) / "image.tar", tar_path, tag, architecture)
            docker("load", "-i", str(archive))
    return tag


def single_layer_archive(path: Path, layer: Path, tag: str, architecture: str) -> Path:
    """A ``docker save`` archive of one layer, its config declaring ``architecture``."""
    diff_id = "sha256:" + hashlib.sha256(layer.read_bytes()).hexdigest()
    config = {
        "architecture": architecture,
        "os": "linux",
        "config": {"Cmd": ["/sbin/init"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "tests/images.py"}],
    }
    config_bytes = json.dumps(config).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": ["layer.tar"]}]
    with tarfile.open(path, "w") as tar:
        for name, data in (
            (config_name, config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
            ("layer.tar", layer.read_bytes()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def build_arm64_image(tag: str = PREFIX + "arm64-busybox:latest") -> str:
    """An arm64 image (declared so, and its binaries are aarch64): /sbin/init and /bin/sh
    are links to Debian's arm64 busybox-static."""
    busybox = arm64_busybox()
    files: dict[str, Path | bytes | str] = {
        "bin/busybox": busybox,
        "bin/sh": "busybox",
        "sbin/init": "../bin/busybox",
    }
    return _import_small_root(tag, files, architecture="arm64")


def missing_interpreter_files() -> dict[str, Path | bytes | str]:
    """The host's static busybox, and an init script for a perl the image lacks."""
    return {
        "bin/busybox": BUSYBOX,
        "bin/sh": "busybox",
        "sbin/init": b"#!/usr/bin/perl -w\nprint qq(hello from perl\\n);\n",
        "sbin/init-sh": b"#!/bin/sh\necho hello\n",  # fine: sh is there
        "sbin/init-chain": b"#!/sbin/init\n",  # a script for a script for the missing perl
    }


def build_missing_interpreter_image(tag: str = PREFIX + "no-interpreter:latest") -> str:
    return _import_small_root(tag, missing_interpreter_files())


def missing_loader_files() -> dict[str, Path | bytes | str]:
    """A dynamically linked init (the host's /bin/true) without its loader or libc."""
    return {
        "bin/busybox": BUSYBOX,
        "bin/sh": "busybox",
        "sbin/init": DYNAMIC_BINARY,
        "lib64/ld-linux-x86-64.so.2": "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",  # dangling
    }


def build_missing_loader_image(tag: str = PREFIX + "no-loader:latest") -> str:
    return _import_small_root(tag, missing_loader_files())


# --- tinybox, under the test prefix ---------------------------------------------------------
# The demo's `tinybox:latest` (scripts/setup.sh) is a name anyone may have; tests use their own.
TINYBOX = PREFIX + "tinybox:latest"
# Images a user may well have, whose names contain "tinybox": a wizard test that picks its
# image by a loose filter would take one of these (they sort first, or nearly).
DECOY_TAGS = ("bars-tinybox:latest", "tinybox-old:latest")


def build_tinybox(tag: str = TINYBOX) -> str:
    """scripts/build-tinybox.sh's image as ``tag``; built once, reused after."""
    if not image_exists(tag):
        subprocess.run(
            [str(REPO / "scripts" / "build-tinybox.sh"), tag], check=True, capture_output=True
        )
    return tag


@contextlib.contextmanager
def decoy_images() -> Iterator[list[str]]:
    """The :data:`DECOY_TAGS` in the engine while the block runs: tiny images with no
    /sbin/init and no /bin/sh, so that a test that takes one fails plainly. A decoy tag
    that already exists is someone's image: left as it is, and never removed."""
    made = []
    try:
        for tag in DECOY_TAGS:
            if not image_exists(tag):
                _import_small_root(tag, {"etc/decoy": f"{tag}: not a dboot test image\n".encode()})
                made.append(tag)
        yield list(DECOY_TAGS)
    finally:
        for tag in made:
            remove_image(tag)


# A busy engine: more images than an 80x24 list shows, newer than ours and named to sort before
# and after every one of ours, decoys included (aa-dboot-test-crowd-01 ... zz-dboot-test-crowd-15:
# "dboot-test" in the name, to spot a stray one). A wizard test that hopes to see its image on
# the first screen fails among them; one that filters, as a person would, does not.
CROWD_TAGS = tuple(
    f"{side}-{PREFIX.rstrip('/')}-crowd-{number:02d}:latest"
    for side in ("aa", "zz")
    for number in range(1, 16)
)


@contextlib.contextmanager
def crowd_images() -> Iterator[list[str]]:
    """The :data:`CROWD_TAGS` in the engine while the block runs: one tiny image (a file, no
    init, no shell) under 30 tags. A tag that already exists is someone's: left as it is;
    only the tags made here are removed, each by its exact name."""
    made: list[str] = []
    try:
        for tag in CROWD_TAGS:
            if image_exists(tag):
                continue
            if made:
                docker("tag", made[0], tag)
            else:
                _import_small_root(tag, {"etc/crowd": b"one of many: not a dboot test image\n"})
            made.append(tag)
        yield list(CROWD_TAGS)
    finally:
        for tag in reversed(made):
            remove_image(tag)


# ---------------------------------------------------------------------------------------
# Debian 12 minbase whose /sbin/init is systemd: the hermetic rehearsal's image
# ---------------------------------------------------------------------------------------

SYSTEMD_DEBOOTSTRAP_ARGS = ("--variant=minbase", "--include=systemd-sysv", "bookworm")
DEBIAN_SYSTEMD = PREFIX + "debian-systemd:latest"


def build_debian_systemd_image(tag: str = DEBIAN_SYSTEMD) -> str:
    if not image_exists(tag):
        import_tar(debootstrap_tarball(SYSTEMD_DEBOOTSTRAP_ARGS), tag)
    return tag
