"""The init stage: runs as PID 1 after the injected execve, and hands over to the image's init.

Read top to bottom, :meth:`Stage.run` is the list of steps of the design. Two rules
shape everything here:

- **PID 1 never exits and never raises out of main.** If it does, the kernel panics
  ("Attempted to kill init!"). Every failure ends in :meth:`Stage.recover`: a shell, or
  failing that, a process that reaps children forever.
- **Nothing is imported after the pivot.** The old root, which holds this interpreter's
  stdlib, is detached by then (and the new root may hold a *different* Python at the same
  paths). Every module is imported below, at the top; :class:`ImportGuard` logs any late
  import before the pivot and refuses it after.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Sequence
from types import ModuleType, TracebackType
from typing import TYPE_CHECKING, NoReturn

from initstage import hermetic, keeper, linux, netkeep
from initstage.children import JobResult, Outcome, run_jobs
from initstage.console import Console, StageLog, retry_vt, take_console
from initstage.mounts import Mount, is_mount_point, mount_of, one_per_superblock, read_mounts
from initstage.plan import Plan, PlanError, read_plan
from initstage.procs import KernelCgroups, KernelSignals, ProcTable, parse_stat, terminate_all
from initstage.teachpause import PausingSignals, TeachChannel, execve_text

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

STEPS = 8
# How long to wait for SIGKILLed processes to be reaped before naming them and going
# on. Anything still there after 2 s is stuck in the kernel and will not go faster.
KILL_TIMEOUT = 2.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RECOVERY_SHELL = "/bin/sh"
RESPAWN_DELAY = 1.0
KMSG_SPARES = 4

PROC_FLAGS = linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
# (mount point, filesystem type, flags, options) in the order they must be mounted.
API_MOUNTS = (
    ("/proc", "proc", PROC_FLAGS, None),
    ("/sys", "sysfs", PROC_FLAGS, None),
    ("/dev", "devtmpfs", linux.MS_NOSUID, "mode=0755"),
    ("/dev/pts", "devpts", linux.MS_NOSUID | linux.MS_NOEXEC, hermetic.DEVPTS_OPTIONS),
)

MIB = 1 << 20
RLIMIT_LOCKS = 10  # include/uapi/asm-generic/resource.h; Python's resource module lacks it
INF = resource.RLIM_INFINITY
# The limits the kernel gives init at boot (include/asm-generic/resource.h, INIT_RLIMITS,
# and fork_init() for NPROC/SIGPENDING), so the image's init starts as after a real boot
# and not with whatever the old init set. Notably NOFILE is 1024:4096, not systemd's
# 1024:524288: an init that wants more raises it itself (systemd does), and a soft limit
# of 1024 keeps select()-based programs safe. MEMLOCK is 8 MiB since Linux 5.16.
BOOT_RLIMITS: dict[int, tuple[int, int]] = {
    resource.RLIMIT_CPU: (INF, INF),
    resource.RLIMIT_FSIZE: (INF, INF),
    resource.RLIMIT_DATA: (INF, INF),
    resource.RLIMIT_STACK: (8 * MIB, INF),
    resource.RLIMIT_CORE: (0, INF),
    resource.RLIMIT_RSS: (INF, INF),
    resource.RLIMIT_NOFILE: (1024, 4096),
    resource.RLIMIT_MEMLOCK: (8 * MIB, 8 * MIB),
    resource.RLIMIT_AS: (INF, INF),
    RLIMIT_LOCKS: (INF, INF),
    resource.RLIMIT_MSGQUEUE: (819200, 819200),
    resource.RLIMIT_NICE: (0, 0),
    resource.RLIMIT_RTPRIO: (0, 0),
    resource.RLIMIT_RTTIME: (INF, INF),
}
THREAD_RLIMITS = (resource.RLIMIT_NPROC, resource.RLIMIT_SIGPENDING)  # threads-max / 2


class StageError(Exception):
    """A step cannot go on. The message names the cause."""


class ImportGuard:
    """A meta-path finder that sees every import the stage did not do up front."""

    def __init__(self, log: StageLog) -> None:
        self.log = log
        self.sealed = False

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if self.sealed:
            raise ImportError(
                f"module {name} imported after the pivot; the stage must import it up front"
            )
        self.log(f"warning: late import of module {name}: the stage should import it up front")
        return None  # let the normal finders load it while the old root is still there


def running_as_machine_init() -> bool:
    """True only for the PID 1 of the initial PID namespace: /proc is ours (self is 1) and
    pid 2 is kthreadd. In any doubt, False: a sandbox is the careful answer."""
    try:
        if os.readlink("/proc/self") != "1":
            return False
        with open("/proc/2/stat", "rb") as kthreadd:
            return parse_stat(2, kthreadd.read()).kernel_thread
    except (OSError, ValueError):
        return False


def is_mounted(path: str) -> bool:
    """A different filesystem than its parent's: true for every API filesystem we mount."""
    try:
        return os.stat(path).st_dev != os.stat(os.path.dirname(path.rstrip("/")) or "/").st_dev
    except FileNotFoundError:
        return False


def describe_error(error: BaseException) -> list[str]:
    """The error, then where it happened (innermost frames), without reading source files:
    after the pivot the old root's sources are gone, and traceback would need linecache."""
    lines = [f"{type(error).__name__}: {error}"]
    frames: list[str] = []
    trace: TracebackType | None = error.__traceback__
    while trace is not None:
        code = trace.tb_frame.f_code
        frames.append(
            f"  at {os.path.basename(code.co_filename)}:{trace.tb_lineno} in {code.co_name}"
        )
        trace = trace.tb_next
    return lines + frames[-4:]


