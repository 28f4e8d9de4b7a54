"""Shared fixtures. Every test runs with lab mode on, so no code path can reach the host's PID 1."""

from __future__ import annotations

import os

os.environ["DBOOT_REHEARSAL_ONLY"] = "1"
