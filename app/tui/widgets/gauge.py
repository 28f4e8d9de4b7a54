"""A RAM gauge: how much of MemAvailable the new root's tmpfs will take, and what remains."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import RenderableType
from rich.text import Text
from textual.widget import Widget

from app.format import human_bytes

if TYPE_CHECKING:
    from injector.preflight.preflight import RamFacts


class RamGauge(Widget):
    """A bar plus four numbers. Red when the tmpfs does not fit into available RAM."""

    DEFAULT_CSS = "RamGauge { height: 6; }"

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._ram: RamFacts | None = None

    def show(self, ram: RamFacts) -> None:
        self._ram = ram
        self.refresh()

    def render(self) -> RenderableType:
        ram = self._ram
        if ram is None:
            return Text("Estimating the image's size in RAM…", style="dim")
        fits = ram.tmpfs_size <= ram.available_bytes
        share = ram.tmpfs_size / ram.available_bytes if ram.available_bytes > 0 else 1.0
        width = max(10, self.size.width - 14)
        filled = min(width, max(1, round(share * width)))
        colour = "red" if not fits else "yellow" if share > 0.5 else "green"
        text = Text("RAM ")
        text.append("█" * filled, style=colour)
        text.append("░" * (width - filled), style="dim")
        text.append(f" {min(share, 9.99):>6.1%}\n", style=f"bold {colour}")
        rows = (
            ("image in RAM (estimate)", human_bytes(ram.estimated_bytes)),
            ("tmpfs size (+ headroom)", human_bytes(ram.tmpfs_size)),
            (
                "available now",
                f"{human_bytes(ram.available_bytes)} of {human_bytes(ram.total_bytes)}",
            ),
            ("remains for the new system", human_bytes(ram.remaining_bytes)),
        )
        for label, value in rows:
            text.append(f"  {label:<28}", style="dim")
            short = label.startswith("remains") and not fits
            text.append(f"{value}\n", style="bold red" if short else "")
        text.rstrip()
        return text
