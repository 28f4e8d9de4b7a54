"""Lab mode survives sudo: the variable counts when any ancestor process was started with
it (sudo keeps the user's environment for itself while it resets the command's). A crafted
/proc tree of the same shape as the real one; tests/sandbox/test_labmode_sudo.py runs
``dboot switch`` for real with the variable stripped from its own environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from injector import labmode

OURS = 40


def crafted_proc(tmp_path: Path, chain: list[tuple[int, int, str, str]]) -> Path:
    """``chain``: (pid, ppid, comm, environ as 'K=V K=V') entries."""
    proc = tmp_path / "proc"
    for pid, ppid, comm, environ in chain:
        base = proc / str(pid)
        base.mkdir(parents=True)
        (base / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0\n")
        (base / "environ").write_text("".join(f"{pair}\0" for pair in environ.split()))
    return proc


def sudo_chain(sudo_environ: str) -> list[tuple[int, int, str, str]]:
    return [
        (OURS, 30, "dboot", "PATH=/usr/bin SUDO_USER=ann"),  # sudo reset it
        (30, 20, "sudo", sudo_environ),  # what the user's shell handed to sudo
        (20, 10, "bash", "HOME=/home/ann"),
        (10, 1, "sshd", ""),
        (1, 0, "systemd", ""),
    ]


@pytest.mark.parametrize(
    ("sudo_environ", "found"),
    [
        ("PATH=/bin DBOOT_REHEARSAL_ONLY=1", (30, "sudo")),
        ("DBOOT_REHEARSAL_ONLY=yes", (30, "sudo")),
        ("DBOOT_REHEARSAL_ONLY=0", None),
        ("DBOOT_REHEARSAL_ONLY=", None),
        ("XDBOOT_REHEARSAL_ONLY=1 DBOOT_REHEARSAL_ONLY_NOT=1", None),
        ("PATH=/bin", None),
    ],
)
def test_the_nearest_ancestor_started_in_lab_mode(
    tmp_path: Path, sudo_environ: str, found: tuple[int, str] | None
) -> None:
    proc = crafted_proc(tmp_path, sudo_chain(sudo_environ))
    assert labmode.ancestor_with_lab_mode(OURS, proc) == found


def test_further_out_counts_too_and_a_loop_ends(tmp_path: Path) -> None:
    chain = sudo_chain("PATH=/bin")
    chain[3] = (10, 1, "tmux", "DBOOT_REHEARSAL_ONLY=1")
    assert labmode.ancestor_with_lab_mode(OURS, crafted_proc(tmp_path, chain)) == (10, "tmux")
    looped = [(OURS, 31, "dboot", ""), (31, 32, "a", ""), (32, 31, "b", "")]
    assert labmode.ancestor_with_lab_mode(OURS, crafted_proc(tmp_path / "loop", looped)) is None


def test_unreadable_ancestors_are_no_witness(tmp_path: Path) -> None:
    proc = crafted_proc(tmp_path, sudo_chain("DBOOT_REHEARSAL_ONLY=1"))
    (proc / "30" / "environ").unlink()
    (proc / "30" / "environ").mkdir()  # reading fails (EISDIR), as a protected file would
    assert labmode.ancestor_with_lab_mode(OURS, proc) is None
    assert labmode.ancestor_with_lab_mode(OURS, tmp_path / "no-proc") is None


def test_the_reason_names_the_witness(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    proc = crafted_proc(tmp_path, sudo_chain("DBOOT_REHEARSAL_ONLY=1"))
    monkeypatch.setattr(labmode, "ANCESTOR_PROC", proc)
    monkeypatch.setattr(labmode, "LAB_MODE_FLAG", tmp_path / "absent")
    reason = labmode.lab_mode_reason(environ={}, pid=OURS)
    assert reason is not None and "pid 30 (sudo)" in reason and "DBOOT_REHEARSAL_ONLY" in reason
    # Closer in, =0 cannot undo it: only ever on.
    assert labmode.lab_mode_reason(environ={"DBOOT_REHEARSAL_ONLY": "0"}, pid=OURS) == reason
    flag = tmp_path / "rehearsal-only"
    flag.touch()
    monkeypatch.setattr(labmode, "LAB_MODE_FLAG", flag)
    assert labmode.lab_mode_reason(environ={}, pid=OURS) == f"lab mode is on ({flag} exists)"
    monkeypatch.setattr(labmode, "LAB_MODE_FLAG", tmp_path / "absent")
    clean = crafted_proc(tmp_path / "clean", sudo_chain("PATH=/bin"))
    monkeypatch.setattr(labmode, "ANCESTOR_PROC", clean)
    assert labmode.lab_mode_reason(environ={}, pid=OURS) is None
