"""The teaching rehearsal, for real: every pause in order, the stage really waiting for its
go (a step does not happen until then), and end of file from the host meaning go on.

Real engine, real sandbox, real ptrace and pivot_root; the pause hook stands in for the
wizard. Lab mode is on; the target is always the sandbox's PID 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from injector import teach
from injector.events import Console, Event, Finished
from injector.stop.plan import StopMode
from injector.switch import SwitchOptions, run
from tests.images import TINYBOX, build_tinybox

pytestmark = [pytest.mark.root, pytest.mark.engine, pytest.mark.usefixtures("tinybox")]

IMAGE = TINYBOX
INIT = ["/bin/sh", "-c", "echo hi-$$"]
DBOOT = str(Path(sys.executable).with_name("dboot"))
HOLD = 1.0  # seconds a pause is held, to see that nothing moves meanwhile


@pytest.fixture(scope="module")
def tinybox() -> str:
    return build_tinybox()


def rehearse(hook: teach.PauseHook, stop: StopMode = "graceful") -> list[Event]:
    options = SwitchOptions(IMAGE, INIT, rehearse=True, pause=hook, service_stop=stop)
    return list(run(options))


def others(pause: teach.Pause) -> list[teach.SandboxProcess]:
    """The sandbox's processes but its PID 1, zombies left out (they are already dead)."""
    assert pause.target_pid is not None
    processes = teach.sandbox_processes(pause.target_pid)
    return [p for p in processes if p.pid != 1 and p.state not in ("Z", "X")]


def test_every_pause_in_order_and_the_stage_waits_for_its_go() -> None:
    pauses: list[teach.Pause] = []
    alive: dict[str, tuple[int, int]] = {}  # step -> services alive at its start, after HOLD
    mounts: dict[str, int] = {}

    def hook(pause: teach.Pause) -> None:
        pauses.append(pause)
        if pause.side != "stage":
            return
        assert pause.target_pid is not None
        mounts[pause.step] = len(teach.sandbox_mounts(pause.target_pid))
        if pause.step in ("SIGTERM", "SIGKILL"):
            before = len(others(pause))
            time.sleep(HOLD)
            alive[pause.step] = (before, len(others(pause)))

    # --stop=signal: the stage's own signals meet all three services (a graceful stop would
    # have stopped two of them first; test_graceful_stop.py teaches that one).
    events = rehearse(hook, stop="signal")

    last = events[-1]
    assert isinstance(last, Finished) and last.exit_status == 0
    assert "hi-1" in [event.text for event in events if isinstance(event, Console)]
    assert [(p.side, p.step) for p in pauses] == [
        *(("host", step) for step in teach.HOST_STEPS if step != "stop"),
        *(("stage", step) for step in teach.STAGE_STEPS),
    ]
    # Held at SIGTERM, the three services live on: the signal waits for the go.
    assert alive["SIGTERM"] == (3, 3)
    # Held at SIGKILL, the one that ignores SIGTERM is still there, and stays.
    assert alive["SIGKILL"] == (1, 1)
    # Before pivot_root the old root's mounts are all there; after it, the RAM root only.
    assert mounts["pivot_root"] > 3
    assert mounts["API mounts"] == 1
    by_step = {pause.step: pause for pause in pauses}
    assert by_step["seize"].syscall.startswith(
        f"ptrace(PTRACE_SEIZE, {by_step['seize'].target_pid}"
    )
    assert by_step["SIGTERM"].syscall == "kill(-1, SIGTERM)"
    assert by_step["exec"].syscall == 'execve("/bin/sh", ["/bin/sh", "-c", "echo hi-$$"], envp)'
    swap = by_step["swap"].registers
    assert any(row.changed and row.after is not None for row in swap)
    assert all(row.after is None for row in by_step["entry-stop"].registers)


def test_end_of_file_from_the_host_means_the_stage_goes_on() -> None:
    """A wizard closed mid-lesson: the host ends the channel at the stage's first pause, and
    the rehearsal finishes by itself, with no more pauses anywhere."""
    pauses: list[teach.Pause] = []

    def hook(pause: teach.Pause) -> None:
        pauses.append(pause)
        if pause.side == "stage":
            raise teach.StopTeaching

    started = time.monotonic()
    events = rehearse(hook)
    last = events[-1]
    assert isinstance(last, Finished) and last.exit_status == 0
    console = [event.text for event in events if isinstance(event, Console)]
    assert "hi-1" in console
    assert any("the host closed the channel: going on without pauses" in line for line in console)
    assert [p.step for p in pauses if p.side == "stage"] == ["sync"]
    assert time.monotonic() - started < 60


def dboot_rehearse_teach(answers: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DBOOT, "rehearse", "--teach", IMAGE, *INIT],
        input=answers,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
    )


def test_dboot_rehearse_teach_prints_each_pause_and_waits_for_enter() -> None:
    steps = len(teach.HOST_STEPS) + len(teach.STAGE_STEPS)
    done = dboot_rehearse_teach("\n" * steps)
    assert done.returncode == 0, done.stderr
    headers = [line for line in done.stderr.splitlines() if line.startswith("── ")]
    expected = [
        *(f"host {n}/9" for n in range(1, 10)),
        *(f"stage {n}/6" for n in range(1, 7)),
    ]
    assert [line.split(":")[0].removeprefix("── ") for line in headers] == expected
    assert "  ptrace(PTRACE_SEIZE, " in done.stderr
    assert "59 execve" in done.stderr or "221 execve" in done.stderr  # the swap's registers
    assert "hi-1" in done.stdout + done.stderr


def test_dboot_rehearse_teach_with_no_input_goes_on_without_pauses() -> None:
    done = dboot_rehearse_teach("")
    assert done.returncode == 0, done.stderr
    headers = [line for line in done.stderr.splitlines() if line.startswith("── ")]
    assert headers == ["── host 1/9: Reading the image ──"]
    assert "hi-1" in done.stdout + done.stderr
