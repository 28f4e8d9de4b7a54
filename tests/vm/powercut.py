"""Issue 17 §4.4: power cuts during `dboot install`, for test_vm_install's pool.

A machine of the BIOS bed (SeaBIOS, GRUB on an MBR disk) on one disk, through cycles of:
1. boot the disk as the last cut left it, through firmware and GRUB: it must reach a working
   system, the old one (its ready marker, then an SSH login into the disk's root) or the new
   one on probation (the shim's probation choice, then the image's init running). Never
   neither. A probation boot is cut too once its init runs: it spent the one boot it had, so
   the boot after it must be the old system's;
2. in the old system, over SSH, `dboot install` again: a retry over whatever the last cut
   left, never cleaned by hand;
3. kill QEMU at this cycle's moment of the install. The first cycle lets the install finish
   (so its next boot is the new system's, and it measures how long an install takes); each
   later one cuts at a fraction of that, one fraction in each tenth of it over the machines.

The image is the busybox test image with its kernel modules left out (`--no-modules`): the
install's steps are all there, in seconds rather than minutes, so that the cuts fit the VM
tier's budget. Killing QEMU loses whatever the guest had not written: a power cut for the
guest. The moments come from a seeded draw (``DBOOT_POWERCUT_SEED``; printed with the VM
timings), so a failure can be replayed.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import subprocess
import threading
import time
from pathlib import Path

from tests.vm.build import VmBed
from tests.vm.conftest import BOOT_TIMEOUT, wait_firmware_boot, wait_ready
from tests.vm.machine import Machine, Storage
from tests.vm.remote import Remote

SEED = int(os.environ.get("DBOOT_POWERCUT_SEED", str(random.SystemRandom().randrange(10**6))))
MACHINES = 2
CUTS_PER_MACHINE = 5  # ten cuts in all, at ten different moments
IMAGE = "docker-archive:/root/test-image.tar"
# --force: the image has no SSH server, which the preflight blocks in an SSH session; here
# the serial console is at hand, which is what the test reads.
INSTALL = (
    "dboot install --yes --force --no-reboot --no-modules --revert-after 2"
    f" {IMAGE} /sbin/dboot-test-init"
)
OLD_READY = r"DBOOT-VM: ready scenario=remote "
# The shim's choice of a probation boot (not "probation spent", the boot after it).
PROBATION = r"dboot-stage: \S+ choice: probation: "
NEW_INIT_RUNS = r"DBOOT-TEST: init-start"
ROOT_IS_TREE = "test -d /sysroot/dboot && echo tree || echo disk"
STEP = re.compile(r"^==> (.*)")
INSTALL_TIME_WAIT = 1200.0


@dataclasses.dataclass
class Cut:
    machine: int
    number: int
    delay_s: float  # from the start of `dboot install` to the cut
    last_step: str = ""  # the install's last "==>" line before the cut
    finished: bool = False  # the install ended before the cut
    exit_status: int | None = None  # the install's (ssh's), where it ended before the cut
    output_tail: list[str] = dataclasses.field(default_factory=list)  # its last lines
    booted: list[str] = dataclasses.field(default_factory=list)  # the boots after it, in turn


def fractions(machine: int, draw: random.Random) -> list[float]:
    """This machine's moments, as fractions of an install: one in every MACHINES-th tenth."""
    tenths = range(machine, MACHINES * CUTS_PER_MACHINE, MACHINES)
    moments = [(tenth + draw.random()) / (MACHINES * CUTS_PER_MACHINE) for tenth in tenths]
    draw.shuffle(moments)
    return moments


