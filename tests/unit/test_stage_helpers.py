"""The stage's pieces that run anywhere: the log, the import guard, the launcher, the
error formatting, and the refusal to run outside PID 1 (safe on the host: it is the very
first check, before anything happens)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import initstage
from initstage import console, linux, mounts, stage
from initstage.launch import (
    INTERPRETER_FLAGS,
    StageLaunchError,
    package_parent,
    stage_argv,
    stage_files,
)
from initstage.plan import Plan, write_plan

DEBIAN_PYTHON = "/usr/bin/python3"


# The log ------------------------------------------------------------------------------
def test_log_lines_are_prefixed_timestamped_and_replayed_to_a_late_sink(tmp_path: Path):
    ticks = iter([10.0, 10.25, 11.5])
    log = console.StageLog(clock=lambda: next(ticks))
    log("first")
    read_end, write_end = os.pipe()
    try:
        log.add_sink(write_end)
        log("second")
        assert os.read(read_end, 4096).decode() == (
            "dboot-stage: +0.250s first\ndboot-stage: +1.500s second\n"
        )
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_broken_sink_never_breaks_logging():
    log = console.StageLog()
    read_end, write_end = os.pipe()
    os.close(read_end)  # EPIPE on every write (Python ignores SIGPIPE)
    log.add_sink(write_end)
    log.sinks.append(9999)  # EBADF
    log("still fine")
    os.close(write_end)
    assert log.lines[-1].endswith("still fine")


def test_save_appends_only_the_lines_not_saved_yet(tmp_path: Path):
    log = console.StageLog()
    target = tmp_path / "var" / "log" / "dboot.log"
    log("one")
    log.save(str(target))
    log("two")
    log.save(str(target))
    lines = target.read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["one", "two"]
    assert oct(target.stat().st_mode & 0o777) == oct(0o640)


def test_kmsg_reopens_for_a_fresh_rate_limit_budget_and_uses_spares(tmp_path: Path):
    # A regular file stands in for /dev/kmsg: the real one is rate-limited per open file.
    fake_kmsg = tmp_path / "kmsg"
    fake_kmsg.touch()
    kmsg = console.Kmsg(str(fake_kmsg))
    first_fd = kmsg.fd
    for number in range(console.KMSG_BURST + 1):
        kmsg.write(f"line {number}")
    assert kmsg.fd != first_fd and kmsg.written == 1
    # The 11th record went through a fresh open (at offset 0 of this plain file).
    written = fake_kmsg.read_bytes()
    tag = console.KMSG_PRIORITY
    assert written.startswith(tag + b"line 10") and written.endswith(b"line 8" + tag + b"line 9")
    kmsg.stock_spares(2)
    spares = list(kmsg.spares)
    fake_kmsg.unlink()  # as after the pivot: the path no longer opens
    for number in range(console.KMSG_BURST):
        kmsg.write(f"more {number}")
    assert kmsg.fd == spares[-1] and kmsg.spares == spares[:1]


# The import guard ----------------------------------------------------------------------
def test_import_guard_logs_late_imports_then_refuses_them_after_the_pivot():
    log = console.StageLog()
    guard = stage.ImportGuard(log)
    sys.meta_path.insert(0, guard)
    try:
        with pytest.raises(ModuleNotFoundError):
            __import__("dboot_no_such_module_before")
        assert "late import of module dboot_no_such_module_before" in log.lines[-1]
        guard.sealed = True
        with pytest.raises(ImportError, match="imported after the pivot"):
            __import__("dboot_no_such_module_after")
    finally:
        sys.meta_path.remove(guard)


# Small helpers -------------------------------------------------------------------------
def test_describe_error_names_the_frames_without_source_lines():
    def failing() -> None:
        raise OSError(22, "pivot_root('.', '.'): Invalid argument")

    try:
        failing()
    except OSError as error:
        lines = stage.describe_error(error)
    assert lines[0] == "OSError: [Errno 22] pivot_root('.', '.'): Invalid argument"
    assert lines[-1].startswith("  at test_stage_helpers.py:") and lines[-1].endswith(" in failing")
    assert not any("raise OSError" in line for line in lines), "source lines need linecache"


def test_mountinfo_octal_escapes_are_decoded():
    assert mounts.unescape_octal("/run/my\\040root\\011x") == "/run/my root\tx"
    assert mounts.unescape_octal("/plain") == "/plain"


def test_syscall_errors_name_the_call_and_the_path(tmp_path: Path):
    with pytest.raises(OSError) as caught:
        linux.umount2(str(tmp_path / "not-mounted"))
    assert caught.value.errno == errno.ENOENT
    assert f"umount2('{tmp_path}/not-mounted', 0x0)" in str(caught.value)


def test_statfs_type_reads_the_filesystem_magic():
    assert linux.statfs_type("/proc") == linux.PROC_SUPER_MAGIC


def test_close_range_cloexec_marks_without_closing():
    fd = os.open("/dev/null", os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        linux.close_range(fd, fd, cloexec=True)
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_boot_rlimits_are_valid_pairs():
    for limit, (soft, hard) in stage.BOOT_RLIMITS.items():
        infinite = stage.INF
        assert hard == infinite or (soft != infinite and soft <= hard), limit


# The launcher --------------------------------------------------------------------------
def test_stage_argv_is_an_isolated_interpreter_running_the_bootstrap():
    argv = stage_argv("/work/main/.venv/bin/python", "/run/dboot/plan.json")
    assert argv[0] == os.path.realpath("/work/main/.venv/bin/python")
    assert not os.path.islink(argv[0]), "a venv's python symlink must be resolved"
    assert argv[1 : 1 + len(INTERPRETER_FLAGS)] == list(INTERPRETER_FLAGS)
    assert {"-I", "-S"} <= set(argv)
    assert argv[-3] == "-c" and argv[-1] == "/run/dboot/plan.json"
    assert f"sys.path.append({package_parent()!r})" in argv[-2]
    assert package_parent() == str(Path(initstage.__file__).resolve().parent.parent)


def plan_file(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    write_plan(Plan(new_root=str(tmp_path / "root"), init_argv=["/sbin/init"]), state / "p.json")
    return state / "p.json"


@pytest.mark.parametrize("python", [sys.executable, DEBIAN_PYTHON], ids=["venv", "debian"])
def test_the_stage_refuses_outside_pid_1_and_does_nothing(tmp_path: Path, python: str):
    plan = plan_file(tmp_path)
    sleeper = subprocess.Popen(["sleep", "60"])
    mounts_before = Path("/proc/self/mountinfo").read_text()
    try:
        done = subprocess.run(
            stage_argv(python, str(plan)), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 1
        assert "refusing to run as pid" in done.stderr and "only runs as PID 1" in done.stderr
        assert done.stdout == ""
        assert sleeper.poll() is None, "a process was killed"
        assert Path("/proc/self/mountinfo").read_text() == mounts_before
        assert not (tmp_path / "root").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_python_m_initstage_refuses_too(tmp_path: Path):
    done = subprocess.run(
        [sys.executable, "-m", "initstage", str(plan_file(tmp_path))],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=package_parent(),
    )
    assert done.returncode == 1 and "only runs as PID 1" in done.stderr


def test_main_refuses_before_touching_anything(capfd: pytest.CaptureFixture[str]):
    started = time.monotonic()
    assert stage.main(["/nonexistent/plan.json"]) == 1
    assert "refusing to run as pid" in capfd.readouterr().err
    assert time.monotonic() - started < 1


def test_stage_from_a_pipx_like_venv_of_debians_python(tmp_path: Path):
    """A venv made by Debian's python (as pipx does), initstage in its site-packages: the
    launcher points at that site-packages and the real interpreter, not the symlink."""
    venv = tmp_path / "venv"
    subprocess.run([DEBIAN_PYTHON, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    subprocess.run(["cp", "-r", str(Path(initstage.__file__).parent), str(site)], check=True)
    argv = stage_argv(str(venv / "bin" / "python"), str(plan_file(tmp_path)), parent=str(site))
    assert argv[0] == os.path.realpath(DEBIAN_PYTHON)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "only runs as PID 1" in done.stderr, done.stderr
    files = stage_files(str(venv / "bin" / "python"), parent=str(site))
    assert str(site / "initstage" / "stage.py") in files
    assert not any("/work/main/" in path for path in files), "the checkout leaked in"


def test_stage_files_lists_what_the_stage_process_needs():
    files = stage_files()
    stdlib = Path(os.__file__).parent
    assert files == sorted(files) and all(Path(path).is_absolute() for path in files)
    assert all(Path(path).exists() for path in files)
    assert os.path.realpath(sys.executable) in files
    assert str(Path(initstage.__file__).parent / "stage.py") in files
    assert str(stdlib / "json" / "decoder.py") in files
    assert any(Path(path).name.startswith("_ctypes") for path in files), "extension modules"
    assert any(Path(path).name.startswith("libc.so") for path in files), "shared libraries"
    assert not any("site-packages" in path for path in files), "the stage needs no site-packages"


@pytest.mark.parametrize("how", ["missing-interpreter", "unimportable-stage"])
def test_a_stage_that_cannot_be_listed_is_one_error_with_cause_and_fix(tmp_path: Path, how: str):
    """Not a RuntimeError or FileNotFoundError traceback: a StageLaunchError with a cause
    and a fix, which the injector turns into its EnvironmentFailure (one line, exit 2)."""
    if how == "missing-interpreter":
        args: dict[str, str] = {"python": str(tmp_path / "no-python")}
        cause = "cannot run"
    else:
        args = {"parent": str(tmp_path / "no-initstage-here")}
        cause = "cannot import the init stage (ModuleNotFoundError"
    with pytest.raises(StageLaunchError) as caught:
        stage_files(args.get("python"), parent=args.get("parent"))
    message = str(caught.value)
    assert cause in caught.value.cause and "reinstall docker-boot" in caught.value.fix
    assert "\n" not in message and message == f"{caught.value.cause}: {caught.value.fix}"


def test_switch_maps_the_launch_error_to_an_environment_failure(
    monkeypatch: pytest.MonkeyPatch,
):
    from injector import switch
    from injector.errors import EnvironmentFailure

    def broken(*_args: object, **_kwargs: object) -> list[str]:
        raise StageLaunchError("python cannot import the init stage (PermissionError)", "fix")

    monkeypatch.setattr(switch, "stage_files", broken)
    with pytest.raises(EnvironmentFailure, match=r"cannot import the init stage .*: fix"):
        switch._stage_command(os.getpid(), Path("/run/dboot/plan.json"))


# The mount table and the jobs under a deadline -------------------------------------------
MOUNTINFO = (
    b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n"
    b"42 27 254:0 /var/lib/docker /var/lib/docker rw,nosuid,nodev shared:1 - ext4 /dev/vda rw\n"
    b"50 27 0:40 / /mnt/my\\040disk ro,noexec - btrfs /dev/sdb1 ro,space_cache\n"
    b"51 27 0:41 / /run/dboot/root rw - tmpfs dboot rw,size=64m\n"
    b"41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)


def test_mountinfo_parsing_and_the_questions_the_stage_asks():
    table = mounts.parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in table] == [
        "/",
        "/var/lib/docker",
        "/mnt/my disk",
        "/run/dboot/root",
        "/sys/fs/cgroup/unified",
    ]
    assert [m.block_backed for m in table] == [True, True, True, False, False]
    assert [m.flushable for m in table] == [True, True, True, False, False]
    assert [m.mount_point for m in mounts.one_per_superblock(table)] == [
        "/",
        "/mnt/my disk",
        "/run/dboot/root",
        "/sys/fs/cgroup/unified",
    ]
    assert table[1].flags() == linux.MS_NOSUID | linux.MS_NODEV
    assert table[2].read_only and table[2].flags() == linux.MS_NOEXEC
    assert mounts.mount_of("/run/dboot/root/etc", table) == table[3]
    assert mounts.mount_of("/var/lib/docker/x", table) == table[1]
    assert table[4].super_options == ("rw",) and table[0].root == "/"
    assert table[3].is_under("/run/dboot/root") and not table[0].is_under("/run/dboot/root")


def test_jobs_that_hang_are_named_at_the_deadline_and_the_rest_report():
    from initstage.children import run_jobs

    def hangs() -> str:
        time.sleep(60)
        return ""

    def fails() -> str:
        raise OSError(errno.EIO, "syncfs('/mnt/nfs'): Input/output error")

    started = time.monotonic()
    outcome = run_jobs(
        [("fine", lambda: "done"), ("hangs", hangs), ("fails", fails)],
        1.0,  # a forked child of a busy machine's pytest may take a while to start
        time.monotonic,
        time.sleep,
    )
    took = time.monotonic() - started
    # The deadline is kept, and the hung job does not hold the call for its 60 s.
    assert 1.0 <= took < 10.0 and 1.0 <= outcome.seconds < 10.0
    assert [job.label for job in outcome.unfinished] == ["hangs"]
    assert [(job.label, job.message) for job in outcome.failed] == [
        ("fails", "[Errno 5] syncfs('/mnt/nfs'): Input/output error")
    ]
    assert outcome.results[0].ok and outcome.results[0].message == "done"
    # The hung child was killed: gone, though it meant to sleep for 60 s.
    assert_killed(outcome.unfinished[0].pid)


def test_progress_extends_the_deadline_but_only_so_far():
    from initstage.children import MAX_EXTENSIONS, run_jobs

    def hangs() -> str:
        time.sleep(60)
        return ""

    outcome = run_jobs([("slow", hangs)], 0.2, time.monotonic, time.sleep, lambda _jobs: True)
    assert MAX_EXTENSIONS * 0.2 <= outcome.seconds < MAX_EXTENSIONS * 0.2 + 5.0  # not 60 s
    assert_killed(outcome.unfinished[0].pid)


def assert_killed(pid: int) -> None:
    """run_jobs SIGKILLs a job past the deadline and reaps it if it is already gone; if not,
    we reap it here, and then its status says SIGKILL."""
    with contextlib.suppress(ChildProcessError):
        _pid, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert not os.path.exists(f"/proc/{pid}")


def test_a_superblock_remount_is_refused_outside_the_machines_pid_1():
    """Built in PID 1 before any child runs it: here (not the machine's PID 1) the job is
    never even made, so nothing can remount the host's filesystem read-only."""
    root = mounts.mount_of("/", mounts.read_mounts())
    assert root is not None
    with pytest.raises(stage.StageError, match="refusing a superblock remount"):
        stage._remount_job(root, superblock=True)
