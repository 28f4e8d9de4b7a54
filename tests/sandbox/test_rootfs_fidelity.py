"""The RAM root equals GNU tar's extraction of `docker export`, whichever way it is made.

The image (tests/images.py) has setuid/setgid/sticky modes, numeric owners, hardlinks,
symlinks of every sort, devices, a fifo, security.capability, sub-second mtimes, empty
dirs and odd names (newline, non-UTF-8, 200 bytes long...), plus a second layer with a
whiteout, an opaque directory and a new hardlink. The reference is
`docker export | tar --xattrs --xattrs-include='*' --numeric-owner -xpf -`.

Accounted for explicitly (tests.images.EXPORT_ARTIFACTS): what the container's init layer
adds to `docker export` (/.dockerenv, /etc/{hostname,hosts,resolv.conf,mtab}, /dev/console,
/dev/pts, /dev/shm, /proc, /sys) is not part of the image and is left out of both sides;
/dev and /etc are compared by type only, since the init layer owns their mode and mtime.
"""

from __future__ import annotations

import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.image.sources import open_source
from injector.ramroot.rootfs import RamRoot, tmpfs_size_for
from tests import images

pytestmark = [pytest.mark.root, pytest.mark.engine]


@pytest.fixture(scope="module")
def fidelity_image() -> Iterator[str]:
    tag = images.build_fidelity_image(images.PREFIX + "fidelity:test")
    yield tag
    images.remove_image(tag)


@pytest.fixture(scope="module")
def reference(fidelity_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return images.export_reference(fidelity_image, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def archives(fidelity_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("archives")
    saved = work / "saved.tar"
    images.docker("save", "-o", str(saved), fidelity_image)
    exported = images.export_tar(fidelity_image, work / "exported.tar")
    subprocess.run(["zstd", "-q", "--rm", str(exported)], check=True)
    return {"docker-archive": saved, "rootfs": work / "exported.tar.zst"}


def test_reference_has_every_feature(reference: dict[str, Any]) -> None:
    """Guard against a vacuous comparison: the image really has what we claim."""
    modes = {path: int(meta["mode"], 8) for path, meta in reference.items() if "mode" in meta}
    assert modes["usr/bin/suid"] == 0o4755 and modes["usr/bin/sgid"] == 0o2711
    assert modes["tmp"] == 0o1777 and modes["sgid-dir"] == 0o2775
    assert reference["data/owned"]["uid"] == 1234 and reference["data/owned"]["gid"] == 5678
    assert reference["data/a"]["links"] == ["data/a", "data/b", "data/c"]
    assert reference["opaque-me/new"]["links"] == ["opaque-me/new", "opaque-me/new-link"]
    assert stat.S_ISCHR(reference["dev/null"]["type"]) and reference["dev/sda"]["rdev"] == (8, 0)
    assert stat.S_ISFIFO(reference["data/fifo"]["type"])
    assert reference["usr/bin/env"]["target"] == "/bin/busybox"
    assert reference["empty-dir"]["type"] == stat.S_IFDIR
    assert {f"odd/{name}" for name in images.ODD_NAMES} <= reference.keys()
    # The second layer: a whiteout and an opaque directory.
    assert "etc/removed-file" not in reference and "opaque-me/old-file" not in reference
    assert "opaque-me/sub" not in reference
    # docker export keeps only security.capability, in whole seconds. (The capability on
    # usr/bin/ping is gone because dockerd's chown of its hardlink entry clears it.)
    assert reference["data/user-xattr"]["xattrs"] == {}
    assert reference["data/fraction"]["mtime_ns"] == 1_600_000_000 * 10**9
    assert reference["usr/bin/arping"]["xattrs"] == {"security.capability": images.CAP_NET_RAW_EP}


@pytest.mark.parametrize(
    ("source", "method", "expected_method"),
    [
        ("engine", "overlay", "overlay"),
        ("engine", "stream", "tar"),
        ("docker-archive", "auto", "tar"),
        ("rootfs", "auto", "tar"),
    ],
)
def test_copy_equals_docker_export(
    source: str,
    method: str,
    expected_method: str,
    fidelity_image: str,
    reference: dict[str, Any],
    archives: dict[str, Path],
    tmp_path: Path,
) -> None:
    ref = fidelity_image if source == "engine" else f"{source}:{archives[source]}"
    with open_source(ref, method=method) as image:
        index = image.scan()
        with RamRoot(tmp_path / "state", tmpfs_size_for(index.estimated_bytes)) as ram:
            stats = image.copy_into(ram.path, lambda done, total: None)
            copied = images.without_export_artifacts(images.tree_metadata(ram.path))
    assert stats.method == expected_method
    assert images.differences(reference, copied) == []
