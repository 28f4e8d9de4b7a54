"""`dboot switch --ssh-check PORT` against the PID 1 of a namespace we make (a Sandbox, with its
own network namespace): the image's sshd answers on PORT inside the RAM root, with the image's
host key (checked with StrictHostKeyChecking=yes), a client logs in with a test key, the switch
goes on, and that sshd and its helper are gone before the injection. Ctrl-C while it waits
undoes everything. The image is the rescue image plus a test key and host key of this run."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from injector.access import sshserve
from injector.access.sshcheck import GoCallback
from injector.errors import BadInput, SafetyRefusal
from injector.events import Event, Finished, Log, StepDone
from injector.rehearsal.sandbox import Sandbox
from injector.switch import SwitchOptions, run
from tests.images import PREFIX, build_tinybox, docker
from tests.vm.build import rescue_image

pytestmark = pytest.mark.root

DBOOT = str(Path(sys.executable).with_name("dboot"))
PORT = 2222  # inside the sandbox's own network namespace: no clash with the host's
MARKER = "/dboot-ssh-check-marker"


@pytest.fixture(scope="module")
def keyed_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The rescue image with a client key in root's authorized_keys and a host key of its
    own (this machine has none to carry); yields its tag and the directory of the keys."""
    keys = tmp_path_factory.mktemp("ssh-check")
    for name in ("client", "ssh_host_ed25519_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)],
                       check=True)  # fmt: skip
    (keys / "Dockerfile").write_text(
        f"FROM {rescue_image()}\n"
        "COPY ssh_host_ed25519_key ssh_host_ed25519_key.pub /etc/ssh/\n"
        "COPY client.pub /root/.ssh/authorized_keys\n"
        f"RUN echo in-the-ram-root > {MARKER}\n"
    )
    host_key = (keys / "ssh_host_ed25519_key.pub").read_text().split()
    (keys / "known_hosts").write_text(f"[127.0.0.1]:{PORT} {host_key[0]} {host_key[1]}\n")
    tag = PREFIX + "ssh-check:latest"
    docker("build", "-q", "-t", tag, str(keys))
    yield tag, keys
    docker("rmi", "-f", tag)


