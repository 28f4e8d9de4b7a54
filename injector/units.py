"""Sizes as people read them, for the engine's own notice texts and both front-ends."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'. Binary units: RAM and tmpfs sizes are page-based, not decimal."""
    value = float(count)
    for unit in _UNITS[:-1]:
        if abs(value) < 1024:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_UNITS[-1]}"


def duration_text(seconds: float | None) -> str:
    """90 -> '90 s', 270 -> '4 min 30 s', 0.5 -> '0.5 s', None -> 'no limit': a stop
    timeout as a unit file would be read back by a person."""
    if seconds is None:
        return "no limit"
    if seconds < 10:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    whole = round(seconds)
    if whole < 120:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min {rest} s" if rest else f"{minutes} min"
