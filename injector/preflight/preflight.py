"""Preflight: the facts about this machine first, then the verdicts (blockers and warnings).

Nothing here changes the system, except ``swapoff_disk_swaps``, which the real switch calls
after the user confirmed. The report is plain data: the CLI prints it (or its events as
JSON lines) and the wizard's Resources and Processes screens render the same dataclasses.

What a verdict means: a *blocker* makes the switch fail or destroy the machine's usability
outright (no room in RAM, ptrace impossible, an init that cannot run here); a *warning* is a
risk the user is shown before the copy and accepts by going on; an *info* notice only
explains. The rule, the same in the code (``FORCE_RULE``), in ``--help`` and in the README:
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from initstage import linux
from initstage.procs import ProcInfo
from injector import labmode
from injector.access import facts as access_facts
from injector.access.facts import AccessFacts
from injector.errors import BadInput, EnvironmentFailure, system_call_failure
from injector.events import Event, Fact, Level, Notice
from injector.image.imageindex import INODE_BYTES, ImageIndex, pages
from injector.preflight import execcheck, procinfo
from injector.preflight.procinfo import PROC, SwapDevice, Unreadable
from injector.ramroot.kmodules import ModulesFacts, gather_modules
from injector.ramroot.rootfs import HostFile, host_files, tmpfs_size_for
from injector.stop.plan import StopPlan, plan_facts, plan_notices
from injector.units import human_bytes

__all__ = [
    "FORCE_RULE",
    "IndexView",
    "Pid1Facts",
    "ProcessInfo",
    "RamFacts",
    "Report",
    "SessionFacts",
    "SwapDevice",
    "gather",
    "processes_by_service",
    "report_events",
    "swapoff_disk_swaps",
    "swaps_still_to_turn_off",
    "swaps_to_turn_off",
    "validate_init",
]

MiB = 1 << 20
# The one rule for what stops a run. ``injector.switch`` applies it; the CLI's --help and the
# README quote it word for word.
FORCE_RULE = (
    "blockers stop a run unless --force; warnings never stop a run; "
    "--yes skips only the typed confirmation"
)


# Kept free while the image is copied in, on top of the image itself. MemAvailable already
# leaves out the kernel's watermark reserve, but it is an estimate: it counts page cache and
# reclaimable slab as if all of it could be dropped, and the old system keeps running (and
# allocating) during the copy, as does the copier itself. The error grows with the size of
# the machine, hence a share of MemTotal (1/32, about 3%) with a floor of 128 MiB.
COPY_MARGIN_FLOOR = 128 * MiB
COPY_MARGIN_SHARE = 32

# Below this much RAM left after the copy the new system is "tight": a minimal busybox
# system runs in a few MiB, but a systemd boot with a few services wants 200-300 MiB. The
# share (1/10 of MemTotal) keeps the warning meaningful on big machines. The processes that
# are killed free their memory too, which the warning's text mentions rather than counts:
# their RSS shares pages (libraries, page cache) that do not all come back.
TIGHT_FLOOR = 256 * MiB
TIGHT_SHARE = 10

# Where an SSH server lives in the usual images (OpenSSH, Dropbear, Dropbear's multi-call).
SSH_SERVER_PATHS = (
    "/usr/sbin/sshd",
    "/usr/bin/sshd",
    "/sbin/sshd",
    "/usr/sbin/dropbear",
    "/usr/bin/dropbear",
    "/sbin/dropbear",
    "/usr/bin/dropbearmulti",
    "/usr/sbin/dropbearmulti",
)

# Process names that carry a remote login: a session chain through one of them is remote.
# sshd-session is OpenSSH 9.8+'s per-connection process.
REMOTE_LOGIN_COMMS = frozenset({"sshd", "sshd-session", "dropbear", "mosh-server"})
# Those of them whose sockets are the SSH connection itself.
SSHD_COMMS = frozenset({"sshd", "sshd-session", "dropbear"})

# Hints that PID 1 of our PID namespace is a container's init, not the machine's.
CONTAINER_FILES = ("/.dockerenv", "/run/.containerenv")
CONTAINER_CGROUP_WORDS = ("docker", "kubepods", "libpod", "lxc", "containerd", "machine.slice")


_LEVEL_ORDER: dict[Level, int] = {"blocker": 0, "warning": 1, "info": 2}


class IndexView(Protocol):
    """What preflight needs from ``injector.image.imageindex.ImageIndex`` (the scanned tree)."""

    @property
    def estimated_bytes(self) -> int: ...

    def lookup(self, path: str) -> object | None: ...

    def executable(self, path: str) -> bool: ...


# --- The facts -------------------------------------------------------------------------------


@dataclasses.dataclass
class RamFacts:
    """Bytes. ``estimated_bytes`` is everything the tmpfs will hold: the image, the host
    files added to it, and ``modules_bytes`` (the kernel's modules and firmware, 0 when not
    copied).
    ``remaining_bytes`` is what MemAvailable leaves once that sits in the tmpfs (negative
    when it does not fit). ``available_bytes`` is 0 when /proc/meminfo was unreadable (a
    ``ram-unknown`` warning says so)."""

    estimated_bytes: int
    available_bytes: int
    total_bytes: int
    tmpfs_size: int
    remaining_bytes: int
    modules_bytes: int = 0


@dataclasses.dataclass
class ProcessInfo:
    """A process the switch will kill. ``service`` is its systemd unit (``-`` when none);
    ``session_chain`` marks the user's own chain (our shell, sudo, sshd...); ``writing`` lists
    regular files it holds open for writing (a data-loss risk)."""

    pid: int
    ppid: int
    user: str
    command: str
    rss_bytes: int
    service: str
    session_chain: bool
    writing: list[str]


@dataclasses.dataclass
class SessionFacts:
    """``via``: how we know (``ssh from 10.0.0.1``, ``sshd[812] in the session chain``,
    ``console /dev/tty1``, ``no terminal``)."""

    remote: bool
    via: str
    image_has_ssh: bool


@dataclasses.dataclass
class Pid1Facts:
    """The target: the machine's PID 1, or a namespace's PID 1 given by ``--target-pid``.
    ``exe`` reads ``unreadable (...)`` when the kernel would not show it."""

    pid: int
    exe: str
    cmdline: list[str]
    ptrace_allowed: bool
    ptrace_reason: str
    in_container: bool
    container_hint: str = ""
    ptrace_fix: str = ""  # what to do when ptrace_allowed is False


@dataclasses.dataclass
class HostFileFacts:
    """One of /etc/hostname, hosts, resolv.conf, machine-id on the host. ``state`` says what
    it is (``ok``, ``missing``, ``a dangling symlink to ...``); ``carried`` whether the new
    root gets it (else the image's own stays)."""

    name: str
    state: str
    carried: bool


@dataclasses.dataclass
class Report:
    ram: RamFacts
    swap: list[SwapDevice]
    processes: list[ProcessInfo]
    session: SessionFacts
    pid1: Pid1Facts
    init_argv: list[str]
    notices: list[Notice]
    # What could not be read (not root, hidepid, protected files): facts may be incomplete.
    unreadable: list[str] = dataclasses.field(default_factory=list)
    # The running kernel's modules and firmware for the new root (None: not gathered).
    modules: ModulesFacts | None = None
    # /etc/hostname, hosts, resolv.conf, machine-id as found on the host.
    host_files: list[HostFileFacts] = dataclasses.field(default_factory=list)
    image_architecture: str = ""  # as the image declares it ("" when it does not)
    kernel_machine: str = ""  # uname -m
    # The network, DNS, SSH session and SSH access (None: not gathered).
    access: AccessFacts | None = None
    # What the init stops before the injection, in which order (None: not gathered).
    stop: StopPlan | None = None

    @property
    def blocked(self) -> bool:
        return any(notice.level == "blocker" for notice in self.notices)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "blocked": self.blocked}


