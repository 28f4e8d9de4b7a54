"""The keeper (issue 9 §4) for real: the stage, as PID 1 of a PID + mount namespace of the
test's own (see test_stage.py), forks it before it execs a busybox shell script as the new
init; the script watches what the keeper does and prints it. And the revert that fails safe
(issue 21 §1): images that fight the keeper, a long kill phase, a stage that fails before
or after the pivot; the deadline fires in each.

Never a reboot: the plan may say ``machine``, but the stage is no machine's PID 1 here, so
the revert only leaves its marker. (Even a wrong keeper could not reboot the host from here:
reboot() in a PID namespace other than the first only ends that namespace.)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from initstage.keeper import LOG_PATH, REVERT_DUE_FILE
from initstage.launch import package_parent
from initstage.plan import KEEP_FILE
from tests.images import build_tinybox
from tests.sandbox.test_stage import PIVOT_ROOT_REFUSED, busybox_tree, plan_for, run_stage
from tests.sandbox.test_stage_faults import log_seconds

__all__ = ["busybox_tree"]  # the fixture, re-exported for pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, mounts"),
]

STANDIN_SSHD = '#!/bin/sh\necho "stand-in sshd pid $$ ran: $*"\nexit 3\n'
REVERT_SECONDS = 3.0  # in the plan: the CLI asks for 1 min at least


def changed_tree(tmp_path: Path, busybox_tree: Path, change: Callable[[Path], None]) -> Path:
    """A copy of the busybox root, as ``change`` leaves it."""
    tree = tmp_path / "tree"
    shutil.copytree(busybox_tree, tree, symlinks=True)
    change(tree)
    return tree


def add_standin_sshd(tree: Path) -> None:
    """A stand-in "sshd" that says it ran, then dies."""
    sshd = tree / "usr" / "sbin" / "sshd"
    sshd.parent.mkdir(parents=True)
    sshd.write_text(STANDIN_SSHD)
    sshd.chmod(0o755)


@pytest.fixture
def tree_with_sshd(tmp_path: Path, busybox_tree: Path) -> Path:
    return changed_tree(tmp_path, busybox_tree, add_standin_sshd)


def wait_for(condition: str, seconds: float) -> str:
    """Shell: poll ``condition`` every 0.1 s for at most ``seconds``."""
    tries = int(seconds * 10)
    return f"i=0; until {condition} || [ $i -ge {tries} ]; do sleep 0.1; i=$((i+1)); done"


def show_keeper() -> str:
    return (
        f"echo MARKER:; cat {REVERT_DUE_FILE} 2>/dev/null || echo none;"
        f" echo KEEPER-LOG:; cat {LOG_PATH}"
    )


@pytest.mark.parametrize("machine", [False, True], ids=["sandbox-plan", "machine-plan"])
def test_the_deadline_without_keep_leaves_the_marker_and_reboots_nothing(
    tmp_path: Path, busybox_tree: Path, machine: bool
):
    # machine=True: the plan of a real switch, yet the stage is not the machine's PID 1.
    init = f"{wait_for(f'[ -e {REVERT_DUE_FILE} ]', 20)}; {show_keeper()}"
    started = time.monotonic()
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(
            tmp_path, ["/bin/sh", "-c", init], revert_after_seconds=REVERT_SECONDS, machine=machine
        ),
    )
    took = time.monotonic() - started
    assert run.returncode == 0, run.err
    marker, log = run.out.split("MARKER:\n")[1].split("KEEPER-LOG:\n")
    assert marker.strip() != "none", run.out
    assert f"revert deadline passed without {KEEP_FILE}: a real switch would reboot now" in log, log
    assert "reboot(RB_AUTOBOOT)" not in log
    assert "only log it (not the machine)" in log
    # The stage's log tells the user how to keep the new system.
    assert f"revert timer: to keep the new system, run `touch {KEEP_FILE}`" in run.err
    assert REVERT_SECONDS <= took < REVERT_SECONDS + 15, took
    print(f"\nrevert marker after {took:.1f} s (timer {REVERT_SECONDS:g} s, stage included)")


def test_the_keep_file_stops_the_revert(tmp_path: Path, busybox_tree: Path):
    # The init makes the file after the keeper started (its first look finds nothing), with
    # a plain touch: the keeper made the directory.
    init = (
        f"sleep 1.2; touch {KEEP_FILE};"
        f" {wait_for(f'grep -q exiting {LOG_PATH}', 10)};"
        f" sleep {REVERT_SECONDS}; {show_keeper()}"
    )
    # The deadline leaves room for a busy machine between the keeper's start and the touch.
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", init], revert_after_seconds=REVERT_SECONDS + 3),
    )
    assert run.returncode == 0, run.err
    marker, log = run.out.split("MARKER:\n")[1].split("KEEPER-LOG:\n")
    assert marker.strip() == "none", run.out
    assert f"{KEEP_FILE} found: the revert is off, the new system stays" in log, log
    assert "nothing left to do: exiting" in log
    assert "deadline passed" not in log


def list_exes() -> str:
    return 'echo EXES:; for p in /proc/[0-9]*; do echo "${p#/proc/} $(readlink $p/exe)"; done'


def keeper_exe(run_err: str, out: str) -> str:
    """What the keeper process runs now, by its pid in the stage's log."""
    pid = re.search(r"keeper: pid (\d+)", run_err).group(1)  # type: ignore[union-attr]
    exes = dict(line.split(" ", 1) for line in out.split("EXES:\n")[1].splitlines() if " " in line)
    return exes[pid]