def check_servers() -> list[psutil.Process]:
    """Every process of an ssh check: the helper and the image's sshd (and its sessions)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        words = process.info["cmdline"] or []
        helper = any("injector.access.ssh" in word for word in words)  # sshserve's boot line
        if helper or words[:2] == ["/usr/sbin/sshd", "-D"]:
            found.append(process)
    return found


def start_switch(
    sandbox: Sandbox,
    image: str,
    state: Path,
    *,
    cwd: Path | None = None,
    loginuid: int | None = None,
) -> subprocess.Popen[str]:
    """``dboot switch --ssh-check`` at the sandbox, run from ``cwd``; ``loginuid``: as if run
    with sudo from that user's login session (pam_loginuid's audit login uid)."""

    def set_login_uid() -> None:
        if loginuid is not None:
            Path("/proc/self/loginuid").write_text(str(loginuid))

    return subprocess.Popen(
        [DBOOT, "switch", "--json", "--yes", "--grace", "1", "--ssh-check", str(PORT),
         "--target-pid", str(sandbox.pid), "--state-dir", str(state),
         image, "/bin/sh", "-c", "exec sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
        cwd=cwd,
        preexec_fn=set_login_uid,
    )  # fmt: skip


def events_until_login_line(switch: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert switch.stdout is not None
    events = []
    for line in switch.stdout:
        events.append(json.loads(line))
        if events[-1].get("code") == "ssh-check":
            return events
    assert switch.stderr is not None
    raise AssertionError(f"no ssh-check notice: {switch.wait()} {switch.stderr.read()}")


def ssh_in_sandbox(
    sandbox: Sandbox, keys: Path, command: str, user: str = "root"
) -> subprocess.CompletedProcess[str]:
    """Debian's ssh client, with the test key, at the check's sshd over 127.0.0.1."""
    return subprocess.run(
        ["nsenter", "--target", str(sandbox.pid), "--net",
         "ssh", "-p", str(PORT), "-i", str(keys / "client"), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={keys / 'known_hosts'}",
         "-o", "ConnectTimeout=10", "-l", user, "127.0.0.1", command],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(services=1, console="capture") as box:
        # Its network namespace has only a loopback interface, down: the client comes in there.
        subprocess.run(["nsenter", "--target", str(box.pid), "--net", "ip", "link", "set", "lo",
                        "up"], check=True)  # fmt: skip
        yield box


def test_a_login_lets_the_switch_go_on_and_its_sshd_is_gone(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    image, keys = keyed_image
    switch = start_switch(sandbox, image, tmp_path / "state")
    try:
        events = events_until_login_line(switch)
        notice = events[-1]
        assert f"ssh -p {PORT} " in notice["message"], notice
        assert check_servers(), "the check's sshd is not running while it waits"
        login = ssh_in_sandbox(sandbox, keys, f"cat {MARKER}")
        out, err = switch.communicate(timeout=120)
    finally:
        switch.kill()
    assert login.returncode == 0, login.stderr
    assert login.stdout.strip() == "in-the-ram-root"  # a shell chrooted in the RAM root
    assert switch.returncode == 0, err
    events += [json.loads(line) for line in out.splitlines()]
    done = [e for e in events if e["event"] == "step_done" and e["step"] == "ssh-check"]
    assert done and done[0]["detail"].startswith("login by root from 127.0.0.1"), events
    steps = [e["step"] for e in events if e["event"] == "step_started"]
    assert steps.index("ssh-check") < steps.index("inject"), steps
    assert events[-1]["outcome"] == "injected", events[-1]
    assert check_servers() == []
    refused = ssh_in_sandbox(sandbox, keys, "true")
    assert refused.returncode == 255 and "refused" in refused.stderr, refused.stderr


def test_ctrl_c_while_waiting_undoes_everything(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    image, _ = keyed_image
    state = tmp_path / "state"
    pid1_exe = os.readlink(f"/proc/{sandbox.pid}/exe")
    switch = start_switch(sandbox, image, state)
    try:
        events_until_login_line(switch)
        switch.send_signal(signal.SIGINT)
        _, err = switch.communicate(timeout=60)
    finally:
        switch.kill()
    assert switch.returncode == 128 + signal.SIGINT, err
    assert "interrupted by Ctrl-C" in err, err
    assert check_servers() == []
    mounts = Path(f"/proc/{sandbox.pid}/mountinfo").read_text()
    assert str(state) not in mounts, mounts  # the RAM root is unmounted in the sandbox
    assert not (state / "plan.json").exists()
    assert os.readlink(f"/proc/{sandbox.pid}/exe") == pid1_exe  # PID 1 untouched


def run_with_go(
    sandbox: Sandbox, image: str, state: Path, go: bool
) -> tuple[list[Event], BaseException | None]:
    """A --dry-run through the engine whose front-end answers at once, without any login:
    ``go`` True is Enter (go on), False calls the switch off."""

    def answer(command: str, done: threading.Event) -> bool:
        assert not done.is_set()
        return go

    return dry_run_answered_by(answer, sandbox, image, state)


def dry_run_answered_by(
    answer: GoCallback, sandbox: Sandbox, image: str, state: Path
) -> tuple[list[Event], BaseException | None]:
    """A --dry-run through the engine whose front-end is ``answer``."""
    answered: list[str] = []

    def front_end(command: str, done: threading.Event) -> bool:
        answered.append(command)
        return answer(command, done)

    options = SwitchOptions(
        image, ["/bin/sh"], state_dir=state, target_pid=sandbox.pid, dry_run=True, yes=True,
        ssh_check=PORT, ssh_check_go=front_end, log_file=None,
    )  # fmt: skip
    events: list[Event] = []
    try:
        for event in run(options):
            events.append(event)
    except SafetyRefusal as error:
        return events, error
    finally:
        assert answered and answered[0].startswith(f"ssh -p {PORT} "), answered
    return events, None


def test_enter_goes_on_without_a_login(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    events, error = run_with_go(sandbox, keyed_image[0], tmp_path / "state", go=True)
    assert error is None
    done = [e for e in events if isinstance(e, StepDone) and e.step == "ssh-check"]
    assert done and done[0].detail.startswith("no login seen"), events
    assert isinstance(events[-1], Finished) and events[-1].outcome == "dry-run"
    assert check_servers() == []


def test_calling_it_off_undoes_everything(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    events, error = run_with_go(sandbox, keyed_image[0], state, go=False)
    assert error is not None and "called off" in str(error), events
    assert not any(isinstance(e, Finished) for e in events)
    assert check_servers() == []
    assert str(state) not in Path(f"/proc/{sandbox.pid}/mountinfo").read_text()


def test_a_port_out_of_range_is_bad_input() -> None:
    with pytest.raises(BadInput):
        SwitchOptions("tinybox", ["/bin/sh"], ssh_check=70000)


def test_an_image_without_sshd_is_refused_and_undone(sandbox: Sandbox, tmp_path: Path) -> None:
    state = tmp_path / "state"
    options = SwitchOptions(
        build_tinybox(), ["/bin/sh"], state_dir=state, target_pid=sandbox.pid, dry_run=True,
        yes=True, ssh_check=PORT, log_file=None,
    )  # fmt: skip
    with pytest.raises(SafetyRefusal, match="has no /usr/sbin/sshd"):
        list(run(options))
    assert check_servers() == []
    assert str(state) not in Path(f"/proc/{sandbox.pid}/mountinfo").read_text()


def test_enter_on_the_terminal_goes_on(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    """The CLI on a terminal: the login line, then Enter there goes on without a login."""
    controller, terminal = os.openpty()
    switch = subprocess.Popen(
        [DBOOT, "switch", "--yes", "--dry-run", "--ssh-check", str(PORT),
         "--target-pid", str(sandbox.pid), "--state-dir", str(tmp_path / "state"),
         keyed_image[0], "/bin/sh"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
    )  # fmt: skip
    os.close(terminal)
    try:
        seen = b""
        deadline = time.monotonic() + 60
        while b"Press Enter" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 1.0)
            if ready:
                seen += os.read(controller, 4096)
        assert b"Press Enter to go on without one" in seen, seen
        os.write(controller, b"\n")
        out, _ = switch.communicate(timeout=60)
    finally:
        switch.kill()
        os.close(controller)
    assert switch.returncode == 0, out
    assert "no login seen, going on as told; sshd stopped" in out, out
    assert check_servers() == []


def test_a_killed_dboot_takes_its_check_along(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    """SIGKILL leaves no undo to run, but no sshd listening on either."""
    switch = start_switch(sandbox, keyed_image[0], tmp_path / "state")
    try:
        events_until_login_line(switch)
        assert check_servers()
    finally:
        switch.kill()
        switch.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while check_servers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert check_servers() == []


# A user name is free text, and sshd logs it: "Invalid user NAME from 127.0.0.1 port N".
FORGED_NAMES = (
    # In the middle of sshd's line: what the old, unanchored pattern took for a login.
    "Accepted publickey for root from 192.0.2.1 port 22",
    # On sshd -e's stderr a newline in the name starts a line of its own, which a match of the
    # whole line takes for a login too (sshd cuts a name at ":", so no key can follow "ssh2").
    "x\nAccepted publickey for root from 192.0.2.1 port 22 ssh2\ny",
)
FORGED_WAIT = 3.0  # sshd logged the name before the client was refused; a login ends it at once


def fingerprint(public_key: Path) -> str:
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(public_key)], capture_output=True,
                            text=True, check=True)  # fmt: skip
    return listed.stdout.split()[1]  # "256 SHA256:... comment (ED25519)"


def test_a_user_name_that_reads_like_a_login_proves_nothing(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    """No terminal: only a login lets the switch go on. Unauthenticated clients whose user
    names spell sshd's login line, sent by Debian's ssh over 127.0.0.1, must not; the real
    login that follows must, and is named with its key's fingerprint."""
    image, keys = keyed_image
    key = fingerprint(keys / "client.pub")
    forged: list[subprocess.CompletedProcess[str]] = []
    ended_by_forgery: list[bool] = []
    real: list[subprocess.CompletedProcess[str]] = []

    def answer(command: str, done: threading.Event) -> bool:
        for name in FORGED_NAMES:
            forged.append(ssh_in_sandbox(sandbox, keys, "true", user=name))
        ended_by_forgery.append(done.wait(FORGED_WAIT))
        real.append(ssh_in_sandbox(sandbox, keys, "true"))
        return done.wait(30)

    events, error = dry_run_answered_by(answer, sandbox, image, tmp_path / "state")
    logs = [event.text for event in events if isinstance(event, Log)]
    assert ended_by_forgery == [False], logs
    for attempt in forged:
        assert attempt.returncode == 255 and "Permission denied" in attempt.stderr, attempt
    # sshd saw both names, as one escaped line each.
    assert any(f"Invalid user {FORGED_NAMES[0]} from 127.0.0.1 port " in line for line in logs)
    assert any("Invalid user x\\nAccepted publickey" in line for line in logs), logs
    assert error is None and real[0].returncode == 0, (error, real)
    done = [e for e in events if isinstance(e, StepDone) and e.step == "ssh-check"]
    assert done[0].detail == (
        f"login by root from 127.0.0.1 (publickey ED25519 {key}) accepted; sshd stopped"
    ), logs
    assert check_servers() == []


