"""The init stage for real, as PID 1 of a fresh PID + mount namespace (never the host's).

Each test builds a busybox root in a tmpfs that is mounted inside the test's own mount
namespace, so nothing reaches the host's mount table: a wrapper shell (PID 1 of the new
namespace) mounts the tmpfs, fills it, starts some "services", then execs the stage with
``initstage.launch.stage_argv``. The stage's log arrives on stderr, the image init's
output on stdout, each line time-stamped on arrival.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from initstage import hermetic
from initstage.launch import stage_argv
from initstage.plan import Plan, write_plan

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, mounts"),
]

BUSYBOX = "/bin/busybox"
TMPFS_SOURCE = "dboot-stage-test"  # a name to find our mounts by, should one ever leak
WRAPPER_MARK = "WRAPPER-EXECS-STAGE"
DEBIAN_PYTHON = "/usr/bin/python3"
# A sandbox's API mounts: /proc/sys (and /proc/sysrq-trigger, where the kernel has it) bound
# read-only, a read-only /sys with the delegated cgroup2 under it (initstage/hermetic.py).
SANDBOX_API_MOUNTS = [
    "/",
    "/proc",
    *[path for path in hermetic.READ_ONLY_PROC_PATHS if os.path.exists(path)],
    "/sys",
    "/sys/fs/cgroup",
    "/dev",
    "/dev/pts",
]


@dataclass
class StageRun:
    returncode: int
    stdout: list[tuple[float, str]]  # (arrival time, line)
    stderr: list[tuple[float, str]]
    started: float
    log_lines: list[str] = field(default_factory=list)

    @property
    def out(self) -> str:
        return "\n".join(line for _, line in self.stdout)

    @property
    def err(self) -> str:
        return "\n".join(line for _, line in self.stderr)

    def arrival(self, pattern: str) -> float:
        """When the first stdout line matching ``pattern`` arrived."""
        for arrived, line in self.stdout:
            if re.search(pattern, line):
                return arrived
        raise AssertionError(f"no stdout line matches {pattern!r}:\n{self.out}\n{self.err}")


def build_busybox_tree(root: Path, *, with_shell: bool = True) -> None:
    """A busybox-static root: relative applet symlinks, as scripts/build-tinybox.sh does."""
    for directory in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "root"):
        (root / directory).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox" and (with_shell or applet not in ("sh", "ash")):
            (root / "bin" / applet).symlink_to("busybox")


@pytest.fixture(scope="session")
def busybox_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not os.access(BUSYBOX, os.X_OK):
        pytest.fail(f"{BUSYBOX} missing: apt-get install busybox-static")
    tree = tmp_path_factory.mktemp("busybox") / "tree"
    build_busybox_tree(tree)
    return tree


def host_mount_sources() -> str:
    return Path("/proc/self/mountinfo").read_text()


def _pump(stream, sink: list[tuple[float, str]]) -> None:
    for raw in iter(stream.readline, b""):
        sink.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))


def run_stage(
    tmp_path: Path,
    tree: Path | None,
    plan: Plan,
    *,
    before: str = "",
    stdin: str = "",
    python: str = sys.executable,
    parent: str | None = None,
    harness: str | None = None,
    mount_root: bool = True,
    tamper: str = "",
    timeout: float = 30.0,
    while_running: object = None,
    end_when: object = None,
) -> StageRun:
    """Run the stage as PID 1 of a new PID+mount namespace and wait for the namespace to end.

    ``before``: shell run by the wrapper (PID 1) before it execs the stage: start services.
    ``harness``: Python code to exec instead of the real bootstrap (it gets the plan path).
    ``tamper``: shell run on the plan file after it was written. ``while_running``: a
    callable given the StageRun so far, called in a loop until it returns True (to thaw
    a frozen process once the init is up, say). ``end_when``: the same, but True ends the
    namespace (for a PID 1 that never ends by itself, a supervised shell say); the
    returncode is then -9.
    """
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    root = Path(plan.new_root)
    root.mkdir(exist_ok=True)
    plan_path = state / "plan.json"
    write_plan(plan, plan_path)
    argv = stage_argv(python, str(plan_path), parent=parent)
    if harness is not None:
        argv = [argv[0], "-I", "-S", "-c", harness, str(plan_path)]
    fill = f"cp -a {shlex.quote(str(tree))}/. {shlex.quote(str(root))}/" if tree else ":"
    wrapper = tmp_path / "wrapper.sh"
    quoted_root = shlex.quote(str(root))
    mount = (
        f"mount -t tmpfs -o size=64m,mode=0755 {TMPFS_SOURCE} {quoted_root}" if mount_root else ""
    )
    wrapper.write_text(
        f"set -e\n{mount}\n{fill}\n{tamper}\n{before}\n"
        f"echo {WRAPPER_MARK}\nexec {shlex.join(argv)}\n"
    )
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--uts", "--ipc"]
    command += ["--propagation", "private", "--", "/bin/sh", str(wrapper)]
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    run = StageRun(returncode=-1, stdout=[], stderr=[], started=started)
    pumps = [
        threading.Thread(target=_pump, args=(process.stdout, run.stdout), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, run.stderr), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        assert process.stdin is not None
        process.stdin.write(stdin.encode())
        process.stdin.close()
        deadline = started + timeout
        if callable(while_running):
            while time.monotonic() < deadline and process.poll() is None:
                if while_running(run):
                    break
                time.sleep(0.02)
        if callable(end_when):
            while time.monotonic() < deadline and process.poll() is None:
                if end_when(run):
                    process.send_signal(signal.SIGKILL)  # our unshare: its PID 1 goes too
                    break
                time.sleep(0.02)
        try:
            run.returncode = process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"no end in {timeout:g} s:\n{run.err}\n{run.out}") from None
    finally:
        if process.poll() is None:
            # Our own unshare, by pid: --kill-child takes the namespace's PID 1 with it.
            process.send_signal(signal.SIGKILL)
            process.wait()
        for pump in pumps:
            pump.join(timeout=5)
    assert TMPFS_SOURCE not in host_mount_sources(), "a test tmpfs leaked into the host"
    run.log_lines = [line for _, line in run.stderr if "dboot-stage: " in line]
    return run


def plan_for(tmp_path: Path, init_argv: list[str], **overrides: object) -> Plan:
    settings: dict[str, object] = {"grace_seconds": 1.0, "minimal_dev": True}
    settings.update(overrides)
    return Plan(new_root=str(tmp_path / "root"), init_argv=init_argv, **settings)  # type: ignore[arg-type]


SERVICES = "sleep 1000 & sleep 1000 & (sleep 1000; echo never) & sleep 1000 &\n"


def step_numbers(lines: list[str]) -> list[int]:
    return [int(match.group(1)) for line in lines if (match := re.search(r"step (\d)/8", line))]


@pytest.mark.parametrize("python", [sys.executable, DEBIAN_PYTHON], ids=["venv", "debian"])
def test_stage_execs_the_image_init_as_pid1(tmp_path: Path, busybox_tree: Path, python: str):
    if not os.access(python, os.X_OK):
        pytest.fail(f"{python} missing: the stage must run on Debian's python3 too")
    init = (
        "echo pid=$$; tr '\\0' ' ' < /proc/1/cmdline; echo; echo pids: /proc/[0-9]*;"
        " echo mounts:; cut -d' ' -f5 /proc/self/mountinfo; echo log:; cat /var/log/dboot.log"
    )
    kmsg = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(kmsg, 0, os.SEEK_END)
    try:
        run = run_stage(
            tmp_path,
            busybox_tree,
            plan_for(tmp_path, ["/bin/sh", "-c", init]),
            before=SERVICES,
            python=python,
        )
        kernel_log = read_kmsg(kmsg)
    finally:
        os.close(kmsg)
    assert run.returncode == 0, run.err
    out = run.out
    assert "pid=1" in out
    assert f"/bin/sh -c {init}" in out, "PID 1 is not the image's /bin/sh"
    # The wrapper's services are gone: only PID 1 itself is left in /proc.
    assert "pids: /proc/1\n" in out + "\n"
    mounts = out.split("mounts:\n")[1].split("log:\n")[0].split()
    assert mounts == SANDBOX_API_MOUNTS, "the old root is still mounted"
    saved_log = out.split("log:\n")[1]
    assert step_numbers(saved_log.splitlines()) == [1, 2, 3, 4, 5, 6, 7]
    assert step_numbers(run.log_lines) == [1, 2, 3, 4, 5, 6, 7]
    assert "5 processes at the start" in run.err  # 4 sleeps and a subshell
    assert "late import" not in run.err, "the stage imported a module after starting"
    # Every step also reached the kernel log, in order. Only this run's lines count: other
    # sessions on the machine may run stages (rehearsals) that log there at the same time.
    ours = set(run.log_lines)
    kernel_log = [record for record in kernel_log if record in ours]
    assert step_numbers(kernel_log) == [1, 2, 3, 4, 5, 6, 7], kernel_log


def read_kmsg(fd: int) -> list[str]:
    """dboot-stage records that arrived in the kernel log after ``fd`` was positioned."""
    records: list[str] = []
    while True:
        try:
            record = os.read(fd, 8192).decode("utf-8", "replace")
        except BlockingIOError:
            return records
        except BrokenPipeError:  # EPIPE: overwritten while we read; keep going
            continue
        message = record.split(";", 1)[-1].strip()
        # /dev/kmsg writes a backslash and unprintable bytes as \xNN: undo that.
        message = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), message)
        if message.startswith("dboot-stage: "):
            records.append(message)


def test_a_process_ignoring_sigterm_is_killed_after_the_grace_period(
    tmp_path: Path, busybox_tree: Path
):
    grace = 0.5
    stubborn = "sh -c 'trap \"\" TERM; exec sleep 1000' &\nsleep 0.1\n"
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/echo", "INIT-UP"], grace_seconds=grace),
        before=SERVICES + stubborn,
    )
    assert run.returncode == 0, run.err
    assert re.search(
        r"1 still running after the 0\.5 s grace period, SIGKILL: pid \d+ \(sleep\)", run.err
    ), run.err
    term_ms = float(re.search(r"SIGTERM phase ([\d.]+) ms", run.err).group(1))  # type: ignore[union-attr]
    total_ms = float(re.search(r"([\d.]+) ms in all", run.err).group(1))  # type: ignore[union-attr]
    downtime = run.arrival("INIT-UP") - run.arrival(WRAPPER_MARK)
    print(
        f"\nSIGTERM phase {term_ms:.1f} ms, kill step {total_ms:.1f} ms, init up {downtime:.3f} s"
    )
    assert grace * 1000 <= term_ms < grace * 1000 + 50
    assert total_ms < grace * 1000 + 100, "SIGKILL did not end it promptly"
    assert grace <= downtime < grace + 1.0


TAMPERING = {
    "world-writable": ("chmod 0646 {plan}", "group- or world-writable"),
    "wrong-owner": ("chown 65534 {plan}", "owned by uid 65534"),
    "unknown-version": (
        'sed -i \'s/"version": 1/"version": 2/\' {plan}',
        "plan version 2 is unknown",
    ),
}


@pytest.mark.parametrize("how", sorted(TAMPERING))
def test_a_tampered_plan_is_refused_and_a_recovery_shell_opens(
    tmp_path: Path, busybox_tree: Path, how: str
):
    command, reason = TAMPERING[how]
    plan_path = tmp_path / "state" / "plan.json"
    service_pid = tmp_path / "service.pid"  # the service must survive: the stage does nothing
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh"]),
        before=f"sleep 1000 & echo $! > {service_pid}",
        tamper=command.format(plan=plan_path),
        stdin=(
            "echo RECOVERY-MARKER pid=$$ ppid=$PPID;"
            f" kill -0 $(cat {service_pid}) && echo SERVICE-ALIVE\n"
        ),
        end_when=lambda run: "recovery shell exited (1)" in run.err,
    )
    assert "FAILED at step 1/8" in run.err and reason in run.err, run.err
    assert "recovery shell /bin/sh from the old root" in run.err
    # A plan it refused cannot say "sandbox": the shell is supervised, as on the machine.
    assert "respawned when it exits (no trusted plan)" in run.err
    assert re.search(r"RECOVERY-MARKER pid=(?!1 )\d+ ppid=1$", run.out, re.M), run.out
    assert "recovery shell exited (1): another in 1 s" in run.err
    assert "SERVICE-ALIVE" in run.out, "the stage acted on a plan it refused"
    assert 2 not in step_numbers(run.log_lines)


def test_a_missing_init_opens_the_new_roots_shell(tmp_path: Path, busybox_tree: Path):
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/sbin/no-such-init"]),
        before=SERVICES,
        stdin="echo RECOVERY-MARKER pid=$$ exe=$(readlink /proc/1/exe); cat /var/log/dboot.log\n",
    )
    assert "the image's init /sbin/no-such-init is missing" in run.err
    assert "recovery shell /bin/sh from the new root" in run.err
    assert "RECOVERY-MARKER pid=1 exe=/bin/busybox" in run.out, run.out + run.err
    assert "FAILED at step 7/8" in run.out, "the log in the new root lacks the failure"
    assert "late import" not in run.err and "after the pivot" not in run.err
    assert run.returncode == 0


def test_without_a_shell_in_the_new_root_recovery_uses_the_old_root(tmp_path: Path):
    # The new root is an empty tmpfs: no init, no /bin/sh. The stage chroots back into the
    # detached old root (through the fd it kept) and runs the host's /bin/sh there.
    run = run_stage(
        tmp_path,
        None,
        plan_for(tmp_path, ["/sbin/init"]),
        stdin="echo RECOVERY-MARKER pid=$$; test -x /usr/bin/dpkg && echo OLD-ROOT\n",
    )
    assert "the new root has no /bin/sh" in run.err, run.err
    assert "recovery shell /bin/sh from the old root" in run.err
    assert "RECOVERY-MARKER pid=1" in run.out and "OLD-ROOT" in run.out, run.out + run.err


def test_a_stage_that_cannot_be_imported_still_leaves_pid1_alive(tmp_path: Path, busybox_tree):
    # The bootstrap never execs the shell as PID 1 (its exit would panic the machine):
    # the shell is a child, and a new one starts each time it exits.
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh"]),
        parent=str(tmp_path / "no-initstage-here"),
        stdin="echo RECOVERY-MARKER pid=$$ ppid=$PPID; exit 3\n",
        end_when=lambda run: "recovery shell exited (2)" in run.err,
    )
    assert "cannot load the init stage: ModuleNotFoundError" in run.err, run.err
    assert re.search(r"RECOVERY-MARKER pid=(?!1 )\d+ ppid=1$", run.out, re.M), run.out
    assert "recovery shell exited (1): another in 1 s" in run.err
    assert "recovery shell exited (2): another in 1 s" in run.err
    assert run.returncode == -signal.SIGKILL, "PID 1 ended before we ended it"


PIVOT_ROOT_REFUSED = """
import errno, sys
sys.path.insert(0, {parent!r})
from initstage import linux, stage

