"""Whether an init can run here, from its first bytes: ELF headers of every class and byte
order, PT_INTERP, #! lines, and the verdict over a real ImageIndex. The headers are
assembled with struct, as the kernel lays them out; tests/sandbox/test_preflight_image.py
runs the same checks on real binaries (Debian's arm64 busybox, the host's /bin/true)."""

from __future__ import annotations

import io
import struct
import tarfile
from pathlib import Path
from typing import Any

import pytest

from injector.image.imageindex import ImageIndex, IndexEntry
from injector.image.sources import RootfsSource
from injector.preflight import execcheck
from injector.preflight.execcheck import Executable, judge_architecture, judge_init, parse_head

EM_X86_64, EM_AARCH64, EM_386, EM_PPC64 = 62, 183, 3, 21
LOADER = "/lib64/ld-linux-x86-64.so.2"
LD32, LD_ARM, LD_PPC = "/lib/ld-linux.so.2", "/lib/ld-linux-aarch64.so.1", "/lib64/ld64.so.1"


def elf(machine: int, *, wide: bool = True, big: bool = False, interp: str | None = None) -> bytes:
    """An ELF header with one program header (PT_INTERP when ``interp``), then the string."""
    order = ">" if big else "<"
    ehsize, phentsize = (64, 56) if wide else (52, 32)
    ident = b"\x7fELF" + bytes([2 if wide else 1, 2 if big else 1, 1]) + bytes(9)
    phnum = 1
    fields = (2, machine, 1, 0x1000, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0)
    header = ident + struct.pack(order + ("HHIQQQIHHHHHH" if wide else "HHIIIIIHHHHHH"), *fields)
    data = (interp or "").encode() + b"\0"
    offset = ehsize + phentsize
    p_type = 3 if interp else 1  # PT_INTERP or PT_LOAD
    if wide:
        phdr = struct.pack(order + "IIQQQQQQ", p_type, 4, offset, 0, 0, len(data), len(data), 1)
    else:
        phdr = struct.pack(order + "IIIIIIII", p_type, offset, 0, 0, len(data), len(data), 4, 1)
    return header + phdr + data


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (elf(EM_X86_64), Executable("elf", 2, EM_X86_64)),
        (elf(EM_X86_64, interp=LOADER), Executable("elf", 2, EM_X86_64, LOADER)),
        (elf(EM_386, wide=False, interp=LD32), Executable("elf", 1, EM_386, LD32)),
        (elf(EM_AARCH64, interp=LD_ARM), Executable("elf", 2, EM_AARCH64, LD_ARM)),
        (elf(EM_PPC64, big=True, interp=LD_PPC), Executable("elf", 2, EM_PPC64, LD_PPC)),
        (b"#!/bin/sh\necho hi\n", Executable("script", interpreter="/bin/sh")),
        (b"#! /usr/bin/env  python3 -u\n", Executable("script", interpreter="/usr/bin/env")),
        (b"#!\t/usr/bin/perl\t-w\n", Executable("script", interpreter="/usr/bin/perl")),
        (b"#!\n", Executable("script", interpreter="")),
        (b"#!/bin/sh", Executable("script", interpreter="/bin/sh")),  # no newline
        (b"", Executable("other")),
        (b"MZ\x90\x00", Executable("other")),  # a PE file
        (b"\x7fELF\x02\x01", Executable("other")),  # truncated header
        (elf(EM_X86_64)[:40], Executable("other")),
    ],
)  # fmt: skip
def test_parse_head(head: bytes, expected: Executable) -> None:
    assert parse_head(head) == expected


def test_an_interp_past_the_bytes_read_is_unknown_not_absent() -> None:
    head = elf(EM_X86_64, interp=LOADER)
    assert parse_head(head[: len(head) - 10]).interp_unknown
    assert parse_head(head[:70]).interp_unknown  # inside the program header itself


def test_names() -> None:
    assert parse_head(elf(EM_AARCH64)).machine_name == "64-bit aarch64"
    assert parse_head(elf(EM_386, wide=False)).machine_name == "32-bit i386"
    assert parse_head(elf(999)).machine_name == "64-bit machine 999"


# --- The verdict over a real index -----------------------------------------------------------


