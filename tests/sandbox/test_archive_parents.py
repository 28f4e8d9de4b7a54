"""Archives that never name a file's parent directories: the RAM root gets those parents as
Docker's own extraction makes them (root-owned, mode 0755), never world-writable.

The reference is `docker export` of the image `docker import`ed from such a tar, extracted
with GNU tar; each source (the engine both ways, `docker-archive:` of a `docker save`, and
`rootfs:` of the tar itself) must give the implied directories the same mode and owner.
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.image.sources import open_source
from injector.ramroot.rootfs import RamRoot, tmpfs_size_for
from tests import images

pytestmark = [pytest.mark.root, pytest.mark.engine]

TAG = images.PREFIX + "parentless:test"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    work = tmp_path_factory.mktemp("parentless")
    tar = work / "parentless.tar"
    images.build_parentless_image(tar, TAG)
    saved = work / "saved.tar"
    images.docker("save", "-o", str(saved), TAG)
    yield {"rootfs": tar, "docker-archive": saved}
    images.remove_image(TAG)


@pytest.fixture(scope="module")
def reference(
    archives: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    tree = tmp_path_factory.mktemp("reference") / "root"
    images.extract_export(TAG, tree)
    metadata = images.tree_metadata(tree)
    images.remove_tree(tree)
    return metadata


def owner_and_mode(tree: dict[str, Any], path: str) -> tuple[int, str, int, int]:
    meta = tree[path]
    return meta["type"], meta["mode"], meta["uid"], meta["gid"]


def test_docker_export_gives_implied_parents_0755_root(reference: dict[str, Any]) -> None:
    """Guard: the reference really is what the fix aims at, and the tar names no parent."""
    for path in images.PARENTLESS_IMPLIED:
        assert owner_and_mode(reference, path) == (stat.S_IFDIR, "0o755", 0, 0), path
    assert owner_and_mode(reference, "var/lib/explicit") == (stat.S_IFDIR, "0o700", 1000, 1000)
    named = {name for name, *_ in images.PARENTLESS_ENTRIES}
    assert not named & set(images.PARENTLESS_IMPLIED)


@pytest.mark.parametrize(
    ("source", "method"),
    [
        ("engine", "overlay"),
        ("engine", "stream"),
        ("docker-archive", "auto"),
        ("rootfs", "auto"),
    ],
)
def test_implied_parents_match_docker_export(
    source: str,
    method: str,
    archives: dict[str, Path],
    reference: dict[str, Any],
    tmp_path: Path,
) -> None:
    ref = TAG if source == "engine" else f"{source}:{archives[source]}"
    with open_source(ref, method=method) as image:
        index = image.scan()
        with RamRoot(tmp_path / "state", tmpfs_size_for(index.estimated_bytes)) as ram:
            image.copy_into(ram.path, lambda done, total: None)
            copied = images.tree_metadata(ram.path)
    named = [name for name, *_ in images.PARENTLESS_ENTRIES]
    for path in [*images.PARENTLESS_IMPLIED, *named]:
        assert owner_and_mode(copied, path) == owner_and_mode(reference, path), path
    world_writable = [
        path
        for path, meta in copied.items()
        if stat.S_ISDIR(meta["type"]) and int(meta["mode"], 8) & 0o002
    ]
    assert world_writable == []
