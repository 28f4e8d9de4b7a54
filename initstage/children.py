"""Work that may hang in the kernel, done in child processes under a deadline.

``sync`` on a hard NFS mount whose server is gone, a stalled FUSE daemon or a suspended
device-mapper device never returns, and neither does a read-only remount of one (it
flushes first). PID 1 must not be the process that waits: each job runs in a child of
its own, the stage waits for all of them until the deadline, names those that did not
finish and goes on. A hung child is left behind (the kill step ends it if it can).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

# A job returns a line for the log ("" for nothing) or raises; an OSError's message
# (and any other exception's) travels back through a pipe.
Job = Callable[[], str]
MAX_MESSAGE = 4096
FIRST_POLL = 0.001
MAX_POLL = 0.050
MAX_EXTENSIONS = 6


@dataclass
class JobResult:
    label: str
    pid: int
    finished: bool = False
    ok: bool = False
    message: str = ""


@dataclass
class Outcome:
    results: list[JobResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def unfinished(self) -> list[JobResult]:
        return [result for result in self.results if not result.finished]

    @property
    def failed(self) -> list[JobResult]:
        return [result for result in self.results if result.finished and not result.ok]


def _run_child(job: Job, write_fd: int) -> None:
    """In the child: run the job, report, and leave through os._exit whatever happens,
    so that the child never returns into the stage's own code."""
    status = 1
    try:
        try:
            message, status = job(), 0
        except BaseException as error:  # anything at all: report it, never re-raise
            message = (
                f"{type(error).__name__}: {error}"
                if not isinstance(error, OSError)
                else (str(error))
            )
        with contextlib.suppress(BaseException):
            os.write(write_fd, message.encode("utf-8", "replace")[:MAX_MESSAGE])
    finally:
        os._exit(status)


def run_jobs(
    jobs: list[tuple[str, Job]],
    timeout: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    progress: Callable[[list[JobResult]], bool] | None = None,
) -> Outcome:
    """Run every job in its own child at once; wait until all end or ``timeout`` passes.

    ``progress``, given the unfinished jobs once a second (or twice per timeout), returns
    True while their work visibly moves (their devices complete writes): the deadline then
    starts again, up to ``MAX_EXTENSIONS`` times the timeout in all, so that a slow but healthy
    flush is not cut short; a stalled one gets exactly ``timeout``.
    """
    start = clock()
    outcome = Outcome()
    pipes: dict[int, int] = {}
    for label, job in jobs:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _run_child(job, write_fd)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        outcome.results.append(JobResult(label, pid))
        pipes[pid] = read_fd
    deadline = start + timeout
    check_every = min(1.0, timeout / 2)
    next_progress_check = start + check_every
    interval = FIRST_POLL
    try:
        while True:
            for result in outcome.results:
                if not result.finished:
                    _collect(result, pipes[result.pid])
            if not outcome.unfinished:
                break
            now = clock()
            if progress is not None and now >= next_progress_check:
                next_progress_check = now + check_every
                if progress(outcome.unfinished):
                    deadline = min(max(deadline, now + timeout), start + MAX_EXTENSIONS * timeout)
            if now >= deadline:
                break
            sleep(min(interval, max(0.0, deadline - now)))
            interval = min(interval * 2, MAX_POLL)
    finally:
        for fd in pipes.values():
            with contextlib.suppress(OSError):
                os.close(fd)
    for result in outcome.unfinished:
        # It may be killable (a sync waiting interruptibly): end it, reap it if it went.
        with contextlib.suppress(OSError):
            os.kill(result.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(result.pid, os.WNOHANG)
    outcome.seconds = clock() - start
    return outcome


def _collect(result: JobResult, read_fd: int) -> None:
    try:
        pid, status = os.waitpid(result.pid, os.WNOHANG)
    except ChildProcessError:  # reaped by someone else: it is over, its message may be lost
        pid, status = result.pid, 1 << 8
    if pid == 0:
        return
    result.finished = True
    result.ok = os.waitstatus_to_exitcode(status) == 0
    with contextlib.suppress(OSError):
        result.message = os.read(read_fd, MAX_MESSAGE).decode("utf-8", "replace")
