"""The rehearsal sandbox: real PID, mount, UTS, IPC and network namespaces, a real stand-in init.

Every test checks that the sandbox leaves no process and no mount behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.inject.nsenter import run_in_mount_namespace
from injector.preflight.procinfo import namespace_of, nspid_chain
from injector.rehearsal.sandbox import (
    STANDIN_SCRIPT,
    Sandbox,
    children_of,
    pids_in_namespace,
    process_state,
)
from tests.sandbox.parking import EXIT_ON_SIGUSR1, ParkedSandbox
from tests.sandbox.sandbox_checks import (
    Footprint,
    eventually,
    mounted_sources,
    our_children,
    signal_service,
    wait_for_output,
)

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as started:
        footprint = Footprint(started)
        yield started
    footprint.assert_gone()


def test_start_gives_pid1_of_a_new_pid_namespace_that_is_our_child(sandbox: Sandbox) -> None:
    pid = sandbox.start()  # already started by the with-block: the same pid
    assert pid == sandbox.pid != 1
    assert nspid_chain(pid)[-1] == 1
    assert len(nspid_chain(pid)) == len(nspid_chain(os.getpid())) + 1
    assert pid in children_of(os.getpid())
    assert str(STANDIN_SCRIPT) in Path(f"/proc/{pid}/cmdline").read_text()


def test_every_namespace_is_new(sandbox: Sandbox) -> None:
    for kind in ("pid", "mnt", "uts", "ipc", "net"):
        assert namespace_of(sandbox.pid, kind) != namespace_of("self", kind), kind


def test_own_hostname_own_proc_private_mounts(sandbox: Sandbox) -> None:
    seen = subprocess.run(
        ["nsenter", "--target", str(sandbox.pid), "--uts", "hostname"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert seen == "dboot-rehearsal" != socket.gethostname()
    # Its /proc lists its own PID namespace: a PID 1 of its own, and none of our pids.
    inside = {int(e) for e in os.listdir(f"/proc/{sandbox.pid}/root/proc") if e.isdigit()}
    assert 1 in inside and os.getpid() not in inside
    assert len(inside) < 20
    mountinfo = Path(f"/proc/{sandbox.pid}/mountinfo").read_text()
    assert "shared:" not in mountinfo  # private propagation: nothing leaks to the host


def test_network_namespace_has_only_loopback(sandbox: Sandbox) -> None:
    lines = Path(f"/proc/{sandbox.pid}/net/dev").read_text().splitlines()[2:]
    assert [line.split(":")[0].strip() for line in lines] == ["lo"]


def test_services_one_ignores_sigterm_plain_ones_die_and_are_reaped(sandbox: Sandbox) -> None:
    services = sandbox.services()
    assert sorted(services.values()) == ["plain", "stubborn", "zombies"]
    assert sandbox.service_pids() == sorted(services)
    by_kind = {kind: pid for pid, kind in services.items()}

    inner_plain = nspid_chain(by_kind["plain"])[-1]
    signal_service(sandbox, by_kind["stubborn"], signal.SIGTERM)
    signal_service(sandbox, by_kind["plain"], signal.SIGTERM)
    assert eventually(lambda: process_state(by_kind["plain"]) == "")
    assert wait_for_output(sandbox, f"reaped pid {inner_plain} (killed by SIGTERM)")
    time.sleep(0.2)
    assert process_state(by_kind["stubborn"]) in ("S", "R")
    assert sorted(sandbox.services().values()) == ["stubborn", "zombies"]


def test_zombies_pile_up_under_their_service_until_pid1_reaps_them(sandbox: Sandbox) -> None:
    zombie_maker = next(pid for pid, kind in sandbox.services().items() if kind == "zombies")

    def zombies() -> list[int]:
        return [pid for pid in children_of(zombie_maker) if process_state(pid) == "Z"]

    assert eventually(lambda: len(zombies()) >= 2)
    left_behind = zombies()
    # When their parent dies they are reparented to the sandbox's PID 1, which reaps them.
    signal_service(sandbox, zombie_maker, signal.SIGTERM)
    assert eventually(lambda: all(process_state(pid) == "" for pid in left_behind))
    assert wait_for_output(sandbox, "(exit 0)")  # a reaped zombie's own status


def test_exit_status_of_pid1_propagates_and_ends_the_namespace() -> None:
    with ParkedSandbox() as sandbox:
        footprint = Footprint(sandbox)
        assert sandbox.request_exit() == EXIT_ON_SIGUSR1 == 7
        assert sandbox.wait(0) == 7
        assert not sandbox.running()
        footprint.assert_gone()  # the kernel killed the services with their PID 1
    assert "SIGUSR1: exiting 7" in sandbox.output()


def test_the_rehearsal_stand_in_has_none_of_the_tests_hooks() -> None:
    """The tests' modes and hooks live in tests/sandbox/parked.py: the rehearsal's own PID 1
    has no handler for SIGUSR1 (so, as a namespace's PID 1, never gets it) and no ``read``."""
    with Sandbox(services=0) as sandbox:
        os.kill(sandbox.pid, signal.SIGUSR1)
        with pytest.raises(TimeoutError):
            sandbox.wait(0.5)
    with pytest.raises(EnvironmentFailure, match="before it was ready"):
        Sandbox(services=0, idle="read").start()


def test_a_killed_pid1_reads_as_128_plus_the_signal() -> None:
    with Sandbox(services=1) as sandbox:
        with pytest.raises(TimeoutError):
            sandbox.wait(0.1)
        os.kill(sandbox.pid, signal.SIGKILL)
        assert sandbox.wait(5) == 128 + signal.SIGKILL


def test_capture_mode_collects_the_console() -> None:
    seen: list[str] = []
    with ParkedSandbox(on_line=seen.append) as sandbox:
        sandbox.request_exit()
        lines = list(sandbox.console_lines())
    assert lines == seen
    assert lines[0].startswith("standin: pid 1 on dboot-rehearsal, 3 services stubborn=")
    assert lines[-1] == "standin: SIGUSR1: exiting 7"
    assert sandbox.output() == "".join(f"{line}\n" for line in lines)


def test_send_reaches_a_stand_in_idling_in_read() -> None:
    with ParkedSandbox(services=0, idle="read") as sandbox:
        sandbox.send("hello\n")
        assert wait_for_output(sandbox, "standin: read b'hello\\n'")
        sandbox.send("exit 5\n")
        assert sandbox.wait(5) == 5


@pytest.fixture
def ctrl_c() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt, even when pytest started with SIGINT ignored (as a
    background job of a non-interactive shell does)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("ctrl_c")
def test_ctrl_c_inside_the_block_leaves_nothing_behind(tmp_path: Path) -> None:
    mount_point = tmp_path / "inside"
    mount_point.mkdir()
    with pytest.raises(KeyboardInterrupt), Sandbox() as sandbox:
        footprint = Footprint(sandbox)
        run_in_mount_namespace(
            sandbox.pid,
            lambda send: subprocess.run(
                ["mount", "-t", "tmpfs", "dboot-test-ctrl-c", str(mount_point)], check=True
            ),
        )
        assert "dboot-test-ctrl-c" in mounted_sources(sandbox.pid)
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, not a raise
        time.sleep(5)
    footprint.assert_gone("dboot-test-ctrl-c")
    assert not os.path.ismount(mount_point)


def test_relay_mode_inherits_our_terminal() -> None:
    script = (
        "from tests.sandbox.parking import ParkedSandbox\n"
        "with ParkedSandbox(console='relay') as sandbox:\n"
        "    raise SystemExit(sandbox.request_exit())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 7, done.stderr
    assert "standin: pid 1 on dboot-rehearsal" in done.stdout
    assert "standin: SIGUSR1: exiting 7" in done.stdout


def test_the_sandbox_dies_with_its_owner_even_on_sigkill() -> None:
    script = (
        "import time\n"
        "from injector.rehearsal.sandbox import Sandbox\n"
        "sandbox = Sandbox(services=2)\n"
        "print(sandbox.start(), flush=True)\n"
        "time.sleep(60)\n"
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        pid = int(owner.stdout.readline())
        pid_namespace = namespace_of(pid, "pid")
        owner.kill()
    finally:
        owner.wait()
    # Dead at once; the orphaned zombie then waits for the host's init to reap it.
    assert eventually(
        lambda: all(process_state(p) in ("Z", "") for p in pids_in_namespace("pid", pid_namespace)),
        timeout=1,
    )


def test_fifty_plain_services_for_the_downtime_bench() -> None:
    started = time.monotonic()
    with Sandbox(kinds=["plain"] * 50, console="capture") as sandbox:
        assert len(sandbox.service_pids()) == 50
    assert time.monotonic() - started < 5


def test_bad_arguments_and_foreign_pids_are_refused() -> None:
    with pytest.raises(BadInput):
        Sandbox(kinds=["nope"])
    with pytest.raises(BadInput):
        Sandbox(services=-1)
    with Sandbox(services=1, console="relay") as sandbox:
        with pytest.raises(BadInput):
            sandbox.send("x")
        for foreign in (1, os.getpid()):
            with pytest.raises(SafetyRefusal):
                signal_service(sandbox, foreign, signal.SIGTERM)


def test_the_stand_in_refuses_to_run_outside_a_pid_namespace() -> None:
    before = socket.gethostname()
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(STANDIN_SCRIPT), "--ready-fd", "1", "--hostname", "x"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 3
    assert "not PID 1" in done.stderr
    assert socket.gethostname() == before


@pytest.mark.usefixtures("ctrl_c")
@pytest.mark.parametrize("delay_ms", [0, 2, 5, 10, 20, 40])
def test_ctrl_c_during_start_leaves_nothing_behind(delay_ms: int) -> None:
    children_before = our_children()
    sandbox = Sandbox()
    interrupter = threading.Timer(delay_ms / 1000, os.kill, (os.getpid(), signal.SIGINT))
    try:
        interrupter.start()
        with sandbox:
            time.sleep(5)  # the Ctrl-C lands here when start() was quicker
    except KeyboardInterrupt:
        pass
    finally:
        interrupter.join()
    assert not sandbox.running()
    assert our_children() == children_before  # PID 1, our child, was killed and reaped


def test_an_injected_execve_takes_over_pid1_and_its_status_comes_back() -> None:
    """The real injector (injector.inject.ptrace) against the stand-in: the sandbox's own wait for
    its PID 1 must not swallow the ptrace stops, and the new program inherits the console."""
    from injector.inject import ptrace

    idles: list[tuple[str, str]] = [("wait", "wait4"), ("read", "read")]
    for idle, syscall in idles:
        with ParkedSandbox(services=1, idle=idle) as sandbox:
            report = ptrace.inject_execve(
                sandbox.pid,
                "/bin/sh",
                ["/bin/sh", "-c", "echo injected as pid $$; exit 3"],
                ["PATH=/usr/bin:/bin"],
                log=lambda line: None,
            )
            assert report.interrupted_syscall == syscall
            assert sandbox.wait(5) == 3
        assert sandbox.output().endswith("injected as pid 1\n")
