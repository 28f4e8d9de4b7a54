"""Start-up time: what ``dboot switch --dry-run`` loads before it opens the image (issue 12).

What only some runs need is imported where it is used (``injector/switch.py``): teaching
(``injector.teach``), the injection (``injector.inject.ptrace``, with python-ptrace),
``--ssh-check`` (``injector.access.sshcheck``), the keeper's instructions in a real switch's
last words (``initstage.keeper``) and the Docker SDK (only an engine image opens it).
Checked in a fresh interpreter, as the command line starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOADED_LATER = (
    "injector.teach",
    "injector.inject.ptrace",
    "injector.access.sshcheck",
    "initstage.keeper",
    "ptrace",
    "docker",
)


def test_a_dry_run_starts_without_what_only_some_runs_need() -> None:
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import app.cli\n"
        "from injector import switch\n"
        "switch.SwitchOptions('dboot-test/any:1', ['/bin/sh'], dry_run=True, yes=True)\n"
        f"print(json.dumps([name for name in {LOADED_LATER!r} if name in sys.modules]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []
