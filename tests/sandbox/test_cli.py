"""The CLI contract, end to end, as scripts use it: real engine, real tinybox image.

Every `dboot` here runs as a subprocess of the installed console script with lab mode on,
so no path can reach this machine's PID 1.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))
LAB_ENV = {**os.environ, "DBOOT_REHEARSAL_ONLY": "1"}


def dboot(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DBOOT, *args],
        capture_output=True,
        text=True,
        env=env or LAB_ENV,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dboot: ")
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def mountinfo() -> str:
    return Path("/proc/self/mountinfo").read_text()


def mounts_under(path: Path, pid: int | str = "self") -> list[str]:
    """Mount points at or under ``path`` in ``pid``'s mount namespace. Other tests' mounts
    (dockerd's overlays, their sandboxes) come and go meanwhile: only ours are compared."""
    points = [line.split()[4] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()]
    return [point for point in points if point == str(path) or point.startswith(f"{path}/")]


def test_images_json_lists_tinybox() -> None:
    result = dboot("images", "--json")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    tinybox = [row for row in rows if row["repository"] == "tinybox"]
    assert tinybox and tinybox[0]["tag"] == "latest"
    assert tinybox[0]["id"].startswith("sha256:")
    assert tinybox[0]["size"] > 1_000_000


def test_images_human_has_header_and_tinybox() -> None:
    result = dboot("images")
    assert result.returncode == 0, result.stderr
    header, *rows = result.stdout.splitlines()
    assert header.split()[:2] == ["REPOSITORY", "TAG"]
    assert any(row.split()[:2] == ["tinybox", "latest"] for row in rows)


def test_engine_down_is_one_line_exit_2() -> None:
    result = dboot("images", env={**LAB_ENV, "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert_one_line_error(result, 2)


def test_check_passes_on_tinybox_and_changes_nothing() -> None:
    before = mountinfo()
    result = dboot("check", "--json", "tinybox", "/sbin/init")
    assert result.returncode in (0, 3), result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    verdict = events[-1]
    assert verdict["event"] == "verdict"
    assert result.returncode == (3 if verdict["blocked"] else 0)
    sections = {e["section"] for e in events if e["event"] == "fact"}
    assert {"ram", "swap", "processes", "pid1"} <= sections
    assert mountinfo() == before


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("check", "no-such-image:never"), 1, ("no-such-image",)),
        (("check", "tinybox", "sbin/init"), 1, ("absolute",)),
        (("check", "tinybox", "/sbin/no-such-init"), 1, ("/sbin/no-such-init",)),
        (("check", "docker-archive:/nonexistent.tar"), 1, ("/nonexistent.tar",)),
        (("switch", "--yes", "tinybox", "/sbin/init"), 3, ("lab mode",)),
        (("switch", "--target-pid", "1", "--yes", "tinybox", "/sbin/init"), 3, ("lab mode",)),
        (
            ("switch", "--target-pid", "999999999", "--yes", "tinybox", "/sbin/init"),
            2,
            ("999999999",),
        ),
        (("rehearse", "tinybox"), 1, ("init",)),
    ],
)
def test_bad_input_exit_codes(args: tuple[str, ...], code: int, words: tuple[str, ...]) -> None:
    assert_one_line_error(dboot(*args), code, *words)


def test_corrupt_archive_is_bad_input(tmp_path: Path) -> None:
    archive = tmp_path / "corrupt.tar"
    archive.write_bytes(b"this is not a tar archive at all" * 100)
    assert_one_line_error(dboot("check", f"rootfs:{archive}"), 1, str(archive))


