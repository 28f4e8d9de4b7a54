"""The wizard on the real engine: real dockerd, the real preflight, a real rehearsal.

A rehearsal injects into the PID 1 of a fresh sandbox (new PID, mount, UTS, IPC and network
namespaces), never into this machine's PID 1: tests/conftest.py sets DBOOT_REHEARSAL_ONLY=1
and EngineBackend refuses anything else on top of the engine's own refusal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import Button, Input, RichLog

from app.tui.app import DbootApp, create_app
from app.tui.backend import EngineBackend, RunRequest
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.console import ConsoleView
from app.tui.widgets.run_panels import TeachingPanel
from injector.errors import BadInput
from injector.events import Progress, StepDone
from injector.rehearsal.sandbox import CGROUP_PREFIX, Sandbox, own_cgroup_directory
from tests.images import CROWD_TAGS, TINYBOX, build_missing_loader_image, export_tar
from tests.tui.helpers import (
    press,
    screen_text,
    settle,
    wait_for_run_end,
    wait_for_screen,
    wait_until,
)
from tests.tui.test_console import type_line

# tinybox: ours, under the test prefix, with decoys named like it in the engine too.
pytestmark = [pytest.mark.root, pytest.mark.engine, pytest.mark.usefixtures("tinybox")]

SIZE = (80, 24)
WIZARD = [sys.executable, "-m", "app.tui.main"]
# An init that ends by itself: tinybox's /sbin/init execs an interactive shell.
SAY_HELLO = "/bin/sh -c 'echo hello from PID $$; echo running $(cat /proc/1/comm)'"


def make(tmp_path: Path, **backend: Any) -> DbootApp:
    engine = EngineBackend(state_dir=tmp_path / "state", **backend)
    return create_app(engine, rehearse_only=True, blink=False)


async def pick_tinybox(pilot: Pilot[Any]) -> None:
    await pick_image(pilot, TINYBOX)


async def pick_image(pilot: Pilot[Any], ref: str) -> None:
    """Find ``ref`` as a person would, whatever else the engine holds: the list once loaded
    (whichever image is first), then `/` and its full name, then Enter takes it."""
    app = pilot.app
    await wait_until(pilot, lambda: "Enter: continue with" in screen_text(app), 30, "the list")
    await press(pilot, "slash", *ref)
    await wait_until(pilot, lambda: f"continue with {ref}" in screen_text(app), 30, ref)
    await wait_until(pilot, lambda: "history" in screen_text(app), 30, f"{ref}'s details")
    await press(pilot, "enter")
    await wait_for_screen(pilot, InitScreen)
    field = app.screen.query_one("#init-argv", Input)
    await wait_until(pilot, lambda: field.value != "", 30, "the suggested init")


async def reach_the_report(pilot: Pilot[Any]) -> None:
    """From a valid init on the Init step to the preflight report drawn on Resources."""
    app = pilot.app
    assert isinstance(app, DbootApp)
    await wait_until(pilot, lambda: "is an executable" in screen_text(app), 30, "validation")
    await press(pilot, "enter")
    await wait_for_screen(pilot, ResourcesScreen)
    await wait_until(pilot, lambda: app.wizard.choices.report is not None, 60, "the report")
    await settle(pilot)


async def test_images_init_and_resources_come_from_the_engine(tmp_path: Path) -> None:
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        assert app.screen.query_one("#init-argv", Input).value == "/sbin/init"
        await reach_the_report(pilot)
        text = screen_text(app)
        assert "image in RAM (estimate)" in text
        report = app.wizard.choices.report
        assert report is not None and 1 << 20 < report.ram.estimated_bytes < 16 << 20
        assert not app.screen.query_one("#nav-next", Button).disabled
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        assert "processes in" in screen_text(app)


async def test_ram_blocker_from_a_tiny_mem_available(tmp_path: Path) -> None:
    app = make(tmp_path, mem_available=1 << 20)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        await reach_the_report(pilot)
        assert app.screen.query_one("#nav-next", Button).disabled
        assert "blocked:" in screen_text(app)
        assert [n.code for n in app.wizard.choices.rehearsal_blockers if n.code.startswith("ram")]
        await press(pilot, "enter", "n")
        assert isinstance(app.screen, ResourcesScreen)


@pytest.fixture(scope="module")
def no_loader_image() -> str:
    """An image whose /sbin/init is dynamically linked and has no loader in the image."""
    return build_missing_loader_image()


async def test_an_init_that_cannot_run_here_is_a_blocker_in_the_wizard(
    tmp_path: Path, no_loader_image: str
) -> None:
    # The wizard's report comes from the engine's one check pipeline, which reads the init's
    # ELF header from the image: a dynamically linked init without its loader cannot start.
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pick_image(pilot, no_loader_image)
        assert app.screen.query_one("#init-argv", Input).value == "/sbin/init"
        await reach_the_report(pilot)
        codes = [n.code for n in app.wizard.choices.rehearsal_blockers]
        assert "init-loader-missing" in codes, codes
        assert "blocked:" in screen_text(app)
        assert app.screen.query_one("#nav-next", Button).disabled


@pytest.mark.timeout(300)
async def test_a_whole_rehearsal_through_the_wizard(tmp_path: Path) -> None:
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        app.screen.query_one("#init-argv", Input).value = SAY_HELLO
        await reach_the_report(pilot)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ProcessesScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, OptionsScreen)
        await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        assert app.screen.query_one("#confirm-switch", Button).disabled
        await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
        await wait_for_screen(pilot, RunScreen)
        await wait_for_run_end(pilot, 240)
        await settle(pilot)
        said = app.screen.query_one(ConsoleView).text()
        log = "\n".join(
            strip.text.rstrip() for strip in app.screen.query_one("#run-log", RichLog).lines
        )
        assert "hello from PID 1" in said, said + "\n---\n" + log
        assert "running sh" in said, said
        assert "exit status 0" in said, said
        assert "wait4" in log or "Stopped in" in screen_text(app)
    # Nothing left behind: the state dir's RAM root is not mounted anywhere we can see.
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(tmp_path / "state") not in mounts


@pytest.mark.timeout(300)
async def test_a_shell_answers_in_the_console_and_the_stop_key_ends_it(tmp_path: Path) -> None:
    # Issue 11 §2 on the real engine: the sandbox's console is a pty that is PID 1's
    # controlling terminal; the keys typed reach the rehearsed shell; F8 ends it cleanly.
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pick_tinybox(pilot)
        app.screen.query_one("#init-argv", Input).value = "/bin/sh"
        await reach_the_report(pilot)
        for _ in range(3):  # Resources -> Processes -> Options -> Confirm
            await press(pilot, "enter")
        await wait_for_screen(pilot, ConfirmScreen)
        await press(pilot, "enter")  # rehearse-only: Rehearse has the focus
        await wait_for_screen(pilot, RunScreen)
        view = app.screen.query_one(ConsoleView)
        assert app.focused is view
        await wait_until(pilot, lambda: "/ #" in view.text(), 240, "the shell's prompt")
        await type_line(pilot, "echo hi-$$")
        await wait_until(pilot, lambda: "\nhi-1" in view.text(), 30, "hi-1")
        # Field 7 of /proc/1/stat: PID 1's controlling terminal (0: none).
        await type_line(pilot, "echo ctty-$(cut -d' ' -f7 /proc/1/stat) $(tty)")
        await wait_until(pilot, lambda: "\nctty-" in view.text(), 30, "the ctty")
        answer = view.text().split("\nctty-")[1].split("\n")[0]
        assert answer.split()[0] != "0" and answer.split()[1] == "/dev/console", answer
        injection = app.screen.query_one(TeachingPanel).injection
        assert injection is not None
        sandbox = injection.pid  # the sandbox's PID 1, as the host sees it
        await press(pilot, "f8")
        await wait_for_run_end(pilot, 30)
        await settle(pilot)
        assert "── stopped: the sandbox is gone ──" in view.text()
        assert "r: rehearse again" in screen_text(app)
    assert not Path(f"/proc/{sandbox}").exists()
    assert str(tmp_path / "state") not in Path("/proc/self/mountinfo").read_text()
    assert not list(own_cgroup_directory().glob(f"{CGROUP_PREFIX}{os.getpid()}-*"))


@pytest.mark.timeout(300)
async def test_among_many_newer_images_the_filter_finds_ours_and_enter_rehearses(
    tmp_path: Path,
) -> None:
    # Issue 20: an engine with more images than the screen shows (the tier's crowd, newer than
    # ours, named to sort before and after it). A person filters; then Enter alone walks on,
    # and on the Confirm modal of a rehearse-only wizard Enter rehearses.
    listed = {f"{image.repository}:{image.tag}" for image in EngineBackend().list_images()}
    assert set(CROWD_TAGS) <= listed
    app = make(tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "Enter: continue with" in screen_text(app), 30, "list")
        first_screen = screen_text(app)
        assert "Newest first" in first_screen
        assert "tinybox" not in first_screen, first_screen  # what the old tests waited for
        await pick_tinybox(pilot)
        app.screen.query_one("#init-argv", Input).value = SAY_HELLO
        await reach_the_report(pilot)
        for step in (ProcessesScreen, OptionsScreen, ConfirmScreen, RunScreen):
            await press(pilot, "enter")
            await wait_for_screen(pilot, step)
        await wait_for_run_end(pilot, 240)
        await settle(pilot)
        said = app.screen.query_one(ConsoleView).text()
        assert "hello from PID 1" in said and "exit status 0" in said, said


@pytest.mark.timeout(300)
async def test_where_a_switch_is_possible_ctrl_r_rehearses_and_the_target_is_untouched(
    tmp_path: Path,
) -> None:
    # A switch on offer (--target-pid, the PID 1 of a namespace made here, never this
    # machine's): the hostname field has the focus, r is typed there, and Ctrl-R rehearses
    # in a sandbox of its own. The target namespace's PID 1 is left as it was.
    with Sandbox(services=1, console="capture") as target:
        assert target.pid != 1
        target_exe = os.readlink(f"/proc/{target.pid}/exe")
        services = target.service_pids()
        engine = EngineBackend(state_dir=tmp_path / "state", target_pid=target.pid)
        app = create_app(engine, rehearse_only=False, blink=False)
        async with app.run_test(size=SIZE) as pilot:
            await pick_tinybox(pilot)
            app.screen.query_one("#init-argv", Input).value = SAY_HELLO
            await reach_the_report(pilot)
            for step in (ProcessesScreen, OptionsScreen, ConfirmScreen):
                await press(pilot, "enter")
                await wait_for_screen(pilot, step)
            field = app.screen.query_one("#confirm-hostname", Input)
            assert app.focused is field
            assert "^R rehearses, with no typing" in screen_text(app)
            await press(pilot, "r")
            assert field.value == "r" and isinstance(app.screen, ConfirmScreen)
            await press(pilot, "ctrl+r")
            await wait_for_screen(pilot, RunScreen)
            run = app.screen
            assert isinstance(run, RunScreen) and run.request.rehearse
            await wait_for_run_end(pilot, 240)
            await settle(pilot)
            said = run.query_one(ConsoleView).text()
            assert "hello from PID 1" in said, said
        assert os.readlink(f"/proc/{target.pid}/exe") == target_exe
        assert all(Path(f"/proc/{pid}").exists() for pid in services), services


async def test_an_engine_that_does_not_answer_gets_the_how_to_start_it_screen(
    tmp_path: Path,
) -> None:
    # A real client against a socket nobody listens on: the real "engine down" path.
    app = make(tmp_path, docker_host=f"unix://{tmp_path}/no-engine.sock")
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: "does not answer" in screen_text(app), 30, "engine down")
        text = screen_text(app)
        assert "systemctl start docker" in text
        assert app.screen.query_one("#nav-next", Button).disabled


# --- issue 13: plain paths, progress while an archive is read, --target-pid ------------


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """tinybox as a docker save archive and as a filesystem tarball, each plain and
    compressed, plus files that are neither. Built with the real tools."""
    where = tmp_path_factory.mktemp("archives")
    saved = where / "saved.tar"
    subprocess.run(["docker", "save", "-o", str(saved), TINYBOX], check=True)
    root = export_tar(TINYBOX, where / "root.tar")
    made = {"docker save": saved, "rootfs": root}
    for tool, suffix in (("gzip", "gz"), ("zstd", "zst"), ("xz", "xz")):
        for name, plain in (("docker save", saved), ("rootfs", root)):
            packed = where / f"{plain.name}.{suffix}"
            with packed.open("wb") as out:
                subprocess.run([tool, "-c", str(plain)], stdout=out, check=True)
            made[f"{name} {tool}"] = packed
    (where / "notes.txt").write_text("not an archive\n")
    made["text"] = where / "notes.txt"
    with (where / "notes.gz").open("wb") as out:
        subprocess.run(["gzip", "-c", str(made["text"])], stdout=out, check=True)
    made["gzip text"] = where / "notes.gz"
    with tarfile.open(where / "empty.tar", "w"):
        pass
    made["empty tar"] = where / "empty.tar"
    return made


def test_a_plain_path_is_told_by_its_content(archives: dict[str, Path]) -> None:
    backend = EngineBackend()
    for name, path in archives.items():
        kind = name.split()[0]
        if kind in ("docker", "rootfs"):
            expected = ("docker-archive:" if kind == "docker" else "rootfs:") + str(path)
            assert backend.file_ref(str(path)) == expected, name
    # Explicit references are taken as given.
    assert backend.file_ref("rootfs:/x.tar") == "rootfs:/x.tar"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("text", "notes.txt: not a tar archive"),
        ("gzip text", "notes.gz: gzip-compressed, but not a tar archive"),
        ("empty tar", "empty.tar: an empty tar archive"),
        ("missing", "cannot read {dir}/missing.tar (No such file or directory)"),
        ("directory", "{dir} is not a regular file"),
    ],
)
def test_a_path_that_cannot_open_gets_one_line_reason(
    archives: dict[str, Path], name: str, reason: str
) -> None:
    folder = archives["text"].parent
    path = {"missing": folder / "missing.tar", "directory": folder}.get(name) or archives[name]
    with pytest.raises(BadInput) as raised:
        EngineBackend().file_ref(str(path))
    message = str(raised.value)
    assert reason.format(dir=folder) in message
    assert "\n" not in message and message.count(": give ") == 1  # one line, cause and fix


def read_progress(path: Path) -> list[tuple[int, int]]:
    """What the wizard's backend reports while it reads the archive at ``path``."""
    backend = EngineBackend()
    seen: list[tuple[int, int]] = []
    try:
        backend.read(backend.file_ref(str(path)), lambda done, total: seen.append((done, total)))
    finally:
        backend.close()
    return seen


