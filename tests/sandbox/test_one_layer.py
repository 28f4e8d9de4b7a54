"""A one-layer engine image is read straight from its layer directory, without an overlay,
and still gives exactly the tree of `docker export`: every feature of the fidelity tarball
(tests/images.py), and an overlayfs whiteout left in the layer (`docker import` turns a
``.wh.NAME`` entry into a 0/0 character device, which an overlay hides) is no part of it."""

from __future__ import annotations

import os
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.image.sources import EngineSource, open_source
from injector.ramroot.rootfs import RamRoot, tmpfs_size_for
from tests import images

pytestmark = [pytest.mark.root, pytest.mark.engine]

WHITED_OUT = "etc/gone-by-whiteout"


@pytest.fixture(scope="module")
def one_layer_image() -> Iterator[str]:
    tag = images.PREFIX + "fidelity-one-layer:test"
    with tempfile.TemporaryDirectory() as work:
        tar_path = Path(work) / "one-layer.tar"
        images.fidelity_tar(tar_path)
        with tarfile.open(tar_path, "a") as tar:
            parent, name = os.path.split(WHITED_OUT)
            marker = tarfile.TarInfo(f"{parent}/.wh.{name}")
            tar.addfile(marker)
        images.import_tar(tar_path, tag)
    yield tag
    images.remove_image(tag)


@pytest.fixture(scope="module")
def reference(one_layer_image: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return images.export_reference(one_layer_image, tmp_path_factory.mktemp("reference"))


def test_one_layer_copy_equals_docker_export(
    one_layer_image: str, reference: dict[str, Any], tmp_path: Path
) -> None:
    with open_source(one_layer_image, method="overlay") as image:
        assert isinstance(image, EngineSource)
        layers = image.layer_dirs()
        assert layers is not None and len(layers) == 1
        # Not vacuous: the layer really holds the whiteout, and docker export leaves it out.
        whiteout = os.lstat(Path(layers[0]) / WHITED_OUT)
        assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
        assert WHITED_OUT not in reference and "usr/bin/suid" in reference
        index = image.scan()
        with RamRoot(tmp_path / "state", tmpfs_size_for(index.estimated_bytes)) as ram:
            stats = image.copy_into(ram.path, lambda done, total: None)
            copied = images.without_export_artifacts(images.tree_metadata(ram.path))
    assert stats.method == "overlay"
    assert index.get("/" + WHITED_OUT) is None
    assert index.file_count == len(reference)
    assert images.differences(reference, copied) == []
