"""Everything the wizard asks of the engine, behind one small protocol.

The wizard renders the engine's own data (``ImageSummary``, ``ImageDetails``, the preflight
``Report`` and the ``Event`` stream of ``injector.switch.run``); it decides nothing about a
switch itself. ``EngineBackend`` is the real thing; the tests pass a fake with fixed data
through ``create_app`` so that snapshots are deterministic.

The engine modules are imported lazily, inside the methods: a broken or missing engine
module then becomes an ``EnvironmentFailure`` the Images screen can show, instead of a
traceback before Textual even starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeVar

from initstage.plan import DEFAULT_GRACE_SECONDS
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.events import Event, Notice

if TYPE_CHECKING:
    from injector.access.sshcheck import GoCallback
    from injector.image.sources import ImageDetails, ImageSource, ImageSummary
    from injector.install.install import InstallFacts, InstallOptions
    from injector.preflight.preflight import ProcessInfo, Report
    from injector.switch import SwitchOptions
    from injector.teach import PauseHook

# Executables tried, in order, to pre-fill the init command: the image's own init first.
INIT_CANDIDATES = ("/sbin/init", "/lib/systemd/systemd", "/usr/lib/systemd/systemd")
FALLBACK_SHELL = "/bin/sh"

T = TypeVar("T")
# Told (bytes read, bytes in all) while an archive is read.
ReadProgress = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class InitSuggestion:
    """What the Init screen pre-fills, and a one-line hint that says why."""

    argv: list[str]
    hint: str


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """The Options step's choices, as the user gave them. The engine checks them
    (``Backend.switch_options``): the wizard holds no rule of its own about their values."""

    grace: float = DEFAULT_GRACE_SECONDS
    # As typed ("512M"); empty: the engine sizes the tmpfs (its estimate plus headroom).
    tmpfs_size: str = ""
    api_mounts: bool = True
    modules: bool = True
    # The graceful stop (--stop, --stop-timeout): the init (a rehearsal's stand-in) stops its
    # services first; off: --stop=signal. The ceiling in seconds; None: what the units allow.
    graceful_stop: bool = True
    stop_timeout: float | None = None
    # A real switch's only (a rehearsal takes none of them, as `dboot rehearse` takes none).
    carry: bool = True
    ssh: bool = False
    # Minutes; None: the engine's default (a timer for a remote session's real switch).
    revert_after: float | None = None
    no_revert: bool = False
    # --ssh-check PORT: a login into the RAM root before the commit; None: no login check.
    ssh_check: int | None = None
    # The user turned the login check off where the wizard would turn it on (remote session).
    no_ssh_check: bool = False


@dataclasses.dataclass(frozen=True)
class InstallChoices:
    """The Destination step's choices for an install (`dboot install`): the image on this
    machine's disk, the old system kept as the way back. The engine judges the values."""

    # Minutes of probation for the first boot; None with no_revert: --no-revert.
    revert_after: float | None = None
    no_revert: bool = False
    # Off: --no-reboot, the user reboots when ready.
    reboot: bool = True


@dataclasses.dataclass(frozen=True)
class RunRequest:
    """What the Confirm modal decided: which image, which init, rehearsal or the real thing,
    and the Options step's choices; ``install``: the Destination step's install instead of
    a switch to RAM."""

    image: str
    init_argv: list[str]
    rehearse: bool
    # Set by the Run screen's stop key: ends a rehearsal whose init never exits.
    stop: threading.Event = dataclasses.field(
        default_factory=threading.Event, compare=False, repr=False
    )
    options: RunOptions = RunOptions()
    # A teaching rehearsal: the engine's pause hook (the wizard's UiPauser); None: none.
    pause: PauseHook | None = dataclasses.field(default=None, compare=False, repr=False)
    # A real switch's login check: the Run screen's LoginWaiter; None: wait for a login only.
    ssh_check_go: GoCallback | None = dataclasses.field(default=None, compare=False, repr=False)
    # A real run that installs the image on this machine's disk (never a rehearsal's).
    install: InstallChoices | None = None


