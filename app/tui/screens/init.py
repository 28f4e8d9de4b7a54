"""Step 2: the command the new PID 1 will run, checked against the image's own files."""

from __future__ import annotations

import shlex

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, Static

from app.tui.messages import ImageReading, InitChecked, InitSuggested
from app.tui.progress import EtaClock, ProgressThrottle
from app.tui.screens.base import StepScreen
from app.tui.widgets.chrome import Field
from app.tui.wizard import Choices
from injector.errors import DbootError
from injector.events import Progress

LESSON = (
    "This program becomes PID 1 of the new system: the kernel's first process, the parent "
    "of every orphan. If it ever exits, the kernel panics. An image made for containers "
    "often has no init at all: then a shell is the simplest PID 1 for a try-out."
)


def parse_argv(line: str) -> tuple[list[str], str | None]:
    """Shell-like splitting of the command line, or why it cannot be split."""
    try:
        return shlex.split(line), None
    except ValueError as error:
        return [], f"cannot split the command line: {error}"


class InitScreen(StepScreen):
    STEP = 1

    def body(self) -> ComposeResult:
        with Vertical(id="init-body"):
            yield Label("", id="init-image")
            yield Label("[b]Command for the new PID 1[/b] (argv, shell-style quoting)")
            yield Field(placeholder="/sbin/init", id="init-argv")
            yield Static("", id="init-hint")
            yield Static("", id="init-status")
            yield Static(Text(LESSON, style="dim"), id="init-lesson")

    def on_mount(self) -> None:
        choices = self.wizard.choices
        assert choices.image is not None, "the Images step chose an image"
        self.query_one("#init-image", Label).update(_image_line(choices.image, choices))
        self.block("looking for an init in the image…")
        self.checked: list[str] | None = None
        self.eta = EtaClock(self.wizard.clock)
        if choices.init_argv:
            # Back from a later step, same image: keep what the user typed.
            self._fill(choices.init_argv, "your previous choice")
        else:
            self.suggest(choices.image)

    @work(thread=True, exclusive=True, group="suggest")
    def suggest(self, ref: str) -> None:
        throttle = ProgressThrottle()

        def progress(done: int, total: int) -> None:
            event = Progress("read", done, total)
            if throttle.due(event):
                self.post_message(ImageReading(event))

        try:
            # Reading an archive's index can take a while: it is done once, here, in sight.
            self.wizard.backend.read(ref, progress)
            self.post_message(InitSuggested(self.wizard.backend.suggest_init(ref), None))
        except DbootError as error:
            self.post_message(InitSuggested(None, str(error)))

    def on_image_reading(self, message: ImageReading) -> None:
        status = self.query_one("#init-status", Static)
        status.update(Text(f"Reading the image: {self.eta.describe(message.progress)}"))

    def on_init_suggested(self, message: InitSuggested) -> None:
        if message.suggestion is None:
            self._fill([], "")
            self.block(message.error or "cannot read the image")
            return
        self._fill(message.suggestion.argv, message.suggestion.hint)

    def _fill(self, argv: list[str], hint: str) -> None:
        field = self.query_one("#init-argv", Input)
        field.value = shlex.join(argv)
        field.cursor_position = len(field.value)
        self.query_one("#init-hint", Static).update(Text(hint, style="italic"))
        field.focus()

    # --- validation: on every change, against the image, in a worker ----------------------
    @on(Input.Changed, "#init-argv")
    def changed(self, event: Input.Changed) -> None:
        argv, error = parse_argv(event.value)
        self.checked = None
        if error is not None or not argv:
            self._status(error or "type the command to run as PID 1", ok=False)
            return
        self.block(f"checking {argv[0]} in the image…")
        self.validate(self.wizard.choices.image or "", argv)

    @work(thread=True, exclusive=True, group="validate")
    def validate(self, ref: str, argv: list[str]) -> None:
        try:
            error = self.wizard.backend.validate_init(ref, argv)
        except DbootError as failure:
            error = str(failure)
        self.post_message(InitChecked(argv, error))

    def on_init_checked(self, message: InitChecked) -> None:
        current, _ = parse_argv(self.query_one("#init-argv", Input).value)
        if message.argv != current:
            return  # An answer about text the user has since changed.
        if message.error is not None:
            self._status(message.error, ok=False)
            return
        self.checked = message.argv
        self._status(f"{message.argv[0]} is an executable in the image", ok=True)

    def _status(self, text: str, *, ok: bool) -> None:
        status = self.query_one("#init-status", Static)
        status.update(Text(("✓ " if ok else "✗ ") + text, style="green" if ok else "bold red"))
        if ok:
            self.unblock("Enter: check the resources for this image and init")
        else:
            self.block("the init command is not usable yet (see above)")

    @on(Input.Submitted, "#init-argv")
    def submitted(self) -> None:
        self.action_next()

    def commit(self) -> bool:
        if self.checked is None:
            return False
        if self.wizard.choices.init_argv != self.checked:
            self.wizard.choices.report = None
        self.wizard.choices.init_argv = list(self.checked)
        return True


def _image_line(ref: str, choices: Choices) -> Text:
    """The chosen image with its own idea of a start command, for reference."""
    text = Text("Image ", style="dim")
    text.append(ref, style="bold")
    details = choices.details
    if details is not None:
        text.append("   entrypoint ", style="dim")
        text.append(" ".join(details.entrypoint or []) or "—")
        text.append("   cmd ", style="dim")
        text.append(" ".join(details.cmd or []) or "—")
    return text
