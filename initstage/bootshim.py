"""The boot shim: PID 1 at every boot of an installed machine, before any init of its own.

``dboot install`` points the kernel's init path (``/sbin/init``, or the command line's
``init=``) at :data:`initstage.bootstate.SHIM_ENTRY`, a ``/bin/sh`` script that runs this
module on the old system's own Python and, should that fail to start, execs the old init
itself. Everything else in the boot chain (firmware, bootloader, kernel, initramfs) stays as
it was. Like ostree's ``prepare-root``, the shim then picks a tree and pivots into it:

1. Make the root filesystem writable: the choice of this boot is written before it is made.
2. Read the state and choose (:func:`initstage.bootstate.choose`): the new system (kept, or
   on probation for this one boot) or the old one. The state to follow is written first.
3. The old system: the root goes back to read-only if it was, and the old init is exec'd
   with the kernel's arguments, as if the shim had never been there.
4. The new system: on probation a kernel panic restarts the machine (instead of hanging),
   the drivers of its fstab's filesystems are loaded with the old system's modprobe (an
   image seldom has one), the disk's root is bound at ``/sysroot`` inside the tree, the
   tree becomes ``/`` by the stage's own pivot, the API filesystems are mounted, and the
   stage's exec starts the keeper (whose revert timer reboots into the old system unless
   the new one is kept) and then the image's init.
5. Either way, a reporter (:mod:`initstage.bootreport`) forked just before the exec adds the
   system's addresses and failed units to the boot report once it is up.

Any failure before the pivot boots the old system at once; any failure after it records
the revert and restarts the machine, whose next boot is the old system's. Standard library
only, everything imported up front (the stage's rule), and every step on the console and
in the kernel log.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from typing import NoReturn

from initstage import bootreport, bootstate, keeper, linux
from initstage.bootstate import BootState, Choice, StateError
from initstage.console import StageLog
from initstage.plan import Plan
from initstage.stage import Stage, describe_error, stay_alive_forever

BOOT_LOG = "/var/log/dboot-boot.log"  # inside the new system
MODPROBE_PATHS = ("/sbin/modprobe", "/usr/sbin/modprobe", "/bin/modprobe", "/usr/bin/modprobe")
MODPROBE_TIMEOUT_SECONDS = 30.0
NOT_A_DRIVER = frozenset({"swap", "none", "auto", "bind", "rbind"})
FAT_DEFAULT_CHARSETS = ["nls_cp437", "nls_ascii", "nls_utf8"]
ST_RDONLY = 1  # os.statvfs f_flag


class BootShim:
    """One boot's decision and handover. ``root`` is "/" at boot; tests give a directory."""

    def __init__(self, log: StageLog, kernel_argv: list[str]) -> None:
        self.log = log
        self.kernel_argv = kernel_argv
        self.root_was_read_only = False
        self.state: BootState | None = None
        self.sysroot_fd: int | None = None  # the disk's root, kept across the pivot
        self.stage: Stage | None = None

    def run(self) -> NoReturn:
        self.mount_proc_if_missing()
        self.make_root_writable()
        choice = self.choose()
        if not choice.new_system:
            self.boot_old_system(choice.why)
        try:
            self.boot_new_system(choice)
        except BaseException as error:
            for line in describe_error(error):
                self.log(line)
            self.revert_after_failure(f"the new system failed to start: {error}")
        raise AssertionError("unreachable")  # boot_new_system execs or raises

    # 1 ------------------------------------------------------------------------------
    def mount_proc_if_missing(self) -> None:
        """An initramfs moves its /proc into the root before handing over; a kernel that
        mounted the root itself leaves none, and the panic sysctl lives there."""
        if os.path.exists("/proc/self/stat"):
            return
        with contextlib.suppress(OSError):
            linux.mount("proc", "/proc", "proc", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC)
            self.log("mounted /proc")

    def make_root_writable(self) -> None:
        """Kernels and initramfs hand over a read-only root (``ro`` on the command line) for
        the init to check; the state must be written before the choice is acted on."""
        self.root_was_read_only = bool(os.statvfs("/").f_flag & ST_RDONLY)
        if self.root_was_read_only:
            linux.mount(None, "/", None, linux.MS_REMOUNT)
            self.log("root filesystem remounted read-write for the boot state")

    # 2 ------------------------------------------------------------------------------
    def choose(self) -> Choice:
        problem = ""
        try:
            self.state = bootstate.read_state()
        except StateError as error:
            problem = str(error)
        choice = bootstate.choose(self.state, problem)
        self.log(f"choice: {choice.why}")
        if choice.state is not None:
            try:
                bootstate.write_state(choice.state)
            except OSError as error:
                # A probation boot that cannot be counted could repeat forever: never start it.
                self.log(f"cannot write {bootstate.STATE_FILE} ({error}): the old system boots")
                return Choice(False, False, None, "the boot state cannot be written")
            self.state = choice.state
        self.write_report(choice)
        return choice

    def write_report(self, choice: Choice) -> None:
        """The boot report `dboot status` reads: which system, why, and the deadline."""
        state = self.state
        deadline = None
        if choice.probation and state is not None:
            deadline = time.time() + state.revert_after_seconds
        report = {
            "booted": "new" if choice.new_system else "old",
            "why": choice.why,
            "tree": state.tree if state is not None else "",
            "state": state.state if state is not None else "",
            "boots_left": state.boots_left if state is not None else 0,
            "probation": choice.probation,
            "revert_deadline": deadline,
            "time": time.time(),
            "kernel_argv": self.kernel_argv,
        }
        try:
            bootstate.write_atomically(bootstate.REPORT_FILE, json.dumps(report, indent=2) + "\n")
        except OSError as error:
            self.log(f"warning: no boot report ({error})")

    # 3 ------------------------------------------------------------------------------
    def boot_old_system(self, why: str) -> NoReturn:
        if self.state is not None:
            old_init, argv0 = self.state.old_init, self.state.init_path
        else:
            old_init = argv0 = _old_init_from_entry()
        self.log(f"the old system: exec {old_init} ({why})")
        bootreport.start(bootstate.REPORT_FILE, old_init, self.log)
        if self.root_was_read_only:
            # As the old init expects it, so that its own fsck and remount run as always.
            try:
                linux.mount(None, "/", None, linux.MS_REMOUNT | linux.MS_RDONLY)
            except OSError as error:
                self.log(f"warning: root stays read-write ({error})")
        os.execv(old_init, [argv0, *self.kernel_argv])

    # 4 ------------------------------------------------------------------------------
    def boot_new_system(self, choice: Choice) -> NoReturn:
        state = self.state
        assert state is not None  # a choice of the new system comes from a state
        tree, init = state.tree, state.init_argv[0]
        if not os.path.isdir(tree):
            raise StateError(f"the new tree {tree} is missing")
        if not os.access(tree + init, os.X_OK):
            raise StateError(f"the image's init {init} is missing or not executable in {tree}")
        sysroot = tree + bootstate.SYSROOT
        if os.path.islink(sysroot) or not os.path.isdir(sysroot):
            raise StateError(f"{sysroot} is not a directory: the install made one; reinstall")
        self.load_filesystem_drivers(tree)
        linux.mount("/", sysroot, None, linux.MS_BIND)
        self.log(f"the disk's root bound at {bootstate.SYSROOT} in the new system")
        self.sysroot_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        plan = Plan(
            new_root=tree,
            init_argv=list(state.init_argv),
            console="inherit",
            machine=True,
            log_path=BOOT_LOG,
            keep_network=False,  # nothing ran before us: no address to keep
            revert_after_seconds=state.revert_after_seconds if choice.probation else 0.0,
            boot_state_file=bootstate.SYSROOT + bootstate.STATE_FILE if choice.probation else "",
        )
        plan.validate()
        self.stage = stage = Stage("", self.log)
        stage.plan = plan
        stage.start_revert_timer(plan)  # as the stage does: from now on, whatever fails
        stage.step(5, f"pivot_root into {tree}")
        stage.pivot(tree)
        stage.step(6, "API filesystems")
        stage.mount_api_filesystems(plan)
        stage.step(7, f"exec the image's init {plan.init_argv}")
        bootreport.start(bootstate.SYSROOT + bootstate.REPORT_FILE, init, self.log)
        stage.exec_init(plan)

    def load_filesystem_drivers(self, tree: str) -> None:
        """Images seldom carry kmod, and without a modprobe in the new root the kernel loads
        no driver for the mounts of its fstab (the ESP's vfat is a module on Debian's
        kernels). The old system's modprobe, still at hand before the pivot, loads them."""
        try:
            with open(tree + "/etc/fstab") as fstab, open("/proc/filesystems") as known:
                drivers = drivers_to_load(fstab.read(), known.read())
        except OSError as error:
            self.log(f"filesystem drivers: not read ({error}); the image's init loads its own")
            return
        modprobe = next((path for path in MODPROBE_PATHS if os.access(path, os.X_OK)), None)
        if not drivers or modprobe is None:
            self.log(f"filesystem drivers: {'none to load' if not drivers else 'no modprobe'}")
            return
        try:
            done = subprocess.run(
                [modprobe, "-q", "-a", *drivers],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=MODPROBE_TIMEOUT_SECONDS,
                check=False,
            )
            outcome = "loaded" if done.returncode == 0 else f"exit {done.returncode}, some missing"
        except (OSError, subprocess.SubprocessError) as error:
            outcome = f"failed ({error})"
        self.log(f"filesystem drivers for the new system's fstab: {' '.join(drivers)}: {outcome}")

    def revert_after_failure(self, why: str) -> NoReturn:
        """The new system cannot start: record it, then let the old one boot. Before the
        pivot it simply runs; after it the machine restarts."""
        state = self.state
        if state is not None:
            state.state, state.reason = bootstate.REVERTED, why
            state.noted(why)
            try:
                if self.sysroot_fd is None:
                    bootstate.write_state(state)
                else:
                    bootstate.write_state(
                        state, bootstate.STATE_FILE.lstrip("/"), dir_fd=self.sysroot_fd
                    )
            except (OSError, StateError) as error:
                self.log(f"warning: could not record the revert ({error}); the boot count will")
        if self.stage is None or not self.stage.pivoted:
            self.boot_old_system(why)
        self.log(f"{why}: restarting into the old system")
        restart_machine(self.log)
        stay_alive_forever()


