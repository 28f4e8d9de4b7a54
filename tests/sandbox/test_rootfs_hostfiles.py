"""The host's /etc files in odd states, end to end: ``dboot check`` and a whole rehearsal
(copy, host files, stage, the image's init) run with a private copy of /etc mounted over
the real one, in a mount namespace of their own. A plain debootstrap system has no
/etc/hosts; before the fix, the switch died with a traceback right after the copy."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))
FILES = ("hostname", "hosts", "resolv.conf", "machine-id")
SHOW = 'for f in hostname hosts resolv.conf machine-id; do echo "== $f"; cat /etc/$f; done; true'


def odd_etc(tmp_path: Path, state: str) -> Path:
    """A copy of this host's /etc with all four files in ``state``."""
    etc = tmp_path / "etc"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    for name in FILES:
        path = etc / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        if state == "empty":
            path.write_bytes(b"")
        elif state == "dangling":
            path.symlink_to(f"/nonexistent/{name}")
        elif state == "directory":
            path.mkdir()
    return etc


def with_etc(etc: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` with ``etc`` over /etc, in a private mount namespace."""
    script = 'mount --bind "$0" /etc && exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(etc), *command],
        capture_output=True,
        text=True,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
        timeout=180,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("state", ["missing", "empty", "dangling", "directory"])
def test_check_and_a_rehearsal_with_odd_host_files(state: str, tmp_path: Path) -> None:
    etc = odd_etc(tmp_path, state)
    check = with_etc(etc, DBOOT, "check", "--json", "tinybox", "/sbin/init")
    assert "Traceback" not in check.stderr and check.returncode in (0, 3), check
    assert '"code": "host-files"' in check.stdout
    if state != "empty":
        for name in ("hosts", "resolv.conf", "machine-id"):
            assert f"/etc/{name} is" in check.stdout

    rehearsal = with_etc(etc, DBOOT, "rehearse", "--grace", "0.5", "tinybox", "/bin/sh", "-c", SHOW)
    assert rehearsal.returncode == 0 and "Traceback" not in rehearsal.stderr, rehearsal
    shown = rehearsal.stdout.split("== hostname", 1)[1]
    # The kernel's hostname stands in for a hostname file that is missing or empty.
    assert shown.splitlines()[1] == socket.gethostname()
    if state == "empty":
        assert "== hosts\n== resolv.conf\n== machine-id\n" in shown  # carried over, empty
