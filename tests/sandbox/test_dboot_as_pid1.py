"""A dboot that is itself PID 1 of its PID namespace, as a container's entrypoint is (issue
21, section 6): its helpers must not take their parent, pid 1, for init having adopted them.

`unshare --fork --pid --mount-proc` makes a new PID namespace whose PID 1 is `dboot check`;
the machine's own PID 1 is not involved. The image has two layers, so the scan goes through
the copy-in worker (a one-layer image is scanned in-process).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.images import build_fidelity_image

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))


def test_a_dboot_that_is_pid_1_scans_a_layered_image() -> None:
    unshare = shutil.which("unshare")
    assert unshare is not None
    result = subprocess.run(
        [unshare, "--fork", "--pid", "--mount-proc", DBOOT, "check", "-v", build_fidelity_image()],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
    )
    assert "copy-in worker" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert "verdict: ok to switch" in result.stdout, result.stdout
