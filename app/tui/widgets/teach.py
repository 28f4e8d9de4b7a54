"""The teaching rehearsal's pause: what is about to happen, the system call it makes, the
registers at the swap, and the sandbox's processes and mounts as they are right now.

The engine calls the pause hook (``UiPauser``) from the run's worker threads; it shows a
``TeachScreen`` over the Run screen and blocks that thread until Space or Enter (go on) or
``c`` (go on, and no more pauses). A wizard that is gone answers "no more pauses": the
engine and the stage then run to the end by themselves.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from rich.console import RenderableType
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Static

from injector import teach
from injector.inject import arch as archmod

REFRESH_SECONDS = 0.5  # the panels re-read the sandbox this often while a pause shows
ANSWER_POLL = 0.5  # how often a waiting engine thread looks whether the wizard is still there
UNTIL_POLL = 0.1  # how often it looks whether what it waits for happened by itself
Answer = TypeVar("Answer")


@dataclasses.dataclass
class SandboxReaders:
    """Where the panels read the sandbox from; tests give fixed data for the snapshots."""

    processes: Callable[[int], list[teach.SandboxProcess]] = teach.sandbox_processes
    mounts: Callable[[int], list[str]] = teach.sandbox_mounts


def pause_text(pause: teach.Pause) -> Text:
    """The pause in words: where it is, what happens, the call, and the registers."""
    text = Text(f"Step by step · {pause.position}\n", style="dim")
    text.append(pause.title, style="bold")
    text.append(f"\n{pause.explanation}\n\n")
    text.append(pause.syscall, style="bold cyan")
    if pause.registers:
        arch = archmod.ARCHES[pause.arch]
        changed = "; * changed" if any(row.after is not None for row in pause.registers) else ""
        text.append(f"\n\nRegisters ({arch.name}{changed}):", style="bold")
        for line in teach.render_registers(arch, pause.registers):
            text.append("\n" + line, style="yellow" if line.startswith("*") else "")
    return text


class _LivePanel(Widget):
    """A view of the sandbox re-read every REFRESH_SECONDS while the pause shows."""

    def __init__(self, sandbox_pid: int | None, readers: SandboxReaders, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sandbox_pid = sandbox_pid
        self.readers = readers

    def on_mount(self) -> None:
        self.reread()
        if self.sandbox_pid is not None:
            self.set_interval(REFRESH_SECONDS, self.reread)

    def reread(self) -> None:
        if self.sandbox_pid is not None:
            self.read(self.sandbox_pid)
        self.refresh(layout=True)

    def read(self, sandbox_pid: int) -> None:
        raise NotImplementedError


class ProcessesPanel(_LivePanel):
    """The sandbox's processes by their pid inside it."""

    processes: list[teach.SandboxProcess] = []  # noqa: RUF012 (replaced, never mutated)

    def read(self, sandbox_pid: int) -> None:
        self.processes = self.readers.processes(sandbox_pid)

    def render(self) -> RenderableType:
        if self.sandbox_pid is None:
            return Text("No sandbox yet: it starts once the image is read.", style="dim")
        if not self.processes:
            return Text("The sandbox is gone.", style="dim")
        lines = []
        for process in self.processes:
            dead = process.state in ("Z", "X")
            line = Text(f"{process.pid:>4} {process.comm:<15} {process.state}")
            if dead:
                line.stylize("dim")
                line.append(" dead", style="red")
            lines.append(line)
        return Text("\n").join(lines)


class MountsPanel(_LivePanel):
    """The mount table of the sandbox's PID 1: the old root's, until the pivot."""

    mounts: list[str] = []  # noqa: RUF012 (replaced, never mutated)

    def read(self, sandbox_pid: int) -> None:
        self.mounts = self.readers.mounts(sandbox_pid)

    def render(self) -> RenderableType:
        if self.sandbox_pid is None or not self.mounts:
            return Text("No sandbox mounts to show.", style="dim")
        text = Text(f"{len(self.mounts)} mounts\n", style="bold")
        text.append("\n".join(self.mounts))
        return text


