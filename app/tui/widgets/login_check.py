"""A real switch's login check (``--ssh-check``): the image's sshd runs in the RAM root, and
the run waits, before the point of no return, for a login there from another terminal.

The engine calls ``LoginWaiter`` from the run's worker thread with the ``ssh`` line to try;
it shows a ``LoginCheckScreen`` over the Run screen and blocks that thread the way the
teaching pauses do (``wait_for_answer``) until sshd accepted a login (the screen closes by
itself), Enter (go on without one) or Escape (call the switch off: the engine undoes
everything). A wizard that is gone calls the switch off.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, ClassVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static

from app.tui.widgets.teach import AppGone, wait_for_answer

logger = logging.getLogger(__name__)

KEYS = "Enter: go on without one · Escape: call the switch off · ^Y: copy"


class LoginCheckScreen(ModalScreen[bool]):
    """The login line, until dismissed: True (go on) or False (call the switch off)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "go", "Go on"),
        Binding("escape", "call_off", "Call off"),
        Binding("ctrl+y", "copy_line", "Copy"),
    ]
    DEFAULT_CSS = """
    LoginCheckScreen { align: center middle; }
    #login-box { width: 76; height: auto; border: thick $warning; padding: 0 1; }
    #login-line { margin: 1 0; }
    #login-keys { color: $text-muted; }
    """

    def __init__(self, command: str) -> None:
        super().__init__()
        self.command = command

    def compose(self) -> ComposeResult:
        with Vertical(id="login-box"):
            yield Static(
                "The image's sshd runs in the RAM root. Nothing has changed yet. "
                "Log in from another terminal with:"
            )
            yield Static(Text(self.command, style="bold reverse"), id="login-line")
            yield Static(
                "Waiting for a login… The switch goes on once it is accepted.", id="login-wait"
            )
            yield Static(KEYS, id="login-keys")

    def on_mount(self) -> None:
        self.query_one("#login-box").border_title = "Login check before the switch"
        logger.info("login check: waiting for a login with: %s", self.command)

    def action_go(self) -> None:
        self.dismiss(True)

    def action_call_off(self) -> None:
        self.dismiss(False)

    def action_copy_line(self) -> None:
        self.app.copy_to_clipboard(self.command)
        self.notify("Login line copied (OSC 52; it is in the wizard's log file too).")


class LoginWaiter:
    """The engine's ``ssh_check_go`` for the wizard (``sshcheck.GoCallback``): True to go
    on, False to call the switch off. Never call it from the UI thread."""

    def __init__(self, app: App[Any]) -> None:
        self.app = app

    def __call__(self, command: str, done: threading.Event) -> bool:
        try:
            go_on = wait_for_answer(self.app, lambda: LoginCheckScreen(command), until=done)
        except AppGone:
            return False
        # None: a login was accepted (or sshd died: the engine tells which) before any key.
        return go_on is None or go_on
