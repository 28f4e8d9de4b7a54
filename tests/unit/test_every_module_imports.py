"""Every module of app, injector and initstage imports on the interpreter the tests run on.

``make test`` runs this tier on the oldest and the newest supported Python too (3.9, 3.13), where
no other test of the tier loads the wizard's modules (their own tier runs on the default
interpreter only). Importing them all there catches what only the interpreter can: syntax it
does not have (``match``), a ``X | Y`` evaluated at import (a base class, an alias), a name its
standard library lacks or has dropped. Each package in a fresh interpreter, as the commands start.
"""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def modules_of(package: str) -> list[str]:
    """The package and every module under it, but ``__main__`` (importing it runs it)."""
    found = pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}.")
    return [package, *sorted(info.name for info in found if not info.name.endswith("__main__"))]


@pytest.mark.parametrize("package", ["app", "injector", "initstage"])
def test_every_module_of_the_package_imports(package: str) -> None:
    modules = modules_of(package)
    assert len(modules) > 3, f"{package}: no modules found: is the repository layout intact?"
    code = (
        "import importlib, json, sys, traceback\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "failed = {}\n"
        f"for name in {modules!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except BaseException:\n"
        "        failed[name] = traceback.format_exc()\n"
        "print(json.dumps(failed))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    failed = json.loads(done.stdout.splitlines()[-1])
    assert not failed, f"Python {sys.version.split()[0]}: " + "\n".join(failed.values())
