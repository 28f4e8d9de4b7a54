"""Issue 9 §7: a remote switch stays reachable, and comes back by itself when nobody keeps it.

The old machine (the x86_64 bed) is Debian 12 with systemd-networkd on a DHCP lease from QEMU's
user network, openssh-server, and a test key in root's authorized_keys; QEMU forwards only
127.0.0.1:PORT on the host to its port 22. The test logs in as a user would, records the host
keys (ssh-keyscan) before the switch, and runs `dboot switch` in that SSH session, which the
switch ends. Every later login uses StrictHostKeyChecking=yes against that known_hosts, with the
same key: the carry-over must have brought both along.

Three machines run at once (module fixture ``runs``), since two of them mostly wait for a
two-minute revert deadline; each test then judges one:
- keep: the rescue image with its systemd, `--revert-after 2`; `touch /run/dboot/keep`; past
  the deadline it is still the rescue system (tmpfs root, no reboot on the console).
- revert: the same switch, nobody keeps it: the machine reboots and the old Debian boots again
  from its disk (the marker written before the switch is there; root is ext4 again).
- shell: the rescue image with /bin/sh as init (no service manager) and `--ssh`: the keeper's
  sshd answers.
Figures (the pytest "VM timings" section): from `dboot switch` printing its injection step to
the first accepted login in the new system, and from the revert's reboot (the kernel's
"Restarting system" line, the deadline plus a sync) to the old system's multi-user.target on
the host's clock (the guest's uptime restarts at the reboot).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.vm.build import VmBed
from tests.vm.conftest import BOOT_TIMEOUT, POWEROFF_TIMEOUT, TIMINGS, Timing, wait_ready
from tests.vm.machine import GUEST_CHECK_PORT, Machine
from tests.vm.remote import Remote

pytestmark = [pytest.mark.vm, pytest.mark.timeout(1800)]

RESCUE = "docker-archive:/root/rescue.tar"
REVERT_MINUTES = 2
SWITCHED_MARKER = "/var/lib/dboot-vm/switched"
# From `dboot switch` to a login in the new system: the copy of the rescue image and its boot,
# under TCG with three machines sharing two cores. A backstop, not an expectation.
LOGIN_TIMEOUT = 420.0
FOREVER = 0xFFFFFFFF  # valid_life_time of an address that never expires
RESTARTING = r"reboot: Restarting system"
MULTI_USER = r"Reached target .*(multi-user\.target|Multi-User System)"


@dataclass
class Switched:
    """One remote switch: where and when it happened, and what was seen after it."""

    vm: Machine
    remote: Remote
    timing: Timing
    address_before: dict[str, object]
    inject_at: float  # host monotonic: dboot printed its injection step
    login_at: float  # host monotonic: first accepted login in the new system
    dboot_output: str
    facts: dict[str, str] = field(default_factory=dict)


def global_ipv4(remote: Remote) -> dict[str, object]:
    """The machine's one global IPv4 address, as `ip -j` gives it."""
    links = json.loads(remote.output("ip -j -4 addr show scope global"))
    found = [item for link in links for item in link.get("addr_info", [])]
    assert len(found) == 1, found
    address: dict[str, object] = found[0]
    return address