def pivot_root_as_on_rootfs(new_root: str, put_old: str) -> None:
    raise OSError(errno.EINVAL, "pivot_root: Invalid argument (faked)")

linux.pivot_root = pivot_root_as_on_rootfs
stage.root_is_initramfs = lambda: {initramfs!r}
sys.exit(stage.main(sys.argv[1:]))
"""


def test_when_pivot_root_is_impossible_the_stage_moves_the_root_and_chroots(
    tmp_path: Path, busybox_tree: Path
):
    # pivot_root fails with EINVAL on rootfs (an initramfs), which cannot be made here:
    # that call and the "/ is rootfs" answer are faked; the MS_MOVE and chroot are real.
    from initstage.launch import package_parent

    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", "echo pid=$$; ls /bin/busybox; echo /proc/[0-9]*"]),
        before=SERVICES,
        harness=PIVOT_ROOT_REFUSED.format(parent=package_parent(), initramfs=True),
    )
    assert run.returncode == 0, run.err
    assert "pivot_root impossible (pivot_root: Invalid argument (faked)): MS_MOVE + chroot" in (
        run.err
    )
    assert "pid=1\n/bin/busybox\n/proc/1" in run.out


def test_pivot_root_einval_on_a_root_that_is_no_initramfs_is_a_failure_not_a_chroot(
    tmp_path: Path, busybox_tree: Path
):
    # Only rootfs justifies MS_MOVE + chroot. Anywhere else an EINVAL is a real fault: a
    # chroot would leave the old root mounted under a process that thinks it is gone.
    from initstage.launch import package_parent

    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", "echo INIT-RAN"]),
        harness=PIVOT_ROOT_REFUSED.format(parent=package_parent(), initramfs=False),
        stdin="echo RECOVERY-MARKER\n",
    )
    assert "MS_MOVE + chroot" not in run.err, run.err
    assert "FAILED at step 5/8" in run.err and "pivot_root: Invalid argument (faked)" in run.err
    assert "RECOVERY-MARKER" in run.out and "INIT-RAN" not in run.out


OLD_INIT_STATE = """
import json, os, resource, signal, sys
# What an old init may leave to an execve'd PID 1: blocked and ignored signals, odd limits.
signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP}})
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
# And one that Python cannot set: libc's reserved signal 32, ignored (seen from a CI runner).
import ctypes
class KernelSigaction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("flags", ctypes.c_ulong),
                ("restorer", ctypes.c_void_p), ("mask", ctypes.c_uint64)]