def processes_by_service(processes: list[ProcessInfo]) -> dict[str, list[ProcessInfo]]:
    """Group for display: services by name, processes without a unit (``-``) last."""
    groups: dict[str, list[ProcessInfo]] = {}
    for process in sorted(processes, key=lambda p: (p.service == "-", p.service, p.pid)):
        groups.setdefault(process.service, []).append(process)
    return groups


# --- The init command --------------------------------------------------------------------------


def check_init_argv(init_argv: list[str]) -> None:
    """The one rule for an init command before any image is read: given, and an absolute
    path (inside the image, checked by ``validate_init`` once the index is there)."""
    if not init_argv or not init_argv[0]:
        raise BadInput("no init command given", "name the new PID 1, e.g. /sbin/init")
    if not init_argv[0].startswith("/"):
        raise BadInput(
            f"init {init_argv[0]!r} is not an absolute path",
            "give the full path inside the image, e.g. /sbin/init or /bin/sh",
        )


def validate_init(index: IndexView, init_argv: list[str]) -> None:
    """The new PID 1 must be an absolute path to an executable file *inside the image*
    (symlinks are resolved within the image by the index, never on the host)."""
    check_init_argv(init_argv)
    path = init_argv[0]
    if index.lookup(path) is None:
        raise BadInput(
            f"init {path} does not exist in the image (or is a dangling symlink there)",
            "pick a program the image has, e.g. /bin/sh",
        )
    if not index.executable(path):
        raise BadInput(
            f"init {path} is not an executable file in the image",
            "pick a regular file with an x bit, e.g. /bin/sh",
        )


