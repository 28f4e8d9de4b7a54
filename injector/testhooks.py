"""Named pause points, for the tests that kill dboot at a chosen moment (test-only).

``DBOOT_TEST_PAUSE=<phase>:<file>`` makes the process that reaches ``<phase>`` write its pid
into ``<file>`` and then sleep until a signal ends it: the test reads the file and kills
it there (SIGKILL for the kill-at-each-phase test, SIGHUP/SIGTERM/SIGINT or a closed pty
for the undo tests). With ``DBOOT_TEST_PAUSE_SECONDS`` it goes on after that many seconds
instead (a terminal closed meanwhile then fails the next write with EIO). Without
``DBOOT_TEST_PAUSE``, which no real run sets, a pause point is one environment lookup.

The phases, in the order a switch meets them:
- ``copy``: inside the namespace worker, the RAM root mounted and filled, no plan yet;
- ``prepared``: still there, the plan written too;
- ``stopped``: the graceful stop done (the host's services stopped), nothing injected yet;
- ``before-seize``: the RAM root and the plan in place, PID 1 not yet traced;
- ``entry-stop``: PID 1 stopped at a syscall entry under us, nothing of ours written;
- ``swapped``: our block written below its stack and execve swapped into its registers;
- ``exec-wait``: PID 1 resumed into execve, the exec event not yet seen.

The last four are in the injection thread, which holds ending signals back: there only
SIGKILL ends a pause, unless ``DBOOT_TEST_PAUSE_SECONDS`` lets it go on by itself.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

PAUSE_ENV = "DBOOT_TEST_PAUSE"
PAUSE_SECONDS_ENV = "DBOOT_TEST_PAUSE_SECONDS"  # pause this long, then go on (default: forever)
PHASES = ("copy", "prepared", "stopped", "before-seize", "entry-stop", "swapped", "exec-wait")
# `dboot install`'s, in its order (injector.install): a partial tree made, filled, renamed to
# its final name; the shim written (a reinstall: its old package set aside first); the state
# written; the init path committed.
INSTALL_PHASES = (
    "install-partial",
    "install-filled",
    "install-tree",
    "install-shim-aside",
    "install-shim",
    "install-state",
    "install-committed",
)


def pause_point(phase: str) -> None:
    """Pause here if the test asked for ``phase``; see the module docstring."""
    wanted = os.environ.get(PAUSE_ENV)
    if not wanted:
        return
    name, _, announce = wanted.partition(":")
    if name != phase:
        return
    partial = Path(f"{announce}.partial")
    partial.write_text(f"{os.getpid()}\n")
    partial.rename(announce)  # whole, or not there at all
    pause = os.environ.get(PAUSE_SECONDS_ENV)
    if pause:
        time.sleep(float(pause))
        return
    while True:
        time.sleep(3600)  # a signal's handler raising ends it; SIGKILL ends everything
