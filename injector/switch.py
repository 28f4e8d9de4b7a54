"""The ordered steps of a switch, as a stream of typed events.

Both front-ends drive ``run(options)`` and render what it yields; neither holds logic of its
own. Everything up to the injection is reversible: a failure or Ctrl-C before it unmounts
the RAM root in the target's mount namespace and leaves the target untouched.

A rehearsal, a ``--target-pid`` lab run and the real switch take the very same path; they
differ only in which PID 1 is the target and in which host-only checks apply.

The point of no return is the register swap inside the injection (see ``injector.inject.ptrace``):
before it, every failure and every ending signal (SIGINT, SIGTERM, SIGHUP, a write to a
vanished terminal failing with EIO) unmounts the RAM root, removes the plan and turns disk
swap back on, and the log file (``injector.runlog``) says what was undone. From it on,
nothing is undone: PID 1 may be executing the stage, which needs both.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib.util
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from initstage import linux
from initstage.console import VT_NUMBER
from initstage.launch import StageLaunchError, stage_argv, stage_files
from initstage.plan import (
    DEFAULT_GRACE_SECONDS,
    DEFAULT_REMOTE_REVERT_MINUTES,
    MAX_GRACE_SECONDS,
    MAX_REVERT_MINUTES,
    MIN_REVERT_MINUTES,
    Plan,
    write_plan,
)
from injector import check, labmode
from injector.access.carry import carry_network, carry_ssh
from injector.access.facts import (
    carry_verdicts,
    read_network,
    revert_notices,
    ssh_keeper_notices,
)
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal, add_note
from injector.events import (
    Console,
    ConsoleAttached,
    Event,
    Fact,
    Finished,
    Log,
    Notice,
    Progress,
    StepDone,
    StepFailed,
    StepStarted,
)
from injector.image.imageindex import ImageIndex
from injector.image.sources import ImageSource, open_source
from injector.inject import nsenter
from injector.preflight import preflight, procinfo
from injector.ramroot import statedir
from injector.ramroot.kmodules import ModulesFacts, add_kernel_modules
from injector.ramroot.rootfs import RamRoot, add_host_files
from injector.rootonly import first_not_root_only
from injector.runlog import RunLog, default_log_file
from injector.signals import ending_signals_raise, signals_deferred
from injector.stop import step as stopping
from injector.stop.plan import DEFAULT_STOP_MODE, StopMode, check_stop_options
from injector.testhooks import pause_point

if TYPE_CHECKING:
    # Imported where they are used, by the runs that need them: start-up time.
    from injector import teach
    from injector.access import sshcheck
    from injector.inject import ptrace
    from injector.rehearsal.sandbox import Sandbox

DEFAULT_STATE_DIR = Path("/run/dboot")
PLAN_NAME = "plan.json"  # in the run's own subdirectory of the state dir
STOP_POLL_SECONDS = 0.1

Mode = Literal["switch", "target", "rehearse"]


@dataclasses.dataclass
class SwitchOptions:
    image: str
    init_argv: list[str]
    state_dir: Path = DEFAULT_STATE_DIR
    grace: float = DEFAULT_GRACE_SECONDS
    tmpfs_size: int | None = None
    api_mounts: bool = True
    # The running kernel's modules and firmware go into the new root (--no-modules: not).
    modules: bool = True
    # The host's SSH host keys and authorized_keys go into the new root (--no-carry: not).
    carry: bool = True
    # The keeper in the new system (initstage.keeper): ``ssh`` runs the image's SSH server and
    # restarts it; ``revert_after`` (minutes) reboots into the old system unless
    # /run/dboot/keep exists by then (None: 10 minutes for a remote session's real switch,
    # else none); ``no_revert``: no timer, whatever the session.
    ssh: bool = False
    revert_after: float | None = None
    no_revert: bool = False
    dry_run: bool = False
    target_pid: int | None = None
    rehearse: bool = False
    docker_host: str | None = None
    force: bool = False
    # Asked after the preflight passed, before anything is changed on a real switch. The CLI
    # prompts for the hostname; the wizard has its own modal and passes ``yes=True``.
    confirm: Callable[[preflight.Report], bool] | None = None
    yes: bool = False
    # --ssh-check PORT: the image's sshd runs in the RAM root on PORT before the injection, and
    # the run goes on once a login there succeeded or ``ssh_check_go`` says go (see sshcheck).
    ssh_check: int | None = None
    ssh_check_go: sshcheck.GoCallback | None = None
    # Called just before the point of no return on a real switch: "this terminal will close".
    last_words: Callable[[str], None] | None = None
    # The rehearsal sandbox's stand-in services: a count of the default mix, or explicit kinds.
    services: int = 3
    service_kinds: list[str] | None = None
    # The graceful stop (issue 19; not ``stop``, the rehearsal's end below): "graceful" has the
    # host's init (a rehearsal's stand-in) stop its services its own way before the injection,
    # "signal" leaves them to the stage's signals. ``stop_timeout`` bounds that whole stop
    # (None: what the units allow, at most 5 minutes).
    service_stop: StopMode = DEFAULT_STOP_MODE
    stop_timeout: float | None = None
    # "capture": the sandbox's console comes back as Console events (wizard, --json, pipes);
    # "relay": the sandbox gets this terminal, so a rehearsed shell can be used by hand.
    # "pty": the sandbox gets a pty of its own, whose master end a ConsoleAttached event
    # hands to the front-end (the wizard's console widget).
    console: Literal["capture", "relay", "pty"] = "capture"
    # Set by a front-end to end a rehearsal (its init may never exit): the sandbox and
    # everything in it is killed, and the run finishes as rehearsed with status 0.
    stop: threading.Event | None = None
    # The host's record of the run (not written by rehearsals); None: no log file.
    log_file: Path | None = dataclasses.field(default_factory=default_log_file)
    # An image a check already opened and read (the wizard's): the run copies from it
    # instead of reading the image again. Whoever opened it closes it.
    source: ImageSource | None = None
    # A teaching rehearsal: called before each step (host and stage) with what it does, in
    # the run's worker threads; the run waits until it returns. Rehearsals only.
    pause: teach.PauseHook | None = None

    def __post_init__(self) -> None:
        """Every rule about the options alone, checked up front: before any image is read."""
        preflight.check_init_argv(self.init_argv)
        statedir.check_state_dir_path(Path(self.state_dir))
        check_stop_options(self.service_stop, self.stop_timeout)
        if self.pause is not None and not self.rehearse:
            raise SafetyRefusal(
                "teaching pauses are for rehearsals: a real switch never waits on a UI",
                "rehearse to learn step by step, or switch without --teach",
            )
        if not (math.isfinite(self.grace) and 0 <= self.grace <= MAX_GRACE_SECONDS):
            raise BadInput(
                f"grace period {self.grace:g} s is not between 0 and {MAX_GRACE_SECONDS:.0f} s",
                f"give --grace in seconds, from 0 to {MAX_GRACE_SECONDS:.0f}",
            )
        if self.revert_after is not None:
            if self.no_revert:
                raise BadInput("--revert-after and --no-revert contradict", "give only one")
            _check_revert_minutes(self.revert_after)
        if self.ssh_check is not None:
            from injector.access import sshcheck  # --ssh-check runs only: start-up time

            sshcheck.check_port(self.ssh_check)

    @property
    def mode(self) -> Mode:
        if self.rehearse:
            return "rehearse"
        return "target" if self.target_pid is not None else "switch"

    def revert_minutes(self, remote: bool) -> float | None:
        """The revert timer this run asks of the keeper: the one given, else 10 minutes for a
        real switch from a remote session, whose user may not get back in otherwise."""
        if self.no_revert:
            return None
        if self.revert_after is not None:
            return self.revert_after
        return DEFAULT_REMOTE_REVERT_MINUTES if remote and self.mode == "switch" else None


def _check_revert_minutes(minutes: float) -> None:
    if 0 < minutes < MIN_REVERT_MINUTES:
        raise BadInput(
            f"revert timer {minutes:g} min is too short: the new system would revert before"
            " anyone could log in and keep it",
            f"give --revert-after in minutes, at least {MIN_REVERT_MINUTES:g}, e.g. 10",
        )
    if not MIN_REVERT_MINUTES <= minutes <= MAX_REVERT_MINUTES:  # nan and inf too
        raise BadInput(
            f"revert timer {minutes:g} min is not between {MIN_REVERT_MINUTES:g} and"
            f" {MAX_REVERT_MINUTES:g} min",
            "give --revert-after in minutes, e.g. 10 (fractions too: 2.5)",
        )


def require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentFailure(
            "dboot needs root (mounts, namespaces and ptrace)", "run it again with sudo"
        )


def _refuse_in_lab_mode(options: SwitchOptions) -> None:
    # The real PID 1 of this machine: refused outright in lab mode, before anything else runs.
    # --target-pid 1, or any PID 1 of our own PID namespace, is that machine's PID 1 too.
    hits_our_pid1 = options.mode == "switch" or (
        options.target_pid is not None and _is_our_namespaces_pid1(options.target_pid)
    )
    if hits_our_pid1 and not options.dry_run:
        labmode.refuse("this machine's PID 1 will not be replaced")


def _is_our_namespaces_pid1(pid: int) -> bool:
    if pid == 1:
        return True
    try:
        if procinfo.namespace_of(pid, "pid") != procinfo.namespace_of("self", "pid"):
            return False
    except OSError:
        return False  # no such process: the injection step names that
    return procinfo.is_pid1_of_its_namespace(pid)


# Runs whose consumer stopped iterating without closing them (an exception in the front-end,
# say a write to a vanished terminal): closed at exit, so that their undo still runs.
_unfinished_runs: weakref.WeakSet[Generator[Event, None, None]] = weakref.WeakSet()


@atexit.register
def _close_unfinished_runs() -> None:
    for events in list(_unfinished_runs):
        with contextlib.suppress(Exception):
            events.close()


def run(options: SwitchOptions) -> Iterator[Event]:
    """Perform (or rehearse, or dry-run) a switch, yielding events as it goes.

    Nothing runs until the first event is asked for. A consumer that stops early should
    close the iterator (``contextlib.closing``) to have the undo run at once; one that does
    not gets it when the generator is collected, at the latest when the process exits."""
    events = _logged_run(options)
    _unfinished_runs.add(events)
    return events


def _logged_run(options: SwitchOptions) -> Generator[Event, None, None]:
    """``_run``'s events, each also written to the log file (not for rehearsals)."""
    runlog = RunLog(options.log_file if options.mode != "rehearse" else None)
    runlog.write(f"start: {options.mode} {options.image} {' '.join(options.init_argv)}")
    open_step: str | None = None  # started and not done: the step an error ends
    try:
        with ending_signals_raise():
            for event in _run(options, runlog):
                if isinstance(event, (StepStarted, StepDone)):
                    open_step = event.step if isinstance(event, StepStarted) else None
                runlog.event(event)
                yield event
                if runlog.problem and runlog.problem != "said":
                    yield Notice("warning", "log-file", runlog.problem, "see the events instead")
                    runlog.problem = "said"
    except Exception as error:
        if open_step is not None:  # Ctrl-C and hang-ups end a run, they fail no step
            failed = StepFailed(open_step, str(error))
            runlog.event(failed)
            yield failed
        runlog.write(f"ended: {type(error).__name__}: {error}")
        raise
    except BaseException as error:
        runlog.write(f"ended: {type(error).__name__}: {error}")
        raise
    finally:
        runlog.close()


