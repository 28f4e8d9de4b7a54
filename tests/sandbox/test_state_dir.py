"""The state dir (issue 21, sections 2 and 3): a run changes nothing it did not make, the
path is one only root can change, and one switch or dry run holds it at a time.

Real runs of the installed `dboot` against the PID 1 of a sandbox we make (`--target-pid`,
lab mode on): never this machine's PID 1.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from injector.errors import SafetyRefusal
from injector.ramroot import statedir
from injector.rehearsal.sandbox import Sandbox
from injector.testhooks import PAUSE_ENV
from tests.images import build_tinybox
from tests.sandbox.sandbox_checks import eventually, mounted_sources

pytestmark = [pytest.mark.root, pytest.mark.engine]

DBOOT = str(Path(sys.executable).with_name("dboot"))
NOBODY = 65534


def dboot(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [DBOOT, *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        env=env,
        cwd=cwd,
    )


def lab_env(tmp_path: Path, **more: str) -> dict[str, str]:
    return {
        **os.environ,
        "DBOOT_REHEARSAL_ONLY": "1",
        "DBOOT_LOG_FILE": str(tmp_path / "log"),
        **more,
    }


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result
    (line,) = result.stderr.strip().splitlines()
    for word in words:
        assert word in line, line
    return line


def test_a_dry_run_leaves_an_existing_state_dir_as_it_was(tmp_path: Path) -> None:
    """The reproduction of section 2: a 0755 state dir that holds a file of someone else's.
    Before, the dry run left it 0700 (and the undo was free to take <dir>/root and
    <dir>/plan.json, whoever's they were)."""
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    (shared / "theirs").write_text("not dboot's\n")
    before = os.stat(shared)
    with Sandbox(services=1, console="capture") as sandbox:
        result = dboot(
            "switch", "--dry-run", "--yes", "--json", "--target-pid", str(sandbox.pid),
            "--state-dir", str(shared), build_tinybox(), "/bin/sh",
            env=lab_env(tmp_path),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert not [source for source in mounted_sources(sandbox.pid) if source == "dboot"]
    after = os.stat(shared)
    assert (stat.S_IMODE(after.st_mode), after.st_uid, after.st_gid) == (
        0o755,
        before.st_uid,
        before.st_gid,
    )
    assert os.listdir(shared) == ["theirs"]
    log = (tmp_path / "log").read_text()
    # The run worked in a subdirectory of its own, and took it away again.
    assert f"this run works in {shared}/run-" in log, log
    assert f"undone: directory {shared}/run-" in log and ": removed" in log, log


def test_a_missing_state_dir_is_made_for_the_run_and_removed(tmp_path: Path) -> None:
    state = tmp_path / "made" / "state"
    with Sandbox(services=1, console="capture") as sandbox:
        result = dboot(
            "switch", "--dry-run", "--yes", "--target-pid", str(sandbox.pid),
            "--state-dir", str(state), build_tinybox(), "/bin/sh",
            env=lab_env(tmp_path),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
    assert not (tmp_path / "made").exists()


@pytest.mark.parametrize(
    ("given", "words"),
    [
        ("relative/state", ("relative path", "absolute")),
        ("{tmp}/link/state", ("symlink", "{tmp}/real/state")),
        ("{tmp}/real/../real/state", ("'..'", "{tmp}/real/state")),
    ],
)
def test_a_relative_or_roundabout_state_dir_is_bad_input(
    given: str, words: tuple[str, ...], tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    path = given.format(tmp=tmp_path)
    result = dboot(
        "rehearse", "--state-dir", path, build_tinybox(), "/bin/true",
        env=lab_env(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    one_line(result, 1, *(word.format(tmp=tmp_path) for word in words))
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]
    assert os.listdir(tmp_path / "real") == []


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [
        (0o777, 0, "world-writable (mode 0777)"),
        (0o775, 0, "group-writable (mode 0775)"),
        (0o755, NOBODY, f"owned by uid {NOBODY}, not by root"),
    ],
)
def test_a_state_dir_under_a_parent_others_can_change_is_refused(
    mode: int, owner: int, why: str, tmp_path: Path
) -> None:
    """Someone who can write the parent could swap the state dir for a symlink between the
    plan's write and the pivot: refused, exit 3, naming that parent, before anything."""
    parent = tmp_path / "open"
    parent.mkdir()
    os.chown(parent, owner, 0)
    parent.chmod(mode)
    result = dboot(
        "rehearse", "--state-dir", str(parent / "state"), build_tinybox(), "/bin/true",
        env=lab_env(tmp_path),
    )  # fmt: skip
    one_line(result, 3, f"{parent} is {why}", "--state-dir")
    assert os.listdir(parent) == []


def test_a_sticky_parent_like_tmp_is_fine_and_the_state_dir_goes_again(tmp_path: Path) -> None:
    """In a sticky directory nobody else can rename or remove what root made there."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    state = statedir.StateDir(sticky / "state", lock=True)
    with state:
        assert stat.S_IMODE(os.stat(sticky / "state").st_mode) == 0o700
        assert state.work_dir.parent == sticky / "state"
    assert os.listdir(sticky) == []


def test_a_held_state_dir_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    state = tmp_path / "held"
    state.mkdir(mode=0o700)
    fd = os.open(state, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(
            SafetyRefusal, match=rf"another dboot run holds {state} \(pid {os.getpid()}\)"
        ):
            statedir.StateDir(state, lock=True).__enter__()
    finally:
        os.close(fd)
    with statedir.StateDir(state, lock=True):
        pass  # free again once its holder let go
    assert state.is_dir()  # not made by the run: left


def test_a_second_run_is_refused_and_the_first_keeps_its_ram_root(tmp_path: Path) -> None:
    """Section 3's scene: a dry run waits with its RAM root and plan in place (as a switch
    waits at --ssh-check); a colleague's dry run on the same state dir is refused at once,
    exit 3, naming the first run's pid, and undoes nothing of the first's. A rehearsal on the
    same state dir meanwhile runs as usual and touches nothing of the first's either."""
    state = tmp_path / "state"
    announce = tmp_path / "paused"
    image = build_tinybox()
    with Sandbox(services=1, console="capture") as sandbox:
        root = f"/proc/{sandbox.pid}/root"
        first = subprocess.Popen(
            [DBOOT, "switch", "--dry-run", "--yes", "--target-pid", str(sandbox.pid),
             "--state-dir", str(state), image, "/bin/sh"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, env=lab_env(tmp_path, **{PAUSE_ENV: f"prepared:{announce}"}),
        )  # fmt: skip
        try:
            assert eventually(lambda: announce.exists() or first.poll() is not None, 60)
            assert announce.exists(), first.stderr.read() if first.stderr else ""
            # Wherever the run keeps it (never through the image's own symlinks: no rglob).
            (plan,) = [
                *Path(f"{root}{state}").glob("plan.json"),
                *Path(f"{root}{state}").glob("*/plan.json"),
            ]
            listing = sorted(os.listdir(f"{root}{state}"))
            assert "dboot" in mounted_sources(sandbox.pid)

            second = dboot(
                "switch", "--dry-run", "--yes", "--target-pid", str(sandbox.pid),
                "--state-dir", str(state), image, "/bin/sh", env=lab_env(tmp_path),
            )  # fmt: skip
            rehearsal = dboot(
                "rehearse", "--grace", "0", "--state-dir", str(state), image, "/bin/true",
                env=lab_env(tmp_path),
            )  # fmt: skip

            # The first run's RAM root and plan are still there, and nothing else is.
            assert plan.is_file() and "dboot" in mounted_sources(sandbox.pid)
            assert sorted(os.listdir(f"{root}{state}")) == listing
            one_line(second, 3, f"another dboot run holds {state} (pid {first.pid})")
            assert rehearsal.returncode == 0, rehearsal.stderr
            assert first.poll() is None
        finally:
            first.send_signal(signal.SIGTERM)
            _, said = first.communicate(timeout=60)
        assert first.returncode == 128 + signal.SIGTERM, said
        assert "dboot" not in mounted_sources(sandbox.pid)
    assert not state.exists()


def test_what_a_killed_run_left_is_named_and_left_alone(tmp_path: Path) -> None:
    """A run SIGKILLed before its undo leaves its subdirectory (and, in its namespace, maybe
    its RAM root): the next run works beside it, says what to do about it, and takes
    nothing of it away, as it is not its own."""
    state = tmp_path / "state"
    gone = 2**22 + 1  # above any pid_max: no process has it
    leftover = state / f"run-{gone}-0123abcd"
    (leftover / "root").mkdir(parents=True, mode=0o700)
    state.chmod(0o700)
    with Sandbox(services=1, console="capture") as sandbox:
        result = dboot(
            "switch", "--dry-run", "--yes", "--json", "--target-pid", str(sandbox.pid),
            "--state-dir", str(state), build_tinybox(), "/bin/sh",
            env=lab_env(tmp_path),
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    (notice,) = [e for e in events if e.get("code") == "state-dir-leftover"]
    assert notice["level"] == "warning"
    assert notice["message"].startswith(f"{leftover} was left by dboot pid {gone}, which is gone")
    assert notice["fix"] == f"umount -l {leftover}/root, then rm -r {leftover}"
    assert os.listdir(state) == [leftover.name] and os.listdir(leftover) == ["root"]
