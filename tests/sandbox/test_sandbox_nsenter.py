"""injector.inject.nsenter against a real sandbox: work done inside its mount namespace stays
there."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.inject import nsenter
from injector.rehearsal.sandbox import Sandbox
from tests.sandbox.sandbox_checks import Footprint, eventually, mounted_sources, our_children

pytestmark = pytest.mark.root

Send = Callable[[Any], None]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with Sandbox(services=1) as started:
        footprint = Footprint(started)
        yield started
    footprint.assert_gone("dboot-nsenter-test", "dboot-state")


def test_a_tmpfs_mounted_inside_is_seen_there_and_not_here(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    mount_point = tmp_path / "root"
    mount_point.mkdir()

    def mount(send: Send) -> tuple[str, bool]:
        send(("step", 1))
        subprocess.run(["mount", "-t", "tmpfs", "dboot-nsenter-test", str(mount_point)], check=True)
        send(("step", 2))
        # We joined its PID namespace too: /proc/self exists in its /proc.
        mine = Path("/proc/self/mountinfo").read_text()
        return os.readlink("/proc/self"), "dboot-nsenter-test" in mine

    events: list[Any] = []
    inner_pid, seen_inside = nsenter.run_in_mount_namespace(sandbox.pid, mount, events.append)
    assert events == [("step", 1), ("step", 2)]
    assert seen_inside and int(inner_pid) < 100
    assert "dboot-nsenter-test" in mounted_sources(sandbox.pid)
    assert "dboot-nsenter-test" not in mounted_sources("self")
    assert not os.path.ismount(mount_point)


@pytest.mark.parametrize(
    ("error", "exit_code"),
    [
        (BadInput("no such image", "pick another"), 1),
        (EnvironmentFailure("disk full", "free some"), 2),
        (SafetyRefusal("not allowed"), 3),
    ],
)
def test_errors_come_back_with_type_message_and_exit_code(
    sandbox: Sandbox, error: Exception, exit_code: int
) -> None:
    def fail(send: Send) -> None:
        raise error

    with pytest.raises(type(error)) as raised:
        nsenter.run_in_mount_namespace(sandbox.pid, fail)
    assert str(raised.value) == str(error)
    assert raised.value.exit_code == exit_code  # type: ignore[attr-defined]
    assert raised.value.cause == error.cause  # type: ignore[attr-defined]
    assert "in fail" in getattr(raised.value, "__notes__", [""])[0]  # the child's traceback


def test_an_exception_that_cannot_travel_is_named(sandbox: Sandbox) -> None:
    class Local(Exception):
        """Defined in a function: pickle cannot send it."""

    def fail(send: Send) -> None:
        raise Local("odd")

    with pytest.raises(EnvironmentFailure, match="Local: odd"):
        nsenter.run_in_mount_namespace(sandbox.pid, fail)


def test_a_result_that_cannot_travel_is_an_error(sandbox: Sandbox) -> None:
    with pytest.raises(Exception, match="pickle"):
        nsenter.run_in_mount_namespace(sandbox.pid, lambda send: lambda: None)


def test_events_stream_live_and_the_result_follows(sandbox: Sandbox, tmp_path: Path) -> None:
    go = tmp_path / "go"

    def waits_for_the_parent(send: Send) -> str:
        send("first")
        # Only a parent that received "first" already can create this file.
        assert eventually(go.exists, timeout=5)
        return "done"

    stream = nsenter.stream_in_mount_namespace(sandbox.pid, waits_for_the_parent)
    for event in stream:
        assert event == "first"
        go.touch()
    assert stream.value == "done"


def test_stopping_the_stream_cancels_the_child_which_cleans_up(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    cleaned = tmp_path / "cleaned"
    children_before = our_children()

    def long_job(send: Send) -> None:
        try:
            while True:
                send("tick")
                time.sleep(0.05)
        finally:
            cleaned.write_text("yes")

    stream = iter(nsenter.stream_in_mount_namespace(sandbox.pid, long_job))
    assert next(stream) == "tick"
    stream.close()
    assert cleaned.read_text() == "yes"
    assert our_children() == children_before  # the helper was reaped


def test_in_our_own_namespace_fn_simply_runs_here() -> None:
    assert nsenter.run_in_mount_namespace(os.getpid(), lambda send: os.getpid()) == os.getpid()

    def counts(send: Send) -> int:
        for number in range(3):
            send(number)
        return 3

    stream = nsenter.stream_in_mount_namespace(os.getpid(), counts)
    assert list(stream) == [0, 1, 2] and stream.value == 3


def test_in_our_own_namespace_a_cancel_lands_at_the_next_send(tmp_path: Path) -> None:
    outcome: list[str] = []

    def long_job(send: Send) -> None:
        try:
            while True:
                send("tick")
        except KeyboardInterrupt:
            outcome.append("cancelled")
            raise

    stream = iter(nsenter.stream_in_mount_namespace(os.getpid(), long_job))
    assert next(stream) == "tick"
    stream.close()
    assert outcome == ["cancelled"]


def test_a_missing_target_is_an_environment_failure() -> None:
    with pytest.raises(EnvironmentFailure, match="pid 999999999"):
        nsenter.run_in_mount_namespace(999999999, lambda send: None)


def test_a_private_state_dir_lives_and_dies_inside(sandbox: Sandbox, tmp_path: Path) -> None:
    state_dir = tmp_path / "state"

    def prepare(send: Send) -> None:
        nsenter.mount_private_state_dir(state_dir)
        (state_dir / "root").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "dboot-ram", str(state_dir / "root")], check=True)
        (state_dir / "plan.json").write_text("{}")

    nsenter.run_in_mount_namespace(sandbox.pid, prepare)
    assert {"dboot-state", "dboot-ram"} <= set(mounted_sources(sandbox.pid))
    assert os.listdir(state_dir) == []  # from here, only the empty mount point
    assert (state_dir.stat().st_mode & 0o777) == 0o700

    def look(send: Send) -> list[str]:
        return sorted(os.listdir(state_dir))

    assert nsenter.run_in_mount_namespace(sandbox.pid, look) == ["plan.json", "root"]
    nsenter.run_in_mount_namespace(sandbox.pid, lambda send: nsenter.undo_state_dir(state_dir))
    assert nsenter.run_in_mount_namespace(sandbox.pid, look) == []
    assert "dboot-ram" not in mounted_sources(sandbox.pid)
