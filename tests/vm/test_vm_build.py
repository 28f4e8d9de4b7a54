"""The test bed's build logic, without building: fast, part of the quick tiers (no ``vm`` mark)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.vm import build


@pytest.mark.root  # check_requirements refuses non-root before it looks for tools
def test_missing_tool_fails_loudly_with_the_install_command(monkeypatch):
    monkeypatch.setitem(build.REQUIRED_TOOLS, "qemu-system-nowhere", "qemu-system-x86")
    with pytest.raises(build.BuildError, match=r"apt-get install .*qemu-system-x86"):
        build.check_requirements()


def test_disk_is_rebuilt_when_the_sources_change_and_only_then(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    for name in ("pyproject.toml", "README.md", "LICENSE", "scripts/build-tinybox.sh"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build.REPO / name, repo / name)
    (repo / "injector").mkdir()
    (repo / "injector/switch.py").write_text("STEPS = 1\n")
    monkeypatch.setattr(build, "REPO", repo)
    base = Path("base-0123456789abcdef")
    before = build.disk_key(base)

    (repo / "injector/__pycache__").mkdir()
    (repo / "injector/__pycache__/switch.cpython-311.pyc").write_bytes(b"\0")
    assert build.disk_key(base) == before, "bytecode caches must not trigger a rebuild"

    (repo / "injector/switch.py").write_text("STEPS = 2\n")
    assert build.disk_key(base) != before, "an edited source must rebuild the disk"

    (repo / "injector/switch.py").write_text("STEPS = 1\n")
    (repo / "initstage").mkdir()
    (repo / "initstage/stage.py").write_text("")
    assert build.disk_key(base) != before, "a new source file must rebuild the disk"
    assert build.disk_key(Path("base-fedcba9876543210")) != build.disk_key(base)
