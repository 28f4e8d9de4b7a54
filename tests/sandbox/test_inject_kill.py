"""Killed at any moment: a dboot that dies by SIGKILL leaves PID 1 in one of two states.

Either untouched (its interrupted read() runs again and gets every byte), or running the
stage with its plan in place. The injector runs in a child process that stops at a named
phase (``DBOOT_TEST_PAUSE``, see injector/testhooks.py) and is SIGKILLed there; the kernel
then detaches it from the target, which goes on from where it stood. 20 rounds per phase,
each against a fresh PID 1 of a PID namespace the test creates (tests/sandbox/parking.py).
Then the whole `dboot switch --target-pid`, killed the same way against a rehearsal sandbox:
there the stage is the real one and must find the real plan.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from injector.inject import arch as archmod
from injector.runlog import LOG_FILE_ENV
from injector.testhooks import PAUSE_ENV
from tests.sandbox.parking import (
    EXIT_ON_SIGUSR1,
    READ_ECHO,
    ParkedSandbox,
    StandIn,
    ns_pid,
    syscall_in_progress,
)
from tests.sandbox.sandbox_checks import eventually, wait_for_output

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="ptrace into a new PID namespace needs root"),
]

ARCH = archmod.host_arch()
READ = archmod.syscall_number(ARCH, "read")
BUSYBOX = os.path.realpath(shutil.which("busybox") or "/bin/busybox")
REPO = Path(__file__).resolve().parents[2]
ROUNDS = 20

# The "stage": it proves it ran as PID 1 and found the plan that had to be in place.
INJECTOR = """\
import sys
from injector.inject.ptrace import inject_execve
pid, busybox, plan, proof = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
script = (
    f'if [ -f {plan} ]; then echo "stage $$ with plan" > {proof}.new; '
    f'else echo "stage $$ without plan" > {proof}.new; fi; mv {proof}.new {proof}; '
    f'exec {busybox} sleep 600'
)
inject_execve(pid, busybox, ["sh", "-c", script], ["PATH=/usr/bin:/bin"], lambda line: None)
"""

# What each kill must lead to: before the swap nothing of ours is live in PID 1; from the
# swap on, PID 1 executes our execve whether we are there or not.
EXPECTED = {
    "before-seize": "untouched",
    "entry-stop": "untouched",
    "swapped": "stage with plan",
    "exec-wait": "stage with plan",
}


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"no TracerPid line for PID {pid}")


def sigkill_at(phase: str, command: list[str], announce: Path, env: dict[str, str]) -> float:
    """Run ``command``, SIGKILL it once it pauses at ``phase``; seconds it took to get there."""
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **env, PAUSE_ENV: f"{phase}:{announce}"},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        reached = eventually(lambda: announce.exists() or process.poll() is not None, 60)
        assert reached and announce.exists(), (
            f"{command[0]} never paused at {phase}: exit {process.poll()}, "
            f"{process.stderr.read().decode() if process.poll() is not None else ''}"  # type: ignore[union-attr]
        )
        assert int(announce.read_text()) == process.pid
        took = time.monotonic() - started
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        assert process.stderr is not None
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return took


def outcome_of(init: StandIn, proof: Path, round_: int) -> str:
    """What PID 1 does now that its tracer is gone: 'untouched', 'stage ...', or why not."""
    pid = init.pid
    # The kernel detached it when the injector died.
    assert eventually(lambda: tracer_of(pid) == 0, 5), f"PID {pid} is still traced"

    def settled() -> bool:
        if proof.exists():
            return True
        exe = os.path.realpath(f"/proc/{pid}/exe")
        return exe == os.path.realpath(sys.executable) and syscall_in_progress(pid) == READ

    assert eventually(settled, 10), (
        f"PID {pid} neither re-ran read() nor ran the stage: "
        f"exe {os.path.realpath(f'/proc/{pid}/exe')}, syscall {syscall_in_progress(pid)}"
    )
    if proof.exists():
        said = proof.read_text().split()
        assert said[:2] == ["stage", "1"], said  # PID 1 of its namespace ran it
        assert os.path.realpath(f"/proc/{pid}/exe") == BUSYBOX and ns_pid(pid) == 1
        return " ".join([said[0], *said[2:]])
    # Its interrupted read() runs again and gets exactly these bytes: no error, no loss.
    message = f"round {round_:02d};".encode()
    said_back = init.echo(message)
    return "untouched" if said_back == message else f"damaged: PID 1 said {said_back!r}"


@pytest.mark.parametrize("phase", list(EXPECTED))
def test_sigkilled_injector_leaves_pid1_untouched_or_staged(phase: str, tmp_path: Path) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    reach_times = []
    for round_ in range(ROUNDS):
        workdir = tmp_path / f"round{round_}"
        workdir.mkdir()
        plan = workdir / "plan.json"
        plan.write_text("{}\n")  # in place before the injection, as the switch does
        proof, announce = workdir / "proof", workdir / "paused"
        with StandIn(READ_ECHO) as init:
            init.wait_blocked_in(READ)
            command = [
                sys.executable,
                "-c",
                INJECTOR,
                str(init.pid),
                BUSYBOX,
                str(plan),
                str(proof),
            ]
            reach_times.append(sigkill_at(phase, command, announce, {}))
            outcomes[outcome_of(init, proof, round_)] += 1
    print(
        f"\nkill at {phase}: {ROUNDS} rounds, outcomes {dict(outcomes)}; "
        f"injector start to pause {min(reach_times) * 1000:.0f}-{max(reach_times) * 1000:.0f} ms"
    )
    assert set(outcomes) <= {"untouched", "stage with plan"}, outcomes
    assert outcomes == {EXPECTED[phase]: ROUNDS}, outcomes


# --- the whole switch, SIGKILLed: the real stage, the real plan ------------------------------

DBOOT = str(Path(sys.executable).with_name("dboot"))
SWITCH_ROUNDS = 3  # a whole switch per round: fewer than the injector-only rounds above


@pytest.mark.engine
@pytest.mark.parametrize("phase", list(EXPECTED))
def test_sigkilled_switch_leaves_pid1_untouched_or_in_the_stage(phase: str, tmp_path: Path) -> None:
    """`dboot switch --target-pid` SIGKILLed at each phase of the injection. Before the swap
    the sandbox's stand-in init goes on as itself (it still answers its SIGUSR1 hook);
    from the swap on, the init stage runs, finds its plan and execs the image's init."""
    outcomes: collections.Counter[str] = collections.Counter()
    for round_ in range(SWITCH_ROUNDS):
        with ParkedSandbox(services=1, console="capture") as sandbox:
            exe_before = os.readlink(f"/proc/{sandbox.pid}/exe")
            command = [
                DBOOT, "switch", "--yes", "--grace", "1", "--target-pid", str(sandbox.pid),
                "--state-dir", "/run/dboot-kill", "tinybox", "/bin/sh", "-c", "exec sleep 60",
            ]  # fmt: skip
            lab = {"DBOOT_REHEARSAL_ONLY": "1", LOG_FILE_ENV: ""}
            sigkill_at(phase, command, tmp_path / f"paused{round_}", lab)
            outcomes[switch_outcome(sandbox, exe_before)] += 1
    print(f"\nswitch killed at {phase}: {SWITCH_ROUNDS} rounds, outcomes {dict(outcomes)}")
    assert outcomes == {EXPECTED[phase]: SWITCH_ROUNDS}, outcomes


def switch_outcome(sandbox: ParkedSandbox, exe_before: str) -> str:
    """'stage with plan' or 'untouched', asserting that it is one of them."""
    assert eventually(lambda: tracer_of(sandbox.pid) == 0, 5)
    if wait_for_output(sandbox, "dboot-stage:", timeout=3):
        # The stage found its plan: it went through to the image's init.
        assert wait_for_output(sandbox, "exec ['/bin/sh'", timeout=20), sandbox.output()
        assert eventually(lambda: os.readlink(f"/proc/{sandbox.pid}/exe") != exe_before)
        return "stage with plan"
    assert os.readlink(f"/proc/{sandbox.pid}/exe") == exe_before
    assert sandbox.request_exit() == EXIT_ON_SIGUSR1  # still running its own code
    return "untouched"
