"""The proof on a real system: a QEMU machine whose PID 1 is Debian's systemd is switched by
`dboot switch` (real preflight, real copy into tmpfs, real ptrace into systemd, real init stage)
to a new userspace in RAM. One built disk, one fresh copy-on-write boot per scenario.

Console markers: "DBOOT-VM:" from the old system's scenario unit (tests/vm/guest/), "dboot-stage"
from the init stage, "DBOOT-TEST:" from the busybox image's init (tests/vm/image/dboot-test-init),
"DBOOT-NEWROOT:" from the switched-to systemd (tests/vm/guest/dboot-newroot-report).
Guest-side durations use the kernel's uptime, which keeps counting across the switch.
"""

from __future__ import annotations

import re

import pytest

from tests.vm.build import VmBed
from tests.vm.conftest import (
    POWEROFF_TIMEOUT,
    SWITCH_TIMEOUT,
    Timing,
    assert_in_order,
    marker_value,
    wait_ready,
)
from tests.vm.machine import ConsoleLine, Machine, VmError

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1500)]  # the first test may build the bed

# From `dboot switch` to the new init's first line, under software emulation on 2 cores. Measured
# values are in the terminal summary; this bound only catches a switch that hangs or sleeps.
SWITCH_BOUND_SECONDS = 120.0
STAGE = r"dboot-stage"
# systemd's first line as PID 1, through the kernel log, so with the kernel's timestamp.
SYSTEMD_STARTED = r"\[\s*(?P<uptime>[\d.]+)\] systemd\[1\]: systemd \d+\S* running in system mode"


def switch_started(vm: Machine, timing: Timing) -> ConsoleLine:
    ready = wait_ready(vm, timing)
    return vm.wait_for(r"DBOOT-VM: switch-start uptime=", 60, after=ready.index)


def record_switch(
    timing: Timing, start: ConsoleLine, first: ConsoleLine, first_uptime: float
) -> float:
    """From `dboot switch` to the new init's first line, on the guest's clock (kernel uptime) and
    on the host's; returns the guest's."""
    guest = first_uptime - float(marker_value(start, "uptime"))
    timing.values["switch_guest_s"] = guest
    timing.values["switch_host_s"] = first.seconds - start.seconds
    timing.values["total_host_s"] = first.seconds
    return guest


def record_injection(vm: Machine, timing: Timing, start: ConsoleLine) -> None:
    """What dboot reported about the injection and the stage timed itself (not asserted: shown)."""
    injected = vm.find(r"execve injected in [\d.]+ ms", after=start.index)
    if injected is not None:
        timing.values["injection_ms"] = float(re.findall(r"([\d.]+) ms", injected.text)[-1])
    exec_line = vm.find(rf"{STAGE}: \+[\d.]+s exec \[", after=start.index)
    if exec_line is not None:
        timing.values["stage_to_exec_s"] = float(re.findall(r"\+([\d.]+)s exec", exec_line.text)[0])


def assert_stage_steps_in_order(kmsg: list[str]) -> None:
    """The stage's numbered steps, as the kernel log kept them: 1, 2, 3 ... ending with the exec."""
    steps = [(int(m.group(1)), line) for line in kmsg if (m := re.search(r"step (\d+)/\d+", line))]
    numbers = [number for number, _ in steps]
    assert len(numbers) >= 5 and numbers == list(range(1, len(numbers) + 1)), numbers
    assert "exec" in steps[-1][1], steps[-1][1]


def stage_lines(vm: Machine, start: ConsoleLine, end: ConsoleLine) -> list[str]:
    return [ln.text for ln in vm.lines[start.index : end.index] if STAGE in ln.text]


def failed_checks(vm: Machine, prefix: str, after: int) -> list[str]:
    return [ln.text for ln in vm.lines[after:] if re.search(rf"{prefix} \S+ FAIL", ln.text)]