def _run(options: SwitchOptions, runlog: RunLog) -> Iterator[Event]:
    _refuse_in_lab_mode(options)
    require_root()
    # Rehearsals take no lock: their sandbox sees only a private tmpfs over their own
    # subdirectory of the state dir, so they cannot disturb a switch, nor one another.
    with statedir.StateDir(options.state_dir, lock=options.mode != "rehearse") as state:
        yield from _stale_runs_notices(state.path)
        yield from _run_in_state_dir(options, runlog, state.work_dir)


def _stale_runs_notices(state_dir: Path) -> Iterator[Event]:
    """What a SIGKILLed run left in the state dir: this run works beside it, and says so."""
    for stale, pid in statedir.stale_runs(state_dir):
        yield Notice(
            "warning",
            "state-dir-leftover",
            f"{stale} was left by dboot pid {pid}, which is gone (killed?); a RAM root may"
            " still be mounted in it",
            f"umount -l {stale}/root, then rm -r {stale}",
        )


def _run_in_state_dir(options: SwitchOptions, runlog: RunLog, work_dir: Path) -> Iterator[Event]:
    opened = (
        contextlib.nullcontext(options.source)
        if options.source is not None
        else open_source(options.image, options.docker_host)
    )
    teacher = None
    if options.pause is not None:
        from injector import teach  # teaching rehearsals only: start-up time

        teacher = teach.Teacher(options.pause)
    with opened as source:
        if teacher is not None:
            teacher(teach.Pause("host", "source", teach.source_call(options.image)))
        yield StepStarted("source", f"Reading image {options.image}")
        index = (yield from check.read_image(source, options.init_argv)).index
        yield StepDone("source", f"{index.file_count} files, init {options.init_argv[0]} found")

        if options.mode == "rehearse":
            # The sandbox mounts a private tmpfs over this run's subdirectory: on the host it
            # stays an empty directory, which leaving the state dir removes.
            from injector import teach  # its stage listener: rehearsals only, start-up time
            from injector.rehearsal.sandbox import SHARED_WITH_HOST, Sandbox

            with (
                Sandbox(
                    services=options.services,
                    console=options.console,
                    kinds=options.service_kinds,
                ) as sandbox,
                teach.stage_listener(teacher, sandbox.pid, work_dir) as listener,
            ):
                yield Log(f"sandbox PID 1 is host pid {sandbox.pid}")
                yield Notice("info", "rehearsal-isolation", SHARED_WITH_HOST)
                if sandbox.console == "pty":
                    yield ConsoleAttached(sandbox.take_terminal())
                yield from _switch_target(
                    _TargetRun(
                        options, source, index, sandbox.pid, sandbox, runlog, work_dir,
                        teacher=teacher, listener=listener,
                    )
                )  # fmt: skip
        else:
            target = options.target_pid if options.target_pid is not None else 1
            yield from _switch_target(
                _TargetRun(options, source, index, target, None, runlog, work_dir)
            )


