"""Pure text helpers for both front-ends (dboot and the wizard): sizes, ids, dates,
durations. No Textual; sizes are the engine's own rule (its notices print them too)."""

from __future__ import annotations

from datetime import UTC, datetime

from injector.units import human_bytes

__all__ = ["human_bytes", "human_seconds", "image_label", "plural", "short_created", "short_id"]


def short_id(image_id: str) -> str:
    """'sha256:c091039dab46...' -> 'c091039dab46', as `docker images` shows it."""
    return image_id.removeprefix("sha256:")[:12]


def short_created(created: str) -> str:
    """ISO 8601 (any offset) -> 'YYYY-MM-DD HH:MM' in UTC; unparsable text is shown as is."""
    try:
        moment = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return created
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M")


def human_seconds(seconds: float) -> str:
    """42 -> '42 s', 125 -> '2 min 5 s'."""
    whole = max(0, round(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min {rest} s"


def plural(count: int, noun: str, many: str | None = None) -> str:
    """plural(1, "layer") -> '1 layer', plural(3, "layer") -> '3 layers'."""
    return f"{count} {noun}" if count == 1 else f"{count} {many or noun + 's'}"


def image_label(repository: str, tag: str, image_id: str) -> str:
    """The reference a user would type: 'repo:tag', or the short id for an untagged image."""
    if repository == "<none>" or tag == "<none>":
        return short_id(image_id)
    return f"{repository}:{tag}"
