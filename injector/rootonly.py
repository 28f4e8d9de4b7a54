"""Paths that only root can change: the state dir that holds PID 1's plan, and the code PID 1
runs (the interpreter, its libraries, ``initstage`` and its ``__pycache__``).

PID 1 executes what these paths hold, as root. Whoever could replace a file there, or rename
a directory on the way to it (a symlink swapped in between our check and PID 1's use), would
choose what the machine runs. So each of them, and every directory above it up to ``/``,
must be owned by root and writable by nobody else: neither group- nor world-writable. A
sticky directory (``/tmp``, mode 1777) is the one exception: nobody but an entry's owner may
rename or remove an entry there, so what root owns in it stays root's.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable


def why_not_root_only(info: os.stat_result) -> str | None:
    """Why someone other than root could change what ``info`` (from ``lstat``) describes, in
    words; None when only root can."""
    if stat.S_ISLNK(info.st_mode):
        return "a symlink"
    if info.st_uid != 0:
        return f"owned by uid {info.st_uid}, not by root"
    writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable and not (stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX):
        kind = "group-writable" if writable == stat.S_IWGRP else "world-writable"
        return f"{kind} (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def path_and_parents(path: str) -> list[str]:
    """``/``, then each directory down to ``path``, then ``path``: "/a/b" -> ["/", "/a", "/a/b"]."""
    parts = [part for part in path.split("/") if part]
    return ["/"] + ["/" + "/".join(parts[: count + 1]) for count in range(len(parts))]


def first_not_root_only(
    paths: Iterable[str], *, via: str = "", checked: set[str] | None = None
) -> tuple[str, str] | None:
    """The first of ``paths``, or of a directory above one of them, that someone other than
    root could change, with why; None when only root can change them all.

    ``via`` is a prefix to look through: ``/proc/PID/root`` sees the paths as process PID
    does. A part that does not exist ends that path's walk (whoever makes it checks it).
    ``checked`` (paths known good) saves walking the same parents again."""
    seen = set() if checked is None else checked
    for path in paths:
        for part in path_and_parents(path):
            if part in seen:
                continue
            try:
                # The trailing slash of "/" makes lstat follow via's /proc/PID/root link.
                info = os.lstat(via + part if part != "/" else via + "/")
            except FileNotFoundError:
                break
            reason = why_not_root_only(info)
            if reason is not None:
                return part, reason
            seen.add(part)
    return None