def switch_over_ssh(
    vm: Machine,
    bed: VmBed,
    workdir: Path,
    timing: Timing,
    options: str,
    init: str,
    on_line: Callable[[str], None] | None = None,
) -> Switched:
    """Boot, log in, record the host keys and the address, run `dboot switch` in that SSH
    session (which the switch ends; ``on_line`` sees each line it prints, as it comes), and
    log in to the new system."""
    assert bed.ssh_key is not None
    remote = Remote(vm, bed.ssh_key, workdir)
    wait_ready(vm, timing)
    remote.record_host_keys(BOOT_TIMEOUT)
    remote.wait_login(60, root_fs="ext4")
    before = global_ipv4(remote)
    assert before.get("dynamic") is True, f"the old system's address is not a DHCP one: {before}"
    command = f"touch {SWITCHED_MARKER} && sync && dboot switch --yes {options} {RESCUE} {init}"
    switch = subprocess.Popen(
        remote.command(f"mkdir -p {Path(SWITCHED_MARKER).parent} && {command}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[tuple[float, str]] = []
    assert switch.stdout is not None
    for line in switch.stdout:  # ends when the switch kills the old sshd
        lines.append((time.monotonic(), line.rstrip("\n")))
        if on_line is not None:
            on_line(lines[-1][1])
    switch.wait()
    output = "\n".join(text for _, text in lines)
    injecting = [at for at, text in lines if "Injecting execve" in text]
    if not injecting:
        raise vm.error(f"dboot switch did not reach the injection (ssh rc {switch.returncode}):\n"
                       f"{output}")  # fmt: skip
    login_at = remote.wait_login(LOGIN_TIMEOUT, root_fs="tmpfs")
    timing.values["inject_to_login_host_s"] = login_at - injecting[0]
    return Switched(vm, remote, timing, before, injecting[0], login_at, output)


def check_new_system(switched: Switched) -> None:
    """Facts of the system we logged in to after the switch, kept for the tests."""
    remote = switched.remote
    switched.facts["root_fs"] = remote.output("findmnt -n -o FSTYPE /").strip()
    switched.facts["pid1"] = remote.output("readlink /proc/1/exe").strip()
    after = global_ipv4(remote)
    switched.facts["address"] = f"{after['local']}/{after['prefixlen']}"
    switched.facts["valid_lft"] = str(after.get("valid_life_time"))
    switched.facts["address_dynamic"] = str(after.get("dynamic", False))
    switched.facts["networkd"] = remote.run("systemctl is-active systemd-networkd").stdout.strip()
    switched.timing.values["address_valid_s"] = float(switched.facts["valid_lft"])


def keep_scenario(bed: VmBed, workdir: Path, timing: Timing) -> Switched:
    """As the README's remote walk: --ssh-check first, then the switch, then keep."""
    with Machine(bed, "remote", workdir, ssh=True) as vm:
        assert bed.ssh_key is not None
        remote = Remote(vm, bed.ssh_key, workdir)
        checked: list[subprocess.CompletedProcess[str]] = []

        def log_in_before_commit(line: str) -> None:
            if "log in to the new root from another terminal" in line:
                # Only the rescue image has this file: the login is into the RAM root.
                command = "test -e /usr/lib/tmpfiles.d/dboot.conf && echo in-the-rescue-root"
                checked.append(remote.run_check(command))

        options = f"--revert-after {REVERT_MINUTES} --ssh-check {GUEST_CHECK_PORT}"
        switched = switch_over_ssh(
            vm, bed, workdir, timing, options, "/sbin/init", log_in_before_commit
        )
        switched.facts["ssh_check"] = (
            f"rc={checked[0].returncode} {checked[0].stdout.strip()} {checked[0].stderr.strip()}"
            if checked
            else "no ssh-check notice"
        )
        check_new_system(switched)
        switched.remote.output("touch /run/dboot/keep")
        # Past the deadline (counted by the keeper from its start, after the injection) with
        # room for a slow keeper tick: still the rescue system, no reboot on the console.
        past_deadline = switched.inject_at + REVERT_MINUTES * 60 + 45
        time.sleep(max(0.0, past_deadline - time.monotonic()))
        switched.facts["root_fs_after_deadline"] = switched.remote.output(
            "findmnt -n -o FSTYPE /"
        ).strip()
        switched.facts["keeper_log"] = switched.remote.run("cat /var/log/dboot-keeper.log").stdout
        switched.remote.run("systemctl poweroff --no-block")
        vm.wait_exit(POWEROFF_TIMEOUT)
    return switched


def revert_scenario(bed: VmBed, workdir: Path, timing: Timing) -> Switched:
    with Machine(bed, "remote", workdir, ssh=True, reboot=True) as vm:
        switched = switch_over_ssh(vm, bed, workdir, timing, f"--revert-after {REVERT_MINUTES}",
                                   "/sbin/init")  # fmt: skip
        check_new_system(switched)
        restarting = vm.wait_for(RESTARTING, REVERT_MINUTES * 60 + 180)
        back = vm.wait_for(r"DBOOT-VM: old-system-back ", BOOT_TIMEOUT, after=restarting.index)
        reached = vm.find(MULTI_USER, after=restarting.index)
        assert reached is not None and reached.index < back.index, vm.error(
            "no multi-user.target before the old system's marker"
        )
        timing.values["revert_reboot_after_inject_host_s"] = (
            vm.host_time(restarting) - switched.inject_at
        )
        timing.values["reboot_to_old_multi_user_host_s"] = reached.seconds - restarting.seconds
        switched.facts["back"] = back.text
        vm.wait_exit(POWEROFF_TIMEOUT)
    return switched


def shell_scenario(bed: VmBed, workdir: Path, timing: Timing) -> Switched:
    with Machine(bed, "remote", workdir, ssh=True) as vm:
        switched = switch_over_ssh(vm, bed, workdir, timing, "--ssh --no-revert", "/bin/sh")
        check_new_system(switched)
        switched.facts["processes"] = switched.remote.output("ps -e -o pid=,comm=")
        # No init to ask: busybox powers the machine off itself (the session dies with it).
        with contextlib.suppress(subprocess.TimeoutExpired):
            switched.remote.run("sync; busybox poweroff -f", timeout=15)
        vm.wait_exit(POWEROFF_TIMEOUT)
    return switched


SCENARIOS: dict[str, Callable[[VmBed, Path, Timing], Switched]] = {
    "keep": keep_scenario,
    "revert": revert_scenario,
    "shell": shell_scenario,
}


@pytest.fixture(scope="module")
def runs(
    vm_bed: VmBed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Switched]]]:
    """The three machines, booted at once; each test waits for its own."""
    with ThreadPoolExecutor(len(SCENARIOS), thread_name_prefix="vm-remote") as pool:
        futures = {}
        for name, scenario in SCENARIOS.items():
            timing = Timing(f"remote-{name}")
            TIMINGS.append(timing)
            futures[name] = pool.submit(scenario, vm_bed, tmp_path_factory.mktemp(name), timing)
        yield futures


