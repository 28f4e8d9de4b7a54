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

from injector.errors import BadInput, SafetyRefusal
from injector.events import Event, Finished, StepDone
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
        if "injector.access.sshcheck" in words or words[:2] == ["/usr/sbin/sshd", "-D"]:
            found.append(process)
    return found


def start_switch(sandbox: Sandbox, image: str, state: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [DBOOT, "switch", "--json", "--yes", "--grace", "1", "--ssh-check", str(PORT),
         "--target-pid", str(sandbox.pid), "--state-dir", str(state),
         image, "/bin/sh", "-c", "exec sleep 60"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
    )  # fmt: skip


def events_until_login_line(switch: subprocess.Popen[str]) -> list[dict[str, Any]]:
    assert switch.stdout is not None
    events = []
    for line in switch.stdout:
        events.append(json.loads(line))
        if events[-1].get("code") == "ssh-check":
            return events
    raise AssertionError(f"no ssh-check notice: {switch.wait()} {switch.stderr}")


def ssh_in_sandbox(sandbox: Sandbox, keys: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", "--target", str(sandbox.pid), "--net",
         "ssh", "-p", str(PORT), "-i", str(keys / "client"), "-o", "BatchMode=yes",
         "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={keys / 'known_hosts'}",
         "-o", "ConnectTimeout=10", "root@127.0.0.1", command],
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
    answered: list[str] = []

    def answer(command: str, done: threading.Event) -> bool:
        answered.append(command)
        assert not done.is_set()
        return go

    options = SwitchOptions(
        image, ["/bin/sh"], state_dir=state, target_pid=sandbox.pid, dry_run=True, yes=True,
        ssh_check=PORT, ssh_check_go=answer, log_file=None,
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
