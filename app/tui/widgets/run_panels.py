"""Panels of the Run screen: the engine's steps with their states, and what is happening."""

from __future__ import annotations

import dataclasses
import textwrap

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

from injector.events import Injection

# What each engine step does, for the "what is happening" panel. Steps the wizard does not
# know yet are explained by their own title, so a new engine step never breaks the panel.
STEP_LESSONS = {
    "source": "Reading the image's file list: the sizes give the RAM estimate. "
    "No file data is copied yet.",
    "preflight": "Facts first (RAM, swap, the processes, may PID 1 be traced?), then verdicts.",
    "swap": "Disk swap goes off while the old disk can still give its pages back.",
    "ramroot": "A tmpfs sized to fit is mounted at <state>/root and the image is copied in; "
    "then the plan for the init stage is written.",
    "inject": "ptrace stops PID 1 at a syscall entry, writes execve's arguments below its "
    "stack and turns its syscall into execve(python, initstage).",
    "stage": "The stage is PID 1 now: it stops the old processes, pivot_root()s into the "
    "tmpfs, detaches the old root and execs the new init.",
}

# The same for an install (`dboot install`): nothing runs from RAM, nothing is injected.
INSTALL_LESSONS = {
    "source": "Reading the image's file list: the sizes give the space the install needs "
    "on the disk. Nothing is written yet.",
    "preflight": "Facts first (the root filesystem and its free space, the boot chain, the "
    "old system's python3 for the boot shim), then verdicts.",
    "plan": "What the install will write, and where. Nothing is written yet.",
    "tree": "The image goes into a .partial- directory beside the old system, with the "
    "carry-over, the kernel's modules and a new fstab; flushed, then renamed.",
    "shim": "The boot shim and its state go into /dboot. The old system still boots: the "
    "kernel's init path is not changed yet.",
    "commit": "One rename() repoints the kernel's init path at the boot shim: from the next "
    "boot on, the image starts, on probation.",
}

STATE_MARKS = {"running": ("▶", "bold yellow"), "done": ("✓", "green"), "failed": ("✗", "bold red")}


@dataclasses.dataclass
class StepLine:
    title: str
    state: str = "running"
    detail: str = ""


class StepList(Widget):
    """The engine's steps in the order they started, each running, done or failed."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.steps: dict[str, StepLine] = {}

    def started(self, step: str, title: str) -> None:
        self.steps[step] = StepLine(title)
        self.refresh(layout=True)

    def finished(self, step: str, *, failed: bool, detail: str) -> None:
        line = self.steps.setdefault(step, StepLine(step))
        line.state = "failed" if failed else "done"
        line.detail = detail
        self.refresh(layout=True)

    def fail_running(self, error: str) -> None:
        """The run ended with an error: whatever was still running did not finish."""
        for line in self.steps.values():
            if line.state == "running":
                line.state, line.detail = "failed", error
        self.refresh(layout=True)

    def render(self) -> RenderableType:
        if not self.steps:
            return Text("Starting…", style="dim")
        # Each title whole, wrapped under its mark (a cut title hid the image's name and the
        # tmpfs size at 80 columns); the box scrolls, and follows the newest step.
        width = max(8, self.content_region.width)
        lines = []
        for line in self.steps.values():
            mark, style = STATE_MARKS[line.state]
            wrapped = textwrap.wrap(line.title, width - 2, break_on_hyphens=False) or [""]
            row = Text(f"{mark} ", style=style)
            row.append("\n  ".join(wrapped), style="bold" if line.state == "running" else "")
            lines.append(row)
        return Text("\n").join(lines)

    def on_resize(self) -> None:
        self.refresh(layout=True)  # the wrap depends on the width


def register_value(value: int) -> str:
    """Addresses in hex; values with the top bit set as the negative numbers they are
    (rax holds -ENOSYS, -38, at a syscall entry on x86_64)."""
    if value >= 1 << 63:
        return str(value - (1 << 64))
    return f"{value:#x}"


def changed_registers(injection: Injection) -> list[tuple[str, int, int]]:
    """The registers the injection changed, in the order the engine reported them."""
    after = injection.registers_after
    return [
        (name, before, after[name])
        for name, before in injection.registers_before.items()
        if name in after and after[name] != before
    ]


class TeachingPanel(Widget):
    """What is happening right now, in words; then what the injection did to PID 1."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.lesson = "Nothing has happened yet: the engine is starting."
        # What each engine step is explained by (an install has its own).
        self.lessons = STEP_LESSONS
        self.pid1: dict[str, str] = {}
        self.injection: Injection | None = None

    def step(self, step: str, title: str) -> None:
        self.lesson = self.lessons.get(step, title)
        self.refresh(layout=True)

    def identity(self, key: str, value: str) -> None:
        """A fact about the target PID 1 (pid, exe) from the preflight."""
        self.pid1[key] = value
        self.refresh(layout=True)

    def injected(self, injection: Injection) -> None:
        self.injection = injection
        self.refresh(layout=True)

    def render(self) -> RenderableType:
        text = Text(self.lesson)
        if self.pid1:
            facts = ", ".join(f"{key} {value}" for key, value in self.pid1.items())
            text.append(f"\nTarget PID 1: {facts}", style="cyan")
        injection = self.injection
        if injection is not None:
            text.append(
                f"\nStopped in {injection.interrupted_syscall}() (host pid {injection.pid}, "
                f"{injection.arch}); execve took its place in {injection.elapsed_ms:.1f} ms:",
                style="bold",
            )
            for name, before, after in changed_registers(injection):
                text.append(f"\n  {name:<9}", style="dim")
                text.append(register_value(before), style="yellow")
                text.append(" → ", style="dim")
                text.append(register_value(after), style="green")
        return text
