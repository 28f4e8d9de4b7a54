"""Issue 19 §2: nothing lost. A busy database shuts down clean when the host's init stops it
the way its makers meant, before the switch.

The old machine (the x86_64-db bed, ``tests/vm/dbbed.py``) is the remote machine of
test_vm_remote.py with PostgreSQL 15 and MariaDB 10.11 from Debian's packages, each under a load
of numbered commits over its local socket (every acknowledged number goes to the serial
console, ``DBOOT-ACK: pg|maria N``), and a unit whose ``ExecStop=`` takes 8 s and then writes a
marker to the disk. Two machines at once (module fixture ``runs``), each switched over SSH to
the rescue image as a user would, then brought back to the old system by a reboot from the
rescue system; on the way back, before the databases start, the old system reports
PostgreSQL's cluster state, then MariaDB's start (crash recovery or not), the rows each table
holds and the marker:
- graceful: `dboot switch` with the default stop. PostgreSQL says "shut down", MariaDB starts
  without crash recovery, every acknowledged row is there, the marker is on the disk.
- signal: first a switch (of the small busybox image: the copy is not the point) called off
  right after its graceful stop (``DBOOT_TEST_PAUSE=stopped``, then SIGTERM): systemd's own
  timestamps show each client stopped before its database began to, and the undo starts them
  all again; then `dboot switch --stop=signal`, whose outcome is recorded, not judged (the
  stage's SIGTERM and, 3 s later, SIGKILL, as before issue 19).
Figures (the pytest "VM timings" section, and ``facts.json`` beside each ``console.log``): the
graceful stop's own seconds (dboot's; the injection follows at once) and, on the host's clock,
from dboot's stop step to its injection; on the guest's clock (its uptime, which goes on across
the switch), how long before the init stage's first line each client's last acknowledgement
came, and the downtime, from the last acknowledgement to the first login into the rescue
system.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from injector.stop import systemd
from tests.vm.build import VmBed
from tests.vm.conftest import BOOT_TIMEOUT, POWEROFF_TIMEOUT, TIMINGS, Timing, bed_for, wait_ready
from tests.vm.machine import Machine
from tests.vm.remote import Remote
from tests.vm.test_vm_remote import LOGIN_TIMEOUT

pytestmark = [pytest.mark.vm, pytest.mark.timeout(2400)]

# --no-modules: the rescue system needs none of the kernel's modules here, and leaving out their
# 92 MiB saves each switch a minute of copying under emulation.
SWITCH = "dboot switch --yes -v --no-revert --no-modules"
RESCUE = "docker-archive:/root/rescue.tar /sbin/init"
SWITCHED_MARKER = "/var/lib/dboot-vm/switched"
EXECSTOP_MARKER = "/var/lib/dboot-vm/execstop-marker"
PAUSED = "/run/dboot-vm-paused"
ACK = re.compile(r"DBOOT-ACK: (pg|maria) (\d+) ([\d.]+)")
# --force: over SSH, an image without an SSH server is a blocker, and this one never runs.
CALLED_OFF = "--force docker-archive:/root/test-image.tar /sbin/dboot-test-init"
DATABASES = ("pg", "maria")
LOADED = 50  # acknowledged commits per database before a switch
# The units the graceful stop must stop, and the undo start again.
SERVICES = (
    "dboot-vm-pgload.service",
    "postgresql@15-main.service",
    "dboot-vm-mariaload.service",
    "mariadb.service",
    "dboot-vm-slowstop.service",
)
BACK_TIMEOUT = 600.0  # the rescue system's reboot, then the old system's boot and its report


@dataclass
class Run:
    """One machine: what dboot printed (host time, line), what the way back reported."""

    vm: Machine
    timing: Timing
    output: list[tuple[float, str]] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)

    def line_at(self, pattern: str) -> float | None:
        return next((at for at, text in self.output if re.search(pattern, text)), None)


def acks(vm: Machine) -> dict[str, list[tuple[int, float]]]:
    """Every acknowledged number per database, with the guest's uptime it was acknowledged at."""
    found: dict[str, list[tuple[int, float]]] = {name: [] for name in DATABASES}
    for line in list(vm.lines):
        for match in ACK.finditer(line.text):
            found[match.group(1)].append((int(match.group(2)), float(match.group(3))))
    return found


