"""The login check's sshd, confined: the helper process that ``injector.access.sshcheck`` runs.

Run as ``python -I -S`` (see :func:`injector.access.sshcheck.helper_command`), so nothing in
the working directory, the environment or site-packages is imported as root: standard
library and ``initstage`` only, everything imported up front (past the pivot nothing of
the host's files is reachable).

What it does, in order:

1. Join the target's network and mount namespaces (the address is in the one, the RAM
   root in the other). A fresh single-threaded process, as ``setns(CLONE_NEWNS)`` requires.
2. Make a PID namespace: its first child, sshd's parent, is PID 1 there, so stopping it
   ends every session sshd started.
3. The child makes a mount namespace of its own, bind-mounts the RAM root onto itself and
   ``pivot_root``s into it, detaching the host's tree: no host file is reachable, whatever
   the image's symlinks say. Then, as in a rehearsal's sandbox (``initstage.hermetic``),
   our own ``/proc`` with ``/proc/sys`` and ``/proc/sysrq-trigger`` read-only, a minimal
   ``/dev`` (no disk in it) with a devpts of its own, and a ``/run`` with ``/run/sshd``. The
   RAM root itself stays as copied: all of these are mounted over it, in this namespace.
4. The bounding set loses what acts on the whole machine (:data:`DROPPED_CAPABILITIES`):
   a root login there cannot load modules, reboot, make device nodes, mount (so neither
   remount ``/proc/sys`` read-write nor mount a devtmpfs full of disks) or change the
   host's network (the check's sshd is in the target's network namespace: the host's,
   in a real switch).
5. sshd runs in the foreground and logs through syslog to ``/dev/log``, a datagram socket
   we bound there. Its syslog lines are escaped (``\\n`` is two characters) and each
   datagram is one message, so a client cannot forge a line: a user name is free text,
   and on stderr (``sshd -e``) a newline in it starts a line of its own. The parent relays
   each message as one line on its stdout, which nothing else writes to: the channel that
   ``sshcheck`` reads sshd's own words from. Our stderr carries the rest (our failures,
   sshd's start-up errors), which ``sshcheck`` shows but never trusts.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import sys
from typing import NoReturn

from initstage import hermetic, linux

SSHD = "/usr/sbin/sshd"
SYSLOG_SOCKET = "/dev/log"
# VERBOSE: the accepted key's fingerprint, and the key lookups, in the log.
SSHD_OPTIONS = ("-o", "LogLevel=VERBOSE")
# glibc's syslog(3) datagram: "<PRI>Mmm dd hh:mm:ss TAG[PID]: MESSAGE".
SYSLOG_DATAGRAM = re.compile(rb"<\d+>[^\[]*?\S+\[\d+\]: (.*)", re.DOTALL)
DATAGRAM_MAX = 65536
# include/uapi/linux/capability.h. On top of what the hermetic sandbox drops: no device
# nodes (our /dev is made before the drop), no mounts, no network configuration.
DROPPED_CAPABILITIES = {
    **hermetic.DROPPED_CAPABILITIES,
    "net_admin": 12,
    "sys_admin": 21,
    "mknod": hermetic.CAP_MKNOD,
}
# pam_loginuid sets each session's login uid. Once set (dboot run with sudo from a login),
# only CAP_AUDIT_CONTROL, which the sshd no longer has, may change it: unset it first, as
# the new system's sshd will have it under its init.
LOGINUID = "/proc/self/loginuid"
LOGINUID_UNSET = b"4294967295"


def _fail(message: str) -> NoReturn:
    print(f"ssh-check helper: {message}", file=sys.stderr, flush=True)
    os._exit(2)


def _join_namespaces(target: int) -> None:
    # Both opened first: once in the target's mount namespace, /proc may be another's.
    paths = {kind: f"/proc/{target}/ns/{kind}" for kind in ("net", "mnt")}
    fds = {
        kind: os.open(path, os.O_RDONLY)
        for kind, path in paths.items()
        if os.readlink(path) != os.readlink(f"/proc/self/ns/{kind}")
    }
    for kind, flag in (("net", linux.CLONE_NEWNET), ("mnt", linux.CLONE_NEWNS)):
        if kind in fds:
            linux.setns(fds[kind], flag)
            os.close(fds[kind])


def _pivot_into(root: str) -> None:
    """Make ``root`` our whole filesystem, in a mount namespace of our own."""
    linux.unshare(linux.CLONE_NEWNS)
    # Private first: pivot_root refuses shared mounts, and nothing may propagate back.
    linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
    linux.mount(root, root, None, linux.MS_BIND | linux.MS_REC)  # a mount point for sure
    os.chdir(root)
    # As the stage does: the old root stacks on top of "." and is detached from there.
    linux.pivot_root(".", ".")
    linux.umount2(".", linux.MNT_DETACH)
    os.chdir("/")


def _mount_api() -> None:
    """What sshd needs, over the RAM root's own directories, in our namespace only."""
    linux.mount("proc", "/proc", "proc", hermetic.HARDENED)  # our PID namespace's
    hermetic.make_proc_read_only("/proc")
    hermetic.mount_minimal_dev("/dev")
    hermetic.mount_devpts("/dev/pts")
    linux.mount("tmpfs", "/run", "tmpfs", linux.MS_NOSUID | linux.MS_NODEV, "mode=0755")
    os.mkdir("/run/sshd", 0o755)  # its privilege separation directory


