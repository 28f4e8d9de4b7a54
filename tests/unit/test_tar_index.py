"""Pure tests: strict tar reading, decompression by magic, the layered index, sizes."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import tarfile
from typing import Any

import pytest

from injector.errors import BadInput
from injector.image.imageindex import INODE_BYTES, PAGE_SIZE, ImageIndex, IndexBuilder
from injector.image.tarstream import (
    ArchiveError,
    StrictTar,
    decompressed,
    detect_compression,
    normalize,
)
from injector.ramroot.rootfs import parse_size, tmpfs_size_for

try:
    import zstandard
except ImportError:  # pragma: no cover
    zstandard = None  # type: ignore[assignment]


def make_tar(*members: tuple[str, bytes, str, int, str]) -> bytes:
    """(name, type, data-or-linkname, mode) tuples -> tar bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, content, mode, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.linkname = kind, mode, link
            data = content.encode()
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buffer.getvalue()


def file(name: str, content: str = "x", mode: int = 0o644) -> tuple[str, bytes, str, int, str]:
    return (name, tarfile.REGTYPE, content, mode, "")


def directory(name: str) -> tuple[str, bytes, str, int, str]:
    return (name, tarfile.DIRTYPE, "", 0o755, "")


def symlink(name: str, target: str) -> tuple[str, bytes, str, int, str]:
    return (name, tarfile.SYMTYPE, "", 0o777, target)


def hardlink(name: str, target: str) -> tuple[str, bytes, str, int, str]:
    return (name, tarfile.LNKTYPE, "", 0o755, target)


def index_of(*layers: bytes, whiteouts: bool = True) -> ImageIndex:
    builder = IndexBuilder()
    for layer in layers:
        builder.start_layer()
        tar = StrictTar(io.BytesIO(layer))
        for member in tar:
            builder.add_member(member, whiteouts=whiteouts)
    return builder.build()


def test_strict_tar_accepts_a_complete_archive() -> None:
    names = [m.name for m in StrictTar(io.BytesIO(make_tar(file("a"), file("b"))))]
    assert names == ["a", "b"]
    assert list(StrictTar(io.BytesIO(make_tar()))) == []  # empty but complete


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[:800],  # cut in a member's data
        lambda data: data[:512],  # only the first header
        lambda data: data[:1536],  # cut right after a member: no end marker
        lambda data: b"garbage!" * 300,
        lambda data: data[:1536] + b"\x7f" * 512 + data[2048:],  # a corrupt header
        lambda data: b"",
    ],
)
def test_strict_tar_rejects_damage(damage: Any) -> None:
    data = make_tar(file("a", "1" * 700), file("b", "2" * 10), file("c"))
    with pytest.raises(ArchiveError):
        tar = StrictTar(io.BytesIO(damage(data)))
        for member in tar:
            for _ in tar.data(member):
                pass


@pytest.mark.parametrize("kind", ["gzip", "xz", "bzip2", "zstd", "none"])
def test_decompression_by_magic(kind: str) -> None:
    data = make_tar(file("hello", "world"))
    if kind == "zstd" and zstandard is None:
        pytest.skip("python zstandard missing (the zstd(1) fallback is used then)")
    packers: dict[str, Any] = {
        "gzip": gzip.compress,
        "xz": lzma.compress,
        "bzip2": bz2.compress,
        "zstd": lambda raw: zstandard.ZstdCompressor().compress(raw),
        "none": lambda raw: raw,
    }
    packed = packers[kind](data)
    assert detect_compression(packed[:8]) == kind
    assert decompressed(io.BytesIO(packed)).read() == data


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("./a/b", "/a/b"),
        ("/abs", "/abs"),
        ("../../x", "/x"),
        ("a/../../b", "/b"),
        (".", "/"),
        ("a//b/", "/a/b"),
    ],
)
def test_normalize_never_climbs_above_root(name: str, expected: str) -> None:
    assert normalize(name) == expected


def test_layers_whiteouts_and_opaque_dirs() -> None:
    lower = make_tar(directory("etc"), file("etc/gone"), file("etc/kept"), directory("opq"))
    lower += b""  # one stream per layer
    lower_opq = make_tar(file("opq/old"), directory("opq/sub"), file("opq/sub/deep"))
    upper = make_tar(
        file("etc/.wh.gone"),
        directory("opq"),
        file("opq/.wh..wh..opq"),
        file("opq/new"),
        file("etc/kept", "changed!"),
    )
    index = index_of(lower, lower_opq, upper)
    paths = {entry.path for entry in index}
    assert "/etc/gone" not in paths and "/etc/.wh.gone" not in paths
    assert {"/opq/new", "/etc/kept"} <= paths
    assert not {"/opq/old", "/opq/sub", "/opq/sub/deep", "/opq/.wh..wh..opq"} & paths
    assert index.get("/etc/kept").size == len("changed!")  # type: ignore[union-attr]


def test_plain_tarballs_keep_wh_files() -> None:
    index = index_of(make_tar(file(".wh.not-a-whiteout")), whiteouts=False)
    assert index.get("/.wh.not-a-whiteout") is not None


def test_lookup_follows_links_inside_the_image() -> None:
    index = index_of(
        make_tar(
            directory("bin"),
            file("bin/busybox", "elf", 0o755),
            symlink("bin/sh", "busybox"),
            symlink("sbin", "bin"),
            symlink("usr", "/"),
            symlink("init", "/usr/sbin/../bin/./sh"),
            symlink("loop-a", "loop-b"),
            symlink("loop-b", "loop-a"),
            symlink("escape", "../../../../bin/sh"),
            file("etc-file", "data", 0o644),
        )
    )
    busybox = index.get("/bin/busybox")
    assert index.lookup("/bin/sh") == busybox
    assert index.lookup("/sbin/sh") == busybox  # a symlinked directory
    assert index.lookup("/init") == busybox  # absolute, through `usr -> /`, with ..
    assert index.lookup("/escape") == busybox  # .. stops at the image's root
    assert index.executable("/init") and not index.executable("/etc-file")
    assert index.lookup("/loop-a") is None and not index.executable("/loop-a")
    assert index.lookup("/etc-file/x") is None  # through a file
    assert index.lookup("/bin").kind == "dir"  # type: ignore[union-attr]


def test_estimate_counts_pages_inodes_and_hardlinks_once() -> None:
    index = index_of(
        make_tar(
            directory("d"),
            file("d/one-byte", "x"),
            file("d/page-and-a-bit", "y" * (PAGE_SIZE + 1)),
            hardlink("d/link", "d/page-and-a-bit"),
            symlink("d/short", "s" * 127),
            symlink("d/long", "l" * 128),
            file("d/empty", ""),
        )
    )
    assert index.estimated_data_bytes == PAGE_SIZE + 2 * PAGE_SIZE + PAGE_SIZE  # + long link
    inodes = 1 + 1 + 3 + 2  # root, d, three files (the link shares one), two symlinks
    assert index.inode_count == inodes
    assert index.estimated_bytes == index.estimated_data_bytes + inodes * INODE_BYTES
    assert index.file_count == 7


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1 << 20),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5G", 3 << 29),
        ("64KiB", 64 << 10),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "-1G", "0", "12X"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(BadInput):
        parse_size(text)


def test_tmpfs_size_has_headroom() -> None:
    assert tmpfs_size_for(0) == 64 << 20
    assert tmpfs_size_for(1 << 30) == (1 << 30) + (1 << 28)
    assert tmpfs_size_for(10**9 + 1) % (1 << 20) == 0