class Backend(Protocol):
    """The wizard's whole view of the engine. Every method may block: call it from a worker."""

    def list_images(self) -> list[ImageSummary]:
        """Local engine images. Engine down: ``EnvironmentFailure`` naming how to start it."""
        ...

    def details(self, ref: str) -> ImageDetails:
        """Tags, history, CMD/ENTRYPOINT, architecture; ``BadInput`` for an unknown ref."""
        ...

    def file_ref(self, given: str) -> str:
        """The reference for a file the user named: its plain path, whose kind is told from
        its content, or an explicit ``docker-archive:``/``rootfs:`` reference kept as it
        is. ``BadInput`` says in one line why a path cannot be opened."""
        ...

    def read(self, ref: str, progress: ReadProgress) -> None:
        """Read the image's file index (once: later questions reuse it), telling
        ``progress`` how far reading an archive has got."""
        ...

    def suggest_init(self, ref: str) -> InitSuggestion:
        """The init command to pre-fill, found in the image's own file index."""
        ...

    def validate_init(self, ref: str, argv: list[str]) -> str | None:
        """``None`` when ``argv[0]`` is an executable inside the image, else why not."""
        ...

    def check(self, ref: str, init_argv: list[str]) -> Report:
        """The preflight report: RAM, swap, processes, session, PID 1, notices, and whether
        the init can run on this machine (its machine, loader, ``#!`` interpreter)."""
        ...

    def processes_by_service(self, processes: list[ProcessInfo]) -> dict[str, list[ProcessInfo]]:
        """The report's processes grouped by systemd unit, unit-less ones last."""
        ...

    def blockers(self, report: Report, *, rehearse: bool) -> list[Notice]:
        """The report's blockers that stop this kind of run (a rehearsal ignores host ones)."""
        ...

    def switch_options(self, request: RunRequest) -> SwitchOptions:
        """The engine's options for this request, checked by the engine's own rules:
        ``BadInput`` says in one line what is wrong with a value and how to fix it. An
        install's are ``InstallOptions``."""
        ...

    def install_facts(self, ref: str, report: Report) -> InstallFacts:
        """What an install of the image would find on this machine: its boot chain, the
        space it needs, and the engine's verdicts. Reads this machine; changes nothing."""
        ...

    def run(self, request: RunRequest, last_words: Callable[[str], None]) -> Iterator[Event]:
        """Rehearse or switch, yielding events. Iterate it from ONE thread: ptrace is per thread.

        ``last_words`` is called just before the point of no return of a real switch.
        """
        ...

    def hostname(self) -> str:
        """What the user must type to confirm a real switch."""
        ...

    def lab_mode(self) -> bool:
        """True when this machine's PID 1 must never be replaced: the wizard only rehearses."""
        ...

    def lab_mode_reason(self) -> str | None:
        """Why lab mode is on, in words for the user; None when it is off."""
        ...

    def switch_target(self) -> int | None:
        """The PID 1 of a namespace that a real switch replaces instead of this machine's
        (``--target-pid``, for labs and tests); None for this machine's own PID 1."""
        ...

    def close(self) -> None:
        """Release temporary containers and mounts held for browsing images."""
        ...


@contextlib.contextmanager
def _engine_module() -> Iterator[None]:
    """Turn a missing or broken engine module into one line the wizard can show."""
    try:
        yield
    except ImportError as error:
        raise EnvironmentFailure(
            f"the engine module {error.name or 'injector'} cannot be imported ({error})",
            "reinstall docker-boot (pip install -e . in its checkout)",
        ) from error


def check_target_pid(pid: int) -> None:
    """``--target-pid``: the PID 1 of a namespace the user made, never this machine's own."""
    with _engine_module():
        from injector.preflight import procinfo
    if pid == 1:
        raise SafetyRefusal(
            "--target-pid 1 is this machine's own PID 1",
            "give the PID 1 of a namespace you made (see NSpid in /proc/PID/status)",
        )
    if not procinfo.is_pid1_of_its_namespace(pid):
        raise BadInput(
            f"pid {pid} is not PID 1 of its own PID namespace",
            "--target-pid must name the PID 1 of a namespace (see NSpid in /proc/PID/status)",
        )