def test_ssh_server_is_respawned_then_kept_by_the_images_shell(
    tmp_path: Path, tree_with_sshd: Path
):
    # The timer runs 4 s: meanwhile the keeper restarts the server itself; past it, only
    # the server is left, and the image's shell takes over (the interpreter goes).
    by_shell = wait_for(f"grep -q 'started (by the shell)' {LOG_PATH}", 30)
    init = f"{by_shell}; {list_exes()}; {show_keeper()}"
    run = run_stage(
        tmp_path,
        tree_with_sshd,
        plan_for(
            tmp_path,
            ["/bin/sh", "-c", init],
            keeper_ssh_argv=["/usr/sbin/sshd", "-D", "-e"],
            revert_after_seconds=4.0,
        ),
        timeout=60,
    )
    assert run.returncode == 0, run.err
    log = run.out.split("KEEPER-LOG:\n")[1]
    # Its output went to the keeper's log, with the arguments it was given: three starts.
    assert log.count("stand-in sshd pid") >= 3, log
    assert "ran: -D -e" in log
    assert "made /run/sshd" in log
    assert "SSH server started (start 2)" in log
    assert "ended (exit status 3) after" in log
    assert "starting it again in 1 s" in log and "starting it again in 2 s" in log, log
    assert "handing it to the image's /bin/sh" in log
    assert "the image's shell keeps the SSH server now" in log
    assert keeper_exe(run.err, run.out) == "/bin/busybox", run.out


def test_with_ssh_only_the_shell_keeps_the_server_from_the_start(
    tmp_path: Path, tree_with_sshd: Path
):
    twice = wait_for(f"grep -q 'starting it again in 4 s' {LOG_PATH}", 30)
    init = f"{twice}; {list_exes()}; {show_keeper()}"
    run = run_stage(
        tmp_path,
        tree_with_sshd,
        plan_for(tmp_path, ["/bin/sh", "-c", init], keeper_ssh_argv=["/usr/sbin/sshd", "-D"]),
        timeout=60,
    )
    assert run.returncode == 0, run.err
    log = run.out.split("KEEPER-LOG:\n")[1]
    assert "revert: no timer" in log
    assert log.count("stand-in sshd pid") >= 3, log  # the keeper's start, then two by the shell
    assert re.search(r"SSH server pid \d+ ended: starting it again in 1 s", log), log
    assert "ended (exit status 3): starting it again in 2 s" in log
    assert keeper_exe(run.err, run.out) == "/bin/busybox", run.out


# --- The revert fails safe (issue 21 §1) -----------------------------------------------------

FIRED = "revert deadline passed without"
NO_MARKER = f"could not leave {REVERT_DUE_FILE}"