@dataclasses.dataclass
class _TargetRun:
    """One run against one target PID 1: what the steps of :func:`_switch_target` share."""

    options: SwitchOptions
    source: ImageSource
    index: ImageIndex
    target: int
    sandbox: Sandbox | None
    runlog: RunLog
    work_dir: Path
    teacher: teach.Teacher | None = None
    listener: teach.StageListener | None = None
    # Set by the preflight: the image's SSH server for the keeper, the revert timer.
    keeper_ssh: list[str] = dataclasses.field(default_factory=list)
    revert_minutes: float | None = None

    @property
    def mode(self) -> Mode:
        return self.options.mode


def _switch_target(run: _TargetRun) -> Iterator[Event]:
    """The steps against one target, in order: each is a function of its own below."""
    _refuse_a_target_that_is_not_a_pid1(run)
    report = yield from _preflight(run)

    # The confirmation: the last moment a real switch can be called off cheaply.
    options = run.options
    if run.mode == "switch" and not options.dry_run and not _confirmed(options, report):
        raise SafetyRefusal("switch not confirmed", "type the hostname, or pass --yes")

    # From here until the commit point inside the injection, any failure or ending signal
    # undoes what the steps did (disk swap, RAM root and plan, stopped services): the
    # target is left exactly as it was.
    undo = _Undo(run.runlog)
    with _undone_before_the_commit(run, undo):
        yield from _disk_swap_off(run, report, undo)
        undo.namespace_pid = yield from _namespace_to_prepare_in(run)
        yield from _copy_into_a_ram_root(run, report, undo)
        if options.dry_run:
            for line in undo.run("dry run"):
                yield Log(line)
            yield Finished("dry-run", detail="stopped before the injection; everything undone")
            return
        injection = yield from _stop_and_inject(run, undo)

    # Past the point of no return: the target now runs the init stage.
    target = run.target
    yield injection.to_event()
    yield StepDone("inject", f"pid {target} was in {injection.interrupted_syscall}; now the stage")
    if run.sandbox is not None:
        yield from _relay_until_exit(run.sandbox, options.stop)
    elif run.mode == "target":
        yield Finished("injected", detail=f"pid {target} now runs the init stage")
    else:
        yield Finished("switched")