def _unset_login_uid() -> None:
    try:
        fd = os.open(LOGINUID, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a kernel without audit: nothing to unset
    try:
        os.write(fd, LOGINUID_UNSET)
    except OSError as error:
        print(f"ssh-check helper: {LOGINUID} stays set ({error}): a PAM session may fail",
              file=sys.stderr, flush=True)  # fmt: skip
    finally:
        os.close(fd)


def _run_sshd(root: str, port: int, log: socket.socket) -> NoReturn:
    """The child: PID 1 of the new PID namespace, then sshd."""
    try:
        linux.die_with_parent()
        _pivot_into(root)
        _mount_api()
        log.bind(SYSLOG_SOCKET)
        _unset_login_uid()
        for number in DROPPED_CAPABILITIES.values():
            hermetic.drop_capability(number)
        os.dup2(2, 1)  # our stdout is the relay's alone
        os.execv(SSHD, [SSHD, "-D", "-p", str(port), *SSHD_OPTIONS])
    except OSError as error:
        _fail(f"sshd: {error}")


def syslog_line(datagram: bytes) -> bytes:
    """One datagram as one line: its message (the whole datagram if it has no syslog
    header), with any newline or carriage return in it escaped."""
    header = SYSLOG_DATAGRAM.fullmatch(datagram)
    message = header.group(1) if header is not None else datagram
    return message.rstrip(b"\n").replace(b"\r", b"\\r").replace(b"\n", b"\\n") + b"\n"


def _relay(log: socket.socket) -> None:
    """Every datagram waiting on ``log``, as lines on our stdout."""
    while True:
        try:
            datagram = log.recv(DATAGRAM_MAX)
        except BlockingIOError:
            return
        line = syslog_line(datagram)
        while line:
            line = line[os.write(1, line) :]


def serve(target: int, root: str, port: int) -> NoReturn:
    """Run the image's sshd in the PID namespace we make; SIGTERM ends it and its sessions."""
    try:
        # A dboot that dies (SIGKILL) takes its check along: sshd dies with us in turn.
        linux.die_with_parent()
        _join_namespaces(target)
        linux.unshare(linux.CLONE_NEWPID)
        log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError as error:
        _fail(f"namespaces: {error}")
    child = os.fork()
    if child == 0:
        _run_sshd(root, port, log)
    log.setblocking(False)
    child_ended = os.pidfd_open(child)
    # SIGTERM: kill sshd; its PID namespace's end takes every session with it.
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(child, signal.SIGKILL))
    while True:
        readable, _, _ = select.select([log, child_ended], [], [])
        if log in readable:
            _relay(log)
        if child_ended in readable:
            break
    _, status = os.waitpid(child, 0)
    _relay(log)  # what it said last
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


def main(argv: list[str]) -> NoReturn:
    if len(argv) != 3:
        _fail("usage: TARGET_PID ROOT PORT (run by injector.access.sshcheck)")
    serve(int(argv[0]), argv[1], int(argv[2]))
