"""Image sources against the real engine: listing, details, bad input, progress, and the
temporary containers that must never outlive a call."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.api.client
import pytest

from injector.errors import BadInput, DbootError, EnvironmentFailure
from injector.image.sources import list_images, open_source
from injector.ramroot.rootfs import RamRoot, tmpfs_size_for
from tests import images

pytestmark = [pytest.mark.root, pytest.mark.engine]

DOWN = "unix:///nonexistent/dboot-test/docker.sock"


def one_line(error: DbootError) -> str:
    text = str(error)
    assert "\n" not in text and text
    return text


@pytest.fixture(scope="module")
def tinybox_archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("tinybox")
    saved = work / "saved.tar"
    images.docker("save", "-o", str(saved), "tinybox:latest")
    exported = images.export_tar("tinybox:latest", work / "exported.tar")
    return {"saved": saved, "exported": exported}


def test_list_images_is_one_engine_call(monkeypatch: pytest.MonkeyPatch) -> None:
    urls: list[str] = []
    real_get = getattr(docker.api.client.APIClient, "_get")  # noqa: B009 - private on purpose

    def counting_get(self: Any, url: str, *args: Any, **kwargs: Any) -> Any:
        urls.append(url)
        return real_get(self, url, *args, **kwargs)

    monkeypatch.setattr(docker.api.client.APIClient, "_get", counting_get)
    summaries = list_images()
    assert [url for url in urls if "/images/" in url] == [urls[-1]]  # one request, the list
    assert urls[-1].endswith("/images/json")
    tinybox = [s for s in summaries if (s.repository, s.tag) == ("tinybox", "latest")]
    assert len(tinybox) == 1
    assert tinybox[0].id.startswith("sha256:") and len(tinybox[0].id) == 71
    assert tinybox[0].created.endswith("Z") and tinybox[0].size > 1_000_000


@pytest.mark.parametrize("how", ["argument", "DOCKER_HOST"])
def test_engine_down_is_one_line(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if how == "DOCKER_HOST":
        monkeypatch.setenv("DOCKER_HOST", DOWN)
    with pytest.raises(EnvironmentFailure) as raised:
        list_images(DOWN if how == "argument" else None)
    assert DOWN in one_line(raised.value)
    with pytest.raises(EnvironmentFailure):
        open_source("tinybox", DOWN if how == "argument" else None)


def test_unknown_image_is_bad_input() -> None:
    with pytest.raises(BadInput) as raised:
        open_source("dboot-test/no-such-image:never")
    assert "no-such-image" in one_line(raised.value)


def test_details_of_an_engine_image_and_an_archive(tinybox_archives: dict[str, Path]) -> None:
    with open_source("tinybox") as image:
        details = image.details()
    assert details.tags == ["tinybox:latest"] and details.cmd == ["/bin/sh"]
    assert details.architecture and details.id.startswith("sha256:") and details.history
    with open_source(f"docker-archive:{tinybox_archives['saved']}") as archive:
        saved = archive.details()
    assert saved.id == details.id  # the config digest is the image id
    assert saved.cmd == ["/bin/sh"] and saved.tags == ["tinybox:latest"]


def test_image_without_cmd_streams_through_a_temporary_container(tmp_path: Path) -> None:
    tag = images.PREFIX + "no-cmd:test"
    tarball = tmp_path / "tiny.tar"
    subprocess.run(["tar", "-C", "/bin", "-cf", str(tarball), "busybox"], check=True)
    images.import_tar(tarball, tag)
    try:
        with open_source(tag, method="stream") as image:
            assert image.details().cmd is None and image.details().entrypoint is None
            index = image.scan()
            assert index.executable("/busybox")
            assert index.get("/.dockerenv") is None  # the container marker is dropped
            with RamRoot(tmp_path / "state", tmpfs_size_for(index.estimated_bytes)) as ram:
                stats = image.copy_into(ram.path, lambda done, total: None)
                assert (ram.path / "busybox").stat().st_size == Path("/bin/busybox").stat().st_size
                assert not (ram.path / ".dockerenv").exists()
        assert stats.method == "tar"
        leftover = images.docker("ps", "-aq", "--filter", "label=dboot.temporary").stdout
        assert leftover == b""
    finally:
        images.remove_image(tag)


def test_index_resolves_symlinks_inside_the_image() -> None:
    with open_source("tinybox") as image:
        index = image.scan()
    assert index.lookup("/bin/sh") == index.get("/bin/busybox")  # relative applet link
    assert index.executable("/bin/sh") and index.executable("/sbin/init")
    assert not index.executable("/etc/passwd") and index.lookup("/etc/passwd") is not None
    assert index.lookup("/no/such") is None and not index.executable("/bin")


def test_progress_is_regular(tmp_path: Path) -> None:
    tag = images.build_debian_image(images.PREFIX + "debian-minbase:test")
    try:
        calls: list[tuple[int, int]] = []
        with open_source(tag) as image:
            index = image.scan()
            with RamRoot(tmp_path / "state", tmpfs_size_for(index.estimated_bytes)) as ram:
                image.copy_into(ram.path, lambda done, total: calls.append((done, total)))
        totals = {total for _, total in calls}
        dones = [done for done, _ in calls]
        assert len(totals) == 1 and dones == sorted(dones)
        assert calls[-1][0] == calls[-1][1]
        assert 3 <= len(calls) < 1000  # a few a second: neither per file nor only at the end
    finally:
        images.remove_image(tag)


@pytest.fixture
def broken_archives(tmp_path: Path, tinybox_archives: dict[str, Path]) -> Iterator[dict[str, Path]]:
    exported = tinybox_archives["exported"].read_bytes()
    saved = tinybox_archives["saved"].read_bytes()
    paths = {
        "missing": tmp_path / "missing.tar",
        "directory": tmp_path,
        "garbage": tmp_path / "garbage.tar",
        "truncated": tmp_path / "truncated.tar",
        "truncated-gzip": tmp_path / "truncated.tar.gz",
        "corrupt-header": tmp_path / "corrupt.tar",
        "truncated-save": tmp_path / "truncated-save.tar",
    }
    paths["garbage"].write_bytes(b"not a tar archive at all\n" * 200)
    paths["truncated"].write_bytes(exported[: len(exported) // 2])
    paths["truncated-gzip"].write_bytes(gzip.compress(exported)[:50_000])
    with tarfile.open(tinybox_archives["exported"]) as tar:
        header = tar.getmembers()[-3].offset  # a header well past the start
    corrupt = bytearray(exported)
    corrupt[header : header + 512] = b"\x7f" * 512
    paths["corrupt-header"].write_bytes(bytes(corrupt))
    paths["truncated-save"].write_bytes(saved[: len(saved) // 2])
    yield paths


@pytest.mark.parametrize(
    ("scheme", "case"),
    [
        ("rootfs", "missing"),
        ("rootfs", "directory"),
        ("rootfs", "garbage"),
        ("rootfs", "truncated"),
        ("rootfs", "truncated-gzip"),
        ("rootfs", "corrupt-header"),
        ("docker-archive", "missing"),
        ("docker-archive", "garbage"),
        ("docker-archive", "truncated-save"),
    ],
)
def test_bad_archives_are_bad_input(
    scheme: str, case: str, broken_archives: dict[str, Path]
) -> None:
    path = broken_archives[case]
    with pytest.raises(BadInput) as raised, open_source(f"{scheme}:{path}") as image:
        image.scan()
    assert str(path) in one_line(raised.value)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("scheme", ["rootfs", "docker-archive"])
def test_a_fifo_is_bad_input_not_a_hang(scheme: str, tmp_path: Path) -> None:
    """Opening a FIFO waits for a writer that never comes: it is refused before that."""
    fifo = tmp_path / "archive.tar"
    os.mkfifo(fifo)
    with pytest.raises(BadInput) as raised:
        open_source(f"{scheme}:{fifo}")
    assert f"{fifo} is not a regular file" in one_line(raised.value)


def test_a_killed_copy_worker_is_one_line_that_says_what_to_do(tmp_path: Path) -> None:
    import psutil

    killed: list[int] = []

    def kill_the_worker(done: int, total: int) -> None:
        for child in psutil.Process().children():
            if not killed and "worker_main" in " ".join(child.cmdline()):
                child.kill()
                killed.append(child.pid)

    with open_source(f"rootfs:{images.debootstrap_tarball()}") as image:
        index = image.scan()
        size = tmpfs_size_for(index.estimated_bytes)
        with RamRoot(tmp_path / "state", size) as ram, pytest.raises(EnvironmentFailure) as raised:
            image.copy_into(ram.path, kill_the_worker)
    assert killed
    text = one_line(raised.value)
    assert "copy-in worker exited with status -9" in text
    # SIGKILLed, it said nothing: no traceback is promised (issue 21 §6), only what to report.
    assert text.endswith(
        "nothing was kept; the worker said nothing at all: report it, with the command"
    )


def docker_save_like(path: Path, manifest: object, config: object) -> Path:
    """A tar laid out as `docker save` writes it, with the given manifest and config."""
    members = {
        "manifest.json": json.dumps(manifest).encode(),
        "config.json": json.dumps(config).encode(),
    }
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        info = tarfile.TarInfo("hello")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"hi\n"))
    members["layer.tar"] = layer.getvalue()
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


GOOD_MANIFEST = [{"Config": "config.json", "Layers": ["layer.tar"], "RepoTags": ["x:y"]}]


@pytest.mark.parametrize(
    ("manifest", "config"),
    [
        (GOOD_MANIFEST, []),
        (GOOD_MANIFEST, {"config": "not an object"}),
        (GOOD_MANIFEST, {"history": ["not an object"]}),
        ([{"Config": "config.json", "Layers": [1]}], {}),
        ([{"Config": "config.json", "Layers": ["layer.tar"], "RepoTags": [7]}], {}),
    ],
)
def test_a_docker_save_archive_of_the_wrong_shape_is_bad_input(
    manifest: object, config: object, tmp_path: Path
) -> None:
    archive = docker_save_like(tmp_path / "odd.tar", manifest, config)
    with pytest.raises(BadInput) as raised, open_source(f"docker-archive:{archive}") as image:
        image.details()  # where a list met .get() before
    assert str(archive) in one_line(raised.value)


def test_a_docker_save_archive_of_the_right_shape_opens(tmp_path: Path) -> None:
    """Guard for the test above: the same builder with good JSON gives a usable archive."""
    config = {"architecture": "amd64", "config": {"Cmd": ["/hello"]}, "history": [{}]}
    archive = docker_save_like(tmp_path / "good.tar", GOOD_MANIFEST, config)
    with open_source(f"docker-archive:{archive}") as image:
        assert image.details().cmd == ["/hello"] and image.details().tags == ["x:y"]
        assert image.scan().lookup("/hello") is not None