# --- Gathering ---------------------------------------------------------------------------------


class _Gaps:
    """What we could not read. Per-process failures are summarised, not listed one by one."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.fd_tables: list[int] = []

    def summary(self) -> list[str]:
        lines = list(self.files)
        if self.fd_tables:
            shown = ", ".join(str(pid) for pid in self.fd_tables[:5])
            more = f" and {len(self.fd_tables) - 5} more" if len(self.fd_tables) > 5 else ""
            lines.append(f"open files of {len(self.fd_tables)} processes (pids {shown}{more})")
        return lines


def gather(
    index: IndexView,
    init_argv: list[str],
    *,
    target_pid: int = 1,
    tmpfs_size: int | None = None,
    mem_available: int | None = None,
    our_pid: int | None = None,
    proc: Path = PROC,
    environ: Mapping[str, str] | None = None,
    host_root: Path = Path("/"),
    source: Any = None,
    modules: bool = True,
    kernel: tuple[str, str] | None = None,
    network: tuple[list[access_facts.Interface], list[access_facts.Route], str] | None = None,
) -> Report:
    """Read the facts and judge them. Changes nothing.

    ``init_argv`` may be empty (``dboot check IMAGE``): the init is then not judged; otherwise
    a bad init is a blocker here (``validate_init`` raises instead, for the CLI's exit 1).
    ``tmpfs_size`` defaults to what a switch would mount: the estimate plus headroom.
    ``source`` (the opened ``injector.image.sources`` source of ``index``) lets the init's first
    bytes be read, to judge whether it can run on this kernel, and gives the image's declared
    architecture. ``modules=False`` is ``--no-modules``. ``kernel`` is (``uname -m``,
    ``uname -r``). ``proc``, ``environ``, ``host_root`` (its /etc, /lib/modules,
    /lib/firmware) and ``kernel`` exist for tests with crafted trees.
    """
    our_pid = os.getpid() if our_pid is None else our_pid
    environ = os.environ if environ is None else environ
    machine, release = kernel or (os.uname().machine, os.uname().release)
    gaps = _Gaps()

    stats = _read_stats(proc, gaps)
    if target_pid not in stats:
        raise BadInput(f"no process with pid {target_pid}", "check the --target-pid value")
    chain = _ancestors(stats, our_pid)

    real_index = index if isinstance(index, ImageIndex) else None
    module_facts = gather_modules(
        real_index, wanted=modules, host_root=host_root, release=release, proc=proc
    )
    found_host_files = host_files(host_root / "etc")
    image_bytes = index.estimated_bytes + _host_files_cost(real_index, found_host_files)
    ram = _ram_facts(image_bytes, module_facts.total_bytes, tmpfs_size, mem_available, proc, gaps)
    swap = _read_swaps(proc, gaps)
    members = _doomed_pids(stats, target_pid, our_pid, proc)
    processes = [
        info
        for pid in members
        if (info := _process_info(stats[pid], pid in chain, proc, gaps)) is not None
    ]
    session = _session_facts(index, stats, chain, our_pid, proc, environ)
    pid1 = _pid1_facts(target_pid, our_pid, proc, host_root, gaps)
    access = access_facts.gather(
        index,
        init_argv,
        host_root=host_root,
        environ=environ,
        our_pid=our_pid,
        proc=proc,
        session_pids=[pid for pid in chain if pid in stats and stats[pid].comm in SSHD_COMMS],
        network=network,
    )
    if access.session is not None and not session.remote:
        # sudo reset SSH_CONNECTION and no sshd is in the chain (a tmux or screen server in
        # between): an ancestor's environment still says where the session comes from.
        session = SessionFacts(True, f"ssh from {access.session.client}", session.image_has_ssh)

    report = Report(
        ram=ram,
        swap=swap,
        processes=processes,
        session=session,
        pid1=pid1,
        init_argv=list(init_argv),
        notices=[],
        unreadable=gaps.summary(),
        modules=module_facts,
        host_files=[
            HostFileFacts(found.name, found.state, found.content is not None)
            for found in found_host_files
        ],
        image_architecture=_image_architecture(source),
        kernel_machine=machine,
        access=access,
    )
    report.notices = _verdicts(report, index)
    if real_index is not None:
        report.notices = _sorted(report.notices + _exec_verdicts(report, real_index, source))
    return report


def _host_files_cost(index: ImageIndex | None, found: list[HostFile]) -> int:
    """What the host files add to the tmpfs on top of the image: a new file costs its pages
    and an inode; one that replaces the image's own costs the difference in pages."""
    if index is None:
        return 0
    cost = 0
    for host_file in found:
        if host_file.content is None:
            continue
        entry = index.get(f"/etc/{host_file.name}")
        if entry is None:
            cost += pages(len(host_file.content)) + INODE_BYTES
        elif entry.kind == "file":
            cost += pages(len(host_file.content)) - pages(entry.size)
        elif entry.kind == "symlink":
            cost += pages(len(host_file.content))
    return cost


def _image_architecture(source: Any) -> str:
    if source is None:
        return ""
    try:
        return str(source.details().architecture or "")
    except Exception:  # the engine's SDK errors: the architecture is then simply unknown
        return ""


def _exec_verdicts(report: Report, index: ImageIndex, source: Any) -> list[Notice]:
    """Can the image's programs, and its init above all, run on this kernel?"""
    notices = execcheck.judge_architecture(report.image_architecture, report.kernel_machine)
    init = report.init_argv[0] if report.init_argv else ""
    if source is not None and init.startswith("/"):
        reader = execcheck.head_reader(source, index)
        notices += execcheck.judge_init(index, init, reader, report.kernel_machine)
    return notices


def _read_stats(proc: Path, gaps: _Gaps) -> dict[int, ProcInfo]:
    """Every process's stat line; processes that exit meanwhile are simply left out."""
    stats = {}
    for pid in procinfo.list_pids(proc):
        try:
            stat = procinfo.read_stat(pid, proc)
        except Unreadable as error:
            gaps.files.append(str(error))
            continue
        if stat is not None:
            stats[pid] = stat
    return stats


def _ancestors(stats: dict[int, ProcInfo], pid: int) -> list[int]:
    """Our parent, its parent, ... up to PID 1: the user's session chain."""
    chain: list[int] = []
    current = stats.get(pid)
    while current is not None and current.ppid > 0 and current.ppid not in chain:
        chain.append(current.ppid)
        current = stats.get(current.ppid)
    return chain


def _ram_facts(
    image_bytes: int,
    modules_bytes: int,
    tmpfs_size: int | None,
    mem_available: int | None,
    proc: Path,
    gaps: _Gaps,
) -> RamFacts:
    estimated = image_bytes + modules_bytes
    memory = procinfo.Memory(0, 0)
    try:
        memory = procinfo.memory(proc) or memory
    except Unreadable as error:
        gaps.files.append(str(error))
    available = memory.available_bytes if mem_available is None else mem_available
    return RamFacts(
        estimated_bytes=estimated,
        available_bytes=available,
        total_bytes=memory.total_bytes,
        tmpfs_size=tmpfs_size_for(estimated) if tmpfs_size is None else tmpfs_size,
        remaining_bytes=available - estimated,
        modules_bytes=modules_bytes,
    )


def _read_swaps(proc: Path, gaps: _Gaps) -> list[SwapDevice]:
    try:
        return procinfo.parse_swaps(procinfo.read_text(proc / "swaps") or "")
    except Unreadable as error:
        gaps.files.append(str(error))
        return []


def _doomed_pids(
    stats: dict[int, ProcInfo], target_pid: int, our_pid: int, proc: Path
) -> list[int]:
    """The processes the init stage will kill: all userspace but the target and us.

    For a namespace's PID 1 (``target_pid != 1``) that is the processes of its PID namespace,
    and of namespaces nested in it, which show up as the target's descendants. Zombies are
    already dead and left out.
    """
    userspace = {
        pid
        for pid, stat in stats.items()
        if not stat.kernel_thread and stat.state != "Z" and pid not in (target_pid, our_pid)
    }
    if target_pid == 1:
        return sorted(userspace)
    try:
        target_ns = procinfo.pid_namespace(target_pid, proc)
    except Unreadable:
        target_ns = None  # not root: the target's descendants are all we can tell
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.ppid, []).append(pid)
    members: set[int] = set()
    pending = [target_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in members:
                members.add(child)
                pending.append(child)
    if target_ns is not None:
        for pid in userspace - members:
            try:
                if procinfo.pid_namespace(pid, proc) == target_ns:
                    members.add(pid)
            except Unreadable:
                continue
    return sorted(members & userspace)


def _process_info(stat: ProcInfo, in_chain: bool, proc: Path, gaps: _Gaps) -> ProcessInfo | None:
    """None when the process exited while we looked at it."""
    try:
        details = procinfo.process_details(stat.pid, proc)
        cgroup = procinfo.read_text(f"{proc}/{stat.pid}/cgroup")
    except Unreadable as error:
        gaps.files.append(str(error))
        return None
    if details is None:
        return None
    try:
        writing = procinfo.files_open_for_writing(stat.pid, proc)
    except Unreadable:
        gaps.fd_tables.append(stat.pid)
        writing = []
    return ProcessInfo(
        pid=stat.pid,
        ppid=stat.ppid,
        user=details.user,
        command=" ".join(details.argv) if details.argv else f"[{stat.comm}]",
        rss_bytes=details.rss_bytes,
        service=procinfo.service_from_cgroup(cgroup or ""),
        session_chain=in_chain,
        writing=writing,
    )


def _session_facts(
    index: IndexView,
    stats: dict[int, ProcInfo],
    chain: list[int],
    our_pid: int,
    proc: Path,
    environ: Mapping[str, str],
) -> SessionFacts:
    image_has_ssh = any(index.executable(path) for path in SSH_SERVER_PATHS)
    # sshd sets SSH_CONNECTION ("client_ip client_port server_ip server_port"); sudo keeps it
    # only with env_keep, so the chain is the second witness (and survives `sudo -i`).
    connection = environ.get("SSH_CONNECTION") or environ.get("SSH_CLIENT")
    if connection:
        return SessionFacts(True, f"ssh from {connection.split()[0]}", image_has_ssh)
    for pid in chain:
        comm = stats[pid].comm if pid in stats else ""
        if comm in REMOTE_LOGIN_COMMS:
            return SessionFacts(True, f"{comm}[{pid}] in the session chain", image_has_ssh)
    try:
        # Our stdin itself; psutil's terminal() is the controlling tty, looked up in /dev.
        tty = procinfo.read_link(proc / str(our_pid) / "fd" / "0")
    except Unreadable:
        tty = None
    if tty and tty.startswith("/dev/"):
        return SessionFacts(False, f"console {tty}", image_has_ssh)
    return SessionFacts(False, "no terminal", image_has_ssh)


def _pid1_facts(
    target_pid: int, our_pid: int, proc: Path, host_root: Path, gaps: _Gaps
) -> Pid1Facts:
    try:
        # readlink, not psutil's exe(): that drops " (deleted)" and the path from a refusal.
        exe = procinfo.read_link(proc / str(target_pid) / "exe") or "gone"
    except Unreadable as error:
        exe = f"unreadable ({error})"
    try:
        details = procinfo.process_details(target_pid, proc)
    except Unreadable as error:
        gaps.files.append(str(error))
        details = None
    ptrace = procinfo.ptrace_permission(target_pid, our_pid, proc)
    hint = container_hint(proc, host_root)
    return Pid1Facts(
        pid=target_pid,
        exe=exe,
        cmdline=details.argv if details else [],
        ptrace_allowed=ptrace.allowed,
        ptrace_reason=ptrace.reason,
        in_container=bool(hint),
        container_hint=hint,
        ptrace_fix=ptrace.fix,
    )


def container_hint(proc: Path = PROC, host_root: Path = Path("/")) -> str:
    """Why we think we run in a container ('' when we don't). Looks at our filesystem and at
    PID 1 of our PID namespace; none of these hints is certain, hence a warning only."""
    for name in CONTAINER_FILES:
        if (host_root / name.lstrip("/")).exists():
            return f"{name} exists"
    try:
        environ = procinfo.read_text(proc / "1" / "environ") or ""
    except Unreadable:
        environ = ""  # a protected PID 1 environ; the other hints still apply
    for variable in environ.split("\0"):
        if variable.startswith("container="):
            return f"PID 1 has {variable} in its environment"
    try:
        cgroup = procinfo.read_text(proc / "1" / "cgroup") or ""
    except Unreadable:
        cgroup = ""
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        for word in CONTAINER_CGROUP_WORDS:
            if word in path:
                return f"PID 1's cgroup is {path}"
    return ""


# --- Verdicts ----------------------------------------------------------------------------------


def _verdicts(report: Report, index: IndexView) -> list[Notice]:
    notices: list[Notice] = []
    ram_fits = _ram_verdicts(report.ram, report.processes, notices)
    _swap_verdicts(report.ram, report.swap, ram_fits, notices)
    _process_verdicts(report.processes, notices)
    # The session is lost only when the machine's own PID 1 is replaced: a --target-pid run
    # (a namespace) leaves it alone.
    if report.pid1.pid == 1:
        _session_verdicts(report.session, notices)
    _pid1_verdicts(report.pid1, notices)
    _modules_verdicts(report.modules, notices)
    _host_file_verdicts(report.host_files, notices)
    if report.access is not None:
        notices += access_facts.verdicts(
            report.access,
            remote=report.session.remote and report.pid1.pid == 1,
            image_has_ssh=report.session.image_has_ssh,
        )
    if report.init_argv:
        try:
            validate_init(index, report.init_argv)
        except BadInput as error:
            notices.append(Notice("blocker", "init-invalid", error.cause, error.fix or ""))
    if report.unreadable:
        notices.append(
            Notice(
                "warning",
                "facts-incomplete",
                "could not read: " + "; ".join(report.unreadable),
                "run as root so that every process and file can be inspected",
            )
        )
    return _sorted(notices)


def set_stop_plan(report: Report, plan: StopPlan) -> None:
    """The graceful stop's plan, and what it says, into the report. A process the init
    stops its own way is no longer one that is killed holding files open for writing: the
    warning about those is judged again, on what the plan leaves to the signals."""
    report.stop = plan
    left = [p for p in report.processes if not plan.fate(p.service).startswith("stop")]
    writers: list[Notice] = []
    _process_verdicts(left, writers)
    kept = [notice for notice in report.notices if notice.code != "processes-writing"]
    report.notices = _sorted(kept + writers + plan_notices(plan))


def add_notices(report: Report, notices: list[Notice]) -> None:
    """Verdicts the run's options add (``--no-carry``), in their place by level."""
    report.notices = _sorted(report.notices + notices)


def _sorted(notices: list[Notice]) -> list[Notice]:
    # Blockers first, then warnings, then explanations; within a level, in section order.
    return sorted(notices, key=lambda notice: _LEVEL_ORDER[notice.level])


def _modules_verdicts(modules: ModulesFacts | None, notices: list[Notice]) -> None:
    if modules is None or not (modules.supported or modules.copy):
        return  # a kernel without module support: nothing to carry, nothing to say
    if modules.copy:
        firmware = (
            f" and {len(modules.firmware)} firmware files ({human_bytes(modules.firmware_bytes)}) "
            "that loaded modules use"
            if modules.firmware
            else ""
        )
        notices.append(
            Notice(
                "info",
                "modules-copied",
                f"the kernel's modules ({modules.source}, {modules.files} files, "
                f"{human_bytes(modules.bytes)}){firmware} go into the new root",
                "--no-modules leaves them out",
            )
        )
    elif "host has no" in modules.state:
        # The new system will not load vfat, dm-crypt or nf_tables unless its image has them.
        notices.append(
            Notice(
                "warning",
                "modules-missing",
                f"no kernel modules to carry over: {modules.state}",
                f"the new system can load modules only if the image has /lib/modules/"
                f"{modules.release}",
            )
        )
    else:
        notices.append(Notice("info", "modules-not-copied", f"kernel modules: {modules.state}"))


def _host_file_verdicts(files: list[HostFileFacts], notices: list[Notice]) -> None:
    odd = [f"/etc/{item.name} is {item.state}" for item in files if not item.state.startswith("ok")]
    if odd:
        notices.append(
            Notice(
                "info",
                "host-files",
                "; ".join(odd),
                "files that cannot be carried over keep the image's own",
            )
        )


def copy_margin(total_bytes: int) -> int:
    return max(COPY_MARGIN_FLOOR, total_bytes // COPY_MARGIN_SHARE)


def tight_threshold(total_bytes: int) -> int:
    return max(TIGHT_FLOOR, total_bytes // TIGHT_SHARE)


def _ram_verdicts(ram: RamFacts, processes: list[ProcessInfo], notices: list[Notice]) -> bool:
    """Adds the RAM notices; True when the image fits (so swap can be judged on top)."""
    if ram.available_bytes <= 0:
        notices.append(
            Notice(
                "warning",
                "ram-unknown",
                "available memory is unknown (/proc/meminfo unreadable)",
                "check `free -m` yourself against the image's estimated "
                + human_bytes(ram.estimated_bytes),
            )
        )
        return False
    fits = True
    if ram.tmpfs_size < ram.estimated_bytes:
        notices.append(
            Notice(
                "blocker",
                "ram-tmpfs-too-small",
                f"the tmpfs size {human_bytes(ram.tmpfs_size)} is below the image's estimated "
                f"{human_bytes(ram.estimated_bytes)}: the copy would run out of space",
                "raise --tmpfs-size, or leave it unset to size the tmpfs from the estimate",
            )
        )
    margin = copy_margin(ram.total_bytes)
    modules = (
        f" (with {human_bytes(ram.modules_bytes)} of kernel modules)" if ram.modules_bytes else ""
    )
    if ram.estimated_bytes + margin > ram.available_bytes:
        fits = False
        without = ram.estimated_bytes - ram.modules_bytes + margin <= ram.available_bytes
        notices.append(
            Notice(
                "blocker",
                "ram-does-not-fit",
                f"the image needs ~{human_bytes(ram.estimated_bytes)} of RAM{modules} plus "
                f"{human_bytes(margin)} for the running system during the copy, but only "
                f"{human_bytes(ram.available_bytes)} is available",
                "pass --no-modules: without the kernel modules the image fits"
                if ram.modules_bytes and without
                else "stop memory-hungry services, pick a smaller image, or add RAM",
            )
        )
    elif ram.remaining_bytes < tight_threshold(ram.total_bytes):
        freed = sum(process.rss_bytes for process in processes)
        notices.append(
            Notice(
                "warning",
                "ram-tight",
                f"only {human_bytes(ram.remaining_bytes)} would remain for the new system{modules} "
                f"(the killed processes free up to {human_bytes(freed)} more at the switch)",
                "pick a smaller image or make sure the new system is small"
                + (", or pass --no-modules" if ram.modules_bytes else ""),
            )
        )
    return fits


def swaps_to_turn_off(devices: list[SwapDevice]) -> list[SwapDevice]:
    """Disk partitions and swap files go off before a switch (they live on the disks the
    new system may repartition, and the new system does not know them); zram stays."""
    return [device for device in devices if device.must_go_off]


def _swap_verdicts(
    ram: RamFacts, swap: list[SwapDevice], ram_fits: bool, notices: list[Notice]
) -> None:
    disk = swaps_to_turn_off(swap)
    if not disk:
        return
    names = ", ".join(device.path for device in disk)
    swapped_out = sum(device.used_bytes for device in disk)
    # swapoff pulls every swapped-out page back into RAM while the old system (whose pages
    # they are) still runs and the image sits in the tmpfs: all three at once, for a moment.
    room = ram.available_bytes - ram.estimated_bytes - copy_margin(ram.total_bytes)
    if ram_fits and swapped_out > room:
        notices.append(
            Notice(
                "blocker",
                "swap-cannot-absorb",
                f"disk swap ({names}) holds {human_bytes(swapped_out)} that must come back into "
                f"RAM before the switch, but only {human_bytes(max(room, 0))} is left next to "
                "the image",
                "stop services to shrink what is swapped out, or pick a smaller image",
                scope="host",
            )
        )
        return
    absorb = (
        f"RAM can absorb its {human_bytes(swapped_out)} in use"
        if ram_fits
        else f"{human_bytes(swapped_out)} of it in use"
    )
    notices.append(
        Notice(
            "warning",
            "swap-disk-active",
            f"disk swap ({names}) will be turned off before the switch; {absorb}",
            "nothing to do: the switch runs swapoff; zram swap may stay",
            scope="host",
        )
    )


def _process_verdicts(processes: list[ProcessInfo], notices: list[Notice]) -> None:
    writers = [process for process in processes if process.writing]
    if not writers:
        return
    shown = ", ".join(
        f"{process.pid} {process.command.split(' ')[0]} ({process.writing[0]})"
        for process in writers[:3]
    )
    more = f" and {len(writers) - 3} more" if len(writers) > 3 else ""
    units = sorted({process.service for process in writers if process.service != "-"})
    stop = f"systemctl stop {' '.join(units)}" if units else "stop them"
    notices.append(
        Notice(
            "warning",
            "processes-writing",
            f"{len(writers)} processes hold files open for writing and will be killed: "
            f"{shown}{more}",
            f"{stop} cleanly first; the switch only syncs, then kills",
            scope="host",
        )
    )


def _session_verdicts(session: SessionFacts, notices: list[Notice]) -> None:
    # A blocker (issue 9): without an SSH server nobody gets back in. The revert timer would
    # bring the old system back, but only after minutes of a machine nobody can reach, and
    # never once its disk is wiped. --force is the way for a serial or KVM console, an image
    # that phones home, or a lab.
    if not session.remote:
        return
    if not session.image_has_ssh:
        notices.append(
            Notice(
                "blocker",
                "session-remote-no-ssh",
                f"this is a remote session ({session.via}) and the image has no SSH server: "
                "you will lose access to this machine",
                "use an image with sshd or dropbear (make rescue-image builds one), switch from "
                "a local console, or pass --force if a console is at hand",
                scope="host",
            )
        )
    else:
        notices.append(
            Notice(
                "info",
                "session-remote-ends",
                f"this remote session ({session.via}) ends at the switch",
                "reconnect once the new system's init has started its SSH server",
                scope="host",
            )
        )


def _pid1_verdicts(pid1: Pid1Facts, notices: list[Notice]) -> None:
    if not pid1.ptrace_allowed:
        notices.append(
            Notice(
                "blocker",
                "ptrace-denied",
                f"cannot attach to pid {pid1.pid}: {pid1.ptrace_reason}",
                pid1.ptrace_fix,
                scope="host" if pid1.pid == 1 else "any",
            )
        )
    # Only the machine's own PID 1 is affected by where we run; a namespace target is not.
    if pid1.in_container and pid1.pid == 1:
        notices.append(
            Notice(
                "warning",
                "container-detected",
                f"dboot seems to run inside a container ({pid1.container_hint}): PID 1 here is "
                "the container's init, so only the container's userspace would be replaced",
                "run dboot on the host itself to switch the machine",
                scope="host",
            )
        )


# --- Events ----------------------------------------------------------------------------------


def report_events(report: Report) -> Iterator[Event]:
    """The report as events, in a stable order: every Fact (ram, swap, processes, session,
    pid1, init, preflight), then every Notice (blockers, warnings, info)."""
    yield from _dataclass_facts("ram", report.ram)
    yield Fact("swap", "devices", [dataclasses.asdict(device) for device in report.swap])
    yield from _process_facts(report.processes)
    yield from _dataclass_facts("session", report.session)
    yield from _dataclass_facts("pid1", report.pid1)
    yield Fact("init", "argv", list(report.init_argv))
    yield Fact("image", "architecture", report.image_architecture)
    yield Fact("kernel", "machine", report.kernel_machine)
    if report.modules is not None:
        yield from _dataclass_facts("modules", report.modules)
        yield Fact("modules", "firmware_bytes", report.modules.firmware_bytes)
        yield Fact("modules", "total_bytes", report.modules.total_bytes)
    yield Fact("host_files", "files", [dataclasses.asdict(item) for item in report.host_files])
    if report.access is not None:
        yield from _dataclass_facts("access", report.access)
    if report.stop is not None:
        yield from plan_facts(report.stop)
    yield Fact("preflight", "unreadable", list(report.unreadable))
    yield from report.notices


def _dataclass_facts(section: str, facts: Any) -> Iterator[Fact]:
    for key, value in dataclasses.asdict(facts).items():
        yield Fact(section, key, value)


def _process_facts(processes: list[ProcessInfo]) -> Iterator[Fact]:
    yield Fact("processes", "count", len(processes))
    yield Fact("processes", "rss_bytes", sum(p.rss_bytes for p in processes))
    yield Fact("processes", "services", sorted({p.service for p in processes}))
    yield Fact("processes", "session_chain", [p.pid for p in processes if p.session_chain])
    yield Fact("processes", "writing", [p.pid for p in processes if p.writing])
    yield Fact("processes", "list", [dataclasses.asdict(p) for p in processes])


# --- Disk swap off (the real switch only) ------------------------------------------------------


def swaps_still_to_turn_off(report: Report, swaps_text: str) -> list[SwapDevice]:
    """The disk swaps active now (``swaps_text`` is a fresh /proc/swaps). One that the
    preflight did not see was added since and was never judged: stop rather than guess."""
    current = swaps_to_turn_off(procinfo.parse_swaps(swaps_text))
    judged = {device.path for device in report.swap}
    unjudged = [device.path for device in current if device.path not in judged]
    if unjudged:
        raise EnvironmentFailure(
            f"disk swap {', '.join(unjudged)} appeared after the preflight",
            "start the switch again so that the preflight can judge it",
        )
    return current


def swapoff_disk_swaps(report: Report, *, proc: Path = PROC) -> list[str]:
    """Turn off every disk partition and swap file (zram stays); returns their paths.

    ``/proc/swaps`` is read again: an area gone since the preflight needs nothing, and one
    added since (which the preflight did not judge) stops the switch. Refused in lab mode,
    so no test can turn off the host's swap. swapoff blocks until every page is back in RAM;
    the preflight checked that they fit.
    """
    labmode.refuse(
        "the host's swap is left alone",
        "only a real switch turns swap off, and lab mode allows none",
    )
    current = swaps_still_to_turn_off(report, procinfo.read_text(proc / "swaps") or "")
    turned_off = []
    for device in current:
        with system_call_failure(
            f"swapoff {device.path} failed",
            "free RAM so its pages fit, or run `swapoff` yourself, then retry",
        ):
            linux.swapoff(device.path)
        turned_off.append(device.path)
    return turned_off
