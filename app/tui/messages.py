"""Typed messages that workers post to screens: the UI thread never waits on the engine."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.message import Message

from app.tui.backend import InitSuggestion
from injector.events import Event, Notice, Progress

if TYPE_CHECKING:
    from injector.image.sources import ImageDetails, ImageSummary
    from injector.install.install import InstallFacts
    from injector.preflight.preflight import Report


class ImagesLoaded(Message):
    def __init__(self, images: list[ImageSummary]) -> None:
        super().__init__()
        self.images = images


class EngineDown(Message):
    """Listing failed: the engine is down or an engine module is missing."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DetailsLoaded(Message):
    def __init__(self, ref: str, details: ImageDetails | None, error: str | None) -> None:
        super().__init__()
        self.ref = ref
        self.details = details
        self.error = error


class FileOpened(Message):
    """The Open file dialog's answer: the reference for a path, or why it cannot be opened."""

    def __init__(self, ref: str | None, error: str | None) -> None:
        super().__init__()
        self.ref = ref
        self.error = error


class ImageReading(Message):
    """How far reading the image's archive has got (bytes), while it is indexed."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress


class InitSuggested(Message):
    def __init__(self, suggestion: InitSuggestion | None, error: str | None) -> None:
        super().__init__()
        self.suggestion = suggestion
        self.error = error


class InitChecked(Message):
    def __init__(self, argv: list[str], error: str | None) -> None:
        super().__init__()
        self.argv = argv
        self.error = error


class ReportReady(Message):
    def __init__(
        self, report: Report, rehearsal_blockers: list[Notice], switch_blockers: list[Notice]
    ) -> None:
        super().__init__()
        self.report = report
        self.rehearsal_blockers = rehearsal_blockers
        self.switch_blockers = switch_blockers


class ReportFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class EngineEvent(Message):
    """One event of ``injector.switch.run``, relayed from the run's worker thread."""

    def __init__(self, event: Event) -> None:
        super().__init__()
        self.event = event


class LastWords(Message):
    """Said by the engine just before the point of no return of a real switch."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class RunEnded(Message):
    """The run's iterator is exhausted (error is None) or raised (error is its one line)."""

    def __init__(self, error: str | None) -> None:
        super().__init__()
        self.error = error


class InstallFactsRead(Message):
    """What an install would find on this machine (``Backend.install_facts``), or why it
    could not be read."""

    def __init__(self, facts: InstallFacts | None, error: str | None) -> None:
        super().__init__()
        self.facts = facts
        self.error = error
