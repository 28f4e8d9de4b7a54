"""Issue 17 §4: the firmware beds boot for real, through QEMU's firmware and the GRUB installed on
their disk (no -kernel), as `dboot install`'s scenarios need them.

Two beds, one machine each, side by side (module fixture ``runs``):
- x86_64-bios: SeaBIOS; an MBR disk, one ext4 root; GRUB (grub-pc) in the MBR and its gap.
- x86_64-uefi: OVMF with the machine's own variable store; a GPT disk, an ESP (vfat) at
  /boot/efi, an ext4 /boot and an ext4 root; GRUB (grub-efi-amd64) at the ESP's removable path.
Each machine, scenario "remote" (read by the guest from an SMBIOS OEM string):
1. boots: the firmware's line, GRUB's menu and "Loading Linux", the kernel's command line from
   GRUB (BOOT_IMAGE=, root=UUID= of the bed's root), the ready marker;
2. takes an SSH login with the test key, host keys recorded by ssh-keyscan, then checked
   strictly; the guest mounts its filesystems as the bed's layout.json says (devices, UUIDs,
   types), has /sys/firmware/efi on UEFI only, and GRUB's command line in /proc/cmdline; a file
   (and on UEFI an EFI variable) is written and synced;
3. reboots (`systemctl reboot`): through firmware and GRUB again on the same overlay, a new boot
   id, the file there, the same host keys;
4. loses its power (QEMU killed), then a new Machine boots the same Storage (overlay and
   NVRAM): the file and the EFI variable are there, the same host keys.
Figures (the "VM timings" section): the firmware's line, the kernel from GRUB, the ready marker
and the first SSH login, and the reboot to a login, on the host's clock.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vm.build import VmBed
from tests.vm.conftest import (
    BOOT_TIMEOUT,
    POWEROFF_TIMEOUT,
    TIMINGS,
    FirmwareBoot,
    Timing,
    wait_firmware_boot,
    wait_ready,
)
from tests.vm.machine import ConsoleLine, Machine, Storage
from tests.vm.remote import Remote

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

SCENARIO = "remote"  # boot to the ready marker, then wait for SSH
MARK = "/var/lib/dboot-vm/firmware-test"
# A variable of our own in the firmware's NVRAM: attributes 7 (non-volatile, boot and runtime
# access) as efivarfs wants them first, then the value.
EFI_VARIABLE = "DbootVmTest-4d1f7c62-3a55-4b0e-9f35-1f2b9c0d7e41"
FACTS = f"""
echo "root=$(findmnt -n -o SOURCE,UUID,FSTYPE /)"
echo "boot=$(findmnt -n -o SOURCE,UUID,FSTYPE /boot)"
echo "esp=$(findmnt -n -o SOURCE,UUID,FSTYPE /boot/efi)"
echo "efi=$(test -d /sys/firmware/efi && echo yes || echo no)"
echo "cmdline=$(cat /proc/cmdline)"
echo "boot_id=$(cat /proc/sys/kernel/random/boot_id)"
echo "mark=$(cat {MARK} 2>/dev/null)"
echo "efi_variable=$(cat /sys/firmware/efi/efivars/{EFI_VARIABLE} 2>/dev/null | tail -c +5)"
"""


@dataclass
class Boot:
    """One boot of the machine: its boot chain on the console and what the guest showed."""

    chain: FirmwareBoot
    ready: ConsoleLine
    facts: dict[str, str]


@dataclass
class Run:
    """One bed's machine through its three boots: first, after a reboot, after a power cut."""

    bed: VmBed
    timing: Timing
    token: str = field(default_factory=lambda: secrets.token_hex(8))
    boots: list[Boot] = field(default_factory=list)


def boot_and_log_in(vm: Machine, remote: Remote, run: Run, *, after: int = -1) -> float:
    """Wait for the boot chain and the ready marker (after line ``after``), log in over SSH and
    record what the guest shows; returns the host's monotonic time of the login."""
    chain = wait_firmware_boot(vm, after=after)
    ready = wait_ready(vm, None if run.boots else run.timing, after=after)
    if not remote.known_hosts.exists():
        remote.record_host_keys(BOOT_TIMEOUT)
    login_at = remote.wait_login(BOOT_TIMEOUT, root_fs="ext4")
    lines = remote.output(FACTS).splitlines()
    facts = dict(line.split("=", 1) for line in lines if "=" in line)
    run.boots.append(Boot(chain, ready, facts))
    return login_at


