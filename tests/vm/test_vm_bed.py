"""The test bed itself: the disk boots to multi-user.target under QEMU and docker-boot, installed
from the working tree, runs on the guest's own Debian Python (3.11.2, no tarfile ``filter=``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vm.build import VmBed
from tests.vm.conftest import POWEROFF_TIMEOUT, Timing, marker_value, wait_ready
from tests.vm.machine import Machine, VmError

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]  # the first test may build the bed


def test_guest_boots_and_runs_docker_boot_on_debian_python(
    vm_bed: VmBed, tmp_path, vm_timing: Timing
):
    with Machine(vm_bed, "smoke", tmp_path) as vm:
        ready = wait_ready(vm, vm_timing)
        python = vm.wait_for(r"DBOOT-VM: python ", 120, after=ready.index)
        imported = vm.wait_for(r"DBOOT-VM: import rc=", 120, after=python.index)
        helped = vm.wait_for(r"DBOOT-VM: help rc=", 120, after=imported.index)
        vm.wait_for(r"DBOOT-VM: finished smoke", 60, after=helped.index, fatal=None)
        vm.wait_exit(POWEROFF_TIMEOUT)
    assert python.text.split()[-1] == "3.11.2", python.text
    assert marker_value(imported, "rc") == "0", vm.error(
        "`import injector, initstage` failed in the guest"
    )
    assert marker_value(helped, "rc") == "0", vm.error("`dboot --help` failed in the guest")


def test_a_timed_out_wait_names_the_marker_and_qemu_is_killed(vm_bed: VmBed, tmp_path):
    with Machine(vm_bed, "none", tmp_path) as vm, pytest.raises(VmError) as caught:
        vm.wait_for(r"DBOOT-VM: never printed", 3)
    assert "/DBOOT-VM: never printed/ did not appear within 3 s" in str(caught.value)
    assert str(vm.log_path) in str(caught.value)
    assert vm.pid is not None and not Path(f"/proc/{vm.pid}").exists(), "QEMU outlived its test"