def test_switch_systemd_machine_to_busybox_image(each_arch_bed: VmBed, tmp_path, vm_timing: Timing):
    """On every architecture of the bed (x86_64, arm64): the same image recipe, with the tree's
    own busybox, and the same claims of its init. On x86_64 the machine has a VGA card too,
    and /dev/console is the serial port (console=tty0 console=ttyS0, the last one wins, as on
    cloud kernels): the stage's steps are on both, the VGA's VT 3 and the serial log."""
    vga = each_arch_bed.arch.name == "x86_64"  # QEMU's VGA card is a PC's
    with Machine(each_arch_bed, "switch-busybox", tmp_path, vga=vga) as vm:
        start = switch_started(vm, vm_timing)
        first = vm.wait_for(r"DBOOT-TEST: init-start uptime=", SWITCH_TIMEOUT, after=start.index)
        screen = vm.vga_text() if vga else []
        done = vm.wait_for(r"DBOOT-TEST: done", 120, after=first.index)
        vm.wait_exit(POWEROFF_TIMEOUT)

    switch_seconds = record_switch(vm_timing, start, first, float(marker_value(first, "uptime")))
    assert stage_lines(vm, start, first), vm.error(
        "no dboot-stage line between the switch and the new init"
    )
    assert not failed_checks(vm, "DBOOT-TEST:", first.index), vm.error(
        "the new init found failures"
    )
    assert_in_order(
        vm,
        first.index,
        [
            r"DBOOT-TEST: pid ok 1$",
            r"DBOOT-TEST: exe ok /bin/busybox$",
            r"DBOOT-TEST: survivors ok none$",
            r"DBOOT-TEST: vda-unmounted ok none$",
            r"DBOOT-TEST: vda-exclusive ok /dev/vda: opened exclusively$",
            r"DBOOT-TEST: root ok (tmpfs|rootfs)$",
            r"DBOOT-TEST: api-mounts ok ",
            r"DBOOT-TEST: dboot-log ok [1-9]\d* bytes$",
            rf"DBOOT-TEST: kmsg: .*{STAGE}",  # the stage's lines went through /dev/kmsg
            r"DBOOT-TEST: done",
        ],
    )
    kmsg = [ln.text for ln in vm.lines[first.index : done.index] if "DBOOT-TEST: kmsg:" in ln.text]
    assert_stage_steps_in_order(kmsg)
    if vga:
        (tmp_path / "vga.txt").write_text("\n".join(screen) + "\n")
        serial = stage_lines(vm, start, first)
        assert any("console: VT 3 active" in line for line in serial), serial
        # VT 3 is the stage's from step 2 on; what scrolled off may be gone from the card.
        shown = [line for line in screen if STAGE in line]
        steps = [int(m.group(1)) for line in shown if (m := re.search(r"step (\d+)/\d+", line))]
        assert len(steps) >= 3 and steps == list(range(steps[0], steps[0] + len(steps))), shown
        assert any(re.search(r"exec \[", line) for line in shown), shown
    record_injection(vm, vm_timing, start)
    # The injection report names the guest's architecture and the call systemd was stopped in.
    arch = each_arch_bed.arch.name
    injected = vm.find(rf"\({arch}\) stopped in \w+.*execve injected in", after=start.index)
    assert injected is not None, vm.error(f"no injection report naming {arch}")
    assert "syscall_" not in injected.text, injected.text
    assert vm.find(r"Kernel panic") is None
    assert switch_seconds < SWITCH_BOUND_SECONDS, f"switch took {switch_seconds:.1f} s"