def wait_for_load(vm: Machine, more: int, timeout: float = 300) -> None:
    """Until each database acknowledged ``more`` commits beyond what it had."""
    start = {name: len(numbers) for name, numbers in acks(vm).items()}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(len(acks(vm)[name]) >= start[name] + more for name in DATABASES):
            return
        time.sleep(1)
    raise vm.error(f"the clients did not commit {more} rows each within {timeout:.0f} s")


def boot(vm: Machine, bed: VmBed, workdir: Path, timing: Timing) -> Remote:
    assert bed.ssh_key is not None
    remote = Remote(vm, bed.ssh_key, workdir)
    wait_ready(vm, timing)
    remote.record_host_keys(BOOT_TIMEOUT)
    remote.wait_login(60, root_fs="ext4")
    wait_for_load(vm, LOADED)
    return remote


def active_states(remote: Remote) -> dict[str, str]:
    states = remote.run(f"systemctl is-active {' '.join(SERVICES)}").stdout.split()
    return dict(zip(SERVICES, states))


def call_off_after_the_stop(run: Run, remote: Remote) -> None:
    """A switch paused right after its graceful stop, then ended by SIGTERM: the stop's order
    as systemd itself timed it, and what the undo started again."""
    command = (
        f"DBOOT_TEST_PAUSE=stopped:{PAUSED} {SWITCH} {CALLED_OFF} >/root/called-off.txt 2>&1 & "
        f"until [ -e {PAUSED} ] || ! kill -0 $!; do sleep 1; done; "
        f"systemctl show -p Id,ActiveExitTimestampMonotonic,InactiveEnterTimestampMonotonic "
        f"{' '.join(SERVICES)}; echo STATES $(systemctl is-active {' '.join(SERVICES)}); "
        f'kill -TERM "$(cat {PAUSED})"; wait $!; echo "RC $?"'
    )
    result = remote.run(command, timeout=900)
    blocks = [b for b in result.stdout.split("\n\n") if "Id=" in b]
    timestamps = {}
    for block in blocks:
        values = dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
        timestamps[values["Id"]] = (
            int(values["ActiveExitTimestampMonotonic"]),
            int(values["InactiveEnterTimestampMonotonic"]),
        )
    run.facts["call_off_timestamps"] = timestamps
    run.facts["call_off_states_paused"] = re.findall(r"STATES (.*)", result.stdout)
    run.facts["call_off_rc"] = re.findall(r"RC (\d+)", result.stdout)
    # The undo starts them in one transaction; the clients wait for their databases.
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and set(active_states(remote).values()) != {"active"}:
        time.sleep(2)
    run.facts["call_off_states_after"] = active_states(remote)
    run.facts["call_off_log"] = remote.run("grep -e undo -e 'services:' /var/log/dboot.log").stdout
    run.facts["called_off_output"] = remote.run("cat /root/called-off.txt").stdout
    # The graceful stop ran the slow ExecStop=: its marker must come from the switch below.
    remote.output(f"rm -f {EXECSTOP_MARKER} && sync")
    wait_for_load(run.vm, 10)


