"""The last step: the run itself (a rehearsal, a switch or an install), rendered from the
engine's event stream as it happens.

The whole ``backend.run`` iteration happens in ONE worker thread: ptrace requests belong
to the thread that attached, so the injection must never hop between threads.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import ClassVar

from rich.text import Text
from textual import events, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Label, ProgressBar, RichLog

from app.tui.backend import RunRequest
from app.tui.messages import EngineEvent, LastWords, RunEnded
from app.tui.progress import EtaClock, ProgressThrottle
from app.tui.screens.base import StepScreen
from app.tui.widgets.console import ConsoleView
from app.tui.widgets.login_check import LoginWaiter
from app.tui.widgets.run_panels import INSTALL_LESSONS, StepList, TeachingPanel
from app.tui.wizard import Outcome, Wizard
from initstage.console import VT_NUMBER
from injector.errors import DbootError
from injector.events import (
    Console,
    ConsoleAttached,
    Fact,
    Finished,
    Injection,
    Log,
    Notice,
    Progress,
    StepDone,
    StepFailed,
    StepStarted,
)

logger = logging.getLogger(__name__)

# An install's notices that are lines to read, not verdicts: its plan, and what to do after
# its reboot (injector.install.install).
PLAN_CODES = ("install-plan", "install-next")


def expect_next(init_argv: list[str]) -> str:
    return (
        f"Next: this terminal closes. Watch VT {VT_NUMBER} (Alt+F{VT_NUMBER}) or the serial "
        "console: the init "
        "stage stops the old processes, pivots into the RAM root and starts "
        f"`{' '.join(init_argv)}` as PID 1."
    )


def target_next(init_argv: list[str]) -> str:
    return (
        "The namespace's PID 1 now runs the init stage: it stops the namespace's other "
        f"processes, pivots into the RAM root and starts `{' '.join(init_argv)}`. Its "
        "console is the namespace's own. This machine's PID 1 was not touched."
    )


def install_next(request: RunRequest) -> str:
    """What the Run screen says before an install writes anything."""
    reboot = request.install is not None and request.install.reboot
    return (
        "Nothing is written until the plan is shown. Then the image is copied beside the old "
        "system, and the last step repoints the kernel's init at the boot shim: until then "
        "the old system boots as always. "
        + ("Then this machine reboots into the image." if reboot else "Then reboot when ready.")
    )


def how_it_ended(event: Finished, init_argv: list[str]) -> str:
    """The console's last line: how the rehearsed init ended."""
    if event.detail.startswith("stopped"):
        return "── stopped: the sandbox is gone ──"
    return f"── {init_argv[0]}: {event.detail or f'exit status {event.exit_status}'} ──"


