"""A fake engine for the wizard's snapshot and walk tests.

Mocked on purpose: the snapshots need images, sizes, dates, processes and a whole run that
are the same on every machine and every day. The real engine is exercised by
test_engine.py (Pilot) and test_tmux.py (a person at a terminal).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

from app.tui.backend import InitSuggestion, RunRequest, engine_options
from app.tui.progress import PROGRESS_INTERVAL_S
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.events import (
    Console,
    Event,
    Fact,
    Finished,
    Injection,
    Log,
    Notice,
    Progress,
    StepDone,
    StepStarted,
)
from injector.image.sources import ImageDetails, ImageSummary
from injector.install.bootchain import BootChain, RootFilesystem
from injector.install.install import InstallFacts
from injector.preflight.preflight import (
    Pid1Facts,
    ProcessInfo,
    RamFacts,
    Report,
    SessionFacts,
    processes_by_service,
)
from injector.preflight.procinfo import SwapDevice
from injector.stop.plan import INIT_PLUMBING, Candidate, KeptUnit, StopPlan, make_plan
from injector.switch import SwitchOptions

MiB = 1 << 20
GiB = 1 << 30
HOSTNAME = "labhost"
T0 = datetime(2026, 11, 29, 12, 0, 0, tzinfo=timezone.utc)


class SteppingClock:
    """A clock that advances one second per reading: deterministic ETAs."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


