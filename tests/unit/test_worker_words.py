"""What a helper process says when it ends early (issue 21, section 6): the copy-in
worker's last words reach -v, a worker that said nothing is not promised to have, and a
helper whose parent is gone says so before it exits."""

from __future__ import annotations

import subprocess
import sys
import tempfile

import pytest

from initstage import launch
from injector.errors import EnvironmentFailure
from injector.image import extract


def outcome_of(said: bytes, returncode: int = 1) -> EnvironmentFailure:
    with tempfile.TemporaryFile() as stderr:
        stderr.write(said)
        with pytest.raises(EnvironmentFailure) as caught:
            extract._outcome({}, returncode, stderr, "scanning img")
    return caught.value


def test_a_worker_that_said_nothing_is_not_promised_a_traceback() -> None:
    failure = outcome_of(b"")
    assert str(failure).startswith("scanning img: copy-in worker exited with status 1: ")
    assert "said nothing" in str(failure) and "traceback" not in str(failure)
    assert getattr(failure, "__notes__", []) == []


def test_what_a_worker_said_goes_to_the_note_that_v_shows() -> None:
    failure = outcome_of(b"Traceback (most recent call last):\nValueError: boom\n")
    assert "(ValueError: boom)" in str(failure) and "-v for what the worker said" in str(failure)
    (note,) = getattr(failure, "__notes__", [])  # BaseException's own from Python 3.11
    assert note.startswith("the copy-in worker said:\nTraceback") and "ValueError: boom" in note


def run_helper(code: str) -> subprocess.CompletedProcess[str]:
    """``code`` in a child of ours, with initstage importable as the helpers have it."""
    path = f"import sys; sys.path.append({launch.package_parent()!r}); "
    return subprocess.run(
        [sys.executable, "-I", "-c", path + code], capture_output=True, text=True, timeout=30
    )


def test_a_helper_whose_parent_is_gone_says_so() -> None:
    gone = 2**22 + 1  # above any pid_max: no process's parent
    result = run_helper(f"from initstage import linux; linux.die_with_parent({gone}); print(1)")
    assert result.returncode == 1 and result.stdout == ""
    assert f"its parent pid {gone} is gone" in result.stderr, result.stderr


def test_a_helper_whose_parent_is_the_one_it_was_told_goes_on() -> None:
    result = run_helper(
        "import os; from initstage import linux; "
        "linux.die_with_parent(os.getppid()); print('went on')"
    )
    assert result.returncode == 0 and result.stdout == "went on\n", result.stderr
