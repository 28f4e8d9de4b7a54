"""The init stage: the Python program that runs as PID 1 after the injected ``execve``.

Stdlib only, and it imports nothing from ``app`` or ``injector``: the stage must start
from an isolated interpreter (``python -I -S``) in whatever mount namespace PID 1 lives in.

- ``plan``: the handoff contract, written by the injector and read by the stage;
- ``launch``: the interpreter command line that runs the stage, and the files it needs;
- ``stage``: the ordered steps, run as PID 1;
- ``linux``, ``procs``, ``console``: syscalls, the process table (and cgroup freezers),
  the console and log;
- ``mounts``: the mount table, for the flush and the read-only remount;
- ``children``: work that may hang in the kernel (sync, remount), done in children
  under a deadline so that PID 1 never waits on it for good.

This file imports nothing on purpose: the injector imports ``initstage.plan`` and
``initstage.launch`` without pulling in ctypes or the stage.
"""
