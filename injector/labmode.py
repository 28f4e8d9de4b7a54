"""Lab mode: this machine's own PID 1 is never to be replaced (labs, teaching, tests, CI).

One definition, asked by every layer that could reach the host's PID 1: the switch, the
injector, the swap-off step and the wizard.
"""

from __future__ import annotations

import os
from pathlib import Path

LAB_MODE_ENV = "DBOOT_REHEARSAL_ONLY"
LAB_MODE_FLAG = Path("/etc/dboot/rehearsal-only")


def lab_mode_reason() -> str | None:
    """Why lab mode is on, in words for a user; None when it is off."""
    if os.environ.get(LAB_MODE_ENV, "") not in ("", "0"):
        return f"{LAB_MODE_ENV} is set (lab mode)"
    if LAB_MODE_FLAG.exists():
        return f"lab mode is on ({LAB_MODE_FLAG} exists)"
    return None


def lab_mode() -> bool:
    return lab_mode_reason() is not None
