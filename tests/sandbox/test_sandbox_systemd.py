"""A real systemd (Debian 12) rehearsed in the hermetic sandbox: it reaches its default
target, Ctrl-C ends it with exit 0, and the host is exactly as it was.

``dboot rehearse`` runs on a terminal of ours (a pty), as a user runs it: the sandbox's
console is that terminal, and systemd's status lines are on it. The time from the exec of
``/sbin/init`` to its default target is printed (``pytest -s``) for the issue's note.
"""

from __future__ import annotations

import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from injector.rehearsal.sandbox import CGROUP_PREFIX, SHARED_WITH_HOST, own_cgroup_directory
from tests.images import build_debian_systemd_image
from tests.sandbox.host_snapshot import HostSnapshot
from tests.sandbox.test_switch import nothing_left_behind  # noqa: F401 (a fixture)

pytestmark = pytest.mark.root

DBOOT = Path(sys.executable).with_name("dboot")  # the install of the Python under test
TARGET_TIMEOUT = 120.0
EXEC_LINE = "exec ['/sbin/init']"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Terminal:
    """A pty whose output a thread reads into timestamped lines."""

    def __init__(self) -> None:
        self.master, self.slave = pty.openpty()
        self.lines: list[tuple[float, str]] = []
        self._partial = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: every slave end is closed
                return
            if not chunk:
                return
            now = time.monotonic()
            *complete, self._partial = (self._partial + chunk.decode(errors="replace")).split("\n")
            self.lines.extend((now, ANSI.sub("", line).rstrip("\r")) for line in complete)

    def when(self, pattern: str, timeout: float) -> float | None:
        """When the first line matching ``pattern`` (a regex) arrived, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for arrived, line in list(self.lines):
                if re.search(pattern, line):
                    return arrived
            time.sleep(0.05)
        return None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def close(self) -> None:
        os.close(self.slave)
        self._reader.join(5)
        os.close(self.master)


def test_systemd_reaches_its_target_and_the_host_is_untouched(
    nothing_left_behind: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    image = build_debian_systemd_image()
    before = HostSnapshot.take()
    terminal = Terminal()
    rehearsal = subprocess.Popen(
        [str(DBOOT), "rehearse", "--state-dir", str(tmp_path / "state"), image, "/sbin/init"],
        stdin=terminal.slave,
        stdout=terminal.slave,
        stderr=terminal.slave,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1", "TERM": "xterm"},
    )
    try:
        exec_at = terminal.when(re.escape(EXEC_LINE), TARGET_TIMEOUT)
        assert exec_at is not None, terminal.text()[-3000:]
        default = terminal.when(r"Queued start job for default target (\S+)\.", 30)
        assert default is not None, terminal.text()[-3000:]
        target = re.findall(r"default target (\S+)\.", terminal.text())[0]
        reached_at = terminal.when(rf"Reached target {re.escape(target)}\b", TARGET_TIMEOUT)
        assert reached_at is not None, terminal.text()[-3000:]
        print(f"\nsystemd reached {target} {reached_at - exec_at:.2f} s after the exec of init")
        # The rehearsed systemd skipped what would change the host: systemd-sysctl
        # ("Apply Kernel Variables") needs a writable /proc/sys, systemd-modules-load ("Load
        # Kernel Modules") CAP_SYS_MODULE.
        text = terminal.text()
        assert "Welcome to Debian GNU/Linux 12" in text
        assert f"info: {SHARED_WITH_HOST}" in text
        assert "Apply Kernel Variables" not in text and "Load Kernel Modules" not in text
        # Ctrl-C, as a user would type it at dboot rehearse.
        rehearsal.send_signal(signal.SIGINT)
        assert rehearsal.wait(30) == 0, terminal.text()[-3000:]
    finally:
        if rehearsal.poll() is None:
            rehearsal.kill()
            rehearsal.wait()
        terminal.close()
    assert "ended with Ctrl-C; the sandbox is gone" in terminal.text()
    after = HostSnapshot.take()
    assert before.differences(after) == []
    ours = f"{CGROUP_PREFIX}{rehearsal.pid}-"
    assert not [p.name for p in own_cgroup_directory().iterdir() if p.name.startswith(ours)]