def test_truncated_docker_archive_is_bad_input(tmp_path: Path) -> None:
    saved = tmp_path / "tinybox.tar"
    subprocess.run(["docker", "save", "-o", str(saved), "tinybox:latest"], check=True)
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(saved.read_bytes()[: saved.stat().st_size // 3])
    assert_one_line_error(dboot("check", f"docker-archive:{truncated}"), 1, str(truncated))


def test_not_root_exits_2() -> None:
    result = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", DBOOT, "check", "tinybox"],
        capture_output=True,
        text=True,
        env=LAB_ENV,
        timeout=60,
    )
    assert_one_line_error(result, 2, "root")


def test_dry_run_undoes_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    before = mountinfo()
    # --force: on some hosts (this one: a Firecracker VM) the kernel forbids ptrace of the
    # real PID 1, a blocker for the real switch; the dry run must still walk every step.
    result = dboot(
        "switch",
        "--dry-run",
        "--force",
        "--json",
        "--state-dir",
        str(state),
        "tinybox",
        "/sbin/init",
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    steps = [e["step"] for e in events if e["event"] == "step_done"]
    assert steps == ["source", "preflight", "ramroot"]
    assert events[-1] == {
        "event": "finished",
        "outcome": "dry-run",
        "exit_status": None,
        "detail": events[-1]["detail"],
    }
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert mountinfo() == before
    assert not state.exists()  # made for the run (its subdirectory too), and removed


def test_rehearse_runs_the_images_own_shell_as_pid_1() -> None:
    before = mountinfo()
    result = dboot("rehearse", "tinybox", "/bin/sh", "-c", "echo $$; cat /proc/1/cmdline; exit 7")
    assert result.returncode == 7, result.stderr + result.stdout
    lines = result.stdout.splitlines()
    assert "1" in lines
    assert any(line.startswith("/bin/sh") for line in lines), lines
    assert mountinfo() == before


def test_rehearse_json_reports_the_injection() -> None:
    result = dboot("rehearse", "--json", "tinybox", "/bin/sh", "-c", "true")
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    injection = next(e for e in events if e["event"] == "injection")
    assert injection["interrupted_syscall"]
    assert injection["registers_before"] != injection["registers_after"]
    assert events[-1]["outcome"] == "rehearsed" and events[-1]["exit_status"] == 0


def test_a_failed_step_is_an_event_then_the_one_line_error() -> None:
    result = dboot("rehearse", "--json", "tinybox", "/sbin/no-such-init")
    assert_one_line_error(result, 1, "/sbin/no-such-init")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    # A run SIGKILLed earlier (another test's) may have left its directory in the default
    # state dir: that warning may come first, and is not what this test is about.
    events = [e for e in events if e.get("code") != "state-dir-leftover"]
    assert events[0] == {
        "event": "step_started",
        "step": "source",
        "title": "Reading image tinybox",
    }
    assert events[-1]["event"] == "step_failed" and events[-1]["step"] == "source"
    assert "/sbin/no-such-init" in events[-1]["error"]
    human = dboot("rehearse", "tinybox", "/sbin/no-such-init")
    assert human.stdout.splitlines()[-1] == "    source failed"  # the cause is on stderr, once


def test_rootfs_tarball_source(tmp_path: Path) -> None:
    exported = tmp_path / "tinybox-rootfs.tar"
    container = subprocess.run(
        ["docker", "create", "tinybox:latest"], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        subprocess.run(["docker", "export", "-o", str(exported), container], check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
    with tarfile.open(exported) as archive:
        assert "bin/busybox" in archive.getnames()
    result = dboot("rehearse", f"rootfs:{exported}", "/bin/sh", "-c", "echo from-rootfs-tar")
    assert result.returncode == 0, result.stderr
    assert "from-rootfs-tar" in result.stdout


# --- the command line: options anywhere before INIT ------------------------------------------


def test_check_json_after_the_image() -> None:
    result = dboot("check", "tinybox", "--json")
    assert result.returncode in (0, 3), result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "verdict"


def test_rehearse_options_after_the_image_and_in_the_inits_argv() -> None:
    result = dboot("rehearse", "tinybox", "--grace", "0", "/bin/sh", "-c", "echo [$0] --json", "x")
    assert result.returncode == 0, result.stderr
    assert "[x] --json" in result.stdout.splitlines()
    assert "grace 0 s" in result.stdout  # the stage's own account of its plan


# --- faults that are none of the engine's own errors: one line, exit 1-3, no traceback -------


def assert_one_line_fault(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert "Traceback" not in result.stderr + (result.stdout or ""), result.stderr
    assert_one_line_error(result, code, *words)


@pytest.mark.parametrize("command", [("images",), ("images", "--json"), ("check", "tinybox")])
@pytest.mark.parametrize("fault", ["full-disk", "closed-pipe"])
def test_output_that_fails_is_one_line_exit_2(command: tuple[str, ...], fault: str) -> None:
    if fault == "full-disk":
        with open("/dev/full", "w") as full:
            result = subprocess.run(
                [DBOOT, *command], stdout=full, stderr=subprocess.PIPE, text=True, env=LAB_ENV
            )
        words: tuple[str, ...] = ("standard output", "No space left on device")
    else:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the first line, as `| head -0`
        try:
            result = subprocess.run(
                [DBOOT, *command], stdout=write_end, stderr=subprocess.PIPE, text=True, env=LAB_ENV
            )
        finally:
            os.close(write_end)
        words = ("standard output", "Broken pipe")
    assert_one_line_fault(result, 2, *words, "nothing was changed")


def test_state_dir_that_is_a_file_rehearse(tmp_path: Path) -> None:
    state = tmp_path / "not-a-dir"
    state.write_text("a file where the state directory should be\n")
    result = dboot("rehearse", "--state-dir", str(state), "tinybox", "/bin/true")
    assert_one_line_fault(result, 1, str(state))
    assert mounts_under(state) == [] and state.read_text().startswith("a file")


def test_state_dir_that_is_a_file_switch_target_pid_dry_run(tmp_path: Path) -> None:
    from injector.rehearsal.sandbox import Sandbox

    state = tmp_path / "not-a-dir"
    state.write_text("a file where the state directory should be\n")
    with Sandbox(services=1, console="capture") as sandbox:
        result = dboot(
            "switch", "--dry-run", "--target-pid", str(sandbox.pid), "--state-dir", str(state),
            "tinybox", "/sbin/init",
        )  # fmt: skip
        assert_one_line_fault(result, 1, str(state))
        assert mounts_under(state, sandbox.pid) == []
        assert sandbox.running()


# --- a terminal that goes away ---------------------------------------------------------------


def run_until_the_terminal_closes(
    args: list[str], after: bytes, *, stderr_on_terminal: bool = False, env: dict[str, str]
) -> tuple[int, str, bytes]:
    """Run dboot with stdin and stdout (and stderr, if asked) on a pty, and close the pty's
    master once ``after`` has appeared: every later write to it fails with EIO. The pty is
    not dboot's controlling terminal, so no SIGHUP comes: this is about the writes alone."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen(
            [DBOOT, *args],
            stdin=slave,
            stdout=slave,
            stderr=slave if stderr_on_terminal else subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
    finally:
        os.close(slave)
    seen = b""
    try:
        while after not in seen:
            ready, _, _ = select.select([master], [], [], 120)
            assert ready, seen
            seen += os.read(master, 65536)
    finally:
        os.close(master)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr or "", seen


def assert_stopped_by_the_dead_terminal(code: int, stderr: str, seen: bytes) -> None:
    assert code == 2, (code, stderr, seen)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(
        "dboot: cannot write to standard output (Input/output error: the terminal is gone)"
    )
    assert "everything done before the injection was undone" in lines[0]


@pytest.mark.parametrize("after", [b"==> Reading image", b"==> Copying"])
def test_rehearse_on_a_terminal_that_goes_away(after: bytes, tmp_path: Path) -> None:
    state = tmp_path / "state"
    code, stderr, seen = run_until_the_terminal_closes(
        ["rehearse", "--state-dir", str(state), "tinybox", "/bin/sh", "-c", "echo never"],
        after,
        env=LAB_ENV,
    )
    assert_stopped_by_the_dead_terminal(code, stderr, seen)
    assert mounts_under(state) == [] and not state.exists()


def test_rehearse_closed_mid_copy_of_a_large_tarball(tmp_path: Path) -> None:
    """A 200 MB tree takes a second or more to copy: the terminal goes while it runs."""
    from tests import images

    tarball = images.debootstrap_tarball()
    state = tmp_path / "state"
    code, stderr, seen = run_until_the_terminal_closes(
        ["rehearse", "--state-dir", str(state), f"rootfs:{tarball}", "/bin/sh", "-c", "echo never"],
        b"==> Copying",
        env=LAB_ENV,
    )
    assert_stopped_by_the_dead_terminal(code, stderr, seen)
    assert b"used in the tmpfs" not in seen and b"never" not in seen
    assert mounts_under(state) == [] and not state.exists()


@pytest.mark.parametrize("stderr_on_terminal", [False, True])
def test_switch_target_dry_run_on_a_terminal_that_goes_away(
    stderr_on_terminal: bool, tmp_path: Path
) -> None:
    from injector.rehearsal.sandbox import Sandbox

    log_file = tmp_path / "dboot.log"
    state = tmp_path / "state"
    with Sandbox(services=1, console="capture") as sandbox:
        code, stderr, seen = run_until_the_terminal_closes(
            ["switch", "--dry-run", "--target-pid", str(sandbox.pid), "--state-dir", str(state),
             "tinybox", "/sbin/init"],
            b"==> Reading image",
            stderr_on_terminal=stderr_on_terminal,
            env={**LAB_ENV, "DBOOT_LOG_FILE": str(log_file)},
        )  # fmt: skip
        assert mounts_under(state, sandbox.pid) == []
        assert not Path(f"/proc/{sandbox.pid}/root{state}").exists()
        assert sandbox.running()
    if stderr_on_terminal:
        # Nothing reached the dead terminal; the run log has the line it would have shown.
        assert stderr == ""
        last = log_file.read_text().strip().splitlines()[-1]
        stderr = last[last.index("dboot: cannot write") :] + "\n"
    assert_stopped_by_the_dead_terminal(code, stderr, seen)
    assert f"{log_file} says what was done" in stderr


def test_verbose_adds_the_traceback_after_the_one_line(tmp_path: Path) -> None:
    state = tmp_path / ("x" * 300)  # a name too long for any filesystem: no check foresees it
    result = dboot("rehearse", "-v", "--state-dir", str(state), "tinybox", "/bin/true")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("dboot: ")]
    assert len(errors) == 1 and str(state) in errors[0]
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.index(errors[0]) < result.stderr.index("Traceback")


def test_ctrl_c_ends_a_rehearsal_whose_init_never_exits(tmp_path: Path) -> None:
    state = tmp_path / "state"
    init = ["/bin/sh", "-c", "echo init-running; exec sleep 600"]
    process = subprocess.Popen(
        [DBOOT, "rehearse", "--state-dir", str(state), "tinybox", *init],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=LAB_ENV,
    )
    try:
        assert process.stdout is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if line.strip() == "init-running":
                break
        assert seen and seen[-1].strip() == "init-running", seen
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, stderr
    assert "Traceback" not in stderr and stderr.strip() == "", stderr
    assert rest.strip().splitlines()[-1].startswith("rehearsed: ended with Ctrl-C")
    assert mounts_under(state) == [] and not state.exists()
