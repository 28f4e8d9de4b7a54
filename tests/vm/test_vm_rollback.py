"""The rollback proof inside the arm64 guest: a failed execve, injected into a PID 1 blocked in
``read()``, is rewound so that PID 1 re-runs its call and gets every byte of its pipe.

The rounds are tests/sandbox/rollback.py, the very code the sandbox tier runs on this machine
(tests/sandbox/test_inject_rollback.py), here run by the guest's Debian Python 3.11.2 with the
guest's docker-boot, on an aarch64 kernel: ``svc #0``, ``x8``, the NT_ARM_SYSTEM_CALL regset.
The target is PID 1 of a PID namespace the guest creates, never the guest's systemd.
"""

from __future__ import annotations

import re

import pytest

from tests.vm.build import VmBed
from tests.vm.conftest import POWEROFF_TIMEOUT, Timing, marker_value, wait_ready
from tests.vm.machine import Machine

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]  # the first test may build the bed

ROUNDS = 20
MARK = "DBOOT-ROLLBACK:"


def test_failed_execve_rolls_back_20_times_in_arm64_guest(
    arm64_bed: VmBed, tmp_path, vm_timing: Timing
):
    with Machine(arm64_bed, "rollback", tmp_path) as vm:
        ready = wait_ready(vm, vm_timing)
        start = vm.wait_for(rf"{MARK} start ", 120, after=ready.index)
        end = vm.wait_for(r"DBOOT-VM: rollback rc=", 600, after=start.index)
        vm.wait_for(r"DBOOT-VM: finished rollback", 60, after=end.index, fatal=None)
        vm.wait_exit(POWEROFF_TIMEOUT)

    assert marker_value(start, "arch") == "aarch64", start.text
    assert marker_value(start, "python") == "3.11.2", start.text
    failed = vm.find(rf"{MARK} FAIL", after=start.index)
    assert failed is None, vm.error(f"the rollback failed in the guest: {failed}")
    rounds = [ln.text for ln in vm.lines[start.index : end.index] if f"{MARK} round " in ln.text]
    assert len(rounds) == ROUNDS, vm.error(f"{len(rounds)} rounds reported, not {ROUNDS}")
    done = vm.find(rf"{MARK} done ok arch=aarch64 rounds={ROUNDS} ", after=start.index)
    assert done is not None, vm.error("no successful end of the rounds")
    assert marker_value(end, "rc") == "0", end.text
    # The rewind as the guest saw it: x8 holds read's number (63 in the asm-generic table).
    registers = vm.find(rf"{MARK} registers after the rewind: ", after=start.index)
    assert registers is not None and " x8=0x3f " in registers.text, registers

    for key in ("total_s", "min_ms", "mean_ms", "max_ms"):
        vm_timing.values[f"rollback_{key}"] = float(marker_value(done, key))
    vm_timing.values["rounds"] = float(len(rounds))
    vm_timing.values["rollback_host_s"] = end.seconds - start.seconds
    assert all(re.search(r"ok [\d.]+ ms$", line) for line in rounds), rounds