def engine_options(
    request: RunRequest,
    *,
    docker_host: str | None = None,
    state_dir: Path | None = None,
    tmpfs_size: int | None = None,
    target_pid: int | None = None,
) -> SwitchOptions:
    """The engine's ``SwitchOptions`` for a request, built (and so checked) by the engine:
    its ``__post_init__`` and its size parser raise ``BadInput`` for a bad value. The
    wizard-wide settings (``dboot-tui --state-dir``...) fill what the request leaves open."""
    if request.install is not None and not request.rehearse:
        return install_options(request, request.install, docker_host, state_dir)
    with _engine_module():
        from injector import switch
        from injector.ramroot.rootfs import parse_size
    chosen = request.options
    options = switch.SwitchOptions(
        image=request.image,
        init_argv=list(request.init_argv),
        rehearse=request.rehearse,
        docker_host=docker_host,
        grace=chosen.grace,
        tmpfs_size=parse_size(chosen.tmpfs_size) if chosen.tmpfs_size.strip() else tmpfs_size,
        api_mounts=chosen.api_mounts,
        modules=chosen.modules,
        service_stop="graceful" if chosen.graceful_stop else "signal",
        stop_timeout=chosen.stop_timeout,
        # The wizard's Confirm modal asked for the typed hostname already.
        yes=True,
        # A teaching rehearsal (`dboot rehearse --teach`); a real switch never pauses.
        pause=request.pause if request.rehearse else None,
    )
    if not request.rehearse:
        # A real switch's own options: a rehearsal takes none, as `dboot rehearse` takes none.
        options = dataclasses.replace(
            options,
            carry=chosen.carry,
            ssh=chosen.ssh,
            revert_after=chosen.revert_after,
            no_revert=chosen.no_revert,
            ssh_check=chosen.ssh_check,
            target_pid=target_pid,
        )
    if state_dir is not None:
        options.state_dir = state_dir
    return options


def install_options(
    request: RunRequest,
    install: InstallChoices,
    docker_host: str | None = None,
    state_dir: Path | None = None,
) -> InstallOptions:
    """The engine's ``InstallOptions`` (`dboot install`): the Options step's carry-over and
    kernel modules, the Destination step's probation and reboot. The rest of the Options
    step (grace, tmpfs, API mounts, the stop, sshd, the login check) is the RAM switch's:
    an install kills nothing and injects nothing, its reboot is the host init's own."""
    with _engine_module():
        from injector.install.install import InstallOptions
    options = InstallOptions(
        image=request.image,
        init_argv=list(request.init_argv),
        docker_host=docker_host,
        modules=request.options.modules,
        carry=request.options.carry,
        revert_after=install.revert_after,
        no_revert=install.no_revert,
        # The wizard's Confirm modal asked for the typed hostname already.
        yes=True,
        reboot=install.reboot,
    )
    if state_dir is not None:
        options.state_dir = state_dir
    return options