def test_reading_an_archive_reports_its_bytes(archives: dict[str, Path]) -> None:
    for name in ("docker save", "docker save gzip", "rootfs", "rootfs zstd"):
        seen = read_progress(archives[name])
        size = archives[name].stat().st_size
        assert seen and all(total == size for _, total in seen), (name, seen)
        assert [done for done, _ in seen] == sorted(done for done, _ in seen), (name, seen)
        assert seen[-1] == (size, size), (name, seen)


def progress_while_reading(backend: EngineBackend, ref: str) -> list[Progress]:
    """A rehearsal's Progress events up to the end of its reading step, where it stops
    (before the sandbox: only the reading step is under test)."""
    run = backend.run(RunRequest(ref, ["/sbin/init"], rehearse=True), print)
    assert isinstance(run, Generator)
    seen: list[Progress] = []
    try:
        for event in run:
            if isinstance(event, StepDone) and event.step == "source":
                break
            if isinstance(event, Progress):
                seen.append(event)
    finally:
        run.close()
    return seen


def test_a_run_yields_progress_while_it_reads_the_archive(archives: dict[str, Path]) -> None:
    ref = "docker-archive:" + str(archives["docker save"])
    before_done = progress_while_reading(EngineBackend(), ref)
    size = archives["docker save"].stat().st_size
    assert before_done and {event.step for event in before_done} == {"source"}
    assert before_done[-1] == Progress("source", size, size)


