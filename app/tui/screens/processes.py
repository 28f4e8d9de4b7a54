"""Step 4: every process a real switch kills, grouped by service, yours highlighted."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.widgets import Button, DataTable, Static

from app.format import human_bytes, plural
from app.tui.screens.base import StepScreen
from injector.stop.plan import groups_in_stop_order
from injector.units import duration_text

if TYPE_CHECKING:
    from injector.preflight.preflight import ProcessInfo, Report
    from injector.stop.plan import StopPlan

COMMAND_WIDTH = 30


def service_name(service: str) -> str:
    # The engine says "-" for processes outside any systemd unit.
    return "(no systemd unit)" if service == "-" else service


def note_for(process: ProcessInfo) -> Text:
    text = Text()
    if process.session_chain:
        text.append("◀ you ", style="bold yellow")
    if process.writing:
        text.append(f"✎ writes {len(process.writing)}", style="bold red")
    return text


class ProcessesScreen(StepScreen):
    STEP = 3

    def body(self) -> ComposeResult:
        yield Static("", id="processes-summary")
        yield Static("", id="processes-warning")
        yield DataTable(id="processes", cursor_type="row")

    def on_mount(self) -> None:
        report = self.wizard.choices.report
        assert report is not None, "the Resources step produced the report"
        self.show_summary(report)
        self.unblock("Enter: the options, then one more question")
        table = self.query_one("#processes", DataTable)
        if not report.processes:
            # An empty table would still take the focus and swallow Enter without a row to
            # select: no table at all, and Next has the focus, so that Enter goes on.
            table.remove()
            self.query_one("#nav-next", Button).focus()
            return
        self.fill(report)
        table.focus()

    def show_summary(self, report: Report) -> None:
        services = {p.service for p in report.processes}
        rss = sum(p.rss_bytes for p in report.processes)
        writers = sum(1 for p in report.processes if p.writing)
        text = Text()
        if report.processes:
            text.append(plural(len(report.processes), "process", "processes"), style="bold")
            text.append(f" in {plural(len(services), 'service')}, {human_bytes(rss)} resident; ")
            text.append(f"{writers} hold files open for writing", style="red" if writers else "")
            text.append(".\n")
        else:
            text.append("No process to stop: PID 1 is alone in its PID namespace.\n", style="bold")
        if not report.processes:
            pass
        elif self.wizard.rehearse_only:
            text.append(
                "A rehearsal leaves them all running: it replaces a sandbox's PID 1 instead.",
                style="dim",
            )
        else:
            text.append("A real switch kills all of them; a rehearsal none.", style="dim")
        if report.stop is not None and report.processes:
            text.append("\n" + stop_summary(report.stop), style="dim")
        self.query_one("#processes-summary", Static).update(text)
        session = report.session
        warning = self.query_one("#processes-warning", Static)
        if session.remote and not session.image_has_ssh:
            warning.update(
                Text(
                    f"! You are connected remotely ({session.via}) and the image has no SSH "
                    "server: after a real switch you lose this connection for good.",
                    style="bold yellow",
                )
            )
        else:
            warning.display = False

    def fill(self, report: Report) -> None:
        table: DataTable[str | Text] = self.query_one("#processes", DataTable)
        table.add_column("PID", key="pid")
        table.add_column("User", key="user")
        table.add_column("RSS", key="rss")
        table.add_column("Command", key="command", width=COMMAND_WIDTH)
        table.add_column("", key="note")
        # The engine groups (by systemd unit, unit-less processes last); we only draw.
        grouped = self.wizard.backend.processes_by_service(report.processes)
        # The graceful stop's order: what the init stops first, then what it keeps, the rest.
        for service, processes, fate in groups_in_stop_order(grouped, report.stop):
            rss = sum(p.rss_bytes for p in processes)
            table.add_row(
                Text("▾", style="bold"),
                "",
                Text(human_bytes(rss), style="bold", justify="right"),
                Text(f"{service_name(service)} ({len(processes)})", style="bold cyan"),
                Text(fate, style="green" if fate.startswith("stop") else "dim"),
                key=f"service:{service}",
            )
            for process in processes:
                style = "yellow" if process.session_chain else "red" if process.writing else ""
                table.add_row(
                    Text(str(process.pid), style=style, justify="right"),
                    Text(process.user, style=style),
                    Text(human_bytes(process.rss_bytes), justify="right"),
                    Text(_clip(process.command, COMMAND_WIDTH), style=style),
                    note_for(process),
                    key=f"pid:{process.pid}",
                )

    @on(DataTable.RowSelected, "#processes")
    def selected(self, event: DataTable.RowSelected) -> None:
        self.action_next()


def stop_summary(plan: StopPlan) -> str:
    """The graceful stop in one line, above the table its order sorts."""
    if plan.stops:
        return (
            f"Graceful stop first: {plan.manager} stops {plural(len(plan.units), 'unit')} in"
            f" {plural(plan.steps, 'step')} (worst case {duration_text(plan.worst_case)},"
            f" ceiling {duration_text(plan.ceiling)}); the rest gets the signals."
        )
    if plan.mode == "signal" and plan.units:
        return "--stop=signal: no graceful stop, every process gets SIGTERM, then SIGKILL."
    return plan.note or "Nothing for the init to stop: every process gets the signals."


def _clip(command: str, width: int) -> str:
    return command if len(command) <= width else command[: width - 1] + "…"