def _refuse_a_target_that_is_not_a_pid1(run: _TargetRun) -> None:
    """Only the machine's own PID 1 is taken on trust; a lab or sandbox target must be the
    PID 1 of its namespace, or the stage would refuse to run there (getpid() != 1)."""
    if run.mode != "switch" and not procinfo.is_pid1_of_its_namespace(run.target):
        raise EnvironmentFailure(
            f"pid {run.target} is not PID 1 of its own PID namespace",
            "--target-pid must name the PID 1 of a namespace (see NSpid in /proc/PID/status)",
        )


def _preflight(run: _TargetRun) -> Generator[Event, None, preflight.Report]:
    """Facts first, then verdicts; the blockers that apply to this mode stop the run here,
    before anything is changed."""
    options, mode, target, sandbox = run.options, run.mode, run.target, run.sandbox
    run.keeper_ssh = keeper_ssh_argv(run.index) if options.ssh else []
    if run.teacher is not None:
        from injector import teach  # teaching rehearsals only: start-up time

        run.teacher(teach.Pause("host", "preflight", teach.preflight_call(target), target))
    yield StepStarted("preflight", "Checking RAM, swap, processes and PID 1")
    report = check.gather(
        run.source,
        run.index,
        options.init_argv,
        target_pid=target,
        tmpfs_size=options.tmpfs_size,
        modules=options.modules,
        stop_mode=options.service_stop,
        stop_timeout=options.stop_timeout,
        stop_kinds=sandbox.kinds if sandbox is not None else None,
    )
    remote = report.session.remote and mode == "switch"
    revert = run.revert_minutes = options.revert_minutes(remote)
    image_init = report.access.image_init if report.access is not None else None
    preflight.add_notices(
        report,
        carry_verdicts(remote, options.carry, revert)
        + revert_notices(revert)
        + ssh_keeper_notices(run.keeper_ssh, image_init),
    )
    yield from preflight.report_events(report)
    yield Fact("keeper", "ssh_argv", run.keeper_ssh)
    yield Fact("keeper", "revert_after_minutes", revert)
    blocking = blockers(report, mode)
    # No --force can make the kernel allow an attach: that is the environment, exit 2.
    denied = [n for n in blocking if n.code == "ptrace-denied"]
    if denied and not options.dry_run:
        raise EnvironmentFailure(denied[0].message, denied[0].fix or None)
    if blocking and not options.force:
        names = ", ".join(n.code for n in blocking)
        raise SafetyRefusal(f"preflight found blockers: {names}", "fix them, or pass --force")
    yield StepDone(
        "preflight", f"{len(blocking)} blockers, {_count_warnings(report, mode)} warnings"
    )
    return report


@contextlib.contextmanager
def _undone_before_the_commit(run: _TargetRun, undo: _Undo) -> Iterator[None]:
    """Whatever ends the steps inside (an error, an ending signal, a front-end that stops
    reading) undoes them, unless the injection got past its commit point: then PID 1 may
    be running the stage, which needs the RAM root and the plan, and they stay."""
    try:
        yield
    except BaseException as error:
        if undo.committed:
            run.runlog.write(
                f"committed: PID {run.target} may be running the init stage; the RAM root and "
                f"the plan stay ({type(error).__name__}: {error})"
            )
        else:
            undo.run_before_commit(error)
        raise


def _disk_swap_off(run: _TargetRun, report: preflight.Report, undo: _Undo) -> Iterator[Event]:
    """Disk swap's pages must come back into RAM while the old disk is still there."""
    if run.mode != "switch" or run.options.dry_run:
        return
    yield StepStarted("swap", "Turning off disk swap")
    try:
        undo.swaps = preflight.swapoff_disk_swaps(report)
    except BaseException:
        undo.swaps = _swaps_off_now(report)  # those turned off before the failure
        raise
    yield StepDone("swap", ", ".join(undo.swaps) or "no disk swap in use")