def leave_marks(remote: Remote, run: Run) -> None:
    """A file on the root, and on UEFI a variable in the NVRAM, both synced."""
    remote.output(f"mkdir -p {Path(MARK).parent} && echo {run.token} > {MARK} && sync")
    if run.bed.firmware is not None and run.bed.firmware.code:
        variable = f"/sys/firmware/efi/efivars/{EFI_VARIABLE}"
        remote.output(f"printf '\\007\\000\\000\\000{run.token}' > {variable}")


def firmware_machine(bed: VmBed, workdir: Path, timing: Timing) -> Run:
    run = Run(bed, timing)
    assert bed.ssh_key is not None
    started = time.monotonic()
    with Machine(bed, SCENARIO, workdir / "first", ssh=True, reboot=True) as vm:
        remote = Remote(vm, bed.ssh_key, workdir)
        login_at = boot_and_log_in(vm, remote, run)
        timing.values["firmware_line_host_s"] = run.boots[0].chain.firmware.seconds
        timing.values["kernel_from_grub_host_s"] = run.boots[0].chain.kernel.seconds
        timing.values["boot_to_ssh_host_s"] = login_at - started
        leave_marks(remote, run)

        before_reboot = len(vm.lines) - 1
        rebooting = time.monotonic()
        # --no-block: the session returns before sshd goes down with the system.
        remote.output("systemctl reboot --no-block")
        login_at = boot_and_log_in(vm, remote, run, after=before_reboot)
        timing.values["reboot_to_ssh_host_s"] = login_at - rebooting
        # Where a reboot's time goes: the old system's shutdown, then the firmware's start.
        restarting = vm.find(r"reboot: Restarting system", after=before_reboot)
        if restarting is not None:
            timing.values["reboot_shutdown_host_s"] = vm.host_time(restarting) - rebooting
            firmware_line = run.boots[1].chain.firmware
            timing.values["reboot_firmware_host_s"] = firmware_line.seconds - restarting.seconds
        storage = vm.storage
    # Leaving the block killed QEMU: a power cut, whatever the guest was doing.
    assert storage is not None
    started = time.monotonic()
    with Machine(bed, SCENARIO, workdir / "after-power-cut", ssh=True, storage=storage) as vm:
        remote = Remote(vm, bed.ssh_key, workdir, host_alias=remote.alias)
        login_at = boot_and_log_in(vm, remote, run)
        timing.values["power_cut_boot_to_ssh_host_s"] = login_at - started
        remote.run("systemctl poweroff --no-block")
        vm.wait_exit(POWEROFF_TIMEOUT)
    record_facts(workdir, run)
    return run


@pytest.fixture(scope="module")
def runs(
    bios_bed: VmBed, uefi_bed: VmBed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Run]]]:
    """Both machines at once; each test waits for its own."""
    beds = {"bios": bios_bed, "uefi": uefi_bed}
    with ThreadPoolExecutor(len(beds), thread_name_prefix="vm-firmware") as pool:
        futures = {}
        for name, bed in beds.items():
            timing = Timing(f"firmware-{name}")
            TIMINGS.append(timing)
            workdir = tmp_path_factory.mktemp(name)
            for boot in ("first", "after-power-cut"):
                (workdir / boot).mkdir()
            futures[name] = pool.submit(firmware_machine, bed, workdir, timing)
        yield futures


def result(runs: dict[str, Future[Run]], name: str) -> Run:
    run = runs[name].result(timeout=1500)
    assert len(run.boots) == 3, run.boots
    return run


