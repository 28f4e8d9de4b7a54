"""Step 3: does it fit? RAM estimate against what is available, swap, and the verdicts."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Label, Static

from app.format import human_bytes
from app.tui.messages import ReportFailed, ReportReady
from app.tui.screens.base import StepScreen
from app.tui.widgets.gauge import RamGauge
from injector.errors import DbootError
from injector.events import Notice

if TYPE_CHECKING:
    from injector.preflight.preflight import Report, SwapDevice

LEVEL_MARKS = {"blocker": ("✗", "bold red"), "warning": ("!", "yellow"), "info": ("i", "blue")}


def notice_text(notice: Notice, *, ignored_reason: str = "") -> Text:
    """'✗ ram: the image does not fit…  → fix' — one notice, its fix on the next line."""
    mark, style = LEVEL_MARKS.get(notice.level, ("?", ""))
    text = Text(f"{mark} ", style=style)
    text.append(notice.message, style=style if notice.level == "blocker" else "")
    if ignored_reason:
        text.append(f" ({ignored_reason})", style="dim")
    if notice.fix:
        text.append(f"\n  → {notice.fix}", style="dim")
    return text


def swap_line(device: SwapDevice, *, rehearse_only: bool) -> Text:
    text = Text(f"{device.path:<14} {device.kind:<5} ")
    text.append(f"{human_bytes(device.used_bytes)} used of {human_bytes(device.size_bytes)}  ")
    if rehearse_only:
        text.append("a rehearsal leaves it on", style="dim")
    elif device.must_go_off:
        text.append("goes off before the switch", style="yellow")
    else:
        text.append("stays (RAM-backed)", style="green")
    return text


class ResourcesScreen(StepScreen):
    STEP = 2

    def body(self) -> ComposeResult:
        with VerticalScroll(id="resources-body"):
            yield Label("", id="resources-what")
            with Vertical(id="ram-box", classes="section"):
                yield RamGauge(id="ram-gauge")
            with Vertical(id="swap-box", classes="section"):
                yield Static("", id="swap")
            with Vertical(id="notices-box", classes="section"):
                yield Static("", id="notices")

    def on_mount(self) -> None:
        choices = self.wizard.choices
        what = Text("Image ", style="dim")
        what.append(choices.image or "?", style="bold")
        what.append("   init ", style="dim")
        what.append(" ".join(choices.init_argv), style="bold")
        self.query_one("#resources-what", Label).update(what)
        self.query_one("#ram-box").border_title = "RAM"
        self.query_one("#swap-box").border_title = "Swap"
        self.query_one("#notices-box").border_title = "Verdicts"
        self.block("running the preflight…")
        self.preflight(choices.image or "", list(choices.init_argv))

    @work(thread=True, exclusive=True, group="preflight")
    def preflight(self, ref: str, init_argv: list[str]) -> None:
        backend = self.wizard.backend
        try:
            report = backend.check(ref, init_argv)
            for_rehearsal = backend.blockers(report, rehearse=True)
            for_switch = backend.blockers(report, rehearse=False)
        except DbootError as error:
            self.post_message(ReportFailed(str(error)))
            return
        self.post_message(ReportReady(report, for_rehearsal, for_switch))

    def on_report_failed(self, message: ReportFailed) -> None:
        self.query_one("#notices", Static).update(Text(message.error, style="bold red"))
        self.block("the preflight failed (see Verdicts)")

    def on_report_ready(self, message: ReportReady) -> None:
        choices = self.wizard.choices
        choices.report = message.report
        choices.rehearsal_blockers = message.rehearsal_blockers
        choices.switch_blockers = message.switch_blockers
        # An install's facts were judged for the report before (its image, its size).
        choices.install_facts = None
        self.show_report(message.report)

    def show_report(self, report: Report) -> None:
        choices = self.wizard.choices
        self.query_one(RamGauge).show(report.ram)
        self.query_one("#swap", Static).update(self._swap_text(report))
        notices = Text()
        for notice in report.notices:
            ignored = ""
            if notice.level == "blocker" and notice not in choices.rehearsal_blockers:
                ignored = "a rehearsal goes ahead"
            notices.append_text(notice_text(notice, ignored_reason=ignored))
            notices.append("\n")
        notices.rstrip()
        if not report.notices:
            notices = Text("✓ nothing blocks, nothing to warn about", style="green")
        self.query_one("#notices", Static).update(notices)
        if choices.rehearsal_blockers:
            first = choices.rehearsal_blockers[0]
            more = len(choices.rehearsal_blockers) - 1
            self.block(f"blocked: {first.message}" + (f" (+{more} more)" if more else ""))
        else:
            warnings = sum(1 for n in report.notices if n.level == "warning")
            self.unblock(f"Enter: see the processes ({warnings} warnings)")

    def _swap_text(self, report: Report) -> Text:
        if not report.swap:
            return Text("no swap in use", style="dim")
        text = Text()
        for device in report.swap:
            text.append_text(swap_line(device, rehearse_only=self.wizard.rehearse_only))
            text.append("\n")
        text.rstrip()
        return text