def test_the_run_copies_from_the_source_the_wizard_read(archives: dict[str, Path]) -> None:
    # The Init and Check steps read the archive; the run that follows must not read it again.
    ref = "docker-archive:" + str(archives["docker save"])
    backend = EngineBackend()
    read: list[tuple[int, int]] = []
    backend.read(ref, lambda done, total: read.append((done, total)))
    report = backend.check(ref, ["/sbin/init"])
    assert read and report.ram.estimated_bytes > 0
    try:
        read_again = progress_while_reading(backend, ref)
    finally:
        backend.close()
    assert read_again == [], "the run read the archive a second time"


@pytest.mark.parametrize(
    ("target", "status", "words"),
    [
        ("1", 3, "--target-pid 1 is this machine's own PID 1"),
        ("self", 1, "is not PID 1 of its own PID namespace"),
    ],
)
def test_the_wizard_refuses_a_target_that_is_not_a_namespaces_pid_1(
    tmp_path: Path, target: str, status: int, words: str
) -> None:
    # Refused before the wizard even starts: nothing is ever attached to.
    pid = str(os.getpid()) if target == "self" else target
    result = subprocess.run(
        [*WIZARD, "--target-pid", pid, "--log-file", str(tmp_path / "tui.log")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == status, result.stderr
    assert words in result.stderr and result.stderr.count("\n") == 1