def record_facts(workdir: Path, run: Run) -> None:
    """What each boot showed, beside the machines' console.log files (for the record)."""
    boots = [
        {"command_line": boot.chain.command_line, "ready": boot.ready.text, **boot.facts}
        for boot in run.boots
    ]
    facts = {"token": run.token, "boots": boots}
    (workdir / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")


def assert_booted_by_grub_from_the_bed(run: Run, boot: Boot) -> None:
    """GRUB started the tree's kernel with the root by the bed's UUID, and the guest mounts
    each filesystem of the bed's layout where it belongs. The exact command line is the
    guest's /proc/cmdline: the console may drop characters on a busy host (the kernel's serial
    console gives up waiting for a UART the emulator does not drain in time)."""
    root = run.bed.filesystem("/")
    assert boot.chain.command_line.startswith("BOOT_IMAGE="), boot.chain.command_line
    assert boot.facts["cmdline"].startswith("BOOT_IMAGE="), boot.facts
    assert f"root=UUID={root.uuid} " in boot.facts["cmdline"] + " ", boot.facts
    assert boot.facts["root"].split() == [root.device, root.uuid, "ext4"], boot.facts
    assert boot.ready.index > boot.chain.kernel.index > boot.chain.loading.index


def test_bios_bed_boots_through_seabios_and_grub_from_its_mbr_disk(
    runs: dict[str, Future[Run]],
) -> None:
    run = result(runs, "bios")
    boot = run.boots[0]
    assert "SeaBIOS" in boot.chain.firmware.text, boot.chain.firmware
    assert_booted_by_grub_from_the_bed(run, boot)
    # One filesystem: /boot is the root's directory, and no EFI anywhere.
    assert [fs.mountpoint for fs in run.bed.filesystems] == ["/"]
    assert run.bed.filesystem("/").device == "/dev/vda1"
    assert boot.facts["boot"] == "" and boot.facts["esp"] == "", boot.facts
    assert boot.facts["efi"] == "no", boot.facts
    assert boot.facts["cmdline"].startswith("BOOT_IMAGE=/boot/vmlinuz-"), boot.facts


def test_uefi_bed_boots_through_ovmf_and_grub_from_its_esp(
    runs: dict[str, Future[Run]],
) -> None:
    run = result(runs, "uefi")
    boot = run.boots[0]
    assert "BdsDxe: starting Boot" in boot.chain.firmware.text, boot.chain.firmware
    assert_booted_by_grub_from_the_bed(run, boot)
    esp, boot_fs = run.bed.filesystem("/boot/efi"), run.bed.filesystem("/boot")
    assert boot.facts["esp"].split() == [esp.device, esp.uuid, "vfat"], boot.facts
    assert boot.facts["boot"].split() == [boot_fs.device, boot_fs.uuid, "ext4"], boot.facts
    assert boot_fs.device != run.bed.filesystem("/").device
    assert boot.facts["efi"] == "yes", boot.facts
    # The kernel is at the top of the /boot filesystem GRUB read it from.
    assert boot.facts["cmdline"].startswith("BOOT_IMAGE=/vmlinuz-"), boot.facts


@pytest.mark.parametrize("name", ["bios", "uefi"])
def test_a_reboot_comes_back_through_firmware_and_grub_on_the_same_disk(
    runs: dict[str, Future[Run]], name: str
) -> None:
    run = result(runs, name)
    first, again = run.boots[0], run.boots[1]
    assert again.chain.firmware.index > first.ready.index, "no firmware line after the reboot"
    assert_booted_by_grub_from_the_bed(run, again)
    assert again.facts["boot_id"] != first.facts["boot_id"], again.facts
    assert again.facts["mark"] == run.token, again.facts


@pytest.mark.parametrize("name", ["bios", "uefi"])
def test_a_new_machine_boots_the_same_storage_after_a_power_cut(
    runs: dict[str, Future[Run]], name: str
) -> None:
    run = result(runs, name)
    after = run.boots[2]
    assert_booted_by_grub_from_the_bed(run, after)
    assert after.facts["mark"] == run.token, after.facts
    if name == "uefi":
        # The NVRAM is the machine's own and went through the power cut with it.
        assert after.facts["efi_variable"] == run.token, after.facts


def test_a_firmware_machine_names_no_kernel_and_keeps_its_nvram_apart(
    uefi_bed: VmBed, tmp_path: Path
) -> None:
    """The QEMU command line of a firmware bed: no -kernel, the scenario in SMBIOS, OVMF's code
    read-only and a variable store of the machine's own (the shipped template untouched)."""
    firmware = uefi_bed.firmware
    assert firmware is not None
    storage = Storage.create(uefi_bed, tmp_path)
    machine = Machine(uefi_bed, "remote", tmp_path, storage=storage)
    command = " ".join(machine.qemu_command(storage, tmp_path / "console"))
    machine.stop()  # removes its socket directory; QEMU never started
    assert "-kernel" not in command and "-append" not in command, command
    assert "-smbios type=11,value=dboot.test=remote" in command, command
    assert f"readonly=on,file={firmware.code}" in command, command
    assert storage.efi_vars is not None and storage.efi_vars.parent == tmp_path
    assert f"unit=1,file={storage.efi_vars}" in command, command
    assert storage.efi_vars.read_bytes() == Path(firmware.vars_template).read_bytes()