def proc_is_a_file(tree: Path) -> None:
    # The API mounts fail at step 6, after the pivot: the stage goes to recovery.
    (tree / "proc").rmdir()
    (tree / "proc").write_text("not a directory\n")


def var_log_dangles(tree: Path) -> None:
    # Yocto's layout: var/log -> volatile/log, made at boot by a tmpfs not there yet.
    (tree / "var").mkdir()
    (tree / "var" / "log").symlink_to("volatile/log")


def run_dboot_is_a_file(tree: Path) -> None:
    (tree / "run").mkdir()
    (tree / "run" / "dboot").write_text("")


def run_dboot_dangles(tree: Path) -> None:
    (tree / "run").mkdir()
    (tree / "run" / "dboot").symlink_to("/run/nowhere/dboot")


def keep_file_shipped(tree: Path) -> None:
    (tree / "run" / "dboot").mkdir(parents=True)
    (tree / "run" / "dboot" / "keep").touch()


HOSTILE_IMAGES: dict[str, Callable[[Path], None]] = {
    "proc-is-a-file": proc_is_a_file,
    "var-log-dangles": var_log_dangles,
    "run-dboot-is-a-file": run_dboot_is_a_file,
    "run-dboot-dangles": run_dboot_dangles,
    "keep-file-shipped": keep_file_shipped,
}


@pytest.mark.parametrize("image", list(HOSTILE_IMAGES))
def test_the_deadline_fires_in_an_image_that_stands_in_the_way(
    tmp_path: Path, busybox_tree: Path, image: str
):
    # The same watch runs as the new init or, when the stage fails, in its recovery shell:
    # until the marker is there, or the keeper's log says it cannot be, or that it gave up.
    done = f"grep -q -e '{NO_MARKER}' -e 'revert is off' {LOG_PATH} 2>/dev/null"
    watch = f"{wait_for(f'[ -e {REVERT_DUE_FILE} ] || {done}', 20)}; {show_keeper()}"
    run = run_stage(
        tmp_path,
        changed_tree(tmp_path, busybox_tree, HOSTILE_IMAGES[image]),
        plan_for(tmp_path, ["/bin/sh", "-c", watch], revert_after_seconds=REVERT_SECONDS),
        stdin=watch + "\n",
    )
    marker, log = run.out.split("MARKER:\n")[1].split("KEEPER-LOG:")  # no log: no newline
    assert "revert is off" not in log, log
    if image.startswith("run-dboot"):
        # Nobody can keep this system (touch fails), and the marker cannot be left either:
        # the keeper says both, and the deadline fires all the same.
        assert marker.strip() == "none"
        assert "cannot make /run/dboot" in log and NO_MARKER in log, log
        assert log.count("cannot make /run/dboot") == 1, "a failure is logged once"
    else:
        assert marker.strip() != "none", f"no revert marker:\n{run.out}\n{run.err}"
    if image != "var-log-dangles":  # there the keeper's log file cannot be written
        assert FIRED in log, log
    if image == "keep-file-shipped":
        assert "was there before the new system ran (the image's): it does not count" in log
    if image == "proc-is-a-file":
        assert "FAILED at step 6/8" in run.err, run.err
        assert re.search(r"recovery: the keeper, pid \d+, will leave .* unless", run.err), run.err


def test_the_timer_runs_from_before_the_kill_phase_and_through_it(
    tmp_path: Path, busybox_tree: Path
):
    # A service that ignores SIGTERM holds the stage for the whole grace period, longer than
    # the timer: the deadline passes in the kill phase, and PID 1's thread fires it there.
    stubborn = "sh -c 'trap \"\" TERM; exec sleep 1000' &\n"
    init = f"echo AT-START:; cat {REVERT_DUE_FILE} 2>/dev/null || echo none"
    plan = plan_for(tmp_path, ["/bin/sh", "-c", init], grace_seconds=4.0, revert_after_seconds=1.5)
    run = run_stage(tmp_path, busybox_tree, plan, before=stubborn)
    assert run.returncode == 0, run.err
    assert run.out.split("AT-START:\n")[1].strip() != "none", "nothing fired before the exec"
    fired = log_seconds(run, FIRED)
    killed = log_seconds(run, "still running after the 4 s grace period, SIGKILL")
    assert 1.5 <= fired < killed, run.err
    assert "1 needed SIGKILL" in run.err


