"""`dboot` and `dboot-tui` work from an isolated install (a fresh venv, as pipx makes one).

`injector` is also the name of an unrelated PyPI package, so the README recommends an
isolated install; this proves the console scripts resolve to our packages from one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def isolated_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("isolated") / "venv"
    # --upgrade-deps: the pip that ensurepip brings can be old (Python 3.9's: 23.0), and its
    # resolver takes many minutes over our dependencies; pipx keeps a current one too.
    subprocess.run([sys.executable, "-m", "venv", "--upgrade-deps", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--disable-pip-version-check", str(PROJECT)],
        check=True,
        timeout=600,
    )
    return venv


def test_dboot_runs_from_an_isolated_install(isolated_venv: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(isolated_venv / "bin/dboot"), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    for command in ("images", "check", "rehearse", "switch"):
        assert command in result.stdout


def test_packages_resolve_to_this_project(isolated_venv: Path, tmp_path: Path) -> None:
    probe = "import injector, initstage, app; print(injector.__file__, initstage.__file__)"
    result = subprocess.run(
        [str(isolated_venv / "bin/python"), "-I", "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=True,
    )
    assert str(isolated_venv) in result.stdout, result.stdout


def test_dboot_tui_runs_from_an_isolated_install(isolated_venv: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [str(isolated_venv / "bin/dboot-tui"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "--rehearse" in result.stdout