def index_of(entries: dict[str, str]) -> ImageIndex:
    """``"x"`` an executable file, ``"f"`` a plain one, ``"d"`` a directory, ``"-> T"`` a
    symlink. Parent directories are implied."""
    made: dict[str, IndexEntry] = {}
    for number, (path, kind) in enumerate(sorted(entries.items()), start=1):
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            parent = "/" + "/".join(parts[:depth])
            made.setdefault(parent, IndexEntry(parent, "dir", 0o755, 0, 0, 0, 0, None, -depth))
        if kind.startswith("-> "):
            entry = IndexEntry(path, "symlink", 0o777, 0, 0, 0, 0, kind[3:], number)
        elif kind == "d":
            entry = IndexEntry(path, "dir", 0o755, 0, 0, 0, 0, None, number)
        else:
            mode = 0o755 if kind == "x" else 0o644
            entry = IndexEntry(path, "file", mode, 0, 0, 100, 0, None, number)
        made[path] = entry
    return ImageIndex(made.values())


def verdict(
    entries: dict[str, str],
    heads: dict[str, bytes],
    init: str = "/sbin/init",
    kernel: str = "x86_64",
) -> list[tuple[str, str, str]]:
    read: list[str] = []

    def reader(path: str) -> bytes | None:
        read.append(path)
        return heads.get(path)

    notices = judge_init(index_of(entries), "/sbin/init", reader, kernel)
    assert all(path in heads or path == read[-1] for path in read)
    return [(n.level, n.code, n.message) for n in notices]


GOOD = elf(EM_X86_64, interp=LOADER)


def test_a_runnable_dynamic_init() -> None:
    entries = {"/sbin/init": "-> ../lib/systemd/systemd", "/lib/systemd/systemd": "x", LOADER: "x"}
    assert verdict(entries, {"/lib/systemd/systemd": GOOD}) == []


def test_the_loader_is_resolved_inside_the_image() -> None:
    # merged /usr: /lib64 -> usr/lib64, the loader there; a dangling link is missing.
    entries = {
        "/sbin/init": "x",
        "/lib64": "-> usr/lib64",
        "/usr/lib64/ld-linux-x86-64.so.2": "-> /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": "x",
    }
    assert verdict(entries, {"/sbin/init": GOOD}) == []
    del entries["/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"]
    [(level, code, message)] = verdict(entries, {"/sbin/init": GOOD})
    assert (level, code) == ("blocker", "init-loader-missing")
    assert f"loader {LOADER} is missing from the image" in message
    entries["/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"] = "f"  # no x bit: open_exec refuses
    [(_, code, message)] = verdict(entries, {"/sbin/init": GOOD})
    assert code == "init-loader-missing" and "not executable in the image" in message


@pytest.mark.parametrize(
    ("kernel", "machine", "wide", "runs"),
    [
        ("x86_64", EM_X86_64, True, True),
        ("x86_64", EM_386, False, True),  # IA-32 emulation
        ("x86_64", EM_AARCH64, True, False),
        ("aarch64", EM_AARCH64, True, True),
        ("aarch64", EM_X86_64, True, False),
        ("riscv64", EM_X86_64, True, False),
    ],
)
def test_elf_machine_against_the_kernel(kernel: str, machine: int, wide: bool, runs: bool) -> None:
    found = verdict({"/sbin/init": "x"}, {"/sbin/init": elf(machine, wide=wide)}, kernel=kernel)
    if runs:
        assert found == []
    else:
        [(level, code, message)] = found
        assert (level, code) == ("blocker", "init-foreign-arch")
        assert f"this kernel is {kernel}" in message


def test_scripts_are_followed_to_their_interpreter() -> None:
    entries = {"/sbin/init": "x", "/bin/sh": "-> busybox", "/bin/busybox": "x"}
    heads = {"/sbin/init": b"#!/bin/sh\n", "/bin/busybox": elf(EM_X86_64)}
    assert verdict(entries, heads) == []
    # The interpreter is an arm64 binary: the script cannot run either.
    heads["/bin/busybox"] = elf(EM_AARCH64)
    [(_, code, message)] = verdict(entries, heads)
    assert code == "init-foreign-arch"
    assert message.startswith("init /sbin/init (a script for /bin/sh) is a 64-bit aarch64")


def test_a_missing_or_unusable_interpreter() -> None:
    heads = {"/sbin/init": b"#!/usr/bin/perl -w\n"}
    [(_, code, message)] = verdict({"/sbin/init": "x"}, heads)
    assert code == "init-interpreter-missing"
    assert message == "init /sbin/init is a script for /usr/bin/perl, which the image lacks"
    [(_, code, message)] = verdict({"/sbin/init": "x", "/usr/bin/perl": "f"}, heads)
    assert message.endswith("which is not an executable file in the image")
    [(_, code, message)] = verdict({"/sbin/init": "x"}, {"/sbin/init": b"#!\n"})
    assert code == "init-interpreter-missing" and "names no interpreter" in message


