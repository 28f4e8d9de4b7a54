"""Killed at any moment: a dboot that dies by SIGKILL leaves PID 1 in one of two states.

Either untouched (its interrupted read() runs again and gets every byte), or running the
stage with its plan in place. The injector runs in a child process that stops at a named
phase (``DBOOT_TEST_PAUSE``, see injector/testhooks.py) and is SIGKILLed there; the kernel
then detaches it from the target, which goes on from where it stood. 20 rounds per phase,
each against a fresh PID 1 of a PID namespace the test creates (tests/sandbox/standin.py).
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

from injector import arch as archmod
from injector.testhooks import PAUSE_ENV
from tests.sandbox.sandbox_checks import eventually
from tests.sandbox.standin import READ_ECHO, StandIn, ns_pid, syscall_in_progress

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
from injector.ptrace import inject_execve
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


def kill_injector_at(phase: str, pid: int, plan: Path, proof: Path, announce: Path) -> float:
    """Start the injector against ``pid``, SIGKILL it at ``phase``; seconds to reach it."""
    started = time.monotonic()
    injector = subprocess.Popen(
        [sys.executable, "-c", INJECTOR, str(pid), BUSYBOX, str(plan), str(proof)],
        cwd=REPO,
        env={**os.environ, PAUSE_ENV: f"{phase}:{announce}"},
        stderr=subprocess.PIPE,
    )
    try:
        reached = eventually(lambda: announce.exists() or injector.poll() is not None, 15)
        assert reached and announce.exists(), (
            f"the injector never paused at {phase}: exit {injector.poll()}, "
            f"{injector.stderr.read().decode() if injector.poll() is not None else ''}"  # type: ignore[union-attr]
        )
        assert int(announce.read_text()) == injector.pid
        took = time.monotonic() - started
        injector.send_signal(signal.SIGKILL)
    finally:
        if injector.poll() is None:
            injector.kill()
        injector.wait(10)
        assert injector.stderr is not None
        injector.stderr.close()
    assert injector.returncode == -signal.SIGKILL
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
            reach_times.append(kill_injector_at(phase, init.pid, plan, proof, announce))
            outcomes[outcome_of(init, proof, round_)] += 1
    print(
        f"\nkill at {phase}: {ROUNDS} rounds, outcomes {dict(outcomes)}; "
        f"injector start to pause {min(reach_times) * 1000:.0f}-{max(reach_times) * 1000:.0f} ms"
    )
    assert set(outcomes) <= {"untouched", "stage with plan"}, outcomes
    assert outcomes == {EXPECTED[phase]: ROUNDS}, outcomes
