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


def test_each_variant_has_its_own_layers_and_tools():
    """Adding a machine is a parameter: the arm64 variant shares every step, with its own cache
    keys, its own QEMU and compiler, and binfmt for its foreign tree."""
    x86, arm = build.VARIANTS["x86_64"], build.VARIANTS["arm64"]
    assert build.base_key(x86) != build.base_key(arm)
    base = Path("base-0123456789abcdef")
    assert build.disk_key(base, x86) != build.disk_key(base, arm)
    tools = build.required_tools(arm)
    assert tools["qemu-system-aarch64"] == "qemu-system-arm"
    assert tools["aarch64-linux-gnu-gcc"] == "gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    assert "qemu-aarch64-static" in tools
    assert "qemu-system-aarch64" not in build.required_tools(x86)


def test_arm64_machine_boots_virt_with_the_pl011_console(tmp_path):
    from tests.vm.machine import Machine, Storage

    arm = build.VARIANTS["arm64"]
    bed = build.VmBed(Path("k"), Path("i"), Path("d"), 0.0, 0.0, arm)
    machine = Machine(bed, "rollback", tmp_path)
    command = machine.qemu_command(Storage(tmp_path / "o"), tmp_path / "c")
    machine.stop()  # removes its socket directory; QEMU never started
    assert command[:5] == ["qemu-system-aarch64", "-M", "virt", "-cpu", "max,pauth-impdef=on"]
    append = command[command.index("-append") + 1]
    assert "console=ttyAMA0" in append and "dboot.test=rollback" in append
