"""Preflight with real image indexes: the ``tinybox`` engine image (built by
scripts/build-tinybox.sh: busybox-static with relative applet symlinks and a /sbin/init
script), and images whose init cannot run on this machine (tests/images.py): Debian's real
arm64 busybox-static, a script for a perl the image lacks, and the host's dynamically linked
/bin/true without its loader. Each of those must be a blocker, read from the image itself.
"""

from __future__ import annotations

import json
import os
import platform
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.errors import BadInput
from injector.image.sources import open_source
from injector.preflight import execcheck, preflight
from tests import images

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = [str(Path(sys.executable).with_name("dboot"))]
EXEC_CODES = {
    "image-foreign-arch",
    "init-foreign-arch",
    "init-loader-missing",
    "init-interpreter-missing",
    "init-not-executable",
    "init-interpreter-loop",
    "init-unverified",
}


def test_tinybox_init_checks_and_report() -> None:
    with open_source("tinybox") as source:
        index = source.scan()
        report = preflight.gather(index, ["/sbin/init"], source=source)
    # /bin/sh is a relative symlink to busybox: resolved inside the image, not on the host.
    for argv in (["/sbin/init"], ["/bin/sh", "-c", "echo hi"]):
        preflight.validate_init(index, argv)
    with pytest.raises(BadInput, match="init /sbin/no-such-init does not exist in the image"):
        preflight.validate_init(index, ["/sbin/no-such-init"])
    with pytest.raises(BadInput, match="is not an executable file"):
        preflight.validate_init(index, ["/etc"])

    # The image, the host files that go into it (a page and an inode each at most) and the
    # kernel's modules.
    host_files = report.ram.estimated_bytes - index.estimated_bytes - report.ram.modules_bytes
    assert 0 <= host_files <= 4 * (4096 + 1024) and index.estimated_bytes > 0
    assert not report.session.image_has_ssh  # busybox has no sshd applet linked
    codes = {notice.code for notice in report.notices}
    assert "init-invalid" not in codes and "ram-does-not-fit" not in codes
    # A script for /bin/sh, a static x86-64 busybox: runs here.
    assert not codes & EXEC_CODES, report.notices


@pytest.fixture(scope="module")
def arm64_image() -> Iterator[str]:
    if platform.machine() != "x86_64":
        pytest.fail("this test needs an x86_64 host (the image is arm64)")
    yield images.build_arm64_image()
    images.remove_image(images.PREFIX + "arm64-busybox:latest")


@pytest.fixture(scope="module")
def no_interpreter_image() -> Iterator[str]:
    yield images.build_missing_interpreter_image()
    images.remove_image(images.PREFIX + "no-interpreter:latest")


@pytest.fixture(scope="module")
def no_loader_image() -> Iterator[str]:
    yield images.build_missing_loader_image()
    images.remove_image(images.PREFIX + "no-loader:latest")


def exec_notices(ref: str, init: list[str], method: str = "auto") -> dict[str, str]:
    with open_source(ref, method=method) as source:
        report = preflight.gather(source.scan(), init, source=source)
    return {n.code: n.message for n in report.notices if n.code in EXEC_CODES}


def test_an_arm64_image_on_x86_64_is_blocked(arm64_image: str) -> None:
    found = exec_notices(arm64_image, ["/sbin/init"])
    assert set(found) == {"image-foreign-arch", "init-foreign-arch"}, found
    assert "built for arm64, this machine is amd64" in found["image-foreign-arch"]
    # /sbin/init -> ../bin/busybox, followed inside the image to the aarch64 ELF.
    assert "64-bit aarch64 binary" in found["init-foreign-arch"]
    # No init named: the declared architecture alone blocks.
    assert set(exec_notices(arm64_image, [])) == {"image-foreign-arch"}


def test_a_script_whose_interpreter_the_image_lacks_is_blocked(no_interpreter_image: str) -> None:
    found = exec_notices(no_interpreter_image, ["/sbin/init"])
    assert set(found) == {"init-interpreter-missing"}
    assert "script for /usr/bin/perl, which the image lacks" in found["init-interpreter-missing"]
    # Through a second script: the chain is named.
    chained = exec_notices(no_interpreter_image, ["/sbin/init-chain"])
    assert (
        "(a script for /sbin/init) is a script for /usr/bin/perl"
        in (chained["init-interpreter-missing"])
    )
    # A script for /bin/sh (busybox, static, x86-64) in the same image runs.
    assert exec_notices(no_interpreter_image, ["/sbin/init-sh"]) == {}


