"""`dboot install` and `dboot status` as scripts use them, on this machine, in lab mode.

Lab mode keeps this machine's disk and boot chain as they are: the install itself runs only
in QEMU (tests/vm/test_vm_install.py). What runs here is what changes nothing: the dry
run's plan (read from this machine's real boot chain and root filesystem), the refusals,
and `dboot status`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.images import build_tinybox

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))
LAB_ENV = {**os.environ, "DBOOT_REHEARSAL_ONLY": "1"}


def dboot(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DBOOT, *args], capture_output=True, text=True, env=LAB_ENV, timeout=300,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_dry_run_shows_the_plan_and_writes_nothing() -> None:
    before = sorted(os.listdir("/"))
    init_before = os.readlink("/sbin/init") if os.path.islink("/sbin/init") else None
    result = dboot("install", "--dry-run", build_tinybox(), "/bin/sh")
    # Exit 0, or 3 when this machine itself is no place to install (a container's root,
    # which the preflight blocks): either way the plan's facts are printed, nothing written.
    assert result.returncode in (0, 3), result.stderr
    out = result.stdout
    assert "Checking the image, the disk and the boot chain" in out
    if result.returncode == 0:
        for words in ("space:", "new /etc/fstab:", "old system: stays whole", "next boot:",
                      "going back:", "dry-run: the plan above; nothing was written"):  # fmt: skip
            assert words in out, out
    else:
        assert "preflight found blockers" in result.stderr
    # Nothing is stopped before an install writes: no stop plan among its verdicts.
    assert "stops" not in out and "--stop=signal" not in out, out
    assert sorted(os.listdir("/")) == before  # no /dboot
    assert (os.readlink("/sbin/init") if os.path.islink("/sbin/init") else None) == init_before


def test_dry_run_json_names_the_boot_chain() -> None:
    result = dboot("install", "--dry-run", "--json", "--force", build_tinybox(), "/bin/sh")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    chain = [e for e in events if e.get("section") == "install" and e.get("key") == "boot_chain"]
    assert chain and any(line.startswith("firmware ") for line in chain[0]["value"])
    assert events[-1]["outcome"] == "dry-run"


@pytest.mark.parametrize("words", [["install", "--yes"], ["install", "--revert", "--no-reboot"]])
def test_lab_mode_refuses_to_write_this_machines_disk(words: list[str]) -> None:
    extra = [build_tinybox(), "/bin/sh"] if "--revert" not in words else []
    result = dboot(*words, *extra)
    assert result.returncode == 3, result
    assert "disk and boot chain will not be changed" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_install_usage_errors_are_one_line() -> None:
    result = dboot("install")
    assert result.returncode == 1 and "install needs an IMAGE" in result.stderr
    result = dboot("install", "--revert", "tinybox")
    assert result.returncode == 1 and "--revert takes no IMAGE" in result.stderr


def test_status_on_a_machine_without_an_install() -> None:
    result = dboot("status")
    assert result.returncode == 0, result.stderr
    assert "install: none" in result.stdout
    status = json.loads(dboot("status", "--json").stdout)
    assert status["installed"] is False and status["system"]
