"""The copy-in worker: a chrooted child process that builds the RAM root.

Why a separate process: safety by construction. The worker opens the new root, then
``chroot()``s into it before it creates a single file, so a hostile archive's ``../``
names, absolute names, symlinks that point out of the root and hardlinks to host paths
all resolve *inside* the root. Absolute symlinks of the image stay exactly as they are.
The worker also ``unshare()``s its mount namespace: the read-only view of an image's layers
that the fast path copies from (an overlay, or a bind mount of a single layer) exists only
there, and dies with the worker, even if it is killed.

Two ways in, one result (the tree ``docker export`` of the image would give):

* **copy-tree**, the fast path: a read-only overlay of the image's overlay2 layer
  directories (of one layer, a read-only bind mount of it), walked with directory fds and
  copied with ``sendfile`` (no user-space buffers); hardlinks through an inode map;
  directory mtimes set last.
* **apply-tars**: tar streams fed through a pipe in length-prefixed frames, one stream per
  layer. A plain tarball is extracted the way GNU tar ``-xp --xattrs --numeric-owner``
  does. Docker layers (``docker_layers``) are applied the way dockerd applies them
  (whiteouts ``.wh.NAME`` and ``.wh..wh..opq``; a hardlink entry's owner, mode and mtime
  applied to the shared inode), then reduced to what ``docker export`` keeps (whole-second
  mtimes, only ``EXPORT_XATTRS``).

The parent half (``run_worker``) spawns ``python -I`` rather than forking, because the
caller may have threads (the TUI), and reads the worker's JSON-line reports: progress,
scanned entries, and the outcome.

Standard library only, and everything is imported before the chroot: inside the new root
no Python module can be found.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import posixpath
import shutil
import signal
import stat
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from initstage import linux
from injector.errors import BadInput, EnvironmentFailure, add_note
from injector.image.tarstream import (
    ArchiveError,
    StrictTar,
    member_xattrs,
    mtime_ns,
    normalize,
)

FRAME = struct.Struct("!Q")  # length of the data that follows; 0 ends one tar stream
SENDFILE_CHUNK = 16 << 20  # big enough to be cheap, small enough for regular progress
# Regular files at least this big are filled by a pool of threads when the worker may run
# on more than one core: sendfile gives up the GIL, so copies page cache -> tmpfs overlap.
# The many small files stay inline: handing them over costs more than copying them.
PARALLEL_FILE_BYTES = 1 << 20
MAX_COPY_THREADS = 4
PROGRESS_INTERVAL = 0.1  # seconds between progress reports
WRITE_BUFFER = 1 << 20

# `docker export` stores mtimes in whole seconds and, of all xattrs, only
# security.capability (moby pkg/archive). The fast path copies the same, so that both
# paths give exactly the tree `docker export` would.
EXPORT_XATTRS = ("security.capability",)
NS_PER_SECOND = 1_000_000_000

# Overlayfs takes its options in one page; long layer lists use docker's short links.
MOUNT_DATA_LIMIT = 4000
OPAQUE_MARKER = ".wh..wh..opq"
WHITEOUT_PREFIX = ".wh."
# Runtime state: a system boots with these empty (a tmpfs, or cleaned), and what an image
# ships there is stale, or worse (a /run/dboot/keep would call off the revert timer). The
# copy keeps each directory itself, with the image's owner and mode, and none of its contents.
FRESH_DIRS = ("/run",)

_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from injector.image.extract import worker_main; worker_main(sys.argv[2])"
)
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])  # holds injector/ and initstage/


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------


def run_worker(
    job: dict[str, Any],
    *,
    streams: Iterable[Iterable[bytes]] | None = None,
    progress: Callable[[int], None] | None = None,
    on_entry: Callable[[list[Any]], None] | None = None,
    context: str = "copy",
) -> dict[str, Any]:
    """Run one worker job to completion and return its summary.

    ``streams``: for apply-tars, each item is one tar stream as chunks of bytes.
    Any exception here (a failing ``progress`` callback, Ctrl-C) kills the worker first,
    so that its root and working directory no longer pin the tmpfs.
    """
    # Here, not at the top: the worker, which imports this module too, needs neither.
    import subprocess
    import tempfile

    status_r, status_w = os.pipe()
    data_r, data_w = os.pipe() if streams is not None else (-1, -1)
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    # Our pid: the worker's own check that we still live must not take a dboot that is PID 1
    # (a container's entrypoint) for init having adopted it.
    job = {**job, "status_fd": status_w, "parent": os.getpid()}
    # -S: the worker needs nothing from site-packages (the engine is on _PACKAGE_PARENT), and
    # each start saves importing site.
    command = [sys.executable, "-I", "-S", "-c", _BOOT, _PACKAGE_PARENT, json.dumps(job)]
    feeder: _Feeder | None = None
    try:
        process = subprocess.Popen(
            command,
            stdin=data_r if streams is not None else subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            pass_fds=(status_w,),
        )
    except BaseException:
        for fd in (status_r, status_w, data_r, data_w):
            if fd >= 0:
                os.close(fd)
        stderr.close()
        raise
    os.close(status_w)
    if data_r >= 0:
        os.close(data_r)
    try:
        if streams is not None:
            feeder = _Feeder(data_w, streams)
            data_w = -1
            feeder.start()
        outcome = _read_reports(status_r, progress, on_entry)
        returncode = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        os.close(status_r)
        if data_w >= 0:
            os.close(data_w)
        if feeder is not None:
            feeder.finish()
    try:
        if feeder is not None and feeder.error is not None:
            raise feeder.error
        return _outcome(outcome, returncode, stderr, context)
    finally:
        stderr.close()


class _Feeder(threading.Thread):
    """Writes the tar streams into the worker's stdin, framed, from a thread of its own:
    the calling thread meanwhile reads the worker's progress."""

    def __init__(self, fd: int, streams: Iterable[Iterable[bytes]]) -> None:
        super().__init__(name="dboot-feeder", daemon=True)
        self._fd = fd
        self._streams = streams
        self.error: BaseException | None = None

    def run(self) -> None:
        out = open(self._fd, "wb", buffering=WRITE_BUFFER)  # noqa: SIM115 - closed below
        try:
            for stream in self._streams:
                for chunk in stream:
                    if chunk:
                        out.write(FRAME.pack(len(chunk)))
                        out.write(chunk)
                out.write(FRAME.pack(0))
            out.flush()
        except BrokenPipeError:
            pass  # the worker stopped early; its own report says why
        except BaseException as error:
            self.error = error
        finally:
            with contextlib.suppress(OSError):
                out.close()

    def finish(self) -> None:
        self.join(timeout=30)