class RunScreen(StepScreen):
    """A rehearsal's console is a terminal on the sandbox's pty (``ConsoleView``): it has
    the focus while the rehearsal runs, and takes the whole body then (F6 gives the steps
    back); F8 ends an init that never exits; once it ended, r rehearses again."""

    STEP = 7
    NEXT_LABEL = "Quit"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "next", "Quit"),
        # Priority: they work while the console has the focus (every other key is typed).
        Binding("f6", "toggle_console", "Console", priority=True),
        Binding("f8", "stop", "Stop", priority=True),
        Binding("r", "again", "Rehearse again"),
        # Not in the footer, which is full at 80 columns: the README and --help name it.
        Binding("f7", "toggle_teach", "Teach", priority=True, show=False),
    ]

    def __init__(self, wizard: Wizard, request: RunRequest) -> None:
        super().__init__(wizard)
        self.request = request
        self.running = True
        self.eta = EtaClock(wizard.clock)
        self.throttle = ProgressThrottle()
        # An install's "after the reboot" lines replaced the panel's first words.
        self.after_reboot = False

    def body(self) -> ComposeResult:
        with Horizontal(id="run-top"):
            with Vertical(id="run-left"):
                with VerticalScroll(id="run-steps"):
                    yield StepList(id="run-step-list")
                yield ProgressBar(total=100, show_eta=False, id="run-bar")
                yield Label("", id="run-bytes")
            with VerticalScroll(id="run-teach-box"):
                yield TeachingPanel(id="run-teach")
        with Horizontal(id="run-bottom"):
            yield RichLog(id="run-log", wrap=True, min_width=20, markup=False, highlight=False)
            if self.request.rehearse:
                yield ConsoleView(id="run-terminal")
            else:
                yield RichLog(
                    id="run-console", wrap=True, min_width=20, markup=False, highlight=False
                )

    def on_mount(self) -> None:
        rehearse = self.request.rehearse
        self.query_one("#run-steps").border_title = "Steps"
        self.query_one("#run-teach-box").border_title = "What is happening"
        self.query_one("#run-log").border_title = "Log"
        if rehearse:
            terminal = self.query_one(ConsoleView)
            terminal.border_title = "Sandbox console"
            terminal.border_subtitle = "F6: steps ⇄ console · F8: stop"
            # At once, not call_later as focus() does: a quick run's end must find it focused.
            self.set_focus(terminal)
        else:
            console = self.query_one("#run-console", RichLog)
            console.border_title = "What to expect next"
            console.write(
                Text(
                    install_next(self.request)
                    if self.request.install is not None
                    else "Nothing has changed yet: everything up to the injection "
                    "is undone if it fails.",
                    style="dim",
                )
            )
        what = "Rehearsing" if rehearse else "Switching to"
        if self.request.install is not None:
            what = "Installing"
            self.query_one(TeachingPanel).lessons = INSTALL_LESSONS
        self.block(f"{what} {self.request.image}…")
        self.drive(self.request)

    # --- the one thread that drives the engine ---------------------------------------------
    @work(thread=True, exclusive=True, group="run")
    def drive(self, request: RunRequest) -> None:
        def last_words(text: str) -> None:
            self.post_message(LastWords(text))

        if not request.rehearse and request.options.ssh_check is not None:
            request = dataclasses.replace(request, ssh_check_go=LoginWaiter(self.app))
        try:
            for event in self.wizard.backend.run(request, last_words):
                if isinstance(event, Progress) and not self.throttle.due(event):
                    continue
                self.post_message(EngineEvent(event))
        except DbootError as error:
            self.post_message(RunEnded(str(error)))
        except Exception as error:
            logger.exception("the run failed unexpectedly")
            name = type(error).__name__
            self.post_message(RunEnded(f"unexpected {name}: {error} (see the log file)"))
        else:
            self.post_message(RunEnded(None))

    # --- rendering the events ------------------------------------------------------------
    def log_line(self, text: str, style: str = "") -> None:
        logger.info("%s", text)
        self.query_one("#run-log", RichLog).write(Text(text, style=style))

    def on_engine_event(self, message: EngineEvent) -> None:
        event = message.event
        steps = self.query_one(StepList)
        teach = self.query_one(TeachingPanel)
        if isinstance(event, StepStarted):
            steps.started(event.step, event.title)
            self.fit_console()
            teach.step(event.step, event.title)
            self.log_line(f"▶ {event.title}", "bold")
        elif isinstance(event, StepDone):
            steps.finished(event.step, failed=False, detail=event.detail)
            self.log_line(f"✓ {event.step}: {event.detail}", "green")
        elif isinstance(event, StepFailed):
            steps.finished(event.step, failed=True, detail=event.error)
            self.log_line(f"✗ {event.step}: {event.error}", "bold red")
        elif isinstance(event, Progress):
            bar = self.query_one("#run-bar", ProgressBar)
            bar.update(total=event.total, progress=event.done)
            self.query_one("#run-bytes", Label).update(self.eta.describe(event))
        elif isinstance(event, Fact):
            section, key, value = event.section, event.key, event.value
            if section == "pid1" and key in ("pid", "exe"):
                teach.identity(key, str(value))
            if isinstance(value, list):  # one fact a line: the boot chain
                self.log_line(f"{section}.{key}:", "dim")
                for line in value:
                    self.log_line(f"  {line}", "dim")
            else:
                self.log_line(f"{section}.{key} = {value}", "dim")
        elif isinstance(event, Notice) and event.code in PLAN_CODES:
            self.plan_line(event)
        elif isinstance(event, Notice):
            fix = f" → {event.fix}" if event.fix else ""
            self.log_line(f"{event.level}: {event.message}{fix}", "yellow")
        elif isinstance(event, Log):
            self.log_line(event.text, "dim")
        elif isinstance(event, Injection):
            teach.injected(event)
            self.log_line(
                f"injected execve into pid {event.pid}: it was in "
                f"{event.interrupted_syscall}(), {event.elapsed_ms:.1f} ms",
                "bold",
            )
        elif isinstance(event, Console):
            self.query_one(ConsoleView).feed_text(event.text + "\n")
        elif isinstance(event, ConsoleAttached):
            if self.request.rehearse and self.is_mounted:
                self.query_one(ConsoleView).attach(event.fd)
            else:
                os.close(event.fd)
        elif isinstance(event, Finished):
            self.finished(event)

    def finished(self, event: Finished) -> None:
        if event.outcome == "rehearsed":
            status = event.exit_status
            line = f"Rehearsal finished: the sandboxed init exited with status {status}."
            self.log_line(line, "bold green" if status == 0 else "bold yellow")
            self.set_focus(None)  # the keys are the wizard's again: r, b, Enter
            # Once the console has its smaller size back: pyte wraps what is written then.
            note = how_it_ended(event, self.request.init_argv)
            self.call_after_refresh(self.query_one(ConsoleView).note, note)
        elif event.outcome == "installed":
            self.log_line(f"Installed: {event.detail}.", "bold green")
        else:
            self.log_line(f"Finished: {event.outcome}. {event.detail}", "bold green")
        if event.outcome == "injected":
            # --target-pid: this terminal stays; the namespace's own console shows the rest.
            console = self.query_one("#run-console", RichLog)
            console.clear()
            console.write(Text(target_next(self.request.init_argv), style="bold"))

    def plan_line(self, event: Notice) -> None:
        """An install's plan (what it will write, and where) and what to do after its
        reboot: lines to read, in the log; the latter also in "What to expect next"."""
        if event.code == "install-plan":
            self.log_line(event.message)
            return
        self.log_line(event.message, "bold")
        console = self.query_one("#run-console", RichLog)
        if not self.after_reboot:
            console.clear()
            self.after_reboot = True
        console.write(Text(event.message, style="bold"))

    def on_last_words(self, message: LastWords) -> None:
        # The last thing this terminal shows before the init stage takes it away.
        self.log_line(message.text, "bold yellow")
        console = self.query_one("#run-console", RichLog)
        console.clear()
        console.write(Text(expect_next(self.request.init_argv), style="bold"))

    def on_run_ended(self, message: RunEnded) -> None:
        self.running = False
        for terminal in self.query(ConsoleView):
            terminal.border_subtitle = "ended"
        if message.error is not None:
            self.log_line(f"✗ {message.error}", "bold red")
            self.query_one(StepList).fail_running(message.error)
            self.set_focus(None)
            self.unblock(f"failed (see the log) · {self.again_hint()}b: back · Enter: quit")
        else:
            self.unblock(f"done · {self.again_hint()}b: back to change something · Enter: quit")
        self.refresh_bindings()

    def again_hint(self) -> str:
        return "r: rehearse again · " if self.request.rehearse else ""

    # --- the console: focus, stop, again ---------------------------------------------------
    def on_descendant_focus(self, event: events.DescendantFocus) -> None:
        self.fit_console()

    def on_descendant_blur(self, event: events.DescendantBlur) -> None:
        self.fit_console()

    def fit_console(self) -> None:
        """The console takes the whole body while it has the focus once the image's init
        is starting: a terminal needs room. Before that, the steps are the show."""
        focused = isinstance(self.focused, ConsoleView)
        self.set_class(focused and "stage" in self.query_one(StepList).steps, "console-focused")
        # Once laid out (and shown again): the newest step is the one to see.
        box = self.query_one("#run-steps", VerticalScroll)
        self.call_after_refresh(box.scroll_end, animate=False)

    def action_toggle_console(self) -> None:
        terminal = self.query(ConsoleView)
        if not terminal:
            return
        self.set_focus(None if terminal.first().has_focus else terminal.first())
        self.fit_console()

    def on_unmount(self) -> None:
        # The app is going (a test's teardown, a crash): a rehearsal must not outlive it.
        self.request.stop.set()

    def action_stop(self) -> None:
        if self.running and self.request.rehearse and not self.request.stop.is_set():
            self.request.stop.set()
            self.log_line("Stopping: the sandbox and everything in it will be killed.", "bold")

    def action_again(self) -> None:
        """The same rehearsal from the start, on a fresh Run screen that answers the
        wizard loop in this one's place."""
        if self.running or not self.request.rehearse:
            return
        # F7 may have turned teaching on or off since: the new run pauses as it now says.
        pause = self.wizard.pause_hook(rehearse=True)
        request = dataclasses.replace(self.request, stop=threading.Event(), pause=pause)
        again = RunScreen(self.wizard, request)
        again._outcome, self._outcome = self._outcome, None
        self.app.switch_screen(again)

    def action_toggle_teach(self) -> None:
        self.wizard.teach = not self.wizard.teach
        state = "on: the next rehearsal pauses" if self.wizard.teach else "off"
        self.notify(f"Step-by-step teaching {state} before each step.")

    # --- leaving: never while the engine is still working --------------------------------
    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        rehearsal_only = ("toggle_console", "stop", "again", "toggle_teach")
        if action in rehearsal_only and not self.request.rehearse:
            return False
        if action == "stop":
            return True if self.running else None
        if action in ("back", "next", "again") and self.running:
            return None
        return super().check_action(action, parameters)

    def action_back(self) -> None:
        if not self.running:
            self.leave(Outcome.BACK)

    def action_next(self) -> None:
        if not self.running:
            self.app.exit()
