"""The RAM root: explicit size, mode 0700 state dir, nothing left behind on failure or
Ctrl-C, and a RAM estimate within 10% of what the tmpfs really holds."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from injector.errors import EnvironmentFailure
from injector.image.sources import open_source
from injector.ramroot.rootfs import RamRoot, tmpfs_size_for
from tests import images

pytestmark = pytest.mark.root


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as table:
        return any(line.split()[4] == str(path) for line in table)


def our_workers() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


@pytest.fixture(scope="module")
def debian_image() -> Iterator[str]:
    tag = images.build_debian_image(images.PREFIX + "debian-minbase:test")
    yield tag
    images.remove_image(tag)


def test_mount_size_mode_and_cleanup(tmp_path: Path) -> None:
    state = tmp_path / "run" / "dboot"
    with RamRoot(state, 32 << 20) as ram:
        assert mounted(ram.path)
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(ram.path).st_mode) == 0o755
        usage = os.statvfs(ram.path)
        assert usage.f_blocks * usage.f_frsize == 32 << 20  # explicit, not half the RAM
    assert not mounted(state / "root")
    assert not (tmp_path / "run").exists()  # every directory it made is gone


def test_keep_leaves_it_mounted(tmp_path: Path) -> None:
    ram = RamRoot(tmp_path / "state", 8 << 20)
    try:
        with ram:
            ram.keep()
        assert mounted(ram.path)
    finally:
        ram.unmount()
    assert not mounted(ram.path) and not (tmp_path / "state").exists()


def test_refuses_a_mounted_root(tmp_path: Path) -> None:
    with RamRoot(tmp_path / "state", 8 << 20) as ram:
        with pytest.raises(EnvironmentFailure, match="already a mount point"):
            RamRoot(tmp_path / "state", 8 << 20).mount()
        assert mounted(ram.path)  # the failed second mount did not undo the first


class Boom(Exception):
    pass


@pytest.mark.engine
@pytest.mark.parametrize(
    ("method", "interrupt"),
    [("overlay", Boom), ("stream", KeyboardInterrupt)],
)
def test_failure_mid_copy_leaves_nothing(
    method: str, interrupt: type[BaseException], debian_image: str, tmp_path: Path
) -> None:
    """A failure (or Ctrl-C) in the middle of the copy: no mount, no directories, no
    worker process, no temporary container."""
    state = tmp_path / "state"
    calls: list[int] = []

    def progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 2:
            assert 0 < done < total  # really in the middle
            raise interrupt()

    containers_before = images.docker("ps", "-aq", "--filter", "label=dboot.temporary").stdout
    with pytest.raises(interrupt), open_source(debian_image, method=method) as image:
        index = image.scan()
        with RamRoot(state, tmpfs_size_for(index.estimated_bytes)) as ram:
            image.copy_into(ram.path, progress)
    assert len(calls) == 2
    assert not mounted(state / "root")
    assert not state.exists()
    assert our_workers() == []
    assert (
        images.docker("ps", "-aq", "--filter", "label=dboot.temporary").stdout == containers_before
    )


@pytest.mark.engine
@pytest.mark.parametrize("image_name", ["tinybox", "debian"])
def test_estimate_within_ten_percent(
    image_name: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    tag = "tinybox:latest" if image_name == "tinybox" else request.getfixturevalue("debian_image")
    with open_source(tag) as image:
        index = image.scan()
        with RamRoot(tmp_path / "state", tmpfs_size_for(index.estimated_bytes)) as ram:
            image.copy_into(ram.path, lambda done, total: None)
            used, data = ram.used_bytes(), ram.data_bytes()
    # The full estimate against data pages + the kernel's per-inode charge ...
    assert abs(index.estimated_bytes - used) <= 0.10 * used, (index.estimated_bytes, used)
    # ... and the data part alone against what df shows.
    assert abs(index.estimated_data_bytes - data) <= 0.10 * data, (index.estimated_data_bytes, data)
    assert tmpfs_size_for(index.estimated_bytes) > data