def boot_to_the_old_system(
    bed: VmBed, storage: Storage, workdir: Path, key: Path, after: Cut | None
) -> tuple[Machine, Remote]:
    """Boots until the old system is up and logged into, every boot checked and noted in
    ``after`` (the cut before them); returns the running machine, which the caller cuts. A
    probation boot is followed up to its init, then cut: it spent its one boot."""
    for attempt in range(3):
        boot_dir = workdir / f"boot-{attempt}"
        boot_dir.mkdir(parents=True)
        # One vCPU: its work is light, and the install machines beside it need the host.
        vm = Machine(bed, "remote", boot_dir, cpus=1, ssh=True, reboot=True, storage=storage)
        try:
            vm.start()
            wait_firmware_boot(vm)
            first = vm.wait_for(f"{OLD_READY}|{PROBATION}", BOOT_TIMEOUT)
            if re.search(PROBATION, first.text):
                vm.wait_for(NEW_INIT_RUNS, BOOT_TIMEOUT, after=first.index)
                if after is not None:
                    after.booted.append("new on probation")
                vm.stop()
                continue
            wait_ready(vm, None, after=first.index - 1)
            # One known_hosts for every boot of this disk: the host keys must never change.
            remote = Remote(vm, key, workdir.parent, host_alias="power-cut-machine")
            if not remote.known_hosts.exists():
                remote.record_host_keys(BOOT_TIMEOUT)
            remote.wait_login(BOOT_TIMEOUT, root_fs="ext4")
            if remote.output(ROOT_IS_TREE).strip() != "disk":
                raise vm.error("the old system's ready marker, but the root is the new tree")
            if after is not None:
                after.booted.append("old")
            return vm, remote
        except BaseException:
            vm.stop()
            raise
    raise AssertionError(f"three boots after {after} and none of them the old system")


def install_until_cut(vm: Machine, remote: Remote, cut: Cut, let_finish: bool) -> float:
    """`dboot install` over SSH, its steps noted, QEMU killed at ``cut.delay_s`` (or once the
    install ended, ``let_finish``); returns how long the install ran."""
    install = subprocess.Popen(
        remote.command(INSTALL), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []

    def read() -> None:
        assert install.stdout is not None
        output.extend(line.rstrip("\n") for line in install.stdout)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        cut.exit_status = install.wait(timeout=600 if let_finish else cut.delay_s)
        cut.finished = True
    except subprocess.TimeoutExpired:
        if let_finish:
            raise
    ran = time.monotonic() - started
    vm.stop()  # the power cut
    install.kill()
    install.wait(timeout=30)
    reader.join(timeout=10)
    if let_finish and install.returncode != 0:
        raise vm.error(f"the install failed (rc {install.returncode}):\n" + "\n".join(output))
    cut.output_tail = output[-5:]
    steps = [match.group(1) for match in map(STEP.match, output) if match]
    cut.last_step = steps[-1] if steps else "(none yet)"
    return ran


@dataclasses.dataclass
class InstallTime:
    """How long a whole install takes, measured by machine 0 and waited for by the others."""

    seconds: float = 0.0
    known: threading.Event = dataclasses.field(default_factory=threading.Event)


def power_cut_machine(
    bed: VmBed, workdir: Path, machine: int, key: Path, install_time: InstallTime
) -> list[Cut]:
    """This machine's cuts. Machine 0 first lets an install finish (cut number 0): it
    measures ``install_time`` for every machine, and its next boot is the new system's."""
    storage = Storage.create(bed, workdir)
    moments = fractions(machine, random.Random(SEED * MACHINES + machine))
    first = 0 if machine == 0 else 1
    cuts: list[Cut] = []
    for number in range(first, CUTS_PER_MACHINE + 2):
        cycle_dir = workdir / f"cycle-{number}"
        vm, remote = boot_to_the_old_system(
            bed, storage, cycle_dir, key, cuts[-1] if cuts else None
        )
        try:
            if number == CUTS_PER_MACHINE + 1:
                break  # the last cut's boots were the check
            if number == 0:
                cut = Cut(machine, 0, 0.0)
                install_time.seconds = install_until_cut(vm, remote, cut, let_finish=True)
                cut.delay_s = round(install_time.seconds, 1)
                install_time.known.set()
            else:
                if not install_time.known.wait(timeout=INSTALL_TIME_WAIT):
                    raise AssertionError("machine 0 never measured an install")
                cut = Cut(machine, number, round(moments[number - 1] * install_time.seconds, 1))
                install_until_cut(vm, remote, cut, let_finish=False)
            cuts.append(cut)
        finally:
            vm.stop()
    return cuts