def switch_and_come_back(
    bed: VmBed, workdir: Path, timing: Timing, options: str, before: Callable[[Run, Remote], None]
) -> Run:
    with Machine(bed, "dbstop", workdir, ssh=True, reboot=True, memory_mb=2560) as vm:
        run = Run(vm, timing)
        remote = boot(vm, bed, workdir, timing)
        before(run, remote)
        command = f"touch {SWITCHED_MARKER} && sync && {SWITCH} {options} {RESCUE}"
        switch = subprocess.Popen(
            remote.command(command), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert switch.stdout is not None
        for line in switch.stdout:  # ends when the switch ends the old sshd
            run.output.append((time.monotonic(), line.rstrip("\n")))
        switch.wait()
        inject_at = run.line_at(r"==> Injecting execve")
        if inject_at is None:
            text = "\n".join(text for _, text in run.output)
            raise vm.error(f"dboot switch did not reach the injection:\n{text}")
        remote.wait_login(LOGIN_TIMEOUT, root_fs="tmpfs")
        # The guest's clock: now, and the init stage's first line in the kernel's log.
        clock = remote.output("cut -d' ' -f1 /proc/uptime; dmesg | grep -m1 'dboot-stage: '")
        login_uptime = float(clock.split()[0])
        stage = re.search(r"\[\s*([\d.]+)\]", clock.split("\n", 1)[1])
        assert stage, clock
        with_acks = acks(vm)
        stop_at = run.line_at(r"==> Stopping ")
        if stop_at is not None:
            timing.values["stop_to_inject_host_s"] = inject_at - stop_at
        done = re.search(r"\d+ of \d+ stopped in ([\d.]+) s", "\n".join(t for _, t in run.output))
        timing.values["graceful_stop_s"] = float(done.group(1)) if done else 0.0
        for name in DATABASES:
            last = with_acks[name][-1][1]
            timing.values[f"last_{name}_ack_before_stage_guest_s"] = float(stage.group(1)) - last
        last_ack = max(at for name in DATABASES for _, at in with_acks[name])
        timing.values["downtime_last_ack_to_rescue_login_guest_s"] = login_uptime - last_ack
        run.facts["acked"] = {name: max(n for n, _ in with_acks[name]) for name in DATABASES}
        # Back to the old system: a reboot from the rescue system (the session ends with it).
        subprocess.run(remote.command("systemctl reboot"), capture_output=True, timeout=60)
        restarting = vm.wait_for(r"reboot: Restarting system", BACK_TIMEOUT)
        back = vm.wait_for(r"DBOOT-VM: old-system-back ", BACK_TIMEOUT, after=restarting.index)
        vm.wait_for(r"DBOOT-VM: finished reverted", BOOT_TIMEOUT, after=back.index)
        for key in ("pg-state", "execstop-marker", "maria-recovery"):
            said = vm.find(rf"DBOOT-VM: {key}=", after=restarting.index)
            run.facts[key] = said.text.split(f"{key}=", 1)[1] if said else "missing"
        for name in DATABASES:
            rows = vm.find(rf"DBOOT-VM: {name}-rows ", after=back.index)
            counts = re.search(r"count=(\d+) min=(\d+) max=(\d+)", rows.text if rows else "")
            run.facts[f"{name}-rows"] = [int(n) for n in counts.groups()] if counts else []
        vm.wait_exit(POWEROFF_TIMEOUT)
    return run


def check_the_plan(run: Run, remote: Remote) -> None:
    """What `dboot check` says the stop will be, and what systemd said it from (kept in
    facts.json: tests/unit/data/debian12-db-*.txt are such outputs)."""
    # The small image: the plan does not depend on it, and its index is read at once.
    run.facts["check"] = remote.run(f"dboot check {CALLED_OFF.split(' ', 1)[1]}", 300).stdout
    listed = remote.output(f"systemctl list-units --type={','.join(systemd.UNIT_TYPES)} "
                           "--no-legend --plain --full")  # fmt: skip
    run.facts["systemctl_list_units"] = listed
    names = " ".join(line.split()[0] for line in listed.splitlines() if line.split())
    shown = remote.output(f"systemctl show --property={','.join(systemd.PROPERTIES)} {names}")
    run.facts["systemctl_show"] = shown


def graceful_scenario(bed: VmBed, workdir: Path, timing: Timing) -> Run:
    return switch_and_come_back(bed, workdir, timing, "", check_the_plan)


def signal_scenario(bed: VmBed, workdir: Path, timing: Timing) -> Run:
    return switch_and_come_back(bed, workdir, timing, "--stop=signal", call_off_after_the_stop)


SCENARIOS: dict[str, Callable[[VmBed, Path, Timing], Run]] = {
    "graceful": graceful_scenario,
    "signal": signal_scenario,
}


@pytest.fixture(scope="module")
def db_bed(request: pytest.FixtureRequest) -> VmBed:
    return bed_for(request, "x86_64-db")


@pytest.fixture(scope="module")
def runs(
    db_bed: VmBed, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[Run]]]:
    with ThreadPoolExecutor(len(SCENARIOS), thread_name_prefix="vm-dbstop") as pool:
        futures = {}
        for name, scenario in SCENARIOS.items():
            timing = Timing(f"dbstop-{name}")
            TIMINGS.append(timing)
            futures[name] = pool.submit(scenario, db_bed, tmp_path_factory.mktemp(name), timing)
        yield futures


