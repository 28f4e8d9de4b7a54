"""Run a function inside another process's mount namespace, e.g. to prepare the RAM root.

The target must see the tmpfs and the plan, so they are made in *its* mount namespace: a
rehearsal sandbox has its own, and so does a host where dboot runs in a different one than
PID 1 (a service with PrivateTmp, say).

``setns(CLONE_NEWNS)`` refuses a process with more than one thread (the TUI has several),
and it cannot be undone; so the function runs in a forked child that enters the namespace,
posts picklable events back through a pipe, and ends with its result or its exception
(re-raised here with its type, message and ``exit_code``; its traceback becomes a note).
When the target already shares our mount namespace the function simply runs here.

``/proc`` inside the target's mount namespace belongs to the target's PID namespace, where
a stranger's ``/proc/self`` does not exist. So when the PID namespaces differ too, the child
also joins the target's and forks once more: the worker is then a process of the target's
namespaces, and ``/proc/self/mountinfo`` there is the target's mount table seen from inside.

The worker's root and working directory become the namespace's root: use absolute paths.
Forking a process that has threads is safe here only because the worker touches nothing
the other threads may hold locked; keep ``fn`` self-contained (no shared locks, no UI).

Cancelling (Ctrl-C, or closing the generator) sends the worker SIGTERM, which raises
KeyboardInterrupt inside ``fn`` so its ``with`` blocks undo what they did; after
``cancel_timeout`` seconds it is killed. The worker ignores the terminal's SIGINT so that
this one controlled path is the only one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, Generic, TypeVar

from initstage import linux
from injector.errors import EnvironmentFailure, add_note, system_call_failure, traceback_text

T = TypeVar("T")
Send = Callable[[Any], None]

HEADER = struct.Struct("!Q")  # length of the pickle that follows
CANCEL_TIMEOUT = 10.0


def shares_mount_namespace(pid: int) -> bool:
    """Whether ``pid`` lives in our mount namespace (then nothing needs entering)."""
    try:
        theirs = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError as error:
        raise EnvironmentFailure(
            f"cannot see the mount namespace of pid {pid}: {error.strerror}",
            "check that the target process exists and that we run as root",
        ) from error
    return theirs == os.readlink("/proc/self/ns/mnt")


def run_in_mount_namespace(pid: int, fn: Callable[[Send], T], on_event: Send | None = None) -> T:
    """``fn(send)`` inside ``pid``'s mount namespace; each ``send(event)`` reaches
    ``on_event`` here as it happens. Returns ``fn``'s result or raises its exception."""
    post = on_event if on_event is not None else _discard
    if shares_mount_namespace(pid):
        return fn(post)
    events = _forked(pid, fn)
    while True:
        try:
            event = next(events)
        except StopIteration as finished:
            result: T = finished.value
            return result
        post(event)


class Streamed(Generic[T]):
    """The events of ``fn`` as an iterable, then its result in ``value``.

    ``result = yield from streamed`` works too. Stopping early (closing the iteration, an
    exception in the consumer) cancels ``fn``."""

    def __init__(self, events: Generator[Any, None, T]) -> None:
        self._events = events
        self._finished = False
        self._value: T | None = None

    def __iter__(self) -> Generator[Any, None, T]:
        value = yield from self._events
        self._value, self._finished = value, True
        return value

    @property
    def value(self) -> T:
        if not self._finished:
            raise RuntimeError("Streamed.value read before all the events were consumed")
        return self._value  # type: ignore[return-value]

    def close(self) -> None:
        self._events.close()


def stream_in_mount_namespace(pid: int, fn: Callable[[Send], T]) -> Streamed[T]:
    """Like :func:`run_in_mount_namespace`, as a stream: iterate the result to get the events
    live, then read ``.value``. Nothing runs until the iteration starts.

    When the target shares our mount namespace ``fn`` runs in a thread of ours instead of a
    child; a cancel then takes effect at its next ``send``, which raises KeyboardInterrupt
    inside it."""
    if shares_mount_namespace(pid):
        return Streamed(_threaded(fn))
    return Streamed(_forked(pid, fn))


def _discard(event: Any) -> None:
    """The default ``on_event``: events nobody listens to."""


