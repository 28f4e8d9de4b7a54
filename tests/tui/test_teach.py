"""The teaching rehearsal in the wizard: pauses shown over the Run screen, Space or Enter
going on, c ending the pauses, the F7 key, and snapshots of a host and a stage pause.

The fake backend's run calls the pause hook with fixed pauses (and fixed sandbox panels);
the real one runs a whole teaching rehearsal of tinybox through every pause.
"""

from __future__ import annotations

import io
import shlex
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from app.cli import parse_command_line, switch_options
from app.tui.app import DbootApp, create_app
from app.tui.backend import EngineBackend, RunRequest
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.teach import SandboxReaders, TeachScreen
from injector import teach
from injector.events import Event
from injector.inject import arch as archmod
from tests.images import TINYBOX
from tests.tui.fakes import FakeBackend, SteppingClock
from tests.tui.helpers import press, screen_text, wait_for_run_end, wait_for_screen, wait_until
from tests.tui.test_snapshots import SnapCompare, confirm
from tests.tui.test_tmux import Terminal
from tests.tui.test_tmux import wizard as wizard  # the fixture

X86 = archmod.X86_64
SANDBOX_PID = 4242
BEFORE = {"rip": 0x7F3A1C2B4BD3, "rsp": 0x7FFC6A72B6B8, "rax": -38, "orig_rax": 61}
BEFORE |= {"rdi": 0xFFFFFFFF, "rsi": 0x7FFC6A72B6CC, "rdx": 0, "r10": 0, "r8": 0, "r9": 0}
AFTER = BEFORE | {"orig_rax": 59, "rdi": 0x7FFC6A72ADA8, "rsi": 0x7FFC6A72AD40}
AFTER |= {"rdx": 0x7FFC6A72AD90}
SWAP = teach.Pause(
    "host",
    "swap",
    teach.swap_call(X86, SANDBOX_PID, 0x7FFC6A72AD40, 2285),
    SANDBOX_PID,
    X86.name,
    teach.register_rows(X86, BEFORE, AFTER, kernel_nr=(61, None)),
)
SIGTERM = teach.Pause("stage", "SIGTERM", "kill(-1, SIGTERM)", SANDBOX_PID)
FAKE_PAUSES = (SWAP, SIGTERM)
FIXED_READERS = SandboxReaders(
    processes=lambda pid: [
        teach.SandboxProcess(1, pid, "python3.11", "S"),
        teach.SandboxProcess(2, pid + 1, "svc-stubborn", "S"),
        teach.SandboxProcess(3, pid + 2, "svc-plain", "S"),
        teach.SandboxProcess(4, pid + 3, "svc-zombie", "Z"),
    ],
    mounts=lambda pid: ["/", "/dev", "/proc", "/sys", "/run/dboot", "/run/dboot/root"],
)


class TeachingFake(FakeBackend):
    """The fake run, with the engine's pause semantics in front: each fixed pause goes to
    the hook, and StopTeaching ends the pauses (as ``teach.Teacher`` does in the engine)."""

    def run(self, request: RunRequest, last_words: Callable[[str], None]) -> Iterator[Event]:
        if request.pause is not None:
            teacher = teach.Teacher(request.pause)
            for pause in FAKE_PAUSES:
                teacher(pause)
        yield from super().run(request, last_words)


@pytest.fixture(autouse=True)
def fixed_panels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TeachScreen, "readers", FIXED_READERS)


def gone(app: DbootApp, screen: TeachScreen) -> Callable[[], bool]:
    return lambda: app.screen is not screen


async def rehearsing(pilot: Pilot[Any]) -> None:
    """Confirm a rehearsal; the Run screen may be under a pause at once."""
    await confirm(pilot)
    await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
    app = pilot.app
    await wait_until(
        pilot, lambda: any(isinstance(s, RunScreen) for s in app.screen_stack), 10, "run"
    )


def make(backend: FakeBackend, *, teaching: bool = True) -> DbootApp:
    app = create_app(backend, rehearse_only=True, clock=SteppingClock(), blink=False)
    app.wizard.teach = teaching
    return app


def showing(app: DbootApp, pause: teach.Pause) -> Callable[[], bool]:
    return lambda: isinstance(app.screen, TeachScreen) and app.screen.pause == pause


