"""Injections that must be refused, and the checks that refuse them.

Targets are PID 1 of PID namespaces the test creates, except in the lab-mode guard test,
where the point is that PID 1 of this machine is refused before any ptrace call.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from injector import labmode
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.inject import ptrace
from injector.inject.ptrace import InjectionRolledBack, inject_execve
from injector.preflight import procinfo
from injector.preflight.procinfo import is_pid1_of_its_namespace
from tests.sandbox import parking
from tests.sandbox.parking import StandIn
from tests.sandbox.sandbox_checks import SEIZE_AND_HOLD

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="ptrace and namespaces need root")


def no_log(line: str) -> None:
    pass


@pytest.mark.root
@needs_root
def test_already_traced_target_is_refused_and_left_alone() -> None:
    with StandIn(parking.READ_ECHO) as init:
        tracer = subprocess.Popen(
            [sys.executable, "-I", "-c", SEIZE_AND_HOLD, str(init.pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert tracer.stdout is not None and tracer.stdout.readline() == b"seized\n"
            allowed, reason, _ = procinfo.ptrace_permission(init.pid)
            assert not allowed
            assert reason.startswith(f"already traced by pid {tracer.pid}")
            with pytest.raises(EnvironmentFailure) as caught:
                inject_execve(init.pid, "/bin/true", ["true"], [], no_log)
            assert not isinstance(caught.value, InjectionRolledBack)
            assert caught.value.exit_code == 2 and "already traced" in str(caught.value)
        finally:
            tracer.communicate(timeout=10)  # closes its stdin: it exits, the kernel detaches
        # Our refusal and their detach changed nothing for PID 1.
        assert init.echo(b"untouched") == b"untouched"
        assert procinfo.ptrace_permission(init.pid).allowed


@pytest.mark.root
@needs_root
def test_missing_pid_is_refused() -> None:
    beyond = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # can never exist
    assert procinfo.ptrace_permission(beyond)[:2] == (False, f"pid {beyond} does not exist")
    assert procinfo.ptrace_permission(0).allowed is False
    with pytest.raises(EnvironmentFailure, match=f"pid {beyond} does not exist"):
        inject_execve(beyond, "/bin/true", ["true"], [], no_log)
    assert not is_pid1_of_its_namespace(beyond)


@pytest.mark.root
@needs_root
def test_pid1_of_its_namespace() -> None:
    with StandIn(parking.WAIT4) as init:
        child = int(Path(f"/proc/{init.pid}/task/{init.pid}/children").read_text().split()[0])
        assert is_pid1_of_its_namespace(init.pid)
        assert not is_pid1_of_its_namespace(child)  # PID 2 in there
        assert not is_pid1_of_its_namespace(os.getpid())


# Run as root but with CAP_SYS_PTRACE gone from the bounding set: check, then try to seize.
WITHOUT_CAP_SYS_PTRACE = textwrap.dedent(
    """
    import sys
    from injector.inject import arch, ptrace
    from injector.preflight import procinfo
    from injector.errors import EnvironmentFailure
    pid = int(sys.argv[1])
    print(procinfo.ptrace_permission(pid).reason)
    try:
        ptrace._Tracee(pid, arch.host_arch(), print).seize()
    except EnvironmentFailure as error:
        print(error)
    """
)


@pytest.mark.root
@needs_root
def test_without_cap_sys_ptrace_attach_is_denied_and_named() -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_SYS_PTRACE")
    with StandIn(parking.READ_ECHO) as init:
        drop = [setpriv, "--bounding-set", "-sys_ptrace", "--inh-caps", "-sys_ptrace"]
        result = subprocess.run(
            [*drop, sys.executable, "-c", WITHOUT_CAP_SYS_PTRACE, str(init.pid)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        check_line, seize_line = result.stdout.splitlines()
        assert check_line == "no CAP_SYS_PTRACE: run as root"
        # The kernel's own EPERM, mapped to a one-line cause and fix.
        assert seize_line.startswith(f"attaching to PID {init.pid} was denied (EPERM): run as root")
        assert init.echo(b"untouched") == b"untouched"


# --- lab mode: this machine's PID 1 is refused before any ptrace call -------------------


@pytest.fixture
def ptrace_forbidden(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace the module's single ptrace entry point with one that records and refuses.

    This is the one mock here, on purpose: letting the real call through would mean
    ptracing the machine that runs the tests.
    """
    calls: list[int] = []

    def refuse(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
        calls.append(request)
        raise AssertionError(f"ptrace request {request:#x} on PID {pid} reached the kernel")

    monkeypatch.setattr(ptrace, "_ptrace", refuse)
    return calls


def test_lab_mode_refuses_host_pid1_via_env(
    ptrace_forbidden: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DBOOT_REHEARSAL_ONLY", "1")
    monkeypatch.setattr(labmode, "LAB_MODE_FLAG", tmp_path / "absent")
    with pytest.raises(SafetyRefusal) as caught:
        inject_execve(1, "/bin/true", ["true"], [], no_log)
    assert caught.value.exit_code == 3
    assert "PID 1" in str(caught.value) and "lab mode" in str(caught.value)
    assert ptrace_forbidden == []


def test_lab_mode_refuses_host_pid1_via_flag_file(
    ptrace_forbidden: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    flag = tmp_path / "rehearsal-only"
    flag.touch()
    monkeypatch.delenv("DBOOT_REHEARSAL_ONLY", raising=False)
    monkeypatch.setattr(labmode, "LAB_MODE_FLAG", flag)
    with pytest.raises(SafetyRefusal):
        inject_execve(1, "/bin/true", ["true"], [], no_log)
    assert ptrace_forbidden == []


def test_lab_mode_switches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Only the predicate: nothing is injected with lab mode off. The test runner's ancestors
    # (make, .ci/run) were started in lab mode, which labmode also honours: not looked at here.
    monkeypatch.setattr(labmode, "LAB_MODE_FLAG", tmp_path / "absent")
    monkeypatch.setattr(labmode, "ANCESTOR_PROC", tmp_path / "no-proc")
    for value, expected in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("DBOOT_REHEARSAL_ONLY", value)
        assert labmode.lab_mode() is expected
    monkeypatch.delenv("DBOOT_REHEARSAL_ONLY")
    assert labmode.lab_mode() is False


def test_bad_exec_arguments_are_refused_before_attaching(ptrace_forbidden: list[int]) -> None:
    pid = 2**22 + 1  # whatever: validation comes first
    for path, argv in (("relative", ["x"]), ("/bin/true", []), ("/bin/\0true", ["x"])):
        with pytest.raises(BadInput):
            inject_execve(pid, path, argv, [], no_log)
    with pytest.raises(BadInput, match="keep them under"):
        inject_execve(pid, "/bin/true", ["x" * 70000], [], no_log)
    assert ptrace_forbidden == []
