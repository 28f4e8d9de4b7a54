"""The VM tier's fixtures: the built test bed (once per session) and a timing report.

The bed is built (or taken from the cache) by the first VM test; a machine that cannot build it
(no qemu, no debootstrap, not root ...) FAILS every VM test with the install command: the VM
tier is the proof that matters, so it never skips silently.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.vm import build
from tests.vm.machine import ConsoleLine, Machine

# Under TCG the first boot reaches multi-user.target in about 20 s here; CI machines are slower
# and busier (four machines at once on two cores), so these are backstops, not expectations.
BOOT_TIMEOUT = 360.0
SWITCH_TIMEOUT = 240.0
POWEROFF_TIMEOUT = 90.0
READY = r"DBOOT-VM: ready scenario={scenario} uptime=(?P<uptime>[\d.]+)"


@dataclass
class Timing:
    scenario: str
    values: dict[str, float] = field(default_factory=dict)


TIMINGS: list[Timing] = []


def bed_for(request: pytest.FixtureRequest, variant_name: str) -> build.VmBed:
    """Build (or take from the cache) one variant's bed; fail, never skip, when it cannot be."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def log(text: str) -> None:
        if reporter is not None:
            reporter.write_line(f"build-vm: {text}")

    try:
        bed = build.build(log, build.VARIANTS[variant_name])
    except build.BuildError as e:
        pytest.fail(f"VM test bed ({variant_name}): {e}", pytrace=False)
    if bed.base_seconds or bed.disk_seconds:
        TIMINGS.append(
            Timing(f"build-{variant_name}", {"base": bed.base_seconds, "disk": bed.disk_seconds})
        )
    return bed


@pytest.fixture(scope="session")
def vm_bed(request: pytest.FixtureRequest) -> build.VmBed:
    """The x86_64 bed (the default variant)."""
    return bed_for(request, build.DEFAULT.name)


@pytest.fixture(scope="session")
def arm64_bed(request: pytest.FixtureRequest) -> build.VmBed:
    """The arm64 bed: an aarch64 Debian under qemu-system-aarch64 (TCG)."""
    return bed_for(request, "arm64")


@pytest.fixture(scope="session")
def bios_bed(request: pytest.FixtureRequest) -> build.VmBed:
    """The x86_64 remote machine on an MBR disk, booted by SeaBIOS and the GRUB on its disk."""
    return bed_for(request, "x86_64-bios")


@pytest.fixture(scope="session")
def uefi_bed(request: pytest.FixtureRequest) -> build.VmBed:
    """The x86_64 remote machine on a GPT disk (ESP, /boot, root), booted by OVMF and GRUB."""
    return bed_for(request, "x86_64-uefi")


@pytest.fixture(scope="session", params=["x86_64", "arm64"])
def each_arch_bed(request: pytest.FixtureRequest) -> build.VmBed:
    """For a scenario that must hold on every architecture: one run per bed."""
    fixture = "vm_bed" if request.param == build.DEFAULT.name else "arm64_bed"
    bed: build.VmBed = request.getfixturevalue(fixture)
    return bed


@pytest.fixture
def vm_timing(request: pytest.FixtureRequest) -> Iterator[Timing]:
    """Seconds a test measured, shown in the terminal summary and written to the cache."""
    timing = Timing(request.node.name)
    yield timing
    if timing.values:
        TIMINGS.append(timing)


def wait_ready(vm: Machine, timing: Timing | None, *, after: int = -1) -> ConsoleLine:
    """Boot to the scenario unit's ready marker: systemd reached multi-user.target first.
    ``after``: a console line before this boot (a reboot's), then no timing is recorded."""
    ready = vm.wait_for(READY.format(scenario=re.escape(vm.scenario)), BOOT_TIMEOUT, after=after)
    reached = vm.find(r"Reached target .*(multi-user\.target|Multi-User System)", after=after)
    # Its status line may be cut by a kernel message on a busy console: then systemd's answer
    # in the marker says the same.
    seen = reached is not None and reached.index < ready.index
    assert seen or marker_value(ready, "multi-user") == "active", (
        "the ready marker came before systemd reported multi-user.target"
    )
    if timing is not None and after == -1:
        timing.values["boot_host_s"] = ready.seconds
        timing.values["boot_guest_uptime_s"] = float(marker_value(ready, "uptime"))
    return ready


@dataclass(frozen=True)
class FirmwareBoot:
    """One boot of a firmware bed, as its console showed it: the firmware, then GRUB, then the
    kernel that GRUB started."""

    firmware: ConsoleLine  # Firmware.banner
    grub: ConsoleLine  # GRUB's menu
    loading: ConsoleLine  # GRUB's "Loading Linux VERSION ..."
    kernel: ConsoleLine  # the kernel's "Command line: BOOT_IMAGE=..."

    @property
    def command_line(self) -> str:
        return self.kernel.text.split("Command line: ", 1)[1].strip()


GRUB_MENU = r"GNU GRUB +version \S+"
GRUB_LOADS_LINUX = r"Loading Linux \S+ \.\.\."
KERNEL_FROM_GRUB = r"Command line: BOOT_IMAGE=\S+ "


def wait_firmware_boot(vm: Machine, *, after: int = -1) -> FirmwareBoot:
    """A firmware bed's boot chain on the console, in order, after line ``after`` (the first
    boot by default; give a line before a reboot for the next one)."""
    firmware = vm.bed.firmware
    assert firmware is not None, f"{vm.bed.variant.name} boots with -kernel, not a firmware"
    banner = vm.wait_for(firmware.banner, BOOT_TIMEOUT, after=after)
    grub = vm.wait_for(GRUB_MENU, BOOT_TIMEOUT, after=banner.index)
    loading = vm.wait_for(GRUB_LOADS_LINUX, BOOT_TIMEOUT, after=grub.index)
    kernel = vm.wait_for(KERNEL_FROM_GRUB, BOOT_TIMEOUT, after=loading.index)
    return FirmwareBoot(banner, grub, loading, kernel)


def marker_value(line: ConsoleLine, key: str) -> str:
    """The value of ``key=VALUE`` in a marker line."""
    found = re.search(rf"\b{key}=(\S+)", line.text)
    assert found, f"no {key}= in console line: {line.text}"
    return found.group(1)


def assert_in_order(vm: Machine, after: int, patterns: list[str]) -> list[ConsoleLine]:
    """Each pattern matches a console line, each after the previous one."""
    found: list[ConsoleLine] = []
    for pattern in patterns:
        line = vm.find(pattern, after=after)
        assert line is not None, vm.error(f"/{pattern}/ missing or out of order after line {after}")
        found.append(line)
        after = line.index
    return found


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TIMINGS:
        return
    terminalreporter.section("VM timings (seconds)")
    for timing in TIMINGS:
        values = ", ".join(f"{key} {value:.1f}" for key, value in timing.values.items())
        terminalreporter.write_line(f"{timing.scenario}: {values}")
    build.CACHE.mkdir(parents=True, exist_ok=True)
    (build.CACHE / "timings.json").write_text(
        json.dumps({t.scenario: t.values for t in TIMINGS}, indent=2) + "\n"
    )