@pytest.fixture(scope="module")
def no_loader_sources(no_loader_image: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The same image as an engine image, a docker save archive and a rootfs tarball: the
    init's first bytes are read from each kind of source."""
    work = tmp_path_factory.mktemp("no-loader")
    archive = work / "saved.tar"
    images.docker("save", "-o", str(archive), no_loader_image)
    rootfs = images.export_tar(no_loader_image, work / "rootfs.tar")
    return [no_loader_image, f"docker-archive:{archive}", f"rootfs:{rootfs}"]


def test_a_dynamic_init_without_its_loader_is_blocked(no_loader_sources: list[str]) -> None:
    # The image's /lib64/ld-linux-x86-64.so.2 is a symlink to a path that exists on the host
    # but not in the image: resolved inside the image, it is missing.
    assert Path("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").exists()
    # The engine image twice: read from its overlay2 layers, and through the engine's API.
    engine = no_loader_sources[0]
    kinds = [(engine, "overlay"), (engine, "stream")]
    kinds += [(ref, "auto") for ref in no_loader_sources[1:]]
    for ref, method in kinds:
        found = exec_notices(ref, ["/sbin/init"], method)
        assert set(found) == {"init-loader-missing"}, (ref, method, found)
        message = found["init-loader-missing"]
        assert "loader /lib64/ld-linux-x86-64.so.2 is missing from the image" in message
        assert exec_notices(ref, ["/bin/sh"], method) == {}, (ref, method)


@pytest.fixture
def cli_env() -> dict[str, str]:
    return {**os.environ, "DBOOT_REHEARSAL_ONLY": "1"}


def check(ref: str, init: str, env: dict[str, str]) -> tuple[int, list[dict[str, object]], str]:
    """``dboot check --json REF INIT``: exit status, the events, and the plain report."""
    as_json = subprocess.run(
        [*DBOOT, "check", "--json", ref, init],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    plain = subprocess.run(
        [*DBOOT, "check", ref, init],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert plain.returncode == as_json.returncode, plain.stderr
    return as_json.returncode, events, plain.stdout


@pytest.mark.parametrize(
    ("fixture", "init", "code", "words"),
    [
        ("arm64_image", "/sbin/init", "init-foreign-arch", "is a 64-bit aarch64 binary"),
        ("no_interpreter_image", "/sbin/init", "init-interpreter-missing", "/usr/bin/perl"),
        ("no_loader_image", "/sbin/init", "init-loader-missing", "ld-linux-x86-64.so.2"),
    ],
)
def test_check_exits_3_with_a_one_line_reason(
    fixture: str,
    init: str,
    code: str,
    words: str,
    cli_env: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    ref = request.getfixturevalue(fixture)
    status, events, plain = check(ref, init, cli_env)
    assert status == 3
    [notice] = [e for e in events if e.get("event") == "notice" and e.get("code") == code]
    assert notice["level"] == "blocker" and words in str(notice["message"]) and notice["fix"]
    assert events[-1] == {"event": "verdict", "blocked": True}
    [line] = [line for line in plain.splitlines() if words in line]
    assert line.startswith("blocker: ")


def test_a_rehearsal_stops_before_the_copy(no_loader_image: str, cli_env: dict[str, str]) -> None:
    """The sandbox shares this kernel: an init it cannot exec blocks a rehearsal too, before
    any tmpfs is mounted or process touched."""
    result = subprocess.run(
        [*DBOOT, "rehearse", no_loader_image, "/sbin/init"],
        capture_output=True,
        text=True,
        env=cli_env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 3, result
    assert result.stderr.strip().splitlines() == [
        "dboot: preflight found blockers: init-loader-missing: fix them, or pass --force"
    ]
    assert "Copying" not in result.stdout and "Injecting" not in result.stdout


def test_layer_reads_honour_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    """overlay2 layer directories, top first, as the engine keeps them: a whiteout (a 0/0
    character device) deletes a file below, an opaque directory hides what is below it."""
    top, middle, bottom = (tmp_path / name for name in ("top", "middle", "bottom"))
    for layer in (top, middle, bottom):
        (layer / "sbin").mkdir(parents=True)
    (bottom / "sbin/init").write_bytes(b"#!/bin/old\n")
    (bottom / "sbin/other").write_bytes(b"#!/bin/old\n")
    os.mknod(middle / "sbin/init", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # deleted here
    (top / "etc").mkdir()
    os.setxattr(top / "etc", "trusted.overlay.opaque", b"y")
    (middle / "etc").mkdir()
    (middle / "etc/rc").write_bytes(b"#!/bin/hidden\n")
    os.mkfifo(top / "sbin/pipe")
    layers = [str(top), str(middle), str(bottom)]
    assert execcheck._head_from_layers(layers, "/sbin/init") is None
    assert execcheck._head_from_layers(layers, "/sbin/other") == b"#!/bin/old\n"
    assert execcheck._head_from_layers(layers, "/etc/rc") is None
    assert execcheck._head_from_layers(layers, "/sbin/pipe") is None  # never blocks on a FIFO
    (top / "sbin/init").write_bytes(b"#!/bin/new\n")  # re-created above the whiteout
    assert execcheck._head_from_layers(layers, "/sbin/init") == b"#!/bin/new\n"