def test_an_interpreter_loop_stops() -> None:
    entries = {"/sbin/init": "x", "/sbin/a": "x"}
    heads = {"/sbin/init": b"#!/sbin/a\n", "/sbin/a": b"#!/sbin/init\n"}
    [(_, code, _message)] = verdict(entries, heads)
    assert code == "init-interpreter-loop"


def test_neither_elf_nor_script_and_unreadable() -> None:
    [(_, code, _m)] = verdict({"/sbin/init": "x"}, {"/sbin/init": b"just text\n"})
    assert code == "init-not-executable"
    [(level, code, _m)] = verdict({"/sbin/init": "x"}, {})
    assert (level, code) == ("warning", "init-unverified")


@pytest.mark.parametrize(
    ("image", "kernel", "blocked"),
    [
        ("amd64", "x86_64", False),
        ("386", "x86_64", False),
        ("arm64", "x86_64", True),
        ("amd64", "aarch64", True),
        ("arm64", "aarch64", False),
        ("", "x86_64", False),  # a rootfs tarball declares nothing: the init decides
        ("mips64le", "x86_64", False),  # unknown names are not guessed at
    ],
)
def test_image_architecture(image: str, kernel: str, blocked: bool) -> None:
    notices = judge_architecture(image, kernel)
    assert bool(notices) is blocked
    if blocked:
        assert notices[0].level == "blocker" and notices[0].code == "image-foreign-arch"


def test_layer_reads_follow_no_symlink(tmp_path: Path) -> None:
    """Reading an overlay2 layer from the host: a layer's symlink must not lead the read
    onto the host's own files."""
    secret = tmp_path / "host-file"
    secret.write_bytes(b"\x7fELF host data")
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (upper / "sbin").mkdir(parents=True)
    (upper / "sbin" / "init").symlink_to(secret)  # absolute: only the image may resolve it
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "init").write_bytes(b"#!/bin/sh\n")
    (upper / "lib").symlink_to(tmp_path)
    layers = [str(upper), str(lower)]
    assert execcheck._head_from_layers(layers, "/sbin/init") is None
    assert execcheck._head_from_layers(layers, "/lib/host-file") is None
    assert execcheck._head_from_layers(layers, "/etc/init") == b"#!/bin/sh\n"


class VanishedArchive:
    """A rootfs source whose archive is gone by the time its file is read."""

    kind = "rootfs"

    def _stream(self) -> object:
        raise FileNotFoundError(2, "No such file or directory", "/tmp/gone.tar")


def test_an_unreadable_source_leaves_the_init_unverified_not_a_crash() -> None:
    index = index_of({"/sbin/init": "x"})
    reader = execcheck.head_reader(VanishedArchive(), index)
    assert reader("/sbin/init") is None
    [notice] = judge_init(index, "/sbin/init", reader, "x86_64")
    assert (notice.level, notice.code) == ("warning", "init-unverified")


def test_an_archive_is_read_once_for_a_script_and_its_interpreter(tmp_path: Path) -> None:
    """A rootfs tarball whose init is a script for /bin/sh, a hardlink to a static busybox
    that comes first in the tar under another name: one pass reads both heads."""
    archive = tmp_path / "root.tar"
    busybox = elf(EM_X86_64)
    with tarfile.open(archive, "w") as tar:
        for name, kind, data in (
            ("bin", tarfile.DIRTYPE, b""),
            ("bin/busybox", tarfile.REGTYPE, busybox),
            ("bin/sh", tarfile.LNKTYPE, b""),
            ("sbin", tarfile.DIRTYPE, b""),
            ("sbin/init", tarfile.REGTYPE, b"#!/bin/sh\nexec sh\n"),
            ("sbin/init-perl", tarfile.REGTYPE, b"#!/opt/perl/bin/perl\n"),
            ("opt/perl/bin/perl", tarfile.REGTYPE, elf(EM_AARCH64)),
        ):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.size = kind, 0o755, len(data)
            if kind == tarfile.LNKTYPE:
                info.linkname = "bin/busybox"
            tar.addfile(info, io.BytesIO(data) if data else None)
    source = RootfsSource(f"rootfs:{archive}", archive)
    index = source.scan()
    passes = []
    stream = source._stream

    def counted() -> Any:
        passes.append(1)
        return stream()

    source._stream = counted  # type: ignore[method-assign]
    reader = execcheck.head_reader(source, index)
    assert judge_init(index, "/sbin/init", reader, "x86_64") == []
    assert len(passes) == 1  # /bin/sh's head came with the init's
    # An interpreter outside the usual directories costs one more pass, and is judged.
    [notice] = judge_init(index, "/sbin/init-perl", reader, "x86_64")
    assert notice.code == "init-foreign-arch" and len(passes) == 2
