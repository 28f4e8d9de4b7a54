"""The state dir (``--state-dir``, default ``/run/dboot``): where a run keeps its RAM root and
the plan that PID 1 executes, and how runs share it.

- **A safe path.** The state dir must be an absolute path without symlinks or ``..``, and it
  and every directory above it must be root's alone (``injector.rootonly``): otherwise
  someone else could swap the plan, or the directory the stage pivots into, between our
  write and PID 1's read.
- **Nothing changed that was there before.** A run never chmods nor fills the state dir: it
  works in a fresh subdirectory of its own, ``<state dir>/run-<pid>-<random>`` (mode 0700),
  which it makes and removes again; missing directories of the state dir's own path are made
  (0700) and removed too. What stays after a run is what PID 1 runs from once injected.
- **One run at a time.** A switch or a dry run (not a rehearsal, whose sandbox sees only a
  private tmpfs over its own subdirectory) holds an ``flock`` on the state dir from before
  its first change until it ends. Another run is refused at once, exit 3: "another dboot run
  holds DIR (pid N)". So a colleague's dry run cannot take away the RAM root of a switch that
  waits at ``--ssh-check``, and no undo ever touches another run's subdirectory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
from pathlib import Path
from types import TracebackType

from injector.errors import BadInput, SafetyRefusal
from injector.rootonly import first_not_root_only

WORK_DIR_PREFIX = "run-"
SAFE_EXAMPLE = "/run/dboot"
PROC_LOCKS = Path("/proc/locks")


def check_state_dir_path(path: Path) -> None:
    """The rules on the path alone: absolute, no symlink and no ``..`` on the way (BadInput,
    exit 1, naming the path to give instead)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise BadInput(
            f"--state-dir {text} is a relative path",
            f"give an absolute path, e.g. --state-dir {SAFE_EXAMPLE}",
        )
    real = os.path.realpath(text)
    if real != os.path.normpath(text) or ".." in Path(text).parts:
        raise BadInput(
            f"--state-dir {text} goes through a symlink or '..' (it leads to {real})",
            f"give the path itself: --state-dir {real}",
        )


def refuse_unsafe(path: Path) -> None:
    """SafetyRefusal (exit 3) naming the first directory of ``path`` that someone other
    than root could change."""
    found = first_not_root_only([os.fspath(path)])
    if found is None:
        return
    where, why = found
    raise SafetyRefusal(
        f"--state-dir {path}: {where} is {why}, and PID 1 would run the plan kept under it",
        f"choose a --state-dir whose directories only root can change, e.g. {SAFE_EXAMPLE}",
    )


def make_state_dir(path: Path) -> list[Path]:
    """Check ``path`` and its parents, and make what is missing of it (0700), each checked
    once made. Returns the directories made, outermost first; on any refusal they are
    removed again."""
    check_state_dir_path(path)
    made: list[Path] = []
    try:
        for directory in [*reversed(path.parents), path]:
            try:
                os.mkdir(directory, 0o700)
                made.append(directory)
            except FileExistsError:
                pass
            # Checked after the mkdir: what is there now is what the run uses.
            refuse_unsafe(directory)
            if not stat.S_ISDIR(os.lstat(directory).st_mode):
                raise BadInput(
                    f"--state-dir {path}: {directory} is not a directory",
                    "give a directory, or a path that does not exist yet",
                )
    except BaseException:
        remove_dirs(made)
        raise
    return made


def remove_dirs(made: list[Path]) -> list[str]:
    """Remove the directories a run made, innermost first, if empty; one line each."""
    lines = []
    for directory in reversed(made):
        try:
            os.rmdir(directory)
            lines.append(f"directory {directory}: removed")
        except FileNotFoundError:
            lines.append(f"directory {directory}: not there (already removed)")
        except OSError as error:
            lines.append(f"directory {directory}: left ({error.strerror})")
    return lines


def new_work_dir(state_dir: Path) -> Path:
    """A name for this run's own subdirectory: the pid says whose, the random part makes it
    impossible for anyone to make it first."""
    return state_dir / f"{WORK_DIR_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"


def make_work_dir(work_dir: Path) -> list[Path]:
    """In the namespace where the RAM root goes: the state dir checked (and made where
    missing), then ``work_dir`` made afresh, mode 0700. Returns what was made, outermost
    first; FileExistsError if ``work_dir`` was there already (it is then not ours)."""
    made = make_state_dir(work_dir.parent)
    try:
        os.mkdir(work_dir, 0o700)
    except BaseException:
        remove_dirs(made)
        raise
    return [*made, work_dir]


def stale_runs(state_dir: Path) -> list[tuple[Path, int]]:
    """The subdirectories of ``state_dir`` whose run is gone (SIGKILLed before it could clean
    up), with that run's pid: a RAM root may still be mounted in one."""
    stale = []
    with contextlib.suppress(OSError):
        for entry in sorted(state_dir.iterdir()):
            named = re.fullmatch(rf"{WORK_DIR_PREFIX}(\d+)-[0-9a-f]+", entry.name)
            if named is not None and not Path(f"/proc/{named.group(1)}").exists():
                stale.append((entry, int(named.group(1))))
    return stale


def lock_holder(info: os.stat_result) -> str:
    """Who holds the flock on the file ``info`` describes, from /proc/locks: "pid N"."""
    with contextlib.suppress(OSError):
        for line in PROC_LOCKS.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6 or fields[1] != "FLOCK":  # "->" marks a waiter
                continue
            major, minor, inode = fields[5].split(":")
            same_file = (int(major, 16), int(minor, 16), int(inode)) == (
                os.major(info.st_dev),
                os.minor(info.st_dev),
                info.st_ino,
            )
            if same_file:
                return f"pid {fields[4]}"
    return "its pid is not visible from here: another PID namespace?"


class StateDir:
    """The host's side of a run's state dir: checked and made (where missing) on entry,
    locked unless ``lock`` is false, this run's subdirectory named (``work_dir``; made where
    the RAM root goes, by :func:`make_work_dir`); on exit, the lock released and whatever
    this run made removed again if empty."""

    def __init__(self, path: Path, *, lock: bool) -> None:
        self.path = Path(path)
        self.work_dir = new_work_dir(self.path)
        self._lock = lock
        self._made: list[Path] = []
        self._fd: int | None = None

    def __enter__(self) -> StateDir:
        self._made = make_state_dir(self.path)
        try:
            if self._lock:
                self._take_lock()
        except BaseException:
            remove_dirs(self._made)
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            os.close(self._fd)  # the flock goes with its last descriptor
            self._fd = None
        # Empty unless PID 1 runs the stage from it (its plan, its RAM root): then it stays.
        remove_dirs([*self._made, self.work_dir])
        self._made = []

    def _take_lock(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(os.fstat(fd))
            os.close(fd)
            raise SafetyRefusal(
                f"another dboot run holds {self.path} ({holder})",
                "wait until it ends (its steps are in /var/log/dboot.log)",
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
