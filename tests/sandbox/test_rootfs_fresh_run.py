"""The copy leaves out what an image ships under /run (issue 21 §1), whichever way it is made.

/run is runtime state: a booting system starts with it empty, and what an image has there is
stale, or worse: a /run/dboot/keep would call off the revert timer before anyone logged in.
The RAM root keeps /run itself, with the image's owner, mode and mtime, and nothing in it; a
hardlink elsewhere to a file that was in it keeps its data; a /var/run link stays as it is.
"""

from __future__ import annotations

import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from initstage.plan import KEEP_FILE
from injector.image.sources import open_source
from injector.ramroot.rootfs import RamRoot
from tests import images
from tests.sandbox.test_rootfs_hostile import member, write_tar

pytestmark = pytest.mark.root

RUN_MODE, RUN_GID = 0o710, 12  # not the 0755 root:root a made-up directory would get
MTIME = 1_700_000_000  # member()'s


def directory(name: str, mode: int = 0o755, gid: int = 0) -> tuple[tarfile.TarInfo, bytes]:
    info, data = member(name, tarfile.DIRTYPE)
    info.mode, info.gid = mode, gid
    return info, data


def image_tar(path: Path) -> Path:
    return write_tar(
        path,
        [
            directory("run", RUN_MODE, RUN_GID),
            directory("run/dboot"),
            member(KEEP_FILE.lstrip("/")),
            directory("run/lock", 0o1777),
            member("run/stale.pid", data=b"42\n"),
            directory("data"),
            member("data/also-stale", tarfile.LNKTYPE, link="run/stale.pid"),
            directory("var"),
            member("var/run", tarfile.SYMTYPE, link="/run"),
        ],
    )


@pytest.fixture(scope="module")
def tarball(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return image_tar(tmp_path_factory.mktemp("fresh-run") / "root.tar")


@pytest.fixture(scope="module")
def engine_image(tarball: Path) -> Iterator[str]:
    tag = images.import_tar(tarball, images.PREFIX + "fresh-run:test")
    yield tag
    images.remove_image(tag)


@pytest.mark.parametrize(
    ("source", "method", "expected_method"),
    [("rootfs", "auto", "tar"), ("engine", "overlay", "overlay"), ("engine", "stream", "tar")],
    ids=["rootfs-tar", "engine-overlay", "engine-stream"],
)
@pytest.mark.engine
def test_the_copy_keeps_an_empty_run_with_the_images_mode(
    source: str,
    method: str,
    expected_method: str,
    tarball: Path,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    ref = f"rootfs:{tarball}" if source == "rootfs" else request.getfixturevalue("engine_image")
    with open_source(ref, method=method) as image:
        assert image.scan().get(KEEP_FILE) is not None, "the image ships no keep file"
        with RamRoot(tmp_path / "state", 16 << 20) as ram:
            stats = image.copy_into(ram.path, lambda done, total: None)
            run = ram.path / "run"
            found = run.lstat()
            assert stats.method == expected_method
            assert stat.S_ISDIR(found.st_mode) and list(run.iterdir()) == []
            assert (stat.S_IMODE(found.st_mode), found.st_uid, found.st_gid) == (
                RUN_MODE,
                0,
                RUN_GID,
            )
            assert found.st_mtime_ns == MTIME * 10**9
            assert (ram.path / "data" / "also-stale").read_bytes() == b"42\n"
            assert os.readlink(ram.path / "var" / "run") == "/run"