def reset_signals() -> None:
    """Default dispositions, then an empty mask: the old init's mask and ignored signals
    survive execve (systemd blocks SIGTERM, SIGCHLD, SIGHUP ...), and must not reach the new."""
    # Every number up to NSIG: valid_signals() leaves out the ones libc reserves.
    for sig in range(1, signal.NSIG):
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            # Reserved by libc (32, 33): Python may not touch them, the kernel may. An
            # ignored one (seen inherited from a CI runner) would reach the new init.
            with contextlib.suppress(OSError):
                linux.default_disposition(sig)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def reset_rlimits(log: Callable[[str], None]) -> None:
    limits = dict(BOOT_RLIMITS)
    try:
        with open("/proc/sys/kernel/threads-max", "rb") as threads_max:
            per_user = int(threads_max.read()) // 2
        limits.update({limit: (per_user, per_user) for limit in THREAD_RLIMITS})
    except (OSError, ValueError):
        log("rlimits: no /proc/sys/kernel/threads-max: NPROC and SIGPENDING left as they are")
    for limit, values in limits.items():
        try:
            resource.setrlimit(limit, values)
        except (OSError, ValueError) as error:
            log(f"warning: setrlimit({limit}, {values}) failed: {error}")


class Stage:
    """The steps, in order. Any exception leaves :meth:`run` and goes to :meth:`recover`."""

    def __init__(self, plan_path: str, log: StageLog) -> None:
        self.plan_path = plan_path
        self.log = log
        self.plan: Plan | None = None
        self.console = Console()
        # Known before anything can fail: recovery on the real machine differs.
        self.machine_init = running_as_machine_init()
        self.pivoted = False
        self.root_is_initramfs = False
        self.old_root_fd: int | None = None  # to chroot back into the old root to recover
        self.console_staged = False  # a sandbox's terminal, on its way to /dev/console
        self.old_devices: list[str] = []  # "major:minor" of the old system's block devices
        self.hung_children: list[int] = []  # flush children stuck in the kernel
        self.step_number = 0
        self.teach = TeachChannel("", 1.0, log)  # a teaching rehearsal's plan names one
        # The dead-man's switch while this process keeps it (a thread, from step 1 until a
        # keeper process takes it over), and that keeper once there is one.
        self.revert_timer: keeper.RevertTimer | None = None
        self.keeper_pid: int | None = None

    def step(self, number: int, title: str) -> None:
        self.step_number = number
        self.log(f"step {number}/{STEPS}: {title}")

    def run(self) -> NoReturn:
        plan = self.read_and_check_plan()
        self.start_revert_timer(plan)
        self.step(2, f"console ({plan.console})")
        self.console = take_console(plan.console, not self.machine_init, self.log)
        self.step(
            3,
            f"sync, end every other process (grace {plan.grace_seconds:g} s), make the old"
            " filesystems read-only",
        )
        self.terminate_everything(plan)
        self.step(4, "hardware watchdog")
        self.disarm_watchdog()
        self.step(5, f"pivot_root into {plan.new_root}")
        self.pivot(plan.new_root)
        self.step(6, "API filesystems")
        self.mount_api_filesystems(plan)
        self.step(7, f"exec the image's init {plan.init_argv}")
        self.exec_init(plan)

    # Step 1 -------------------------------------------------------------------------
    def read_and_check_plan(self) -> Plan:
        self.step(1, f"read the plan {self.plan_path}")
        self.log.open_kmsg()
        self.plan = plan = read_plan(self.plan_path)
        self.log(
            f"plan: new root {plan.new_root}, init {plan.init_argv}, console {plan.console}, "
            f"grace {plan.grace_seconds:g} s, api mounts {plan.api_mounts}, "
            f"minimal /dev {plan.minimal_dev}, machine {plan.machine},"
            f" sync deadline {plan.sync_timeout_seconds:g} s"
        )
        if self.machine_init:
            self.log("running as the machine's PID 1")
            if plan.teach_socket:
                self.log("teaching: refused on the machine's PID 1: no pauses")
        else:
            self.isolate_sandbox()
            self.teach = TeachChannel(plan.teach_socket, plan.teach_timeout_seconds, self.log)
        return plan

    def isolate_sandbox(self) -> None:
        """PID 1 of a PID namespace (a rehearsal, a test). Take a mount namespace of our
        own before any mount, so that neither the pivot nor a /proc mount can ever reach
        a mount table shared with the host; then make sure /proc shows our namespace."""
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        proc_is_ours = os.path.isdir("/proc") and _readlink_or_none("/proc/self") == "1"
        if not proc_is_ours:
            linux.mount("proc", "/proc", "proc", PROC_FLAGS)
        self.log(
            "sandbox (PID 1 of a PID namespace): private mount namespace"
            + ("" if proc_is_ours else ", /proc mounted for our PID namespace")
        )

    def start_revert_timer(self, plan: Plan) -> None:
        """The dead-man's switch starts now, before anything is stopped: whatever fails or
        hangs from here on, the revert still comes at the deadline (see keeper.RevertTimer).
        After isolate_sandbox: a thread keeps the mount namespace it was started in."""
        if plan.revert_after_seconds <= 0:
            return
        may_reboot = plan.machine and self.machine_init
        root_fd: int | None = None
        try:
            root_fd = os.open(plan.new_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as error:
            if not may_reboot:
                self.log(f"warning: revert timer: no new root to leave its marker in ({error})")
        timer = keeper.RevertTimer(plan.revert_after_seconds, may_reboot, root_fd, self.log)
        self.revert_timer = timer
        try:
            timer.start()
        except RuntimeError as error:  # no thread: the deadline still goes to the keeper
            self.log(f"warning: revert timer: no thread ({error}): it runs once the keeper does")
            return
        action = "sync and reboot" if may_reboot else f"leave {keeper.REVERT_DUE_FILE}"
        self.log(
            f"revert timer: {plan.revert_after_seconds:g} s from now, then {action}; a thread"
            " of PID 1 keeps it until the keeper process takes it over"
        )
        if may_reboot:
            panic_restarts(self.log)

    # Step 3 -------------------------------------------------------------------------
    def terminate_everything(self, plan: Plan) -> None:
        self.teach.pause(
            "sync",
            f"sync(), and syncfs(fd) for each filesystem, in children, under a"
            f" {plan.sync_timeout_seconds:g} s deadline",
        )
        self.flush_filesystems(plan)
        # Before anything stops: a dying network daemon removes the addresses it made.
        network = netkeep.snapshot(plan, self.machine_init, self.log)
        try:
            cgroups: KernelCgroups | None = KernelCgroups()
        except OSError as error:
            self.log(f"cgroups: cannot read the mount table ({error}): no thaw, no cgroup.kill")
            cgroups = None
        if self.hung_children:
            # Stuck in the kernel (they were SIGKILLed at the deadline): waiting on them
            # again in the kill step would only add the grace and the kill timeout.
            self.log(f"left behind, stuck flushing: pids {self.hung_children}")
        report = terminate_all(
            ProcTable(ignore=self.hung_children),
            PausingSignals(KernelSignals(), self.teach),
            grace=plan.grace_seconds,
            kill_timeout=KILL_TIMEOUT,
            log=self.log,
            clock=time.monotonic,
            sleep=time.sleep,
            cgroups=cgroups,
        )
        self.log(
            f"{report.initial} processes at the start, SIGTERM phase"
            f" {report.term_seconds * 1000:.1f} ms, {len(report.ignored_term)} needed SIGKILL,"
            f" {len(report.survivors)} will not die, {report.reaped} reaped,"
            f" {report.total_seconds * 1000:.1f} ms in all"
        )
        if network is not None:
            timer = self.revert_timer
            netkeep.restore(network, self.log, timer.seconds_left() if timer else 0.0)
        try:
            retry_vt(self.console, self.log)
        except OSError as error:
            # No VGA (a serial-only VM or server): the console is all there is, and enough.
            self.log(f"console: no usable VT ({error}); staying on /dev/console")
        self.remount_old_root_readonly(plan)

    def flush_filesystems(self, plan: Plan) -> None:
        """sync, one child per filesystem, under the plan's deadline: a filesystem that
        cannot flush (a dead NFS server, a stalled FUSE daemon, a suspended dm device) is
        named, and the switch goes on without its unwritten data."""
        timeout = plan.sync_timeout_seconds
        try:
            mounts = [mount for mount in one_per_superblock(read_mounts()) if mount.flushable]
        except OSError as error:
            self.log(f"sync: no mount table ({error}): one sync(2) for everything")
            mounts = []
        jobs = [(mount.describe(), _syncfs_job(mount.mount_point)) for mount in mounts]
        jobs.append(("sync(2) of everything else (block devices written directly)", _sync_job))
        devices = {mount.describe(): mount.device for mount in mounts}
        meter = WriteMeter()

        def progress(unfinished: list[JobResult]) -> bool:
            return meter.progressed(
                [devices[job.label] for job in unfinished if job.label in devices]
            )

        outcome = run_jobs(jobs, timeout, time.monotonic, time.sleep, progress)
        self.hung_children = [job.pid for job in outcome.unfinished]
        for failed in outcome.failed:
            self.log(f"sync: {failed.label}: {failed.message}")
        self.log(
            f"sync: {len(outcome.results) - len(outcome.unfinished)} of {len(outcome.results)}"
            f" done in {outcome.seconds * 1000:.1f} ms (deadline {timeout:g} s without progress)"
        )
        if outcome.unfinished:
            self.log(
                f"warning: sync did not finish within {timeout:g} s, going on without it:"
                f" {_labels(outcome)}; data not yet written there may be lost"
            )

    def remount_old_root_readonly(self, plan: Plan) -> None:
        """As systemd-shutdown does: every block-backed filesystem of the old system goes
        read-only before the old root is detached, so that it is clean (no journal to
        replay) and a writer left behind cannot dirty it again.

        Only on the machine itself, when both the plan and /proc agree that this is the
        machine's PID 1: in a sandbox the filesystems are the host's (the mounts are
        copies, the superblocks are shared), and a superblock remount would make them
        read-only for everyone. There each mount copy goes read-only on its own
        (MS_BIND | MS_REMOUNT), which the host never sees."""
        try:
            mounts = read_mounts()
        except OSError as error:
            self.log(f"warning: read-only remount skipped: no mount table ({error})")
            return
        new_root = mount_of(plan.new_root, mounts)
        keep = {new_root.device} if new_root is not None else set()
        candidates = [
            mount
            for mount in mounts
            if mount.block_backed and not mount.is_under(plan.new_root) and mount.device not in keep
        ]
        self.old_devices = sorted({mount.device for mount in candidates})
        superblock = plan.machine and self.machine_init
        if plan.machine != self.machine_init:
            self.log(
                f"read-only remount: the plan says machine={plan.machine}, /proc says"
                f" {self.machine_init}: remounting each mount only, never a superblock"
            )
        if superblock:
            targets = [m for m in one_per_superblock(candidates) if "ro" not in m.super_options]
            what = "filesystem"
        else:
            targets = [mount for mount in candidates if not mount.read_only]
            what = "mount (sandbox: this namespace's copies only, the host's stay writable)"
        if not targets:
            self.log("read-only remount: no writable block-backed filesystem of the old system")
            return
        jobs = [(mount.describe(), _remount_job(mount, superblock=superblock)) for mount in targets]
        outcome = run_jobs(jobs, plan.sync_timeout_seconds, time.monotonic, time.sleep)
        self.hung_children += [job.pid for job in outcome.unfinished]
        for failed in outcome.failed:
            self.log(f"warning: read-only remount refused: {failed.label}: {failed.message}")
        done = [result.label for result in outcome.results if result.finished and result.ok]
        self.log(f"read-only remount, per {what}: {len(done)} of {len(targets)} done")
        for label in done:
            self.log(f"  read-only: {label}")
        if outcome.unfinished:
            self.log(
                f"warning: read-only remount did not finish within"
                f" {plan.sync_timeout_seconds:g} s: {_labels(outcome)}"
            )

    # Step 4 -------------------------------------------------------------------------
    def disarm_watchdog(self) -> None:
        """The old init's watchdog fd was close-on-exec: it closed without the magic 'V',
        so an armed watchdog keeps counting and would reset the machine. Open, 'V', close.
        A watchdog that is not running is left alone: opening it would start it."""
        if not self.machine_init:
            self.log("watchdog: a sandbox does not own the machine's watchdog: skipped")
            return
        if not os.path.exists("/dev/watchdog"):
            self.log("watchdog: none")
            return
        sysfs = "/sys/class/watchdog/watchdog0"
        if _read_text(f"{sysfs}/state") == "inactive":
            self.log("watchdog: present but not running: left alone")
            return
        try:
            fd = os.open("/dev/watchdog", os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, b"V")
            finally:
                os.close(fd)
        except OSError as error:
            self.log(f"warning: watchdog: magic close failed ({error}): it may reset the machine")
            return
        if _read_text(f"{sysfs}/nowayout") == "1":
            timeout = _read_text(f"{sysfs}/timeout") or "?"
            self.log(
                f"warning: watchdog has nowayout: the new init must ping it within {timeout} s"
            )
        else:
            self.log("watchdog: magic close done, stopped")

    # Step 5 -------------------------------------------------------------------------
    def pivot(self, new_root: str) -> None:
        if not os.path.isdir(new_root):
            raise StageError(f"new root {new_root} is not a directory")
        self.teach.pause(
            "pivot_root",
            f'chdir("{new_root}"); pivot_root(".", "."); umount2(".", MNT_DETACH)',
        )
        # Private first: pivot_root refuses shared mounts, and nothing we do from here on
        # may propagate back into another mount namespace.
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        if not is_mount_point(new_root):
            linux.mount(new_root, new_root, None, linux.MS_BIND | linux.MS_REC)
            self.log(f"{new_root} was not a mount point: bind-mounted onto itself")
        console = self.console.stdio if self.console.stdio is not None else 1
        terminal = None if self.machine_init else hermetic.open_console(console, "/dev/console")
        if terminal is not None:
            hermetic.bind_console(terminal, new_root.rstrip("/") + hermetic.STAGED_CONSOLE)
            self.console_staged = True
        self.root_is_initramfs = root_is_initramfs()
        self.old_root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.log.kmsg is not None:
            # Room for ~40 more lines (a failure and the recovery included).
            with contextlib.suppress(OSError):
                self.log.kmsg.stock_spares(KMSG_SPARES)
        os.chdir(new_root)
        # The sys.modules we have is all we will ever have: seal the import system.
        for finder in sys.meta_path:
            if isinstance(finder, ImportGuard):
                finder.sealed = True
        try:
            # pivot_root(".", ".") stacks the old root on top of the new one, so it
            # needs no put_old directory in the image; umount2(".") then detaches it.
            linux.pivot_root(".", ".")
            linux.umount2(".", linux.MNT_DETACH)
            how = "pivot_root, old root detached"
        except OSError as error:
            if error.errno != errno.EINVAL or not self.root_is_initramfs:
                raise
            # EINVAL because / is rootfs (an initramfs), which pivot_root cannot move. Do
            # what switch_root does: move the new root over / and chroot into it. On any
            # other root an EINVAL is a real fault, and recovery is the honest answer.
            linux.mount(".", "/", None, linux.MS_MOVE)
            os.chroot(".")
            how = f"pivot_root impossible ({error.strerror}): MS_MOVE + chroot"
        os.chdir("/")
        self.pivoted = True
        # No sync here: the flush was done (under a deadline) in step 3, and a bare sync
        # would wait, as PID 1 and forever, on any device that stopped taking writes.
        self.log(f"now in the new root ({how})")

    # Step 6 -------------------------------------------------------------------------
    def mount_api_filesystems(self, plan: Plan) -> None:
        if not plan.api_mounts:
            self.log("API filesystems: not mounted (api_mounts is false)")
            return
        self.teach.pause(
            "API mounts",
            'mount("proc", "/proc", "proc", MS_NOSUID|MS_NODEV|MS_NOEXEC, NULL), then /sys,'
            " /dev and /dev/pts",
        )
        done, skipped = [], []
        for mount_point, fstype, flags, options in API_MOUNTS:
            if is_mounted(mount_point):
                skipped.append(mount_point)
                continue
            os.makedirs(mount_point, mode=0o755, exist_ok=True)
            if mount_point == "/dev" and plan.minimal_dev:
                hermetic.mount_minimal_dev()
                if self.console_staged:
                    hermetic.move_staged_console()
                    self.console_staged = False
                    done.append("/dev (minimal, /dev/console)")
                else:
                    done.append("/dev (minimal)")
                continue
            if mount_point == "/sys" and not self.machine_init:
                hermetic.mount_read_only_sys()
                done.append("/sys (read-only, the delegated cgroup2 under it)")
                continue
            linux.mount(fstype, mount_point, fstype, flags, options)
            if mount_point == "/proc" and not self.machine_init:
                hermetic.make_proc_read_only()
                done.append("/proc (/proc/sys read-only)")
                continue
            done.append(mount_point)
        self.log(
            f"mounted {', '.join(done) or 'nothing'}; already there: {', '.join(skipped) or 'none'}"
        )

    # Step 7 -------------------------------------------------------------------------
    def exec_init(self, plan: Plan) -> NoReturn:
        init = plan.init_argv[0]
        if not os.path.isfile(init) or not os.access(init, os.X_OK):
            raise StageError(
                f"the image's init {init} is missing or not executable in the new root"
            )
        self.start_keeper(plan)
        self.release_old_root(plan)
        env = plan.init_env
        if self.console_staged:
            hermetic.drop_staged_console()
            self.console_staged = False
        if not self.machine_init:
            # A sandbox: the init is in a container (systemd reads this), and may make no
            # device node, so no raw host device either (we made our /dev already).
            env = {hermetic.CONTAINER_VARIABLE: hermetic.CONTAINER_NAME, **env}
            hermetic.drop_capability(hermetic.CAP_MKNOD)
        self.log(f"exec {plan.init_argv}")
        self.teach.pause("exec", execve_text(init, plan.init_argv))
        self.save_log()
        try:
            self.exec_clean(plan.init_argv, env)
        except FileNotFoundError as error:
            # The file is there (checked above): ENOENT names what it needs to run.
            raise StageError(
                f"execve({init}) failed with ENOENT although the file exists: its ELF "
                "interpreter (e.g. /lib64/ld-linux-x86-64.so.2) or its #! interpreter is "
                "missing in the new root"
            ) from error

    def start_keeper(self, plan: Plan) -> None:
        """Fork the keeper (initstage.keeper) if the plan gives it work: the SSH server to
        keep running, and what is left of the revert timer, which it takes over from this
        process's thread. It reboots only if the plan says machine and this is the
        machine's PID 1, as for the superblock remount."""
        timer, self.revert_timer = self.revert_timer, None
        settings = keeper.KeeperSettings(
            ssh_argv=tuple(plan.keeper_ssh_argv),
            revert_after_seconds=timer.stop() if timer is not None else 0.0,
            may_reboot=plan.machine and self.machine_init,
            boot_state_file=plan.boot_state_file,
        )
        if not settings.has_work:
            return
        try:
            pid = self.fork_keeper(settings)
        except OSError as error:
            if timer is not None and settings.revert_after_seconds:
                # The thread would die at the exec: the deadline stays with PID 1 instead.
                self.revert_timer = timer.restarted()
                raise StageError(
                    f"cannot fork the keeper ({error.strerror}): the revert timer would not"
                    " outlive the exec, so the image's init is not started"
                ) from error
            # The new system still starts: without a keeper, never into a recovery shell.
            self.log(f"warning: keeper: fork failed ({error}): no SSH server kept")
            return
        self.log(f"keeper: pid {pid}, logging to {keeper.LOG_PATH} and the kernel log")
        if self.machine_init:
            # It runs from this interpreter, whose files are on the old root.
            self.log(
                "keeper: the old root's devices stay busy while its revert timer runs (it ends"
                f" at the deadline or once {keeper.KEEP_FILE} exists; an SSH server left to"
                " keep then goes to the image's shell)"
            )
        if settings.revert_after_seconds:
            deadline = time.time() + settings.revert_after_seconds
            self.log(f"revert timer: {keeper.keep_instructions(deadline)}")

    def fork_keeper(
        self,
        settings: keeper.KeeperSettings,
        *,
        before_pivot: bool = False,
        root_fd: int | None = None,
    ) -> int:
        """The keeper in a child of its own. ``before_pivot``: a recovery's, which counts
        down in the old root reaching no file by its path (keeper.CountdownHost); its
        marker goes through ``root_fd``, the new root."""
        pid = os.fork()
        if pid == 0:
            try:
                if not self.machine_init:
                    hermetic.drop_capability(hermetic.CAP_MKNOD)
                reset_rlimits(lambda line: None)
                reset_signals()
                os.umask(0o022)
            finally:
                keeper.run(settings, before_pivot=before_pivot, root_fd=root_fd)
        self.keeper_pid = pid
        return pid

    def release_old_root(self, plan: Plan) -> None:
        """On the machine, say whether the old root's block devices will be free, which
        is what repartitioning needs. Until the exec this interpreter runs from them (its
        binary and libraries are mapped, and the fd kept for recovery is close-on-exec),
        so the question is who else holds them: anyone named here keeps them busy."""
        if not (plan.machine and self.machine_init):
            self.log("old root's devices: a sandbox shares them with the host: not checked")
            return
        for device in self.old_devices:
            state = device_state(device)
            if "busy" in state:
                others = users_of(device)
                state += (
                    "; used only by this stage, which lets go at the exec"
                    if not others
                    else f"; also used by {', '.join(others)}: it stays busy"
                )
            self.log(f"old root's device {device}: {state}")

    def exec_clean(self, argv: list[str], extra_env: dict[str, str]) -> NoReturn:
        """Hand the process over as a fresh init would find it: default signals, an empty
        mask, boot rlimits, umask 022, a clean environment and only fds 0, 1 and 2."""
        console_mode = self.plan.console if self.plan else "inherit"
        env = {
            "TERM": "linux" if console_mode == "vt" else os.environ.get("TERM", "linux"),
            "PATH": DEFAULT_PATH,
            **extra_env,
        }
        reset_rlimits(self.log)
        os.umask(0o022)
        if self.console.stdio is not None:
            for fd in (0, 1, 2):
                os.dup2(self.console.stdio, fd)
        # Close-on-exec rather than close: fds leaked by the old init go away at execve,
        # and if execve fails the log and the old root's fd are still there to recover.
        linux.close_range(3, cloexec=True)
        reset_signals()
        os.execve(argv[0], argv, env)

    # Step 8 -------------------------------------------------------------------------
    def save_log(self) -> None:
        """Copy the log into the new root, at its log_path, once we stand in it. Not
        before the pivot: the path would go through the image's symlinks, which may lead
        anywhere on this system (the kernel log has every line)."""
        if self.plan is None:
            return
        path = self.plan.log_path
        if not self.pivoted:
            self.log(
                f"log: not saved into the new root before the pivot ({path} there could"
                " lead anywhere through the image's symlinks); the kernel log has it"
            )
            return
        try:
            self.log.save(path)
        except OSError as error:
            self.log(f"warning: could not save the log to {path}: {error}")

    def recover(self, error: BaseException) -> None:
        """Name the failure, then give the operator a shell. Returns only if no shell
        could be started at all; the caller then stays alive forever."""
        if isinstance(error, (PlanError, StageError)):
            self.log(f"FAILED at step {self.step_number}/{STEPS}: {error}")
        else:
            self.log(f"FAILED at step {self.step_number}/{STEPS}:")
            for line in describe_error(error):
                self.log(line)
        self.step(8, "recovery shell")
        deadline_kept = self.keep_revert_timer()
        if self.machine_init and self.console.stdio is None:
            # It failed before step 2: our stdio is the old init's /dev/null.
            self.console = take_console("vt", False, self.log)
        self.save_log()
        # A shell exec'd as PID 1 would end the thread that may still keep the deadline.
        sandbox = deadline_kept and self.plan_says_sandbox()
        for where in self.recovery_roots():
            if not self.enter_root(where):
                continue
            self.log(f"recovery shell {RECOVERY_SHELL} from the {where}")
            if not sandbox:
                self.supervise_shell()
            try:
                self.exec_clean([RECOVERY_SHELL], {"PS1": "(dboot recovery) # "})
            except OSError as exec_error:
                self.log(f"recovery shell: {exec_error}")
        self.log("no recovery shell could be started: staying alive as PID 1")

    def keep_revert_timer(self) -> bool:
        """Hand a deadline this process still keeps (its thread) to a keeper process, which
        outlives both a hung PID 1 and a shell exec'd as a sandbox's PID 1. False when the
        thread must keep it (no fork): PID 1 must not exec then."""
        timer, self.revert_timer = self.revert_timer, None
        if timer is None:
            if self.keeper_pid is not None:
                self.log(f"recovery: the keeper (pid {self.keeper_pid}) goes on as it was")
            return True
        seconds = timer.stop()
        if not seconds:
            return True
        settings = keeper.KeeperSettings(revert_after_seconds=seconds, may_reboot=timer.may_reboot)
        try:
            pid = self.fork_keeper(settings, before_pivot=not self.pivoted, root_fd=timer.root_fd)
        except OSError as error:
            self.revert_timer = timer.restarted()
            self.log(
                f"recovery: cannot fork a keeper ({error}): PID 1's own thread keeps the revert"
                " timer, so the shell runs as a child"
            )
            return False
        then = "sync and reboot" if timer.may_reboot else f"leave {keeper.REVERT_DUE_FILE}"
        unless = (
            f"unless {keeper.KEEP_FILE} exists in the new root by then"
            if self.pivoted
            else f"unless it is killed (kill {pid}): before the pivot no keep file counts"
        )
        self.log(f"recovery: the keeper, pid {pid}, will {then} in {seconds:.0f} s, {unless}")
        return True

    def plan_says_sandbox(self) -> bool:
        """Only a plan we read and trusted can say "sandbox" (a rehearsal or a lab
        namespace, whose shell may end as PID 1 and so end the namespace), and /proc must
        agree. Without a plan nothing is known: the shell is supervised and respawned, as
        on the machine, because a PID 1 that exits there panics the kernel."""
        sandbox = self.plan is not None and not self.plan.machine and not self.machine_init
        self.log(
            "recovery: "
            + (
                "the plan says sandbox: the shell runs as this namespace's PID 1"
                if sandbox
                else "the shell runs as a child of PID 1 and is respawned when it exits"
                + ("" if self.plan is not None else " (no trusted plan)")
            )
        )
        return sandbox

    def recovery_roots(self) -> list[str]:
        """The root we stand in first (its shell works: its libraries are there), then
        the other one: after the pivot, the new root then the old; before it, the other
        way round."""
        if self.pivoted:
            return ["new root", "old root"]
        return ["old root", "new root"] if self.plan is not None else ["old root"]

    def enter_root(self, where: str) -> bool:
        try:
            if where == "old root" and self.pivoted:
                if self.old_root_fd is None:
                    return False
                os.fchdir(self.old_root_fd)
                os.chroot(".")
            elif where == "new root" and not self.pivoted and self.plan is not None:
                os.chroot(self.plan.new_root)
            os.chdir("/")
        except OSError as error:
            self.log(f"recovery: cannot enter the {where}: {error}")
            return False
        if os.access(RECOVERY_SHELL, os.X_OK):
            return True
        self.log(f"recovery: the {where} has no {RECOVERY_SHELL}")
        return False

    def supervise_shell(self) -> NoReturn:
        """On the real machine, keep PID 1 and run the shell as a child: an operator who
        types "exit" must get a new shell, not a kernel panic."""
        for attempt in range(1, sys.maxsize):
            try:
                pid = os.fork()
                if pid == 0:
                    self.become_console_session()
                    self.exec_clean([RECOVERY_SHELL], {"PS1": "(dboot recovery) # "})
                while os.waitpid(-1, 0)[0] != pid:
                    pass  # an orphan reparented to us; keep waiting for the shell
                # A shell with a dead console exits at once: log the first few, then rarely.
                if attempt <= 5 or attempt % 60 == 0:
                    self.log(f"recovery shell exited ({attempt}): another in {RESPAWN_DELAY:g} s")
            except BaseException as error:  # PID 1 must outlive everything
                if os.getpid() != 1:
                    os._exit(127)  # the child could not exec: never run the parent's loop
                self.log(f"recovery supervisor: {type(error).__name__}: {error}")
            time.sleep(RESPAWN_DELAY)
        stay_alive_forever()

    def become_console_session(self) -> None:
        """In the shell's child: the console on 0/1/2 as the controlling terminal, so that
        Ctrl-C and job control work."""
        if self.console.stdio is not None:
            for fd in (0, 1, 2):
                os.dup2(self.console.stdio, fd)
        try:
            os.setsid()
            linux.ioctl_int(0, linux.TIOCSCTTY, 1, "console")  # 1: take it from a dead session
        except OSError:
            pass  # no controlling terminal: the shell still works, without job control


class WriteMeter:
    """Sectors written by block devices (/sys/dev/block/M:m/stat): a device that still
    completes writes is slow, not stalled, and its flush deserves more time. A filesystem
    with no block device (NFS, FUSE) shows no progress: it gets the plain deadline."""

    def __init__(self) -> None:
        self.last: dict[str, int] = {}

    @staticmethod
    def written(device: str) -> int | None:
        fields = (_read_text(f"/sys/dev/block/{device}/stat") or "").split()
        return int(fields[6]) if len(fields) > 6 and fields[6].isdigit() else None

    def progressed(self, devices: list[str]) -> bool:
        moved = False
        for device in devices:
            now = self.written(device)
            if now is None:
                continue
            if device in self.last and now > self.last[device]:
                moved = True
            self.last[device] = now
        return moved


def _labels(outcome: Outcome) -> str:
    return ", ".join(result.label for result in outcome.unfinished)


def _syncfs_job(mount_point: str) -> Callable[[], str]:
    def job() -> str:
        linux.syncfs(mount_point)
        return ""

    return job


def _sync_job() -> str:
    os.sync()
    return ""


def _remount_job(mount: Mount, *, superblock: bool) -> Callable[[], str]:
    """A job remounting read-only (run in a child); on EBUSY it says what holds the
    filesystem. The superblock kind is refused here, in PID 1, unless this is the
    machine's PID 1: in any sandbox it would make the host's filesystem read-only."""
    flags = linux.MS_REMOUNT | linux.MS_RDONLY | mount.flags()
    if not superblock:
        flags |= linux.MS_BIND  # per mount: the superblock (shared with the host) is untouched
    elif not running_as_machine_init():
        raise StageError("refusing a superblock remount outside the machine's PID 1")

    def job() -> str:
        try:
            linux.mount(None, mount.mount_point, None, flags)
        except OSError as error:
            if error.errno != errno.EBUSY:
                raise
            raise OSError(error.errno, f"{error.strerror}; held by {holders(mount)}") from None
        return ""

    return job


def holders(mount: Mount, limit: int | None = 10) -> str:
    """What keeps a filesystem writable: loop devices and swap files backed by it, and
    processes with files on it open for writing (the first ``limit`` of those)."""
    device = os.makedev(*(int(part) for part in mount.device.split(":")))

    def on_it(path: str) -> bool:
        with contextlib.suppress(OSError):
            return os.stat(path).st_dev == device
        return False

    found: list[str] = []
    for name in sorted(os.listdir("/sys/block")) if os.path.isdir("/sys/block") else []:
        backing = _read_text(f"/sys/block/{name}/loop/backing_file")
        if backing and on_it(backing):
            found.append(f"{name} backed by {backing}")
    swaps = (_read_text("/proc/swaps") or "").splitlines()[1:]
    found += [f"swap {line.split()[0]}" for line in swaps if on_it(line.split()[0])]
    writers: list[str] = []
    for pid in (name for name in os.listdir("/proc") if name.isdigit()):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = f"/proc/{pid}/fd/{fd}"
                if not on_it(link):
                    continue
                fdinfo = (_read_text(f"/proc/{pid}/fdinfo/{fd}") or "").split()
                with contextlib.suppress(IndexError, ValueError, OSError):
                    if int(fdinfo[3], 8) & os.O_ACCMODE != os.O_RDONLY:
                        writer = f"pid {pid} ({_read_text(f'/proc/{pid}/comm')}) writing"
                        writer += f" {os.readlink(link)}"
                        if writer not in writers:
                            writers.append(writer)
    shown = writers if limit is None else writers[:limit]
    found += shown
    if len(writers) > len(shown):
        found.append(f"and {len(writers) - len(shown)} more open files")
    return ", ".join(found) or "nothing found in /proc, loop devices or swap"


def device_state(device: str) -> str:
    """Whether block device ``major:minor`` is free: an O_EXCL open fails while anything
    (a mount, a dm or md device on top, a swap) holds it."""
    sysfs = f"/sys/dev/block/{device}"
    uevent = _read_text(f"{sysfs}/uevent") or ""
    name = next((line[8:] for line in uevent.splitlines() if line.startswith("DEVNAME=")), "")
    if not name:
        return "not a block device the kernel lists (no DEVNAME): not checked"
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        if error.errno != errno.EBUSY:
            return f"/dev/{name} not checked ({error.strerror})"
        try:
            users = ", ".join(sorted(os.listdir(f"{sysfs}/holders"))) or "a mount or swap"
        except OSError:
            users = "a mount or swap"
        return f"/dev/{name} still busy (held by {users})"
    os.close(fd)
    return f"/dev/{name} free (opens with O_EXCL)"


def users_of(device: str) -> list[str]:
    """Other processes whose root, cwd, executable, open files or mapped files are on
    block device ``major:minor`` (map_files: the paths no longer resolve after the pivot)."""
    wanted = os.makedev(*(int(part) for part in device.split(":")))
    own = str(os.getpid())
    users = []
    for pid in (name for name in os.listdir("/proc") if name.isdigit() and name != own):
        links = [f"/proc/{pid}/{name}" for name in ("root", "cwd", "exe")]
        for directory in ("fd", "map_files"):
            with contextlib.suppress(OSError):
                links += [
                    f"/proc/{pid}/{directory}/{entry}"
                    for entry in os.listdir(f"/proc/{pid}/{directory}")
                ]
        for link in links:
            with contextlib.suppress(OSError):
                if os.stat(link).st_dev == wanted:
                    users.append(f"pid {pid} ({_read_text(f'/proc/{pid}/comm')})")
                    break
    return users


def root_is_initramfs() -> bool:
    """/ is the kernel's rootfs (ramfs or tmpfs, unpacked from an initramfs)."""
    try:
        root = mount_of("/", read_mounts())
        if root is not None and root.fstype == "rootfs":
            return True
        return linux.statfs_type("/") == linux.RAMFS_MAGIC
    except OSError:
        return False


def _readlink_or_none(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as text_file:
            return text_file.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


# While a revert is pending, a kernel panic (the new init exiting is one) restarts the machine
# after this many seconds, into the old system, instead of leaving it down: Debian's default
# kernel.panic is 0, "hang forever". The new system may set its own.
PANIC_RESTART_SECONDS = 10


def panic_restarts(log: Callable[[str], None]) -> None:
    try:
        with open("/proc/sys/kernel/panic", "w") as panic:
            panic.write(str(PANIC_RESTART_SECONDS))
    except OSError as error:
        log(f"warning: kernel.panic not set ({error}): a panic would leave the machine down")
        return
    log(f"kernel.panic = {PANIC_RESTART_SECONDS}: a kernel panic restarts into the old system")


def stay_alive_forever() -> NoReturn:
    """The last resort of PID 1: reap whatever dies, forever. Nothing gets out of here."""
    while True:
        try:
            os.waitpid(-1, 0)
        except BaseException:  # ECHILD, KeyboardInterrupt, anything at all
            with contextlib.suppress(BaseException):
                time.sleep(1.0)


def refuse_unless_pid1() -> int | None:
    """The very first check, before anything else happens: the stage kills every process
    and pivots the root; as anything but PID 1 that would wreck the machine."""
    if os.getpid() == 1:
        return None
    os.write(
        2,
        f"dboot-stage: refusing to run as pid {os.getpid()}: the init stage only runs as PID 1,"
        " after dboot's injection (use `dboot rehearse` to try it safely)\n".encode(),
    )
    return 1


def main(argv: list[str]) -> int:
    refusal = refuse_unless_pid1()
    if refusal is not None:
        return refusal
    log = StageLog()
    stage: Stage | None = None
    try:
        log.add_sink(2)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-Alt-Del must not raise mid-step
        sys.meta_path.insert(0, ImportGuard(log))
        if len(argv) != 1:
            raise StageError(f"usage: initstage PLAN_PATH (got {len(argv)} arguments)")
        stage = Stage(argv[0], log)
        stage.run()
    except BaseException as error:  # PID 1 must never raise out of main
        try:
            if stage is None:
                stage = Stage("", log)
            stage.recover(error)
        except BaseException as recovery_error:
            with contextlib.suppress(BaseException):
                log(f"recovery failed: {type(recovery_error).__name__}: {recovery_error}")
    stay_alive_forever()