def test_switch_systemd_machine_to_systemd_image(vm_bed: VmBed, tmp_path, vm_timing: Timing):
    with Machine(vm_bed, "switch-systemd", tmp_path) as vm:
        start = switch_started(vm, vm_timing)
        # The new systemd's first word, with the kernel's timestamp; then its boot greeting.
        first = vm.wait_for(SYSTEMD_STARTED, SWITCH_TIMEOUT, after=start.index)
        welcome = vm.wait_for(r"Welcome to Debian GNU/Linux 12", 60, after=first.index)
        reached = vm.wait_for(
            r"Reached target .*(multi-user\.target|Multi-User System)",
            SWITCH_TIMEOUT,
            after=welcome.index,
        )
        up = vm.wait_for(r"DBOOT-NEWROOT: up uptime=", 120, after=reached.index)
        vm.wait_for(r"DBOOT-NEWROOT: done", 60, after=up.index)
        vm.wait_exit(POWEROFF_TIMEOUT)

    record_injection(vm, vm_timing, start)
    started = re.search(SYSTEMD_STARTED, first.text)
    assert started is not None
    record_switch(vm_timing, start, first, float(started.group("uptime")))
    vm_timing.values["new_multi_user_guest_s"] = float(marker_value(up, "uptime")) - float(
        marker_value(start, "uptime")
    )
    assert stage_lines(vm, start, first), vm.error(
        "no dboot-stage line between the switch and systemd"
    )
    assert not failed_checks(vm, "DBOOT-NEWROOT:", up.index), vm.error(
        "the new systemd found failures"
    )
    assert_in_order(
        vm,
        up.index,
        [
            r"DBOOT-NEWROOT: pid1-systemd ok .*/systemd$",
            r"DBOOT-NEWROOT: root ok tmpfs$",
            r"DBOOT-NEWROOT: vda-unmounted ok none$",
            r"DBOOT-NEWROOT: vda-exclusive ok /dev/vda: opened exclusively$",
            # e2fsck names a filesystem by its label (mkfs.ext4 -L dboot-vm) when it has one.
            r"DBOOT-NEWROOT: e2fsck: (/dev/vda|dboot-vm): \d+/\d+ files",
            r"DBOOT-NEWROOT: vda-e2fsck-clean ok rc=0$",
        ],
    )
    # A plain debootstrap system: no /etc/hosts on the old machine, and the switch still went on.
    assert vm.find(r"DBOOT-VM: switch-start .* hosts=none$") is not None, vm.error(
        "the old machine had an /etc/hosts: the bed is not a plain debootstrap system"
    )
    assert vm.find(r"Kernel panic") is None


def test_unrunnable_init_opens_recovery_shell_instead_of_panicking(
    vm_bed: VmBed, tmp_path, vm_timing: Timing
):
    """The image's init exists and is executable, so the preflight lets it through, but it is a
    glibc program in a busybox image: execve() in the stage fails with ENOENT (no ELF loader),
    past the point of no return. The stage must name the cause and open a shell on the console."""
    with Machine(vm_bed, "recovery", tmp_path) as vm:
        start = switch_started(vm, vm_timing)
        shell = vm.wait_for(rf"{STAGE}.*(?i:recovery)", SWITCH_TIMEOUT, after=start.index)
        vm_timing.values["to_recovery_host_s"] = shell.seconds - start.seconds
        # Answer on the serial console. The tty echoes what we type, so the marker is computed:
        # only the shell's output contains "42". Retry, in case the shell is not reading yet.
        answer = None
        for _ in range(6):
            vm.send("echo DBOOT-RECOVERY-$((6*7)) pid=$$\r")
            try:
                answer = vm.wait_for(r"DBOOT-RECOVERY-42 pid=\d+", 15, after=shell.index)
                break
            except VmError:
                continue
        assert answer is not None, vm.error("the recovery shell did not answer on the console")
        vm.send("poweroff -f\r")
        vm.wait_exit(POWEROFF_TIMEOUT)

    text = vm.text(after=start.index)
    assert re.search(r"ENOENT|No such file or directory|Errno 2", text), vm.error(
        "the stage did not name the execve failure (ENOENT)"
    )
    assert "ELF interpreter" in text, vm.error("the stage did not explain the ENOENT")
    assert "unrunnable init ran" not in text
    assert vm.find(r"Kernel panic|Attempted to kill init") is None
    vm_timing.values["recovery_shell_pid"] = float(marker_value(answer, "pid"))