def _namespace_to_prepare_in(run: _TargetRun) -> Generator[Event, None, int]:
    """The PID whose mount namespace gets the RAM root and the plan: the target's, where
    its stage will look for them."""
    try:
        nsenter.shares_mount_namespace(run.target)
    except EnvironmentFailure as error:
        if not run.options.dry_run:
            raise
        # Some hosts hide PID 1's namespaces even from root (the same hosts deny its
        # ptrace). A dry run still walks every step, in our own mount namespace, and says so.
        yield Notice("warning", "namespace-hidden", f"{error.cause}; dry run prepared in ours")
        return os.getpid()
    return run.target


def _copy_into_a_ram_root(
    run: _TargetRun, report: preflight.Report, undo: _Undo
) -> Iterator[Event]:
    """The image, the kernel's modules, the carried files and the plan, in a tmpfs made in
    the target's mount namespace; then, with --ssh-check, a login into it."""
    options, work_dir, tmpfs_size = run.options, run.work_dir, report.ram.tmpfs_size
    assert undo.namespace_pid is not None
    if run.teacher is not None:
        from injector import teach  # teaching rehearsals only: start-up time

        call = teach.copy_call(work_dir / "root", tmpfs_size)
        run.teacher(teach.Pause("host", "copy", call, run.target))
    yield StepStarted("ramroot", f"Copying the image into a {tmpfs_size >> 20} MiB tmpfs")
    prepare = _Prepare(options, run.source, tmpfs_size, work_dir, run.mode, report.modules)
    prepare.keeper_ssh, prepare.revert_minutes = run.keeper_ssh, run.revert_minutes
    if run.mode != "switch":
        prepare.sandbox_netns = _own_network_namespace(run.target)
    if run.listener is not None:
        prepare.teach_socket = str(run.listener.stage_path)
    prepared = nsenter.stream_in_mount_namespace(undo.namespace_pid, prepare)
    used = yield from _noting_what_is_made(prepared, undo)
    estimate = report.ram.estimated_bytes  # the image, the kernel's modules and firmware
    yield Fact("ram", "actual_bytes", used)
    yield Fact("ram", "estimate_error", round((estimate - used) / max(used, 1), 4))
    yield StepDone("ramroot", f"{used >> 20} MiB used in the tmpfs")
    if options.ssh_check is not None:
        from injector.access import sshcheck  # --ssh-check runs only: start-up time

        go = options.ssh_check_go
        root = work_dir / "root"
        yield from sshcheck.proof(undo.namespace_pid, root, options.ssh_check, report.access, go)


def _stop_and_inject(
    run: _TargetRun, undo: _Undo
) -> Generator[Event, None, ptrace.InjectionReport]:
    """The host's services stopped their own way, then the execve into the target: the
    last two steps, the second one with the commit point inside."""
    if run.listener is not None:
        run.listener.start()  # in the sandbox's state dir, mounted by the copy
    python, argv, envp = _stage_command(run.target, run.work_dir / PLAN_NAME)
    yield from _stop_services(run.options, run.target, run.sandbox, undo, run.teacher)
    yield StepStarted("inject", f"Injecting execve into pid {run.target}")
    if run.mode == "switch" and run.options.last_words is not None:
        run.options.last_words(
            f"Point of no return: {socket.gethostname()}'s PID 1 is about to become the "
            f"dboot init stage. This terminal will now close; watch VT {VT_NUMBER} or the "
            "serial console." + _keeper_words(run.keeper_ssh, run.revert_minutes)
        )
    return (yield from _inject_live(run.target, python, argv, envp, undo, run.teacher))


def keeper_ssh_argv(index: ImageIndex) -> list[str]:
    """The command that runs the image's SSH server in the foreground, logging to stderr;
    BadInput if the image has none (``--ssh`` is refused before anything is changed)."""
    for path in preflight.SSH_SERVER_PATHS:
        if index.executable(path):
            if "dropbear" not in path:
                return [path, "-D", "-e"]
            multicall = ["dropbear"] if path.endswith("multi") else []
            return [path, *multicall, "-F", "-E", "-R"]
    raise BadInput(
        "--ssh: the image has no SSH server (no sshd nor dropbear in /usr/sbin, /usr/bin, /sbin)",
        "install openssh-server or dropbear in the image (make rescue-image builds one)",
    )


def _keeper_words(ssh_argv: list[str], revert_minutes: float | None) -> str:
    """The last lines' part about the keeper: what runs, and how to keep the new system."""
    words = f" The new system runs {ssh_argv[0]}, restarted if it dies." if ssh_argv else ""
    if revert_minutes is not None:
        from initstage.keeper import keep_instructions  # a real switch's last words only

        deadline = time.time() + revert_minutes * 60
        words += f" Revert timer of {revert_minutes:g} min: {keep_instructions(deadline)}."
    return words


def _confirmed(options: SwitchOptions, report: preflight.Report) -> bool:
    if options.yes:
        return True
    return options.confirm is not None and options.confirm(report)


def blockers(report: preflight.Report, mode: Mode) -> list[Notice]:
    """The report's blockers that stop a run of this mode.

    A rehearsal's target is a sandbox: the host's own processes, swap and session are facts
    to learn from there, and so is a verdict about the host's PID 1 (the wizard shows the
    host's report, while the rehearsal injects into the sandbox's PID 1)."""
    return [n for n in report.notices if n.level == "blocker" and _applies(n, mode)]


