"""The teaching rehearsal's pieces that need no root: the register rendering for both
architectures (from fake register sets), the plan's and the options' refusals, and the
stage's channel against a plain unix socket server in this process."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from initstage.plan import Plan, PlanError, plan_from_dict
from initstage.teachpause import TeachChannel, execve_text, short_socket_path
from injector import teach
from injector.errors import SafetyRefusal
from injector.inject import arch as archmod
from injector.switch import SwitchOptions


def entry_regs(arch: archmod.Arch, values: dict[str, int]) -> object:
    regs = arch.regs_type()
    for name, value in values.items():
        setattr(regs, name, value & archmod.U64_MASK)
    return regs


def swap_rows(arch: archmod.Arch, values: dict[str, int], nr: int) -> tuple[teach.RegisterRow, ...]:
    """The rows the swap pause shows, from a fake entry stop in ``nr``."""
    regs = entry_regs(arch, values)
    edit = archmod.substitute_execve(arch, regs, 0x7FFC0000A000, 0x7FFC0000A100, 0x7FFC0000A200)  # type: ignore[arg-type]
    return teach.register_rows(
        arch,
        archmod.shown(arch, regs),  # type: ignore[arg-type]
        archmod.shown(arch, edit.regs),
        kernel_nr=(nr, edit.kernel_nr),
    )


def test_x86_64_swap_shows_orig_rax_and_the_argument_registers() -> None:
    arch = archmod.X86_64
    rows = swap_rows(
        arch,
        {"rip": 0x7F00DEAD1234, "rsp": 0x7FFC0000B000, "rax": -38, "orig_rax": 7, "rdi": 3},
        7,
    )
    lines = teach.render_registers(arch, rows)
    assert [row.name for row in rows] == [
        "rip", "rsp", "rax", "orig_rax", "rdi", "rsi", "rdx", "r10", "r8", "r9",
    ]  # fmt: skip
    assert "* orig_rax  7 poll → 59 execve" in lines
    assert "* rdi       0x3 → 0x7ffc0000a000" in lines
    assert "  rax       -38 → -38" in lines  # -ENOSYS at the entry, untouched
    assert "  rip       0x7f00dead1234 → 0x7f00dead1234" in lines
    assert not any(line.startswith("* syscallno") for line in lines)  # no such regset here


def test_aarch64_swap_shows_x8_x0_to_x5_pc_and_the_kernels_number() -> None:
    arch = archmod.AARCH64
    rows = swap_rows(arch, {"pc": 0xFFFF8000100, "sp": 0xFFFFC0000B00, "x8": 73, "x0": 5}, 73)
    lines = teach.render_registers(arch, rows)
    assert [row.name for row in rows] == [
        "pc", "sp", "x8", "syscallno", "x0", "x1", "x2", "x3", "x4", "x5",
    ]  # fmt: skip
    # The caller's x8 keeps ppoll; the kernel dispatches on NT_ARM_SYSTEM_CALL's number.
    assert "  x8        73 ppoll → 73 ppoll" in lines
    assert "* syscallno 73 ppoll → 221 execve" in lines
    assert "* x0        0x5 → 0x7ffc0000a000" in lines
    assert "  pc        0xffff8000100 → 0xffff8000100" in lines


def test_entry_stop_rows_show_the_registers_as_found() -> None:
    arch = archmod.X86_64
    regs = entry_regs(arch, {"rip": 0x1000, "orig_rax": 61, "rax": -38})
    rows = teach.register_rows(arch, archmod.shown(arch, regs))  # type: ignore[arg-type]
    lines = teach.render_registers(arch, rows)
    assert "  orig_rax  61 wait4" in lines
    assert all("→" not in line for line in lines)


def test_pause_texts_name_the_call_and_the_position() -> None:
    pause = teach.Pause("host", "seize", teach.seize_call(4242), target_pid=4242)
    assert (
        pause.syscall == "ptrace(PTRACE_SEIZE, 4242, 0, PTRACE_O_TRACESYSGOOD|PTRACE_O_TRACEEXEC)"
    )
    assert pause.position == "host 5/9"  # after the graceful stop (issue 19)
    stop = teach.Pause("host", "stop", "")
    assert stop.position == "host 4/9" and stop.title == "The graceful stop"
    assert pause.title == "Seize PID 1"
    assert teach.Pause("stage", "pivot_root", "").position == "stage 4/6"
    long_argv = ["python3", "-c", "x" * 500, "/run/dboot/plan.json"]
    text = teach.execve_call(9, "/usr/bin/python3", long_argv)
    assert text.startswith('ptrace(PTRACE_SYSCALL, 9, 0, 0): PID 1 runs execve("/usr/bin/python3"')
    assert "x" * 500 not in text and '"/run/dboot/plan.json"], envp)' in text
    assert execve_text("/bin/sh", ["/bin/sh", "-c", 'echo "hi"']) == (
        'execve("/bin/sh", ["/bin/sh", "-c", "echo \\"hi\\""], envp)'
    )
    assert teach.parse_stage_line("about to SIGTERM: kill(-1, SIGTERM)\n") == (
        "SIGTERM",
        "kill(-1, SIGTERM)",
    )


# --- refusals: a real switch never waits on a UI --------------------------------------


def test_a_machine_plan_refuses_the_teaching_channel() -> None:
    plan = Plan(new_root="/run/dboot/root", init_argv=["/bin/sh"], teach_socket="/run/t.sock")
    plan.validate()
    assert plan_from_dict(json.loads(plan.to_json())).teach_socket == "/run/t.sock"
    with pytest.raises(PlanError, match="machine plan"):
        Plan(new_root="/r", init_argv=["/bin/sh"], teach_socket="/t.sock", machine=True).validate()
    with pytest.raises(PlanError, match="absolute"):
        Plan(new_root="/r", init_argv=["/bin/sh"], teach_socket="t.sock").validate()
    with pytest.raises(PlanError, match="teach_timeout_seconds"):
        Plan(new_root="/r", init_argv=["/bin/sh"], teach_timeout_seconds=0).validate()


def test_the_pause_hook_is_refused_for_a_real_switch_up_front() -> None:
    def hook(pause: teach.Pause) -> None:
        raise AssertionError("never called")

    with pytest.raises(SafetyRefusal, match="rehearsals"):
        SwitchOptions(image="tinybox", init_argv=["/bin/sh"], pause=hook)
    with pytest.raises(SafetyRefusal, match="rehearsals"):
        SwitchOptions(image="tinybox", init_argv=["/bin/sh"], target_pid=4242, pause=hook)
    assert SwitchOptions(image="t", init_argv=["/bin/sh"], rehearse=True, pause=hook).pause is hook


# --- the stage's channel ------------------------------------------------------------------


class Host:
    """A unix socket server standing in for the wizard: answers each line as told."""

    def __init__(self, path: Path, answers: list[bytes | None]) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(1)
        self.answers = answers  # None: close the connection instead of answering
        self.heard: list[str] = []
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        connection, _ = self.server.accept()
        with connection, connection.makefile("rb") as reader:
            for answer in self.answers:
                self.heard.append(reader.readline().decode().strip())
                if answer is None:
                    return
                connection.sendall(answer)
            reader.readline()  # hold the connection until the stage closes it


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "teach.sock"


def test_the_stage_waits_for_go_then_goes_on(socket_path: Path) -> None:
    host = Host(socket_path, [b"go\n", b"go\n"])
    lines: list[str] = []
    channel = TeachChannel(str(socket_path), 5.0, lines.append)
    channel.pause("sync", "sync()")
    channel.pause("SIGTERM", "kill(-1, SIGTERM)")
    assert host.heard == ["about to sync: sync()", "about to SIGTERM: kill(-1, SIGTERM)"]
    assert not channel.done
    channel.end("done")


def test_end_of_file_from_the_host_means_go_on_without_more_pauses(socket_path: Path) -> None:
    host = Host(socket_path, [None])
    lines: list[str] = []
    channel = TeachChannel(str(socket_path), 30.0, lines.append)
    started = time.monotonic()
    channel.pause("sync", "sync()")
    channel.pause("SIGTERM", "kill(-1, SIGTERM)")  # returns at once: the channel ended
    assert time.monotonic() - started < 5
    assert host.heard == ["about to sync: sync()"]
    assert channel.done and any("closed the channel" in line for line in lines)


def test_a_silent_host_times_out_and_the_stage_goes_on(socket_path: Path) -> None:
    Host(socket_path, [b""])  # hears the line, never answers
    lines: list[str] = []
    channel = TeachChannel(str(socket_path), 0.3, lines.append)
    started = time.monotonic()
    channel.pause("sync", "sync()")
    assert 0.3 <= time.monotonic() - started < 5
    assert channel.done and any("no go within 0.3 s" in line for line in lines)


def test_no_listener_means_no_pauses(tmp_path: Path) -> None:
    lines: list[str] = []
    channel = TeachChannel(str(tmp_path / "nobody.sock"), 30.0, lines.append)
    channel.pause("sync", "sync()")
    assert channel.done and any("no host listening" in line for line in lines)


def test_a_long_socket_path_is_reached_through_a_directory_fd(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    host = host_behind_a_short_path(deep / "teach.sock")
    channel = TeachChannel(str(deep / "teach.sock"), 5.0, lambda line: None)
    channel.pause("exec", "execve(...)")
    assert host.heard == ["about to exec: execve(...)"]


def host_behind_a_short_path(path: Path) -> Host:
    reachable, fd = short_socket_path(str(path))
    assert fd is not None
    try:
        return Host(Path(reachable), [b"go\n"])
    finally:
        os.close(fd)