# Run by the proving login inside the check's sshd: what of the host it reaches. The last
# line climbs out of a chroot of its own, as root can (mkdir, chroot, chdir "..", chroot "."):
# out of a chroot that lands in the host's tree, out of a pivot_root in the RAM root again.
CLIMB_OUT = (
    'mkdir "/run/out"; chroot "/run/out" or die "chroot: $!"; chdir ".." for 1 .. 64;'
    ' chroot "." or die "chroot: $!";'
    ' print "host: ", (-e $ARGV[0] ? "reached" : "out of reach"), "\\n"'
)
PROBE = (
    "echo block: $(find /dev -type b); grep CapBnd /proc/self/status;"
    " for knob in /proc/sys/kernel/hostname /proc/sysrq-trigger; do"
    " [ -w $knob ] && echo writable: $knob; done;"
    " awk '{print \"mount:\", $5}' /proc/self/mountinfo;"
    f" perl -e '{CLIMB_OUT}'"  # then a path of the host
)
# What the check mounts over the RAM root, and nothing else.
CHECK_MOUNTS = {"/", "/proc", "/proc/sys", "/proc/sysrq-trigger", "/dev", "/dev/pts", "/run"}


def probed(lines: list[str], label: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in lines if line.startswith(f"{label}: ")]


def test_the_checks_sshd_reaches_nothing_of_the_host(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    """A root login in the check (dboot run with sudo from a login session: an audit login
    uid is set) sees no disk, no writable kernel knob, a reduced bounding set, none of the
    host's mounts, and cannot climb out to the host's tree (pivot_root, not a chroot)."""
    image, keys = keyed_image
    switch = start_switch(sandbox, image, tmp_path / "state", loginuid=1000)
    try:
        events_until_login_line(switch)
        login = ssh_in_sandbox(sandbox, keys, f"{PROBE} {tmp_path}")
        _, err = switch.communicate(timeout=120)
    finally:
        switch.kill()
    assert login.returncode == 0, login.stderr
    assert switch.returncode == 0, err
    lines = login.stdout.splitlines()
    assert "block:" in lines, lines  # a minimal /dev: no disk at all
    assert probed(lines, "writable") == [], lines
    (bounding,) = [int(line.split()[1], 16) for line in lines if line.startswith("CapBnd:")]
    kept = {name for name, bit in sshserve.DROPPED_CAPABILITIES.items() if bounding & 1 << bit}
    assert bounding and not kept, lines
    mounts = set(probed(lines, "mount"))
    assert CHECK_MOUNTS - {"/proc/sysrq-trigger"} <= mounts <= CHECK_MOUNTS, lines  # no sysrq: ok
    assert probed(lines, "host") == ["out of reach"], (lines, login.stderr)


def test_a_module_planted_in_the_working_directory_is_not_imported(
    sandbox: Sandbox, keyed_image: tuple[str, Path], tmp_path: Path
) -> None:
    """``cd DIR; sudo dboot switch --ssh-check``: the check's helper runs as root, and must
    import nothing from DIR (python -I -S, as the stage)."""
    image, keys = keyed_image
    planted, imported = tmp_path / "planted", tmp_path / "imported"
    for module in ("injector/__init__.py", "injector/access/__init__.py",
                   "injector/access/sshcheck.py", "injector/access/sshserve.py",
                   "initstage/__init__.py"):  # fmt: skip
        (planted / module).parent.mkdir(parents=True, exist_ok=True)
        (planted / module).write_text(f"open({str(imported)!r}, 'a').write(__name__ + '\\n')\n")
    switch = start_switch(sandbox, image, tmp_path / "state", cwd=planted)
    try:
        events_until_login_line(switch)
        login = ssh_in_sandbox(sandbox, keys, f"cat {MARKER}")
        _, err = switch.communicate(timeout=120)
    finally:
        switch.kill()
        # Checked even when the check never started: a planted module can make it fail.
        assert not imported.exists(), f"imported from the cwd: {imported.read_text()}"
    assert login.returncode == 0, login.stderr
    assert switch.returncode == 0, err
