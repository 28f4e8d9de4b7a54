"""The code PID 1 runs must be root's alone (issue 21, section 6): the interpreter, what it
maps, initstage and the stdlib modules, the ``__pycache__`` beside them, and every directory
above. Refused otherwise, exit 3, naming the path, before the injection; and the stage runs
with -B, so it never writes bytecode as PID 1.

The trees here are real files under tmp_path (root's, as the test runs as root), looked at
through /proc/PID/root as the switch does; the switch itself runs against a sandbox's PID 1.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from initstage.launch import INTERPRETER_FLAGS, stage_argv, stage_files
from injector import switch
from injector.errors import SafetyRefusal
from injector.rehearsal.sandbox import Sandbox
from tests.images import build_tinybox
from tests.sandbox.sandbox_checks import mounted_sources

pytestmark = [pytest.mark.root]

NOBODY = 65534


def code_tree(tmp_path: Path) -> dict[str, Path]:
    """A package with a module and its bytecode, as an install made by root leaves it."""
    package = tmp_path / "lib" / "initstage"
    package.mkdir(parents=True)
    module = package / "stage.py"
    module.write_text("print('stage')\n")
    cache = Path(importlib.util.cache_from_source(str(module)))
    cache.parent.mkdir()
    cache.write_bytes(b"not really bytecode")
    for path in (tmp_path, tmp_path / "lib", package, cache.parent):
        path.chmod(0o755)
    for path in (module, cache):
        path.chmod(0o644)
    return {"module": module, "package": package, "cache": cache, "cache_dir": cache.parent}


def refusal(files: list[Path]) -> str | None:
    try:
        switch._refuse_stage_code_others_can_change(os.getpid(), [str(path) for path in files])
    except SafetyRefusal as error:
        return str(error)
    return None


def test_a_tree_only_root_can_change_passes(tmp_path: Path) -> None:
    tree = code_tree(tmp_path)
    assert refusal([tree["module"], Path(sys.executable)]) is None


@pytest.mark.parametrize(
    ("which", "mode", "owner", "why"),
    [
        ("module", 0o666, 0, "world-writable (mode 0666)"),
        ("module", 0o644, NOBODY, f"owned by uid {NOBODY}, not by root"),
        ("package", 0o775, 0, "group-writable (mode 0775)"),
        # Python reads bytecode even under -B: a planted .pyc would run as PID 1.
        ("cache_dir", 0o777, 0, "world-writable (mode 0777)"),
        ("cache", 0o644, NOBODY, f"owned by uid {NOBODY}, not by root"),
    ],
)
def test_code_others_can_change_is_refused_by_name(
    which: str, mode: int, owner: int, why: str, tmp_path: Path
) -> None:
    tree = code_tree(tmp_path)
    os.chown(tree[which], owner, 0)
    tree[which].chmod(mode)
    message = refusal([tree["module"]])
    assert message is not None, which
    assert message.startswith(f"{tree[which]} is {why}, and PID 1 would run"), message
    assert "\n" not in message and f"chmod go-w {tree[which]}" in message


def test_an_empty_cache_dir_others_can_write_is_refused_too(tmp_path: Path) -> None:
    """No .pyc yet, but whoever may write __pycache__ may plant one before the exec."""
    tree = code_tree(tmp_path)
    tree["cache"].unlink()
    tree["cache_dir"].chmod(0o777)
    message = refusal([tree["module"]])
    assert message is not None and message.startswith(f"{tree['cache_dir']} is world-writable")


def test_the_stage_runs_with_minus_b() -> None:
    argv = stage_argv(sys.executable, "/run/dboot/run-1-00000000/plan.json")
    assert "-B" in INTERPRETER_FLAGS and "-B" in argv[1 : 1 + len(INTERPRETER_FLAGS)]


@pytest.mark.engine
def test_a_switch_refuses_before_the_injection_and_undoes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The switch's own stage command, with one file of the stage's made world-writable (a
    copy of ours, listed as the stage's): refused at the last check before the injection,
    PID 1 untouched, the RAM root and the run's directory gone."""
    tree = code_tree(tmp_path)
    tree["module"].chmod(0o666)
    listed = [*stage_files(), str(tree["module"])]
    monkeypatch.setattr(switch, "stage_files", lambda: listed)
    state = tmp_path / "state"
    with Sandbox(services=1, console="capture") as sandbox:
        exe_before = os.readlink(f"/proc/{sandbox.pid}/exe")
        options = switch.SwitchOptions(
            build_tinybox(), ["/bin/sh"], target_pid=sandbox.pid, yes=True, grace=1,
            state_dir=state, log_file=tmp_path / "log",
        )  # fmt: skip
        with pytest.raises(SafetyRefusal, match=f"{tree['module']} is world-writable"):
            list(switch.run(options))
        assert sandbox.running() and os.readlink(f"/proc/{sandbox.pid}/exe") == exe_before
        assert "dboot" not in mounted_sources(sandbox.pid)
    assert not state.exists()
    log = (tmp_path / "log").read_text()
    assert "undoing (SafetyRefusal" in log and "nothing was injected" in log, log
