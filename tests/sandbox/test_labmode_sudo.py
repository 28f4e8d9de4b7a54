"""Lab mode holds when dboot's own environment lost DBOOT_REHEARSAL_ONLY, as it does under
sudo (which resets the command's environment but keeps its own), and with the marker file.

Safety: every run here targets this machine's PID 1 (a plain ``dboot switch``), so the
refusal is the thing under test. Should it ever fail, the run still cannot get anywhere:
the image does not exist, so the very next step fails with exit 1 before any preflight,
mount or ptrace. The refusal must come first (exit 3, one line, naming lab mode).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector import labmode

pytestmark = pytest.mark.root

DBOOT = str(Path(sys.executable).with_name("dboot"))
CLEAN_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]


def switch_argv(tmp_path: Path) -> list[str]:
    absent = tmp_path / "no-such-dir" / "image.tar"
    return [DBOOT, "switch", "--yes", "--state-dir", str(tmp_path / "state"),
            f"docker-archive:{absent}", "/sbin/init"]  # fmt: skip


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL
    )


def assert_refused(result: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result
    assert len(lines) == 1 and "lab mode" in lines[0], result.stderr
    assert "PID 1 will not be replaced" in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    assert "cannot read" not in result.stderr  # the image was never even opened


def test_the_image_really_is_absent(tmp_path: Path) -> None:
    """The guard the other tests lean on: without lab mode this run stops at the image."""
    result = run([DBOOT, "check", switch_argv(tmp_path)[-2]], {"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "cannot read" in result.stderr, result


def test_the_variable_survives_a_reset_environment(tmp_path: Path) -> None:
    """``DBOOT_REHEARSAL_ONLY=1 sudo dboot switch ...``: sudo stays dboot's parent and keeps
    the variable in its own environment, while dboot's is reset. With sudo on this machine
    it is the real sudo; without, ``sh`` + ``env -i`` do the same to the environment."""
    lab = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DBOOT_REHEARSAL_ONLY": "1"}
    if shutil.which("sudo"):
        wrapper = ["sudo", "--preserve-env=PATH", "--"]
        result = run([*wrapper, *switch_argv(tmp_path)], lab)
        assert_refused(result, "(sudo)")
    shell = ["sh", "-c", '"$@"; exit $?', "sh", *CLEAN_ENV, *switch_argv(tmp_path)]
    result = run(shell, lab)
    assert_refused(result, "DBOOT_REHEARSAL_ONLY is set in the environment of pid", "(sh)")
    assert not (tmp_path / "state").exists()


@pytest.fixture
def marker_file() -> Iterator[Path]:
    """/etc/dboot/rehearsal-only for the test: made if absent, and then removed again (it
    only ever turns lab mode on, for everyone on this machine, for a moment)."""
    flag = labmode.LAB_MODE_FLAG
    made = [directory for directory in (flag.parent,) if not directory.exists()]
    existed = flag.exists()
    flag.parent.mkdir(parents=True, exist_ok=True)
    flag.touch()
    try:
        yield flag
    finally:
        if not existed:
            flag.unlink(missing_ok=True)
        for directory in made:
            directory.rmdir()


def test_the_marker_file_needs_no_environment(marker_file: Path, tmp_path: Path) -> None:
    result = run([*CLEAN_ENV, *switch_argv(tmp_path)], {"PATH": "/usr/bin:/bin"})
    assert_refused(result, f"{marker_file} exists")