def result(runs: dict[str, Future[Switched]], name: str) -> Switched:
    switched = runs[name].result(timeout=1500)
    # For the record (the note): what each new system showed, beside its console.log.
    facts = {**switched.facts, "dboot_output": switched.dboot_output}
    (switched.vm.workdir / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    return switched


def assert_reachable_as_before(switched: Switched) -> None:
    """Same address, still valid, and never forever: the stage keeps a lease for a bounded
    time (initstage.netkeep.kept_lifetime), which the new system's own DHCP client renews."""
    facts, before = switched.facts, switched.address_before
    assert facts["address"] == f"{before['local']}/{before['prefixlen']}", facts
    assert facts["address_dynamic"] == "True" and 0 < int(facts["valid_lft"]) < FOREVER, facts


def test_kept_rescue_system_stays_past_the_deadline(runs: dict[str, Future[Switched]]) -> None:
    switched = result(runs, "keep")
    # --ssh-check: a login into the RAM root's sshd, same key and host key, before the commit.
    assert switched.facts["ssh_check"].startswith("rc=0 in-the-rescue-root"), switched.facts
    assert re.search(
        r"login by root from \S+ \(publickey \S+ SHA256:\S+\) accepted", switched.dboot_output
    ), switched.dboot_output
    assert switched.facts["root_fs"] == "tmpfs", switched.facts
    assert switched.facts["pid1"].endswith("/systemd"), switched.facts
    assert_reachable_as_before(switched)
    assert "revert" in switched.dboot_output and "/run/dboot/keep" in switched.dboot_output, (
        switched.dboot_output
    )
    assert switched.facts["root_fs_after_deadline"] == "tmpfs", switched.facts
    assert "revert is off" in switched.facts["keeper_log"], switched.facts["keeper_log"]
    assert switched.vm.find(RESTARTING) is None, switched.vm.error("the kept system rebooted")


def test_unkept_switch_reverts_to_the_old_system(runs: dict[str, Future[Switched]]) -> None:
    switched = result(runs, "revert")
    assert switched.facts["root_fs"] == "tmpfs", switched.facts
    assert_reachable_as_before(switched)
    back = switched.facts["back"]
    assert "root=ext4" in back and "pid1=" in back and "systemd" in back, back
    assert switched.vm.find(r"Kernel panic") is None


def test_shell_init_with_ssh_is_reachable(runs: dict[str, Future[Switched]]) -> None:
    switched = result(runs, "shell")
    assert switched.facts["root_fs"] == "tmpfs", switched.facts
    assert switched.facts["pid1"] in ("/usr/bin/dash", "/bin/dash"), switched.facts
    commands = {
        line.split()[1] for line in switched.facts["processes"].splitlines() if line.split()
    }
    assert "systemd" not in commands and "sshd" in commands, commands
    assert_reachable_as_before(switched)