def result(runs: dict[str, Future[Run]], name: str) -> Run:
    run = runs[name].result(timeout=2300)
    facts = {**run.facts, "timings": run.timing.values,
             "dboot_output": [text for _, text in run.output]}  # fmt: skip
    (run.vm.workdir / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    return run


def every_acknowledged_row_is_there(run: Run, name: str) -> None:
    assert rows_complete(run, name), f"{name}: acknowledged rows missing: {run.facts}"


def rows_complete(run: Run, name: str) -> bool:
    """The table holds 1..N without a gap, and N is at least the last acknowledged number."""
    rows = run.facts[f"{name}-rows"]
    acked = run.facts["acked"][name]  # type: ignore[index]
    if not isinstance(rows, list) or len(rows) != 3:
        return False
    count, lowest, highest = rows
    return bool(lowest == 1 and count == highest and highest >= acked)


def test_a_graceful_stop_leaves_both_databases_shut_down_clean(
    runs: dict[str, Future[Run]],
) -> None:
    run = result(runs, "graceful")
    output = "\n".join(text for _, text in run.output)
    done = re.search(r"(\d+) of (\d+) stopped in ([\d.]+) s", output)
    assert done and done.group(1) == done.group(2), output
    assert "left for the signals" not in output, output
    for unit in SERVICES:
        assert f"stopped {unit} after" in output, unit
    # The plan `dboot check` showed before: each client a step before its database.
    listed = re.findall(r"^\s+(\d+)\. (\S+)  ", str(run.facts["check"]), re.MULTILINE)
    steps = {unit: int(step) for step, unit in listed}
    assert steps["dboot-vm-pgload.service"] < steps["postgresql.service"], run.facts["check"]
    assert steps["postgresql.service"] < steps["postgresql@15-main.service"], steps
    assert steps["dboot-vm-mariaload.service"] < steps["mariadb.service"], steps
    assert "kept     ssh.service" in str(run.facts["check"]), run.facts["check"]
    assert run.facts["pg-state"] == "shut down", run.facts
    assert str(run.facts["maria-recovery"]).startswith("no"), run.facts
    assert str(run.facts["execstop-marker"]).startswith("present"), run.facts
    for name in DATABASES:
        every_acknowledged_row_is_there(run, name)


def test_signals_alone_are_recorded_after_a_called_off_stop_was_undone(
    runs: dict[str, Future[Run]],
) -> None:
    run = result(runs, "signal")
    # The called-off switch: every unit down at the pause, up again after the undo.
    assert run.facts["call_off_states_paused"] == [" ".join(["inactive"] * len(SERVICES))], (
        run.facts
    )
    assert run.facts["call_off_rc"] == ["143"], run.facts  # 128 + SIGTERM
    after: dict[str, str] = run.facts["call_off_states_after"]  # type: ignore[assignment]
    assert set(after.values()) == {"active"}, run.facts
    assert "services: started again" in str(run.facts["call_off_log"]), run.facts
    # systemd's own clock: each client was down before its database began to stop.
    stamps: dict[str, tuple[int, int]] = run.facts["call_off_timestamps"]  # type: ignore[assignment]
    for client, database in (("dboot-vm-pgload.service", "postgresql@15-main.service"),
                             ("dboot-vm-mariaload.service", "mariadb.service")):  # fmt: skip
        assert stamps[client][1] <= stamps[database][0], (client, database, stamps)
    # The switch with signals only: no stop step; what the databases were left in is recorded.
    output = "\n".join(text for _, text in run.output)
    assert "==> Stopping" not in output and "--stop=signal" in output, output
    run.timing.values["signal_rows_complete"] = float(all(rows_complete(run, n) for n in DATABASES))
    run.timing.values["signal_pg_shut_down"] = float(run.facts["pg-state"] == "shut down")
    run.timing.values["signal_maria_recovery"] = float(
        str(run.facts["maria-recovery"]).startswith("yes")
    )
    run.timing.values["signal_execstop_marker"] = float(
        str(run.facts["execstop-marker"]).startswith("present")
    )