def _threaded(fn: Callable[[Send], T]) -> Generator[Any, None, T]:
    outcomes: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
    cancelled = threading.Event()

    def send(event: Any) -> None:
        if cancelled.is_set():
            raise KeyboardInterrupt("cancelled by dboot")
        outcomes.put(("event", event))

    def body() -> None:
        try:
            outcomes.put(("result", fn(send)))
        except BaseException as error:
            outcomes.put(("error", error))

    worker = threading.Thread(target=body, name="dboot-nsenter", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            kind, payload = outcomes.get()
            if kind == "event":
                yield payload
                continue
            finished = True
            if kind == "error":
                raise payload
            result: T = payload
            return result
    finally:
        if not finished:
            cancelled.set()
        worker.join()


# -- the parent's side ---------------------------------------------------------------------


def _forked(pid: int, fn: Callable[[Send], T]) -> Generator[Any, None, T]:
    # Take both namespaces before forking: the target may die, and after setns /proc/PID no
    # longer means the same process.
    try:
        mount_ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise EnvironmentFailure(
            f"cannot open the mount namespace of pid {pid}: {error.strerror}",
            "check that the target process exists and that we run as root",
        ) from error
    pid_ns = None
    if os.readlink(f"/proc/{pid}/ns/pid") != os.readlink("/proc/self/ns/pid"):
        pid_ns = os.open(f"/proc/{pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    read_end, write_end = os.pipe()
    try:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child, which always _exits
            os.close(read_end)
            _child(pid, mount_ns, pid_ns, write_end, fn)
    finally:
        os.close(mount_ns)
        if pid_ns is not None:
            os.close(pid_ns)
        os.close(write_end)
    finished = False
    try:
        with os.fdopen(read_end, "rb") as channel:
            while (frame := _read_frame(channel)) is not None:
                kind, payload = frame
                if kind == "event":
                    yield payload
                elif kind == "result":
                    finished = True
                    result: T = payload
                    return result
                else:
                    finished = True
                    raise _rebuild(pid, payload)
        raise EnvironmentFailure(
            f"the helper in the mount namespace of pid {pid} died without an answer "
            f"({_describe(_reap(child, None))})",
            "see the messages above; this is a bug if there are none",
        )
    finally:
        if not finished:
            _cancel(child)
        _reap(child, None)


def _read_frame(channel: Any) -> tuple[str, Any] | None:
    header = channel.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (length,) = HEADER.unpack(header)
    body = channel.read(length)
    if len(body) < length:
        return None
    frame: tuple[str, Any] = pickle.loads(body)
    return frame


def _rebuild(pid: int, payload: tuple[bytes | None, str, str]) -> BaseException:
    pickled, summary, child_traceback = payload
    error: BaseException | None = None
    if pickled is not None:
        # A class the child could pickle may still not load here (defined in a function).
        with contextlib.suppress(Exception):
            error = pickle.loads(pickled)
    if not isinstance(error, BaseException):
        error = EnvironmentFailure(
            f"{summary} (in the mount namespace of pid {pid})", "see the traceback above"
        )
    add_note(error, f"raised in the mount namespace of pid {pid}:\n{child_traceback.rstrip()}")
    return error


def _cancel(child: int) -> None:
    """Ask the child to stop (its ``with`` blocks run), then insist."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(child, signal.SIGTERM)
    if _reap(child, CANCEL_TIMEOUT) is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


def _reap(child: int, timeout: float | None) -> int | None:
    """Reap our own child; its wait status, or None if it still runs after ``timeout``."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            reaped, status = os.waitpid(child, 0 if deadline is None else os.WNOHANG)
        except ChildProcessError:
            return 0  # reaped before
        if reaped:
            return status
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def _describe(status: int | None) -> str:
    if status is None:
        return "still running"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


# -- the child's side ----------------------------------------------------------------------


def _child(
    pid: int, mount_ns: int, pid_ns: int | None, channel: int, fn: Callable[[Send], Any]
) -> None:
    """Enter the namespaces, run ``fn`` in the worker, and _exit: never returns."""
    status = 1
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if pid_ns is None:
            _setns(mount_ns, linux.CLONE_NEWNS, pid)
            status = _work(channel, fn)
        else:
            # setns(CLONE_NEWPID) places our next child, not us: fork the worker. SIGTERM
            # stays blocked across the fork so that a cancel arriving meanwhile is not lost:
            # we forward it, the worker handles it.
            _setns(pid_ns, linux.CLONE_NEWPID, pid)
            _setns(mount_ns, linux.CLONE_NEWNS, pid)
            signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
            worker = os.fork()
            if worker == 0:
                linux.die_with_parent()
                os._exit(_work(channel, fn))
            os.close(channel)
            signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(worker, signal.SIGTERM))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
            status = os.waitstatus_to_exitcode(os.waitpid(worker, 0)[1])
    except BaseException as error:
        # Failed before the worker ran fn (setns refused...): report it like fn's own error.
        with contextlib.suppress(BaseException):
            _post_error(channel, error)
    finally:
        # _exit skips Python's own clean-up (the parent's atexit handlers must not run
        # twice), so flush what fn may have printed by hand.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(status if status >= 0 else 1)


def _work(channel: int, fn: Callable[[Send], Any]) -> int:
    """The worker: run ``fn`` and post its events and its outcome. Returns an exit status."""

    def on_sigterm(signum: int, frame: object) -> None:
        # Once only: a second SIGTERM must not cut short the clean-up the first one started.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt("cancelled by dboot")

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, on_sigterm)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])

    def send(event: Any) -> None:
        _post(channel, ("event", event))

    try:
        result = fn(send)
        _post(channel, ("result", result))
        return 0
    except BaseException as error:
        _post_error(channel, error)
        return 1


