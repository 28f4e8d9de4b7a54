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
from initstage import linux
from initstage.procs import PF_KTHREAD

INTERPRETER_FLAGS = ("-I", "-S", "-B", "-X", "utf8")

# The bootstrap runs as PID 1. If the stage cannot even be imported (files missing in the
# target's mount namespace, a broken install), raising would exit PID 1 and panic the
# kernel, and exec'ing a shell would panic it as soon as the shell exits. Instead it says
# so and, as the stage's recovery does, runs a shell as its child and starts another
# whenever it exits, forever. On the machine the shell gets /dev/console; in a namespace
# (a rehearsal) it keeps the stdio it was given: the host's console is not ours.
# Only builtins and os, sys and time: the stdlib itself may be what is broken. The kernel's
# numbers are filled in from initstage.linux and initstage.procs when the code is made.
_BOOTSTRAP = """\
import os, sys, time
sys.path.append(@PACKAGE_PARENT@)
try:
    from initstage.stage import main
except BaseException as error:
    if os.getpid() != 1:
        raise
    try:
        with open("/proc/2/stat", "rb") as kthreadd:
            flags = int(kthreadd.read().rsplit(b")", 1)[1].split()[6])
        machine = os.readlink("/proc/self") == "1" and bool(flags & @PF_KTHREAD@)
    except BaseException:
        machine = False
    def say(text):
        for path in ("/dev/console", "/dev/kmsg") if machine else ("/dev/kmsg",):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NOCTTY)
                os.write(fd, text.encode())
                os.close(fd)
            except BaseException:
                pass
        try:
            os.write(2, text.encode())
        except BaseException:
            pass
    say(f"dboot-stage: cannot load the init stage: {error!r}; a shell on the console,"
        " started again whenever it exits\\n")
    shells = 0
    while True:
        try:
            shells += 1
            pid = os.fork()
            if pid == 0:
                try:
                    os.setsid()
                    if machine:
                        console = os.open("/dev/console", os.O_RDWR)
                        for fd in (0, 1, 2):
                            os.dup2(console, fd)
                        import fcntl
                        fcntl.ioctl(0, @TIOCSCTTY@, 1)  # job control, Ctrl-C
                except BaseException:
                    pass
                try:
                    os.execv("/bin/sh", ["/bin/sh"])
                finally:
                    os._exit(127)
            while os.waitpid(-1, 0)[0] != pid:
                pass
            if shells <= 5 or shells % 60 == 0:
                say(f"dboot-stage: recovery shell exited ({shells}): another in 1 s\\n")
        except BaseException:
            pass
        try:
            time.sleep(1)
        except BaseException:
            pass
sys.exit(main(sys.argv[1:]))
"""

# Imports the stage exactly as the bootstrap does, then lists what the process used:
# every mapped file (interpreter, libpython, libc, ld.so, extension modules) and every
# module's source. That is what must be reachable from the target's root.
_LIST_FILES = """\
import os, sys
sys.path.append(@PACKAGE_PARENT@)
import initstage.stage
stdlib = getattr(sys, "_stdlib_dir", None) or os.path.dirname(os.__file__)  # 3.11, or before
paths = {os.path.realpath(sys.executable), stdlib, os.path.join(stdlib, "lib-dynload")}
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


class StageLaunchError(Exception):
    """The stage cannot be started from here. Like the injector's errors (which this
    stdlib-only package cannot import) it carries a cause and a fix; the injector turns
    it into one of its own, so the user sees one line, never a traceback."""

    def __init__(self, cause: str, fix: str) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause}: {fix}")


def package_parent() -> str:
    """The directory that holds the ``initstage`` package (a checkout, site-packages ...)."""
    return os.path.dirname(os.path.dirname(os.path.realpath(initstage.__file__)))


def _code(template: str, parent: str | None) -> str:
    return (
        template.replace("@PACKAGE_PARENT@", repr(parent or package_parent()))
        .replace("@PF_KTHREAD@", hex(PF_KTHREAD))
        .replace("@TIOCSCTTY@", hex(linux.TIOCSCTTY))
    )


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
    fix = "reinstall docker-boot (pipx or `make`), with every file of initstage readable"
    try:
        result = subprocess.run(
            [interpreter, *flags, "-c", _code(_LIST_FILES, parent)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as error:
        cause = f"cannot run {interpreter} to list the init stage's files ({error})"
        raise StageLaunchError(cause, fix) from error
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageLaunchError(f"{interpreter} cannot import the init stage ({last})", fix)
    return result.stdout.split()