SIG_IGN, SYS_RT_SIGACTION = 1, {{"x86_64": 13, "aarch64": 134}}[os.uname().machine]
ignore = KernelSigaction(SIG_IGN, 0, None, 0)
assert ctypes.CDLL(None).syscall(SYS_RT_SIGACTION, 32, ctypes.byref(ignore), None, 8) == 0
# Below the boot values and within the hard limit: raising a hard limit needs
# CAP_SYS_RESOURCE, which a real PID 1 has and some CI containers lack.
resource.setrlimit(resource.RLIMIT_NOFILE, (100, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
os.umask(0o077)
leaked = os.open("/dev/null", os.O_RDONLY)
os.set_inheritable(leaked, True)  # an fd the old init forgot to mark close-on-exec
os.environ["OLD_INIT_SECRET"] = "1"
argv = json.loads({argv!r})
os.execve(argv[0], argv, os.environ)
"""


def test_the_image_init_starts_with_a_clean_process_state(tmp_path: Path, busybox_tree: Path):
    # busybox sh ignores SIGQUIT for itself: the signals are read by an exec'd cat, which
    # gets exactly what the stage handed over (sh resets only its own ignores on exec).
    report = "umask; ls /proc/1/fd; env | sort; exec cat /proc/self/status /proc/self/limits"
    plan = plan_for(tmp_path, ["/bin/sh", "-c", report], init_env={"container": "dboot"})
    real_argv = stage_argv(sys.executable, str(tmp_path / "state" / "plan.json"))
    run = run_stage(
        tmp_path, busybox_tree, plan, harness=OLD_INIT_STATE.format(argv=json.dumps(real_argv))
    )
    assert run.returncode == 0, run.err
    out = run.out.splitlines()
    assert out[1:5] == ["0022", "0", "1", "2"], f"umask, or fds beyond stdio: {run.out}"
    env = out[5 : out.index("container=dboot") + 1]
    assert [line.split("=")[0] for line in env] == ["PATH", "PWD", "SHLVL", "TERM", "container"]
    assert "SigBlk:\t0000000000000000" in out and "SigIgn:\t0000000000000000" in out, run.out
    assert re.search(r"Max open files\s+1024\s+4096\s+files", run.out), run.out


def test_a_new_root_that_is_no_mount_point_is_bind_mounted_onto_itself(
    tmp_path: Path, busybox_tree: Path
):
    # pivot_root needs a mount point; a plain directory (here on the host's disk, under
    # tmp_path) is bind-mounted onto itself inside the stage's private mount namespace.
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", "echo pid=$$; cut -d' ' -f5 /proc/self/mountinfo"]),
        mount_root=False,
    )
    assert run.returncode == 0, run.err
    assert "was not a mount point: bind-mounted onto itself" in run.err
    assert run.out.split()[1:] == ["pid=1", *SANDBOX_API_MOUNTS], run.out
    assert (tmp_path / "root" / "var" / "log" / "dboot.log").exists()


def test_no_api_mounts_leaves_the_new_root_bare(tmp_path: Path, busybox_tree: Path):
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", "echo in: /proc/*"], api_mounts=False),
    )
    assert run.returncode == 0, run.err
    assert "in: /proc/*" in run.out, "something was mounted on /proc"
    assert "API filesystems: not mounted" in run.err


SUPERVISED_RECOVERY = """
import os, sys
sys.path.insert(0, {parent!r})
from initstage.console import Console, StageLog
from initstage.stage import Stage, StageError
stage = Stage("", StageLog())
stage.log.add_sink(2)
# As on the real machine, but with our pipe as the console: the host's VTs stay untouched.
stage.machine_init = True
stage.console = Console(stdio=os.dup(0))
stage.recover(StageError("test: a failure on the real machine"))
"""


def test_on_the_real_machine_the_recovery_shell_is_respawned_not_execd(tmp_path: Path):
    # The machine's PID 1 cannot be used here: a harness makes a namespace's PID 1 take
    # the real machine's recovery path (machine_init forced), the only thing faked. Its
    # "console" is a socket, read and written like a terminal would be.
    from initstage.launch import package_parent

    code = SUPERVISED_RECOVERY.format(parent=package_parent())
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount", "--propagation"]
    command += ["private", "--", sys.executable, "-I", "-S", "-c", code]
    ours, theirs = socket.socketpair()
    process = subprocess.Popen(command, stdin=theirs.fileno(), stderr=subprocess.PIPE)
    theirs.close()
    run = StageRun(returncode=-1, stdout=[], stderr=[], started=time.monotonic())
    console_file = ours.makefile("rb")
    pumps = [
        threading.Thread(target=_pump, args=(console_file, run.stdout), daemon=True),
        threading.Thread(target=_pump, args=(process.stderr, run.stderr), daemon=True),
    ]
    for pump in pumps:
        pump.start()
    try:
        ours.sendall(b"echo SHELL-ONE pid=$$ ppid=$PPID; exit 3\n")
        ours.shutdown(socket.SHUT_WR)  # the next shells read EOF and exit at once
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and "exited (2)" not in run.err:
            time.sleep(0.05)
        assert process.poll() is None, f"PID 1 ended when its shell did:\n{run.err}"
    finally:
        process.kill()
        process.wait()
        ours.close()
        for pump in pumps:
            pump.join(timeout=5)
    assert "recovery shell /bin/sh from the old root" in run.err
    assert "recovery shell exited (1): another in 1 s" in run.err, run.err
    assert "recovery shell exited (2)" in run.err
    assert re.search(r"SHELL-ONE pid=\d+ ppid=1$", run.out, re.M), run.out


@pytest.fixture(autouse=True)
def _no_leftover_processes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After each test the namespace is gone: no process of ours runs a stage any more.
    Ours: its command line names a plan under this session's temporary directory (other
    sessions on the machine may run rehearsals, whose stages are theirs)."""
    yield
    base = str(tmp_path_factory.getbasetemp()).encode()
    mine = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_leftover(int(pid), base)]
    assert not mine, f"leftover stage processes: {mine}"


def _is_leftover(pid: int, base: bytes) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    ours = base in cmdline
    return ours and (b"initstage.stage" in cmdline or TMPFS_SOURCE.encode() in cmdline)