def drivers_to_load(fstab: str, filesystems: str) -> list[str]:
    """modprobe names for the filesystems ``fstab`` mounts that the kernel does not know yet
    (``filesystems``: /proc/filesystems), with the code pages a FAT mount asks for."""
    known = {line.split()[-1] for line in filesystems.splitlines() if line.split()}
    drivers: list[str] = []
    for line in fstab.splitlines():
        words = line.split()
        if len(words) < 3 or words[0].startswith("#") or words[1] == "/":
            continue
        kind, options = words[2], words[3].split(",") if len(words) > 3 else []
        if kind in known or kind in NOT_A_DRIVER:
            continue
        drivers.append(f"fs-{kind}")
        if kind in ("vfat", "msdos"):
            # The kernel's default code page and character sets, or the ones the line names.
            drivers += FAT_DEFAULT_CHARSETS
            drivers += [
                f"nls_cp{value}" if key == "codepage" else f"nls_{value}"
                for key, _, value in (option.partition("=") for option in options)
                if key in ("codepage", "iocharset") and value
            ]
    return list(dict.fromkeys(drivers))


def restart_machine(log: StageLog) -> None:
    """The keeper's own revert: sync under its deadline, then reboot(RB_AUTOBOOT)."""
    host = keeper.LiveHost(log)
    log(f"sync: {host.sync()}")
    host.reboot()  # returns only if the kernel refused, which it logged


def _old_init_from_entry() -> str:
    """The old init named in the shim's entry script, for a state file that is unreadable:
    the script is written by the same install, with that path on its ``OLD_INIT=`` line."""
    try:
        with open(bootstate.SHIM_ENTRY) as entry:
            for line in entry:
                if line.startswith("OLD_INIT="):
                    return line.split("=", 1)[1].strip().strip("'")
    except OSError:
        pass
    return "/lib/systemd/systemd"


def main(argv: list[str]) -> NoReturn:
    if os.getpid() != 1:
        sys.stderr.write(
            f"dboot-boot: refusing to run as pid {os.getpid()}: the boot shim runs only as the"
            " machine's init, from the kernel\n"
        )
        sys.exit(1)
    log = StageLog()
    log.add_sink(2)
    log.open_kmsg()
    shim = BootShim(log, argv)
    try:
        shim.run()
    except BaseException as error:  # PID 1 must never raise out of main
        with contextlib.suppress(BaseException):
            for line in describe_error(error):
                log(line)
        with contextlib.suppress(BaseException):
            shim.revert_after_failure(f"the boot shim failed: {error}")
    stay_alive_forever()