class TeachScreen(ModalScreen[bool]):
    """One pause. Dismissed with True (go on) or False (go on, no more pauses)."""

    readers: ClassVar[SandboxReaders] = SandboxReaders()
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("space,enter", "go", "Go on"),
        Binding("c", "no_more", "No more pauses"),
    ]
    DEFAULT_CSS = """
    TeachScreen { align: center middle; }
    #teach-box { width: 100%; height: 100%; border: thick $accent; padding: 0 1; }
    #teach-text-box { width: 1fr; height: 1fr; margin-right: 1; }
    #teach-side { width: 30; height: 1fr; }
    #teach-side.hidden { display: none; }
    #teach-processes, #teach-mounts {
        height: 1fr; border: round $secondary; overflow: hidden hidden;
    }
    #teach-keys { height: 1; color: $text-muted; }
    """

    def __init__(self, pause: teach.Pause) -> None:
        super().__init__()
        self.pause = pause

    def compose(self) -> ComposeResult:
        pause = self.pause
        with Vertical(id="teach-box"):
            with Horizontal():
                with VerticalScroll(id="teach-text-box"):
                    yield Static(pause_text(pause), id="teach-text")
                # At the injection the registers need the width; the sandbox holds still then.
                with Vertical(id="teach-side", classes="hidden" if pause.registers else ""):
                    yield ProcessesPanel(pause.target_pid, self.readers, id="teach-processes")
                    yield MountsPanel(pause.target_pid, self.readers, id="teach-mounts")
            yield Static(
                "Space/Enter: go on · c: no more pauses (the run goes on by itself)",
                id="teach-keys",
            )

    def on_mount(self) -> None:
        box = self.query_one("#teach-box")
        box.border_title = f"Teaching pause: {self.pause.title}"
        self.query_one("#teach-processes").border_title = "Sandbox processes"
        self.query_one("#teach-mounts").border_title = "Sandbox mounts"

    def action_go(self) -> None:
        self.dismiss(True)

    def action_no_more(self) -> None:
        self.dismiss(False)


class AppGone(Exception):
    """The wizard stopped while a worker thread waited for an answer."""


def wait_for_answer(
    app: App[Any],
    make_screen: Callable[[], ModalScreen[Answer]],
    until: threading.Event | None = None,
) -> Answer | None:
    """Show the screen ``make_screen()`` from a worker thread and block that thread until it is
    dismissed: its answer. Once ``until`` is set first, the screen is closed and the answer is
    None. ``AppGone`` when the wizard stops meanwhile. Never call it from the UI thread.

    The screen is made on the UI thread: before Python 3.10, the asyncio lock a Textual screen
    makes for itself wants the event loop of the thread it is made in, and a worker has none."""
    answered = threading.Event()
    answers: list[Answer | None] = []
    screens: list[ModalScreen[Answer]] = []

    def show() -> None:
        screens.append(make_screen())
        app.push_screen(screens[0], answer)

    def answer(result: Answer | None) -> None:
        answers.append(result)
        answered.set()

    def close() -> None:
        if answered.is_set():
            return
        if screens and screens[0].is_current:
            screens[0].dismiss(None)
        else:
            answer(None)

    try:
        app.call_from_thread(show)
        while not answered.wait(ANSWER_POLL if until is None else UNTIL_POLL):
            if not app.is_running:
                raise AppGone
            if until is not None and until.is_set():
                app.call_from_thread(close)
    except RuntimeError as error:  # the app is not running any more
        raise AppGone from error
    return answers[0]


class UiPauser:
    """The engine's pause hook for the wizard: blocks the calling (worker) thread until the
    pause is answered. Never call it from the UI thread."""

    def __init__(self, app: App[Any]) -> None:
        self.app = app

    def __call__(self, pause: teach.Pause) -> None:
        try:
            go_on = wait_for_answer(self.app, lambda: TeachScreen(pause))
        except AppGone as error:
            raise teach.StopTeaching from error
        if not go_on:
            raise teach.StopTeaching