def _read_reports(
    fd: int,
    progress: Callable[[int], None] | None,
    on_entry: Callable[[list[Any]], None] | None,
) -> dict[str, Any]:
    outcome: dict[str, Any] = {}
    pending = b""
    while chunk := os.read(fd, 1 << 16):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            report = json.loads(line)
            if "entries" in report:
                if on_entry is not None:
                    for fields in report["entries"]:
                        on_entry(fields)
            elif "progress" in report:
                if progress is not None:
                    progress(report["progress"])
            else:
                outcome = report
    return outcome


def _outcome(
    outcome: dict[str, Any], returncode: int, stderr: IO[bytes], context: str
) -> dict[str, Any]:
    if "done" in outcome and returncode == 0:
        done: dict[str, Any] = outcome["done"]
        return done
    message = outcome.get("message")
    kind = outcome.get("error")
    if kind == "bad-input":
        raise BadInput(f"{context}: {message}", "check the image or archive")
    if kind == "no-space":
        raise EnvironmentFailure(f"{context}: {message}", "give a larger --tmpfs-size")
    stderr.seek(0)
    said = stderr.read().decode(errors="replace").strip()
    if message is None:
        lines = said.splitlines()
        message = f"copy-in worker exited with status {returncode}" + (
            f" ({lines[-1]})" if lines else ""
        )
    if kind == "internal" or "message" not in outcome:
        fix = (
            "nothing was kept; run it again with -v for what the worker said, and report it"
            if said
            else "nothing was kept; the worker said nothing at all: report it, with the command"
        )
    else:
        fix = "nothing was kept; fix what the message names and run it again"
    failure = EnvironmentFailure(f"{context}: {message}", fix)
    if said:
        add_note(failure, f"the copy-in worker said:\n{said}")  # shown by the CLI's -v
    raise failure


