"""The wizard: one loop walks the steps; screens render, workers ask the engine.

``create_app`` is the only way to build it: ``main`` passes the real ``EngineBackend``, the
tests pass a fake with fixed images, processes and events, and a fixed clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone

from textual import work
from textual.app import App

from app.tui.backend import Backend
from app.tui.screens.base import StepScreen
from app.tui.screens.confirm import ConfirmScreen
from app.tui.screens.destination import DestinationScreen
from app.tui.screens.images import ImagesScreen
from app.tui.screens.init import InitScreen
from app.tui.screens.options import OptionsScreen
from app.tui.screens.processes import ProcessesScreen
from app.tui.screens.resources import ResourcesScreen
from app.tui.screens.run import RunScreen
from app.tui.widgets.teach import UiPauser
from app.tui.wizard import Outcome, Wizard

# The steps before the Confirm modal, in order; each is built when the user moves forward.
STEPS: tuple[Callable[[Wizard], StepScreen], ...] = (
    ImagesScreen,
    InitScreen,
    ResourcesScreen,
    ProcessesScreen,
    OptionsScreen,
)


def steps_for(wizard: Wizard) -> tuple[Callable[[Wizard], StepScreen], ...]:
    """The steps this wizard walks: the Destination step too where it may install."""
    return (*STEPS, DestinationScreen) if wizard.asks_destination else STEPS


# Back from a finished run lands here: change the init command (or Escape once more for the
# image) and go again.
AFTER_RUN_STEP = 1


class DbootApp(App[None]):
    CSS_PATH = "dboot.tcss"
    TITLE = "docker-boot"

    def __init__(self, wizard: Wizard, *, blink: bool = True) -> None:
        super().__init__()
        self.wizard = wizard
        # A teaching rehearsal's pauses show over the Run screen, answered here.
        wizard.pauser = UiPauser(self)
        # Snapshot tests turn the blinking cursor off so that every capture is identical.
        self.blink = blink

    def on_mount(self) -> None:
        self.walk()

    @work(exclusive=True, group="wizard")
    async def walk(self) -> None:
        """The one loop: Images → Init → Resources → Processes → Options (→ Destination)
        → Confirm → Run, with Back."""
        steps = steps_for(self.wizard)
        stack: list[StepScreen] = []
        index = 0
        while True:
            if index == len(stack):
                screen = steps[index](self.wizard)
                outcome = screen.wait_outcome()
                await self.push_screen(screen)
                stack.append(screen)
            else:
                outcome = stack[index].wait_outcome()  # Back to a screen still on the stack.
            if await outcome is Outcome.BACK:
                await self.pop_screen()
                stack.pop()
                index -= 1
                continue
            if index + 1 < len(steps):
                index += 1
                continue
            choice = await self.push_screen_wait(ConfirmScreen(self.wizard))
            if choice is Outcome.BACK:
                continue
            await self.run_once(choice)
            while len(stack) > AFTER_RUN_STEP + 1:
                await self.pop_screen()
                stack.pop()
            index = AFTER_RUN_STEP

    async def run_once(self, choice: Outcome) -> None:
        # Rehearse-only mode never builds a real request, whatever the modal said; an install
        # is one only where the Destination step chose it.
        install = self.wizard.install_chosen if choice is Outcome.INSTALL else None
        real = choice is Outcome.SWITCH or install is not None
        request = self.wizard.request(
            rehearse=not real or self.wizard.rehearse_only, install=install
        )
        screen = RunScreen(self.wizard, request)
        outcome = screen.wait_outcome()
        await self.push_screen(screen)
        await outcome
        await self.pop_screen()

    def run_in_progress(self) -> bool:
        return any(worker.group == "run" and worker.is_running for worker in self.workers)

    async def action_quit(self) -> None:
        # Leaving mid-run would abandon the sandbox and the tmpfs without their clean-up.
        if self.run_in_progress():
            self.notify("Wait for the run to end: it cleans up after itself.", severity="warning")
            return
        self.exit()

    def on_unmount(self) -> None:
        self.wizard.backend.close()


def rehearse_only_reason(*, rehearse_flag: bool, backend: Backend) -> str | None:
    """Why the real switch is off, in words for the Confirm modal; None when it is on."""
    if rehearse_flag:
        return "the wizard was started with --rehearse"
    # --target-pid: the switch replaces a namespace's PID 1, which lab mode allows (the
    # engine still refuses this machine's own).
    if backend.switch_target() is not None:
        return None
    return backend.lab_mode_reason()


def create_app(
    backend: Backend,
    *,
    rehearse_only: bool,
    clock: Callable[[], datetime] | None = None,
    blink: bool = True,
) -> DbootApp:
    """Build the wizard. ``rehearse_only`` is the --rehearse flag; lab mode forces it too."""
    reason = rehearse_only_reason(rehearse_flag=rehearse_only, backend=backend)
    wizard = Wizard(
        backend=backend,
        rehearse_only=reason is not None,
        rehearse_only_reason=reason or "",
        clock=clock or (lambda: datetime.now(timezone.utc)),
    )
    return DbootApp(wizard, blink=blink)
