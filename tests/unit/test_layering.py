"""Dependencies point one way: app -> injector -> initstage.

- initstage is stdlib only: it runs as PID 1 from ``python -I -S``, where nothing else
  exists. Proven twice: by importing every initstage module in an isolated interpreter
  and checking what landed in sys.modules, and by reading every import statement.
- injector never imports textual (nor app): checked the same two ways.
- libc is loaded in one place, ``initstage/linux.py``, the project's syscall module.
- The preflight's /proc readers load no python-ptrace: an unprivileged user's interpreter
  (Debian's own, outside the venv) runs them.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def stdlib_module_names() -> set[str]:
    """The running interpreter's standard library: the tests run on the oldest Python we
    support too, so a module newer than it (tomllib...) is foreign to the stage there."""
    if sys.version_info >= (3, 10):
        return set(sys.stdlib_module_names)
    # Python 3.9 has no list: read its library directory, its extension modules, its builtins
    # and the import machinery frozen into it.
    names = {*sys.builtin_module_names, "_frozen_importlib", "_frozen_importlib_external"}
    library = Path(sysconfig.get_paths()["stdlib"])
    for place in (library, library / "lib-dynload"):
        names.update(
            path.name.split(".")[0] for path in place.iterdir() if path.suffix in (".py", ".so")
        )
        names.update(path.name for path in place.iterdir() if (path / "__init__.py").exists())
    return names


STDLIB = stdlib_module_names()


def modules_of(package: str) -> list[str]:
    path = REPO / package
    return [package] + [
        f"{package}.{info.name}" for info in pkgutil.walk_packages([str(path)]) if not info.ispkg
    ]


def loaded_after_importing(modules: list[str], *flags: str) -> set[str]:
    """Top-level names in sys.modules after importing ``modules`` in a fresh interpreter."""
    code = (
        "import sys, json\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"for name in {modules!r}:\n"
        "    __import__(name)\n"
        "print(json.dumps(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    done = subprocess.run(
        [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return set(json.loads(done.stdout))


def imported_names(package: str) -> dict[str, set[str]]:
    """{file: top-level module names of its import statements}, relative imports excluded."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


def test_initstage_loads_only_the_stdlib_in_an_isolated_interpreter():
    loaded = loaded_after_importing(modules_of("initstage"), "-I", "-S")
    foreign = loaded - STDLIB - {"initstage", "__main__"}
    assert not foreign, f"initstage pulled in non-stdlib modules: {sorted(foreign)}"
    assert "initstage" in loaded


def test_initstage_import_statements_name_only_the_stdlib_and_itself():
    for path, names in imported_names("initstage").items():
        foreign = names - STDLIB - {"initstage"}
        assert not foreign, f"{path} imports {sorted(foreign)}"


def test_injector_never_imports_textual_or_app():
    for path, names in imported_names("injector").items():
        assert not names & {"textual", "app"}, (
            f"{path} imports {sorted(names & {'textual', 'app'})}"
        )


def test_importing_every_injector_module_loads_no_textual():
    modules = modules_of("injector")
    if len(modules) < 2:
        pytest.fail("no injector modules found: is the repository layout intact?")
    loaded = loaded_after_importing(modules)
    assert "textual" not in loaded and "app" not in loaded


def test_libc_is_loaded_only_by_the_syscall_module():
    for package in ("app", "injector", "initstage"):
        for path in sorted((REPO / package).rglob("*.py")):
            if path == REPO / "initstage" / "linux.py":
                continue
            calls = [
                node.lineno
                for node in ast.walk(ast.parse(path.read_text(), str(path)))
                if isinstance(node, ast.Attribute) and node.attr == "CDLL"
            ]
            assert not calls, f"{path.relative_to(REPO)}:{calls} loads libc: use initstage.linux"


def test_the_preflight_loads_no_python_ptrace():
    loaded = loaded_after_importing(
        ["injector.preflight.preflight", "injector.preflight.procinfo", "injector.labmode"]
    )
    assert "ptrace" not in loaded
