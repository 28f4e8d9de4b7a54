"""`dboot install`: the image becomes what this machine boots, in place, on probation.

The same pieces as a switch, in the same order, as the same typed events: the image's
source and file index (``check.read_image``), the preflight (``check.gather``) with the
install's own verdicts on top (``bootchain.notices``), the confirmation, then the copy,
the host files, the carry-over and the kernel's modules, written into a tree on the root
filesystem instead of a tmpfs (``deploy``). The last step is the one change to the boot
chain: the kernel's init path runs the boot shim. The old system is left whole beside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from initstage import bootstate
from initstage.bootstate import BootState, StateError
from injector import check, labmode
from injector.access.carry import carry_network, carry_ssh
from injector.access.facts import read_network
from injector.errors import BadInput, EnvironmentFailure, SafetyRefusal
from injector.events import Event, Fact, Finished, Log, Notice, Progress, StepDone, StepStarted
from injector.image.sources import ImageSource, open_source
from injector.inject import nsenter
from injector.install import bootchain, deploy
from injector.install.bootchain import BootChain
from injector.install.fstab import new_fstab
from injector.preflight import preflight
from injector.ramroot.kmodules import ModulesFacts, add_kernel_modules
from injector.ramroot.rootfs import add_host_files, write_etc_file
from injector.switch import SwitchOptions, require_root
from injector.testhooks import pause_point

# The switch's verdicts on what only a switch does: fill RAM, turn swap off, ptrace PID 1,
# kill the writers, stop the services first.
NOT_FOR_INSTALL = re.compile(r"^(ram-|swap-|ptrace-|processes-writing|stop-)")
DEFAULT_INSTALL_REVERT_MINUTES = 10.0
DEFAULT_INIT = "/sbin/init"


@dataclasses.dataclass
class InstallOptions(SwitchOptions):
    reboot: bool = True

    def install_revert_minutes(self) -> float | None:
        """Every install is on probation unless --no-revert: a boot that nobody confirms,
        local or remote, goes back to the old system (a local user sees the deadline)."""
        if self.no_revert:
            return None
        return (
            self.revert_after if self.revert_after is not None else DEFAULT_INSTALL_REVERT_MINUTES
        )


def tree_name(image_id: str, image: str) -> str:
    """A readable, unique directory name: the image's name (an archive's file name without
    its suffixes), then the first 12 hex digits of its id."""
    kind, _, rest = image.partition(":")
    if kind in ("docker-archive", "rootfs") and rest:
        name = os.path.basename(rest).split(".")[0]
    else:
        name = image.rsplit("/", 1)[-1].split(":")[0]
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    short = image_id.split(":")[-1][:12]
    return f"{base.strip('-.')[:40] or 'image'}-{short}"


def run_install(options: InstallOptions) -> Iterator[Event]:
    if not options.dry_run:
        _refuse_in_lab_mode()
    require_root()
    with open_source(options.image, options.docker_host) as source:
        yield StepStarted("source", f"Reading image {options.image}")
        read = yield from check.read_image(source, options.init_argv)
        index = read.index
        yield StepDone("source", f"{index.file_count} files, init {options.init_argv[0]} found")

        yield StepStarted("preflight", "Checking the image, the disk and the boot chain")
        # An install stops nothing before it writes: the services stop at its reboot.
        report = check.gather(
            source, index, options.init_argv, modules=options.modules, stop_mode=None
        )
        facts = install_facts(report, index.estimated_bytes)
        chain, needed = facts.chain, facts.needed_bytes
        report.notices[:] = []
        preflight.add_notices(report, facts.notices)
        yield from preflight.report_events(report)
        yield Fact("install", "boot_chain", chain.describe())
        blocking = [n for n in report.notices if n.level == "blocker"]
        if blocking and not options.force:
            names = ", ".join(n.code for n in blocking)
            raise SafetyRefusal(f"preflight found blockers: {names}", "fix them, or pass --force")
        yield StepDone("preflight", f"{len(blocking)} blockers")

        revert = options.install_revert_minutes()
        name = tree_name(read.details.id, options.image)
        yield StepStarted("plan", "The install's plan")
        for line in plan_lines(chain, name, needed, revert, options):
            yield Notice("info", "install-plan", line)
        yield StepDone("plan", f"tree {bootstate.TREES_DIR}/{name}, {needed >> 20} MiB")
        if options.dry_run:
            yield Finished("dry-run", detail="the plan above; nothing was written")
            return
        if not options.yes and not (options.confirm is not None and options.confirm(report)):
            raise SafetyRefusal("install not confirmed", "type the hostname, or pass --yes")

        yield from write_install(
            deploy.Disk(), source, name, chain, options, revert, report.modules
        )
        for line in after_reboot_lines(revert):
            yield Notice("info", "install-next", line)
        if options.reboot:
            yield Log("rebooting through the host's init")
            reboot_through_init()
        yield Finished("installed", detail="the next boot starts the image on probation")


@dataclasses.dataclass
class InstallFacts:
    """What an install adds to a switch's preflight report: the boot chain found, the bytes
    it needs on the root filesystem, and its verdicts (the switch's that apply to an
    install, then the boot chain's). ``dboot install`` and the wizard judge by this alone."""

    chain: BootChain
    needed_bytes: int
    notices: list[Notice]


def install_facts(report: preflight.Report, image_bytes: int) -> InstallFacts:
    """Read this machine's boot chain and judge an install of the image ``report`` is about
    (``image_bytes``: its file index's estimate). ``report`` itself is left as it is."""
    chain = bootchain.read_boot_chain()
    needed = image_bytes + bootchain.SPACE_MARGIN_BYTES
    if report.modules is not None:
        needed += report.modules.total_bytes
    found = switch_verdicts_for_install(report.notices)
    found += bootchain.notices(chain, needed, _installed_state(deploy.Disk()))
    return InstallFacts(chain, needed, found)


def write_install(
    disk: deploy.Disk,
    source: ImageSource,
    name: str,
    chain: BootChain,
    options: InstallOptions,
    revert: float | None,
    modules: ModulesFacts | None,
) -> Iterator[Event]:
    """Everything the install writes, in deploy's order: killed at any point, the machine
    boots the old system until the commit, and the new one on probation after it."""
    yield StepStarted("tree", f"Copying the image into {bootstate.TREES_DIR}/{name}")
    for leftover in deploy.remove_leftovers(disk):
        yield Log(f"removed the leftover {leftover}")
    deploy.make_dirs(disk)
    partial = deploy.partial_tree(disk, name)
    pause_point("install-partial")

    def fill(send: Callable[[Event], None]) -> None:
        source.copy_into(partial, lambda done, total: send(Progress("tree", done, total)))
        for line in complete_tree(partial, chain, options, modules):
            send(Log(line))

    yield from nsenter.stream_in_mount_namespace(os.getpid(), fill)
    pause_point("install-filled")
    tree = deploy.finish_tree(disk, partial, name)
    pause_point("install-tree")
    yield StepDone("tree", f"{tree} complete and flushed")

    yield StepStarted("shim", "Writing the boot shim and the boot state")
    old_init, old_link = deploy.old_init_for(disk, chain.init_path)
    for line in deploy.write_shim(disk, chain.interpreter, old_init, chain.init_path):
        yield Log(f"wrote {line}")
    pause_point("install-shim")
    state = deploy.new_state(
        tree, options.init_argv, old_init, old_link, chain.init_path, revert, options.image
    )
    bootstate.write_state(state, disk.path(bootstate.STATE_FILE))
    yield StepDone("shim", f"state: probation, {_deadline_words(revert)}")
    pause_point("install-state")

    yield StepStarted("commit", f"Pointing {chain.init_path} at the boot shim")
    deploy.commit(disk, chain.init_path)
    pause_point("install-committed")
    yield StepDone("commit", f"{chain.init_path} -> {bootstate.SHIM_ENTRY}; old: {old_init}")


def complete_tree(
    tree: Path, chain: BootChain, options: InstallOptions, modules: ModulesFacts | None
) -> list[str]:
    """The switch's carry-over, into the tree: host files, SSH and network, the running
    kernel's modules (this kernel boots the tree), and the fstab."""
    lines = [f"added host file {added}" for added in add_host_files(tree)]
    if options.carry:
        interfaces, routes, _state = read_network()
        lines += [f"carry-over: {line}" for line in carry_ssh(tree)]
        lines += [f"carry-over: {line}" for line in carry_network(tree, interfaces, routes)]
    if modules is not None and options.modules:
        lines += [f"added {line}" for line in add_kernel_modules(tree, modules)]
    root = chain.root
    if root is not None:
        fstab = new_fstab(_read_text("/etc/fstab"), root.uuid, root.device, root.fstype)
        write_etc_file(tree, "fstab", fstab.encode())
        lines.append("wrote /etc/fstab:")
        lines += [f"  {line}" for line in fstab.splitlines() if not line.startswith("#")]
    deploy.make_sysroot(tree)
    return lines


def plan_lines(
    chain: BootChain, name: str, needed: int, revert: float | None, options: InstallOptions
) -> list[str]:
    root = chain.root
    lines = [f"space: {needed >> 20} MiB needed"]
    if root is not None:
        lines[0] += f", {root.free_bytes >> 20} MiB free on {root.device} ({root.fstype})"
        fstab = new_fstab(_read_text("/etc/fstab"), root.uuid, root.device, root.fstype)
        lines.append("new /etc/fstab:")
        lines += [f"  {line}" for line in fstab.splitlines() if not line.startswith("#")]
    lines += [
        f"new system: {bootstate.TREES_DIR}/{name} on the root filesystem,"
        f" init {' '.join(options.init_argv)}",
        "old system: stays whole where it is; from the new system it is at /sysroot",
        "boot chain: " + "; ".join(chain.describe()[:3]),
        f"next boot: the kernel runs {chain.init_path} as always, which will be the boot shim"
        f" ({bootstate.SHIM_ENTRY}, on {chain.interpreter or 'no python3'}); it starts the new"
        f" system on probation ({_deadline_words(revert)}), else {chain.init_target}",
        "network and SSH: "
        + (
            "the host keys, root's authorized_keys and the addresses, matched by interface,"
            " for the image's network manager"
            if options.carry
            else "not carried (--no-carry)"
        ),
        "going back: `dboot install --revert` from either system, then reboot; an"
        " unconfirmed first boot goes back by itself",
    ]
    return lines


def after_reboot_lines(revert: float | None) -> list[str]:
    """What to run from outside once the machine is back: the session's own server address
    and port (SSH_CONNECTION), and the host key checked against the entry the client already
    has for them, which the carried host keys match."""
    connection = os.environ.get("SSH_CONNECTION", "").split()
    if len(connection) == 4:
        address, port = connection[2].removeprefix("::ffff:"), connection[3]
        alias = address if port == "22" else f"[{address}]:{port}"
        ssh = f"ssh -p {port} -o HostKeyAlias={alias} root@{address}"
    else:
        ssh = "ssh root@HOST"
    if revert is None:
        return [f"after the reboot: {ssh} dboot status (no revert timer: kept at once)"]
    return [
        f"after the reboot, within {revert:g} min: {ssh} touch /run/dboot/keep",
        "without it the machine boots the old system again by itself",
    ]


def reboot_through_init() -> None:
    """Ask the host's own init to reboot, so that it stops its services its own way."""
    for argv in (["systemctl", "reboot"], ["/sbin/reboot"], ["reboot"]):
        with contextlib.suppress(OSError):
            if subprocess.run(argv, check=False, timeout=60).returncode == 0:
                return
    raise EnvironmentFailure(
        "the host's init did not reboot (systemctl reboot, reboot)", "reboot the machine by hand"
    )


def revert(disk: deploy.Disk, reboot: bool) -> Iterator[Event]:
    _refuse_in_lab_mode()
    require_root()
    state = _installed_state(disk)
    if state is None:
        raise BadInput("nothing is installed on this machine", "see `dboot status`")
    yield StepStarted("revert", "Booting the old system from now on")
    line = deploy.uncommit(disk, state)
    state.state, state.reason = bootstate.REVERTED, "reverted on purpose (dboot install --revert)"
    state.noted(state.reason)
    bootstate.write_state(state, disk.path(bootstate.STATE_FILE))
    yield StepDone("revert", line)
    if reboot:
        reboot_through_init()
    yield Finished("reverted", detail="the next boot is the old system's")


def find_disk() -> deploy.Disk:
    """The root filesystem that holds the install: / in the old system, /sysroot in the new."""
    for root in ("/", bootstate.SYSROOT):
        if os.path.exists(os.path.join(root, bootstate.STATE_FILE.lstrip("/"))):
            return deploy.Disk(root)
    return deploy.Disk()


def switch_verdicts_for_install(notices: list[Notice]) -> list[Notice]:
    """The switch preflight's verdicts that speak of an install too, as an install weighs
    them: a container's root is no disk any machine boots, so what warns a switch blocks."""
    return [
        dataclasses.replace(notice, level="blocker")
        if notice.code == "container-detected"
        else notice
        for notice in notices
        if not NOT_FOR_INSTALL.match(notice.code)
    ]


def _refuse_in_lab_mode() -> None:
    labmode.refuse(
        "this machine's disk and boot chain will not be changed",
        "try `dboot install --dry-run`, or install inside a virtual machine",
    )


def _installed_state(disk: deploy.Disk) -> BootState | None:
    try:
        return bootstate.read_state(disk.path(bootstate.STATE_FILE))
    except StateError:
        return None


def _deadline_words(revert: float | None) -> str:
    if revert is None:
        return "no revert timer (--no-revert): the first boot keeps it"
    return f"kept only if /run/dboot/keep exists within {revert:g} min, else the old system"


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