def _post(channel: int, frame: tuple[str, Any]) -> None:
    body = pickle.dumps(frame)
    data = HEADER.pack(len(body)) + body
    while data:
        data = data[os.write(channel, data) :]


def _post_error(channel: int, error: BaseException) -> None:
    summary = f"{type(error).__name__}: {error}"
    text = traceback_text(error)
    try:
        pickled: bytes | None = pickle.dumps(error)
    except Exception:
        pickled = None
    _post(channel, ("error", (pickled, summary, text)))


def _setns(fd: int, nstype: int, pid: int) -> None:
    kind = "mount" if nstype == linux.CLONE_NEWNS else "PID"
    with system_call_failure(
        f"cannot enter the {kind} namespace of pid {pid}", "run as root (sudo)"
    ):
        linux.setns(fd, nstype)


# -- state directories, for code running inside a namespace ---------------------------------

STATE_TMPFS_SOURCE = "dboot-state"


def mount_private_state_dir(state_dir: Path) -> None:
    """Mount a small tmpfs (mode 0700) over ``state_dir``, creating the directory if needed.

    For a rehearsal: called inside the sandbox's mount namespace, it keeps the RAM root and
    the plan out of the host's view, and they vanish with the namespace. Only the empty
    mount point stays on the host's filesystem when it had to be created."""
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    linux.mount(
        STATE_TMPFS_SOURCE,
        str(state_dir),
        "tmpfs",
        linux.MS_NOSUID | linux.MS_NODEV,
        "mode=0700,size=16m",
    )


def undo_state_dir(
    state_dir: Path, root_name: str = "root", plan_name: str = "plan.json"
) -> list[str]:
    """Take a prepared state dir apart again: detach the RAM root, remove the plan and the
    empty mount point. Idempotent: whatever is already gone is skipped. Returns one line per
    item saying what was done to it, for the log."""
    root, plan = state_dir / root_name, state_dir / plan_name
    done = []
    if root.is_dir() and os.path.ismount(root):
        linux.umount2(str(root), linux.MNT_DETACH)
        done.append(f"RAM root {root}: unmounted")
    else:
        done.append(f"RAM root {root}: no longer mounted (the copy's own clean-up unmounted it)")
    try:
        plan.unlink()
        done.append(f"plan {plan}: removed")
    except FileNotFoundError:
        done.append(f"plan {plan}: not there (never written, or already removed)")
    with contextlib.suppress(FileNotFoundError):
        root.rmdir()
    return done
