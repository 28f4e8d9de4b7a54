"""The preflight report with the host's /etc files in every odd state: a fact and an info
notice, never a crash (a plain debootstrap system has no /etc/hosts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from injector.preflight import preflight
from injector.ramroot.rootfs import HOST_FILES
from tests.unit.test_preflight import build, run, server
from tests.unit.test_rootfs_hostfiles import STATES, expected_content


def break_host_file(root: Path, name: str, state: str) -> None:
    target = root / "etc" / name
    target.unlink()
    if state == "empty":
        target.write_bytes(b"")
    elif state == "dangling symlink":
        target.symlink_to("/nonexistent/" + name)
    elif state == "directory":
        target.mkdir()
    elif state == "symlink to a good file":
        real = root / f"real-{name}"
        real.write_bytes(b"0123456789abcdef0123456789abcdef\n")
        target.symlink_to(real)


@pytest.mark.parametrize("state", STATES)
@pytest.mark.parametrize("name", HOST_FILES)
def test_preflight_reports_host_files_in_any_state(name: str, state: str, tmp_path: Path) -> None:
    scene = build(tmp_path, server())
    break_host_file(scene.root, name, state)
    report = run(scene)
    facts = {item.name: item for item in report.host_files}
    assert list(facts) == list(HOST_FILES)
    carried = expected_content(name, state) is not None
    assert facts[name].carried is carried
    assert all(facts[other].carried for other in HOST_FILES if other != name)
    odd = [n for n in report.notices if n.code == "host-files"]
    if state == "symlink to a good file":
        assert odd == []  # a symlink to a real file is an ordinary install
    else:
        [notice] = odd
        assert notice.level == "info" and f"/etc/{name} is " in notice.message
    # Never more than information: the image's own file stays where the host has none.
    assert all(n.level == "info" for n in odd)
    assert json.loads(json.dumps(report.to_json()))["host_files"][0]["name"] == "hostname"
    assert list(preflight.report_events(report))


def test_no_etc_at_all(tmp_path: Path) -> None:
    scene = build(tmp_path, server())
    for name in HOST_FILES:
        (scene.root / "etc" / name).unlink()
    (scene.root / "etc").rmdir()
    report = run(scene)
    assert [item.carried for item in report.host_files] == [True, False, False, False]
    [notice] = [n for n in report.notices if n.code == "host-files"]
    assert "/etc/hosts is missing" in notice.message