def _applies(notice: Notice, mode: Mode) -> bool:
    return mode != "rehearse" or notice.scope != "host"


def _count_warnings(report: preflight.Report, mode: Mode) -> int:
    return sum(1 for n in report.notices if n.level == "warning" and _applies(n, mode))


def _own_network_namespace(pid: int) -> str:
    """The network namespace of a sandbox's (or lab's) PID 1 when it has one of its own,
    else "": read here, in our own /proc, before anything enters the target's mounts."""
    theirs = procinfo.namespace_of(pid, "net")
    return "" if theirs == procinfo.namespace_of("self", "net") else theirs


@dataclasses.dataclass
class _Prepare:
    """Runs in the target's mount namespace: this run's subdirectory of the state dir, and in
    it the tmpfs, copy-in, host files, plan."""

    options: SwitchOptions
    source: ImageSource
    tmpfs_size: int
    work_dir: Path  # made here, afresh: see injector.ramroot.statedir
    mode: Mode
    modules: ModulesFacts | None = None  # the kernel's modules and firmware to add
    keeper_ssh: list[str] = dataclasses.field(default_factory=list)
    revert_minutes: float | None = None
    teach_socket: str = ""  # a teaching rehearsal: where the stage asks for each go
    # The network namespace whose addresses the stage may keep across its kill phase: a
    # sandbox's own, or "" (the machine's stage keeps the machine's; a namespace sharing ours
    # must never touch the host's network).
    sandbox_netns: str = ""

    def __call__(self, send: Callable[[Event | _DirsMade], None]) -> int:
        made = statedir.make_work_dir(self.work_dir)
        try:
            send(_DirsMade([str(path) for path in made]))
            send(Log(f"this run works in {self.work_dir} (made for it, mode 0700)"))
            return self._fill(send)
        except BaseException:
            statedir.remove_dirs(made)
            raise

    def _fill(self, send: Callable[[Event], None]) -> int:
        state_dir = self.work_dir
        if self.mode == "rehearse":
            # A private tmpfs over the state dir keeps the plan out of the host's /run: it
            # vanishes with the sandbox's mount namespace, so a rehearsal leaves nothing behind.
            nsenter.mount_private_state_dir(state_dir)
        root = RamRoot(state_dir, self.tmpfs_size)
        with root:
            last_sent = 0

            def progress(done: int, total: int) -> None:
                nonlocal last_sent
                if done - last_sent >= 4 << 20 or done >= total:
                    last_sent = done
                    send(Progress("ramroot", done, total))

            self.source.copy_into(root.path, progress)
            pause_point("copy")
            for added in add_host_files(root.path):
                send(Log(f"added host file {added}"))
            # Not in a rehearsal: its sandbox is no machine anyone logs in to. A --target-pid
            # run is the lab of a real switch, and the keys stay in its root-only state dir.
            if self.options.carry and self.mode != "rehearse":
                interfaces, routes, _state = read_network()
                for line in carry_ssh(root.path) + carry_network(root.path, interfaces, routes):
                    send(Log(f"carry-over: {line}"))
            if self.modules is not None:
                for line in add_kernel_modules(root.path, self.modules):
                    send(Log(f"added {line}"))
            plan = Plan(
                new_root=str(root.path),
                init_argv=list(self.options.init_argv),
                init_env={},
                console="vt" if self.mode == "switch" else "inherit",
                grace_seconds=self.options.grace,
                api_mounts=self.options.api_mounts,
                minimal_dev=self.mode != "switch",
                # Only the machine's own PID 1 may remount the old filesystems read-only for
                # real (superblocks are shared with the host); a namespace's stage does it per
                # mount. The stage checks /proc agrees before it believes this.
                machine=self.mode == "switch",
                keeper_ssh_argv=self.keeper_ssh,
                revert_after_seconds=(self.revert_minutes or 0.0) * 60,
                teach_socket=self.teach_socket if self.mode == "rehearse" else "",
                sandbox_netns=self.sandbox_netns,
            )
            plan_path = state_dir / PLAN_NAME
            write_plan(plan, plan_path)
            send(Log(f"plan written to {plan_path}"))
            pause_point("prepared")
            used = root.used_bytes()
            root.keep()
        return used


@dataclasses.dataclass(frozen=True)
class _DirsMade:
    """The prepare's word, as soon as it made them, of the directories this run made (its
    own subdirectory last): ``_noting_what_is_made`` hands it to the undo, no front-end."""

    paths: list[str]


def _noting_what_is_made(
    prepared: nsenter.Streamed[int], undo: _Undo
) -> Generator[Event, None, int]:
    """The prepare's events as they come, but what it made goes to ``undo``: the undo then
    takes away that and nothing else (never another run's RAM root or plan)."""
    events = prepared.__iter__()
    try:
        for event in events:
            if isinstance(event, _DirsMade):
                undo.dirs_made = [Path(path) for path in event.paths]
            else:
                yield event
    finally:
        events.close()  # stopped early: the prepare is cancelled, its own clean-up runs
    return prepared.value