def test_a_stage_that_fails_before_the_pivot_reverts_without_touching_the_old_root(
    tmp_path: Path, busybox_tree: Path
):
    # pivot_root refused (faked as in test_stage.py): the recovery shell runs in the old
    # root, here the host's. The keeper it leaves behind counts down there, reaching no
    # file by its path: its marker goes into the new root, through the stage's fd of it.
    plan = plan_for(tmp_path, ["/bin/sh", "-c", "echo INIT-RAN"], revert_after_seconds=2.0)
    marker = Path(plan.new_root) / REVERT_DUE_FILE.lstrip("/")
    host_files = [Path(LOG_PATH), Path(REVERT_DUE_FILE)]
    before = [path.exists() and path.stat().st_mtime_ns for path in host_files]
    watch = f"{wait_for(f'[ -e {marker} ]', 20)}; echo MARKER:; cat {marker} || echo none\n"
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan,
        harness=PIVOT_ROOT_REFUSED.format(parent=package_parent(), initramfs=False),
        stdin=watch,
    )
    assert "FAILED at step 5/8" in run.err, run.err
    assert run.out.split("MARKER:\n")[1].strip() != "none", run.out + run.err
    assert re.search(
        rf"recovery: the keeper, pid (\d+), will leave {REVERT_DUE_FILE} in \d+ s, unless it"
        r" is killed \(kill \1\): before the pivot no keep file counts",
        run.err,
    ), run.err
    assert "INIT-RAN" not in run.out
    assert [path.exists() and path.stat().st_mtime_ns for path in host_files] == before
    assert "log: not saved into the new root before the pivot" in run.err


# --- The options, end to end (dry runs: nothing is injected) ---------------------------------

DBOOT = str(Path(sys.executable).with_name("dboot"))
REMOTE = {"SSH_CONNECTION": "198.51.100.20 50122 192.0.2.77 22"}


def dry_run(tmp_path: Path, *words: str, env: dict[str, str]) -> list[dict[str, object]]:
    result = subprocess.run(
        [DBOOT, "switch", "--json", "--dry-run", "--force", "--state-dir", str(tmp_path / "s"),
         *words, build_tinybox(), "/bin/sh"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1", **env},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def keeper_facts(events: list[dict[str, object]]) -> dict[str, object]:
    return {str(e["key"]): e["value"] for e in events if e.get("section") == "keeper"}


@pytest.mark.engine
def test_a_remote_switch_reverts_after_10_minutes_unless_told(tmp_path: Path):
    events = dry_run(tmp_path, env=REMOTE)
    facts = {(e["section"], e["key"]): e["value"] for e in events if e["event"] == "fact"}
    assert facts[("session", "remote")] is True
    assert keeper_facts(events)["revert_after_minutes"] == 10.0
    notices = {e["code"]: e for e in events if e["event"] == "notice"}
    assert KEEP_FILE in str(notices["revert-timer"]["message"])

    events = dry_run(tmp_path, "--no-revert", env=REMOTE)
    assert keeper_facts(events)["revert_after_minutes"] is None
    assert "revert-timer" not in {e.get("code") for e in events}

    events = dry_run(tmp_path, "--revert-after", "1.5", env=REMOTE)
    assert keeper_facts(events)["revert_after_minutes"] == 1.5


@pytest.mark.engine
def test_ssh_is_refused_up_front_when_the_image_has_no_ssh_server(tmp_path: Path):
    result = subprocess.run(
        [DBOOT, "switch", "--dry-run", "--force", "--ssh", "--state-dir", str(tmp_path / "s"),
         build_tinybox(), "/bin/sh"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 1, result
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("dboot: --ssh: the image has no SSH server"), line
    assert "Checking RAM" not in result.stdout, "refused before the preflight"
    assert not (tmp_path / "s" / "root").exists()