def _id(n: int) -> str:
    return "sha256:" + f"{n:x}" * (64 // len(f"{n:x}")) + "0" * (64 % len(f"{n:x}"))


IMAGES = [
    ImageSummary("<none>", "<none>", _id(0xDEADBEEF), 87 * MiB, "2026-10-01T09:30:00Z"),
    ImageSummary("tinybox", "latest", _id(0xC091039D), 2_076_000, "2026-11-29T01:48:00Z"),
    ImageSummary(
        "debian", "bookworm-slim", _id(0x5A1B2C3D), 74 * MiB + 12345, "2026-11-10T00:00:00Z"
    ),
    ImageSummary("alpine", "3.20", _id(0xA1B2C3D4), 7_800_000, "2026-09-06T18:21:00Z"),
    ImageSummary("myapp", "2.1", _id(0x0BADF00D), 412 * MiB, "2026-11-28T16:02:11Z"),
]

DETAILS = {
    "tinybox:latest": ImageDetails(
        ref="tinybox:latest",
        id=_id(0xC091039D),
        tags=["tinybox:latest", "tinybox:demo"],
        architecture="amd64",
        cmd=["/sbin/init"],
        entrypoint=None,
        env=["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
        history=['CMD ["/sbin/init"]', "COPY rootfs/ / # buildkit"],
        size=2_076_000,
    ),
    "docker-archive:/srv/images/rescue.tar": ImageDetails(
        ref="docker-archive:/srv/images/rescue.tar",
        id=_id(0x7E5C0E),
        tags=["rescue:1.0"],
        architecture="amd64",
        cmd=None,
        entrypoint=["/sbin/init"],
        env=[],
        history=['ENTRYPOINT ["/sbin/init"]', "ADD rootfs.tar /"],
        size=31 * MiB,
    ),
    "debian:bookworm-slim": ImageDetails(
        ref="debian:bookworm-slim",
        id=_id(0x5A1B2C3D),
        tags=["debian:bookworm-slim", "debian:12-slim"],
        architecture="amd64",
        cmd=["bash"],
        entrypoint=None,
        env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        history=['CMD ["bash"]', "ADD file:5d1b6a1e in /"],
        size=74 * MiB + 12345,
    ),
    "alpine:3.20": ImageDetails(
        ref="alpine:3.20",
        id=_id(0xA1B2C3D4),
        tags=["alpine:3.20"],
        architecture="amd64",
        cmd=["/bin/sh"],
        entrypoint=None,
        env=[],
        history=['CMD ["/bin/sh"]', "ADD alpine-minirootfs.tar.gz /"],
        size=7_800_000,
    ),
}

# What the fake engine's content sniffing says of a plain path (FakeBackend.file_ref).
FILES = {
    "/srv/images/rescue.tar": "docker-archive:/srv/images/rescue.tar",
}
NOT_AN_ARCHIVE = "/srv/images/notes.txt"
OPEN_FIX = "give a `docker save` archive or a filesystem tarball (plain, gzip, zstd or xz)"
# An archive's size, for the progress that reading it reports.
ARCHIVE_BYTES = 31 * MiB

# Executables present in each fake image, for validate_init.
EXECUTABLES = {
    "tinybox:latest": {"/sbin/init", "/bin/sh", "/bin/busybox"},
    "alpine:3.20": {"/bin/sh", "/bin/busybox"},
    "docker-archive:/srv/images/rescue.tar": {"/sbin/init", "/bin/sh"},
}

PROCESSES = [
    ProcessInfo(612, 1, "root", "/usr/sbin/sshd -D", 7 * MiB, "ssh.service", True, []),
    ProcessInfo(4101, 612, "root", "sshd: admin [priv]", 9 * MiB, "ssh.service", True, []),
    ProcessInfo(4120, 4101, "admin", "-bash", 5 * MiB, "session-3.scope", True, []),
    ProcessInfo(4188, 4120, "root", "sudo dboot-tui", 6 * MiB, "session-3.scope", True, []),
    ProcessInfo(
        733,
        1,
        "postgres",
        "postgres: checkpointer",
        48 * MiB,
        "postgresql.service",
        False,
        ["/var/lib/postgresql/15/main/pg_wal/000000010000000000000001"],
    ),
    ProcessInfo(
        731,
        1,
        "postgres",
        "/usr/lib/postgresql/15/bin/postgres -D /var/lib/...",
        96 * MiB,
        "postgresql.service",
        False,
        [],
    ),
    ProcessInfo(
        402,
        1,
        "root",
        "/lib/systemd/systemd-journald",
        22 * MiB,
        "systemd-journald.service",
        False,
        ["/var/log/journal/abc/system.journal"],
    ),
    ProcessInfo(518, 1, "root", "/usr/sbin/cron -f", 3 * MiB, "cron.service", False, []),
]


def sample_report(
    *,
    mem_available: int = 3 * GiB,
    remote: bool = True,
    processes: list[ProcessInfo] | None = None,
    image_has_ssh: bool = False,
) -> Report:
    """A host with disk and zram swap, a remote admin, and enough RAM unless told otherwise."""
    tmpfs = 66 * MiB
    notices: list[Notice] = []
    if tmpfs > mem_available:
        notices.append(
            Notice(
                "blocker",
                "ram-short",
                "the image needs 66.0 MiB of RAM, 16.0 MiB are available",
                "free memory or pick a smaller image",
            )
        )
    notices += [
        Notice(
            "warning",
            "swap-disk",
            "disk swap /dev/vda3 (12.0 MiB used) will be turned off",
            "RAM can take the 12.0 MiB back",
        ),
        Notice(
            "warning",
            "session-remote",
            "you are connected over SSH and the image has no SSH server",
            "use a console, or an image with sshd",
        ),
        Notice(
            "warning",
            "process-writing",
            "2 processes hold files open for writing",
            "stop postgresql.service and systemd-journald.service first",
        ),
    ]
    return Report(
        ram=RamFacts(
            estimated_bytes=2_400_000,
            available_bytes=mem_available,
            total_bytes=4 * GiB,
            tmpfs_size=tmpfs,
            remaining_bytes=mem_available - tmpfs,
        ),
        swap=[
            SwapDevice("/dev/vda3", "disk", 2 * GiB, 12 * MiB),
            SwapDevice("/dev/zram0", "zram", GiB, 0),
        ],
        processes=list(PROCESSES if processes is None else processes),
        session=SessionFacts(remote=remote, via="ssh from 10.0.2.2", image_has_ssh=image_has_ssh),
        pid1=Pid1Facts(
            1, "/usr/lib/systemd/systemd", ["/sbin/init"], True, "Yama scope 1, we are root", False
        ),
        init_argv=["/sbin/init"],
        notices=notices,
    )


def sample_stop_plan() -> StopPlan:
    """The sample host's graceful stop, as systemd would order it: cron and the application's
    database clients first, PostgreSQL after them; the session's sshd and the journal stay."""
    return make_plan(
        "systemd",
        "graceful",
        [
            Candidate("cron.service", 90.0, "its stop signal (SIGTERM)"),
            Candidate(
                "postgresql.service",
                3600.0,
                "ExecStop=/usr/bin/pg_ctlcluster --skip-systemctl-redirect -m fast 15-main stop",
                phases=2,
                after=frozenset({"cron.service"}),
            ),
        ],
        [
            KeptUnit("ssh.service", "your session runs in it"),
            KeptUnit("systemd-journald.service", INIT_PLUMBING),
        ],
        None,
    )


def rehearsal_events(request: RunRequest) -> list[Event]:
    """What a run of tinybox yields, in the engine's step order (a real switch stops at the
    injection: the init stage kills this very process right after)."""
    total = 2_400_000
    return [
        StepStarted("source", f"Reading image {request.image}"),
        Fact("image", "files", 213),
        StepDone("source", f"213 files, init {request.init_argv[0]} found"),
        StepStarted("preflight", "Checking RAM, swap, processes and PID 1"),
        Fact("pid1", "pid", 4242),
        Fact("pid1", "exe", "/usr/bin/python3.11"),
        StepDone("preflight", "0 blockers, 0 warnings"),
        StepStarted("ramroot", "Copying the image into a 66 MiB tmpfs"),
        *[Progress("ramroot", done, total) for done in (0, 800_000, 1_600_000, total)],
        Log("added host file /etc/hostname"),
        Log("plan written to /run/dboot/plan.json"),
        StepDone("ramroot", "2 MiB used in the tmpfs"),
        StepStarted("inject", "Injecting execve into pid 4242"),
        Log("seized 4242, interrupted, at syscall entry of wait4"),
        Injection(
            pid=4242,
            arch="x86_64",
            interrupted_syscall="wait4",
            registers_before={
                "orig_rax": 61,
                "rip": 0x7F3A12C4E9A2,
                "rdi": 0xFFFFFFFFFFFFFFFF,
                "rsi": 0x7FFC8A1E2E3C,
                "rdx": 0,
                "rsp": 0x7FFC8A1E2E10,
            },
            registers_after={
                "orig_rax": 59,
                "rip": 0x7F3A12C4E9A2,
                "rdi": 0x7FFC8A1E1F00,
                "rsi": 0x7FFC8A1E1F40,
                "rdx": 0x7FFC8A1E1F70,
                "rsp": 0x7FFC8A1E2E10,
            },
            elapsed_ms=1.8,
        ),
        StepDone("inject", "pid 4242 interrupted in wait4"),
        *([] if request.rehearse else [Finished("switched")]),
        StepStarted("stage", "The sandboxed PID 1 runs the init stage, then the image's init"),
        Console("dboot-stage: I am PID 1, plan /run/dboot/plan.json"),
        Console("dboot-stage: SIGTERM to 3 processes; 1 left after 3.0 s: SIGKILL"),
        Console("dboot-stage: pivot_root into /run/dboot/root, old root detached"),
        Console("dboot-stage: exec /sbin/init"),
        Console("tinybox: hello from PID 1"),
        StepDone("stage", "sandboxed init exited with status 0"),
        Finished("rehearsed", exit_status=0),
    ]


# What an install of tinybox finds on the sample host: UEFI and GRUB, a separate /boot and an
# ESP, the root filesystem with room to spare. Mocked: the real read_boot_chain() reads this
# machine, which differs from one test machine to the next.
INSTALL_NEEDS = 258 * MiB + 2_400_000
REMOTE_WARNING = Notice(
    "warning",
    "session-remote-no-ssh",
    "you are connected over SSH and the image has no SSH server",
    "use a console, or an image with sshd",
)
NO_SPACE = Notice(
    "blocker",
    "install-no-space",
    "the install needs 260 MiB on /dev/vda1 and 120 MiB are free",
    "free space on the root filesystem, or use a smaller image",
)


def sample_boot_chain() -> BootChain:
    return BootChain(
        firmware="UEFI",
        bootloader="GRUB",
        kernel="/boot/vmlinuz-6.1.0-28-amd64",
        initramfs="/boot/initrd.img-6.1.0-28-amd64",
        boot_partition="/dev/vda2",
        esp="/boot/efi",
        kernel_cmdline="BOOT_IMAGE=/vmlinuz-6.1.0-28-amd64 root=UUID=4f1c0ffe ro quiet",
        init_path="/sbin/init",
        init_target="/lib/systemd/systemd",
        init_is_link=True,
        root=RootFilesystem("/dev/vda1", "ext4", "4f1c0ffe", "rw,relatime", 18 * GiB),
        interpreter="/usr/bin/python3",
        interpreter_version="3.11",
    )


def install_events(request: RunRequest) -> list[Event]:
    """What `dboot install` of tinybox yields on the sample host (injector.install.install's
    steps, plan lines and ending), up to the moment it asks the host's init to reboot."""
    init = " ".join(request.init_argv)
    tree = "/dboot/trees/tinybox-c091039dc091"
    plan = [
        "space: 260 MiB needed, 18432 MiB free on /dev/vda1 (ext4)",
        "new /etc/fstab:",
        "  UUID=4f1c0ffe / ext4 rw,relatime 0 1",
        "  /dev/vda2 /boot ext4 defaults 0 2",
        f"new system: {tree} on the root filesystem, init {init}",
        "old system: stays whole where it is; from the new system it is at /sysroot",
        "going back: `dboot install --revert` from either system, then reboot",
    ]
    total = 2_400_000
    return [
        StepStarted("source", f"Reading image {request.image}"),
        StepDone("source", f"213 files, init {request.init_argv[0]} found"),
        StepStarted("preflight", "Checking the image, the disk and the boot chain"),
        REMOTE_WARNING,
        Fact("install", "boot_chain", sample_boot_chain().describe()[:3]),
        StepDone("preflight", "0 blockers"),
        StepStarted("plan", "The install's plan"),
        *[Notice("info", "install-plan", line) for line in plan],
        StepDone("plan", f"tree {tree}, 260 MiB"),
        StepStarted("tree", f"Copying the image into {tree}"),
        *[Progress("tree", done, total) for done in (0, 1_200_000, total)],
        Log("carry-over: /etc/ssh/ssh_host_ed25519_key"),
        StepDone("tree", f"{tree} complete and flushed"),
        StepStarted("shim", "Writing the boot shim and the boot state"),
        StepDone("shim", "state: probation, kept only if /run/dboot/keep exists within 10 min"),
        StepStarted("commit", "Pointing /sbin/init at the boot shim"),
        StepDone("commit", "/sbin/init -> /dboot/boot/init; old: /lib/systemd/systemd"),
        Notice(
            "info",
            "install-next",
            "after the reboot, within 10 min: ssh -p 22 -o HostKeyAlias=10.0.2.15 root@10.0.2.15"
            " touch /run/dboot/keep",
        ),
        Notice("info", "install-next", "without it the machine boots the old system again"),
        Finished("installed", detail="the next boot starts the image on probation"),
    ]


@dataclasses.dataclass
class FakeBackend:
    """Fixed images, report and events. ``engine_down`` makes list_images fail."""

    engine_down: str | None = None
    mem_available: int = 3 * GiB
    lab: bool = True
    # When set, run() waits for it before the stage step: a test can look at a run in flight.
    hold: threading.Event | None = None
    requests: list[RunRequest] = dataclasses.field(default_factory=list)
    closed: int = 0
    # --target-pid: the namespace's PID 1 a real switch replaces instead of this machine's.
    target_pid: int | None = None
    # When set, read() waits for it halfway through an archive: a test can look at it.
    hold_read: threading.Event | None = None
    # The processes the report lists (None: the sample host's; [] : PID 1 alone).
    processes: list[ProcessInfo] | None = None
    # The image has an sshd: the Options step offers the login check (--ssh-check).
    image_has_ssh: bool = False
    # Set by a test: "sshd accepted a login" during the login check. What go answered: went.
    login: threading.Event = dataclasses.field(default_factory=threading.Event)
    went: list[bool] = dataclasses.field(default_factory=list)
    # The graceful stop's plan the report carries (None: none, as before issue 19).
    stop_plan: StopPlan | None = None
    # The install's verdicts on the sample host (None: a remote session's warning alone).
    install_notices: list[Notice] | None = None
    # How many times the boot chain was read (install_facts).
    facts_read: int = 0

    def list_images(self) -> list[ImageSummary]:
        if self.engine_down is not None:
            raise EnvironmentFailure(self.engine_down, "start the Docker engine")
        return list(IMAGES)

    def details(self, ref: str) -> ImageDetails:
        if ref not in DETAILS:
            raise BadInput(f"no such image {ref!r}", "check `docker images`")
        return DETAILS[ref]

    def file_ref(self, given: str) -> str:
        if given.startswith(("docker-archive:", "rootfs:")):
            return given
        if given == NOT_AN_ARCHIVE:
            raise BadInput(f"{given}: not a tar archive (truncated header)", OPEN_FIX)
        if given not in FILES:
            raise BadInput(
                f"cannot read {given} (No such file or directory)",
                "give the path of a readable file",
            )
        return FILES[given]

    def read(self, ref: str, progress: Callable[[int, int], None]) -> None:
        if not ref.startswith(("docker-archive:", "rootfs:")):
            return  # An engine image: no archive to read.
        for done in range(0, ARCHIVE_BYTES + 1, ARCHIVE_BYTES // 4):
            time.sleep(PROGRESS_INTERVAL_S)  # a real read's pace: the wizard shows each step
            progress(done, ARCHIVE_BYTES)
            if done == ARCHIVE_BYTES // 2 and self.hold_read is not None:
                self.hold_read.wait(timeout=30)

    def suggest_init(self, ref: str) -> InitSuggestion:
        if "/sbin/init" in EXECUTABLES.get(ref, set()):
            return InitSuggestion(["/sbin/init"], "/sbin/init is the image's own init")
        return InitSuggestion(["/bin/sh"], "no init in the image: a shell works as PID 1")

    def validate_init(self, ref: str, argv: list[str]) -> str | None:
        if not argv[0].startswith("/"):
            return f"init {argv[0]!r} is not an absolute path: give the full path inside the image"
        if argv[0] not in EXECUTABLES.get(ref, set()):
            return f"{argv[0]} is not an executable in {ref}: pick one that exists in the image"
        return None

    def check(self, ref: str, init_argv: list[str]) -> Report:
        report = sample_report(
            mem_available=self.mem_available,
            processes=self.processes,
            image_has_ssh=self.image_has_ssh,
        )
        report.stop = self.stop_plan
        return report

    def blockers(self, report: Report, *, rehearse: bool) -> list[Notice]:
        host_only = ("swap", "process", "session", "pid1")
        return [
            n
            for n in report.notices
            if n.level == "blocker" and not (rehearse and n.code.startswith(host_only))
        ]

    def switch_options(self, request: RunRequest) -> SwitchOptions:
        # The engine's own options and rules: the Options step's checks are not faked.
        return engine_options(request, target_pid=self.target_pid)

    def install_facts(self, ref: str, report: Report) -> InstallFacts:
        self.facts_read += 1
        notices = [REMOTE_WARNING] if self.install_notices is None else self.install_notices
        return InstallFacts(sample_boot_chain(), INSTALL_NEEDS, list(notices))

    def run(self, request: RunRequest, last_words: Callable[[str], None]) -> Iterator[Event]:
        self.requests.append(request)
        if request.install is not None and not request.rehearse:
            yield from install_events(request)
            return
        for event in rehearsal_events(request):
            if isinstance(event, StepStarted) and event.step == "inject" and not request.rehearse:
                yield from self.login_check(request)
                last_words(
                    f"Point of no return: {HOSTNAME}'s PID 1 is about to become the init stage."
                )
            if isinstance(event, StepStarted) and event.step == "stage" and self.hold is not None:
                self.hold.wait(timeout=30)
            yield event
            if isinstance(event, Finished):
                return

    def login_check(self, request: RunRequest) -> Iterator[Event]:
        """The engine's ssh-check step (sshcheck.proof) as the front-end sees it."""
        port = request.options.ssh_check
        if port is None:
            return
        yield StepStarted("ssh-check", f"Starting the image's sshd in the RAM root on port {port}")
        command = f"ssh -p {port} -o HostKeyAlias=10.0.2.15 root@10.0.2.15"
        yield Notice(
            "info", "ssh-check", f"log in to the new root from another terminal: {command}"
        )
        go = request.ssh_check_go
        went = go(command, self.login) if go is not None else self.login.wait(30)
        self.went.append(went)
        if self.login.is_set():
            yield StepDone("ssh-check", "login by root from 10.0.2.2 (publickey) accepted")
        elif not went:
            raise SafetyRefusal("--ssh-check: the switch was called off", "run it again when ready")
        else:
            yield StepDone("ssh-check", "no login seen, going on as told; sshd stopped")

    def hostname(self) -> str:
        return HOSTNAME

    def processes_by_service(self, processes: list[ProcessInfo]) -> dict[str, list[ProcessInfo]]:
        return processes_by_service(processes)  # the engine's pure grouping, on fixed data

    def lab_mode(self) -> bool:
        return self.lab

    def lab_mode_reason(self) -> str | None:
        return "DBOOT_REHEARSAL_ONLY is set (lab mode)" if self.lab else None

    def switch_target(self) -> int | None:
        return self.target_pid

    def close(self) -> None:
        self.closed += 1
