"""How to start the stage: the interpreter command line, and the files it needs.

The injector replaces PID 1's syscall with ``execve(stage_argv(...))``. The command line
runs an isolated interpreter: ``-I`` (no environment variables, no user site, no script
directory on sys.path) and ``-S`` (no ``site``: no site-packages, no .pth files). Only the
directory that holds the ``initstage`` package is added, and it is appended, so that
nothing in it can shadow a stdlib module (site-packages may hold backports named like
stdlib modules).

The interpreter path is resolved: a venv's ``bin/python`` is a symlink whose meaning
depends on ``pyvenv.cfg`` next to it; the real binary finds its own stdlib from its own
location, so the target needs fewer files, and none of the venv except ``initstage``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import initstage

INTERPRETER_FLAGS = ("-I", "-S", "-B", "-X", "utf8")

# The bootstrap runs as PID 1. If the stage cannot even be imported (files missing in the
# target's mount namespace, a broken install), raising would exit PID 1 and panic the
# kernel: instead it says so on the console and opens the old root's shell, or waits.
_BOOTSTRAP = """\
import os, sys, time
sys.path.append(@PACKAGE_PARENT@)
try:
    from initstage.stage import main
except BaseException as error:
    if os.getpid() != 1:
        raise
    message = f"dboot-stage: cannot load the init stage: {error!r}; opening /bin/sh\\n"
    for path in ("/dev/console", "/dev/kmsg"):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
            os.write(fd, message.encode())
            os.close(fd)
        except OSError:
            pass
    try:
        os.write(2, message.encode())
        os.execv("/bin/sh", ["/bin/sh"])
    except BaseException:
        pass
    while True:
        try:
            os.waitpid(-1, 0)
        except BaseException:
            time.sleep(1)
sys.exit(main(sys.argv[1:]))
"""

# Imports the stage exactly as the bootstrap does, then lists what the process used:
# every mapped file (interpreter, libpython, libc, ld.so, extension modules) and every
# module's source. That is what must be reachable from the target's root.
_LIST_FILES = """\
import os, sys
sys.path.append(@PACKAGE_PARENT@)
import initstage.stage
paths = {os.path.realpath(sys.executable), sys._stdlib_dir}
paths.add(os.path.join(sys._stdlib_dir, "lib-dynload"))
for module in list(sys.modules.values()):
    if getattr(module, "__file__", None):
        paths.add(os.path.realpath(module.__file__))
with open("/proc/self/maps") as maps:
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.add(fields[5].strip().removesuffix(" (deleted)"))
print("\\n".join(sorted(path for path in paths if os.path.exists(path))))
"""


def package_parent() -> str:
    """The directory that holds the ``initstage`` package (a checkout, site-packages ...)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(initstage.__file__)))


def _code(template: str, parent: str | None) -> str:
    return template.replace("@PACKAGE_PARENT@", repr(parent or package_parent()))


def stage_argv(python: str, plan_path: str, *, parent: str | None = None) -> list[str]:
    """The execve argv that runs the stage as PID 1 with ``plan_path``.

    ``parent`` overrides the directory holding ``initstage`` (e.g. a copy the target can
    reach); the default is where this package was imported from.
    """
    return [
        os.path.realpath(python),
        *INTERPRETER_FLAGS,
        "-c",
        _code(_BOOTSTRAP, parent),
        plan_path,
    ]


def stage_files(python: str | None = None, *, parent: str | None = None) -> list[str]:
    """Absolute paths (files and the stdlib directories) the stage needs at its target.

    Found by running the stage's own interpreter, isolated the same way, importing the
    stage and listing what it mapped and loaded: no guessing at library names.
    """
    interpreter = os.path.realpath(python or sys.executable)
    # Without -B: this run leaves the stage's bytecode in __pycache__, so that the real
    # run (with -B, writing nothing) does not spend ~30 ms compiling, as PID 1, at downtime.
    flags = [flag for flag in INTERPRETER_FLAGS if flag != "-B"]
    result = subprocess.run(
        [interpreter, *flags, "-c", _code(_LIST_FILES, parent)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{interpreter} cannot import the init stage: {last}")
    return result.stdout.split()
