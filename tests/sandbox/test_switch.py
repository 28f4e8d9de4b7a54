"""The whole switch through the engine: rehearsals and `--target-pid`, all in namespaces we make.

Real engine, real copy into a tmpfs, real ptrace into a namespace's PID 1, real init stage
and pivot_root. Never this machine's PID 1: lab mode is on, and every target is a Sandbox.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.errors import EnvironmentFailure
from injector.events import Console, Event, Finished, Injection, StepDone
from injector.rehearsal.sandbox import Sandbox
from injector.switch import SwitchOptions, run
from tests.images import build_debian_image
from tests.sandbox.sandbox_checks import SEIZE_AND_HOLD, eventually, wait_for_output

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))

INIT_SCRIPT = """\
#!/bin/sh
echo "init-script: pid $$"
for fs in /proc /sys /dev; do grep -q " $fs " /proc/mounts && echo "init-script: $fs mounted"; done
ls /proc | grep -c '^[0-9]' | sed 's/^/init-script: processes /'
exit 5
"""


def host_mounts() -> str:
    return Path("/proc/self/mountinfo").read_text()


def pid_namespaces() -> dict[str, list[int]]:
    """Every PID namespace that has a process, with its processes (host pids)."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone meanwhile
                found.setdefault(os.readlink(entry / "ns/pid"), []).append(int(entry.name))
    return found


@pytest.fixture
def nothing_left_behind() -> Iterator[None]:
    """No mount, no process and no state directory may outlive a rehearsal.

    A sandbox's processes live in a PID namespace of their own: one that did not exist
    before the test and still has processes afterwards is a leak, whoever reparented them.
    """
    mounts = host_mounts()
    before = pid_namespaces()
    yield
    assert host_mounts() == mounts
    leaked = {ns: pids for ns, pids in pid_namespaces().items() if ns not in before}
    assert not leaked, f"processes left behind in new PID namespaces: {leaked}"


def rehearse(image: str, init: list[str], **options: object) -> list[Event]:
    return list(run(SwitchOptions(image=image, init_argv=init, rehearse=True, **options)))  # type: ignore[arg-type]


def console(events: list[Event]) -> list[str]:
    return [event.text for event in events if isinstance(event, Console)]


