"""The rules on a state dir's path and on who may change it (issue 21, section 2), and the
one rule for "only root can change this" (injector/rootonly.py) that the code PID 1 runs
shares. Fast and without root: stat results are made up, paths are under tmp_path."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from injector.errors import BadInput
from injector.ramroot.statedir import check_state_dir_path
from injector.rootonly import path_and_parents, why_not_root_only
from injector.switch import SwitchOptions


def status(mode: int, uid: int = 0) -> os.stat_result:
    return os.stat_result((mode, 1, 1, 1, uid, 0, 0, 0, 0, 0))


@pytest.mark.parametrize(
    ("mode", "uid", "why"),
    [
        (stat.S_IFDIR | 0o755, 0, None),
        (stat.S_IFDIR | 0o700, 0, None),
        (stat.S_IFREG | 0o644, 0, None),
        # Sticky, like /tmp: nobody but an entry's owner may rename or remove the entry.
        (stat.S_IFDIR | 0o1777, 0, None),
        (stat.S_IFDIR | 0o777, 0, "world-writable (mode 0777)"),
        (stat.S_IFDIR | 0o775, 0, "group-writable (mode 0775)"),
        (stat.S_IFDIR | 0o757, 0, "world-writable (mode 0757)"),
        (stat.S_IFDIR | 0o1777, 1000, "owned by uid 1000, not by root"),
        (stat.S_IFDIR | 0o755, 1000, "owned by uid 1000, not by root"),
        # The sticky bit means nothing on a file: anyone may still write it.
        (stat.S_IFREG | 0o1666, 0, "world-writable (mode 1666)"),
        (stat.S_IFLNK | 0o777, 0, "a symlink"),
    ],
)
def test_who_may_change_it(mode: int, uid: int, why: str | None) -> None:
    assert why_not_root_only(status(mode, uid)) == why


def test_a_path_and_the_directories_above_it() -> None:
    assert path_and_parents("/run/dboot") == ["/", "/run", "/run/dboot"]
    assert path_and_parents("/") == ["/"]


@pytest.mark.parametrize("given", ["relative", "run/dboot", "./x"])
def test_a_relative_state_dir_is_refused_when_the_options_are_made(given: str) -> None:
    with pytest.raises(BadInput, match=f"--state-dir {Path(given)} is a relative path"):
        SwitchOptions("no-such-image", ["/bin/sh"], state_dir=Path(given))


def test_a_state_dir_through_a_symlink_names_where_it_leads(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with pytest.raises(BadInput, match=f"give the path itself: --state-dir {tmp_path}/real/x"):
        check_state_dir_path(tmp_path / "link" / "x")
    with pytest.raises(BadInput, match=re.escape("goes through a symlink or '..'")):
        check_state_dir_path(Path(f"{tmp_path}/real/../real/x"))
    check_state_dir_path(tmp_path / "real" / "x")  # missing is fine: the run makes it
