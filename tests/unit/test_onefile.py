"""The single file's parts that need no build: how its start (app/onefile.py) picks a script,
names targets, hides what a target lacks and keeps the host's site-packages out; and how the
build (scripts/build-onefile.py) reads wheel tags and trims wheels. tests/sandbox/test_onefile.py
builds and runs the real file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from app import onefile

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = {"dboot": "app.cli:main", "dboot-tui": "app.tui.main:main"}


def load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "build_onefile", REPO / "scripts/build-onefile.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()


@pytest.mark.parametrize(
    ("invoked_as", "words", "expected"),
    [
        ("dboot", ["images"], ("dboot", ["images"])),
        ("dboot", ["tui", "--rehearse"], ("dboot-tui", ["--rehearse"])),
        ("dboot-tui", ["--rehearse"], ("dboot-tui", ["--rehearse"])),
        ("dboot-tui.pyz", [], ("dboot-tui", [])),
        ("dboot", [], ("dboot", [])),
        ("dboot", ["check", "tui"], ("dboot", ["check", "tui"])),
    ],
)
def test_the_wizard_by_its_name_or_the_tui_word(
    invoked_as: str, words: list[str], expected: tuple[str, list[str]]
) -> None:
    assert onefile.pick_script(SCRIPTS, invoked_as, words) == expected


def test_targets_in_words() -> None:
    assert onefile.describe("cp313-aarch64") == "CPython 3.13 on aarch64"
    machines = ("x86_64", "aarch64")
    manifest: dict[str, Any] = {
        "targets": {f"cp3{m}-{a}": {} for m in (9, 10, 13) for a in machines}
    }
    assert onefile.summary(manifest) == "CPython 3.9 to 3.13 on aarch64 and x86_64"
    assert onefile.this_target() == (
        f"cp{sys.version_info[0]}{sys.version_info[1]}-{os.uname().machine}"
    )


def manifest_with(glibc: list[int] | None) -> dict[str, Any]:
    return {
        "targets": {"cp311-x86_64": {"libs": ["psutil-abi3", "rich-1"], "missing": {}}},
        "libs": {
            "psutil-abi3": {"dist": "psutil", "modules": ["psutil"], "glibc": glibc},
            "rich-1": {"dist": "rich", "modules": ["rich"], "glibc": None},
        },
    }


def test_a_compiled_build_this_glibc_cannot_load_counts_as_missing() -> None:
    found = onefile.glibc()
    assert found is not None and found >= (2, 17)
    assert onefile.missing_here(manifest_with([2, 17]), "cp311-x86_64") == {}
    missing = onefile.missing_here(manifest_with([2, 999]), "cp311-x86_64")
    assert list(missing) == ["psutil"]
    assert "needs glibc 2.999 or newer" in missing["psutil"]["why"]
    assert onefile.libs_here(manifest_with([2, 999]), "cp311-x86_64") == ["rich-1"]


def test_importing_what_the_file_lacks_names_the_reason() -> None:
    finder = onefile.MissingDependency(
        {"dboot-absent": {"modules": ["dboot_absent_module"], "why": "no wheel on PyPI"}},
        "cp311-x86_64",
    )
    sys.meta_path.append(finder)
    try:
        with pytest.raises(ImportError) as caught:
            import dboot_absent_module.sub  # type: ignore[import-not-found]  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
    assert isinstance(caught.value, ModuleNotFoundError)
    assert "holds no dboot-absent for CPython 3.11 on x86_64 (no wheel on PyPI)" in str(
        caught.value
    )


def test_the_hosts_site_packages_cannot_shadow_the_files_code(tmp_path: Path) -> None:
    """A host's own docker (or a PyPI package named injector) in site-packages or on PYTHONPATH
    must not be what the file imports."""
    site = tmp_path / "site-packages"
    ours = tmp_path / "ours"
    for folder in (site, ours):
        folder.mkdir()
        (folder / "shadowed.py").write_text(f"WHERE = {folder.name!r}\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from app import onefile;"
        " onefile.isolate_path(sys.argv[2]); import json, shadowed; print(shadowed.WHERE)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO), str(ours)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.stdout.strip() == "ours", result.stderr


@pytest.mark.parametrize(
    ("wheel", "floor"),
    [
        ("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.whl", (2, 12)),
        ("zstandard-0.25.0-cp39-cp39-manylinux2014_aarch64.manylinux_2_17_aarch64.whl", (2, 17)),
        ("x-1-cp311-cp311-manylinux_2_28_x86_64.whl", (2, 28)),
        ("x-1-cp311-cp311-manylinux1_x86_64.manylinux_2_5_x86_64.whl", (2, 5)),
        ("rich-15.0.0-py3-none-any.whl", None),
    ],
)
def test_the_glibc_a_wheel_needs(wheel: str, floor: tuple[int, int] | None) -> None:
    assert build.wheel_glibc(wheel) == floor


def test_what_the_build_trims_from_a_wheel(tmp_path: Path) -> None:
    wheel = tmp_path / "zstandard-1.0-cp311-cp311-manylinux2014_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as out:
        for name in (
            "zstandard/__init__.py",
            "zstandard/_cffi.cpython-311-x86_64-linux-gnu.so",  # needs cffi: dead weight
            "zstandard/backend_cffi.py",
            "zstandard/md.cpython-311-x86_64-linux-gnu.so",  # an accelerator of md.py
            "zstandard/md.py",
            "zstandard-1.0.data/purelib/extra.py",  # where an install puts it
            "zstandard-1.0.data/scripts/tool.py",  # not ours
            "zstandard-1.0.dist-info/METADATA",
        ):
            out.writestr(name, b"x")
    assert sorted(build.wheel_files(wheel, "x86_64")) == [
        "extra.py",
        "zstandard-1.0.dist-info/METADATA",
        "zstandard/__init__.py",
        "zstandard/md.py",
    ]
