"""Hostile archives cannot create or change anything outside the RAM root.

Each archive aims at a "host" file we make in tmp_path (a stand-in for /etc/passwd) or at
a directory next to the root. After the copy the victim must be untouched (content, mtime,
link count) and nothing outside the root may have appeared or changed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from injector.errors import BadInput
from injector.image.sources import open_source
from injector.ramroot.rootfs import RamRoot

pytestmark = pytest.mark.root

VICTIM_TEXT = b"root:x:0:0:the host's own file:/root:/bin/sh\n"
VICTIM_MTIME = 1_234_567_890


class Host:
    """The stand-in host: a victim file and a directory outside the root."""

    def __init__(self, tmp_path: Path) -> None:
        self.base = tmp_path
        self.victim = tmp_path / "host-etc" / "passwd"
        self.victim.parent.mkdir()
        self.victim.write_bytes(VICTIM_TEXT)
        os.utime(self.victim, (VICTIM_MTIME, VICTIM_MTIME))
        self.outside = tmp_path / "outside"
        self.outside.mkdir()
        self.state = tmp_path / "state"

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Every path under tmp_path except the root's contents: (mode, size, mtime_ns)."""
        seen = {}
        root = self.state / "root"
        for directory, subdirs, files in os.walk(self.base):
            if Path(directory) == root:
                subdirs.clear()
                continue
            for name in subdirs + files:
                path = os.path.join(directory, name)
                if Path(path) != root:  # the root itself changes, of course
                    st = os.lstat(path)
                    seen[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
        return seen

    def assert_victim_untouched(self) -> None:
        st = os.stat(self.victim)
        assert self.victim.read_bytes() == VICTIM_TEXT
        assert st.st_mtime == VICTIM_MTIME and st.st_nlink == 1


def member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, 0o644, 1_700_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def write_tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    # tarfile writes names as given: "../x" and "/abs" stay hostile.
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.size else None)
    return path


def copy_archive(host: Host, ref: str, check: Callable[[Path], object] = lambda root: None) -> None:
    """Copy ``ref`` into a RAM root, assert nothing outside changed, run ``check(root)``."""
    with open_source(ref) as image, RamRoot(host.state, 64 << 20) as ram:
        before = host.snapshot()
        try:
            image.copy_into(ram.path, lambda done, total: None)
        finally:
            assert host.snapshot() == before, "something outside the root changed"
            host.assert_victim_untouched()
        check(ram.path)


Case = Callable[[Host], list[tuple[tarfile.TarInfo, bytes]]]

CASES: dict[str, tuple[Case, Callable[[Host, Path], bool]]] = {
    "dotdot names": (
        lambda h: [member("../../../escape", data=b"x"), member("a/../../b/../../c", data=b"y")],
        lambda h, root: (root / "escape").is_file() and (root / "c").is_file(),
    ),
    "absolute name of the host file": (
        lambda h: [member(str(h.victim), data=b"pwned\n")],
        lambda h, root: (root / str(h.victim).lstrip("/")).read_bytes() == b"pwned\n",
    ),
    "absolute symlink out, then a file under it": (
        lambda h: [
            member(str(h.outside), tarfile.DIRTYPE),  # so that the symlink leads somewhere
            member("evil", tarfile.SYMTYPE, link=str(h.outside)),
            member("evil/planted", data=b"x"),
        ],
        lambda h, root: (
            os.readlink(root / "evil") == str(h.outside)  # kept as the image has it
            and (root / str(h.outside).lstrip("/") / "planted").is_file()
        ),
    ),
    "relative symlink climbing out, then a file under it": (
        lambda h: [
            member("up", tarfile.SYMTYPE, link="../" * 30),
            member(f"up{h.outside}/planted", data=b"x"),
        ],
        lambda h, root: (root / str(h.outside).lstrip("/") / "planted").is_file(),
    ),
    "symlink onto the host file, then a write to it": (
        lambda h: [
            member("etc", tarfile.DIRTYPE),
            member("etc/passwd", tarfile.SYMTYPE, link=str(h.victim)),
            member("etc/passwd", data=b"pwned\n"),
        ],
        lambda h, root: (root / "etc/passwd").read_bytes() == b"pwned\n",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_hostile_rootfs_stays_inside(case: str, tmp_path: Path) -> None:
    host = Host(tmp_path)
    build, check = CASES[case]
    archive = write_tar(tmp_path / "hostile.tar", build(host))

    def run_check(root: Path) -> None:
        assert check(host, root), f"{case}: the entries did not land inside the root"

    copy_archive(host, f"rootfs:{archive}", run_check)


def test_dangling_symlink_out_then_a_file_under_it_is_refused(tmp_path: Path) -> None:
    host = Host(tmp_path)
    archive = write_tar(
        tmp_path / "hostile.tar",
        [
            member("evil", tarfile.SYMTYPE, link=str(host.outside)),
            member("evil/planted", data=b"x"),
        ],
    )
    # Inside the root the symlink dangles; GNU tar fails here too. Outside: nothing.
    with pytest.raises(BadInput, match="not a directory"):
        copy_archive(host, f"rootfs:{archive}")
    assert not (host.outside / "planted").exists()


@pytest.mark.parametrize("link", ["absolute", "relative"])
def test_hardlink_to_a_host_file_is_refused(link: str, tmp_path: Path) -> None:
    host = Host(tmp_path)
    target = str(host.victim) if link == "absolute" else "../" * 30 + str(host.victim).lstrip("/")
    archive = write_tar(
        tmp_path / "hostile.tar",
        [member("stolen", tarfile.LNKTYPE, link=target), member("stolen", data=b"pwned\n")],
    )
    # Inside the chroot the link target does not exist: one clear line, nothing touched.
    with pytest.raises(BadInput, match="hardlink") as raised:
        copy_archive(host, f"rootfs:{archive}")
    assert "\n" not in str(raised.value)
    assert not (host.state / "root").exists()


def test_hostile_docker_archive_whiteout_cannot_delete_host_files(tmp_path: Path) -> None:
    """A layer whose whiteout climbs out (`../.wh.passwd`) removes only inside the root."""
    host = Host(tmp_path)
    layer_one = write_tar(tmp_path / "one.tar", [member("keep", data=b"x")])
    relative_victim = "../" * 30 + str(host.victim.parent).lstrip("/") + "/.wh.passwd"
    layer_two = write_tar(
        tmp_path / "two.tar",
        [member(relative_victim, data=b""), member("../../escape", data=b"y")],
    )
    archive = tmp_path / "saved.tar"
    config = json.dumps({"architecture": "amd64", "config": {}}).encode()
    manifest = json.dumps(
        [{"Config": "config.json", "RepoTags": ["x:y"], "Layers": ["1/layer.tar", "2/layer.tar"]}]
    ).encode()
    with tarfile.open(archive, "w") as tar:
        for name, data in [
            ("1/layer.tar", layer_one.read_bytes()),
            ("2/layer.tar", layer_two.read_bytes()),
            ("config.json", config),
            ("manifest.json", manifest),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def check(root: Path) -> None:
        assert (root / "keep").is_file() and (root / "escape").is_file()

    copy_archive(host, f"docker-archive:{archive}", check)