def finished(events: list[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished), last
    return last


def test_rehearse_busybox_shell(nothing_left_behind: None, tmp_path: Path) -> None:
    events = rehearse(
        "tinybox",
        ["/bin/sh", "-c", "echo pid=$$; readlink /proc/1/exe; cat /var/log/dboot.log | wc -l"],
        state_dir=tmp_path / "state",
    )
    lines = console(events)
    assert "pid=1" in lines
    assert "/bin/busybox" in lines
    # The stage copied its own log into the new root before it exec'd the init.
    assert int(lines[lines.index("/bin/busybox") + 1]) >= 8
    assert finished(events) == Finished("rehearsed", exit_status=0)
    assert not (tmp_path / "state").exists()


def test_rehearse_init_script_sees_api_mounts_and_no_old_processes(
    nothing_left_behind: None, tmp_path: Path
) -> None:
    image_dir = tmp_path / "ctx"
    image_dir.mkdir()
    (image_dir / "init.sh").write_text(INIT_SCRIPT)
    (image_dir / "init.sh").chmod(0o755)  # the legacy builder keeps modes; it lacks --chmod
    (image_dir / "Dockerfile").write_text("FROM tinybox\nCOPY init.sh /sbin/test-init\n")
    tag = "dboot-test/init-script:latest"
    subprocess.run(
        ["docker", "build", "-q", "-t", tag, str(image_dir)],
        check=True,
        capture_output=True,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    try:
        events = rehearse(tag, ["/sbin/test-init"], grace=1.0)
    finally:
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, check=False)
    lines = console(events)
    assert "init-script: pid 1" in lines
    for fs in ("/proc", "/sys", "/dev"):
        assert f"init-script: {fs} mounted" in lines
    # Only the init itself and the processes of its pipeline: every stand-in service is gone.
    assert any(line.startswith("init-script: processes ") for line in lines)
    count = int(
        next(line for line in lines if line.startswith("init-script: processes")).split()[-1]
    )
    assert count <= 4, lines
    assert finished(events).exit_status == 5


def test_rehearse_debootstrap_image(nothing_left_behind: None) -> None:
    tag = build_debian_image()
    events = rehearse(
        tag, ["/bin/bash", "-c", 'echo "debian $(cat /etc/debian_version) as $$"; exit 3']
    )
    assert any(line.startswith("debian 12") and line.endswith(" as 1") for line in console(events))
    assert finished(events).exit_status == 3


def test_rehearsal_reports_the_injection_and_stage_steps(nothing_left_behind: None) -> None:
    events = rehearse("tinybox", ["/bin/true"])
    injection = next(event for event in events if isinstance(event, Injection))
    assert injection.outcome == "executed"
    assert injection.interrupted_syscall
    assert injection.registers_before["rip"] == injection.registers_after["rip"]
    done = [event.step for event in events if isinstance(event, StepDone)]
    # The stand-in's stop order comes last before the injection (issue 19).
    assert done == ["source", "preflight", "ramroot", "stop", "inject", "stage"]
    stage_lines = [line for line in console(events) if line.startswith("dboot-stage:")]
    assert any("step 5/8" in line and "pivot_root" in line for line in stage_lines)


def test_target_pid_switches_a_namespace_pid_1(tmp_path: Path) -> None:
    with Sandbox(services=3, console="capture") as sandbox:
        services = sandbox.service_pids()
        assert services
        result = subprocess.run(
            [DBOOT, "switch", "--json", "--yes", "--grace", "1", "--target-pid", str(sandbox.pid),
             "tinybox", "/bin/sh", "-c", "exec sleep 60"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        events = [json.loads(line) for line in result.stdout.splitlines()]
        assert events[-1]["outcome"] == "injected"
        assert wait_for_output(sandbox, "step 7/8", timeout=15), sandbox.output()
        # PID 1 of the namespace now runs the image's own binary ...
        deadline_output = wait_for_output(sandbox, "exec ['/bin/sh'", timeout=15)
        assert deadline_output, sandbox.output()
        assert eventually(lambda: os.readlink(f"/proc/{sandbox.pid}/exe") == "/bin/busybox", 10)
        # ... every stand-in service is gone ...
        assert all(not Path(f"/proc/{pid}").exists() for pid in services)
        # ... and the old root is no longer in the namespace's mount table.
        mounts = Path(f"/proc/{sandbox.pid}/mountinfo").read_text().splitlines()
        roots = [line.split()[4] for line in mounts]
        assert roots[0] == "/" and all(" - ext4 " not in line for line in mounts), mounts
        assert not any(mount_point == "/work" or mount_point.startswith("/run/dboot")
                       for mount_point in roots), roots  # fmt: skip


def test_target_pid_must_be_pid_1_of_its_namespace() -> None:
    with Sandbox(services=1, console="capture") as sandbox:
        service = sandbox.service_pids()[0]
        with pytest.raises(EnvironmentFailure, match="not PID 1"):
            list(run(SwitchOptions("tinybox", ["/bin/sh"], target_pid=service, yes=True)))
        assert sandbox.running()


def test_target_already_traced_is_refused_and_untouched(tmp_path: Path) -> None:
    from injector.preflight import procinfo

    with Sandbox(services=1, console="capture") as sandbox:
        tracer = subprocess.Popen(
            [sys.executable, "-I", "-c", SEIZE_AND_HOLD, str(sandbox.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert tracer.stdout is not None and tracer.stdout.readline().strip() == "seized"
            allowed, reason, _ = procinfo.ptrace_permission(sandbox.pid)
            assert not allowed and str(tracer.pid) in reason
            state = tmp_path / "state"
            options = SwitchOptions(
                "tinybox", ["/bin/sh"], target_pid=sandbox.pid, yes=True, state_dir=state
            )
            with pytest.raises(EnvironmentFailure, match=f"traced by.*{tracer.pid}"):
                list(run(options))
        finally:
            tracer.kill()
            tracer.wait()
        assert sandbox.running()
        assert not Path(f"/proc/{sandbox.pid}/root{state}").exists()
