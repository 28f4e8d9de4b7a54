"""Shared fixtures. Every test runs with lab mode on, so no code path can reach the host's PID 1."""

from __future__ import annotations

import os

os.environ["DBOOT_REHEARSAL_ONLY"] = "1"
# `dboot switch --target-pid` runs write a run log; tests keep it out of the host's /var/log.
os.environ.setdefault("DBOOT_LOG_FILE", "/tmp/dboot-tests.log")