async def test_each_pause_shows_until_space_or_enter() -> None:
    app = make(TeachingFake())
    async with app.run_test(size=(80, 24)) as pilot:
        await rehearsing(pilot)
        await wait_until(pilot, showing(app, SWAP), 10, "the swap pause")
        text = screen_text(app)
        assert "The register swap" in text and "host 8/9" in text
        assert "* orig_rax  61 wait4 → 59 execve" in text
        assert "ptrace(PTRACE_SETREGSET, 4242, NT_PRSTATUS, &iov)" in text
        await press(pilot, "space")
        await wait_until(pilot, showing(app, SIGTERM), 10, "the SIGTERM pause")
        text = screen_text(app)
        assert "SIGTERM to everyone" in text and "kill(-1, SIGTERM)" in text
        assert "svc-stubborn" in text and "/run/dboot/root" in text and "6 mounts" in text
        await press(pilot, "enter")
        await wait_for_run_end(pilot)
        assert isinstance(app.screen, RunScreen)


async def test_c_ends_the_pauses_and_the_run_goes_on() -> None:
    backend = TeachingFake()
    app = make(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await rehearsing(pilot)
        await wait_until(pilot, showing(app, SWAP), 10, "the swap pause")
        await press(pilot, "c")
        await wait_for_run_end(pilot)
        assert isinstance(app.screen, RunScreen)
        assert backend.requests[0].pause is not None


async def test_no_pauses_unless_teaching_and_f7_turns_it_on_for_the_next() -> None:
    backend = TeachingFake()
    app = make(backend, teaching=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await rehearsing(pilot)
        await wait_for_run_end(pilot)
        assert backend.requests[0].pause is None
        await press(pilot, "f7")
        assert app.wizard.teach
        app.screen.set_focus(None)  # the keys to the screen, not the console
        await press(pilot, "r")  # rehearse again: this one teaches
        await wait_until(pilot, showing(app, SWAP), 10, "the swap pause")
        await press(pilot, "c")
        await wait_for_run_end(pilot)
        assert backend.requests[1].pause is not None


def test_snapshot_host_pause(snap_compare: SnapCompare) -> None:
    app = make(TeachingFake())

    async def paused(pilot: Pilot[Any]) -> None:
        await rehearsing(pilot)
        await wait_until(pilot, showing(app, SWAP), 10, "the swap pause")

    assert snap_compare(app, run_before=paused)


def test_snapshot_stage_pause(snap_compare: SnapCompare) -> None:
    app = make(TeachingFake())

    async def paused(pilot: Pilot[Any]) -> None:
        await rehearsing(pilot)
        await wait_until(pilot, showing(app, SWAP), 10, "the swap pause")
        await press(pilot, "space")
        await wait_until(pilot, showing(app, SIGTERM), 10, "the SIGTERM pause")

    assert snap_compare(app, run_before=paused)


@pytest.mark.root
@pytest.mark.engine
@pytest.mark.usefixtures("tinybox")
@pytest.mark.timeout(300)
async def test_a_teaching_rehearsal_on_the_real_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every host and stage pause of a real rehearsal shows in turn; Enter goes on."""
    monkeypatch.setattr(TeachScreen, "readers", SandboxReaders())  # the real sandbox
    from tests.tui.test_engine import SAY_HELLO, pick_tinybox, reach_the_report

    engine = EngineBackend(state_dir=tmp_path / "state")
    app = create_app(engine, rehearse_only=True, blink=False)
    app.wizard.teach = True
    seen: list[str] = []
    async with app.run_test(size=(80, 24)) as pilot:
        await pick_tinybox(pilot)
        app.screen.query_one("#init-argv").value = SAY_HELLO  # type: ignore[attr-defined]
        await reach_the_report(pilot)
        while not isinstance(app.screen, OptionsScreen):
            await press(pilot, "enter")  # the steps after Resources, whichever there are
        # The line that replays this run says it teaches, and dboot reads it back so (issue 20).
        line = app.wizard.command_line()
        assert line.startswith(f"dboot rehearse --teach --state-dir {tmp_path / 'state'} ")
        parsed = switch_options(parse_command_line(shlex.split(line)[1:]), io.StringIO())
        assert parsed.pause is not None and parsed.init_argv == shlex.split(SAY_HELLO)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        assert app.screen.command_line == line  # type: ignore[attr-defined]
        assert app.focused is not None and app.focused.id == "confirm-rehearse"
        await press(pilot, "enter")  # rehearse-only: Rehearse has the focus, Enter rehearses
        for side, step in [("host", s) for s in teach.HOST_STEPS] + [
            ("stage", s) for s in teach.STAGE_STEPS
        ]:
            await wait_for_screen(pilot, TeachScreen, 60)
            screen = app.screen
            assert isinstance(screen, TeachScreen)
            assert (screen.pause.side, screen.pause.step) == (side, step)
            assert screen.pause.title in screen_text(app)
            seen.append(step)
            await press(pilot, "enter")
            await wait_until(pilot, gone(app, screen), 10, "the pause to go")
        await wait_for_run_end(pilot, 120)
    assert seen == [*teach.HOST_STEPS, *teach.STAGE_STEPS]


# --- as a person would: dboot-tui --rehearse --teach in an 80x24 tmux ---------------------

# Each pause's words on screen: the host's calls name the sandbox's pid, so only their start.
PAUSE_TEXTS = {
    "source": "read(fd, buf, 1 MiB)",
    "preflight": 'open("/proc/meminfo")',
    "copy": 'mount("dboot"',
    "stop": 'send(control, "stop ',
    "seize": "ptrace(PTRACE_SEIZE,",
    "interrupt": "ptrace(PTRACE_INTERRUPT,",
    "entry-stop": "ptrace(PTRACE_GETREGSET,",
    "swap": "ptrace(PTRACE_SETREGSET,",
    "execve": "ptrace(PTRACE_SYSCALL,",
    "sync": "sync(), and syncfs(fd)",
    "SIGTERM": "kill(-1, SIGTERM)",
    "SIGKILL": "kill(-1, SIGKILL)",
    "pivot_root": 'pivot_root(".", ".")',
    "API mounts": 'mount("proc", "/proc", "proc"',
    "exec": 'execve("/bin/sh", ["/bin/sh", "-c",',
}


@pytest.mark.root
@pytest.mark.engine
@pytest.mark.usefixtures("tinybox")
@pytest.mark.timeout(400)
def test_a_person_walks_through_every_pause(wizard: Callable[..., Terminal]) -> None:
    terminal = wizard("--rehearse", "--teach")
    terminal.wait_for("Enter: continue with")  # the list, whatever image is first
    terminal.keys("/")
    terminal.wait_for("filter: repository")
    terminal.keys(TINYBOX, literal=True)
    terminal.wait_for(f"Enter: continue with {TINYBOX}")
    terminal.keys("Enter")
    terminal.wait_for("Command for the new PID 1")
    terminal.wait_for("is an executable in the image")
    terminal.keys("C-u")
    terminal.wait_for("type the command to run as PID 1")  # emptied, then the new one
    terminal.keys("/bin/sh -c 'echo hi-$$'", literal=True)
    terminal.wait_for("/bin/sh is an executable in the image")
    terminal.keys("Enter")
    terminal.wait_for("Enter: see the processes", timeout=60)
    terminal.keys("Enter")
    terminal.wait_for("processes in")
    terminal.keys("Enter")
    terminal.wait_for("Enter: confirm")
    terminal.keys("Enter")
    terminal.wait_for("Rehearse or switch?")
    terminal.keys("Enter")  # rehearse-only: Rehearse has the focus
    for side, steps in (("host", teach.HOST_STEPS), ("stage", teach.STAGE_STEPS)):
        for number, step in enumerate(steps, start=1):
            title = teach.LESSONS[step][0]
            shown = terminal.wait_for(f"Step by step · {side} {number}/{len(steps)}", timeout=90)
            assert f"Teaching pause: {title}" in shown, shown
            assert PAUSE_TEXTS[step] in shown, shown
            if step == "swap":
                assert "59 execve" in shown, shown  # the kernel's number, before → after
            if step == "SIGKILL":
                assert "svc-stubborn" in shown, shown  # the one that ignored SIGTERM
            terminal.keys("Space")
    terminal.wait_for("Rehearsal finished", timeout=120)
    shown = terminal.wait_for("hi-1")
    assert "Teaching pause" not in shown
