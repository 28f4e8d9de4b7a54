"""The check pipeline: the one way from an image to a verdict, for every front-end.

Open the image, read its file index (once: the source caches it), check the init against
it, gather the preflight report. ``dboot check`` runs :func:`check`; the wizard runs it on
the source it keeps open while the user browses, and hands that source to the switch, so
the image is read once per wizard run; ``injector.switch`` runs the same two halves
(:func:`read_image`, then :func:`gather`) as the steps "source" and "preflight", with a
sandbox made in between for a rehearsal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator

from injector.events import Event, Fact, Progress
from injector.image.imageindex import ImageIndex
from injector.image.sources import ImageDetails, ImageSource, scan_events
from injector.inject.nsenter import Streamed
from injector.preflight import preflight
from injector.stop import step as stopping
from injector.stop.plan import DEFAULT_STOP_MODE, StopMode

# Told (bytes read, bytes in all) while an archive is read.
ReadProgress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class ImageRead:
    """What reading an image gave: its details and its file index."""

    details: ImageDetails
    index: ImageIndex


@dataclasses.dataclass(frozen=True)
class CheckResult:
    """The whole check: the source it read (still open), what was read, and the report."""

    source: ImageSource
    details: ImageDetails
    index: ImageIndex
    report: preflight.Report


def read_image(
    source: ImageSource, init_argv: list[str], step: str = "source"
) -> Generator[Event, None, ImageRead]:
    """The image's facts and its file index, as events (``Progress`` while an archive is
    read); an ``init_argv`` given is checked against the index (``BadInput`` if it is not
    an executable inside the image)."""
    if init_argv:
        preflight.check_init_argv(init_argv)  # before the image is read, not after
    details = source.details()
    yield Fact("image", "id", details.id)
    yield Fact("image", "tags", details.tags)
    yield Fact("image", "architecture", details.architecture)
    index = yield from scan_events(source, step)
    yield Fact("image", "files", index.file_count)
    yield Fact("image", "estimated_bytes", index.estimated_bytes)
    if init_argv:
        preflight.validate_init(index, init_argv)
    return ImageRead(details, index)


def gather(
    source: ImageSource,
    index: ImageIndex,
    init_argv: list[str],
    *,
    target_pid: int = 1,
    tmpfs_size: int | None = None,
    modules: bool = True,
    mem_available: int | None = None,
    stop_mode: StopMode | None = DEFAULT_STOP_MODE,
    stop_timeout: float | None = None,
    stop_kinds: list[str] | None = None,
) -> preflight.Report:
    """The preflight report for running ``init_argv`` from this image in ``target_pid``'s
    place. The source is passed on: whether the init can run here is read from its files.
    The report's stop plan is the host's init's for this machine's PID 1, the stand-in's for
    a rehearsal's sandbox (``stop_kinds``: its services), none for another namespace's;
    ``stop_mode`` None: no stop plan at all (a run that stops nothing before an injection)."""
    report = preflight.gather(
        index,
        init_argv,
        target_pid=target_pid,
        tmpfs_size=tmpfs_size,
        source=source,
        modules=modules,
        mem_available=mem_available,
    )
    if stop_mode is None:
        return report
    if stop_kinds is not None:
        plan = stopping.standin_plan(stop_kinds, stop_mode, stop_timeout)
    elif target_pid == 1:
        plan = stopping.host_plan(stop_mode, stop_timeout)
    else:
        plan = stopping.target_plan(stop_mode, stop_timeout)
    preflight.set_stop_plan(report, plan)
    return report


def read(source: ImageSource, init_argv: list[str], progress: ReadProgress | None) -> ImageRead:
    """:func:`read_image` without the events: ``progress`` hears how far reading got."""
    reading = Streamed(read_image(source, init_argv))
    for event in reading:
        if isinstance(event, Progress) and progress is not None:
            progress(event.done, event.total)
    return reading.value


def check(
    source: ImageSource,
    init_argv: list[str],
    *,
    progress: ReadProgress | None = None,
    target_pid: int = 1,
    tmpfs_size: int | None = None,
    modules: bool = True,
    mem_available: int | None = None,
    stop_mode: StopMode = DEFAULT_STOP_MODE,
    stop_timeout: float | None = None,
) -> CheckResult:
    """The whole pipeline on an opened source (the caller closes it): read, check the
    init, gather. An empty ``init_argv`` gathers the report without an init check."""
    image = read(source, init_argv, progress)
    report = gather(
        source,
        image.index,
        init_argv,
        target_pid=target_pid,
        tmpfs_size=tmpfs_size,
        modules=modules,
        mem_available=mem_available,
        stop_mode=stop_mode,
        stop_timeout=stop_timeout,
    )
    return CheckResult(source, image.details, image.index, report)