def scan_layer(layer: str, on_entry: Callable[[list[Any]], None]) -> int:
    """The entries of a one-layer image's tree (its layer directory), told to ``on_entry``
    as the worker's scan-tree tells them; their count.

    Here, in this process: a walk only reads, so it needs neither the worker's chroot nor
    a read-only mount, and it saves the worker's start and the entries' trip through JSON
    (about a third of the scan of a one-layer image of 19k entries)."""
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        return _TreeScanner(on_entry).scan(fd, "")
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# Worker side (runs in its own process; chrooted into the new root for copy jobs)
# ---------------------------------------------------------------------------------------


class _Reporter:
    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._last = 0.0
        # Scanned entries go out as one JSON line per batch: one decode per batch, not per
        # entry, is a good part of a large image's scan time.
        self.entries: list[list[Any]] = []

    def send(self, report: dict[str, Any]) -> None:
        self._write(json.dumps(report) + "\n")

    def progress(self, done: int, *, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self.send({"progress": done})

    def entry(self, fields: list[Any]) -> None:
        self.entries.append(fields)
        if len(self.entries) >= 512:
            self.flush()

    def flush(self) -> None:
        if self.entries:
            self.send({"entries": self.entries})
            self.entries = []

    def _write(self, text: str) -> None:
        data = memoryview(text.encode("utf-8", "surrogatepass"))
        while data:
            data = data[os.write(self._fd, data) :]


def worker_main(job_text: str) -> None:
    job = json.loads(job_text)
    reporter = _Reporter(job["status_fd"])
    code = 1
    try:
        linux.die_with_parent(job["parent"])
        # The parent owns Ctrl-C: it kills us, then unmounts. Ignoring SIGINT here means a
        # terminal's Ctrl-C cannot leave a half-done worker racing its own cleanup.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.umask(0)
        sys.setrecursionlimit(20000)
        summary = _JOBS[job["op"]](job, reporter)
        reporter.flush()
        reporter.send({"done": summary})
        code = 0
    except ArchiveError as error:
        reporter.send({"error": "bad-input", "message": str(error)})
    except OSError as error:
        kind = "no-space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "environment"
        reporter.send({"error": kind, "message": _describe_os_error(error)})
    except BaseException as error:
        reporter.send({"error": "internal", "message": f"internal error: {error!r}"})
        traceback.print_exc()
    finally:
        sys.stderr.flush()
        os._exit(code)


def _describe_os_error(error: OSError) -> str:
    where = f" on {error.filename!r}" if error.filename is not None else ""
    return f"{error.strerror or error}{where}"


def _scan_tree(job: dict[str, Any], reporter: _Reporter) -> dict[str, Any]:
    with _image_tree(job["layers"], job["scratch"]) as source:
        count = _TreeScanner(reporter.entry).scan(source, "")
    return {"entries": count}


def _copy_tree(job: dict[str, Any], reporter: _Reporter) -> dict[str, Any]:
    root_fd = os.open(job["root"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    # Counted before the chroot: the number of online CPUs is read from /sys, not there.
    threads = min(len(os.sched_getaffinity(0)), MAX_COPY_THREADS)
    with _image_tree(job["layers"], job["scratch"]) as source:
        _enter_root(root_fd)
        copier = _TreeCopier(reporter, threads=threads)
        dest = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            copier.copy_dir(source, dest, "")
        finally:
            os.close(dest)
        copier.finish()
    _empty_fresh_dirs()
    return {"files": copier.files, "bytes": copier.bytes, "method": "overlay"}


def _apply_tars(job: dict[str, Any], reporter: _Reporter) -> dict[str, Any]:
    root_fd = os.open(job["root"], os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    _enter_root(root_fd)
    applier = _TarApplier(reporter, docker_layers=job["docker_layers"], skip=set(job["skip"]))
    framed = _FramedInput(0)
    for _ in range(job["streams"]):
        framed.start_stream()
        applier.apply(framed)
    applier.finish()
    _empty_fresh_dirs()
    return {"files": applier.files, "bytes": applier.bytes, "method": "tar"}


_JOBS: dict[str, Callable[[dict[str, Any], _Reporter], dict[str, Any]]] = {
    "scan-tree": _scan_tree,
    "copy-tree": _copy_tree,
    "apply-tars": _apply_tars,
}


# --- the process's own confinement --------------------------------------------------------


@contextlib.contextmanager
def _image_tree(layers: list[str], scratch: str) -> Iterator[int]:
    """The image's tree (``layers`` top first) mounted read-only in a private mount
    namespace; yields an fd of its root.

    Several layers: an overlay of them, which hides whiteouts and opaque directories, so
    the merged view is the image's filesystem as a container would see it. One layer (a
    base image, an imported tarball) is its own merged view, less overlayfs' whiteouts,
    which the walks skip (``_is_whiteout``): a read-only bind mount of it spares the walks
    the lookups of a freshly mounted overlay, a good part of a scan (measured: 170 ms
    through an overlay, 90 ms through the bind mount, for 19k entries)."""
    linux.unshare(linux.CLONE_NEWNS)
    # Private first, or our mounts would propagate back to the host's shared mounts.
    linux.mount("none", "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount(
        "dboot-scratch", scratch, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "size=64k,mode=0700"
    )
    merged = f"{scratch}/merged"
    os.mkdir(merged)
    if len(layers) == 1:
        linux.mount(layers[0], merged, None, linux.MS_BIND)
        linux.mount("none", merged, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
    else:
        data = "lowerdir=" + ":".join(layers)
        if len(data) > MOUNT_DATA_LIMIT:
            data = _short_lowerdir(layers)
        linux.mount("overlay", merged, "overlay", linux.MS_RDONLY, data)
    os.chdir("/")
    fd = os.open(merged, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def _is_whiteout(st: os.stat_result) -> bool:
    """An overlayfs whiteout (a 0/0 character device): never part of the image's tree, and
    never seen through an overlay, which hides it."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _short_lowerdir(lower: list[str]) -> str:
    """Docker's trick for long layer lists: overlay2 keeps ``l/<short id>`` symlinks to each
    layer's diff dir; mount with those, relative to the overlay2 directory."""
    names = []
    base = str(Path(lower[0]).parent.parent)
    for layer in lower:
        link = Path(layer).parent / "link"
        if Path(layer).parent.parent == Path(base) and link.exists():
            names.append("l/" + link.read_text().strip())
        else:
            names.append(layer)
    os.chdir(base)
    return "lowerdir=" + ":".join(names)


def _empty_fresh_dirs() -> None:
    """Empty :data:`FRESH_DIRS` in the copied root (we stand in it), once everything is in
    place: a hardlink elsewhere to a file in there keeps its data. Not through a symlink:
    an image whose /run is a link keeps it as it is."""
    for directory in FRESH_DIRS:
        found = _lstat(directory)
        if found is None or not stat.S_ISDIR(found.st_mode):
            continue
        for name in os.listdir(directory):
            _remove(posixpath.join(directory, name))
        os.utime(directory, ns=(found.st_atime_ns, found.st_mtime_ns), follow_symlinks=False)


def _enter_root(root_fd: int) -> None:
    """From here on, "/" is the new root: nothing this process does can reach the host's."""
    os.fchdir(root_fd)
    os.chroot(".")
    os.chdir("/")
    os.close(root_fd)


# --- the fast path: walk the merged overlay -------------------------------------------------


def _whole_seconds(ns: int) -> int:
    return ns - ns % NS_PER_SECOND


class _TreeScanner:
    """Metadata of every entry under a directory fd, told to ``entry`` as index entries."""

    def __init__(self, entry: Callable[[list[Any]], None]) -> None:
        self._entry = entry
        self._count = 0

    def scan(self, dir_fd: int, path: str) -> int:
        with os.scandir(dir_fd) as listing:
            entries = list(listing)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISSOCK(st.st_mode) or _is_whiteout(st):
                continue  # not copied either (see _TreeCopier)
            child = f"{path}/{entry.name}"
            target = os.readlink(entry.name, dir_fd=dir_fd) if entry.is_symlink() else None
            inode = st.st_ino if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode) else None
            self._entry(
                [
                    child,
                    _kind(st.st_mode),
                    stat.S_IMODE(st.st_mode),
                    st.st_uid,
                    st.st_gid,
                    st.st_size,
                    st.st_mtime_ns // NS_PER_SECOND,
                    target,
                    inode,
                ]
            )
            self._count += 1
            if stat.S_ISDIR(st.st_mode):
                sub = os.open(
                    entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd
                )
                try:
                    self.scan(sub, child)
                finally:
                    os.close(sub)
        return self._count


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "socket"


class _TreeCopier:
    """Copies a directory tree fd-to-fd. Destination entries are created relative to their
    parent's fd with O_EXCL/O_NOFOLLOW, so nothing created earlier can redirect a write."""

    def __init__(self, reporter: _Reporter, *, threads: int = 1) -> None:
        self._reporter = reporter
        self._links: dict[tuple[int, int], str] = {}
        self._dir_times: list[tuple[str, int]] = []
        self.files = 0
        self.bytes = 0
        # Large files: created here, in order (a hardlink to one finds it), filled by the pool.
        self._pool = ThreadPoolExecutor(threads, "dboot-copy") if threads > 1 else None
        self._in_flight = threading.BoundedSemaphore(threads * 2)  # open fds stay bounded
        self._filling: list[Future[None]] = []
        self._counting = threading.Lock()  # bytes and the reporter's pipe

    def copy_dir(self, src_dir: int, dst_dir: int, path: str) -> None:
        with os.scandir(src_dir) as listing:
            entries = list(listing)
        for entry in entries:
            self._copy_entry(src_dir, dst_dir, entry.name, f"{path}/{entry.name}")

    def _copy_entry(self, src_dir: int, dst_dir: int, name: str, path: str) -> None:
        st = os.stat(name, dir_fd=src_dir, follow_symlinks=False)
        mode, mtime = st.st_mode, _whole_seconds(st.st_mtime_ns)
        if stat.S_ISDIR(mode):
            self._copy_subdir(src_dir, dst_dir, name, path, st)
            self._dir_times.append((path, mtime))
            return
        if stat.S_ISSOCK(mode) or _is_whiteout(st):
            return  # docker export skips sockets: they mean nothing without their process
        self.files += 1
        # Hardlinks: the first name of an inode is copied, the others are linked to it.
        if st.st_nlink > 1:
            key = (st.st_dev, st.st_ino)
            first = self._links.get(key)
            if first is not None:
                os.link(first, path, follow_symlinks=False)
                return
            self._links[key] = path
        if stat.S_ISREG(mode):
            self._copy_file(src_dir, dst_dir, name, st, mtime)
            return
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
        else:  # character and block devices, fifos
            os.mknod(name, mode, st.st_rdev, dir_fd=dst_dir)
        os.chown(name, st.st_uid, st.st_gid, dir_fd=dst_dir, follow_symlinks=False)
        if not stat.S_ISLNK(mode):
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dst_dir)
        os.utime(name, ns=(mtime, mtime), dir_fd=dst_dir, follow_symlinks=False)

    def _copy_subdir(
        self, src_dir: int, dst_dir: int, name: str, path: str, st: os.stat_result
    ) -> None:
        os.mkdir(name, 0o700, dir_fd=dst_dir)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
        src = os.open(name, flags, dir_fd=src_dir)
        try:
            dst = os.open(name, flags, dir_fd=dst_dir)
            try:
                os.fchown(dst, st.st_uid, st.st_gid)
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                self.copy_dir(src, dst, path)
            finally:
                os.close(dst)
        finally:
            os.close(src)

    def _copy_file(
        self, src_dir: int, dst_dir: int, name: str, st: os.stat_result, mtime: int
    ) -> None:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=src_dir)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            dst = os.open(name, flags, 0o600, dir_fd=dst_dir)
        except BaseException:
            os.close(src)
            raise
        if self._pool is None or st.st_size < PARALLEL_FILE_BYTES:
            self._fill(src, dst, st, mtime)
            return
        self._raise_failed()
        self._in_flight.acquire()
        try:
            filling = self._pool.submit(self._fill, src, dst, st, mtime)
        except BaseException:
            self._in_flight.release()
            os.close(dst)
            os.close(src)
            raise
        filling.add_done_callback(lambda _: self._in_flight.release())
        self._filling.append(filling)

    def _fill(self, src: int, dst: int, st: os.stat_result, mtime: int) -> None:
        """The file's data and metadata, from ``src`` into the new ``dst``; closes both."""
        try:
            while sent := os.sendfile(dst, src, None, SENDFILE_CHUNK):
                with self._counting:
                    self.bytes += sent
                    self._reporter.progress(self.bytes)
            # Order matters: chown clears setuid bits and file capabilities, so the
            # mode and the xattrs come after it.
            os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
            for attribute in EXPORT_XATTRS:
                value = _get_xattr(src, attribute)
                if value is not None:
                    os.setxattr(dst, attribute, value)
            os.utime(dst, ns=(mtime, mtime))
        finally:
            os.close(dst)
            os.close(src)

    def _raise_failed(self) -> None:
        """A fill that failed ends the copy, with its own error, at the next file."""
        for filling in self._filling:
            if filling.done() and filling.exception() is not None:
                filling.result()
        self._filling = [filling for filling in self._filling if not filling.done()]

    def finish(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            for filling in self._filling:
                filling.result()
        # Directory mtimes last: creating their entries changed them all.
        for path, mtime in self._dir_times:
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        self._reporter.progress(self.bytes, force=True)


def _get_xattr(fd: int, attribute: str) -> bytes | None:
    try:
        return os.getxattr(fd, attribute)
    except OSError as error:
        if error.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


# --- the stream path: tar members applied inside the chroot ----------------------------------


class _FramedInput:
    """One tar stream at a time out of the framed pipe (see ``FRAME``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._remaining = 0
        self._ended = True

    def start_stream(self) -> None:
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        if self._ended:
            return b""
        if self._remaining == 0:
            (self._remaining,) = FRAME.unpack(self._exactly(FRAME.size))
            if self._remaining == 0:
                self._ended = True
                return b""
        want = self._remaining if size < 0 else min(size, self._remaining)
        data = os.read(self._fd, want)
        if not data:
            raise ArchiveError("the stream ended early (the reader failed)")
        self._remaining -= len(data)
        return data

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            more = os.read(self._fd, size - len(data))
            if not more:
                raise ArchiveError("the stream ended early (the reader failed)")
            data += more
        return data


class _TarApplier:
    """Applies tar members the way GNU tar extracts them (and Docker applies layers):
    an existing entry is replaced unless both are directories; parents are created when
    missing; owners are numeric; directory mtimes are set at the very end."""

    def __init__(self, reporter: _Reporter, *, docker_layers: bool, skip: set[str]) -> None:
        self._reporter = reporter
        self._whiteouts = docker_layers
        self._docker_layers = docker_layers
        self._skip = skip
        self._dir_times: dict[str, int] = {}
        self._created: set[str] = set()  # in the current layer, which opaque dirs keep
        self.files = 0
        self.bytes = 0

    def apply(self, stream: Any) -> None:
        tar = StrictTar(stream)
        self._created = set()
        for member in tar:
            path = normalize(member.name)
            if path in self._skip:
                continue
            base = posixpath.basename(path)
            if self._whiteouts and base.startswith(WHITEOUT_PREFIX):
                self._whiteout(path, base)
                continue
            try:
                self._apply_member(tar, member, path)
            except ArchiveError:
                raise
            except OSError as error:
                if error.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise ArchiveError(f"cannot create {path!r}: {_describe_os_error(error)}") from None
            if self._whiteouts:
                self._created.add(path)
        tar.drain()

    def _apply_member(self, tar: StrictTar, member: Any, path: str) -> None:
        if path == "/":
            if member.isdir():
                self._set_metadata("/", member)
                self._dir_times["/"] = self._mtime(member)
            return
        parent = posixpath.dirname(path)
        try:
            _make_parents(parent)
        except (FileExistsError, NotADirectoryError):
            raise ArchiveError(f"cannot create {path!r}: {parent!r} is not a directory") from None
        existing = _lstat(path)
        if member.isdir():
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                _remove(path)
                existing = None
            if existing is None:
                os.mkdir(path, 0o700)
            self._set_metadata(path, member)
            self._dir_times[path] = self._mtime(member)
            return
        if existing is not None:
            _remove(path)
            self._dir_times.pop(path, None)
        self.files += 1
        if member.isreg():
            self._write_file(tar, member, path)
            return
        if member.islnk():
            target = normalize(member.linkname)
            try:
                os.link(target, path, follow_symlinks=False)
            except FileNotFoundError:
                raise ArchiveError(
                    f"hardlink {path!r} points to {member.linkname!r}, which is not in the archive"
                ) from None
            if self._docker_layers:
                # dockerd's applier (moby createTarFile) sets a link entry's metadata on the
                # shared inode; its chown even clears a file capability set earlier.
                self._set_metadata(path, member, link_to_symlink=_is_symlink(target))
                if not _is_symlink(target):
                    os.utime(path, ns=(self._mtime(member),) * 2)
            return
        if member.issym():
            os.symlink(member.linkname, path)
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mknod(path, stat.S_IFIFO | 0o600)
        else:
            raise ArchiveError(f"{member.name!r} has an unsupported tar entry type {member.type!r}")
        self._set_metadata(path, member)
        os.utime(path, ns=(self._mtime(member),) * 2, follow_symlinks=False)

    def _write_file(self, tar: StrictTar, member: Any, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            for chunk in tar.data(member):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                self.bytes += len(chunk)
                self._reporter.progress(self.bytes)
            os.fchown(fd, member.uid, member.gid)
            os.fchmod(fd, member.mode & 0o7777)
            for attribute, value in self._xattrs(member).items():
                _set_xattr(fd, attribute, value)
            os.utime(fd, ns=(self._mtime(member),) * 2)
        finally:
            os.close(fd)

    def _set_metadata(self, path: str, member: Any, *, link_to_symlink: bool = False) -> None:
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        for attribute, value in self._xattrs(member).items():
            _set_xattr(path, attribute, value)
        if not (member.issym() or link_to_symlink):
            os.chmod(path, member.mode & 0o7777)

    def _xattrs(self, member: Any) -> dict[str, bytes]:
        found = member_xattrs(member)
        if self._docker_layers:
            return {key: value for key, value in found.items() if key in EXPORT_XATTRS}
        return found

    def _mtime(self, member: Any) -> int:
        exact = mtime_ns(member)
        return _whole_seconds(exact) if self._docker_layers else exact

    def _whiteout(self, path: str, base: str) -> None:
        parent = posixpath.dirname(path)
        if base == OPAQUE_MARKER:
            # An opaque directory hides everything the lower layers had in it; what this
            # layer itself put there stays.
            parent_stat = _lstat(parent)
            if parent_stat is not None and stat.S_ISDIR(parent_stat.st_mode):
                for name in os.listdir(parent):
                    child = posixpath.join(parent, name)
                    if child not in self._created:
                        _remove(child)
        elif not base.startswith(WHITEOUT_PREFIX + WHITEOUT_PREFIX):  # AUFS bookkeeping: skip
            _remove(posixpath.join(parent, base[len(WHITEOUT_PREFIX) :]))

    def finish(self) -> None:
        for path, mtime in self._dir_times.items():
            st = _lstat(path)
            if st is not None and stat.S_ISDIR(st.st_mode):
                os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        self._reporter.progress(self.bytes, force=True)


def _make_parents(directory: str) -> None:
    """Create the missing directories of ``directory`` as dockerd and GNU tar do for a
    parent the archive never names: owned by us (root), mode 0755. ``os.makedirs`` would
    give the intermediate ones 0777 under the worker's umask 0: a world-writable hole."""
    if os.path.isdir(directory):
        return
    _make_parents(posixpath.dirname(directory))
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        if not os.path.isdir(directory):  # a dangling symlink or a file is in the way
            raise


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None


def _is_symlink(path: str) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISLNK(st.st_mode)


def _remove(path: str) -> None:
    st = _lstat(path)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _set_xattr(target: int | str, attribute: str, value: bytes) -> None:
    try:
        if isinstance(target, int):
            os.setxattr(target, attribute, value)
        else:
            os.setxattr(target, attribute, value, follow_symlinks=False)
    except OSError as error:
        # user.* xattrs are not allowed on symlinks and devices, and tmpfs before Linux 6.6
        # has none at all: GNU tar warns and goes on, and so do we.
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