@dataclasses.dataclass
class _Undo:
    """What a run changed before the commit point, and how to take it back."""

    runlog: RunLog
    swaps: list[str] = dataclasses.field(default_factory=list)  # disk swap we turned off
    namespace_pid: int | None = None  # where the RAM root and the plan are being made
    # The directories this run made there, outermost first, its own subdirectory last.
    dirs_made: list[Path] = dataclasses.field(default_factory=list)
    committed: bool = False  # set from the injection thread at the register swap
    # The graceful stop's undo: the init starts again what it stopped (injector.stop.step).
    services: Callable[[], list[str]] | None = None

    def run(self, why: str) -> list[str]:
        """Undo everything, logging why and what; returns the lines logged."""
        self.runlog.write(f"undoing ({why}); nothing was injected")
        lines = []
        with signals_deferred():  # a second Ctrl-C must not cut the undo in half
            if self.namespace_pid is not None and self.dirs_made:
                lines += _undo_state(self.namespace_pid, self.dirs_made)
            lines += _swapon(self.swaps)
            if self.services is not None:
                lines += self.services()
        self.swaps, self.services = [], None
        for line in lines:
            self.runlog.write(f"undone: {line}")
        self.runlog.write("undo finished: the target is as it was")
        return lines

    def run_before_commit(self, error: BaseException) -> None:
        if isinstance(error, GeneratorExit):
            why = "the front-end stopped reading events (its own error: a vanished terminal?)"
        else:
            why = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        try:
            self.run(why)
        except Exception as undo_error:
            # The first failure is the one to name; the leftover gets its own line.
            self.runlog.write(f"undo failed: {undo_error}")
            add_note(error, f"also, undoing the RAM root failed: {undo_error}")


def _undo_state(target: int, dirs_made: list[Path]) -> list[str]:
    """Unmount the RAM root, remove the plan and the directories this run made (its own
    subdirectory of the state dir last in ``dirs_made``), in the target's mount namespace.

    A target that is gone took its mount namespace with it (a sandbox that died): then
    there is nothing left to undo."""
    if not Path(f"/proc/{target}").exists():
        return [f"RAM root and plan: gone with pid {target}'s mount namespace"]

    def undo(send: nsenter.Send) -> list[str]:
        work_dir = dirs_made[-1]
        return nsenter.undo_state_dir(work_dir, plan_name=PLAN_NAME) + statedir.remove_dirs(
            dirs_made
        )

    return nsenter.run_in_mount_namespace(target, undo)


def _stop_services(
    options: SwitchOptions,
    target: int,
    sandbox: Sandbox | None,
    undo: _Undo,
    teacher: teach.Teacher | None,
) -> Iterator[Event]:
    """The graceful stop, the last step before the injection: the host's init (a rehearsal's
    stand-in) stops its services its own way, in its order, within the ceiling; what is
    still running after it gets the stage's signals. Undone (started again) with the rest
    when the run is called off before the commit."""
    plan = stopping.run_plan(options.mode, options.service_stop, options.stop_timeout, sandbox)
    if not plan.stops:
        why = "--stop=signal" if options.service_stop == "signal" else plan.note or "none up"
        yield Log(f"graceful stop: nothing for an init to stop ({why}); the stage's signals")
        return
    if teacher is not None:
        from injector import teach  # teaching rehearsals only: start-up time

        teacher(teach.Pause("host", "stop", teach.stop_call(plan, target), target))
    whose = "the sandbox's" if sandbox is not None else f"{plan.manager}'s"
    yield StepStarted("stop", f"Stopping {whose} services in order (ceiling {plan.ceiling:g} s)")
    undo.services = stopping.Restart(plan.manager, [unit.name for unit in plan.units])
    outcome = yield from stopping.stop(plan, sandbox)
    yield Fact("stop", "stopped", [[name, round(at, 3)] for name, at in outcome.stopped])
    yield Fact("stop", "left", outcome.left)
    yield Fact("stop", "seconds", round(outcome.seconds, 3))
    detail = f"{len(outcome.stopped)} of {len(outcome.asked)} stopped in {outcome.seconds:.1f} s"
    if outcome.left:
        names = ", ".join(outcome.left)
        yield Notice(
            "warning",
            "stop-left",
            f"still running after the graceful stop: {names}; the stage's SIGTERM, then"
            " SIGKILL end them",
            f"their stop took longer than their own timeout or the ceiling ({plan.ceiling:g} s):"
            " --stop-timeout gives them more",
            scope=plan.scope,
        )
        detail += f"; left for the signals: {names}"
    yield StepDone("stop", detail)
    pause_point("stopped")


def _swapon(paths: list[str]) -> list[str]:
    """Turn disk swap that we turned off back on (default priority); one line each."""
    lines = []
    for path in paths:
        try:
            linux.swapon(path)
            lines.append(f"swap {path}: turned back on")
        except OSError as error:
            lines.append(f"swap {path}: swapon failed ({os.strerror(error.errno or 0)})")
    return lines


def _swaps_off_now(report: preflight.Report) -> list[str]:
    """The swaps the preflight saw that are no longer active (swapoff got that far)."""
    active = {
        device.path
        for device in procinfo.parse_swaps(procinfo.read_text(Path("/proc/swaps")) or "")
    }
    return [device.path for device in report.swap if device.path not in active]