class EngineBackend:
    """The real engine: ``injector.image.sources``, ``injector.preflight.preflight`` and
    ``injector.switch``."""

    def __init__(
        self,
        *,
        docker_host: str | None = None,
        state_dir: Path | None = None,
        mem_available: int | None = None,
        tmpfs_size: int | None = None,
        target_pid: int | None = None,
    ) -> None:
        if target_pid is not None:
            check_target_pid(target_pid)
        self.docker_host = docker_host
        self.state_dir = state_dir
        self.target_pid = target_pid
        # Overrides MemAvailable in the preflight: tests use it to force the RAM blocker.
        self.mem_available = mem_available
        self.tmpfs_size = tmpfs_size
        # Browsing keeps ONE image source open (its index is cached there); workers on
        # several threads may ask about it, so access is serialised.
        self._lock = threading.Lock()
        self._source: ImageSource | None = None

    # --- images ------------------------------------------------------------------------
    def list_images(self) -> list[ImageSummary]:
        with _engine_module():
            from injector.image import sources
        return sources.list_images(self.docker_host)

    def _with_source(self, ref: str, use: Callable[[ImageSource], T]) -> T:
        with _engine_module():
            from injector.image import sources
        with self._lock:
            if self._source is None or self._source.ref != ref:
                self._close_locked()
                source = sources.open_source(ref, self.docker_host)
                source.__enter__()
                self._source = source
            return use(self._source)

    def details(self, ref: str) -> ImageDetails:
        return self._with_source(ref, lambda source: source.details())

    def file_ref(self, given: str) -> str:
        with _engine_module():
            from injector.image import sources
        if given.startswith((sources.DOCKER_ARCHIVE, sources.ROOTFS)):
            return given
        return sources.source_for_path(given)

    def read(self, ref: str, progress: ReadProgress) -> None:
        self._with_source(ref, lambda source: source.scan(progress))

    # --- init command --------------------------------------------------------------------
    def suggest_init(self, ref: str) -> InitSuggestion:
        index = self._with_source(ref, lambda source: source.scan())
        for candidate in INIT_CANDIDATES:
            if index.executable(candidate):
                return InitSuggestion([candidate], f"{candidate} is the image's own init")
        return InitSuggestion(
            [FALLBACK_SHELL],
            "no init in the image: a shell works as PID 1, but the system stops when it exits",
        )

    def validate_init(self, ref: str, argv: list[str]) -> str | None:
        with _engine_module():
            from injector.preflight import preflight
        index = self._with_source(ref, lambda source: source.scan())
        try:
            preflight.validate_init(index, argv)
        except BadInput as error:
            return str(error)
        return None

    # --- preflight -----------------------------------------------------------------------
    def check(self, ref: str, init_argv: list[str]) -> Report:
        with _engine_module():
            from injector import check
        # The engine's one check pipeline, on the source held open (read once, cached): the
        # run copies from that very source.
        return self._with_source(
            ref,
            lambda source: (
                check.check(
                    source,
                    init_argv,
                    target_pid=self.target_pid or 1,
                    tmpfs_size=self.tmpfs_size,
                    mem_available=self.mem_available,
                ).report
            ),
        )

    def processes_by_service(self, processes: list[ProcessInfo]) -> dict[str, list[ProcessInfo]]:
        with _engine_module():
            from injector.preflight import preflight
        return preflight.processes_by_service(processes)

    def blockers(self, report: Report, *, rehearse: bool) -> list[Notice]:
        with _engine_module():
            from injector import switch
        # The engine decides which blockers a rehearsal ignores (the host's own swap,
        # processes and session); the wizard only asks.
        mode: Literal["rehearse", "target", "switch"] = "rehearse" if rehearse else "switch"
        if mode == "switch" and self.target_pid is not None:
            mode = "target"
        return switch.blockers(report, mode)

    def install_facts(self, ref: str, report: Report) -> InstallFacts:
        with _engine_module():
            from injector.install import install
        index = self._with_source(ref, lambda source: source.scan())
        return install.install_facts(report, index.estimated_bytes)

    # --- the run ---------------------------------------------------------------------------
    def switch_options(self, request: RunRequest) -> SwitchOptions:
        return engine_options(
            request,
            docker_host=self.docker_host,
            state_dir=self.state_dir,
            tmpfs_size=self.tmpfs_size,
            target_pid=self.target_pid,
        )

    def run(self, request: RunRequest, last_words: Callable[[str], None]) -> Iterator[Event]:
        with _engine_module():
            from injector import labmode, switch
        if request.install is not None and not request.rehearse:
            yield from self.install(request, request.install)
            return
        # Defence in depth: the engine refuses too, but the wizard never even asks. A
        # --target-pid run replaces a namespace's PID 1, checked again here: that pid may
        # have ended, and its number been reused, since the wizard started.
        if not request.rehearse and self.target_pid is not None:
            check_target_pid(self.target_pid)
        elif not request.rehearse:
            labmode.refuse("this machine's PID 1 will not be replaced", "choose Rehearse")
        options = self.switch_options(request)
        options.last_words = last_words
        # The source the wizard read (Init and Check steps) is handed to the run, which copies
        # from it: the image is read once. The run owns it from here and closes it.
        with self._lock:
            source, self._source = self._source, None
        if source is not None and source.ref != request.image:
            source.close()
            source = None
        options.source = source
        if request.rehearse:
            # The wizard's console is a terminal on the sandbox's pty (the run screen's
            # ConsoleView); the stop key ends the sandbox from the run's own thread.
            options.console, options.stop = "pty", request.stop
        else:
            options.ssh_check_go = request.ssh_check_go
        try:
            yield from switch.run(options)
        finally:
            if source is not None:
                source.close()

    def install(self, request: RunRequest, choices: InstallChoices) -> Iterator[Event]:
        """`dboot install` of the request's image onto this machine's disk."""
        with _engine_module():
            from injector import labmode
            from injector.install import install
        # Defence in depth, as for a switch: the engine refuses in lab mode too, but the
        # wizard never even asks. --target-pid is a lab's namespace: its disk is this one's.
        if self.target_pid is not None:
            raise SafetyRefusal(
                "an install writes this machine's disk: --target-pid only aims a switch",
                "switch the namespace's PID 1 instead, or start dboot-tui without --target-pid",
            )
        labmode.refuse("this machine's disk and boot chain will not be changed", "choose Rehearse")
        options = install_options(request, choices, self.docker_host, self.state_dir)
        # The install reads the image itself, from its own source: the wizard's goes.
        self.close()
        yield from install.run_install(options)

    # --- host ------------------------------------------------------------------------------
    def hostname(self) -> str:
        return socket.gethostname()

    def lab_mode(self) -> bool:
        return self.lab_mode_reason() is not None

    def lab_mode_reason(self) -> str | None:
        try:
            from injector.labmode import lab_mode_reason
        except ImportError:
            return "lab mode is on (the engine cannot be imported)"  # No engine, no switch.
        return lab_mode_reason()

    def switch_target(self) -> int | None:
        return self.target_pid

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        source, self._source = self._source, None
        if source is not None:
            source.close()
