"""The wizard's own log (issue 21, section 6): root appends to it, so never in /tmp, never
through a symlink, only a regular file, and a new one is made 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from app.tui.main import DEFAULT_LOG, log_path, open_log, parse_args

WIZARD = str(Path(sys.executable).with_name("dboot-tui"))


def test_the_default_log_is_in_var_log_whatever_the_state_dir(tmp_path: Path) -> None:
    assert log_path(parse_args([])) == DEFAULT_LOG
    assert DEFAULT_LOG.parent == Path("/var/log")
    assert log_path(parse_args(["--state-dir", str(tmp_path)])) == DEFAULT_LOG
    assert log_path(parse_args(["--log-file", str(tmp_path / "x.log")])) == tmp_path / "x.log"


def test_a_new_log_is_0600_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "tui.log"
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask being strict
    try:
        with open_log(path) as log:
            log.write("one\n")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with open_log(path) as log:
        log.write("two\n")
    assert path.read_text() == "one\ntwo\n"


def test_a_symlink_in_place_of_the_log_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("untouched\n")
    link = tmp_path / "tui.log"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="symbolic links"):
        open_log(link)
    dangling = tmp_path / "dangling.log"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(OSError, match="symbolic links"):
        open_log(dangling)
    assert victim.read_text() == "untouched\n"
    assert not (tmp_path / "created-through-the-link").exists()


def test_a_fifo_in_place_of_the_log_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "tui.log"
    os.mkfifo(fifo)
    with pytest.raises(OSError):
        open_log(fifo)


def test_the_wizard_says_so_and_exits_2_before_it_starts(tmp_path: Path) -> None:
    link = tmp_path / "tui.log"
    link.symlink_to(tmp_path / "elsewhere")
    result = subprocess.run(
        [WIZARD, "--rehearse", "--log-file", str(link)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
    )
    assert result.returncode == 2, result
    assert result.stderr.strip() == (
        f"dboot-tui: cannot write the log {link}: it is a symlink: use --log-file"
    )
    assert not (tmp_path / "elsewhere").exists()