def _inject_live(
    target: int,
    python: str,
    argv: list[str],
    envp: list[str],
    undo: _Undo,
    pause: teach.PauseHook | None = None,
) -> Generator[Event, None, ptrace.InjectionReport]:
    """``ptrace.inject_execve`` in a thread of its own, its notes and waits as live events.

    All of one injection's ptrace calls come from that thread. Ending signals are held back
    here for as long as it runs (the injection calls itself off at the swap if one came),
    and whatever stops the consumer, this waits for the thread: no decision to undo may be
    taken while PID 1 could still be given our execve."""
    from injector.inject import ptrace  # the injection only, never a dry run: start-up time

    events: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
    outcome: list[ptrace.InjectionReport | BaseException] = []

    def committed() -> None:
        undo.committed = True

    def waiting(seconds: float) -> None:
        message = f"waiting for execve in PID {target}: {seconds:.0f} s (a slow disk?)"
        events.put(Notice("info", "exec-wait", message))

    def inject() -> None:
        try:
            outcome.append(
                ptrace.inject_execve(
                    target,
                    python,
                    argv,
                    envp,
                    log=lambda line: events.put(Log(line)),
                    on_commit=committed,
                    on_wait=waiting,
                    pause=pause,
                )
            )
        except BaseException as error:
            outcome.append(error)
        finally:
            events.put(None)

    with signals_deferred():  # the thread starts with them blocked too
        worker = threading.Thread(target=inject, name="dboot-ptrace")
        worker.start()
        try:
            while (event := events.get()) is not None:
                yield event
        finally:
            worker.join()
    (result,) = outcome
    if isinstance(result, ptrace.InjectionRolledBack):
        undo.committed = False  # PID 1 re-runs its own call: nothing of ours is live
    if isinstance(result, BaseException):
        raise result
    return result


def _stage_command(target: int, plan_path: Path) -> tuple[str, list[str], list[str]]:
    """The execve that turns the target into the init stage, after checking it can work.

    The stage runs with our interpreter and our copy of initstage: both must be reachable
    from the target's root, which may differ from ours (a container, PrivateTmp, a lab ns).
    """
    python = os.path.realpath(sys.executable)
    try:
        files = stage_files()
    except StageLaunchError as error:
        raise EnvironmentFailure(error.cause, error.fix) from error
    for needed in [python, *files, str(plan_path)]:
        if not Path(f"/proc/{target}/root{needed}").exists():
            raise EnvironmentFailure(
                f"{needed} is not reachable from pid {target}'s root",
                "run dboot from a filesystem the target can see (not a private mount or container)",
            )
    _refuse_stage_code_others_can_change(target, [python, *files])
    argv = stage_argv(python, str(plan_path))
    envp = ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "TERM=linux"]
    return python, argv, envp


def _refuse_stage_code_others_can_change(target: int, files: list[str]) -> None:
    """PID 1 will run these as root: each of them, every directory above it, and the
    bytecode beside each module (read, if there, even under -B, which only stops writing
    it) must be root's alone (see ``injector.rootonly``), as the target sees them."""
    paths = [os.path.realpath(path) for path in files]
    caches = [importlib.util.cache_from_source(path) for path in paths if path.endswith(".py")]
    found = first_not_root_only(paths + caches, via=f"/proc/{target}/root")
    if found is not None:
        where, why = found
        raise SafetyRefusal(
            f"{where} is {why}, and PID 1 would run the init stage's code from it as root",
            f"install docker-boot where only root can change it (pipx or make, as root), or"
            f" chown root and chmod go-w {where}",
        )


def _relay_until_exit(sandbox: Sandbox, stop: threading.Event | None) -> Iterator[Event]:
    yield StepStarted("stage", "The sandboxed PID 1 runs the init stage, then the image's init")
    if sandbox.console == "capture":
        # Nobody types into a captured console: end of file lets an interactive init (a
        # shell) finish instead of waiting forever. The relay mode hands the terminal over.
        sandbox.close_stdin()
        for line in sandbox.console_lines():
            yield Console(line)
    status = _wait_unless_stopped(sandbox, stop)
    if status is None:
        sandbox.close()  # SIGKILL to its PID 1 ends its namespaces, with every mount in them
        yield StepDone("stage", "stopped: the sandbox's processes were killed")
        yield Finished("rehearsed", exit_status=0, detail="stopped; the sandbox is gone")
        return
    if sandbox.exit_signal is not None:
        name = signal.Signals(sandbox.exit_signal).name
        yield StepDone("stage", f"sandboxed init was killed by {name}")
        yield Finished("rehearsed", exit_status=status, detail=f"killed by {name}")
        return
    yield StepDone("stage", f"sandboxed init exited with status {status}")
    yield Finished("rehearsed", exit_status=status)


def _wait_unless_stopped(sandbox: Sandbox, stop: threading.Event | None) -> int | None:
    """The sandboxed init's exit status, or None once ``stop`` is set before it exits."""
    while stop is not None and not stop.is_set():
        with contextlib.suppress(TimeoutError):
            return sandbox.wait(timeout=STOP_POLL_SECONDS)
    return sandbox.wait(timeout=None) if stop is None else None
