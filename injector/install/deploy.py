"""What an install writes on the disk, in an order that a power cut cannot break.

Everything goes under :data:`initstage.bootstate.DBOOT_DIR` on the root filesystem, and
the old system is not touched until the very last step, a single ``rename(2)`` of the
kernel's init path:

1. **Leftovers** of an install that died half-way (``trees/.partial-*``, temp files) go.
2. **The tree** is copied into ``trees/.partial-NAME``, made complete (host files,
   carry-over, the kernel's modules, its fstab), flushed (``syncfs``) and renamed to
   ``trees/NAME``: a tree under its final name is always whole.
3. **The shim**: a copy of ``initstage`` and its entry script, in ``boot/``, each file
   renamed into place; then the state file (probation), atomically.
4. **The commit**: a symlink to the shim's entry, renamed over the init path. Before it the
   old system boots as always; after it the shim does. Nothing in between.

``--revert`` renames the old init back over the init path (the same one-step change) and
marks the state reverted. Every path is taken relative to ``disk``, the root filesystem as
this process sees it: ``/`` from the old system, ``/sysroot`` from the installed one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import stat
import time
from pathlib import Path

import initstage
from initstage import bootstate, linux
from initstage.bootstate import BootState
from injector.testhooks import pause_point

# The shim's entry, what the kernel runs as init. /bin/sh first, so that a missing or broken
# interpreter, or a shim that cannot be imported, still boots the old system: PID 1 exiting
# would panic the kernel. (No single quote may appear in the Python part.)
SHIM_TEMPLATE = """\
#!/bin/sh
# dboot's boot shim: PID 1 at every boot of this machine since `dboot install`.
# It starts the installed image or the old system (`dboot status` says which and why),
# on the old system's own Python. Should that not start, the old init runs as before.
OLD_INIT='{old_init}'
INIT_PATH='{init_path}'
if [ -x '{interpreter}' ]; then
    exec '{interpreter}' -I -S -B -c '
import os, sys
try:
    sys.path.append("{shim_dir}")
    from initstage.bootshim import main
except BaseException as error:
    sys.stderr.write("dboot-boot: no boot shim (%r): the old system boots\\n" % (error,))
    os.execv(sys.argv[1], sys.argv[2:])
main(sys.argv[3:])
' "$OLD_INIT" "$INIT_PATH" "$@"
fi
echo "dboot-boot: no interpreter at {interpreter}: the old system boots" >&2
exec "$OLD_INIT" "$@"
"""
OLD_INIT_LINK = bootstate.SHIM_DIR + "/old-init"  # a hard link, when the init was a file
PARTIAL_PREFIX = ".partial-"
MAX_SYMLINK_HOPS = 256  # path components and links together, as a bound on link loops


@dataclasses.dataclass(frozen=True)
class Disk:
    """The root filesystem, seen from here."""

    root: str = "/"

    def path(self, absolute: str) -> str:
        return os.path.join(self.root, absolute.lstrip("/"))

    def resolve(self, absolute: str) -> str:
        """``absolute`` with every symlink followed as the kernel will at boot, inside this
        root (an absolute link starts again at the disk's root, not at ours); as the boot
        sees it. Debian's /sbin/init -> ../lib/systemd/systemd lies in /usr/sbin, say."""
        pending = [part for part in absolute.split("/") if part]
        resolved: list[str] = []
        for _hop in range(MAX_SYMLINK_HOPS):
            if not pending:
                return "/" + "/".join(resolved)
            part = pending.pop(0)
            if part in (".", ".."):
                if part == ".." and resolved:
                    resolved.pop()
                continue
            here = os.path.join(self.root, *resolved, part)
            if os.path.islink(here):
                target = os.readlink(here)
                if target.startswith("/"):
                    resolved = []
                pending = [p for p in target.split("/") if p] + pending
            else:
                resolved.append(part)
        raise OSError(errno.ELOOP, f"too many symbolic links resolving {absolute}")


def remove_leftovers(disk: Disk) -> list[str]:
    """A run that died in step 2 or 3 left a partial tree or temp files: they go."""
    removed = []
    trees = Path(disk.path(bootstate.TREES_DIR))
    if trees.is_dir():
        for entry in trees.iterdir():
            if entry.name.startswith(PARTIAL_PREFIX) and not entry.is_symlink():
                shutil.rmtree(entry)
                removed.append(str(entry))
    shim = Path(disk.path(bootstate.SHIM_DIR))
    for leftover in shim.glob(".*.tmp*") if shim.is_dir() else ():
        _remove(leftover)
        removed.append(str(leftover))
    return removed


def make_dirs(disk: Disk) -> None:
    for directory in (bootstate.DBOOT_DIR, bootstate.TREES_DIR, bootstate.SHIM_DIR):
        path = disk.path(directory)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o755)
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != 0 or st.st_mode & 0o022:
            raise PermissionError(f"{path} must be a root-owned directory only root can write")


def partial_tree(disk: Disk, name: str) -> Path:
    path = Path(disk.path(f"{bootstate.TREES_DIR}/{PARTIAL_PREFIX}{name}"))
    path.mkdir(mode=0o755)
    return path


def make_sysroot(tree: Path) -> None:
    """The empty directory the shim binds the disk's root on. Whatever the image has at
    that name goes (a symlink there would make the bind land anywhere)."""
    root_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        name = bootstate.SYSROOT.lstrip("/")
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISDIR(os.lstat(name, dir_fd=root_fd).st_mode):
                os.unlink(name, dir_fd=root_fd)
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=root_fd)
    finally:
        os.close(root_fd)


def finish_tree(disk: Disk, partial: Path, name: str) -> str:
    """Flush the tree, then give it its final name; returns it as the shim sees it."""
    linux.syncfs(str(partial))
    final = f"{bootstate.TREES_DIR}/{name}"
    final_path = disk.path(final)
    if os.path.lexists(final_path):
        # An earlier install of the same image that was reverted: this copy replaces it.
        shutil.rmtree(final_path)
    os.rename(partial, final_path)
    _fsync_dir(disk.path(bootstate.TREES_DIR))
    return final


def write_shim(disk: Disk, interpreter: str, old_init: str, init_path: str) -> list[str]:
    """The shim's files: a fresh copy of this initstage, and the entry script."""
    written = []
    package = Path(initstage.__file__).parent
    shim_dir = Path(disk.path(bootstate.SHIM_DIR))
    staged = shim_dir / f".initstage.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(staged)
    staged.mkdir(mode=0o755)
    for source in sorted(package.glob("*.py")):
        shutil.copyfile(source, staged / source.name)
        os.chmod(staged / source.name, 0o644)
    linux.syncfs(str(staged))
    current = shim_dir / "initstage"
    if current.exists():
        # Two renames: the old copy aside, the new one in. A power cut between them leaves
        # no package; the entry script then runs the old init (its fallback line).
        aside = shim_dir / f".initstage.old.tmp{os.getpid()}"
        os.rename(current, aside)
        pause_point("install-shim-aside")
        os.rename(staged, current)
        shutil.rmtree(aside)
    else:
        os.rename(staged, current)
    written.append(f"{current}/ (initstage, {len(list(current.glob('*.py')))} files)")
    entry = SHIM_TEMPLATE.format(
        old_init=old_init, init_path=init_path, interpreter=interpreter, shim_dir=bootstate.SHIM_DIR
    )
    _write_atomically(disk.path(bootstate.SHIM_ENTRY), entry, 0o755)
    written.append(f"{disk.path(bootstate.SHIM_ENTRY)} (entry, on {interpreter})")
    return written


def old_init_for(disk: Disk, init_path: str) -> tuple[str, str]:
    """(what the shim execs for the old system, the link text to put back on a revert).

    A symlink (systemd-sysv's /sbin/init -> ../lib/systemd/systemd) is recorded by what it
    leads to; a file (sysvinit's /sbin/init) gets a hard link in the shim's directory first,
    so that it survives the rename that puts the shim in its place."""
    path = disk.path(init_path)
    if os.path.islink(path):
        old_init = disk.resolve(init_path)
        if old_init == disk.resolve(bootstate.SHIM_ENTRY):
            return _old_init_of_the_last_install(disk, init_path)
        return old_init, os.readlink(path)
    link = disk.path(OLD_INIT_LINK)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(link)
    os.link(path, link)
    _fsync_dir(disk.path(bootstate.SHIM_DIR))
    return OLD_INIT_LINK, ""


def _old_init_of_the_last_install(disk: Disk, init_path: str) -> tuple[str, str]:
    """The init path already runs the shim: a first boot that was not kept, or a revert
    after a panic, leaves it so (the shim boots the old system from then on). A reinstall
    takes the old init from that install's state, the one record of it."""
    try:
        state = bootstate.read_state(disk.path(bootstate.STATE_FILE))
    except bootstate.StateError as error:
        raise FileExistsError(
            f"{init_path} already runs the boot shim and the last install's state, which names"
            f" the old init, is unusable ({error})"
        ) from error
    if state.init_path != init_path:
        raise FileExistsError(
            f"{init_path} already runs the boot shim, but the last install's state is about"
            f" {state.init_path}"
        )
    return state.old_init, state.old_link


def commit(disk: Disk, init_path: str) -> None:
    """The one change that makes the machine boot the shim: a symlink renamed over the
    init path. Relative, so that it means the same in an initramfs's view of the root."""
    directory = disk.resolve(os.path.dirname(init_path))
    entry = disk.resolve(bootstate.SHIM_ENTRY)
    _replace_with_link(
        disk.path(directory), os.path.basename(init_path), os.path.relpath(entry, directory)
    )


def uncommit(disk: Disk, state: BootState) -> str:
    """Put the old init back over the init path: the same one-step change, reversed."""
    directory = disk.path(disk.resolve(os.path.dirname(state.init_path)))
    name = os.path.basename(state.init_path)
    if state.old_link:
        _replace_with_link(directory, name, state.old_link)
        return f"{state.init_path} -> {state.old_link} again"
    temp = os.path.join(directory, f".{name}.dboot-revert")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    os.link(disk.path(OLD_INIT_LINK), temp)
    os.rename(temp, os.path.join(directory, name))
    _fsync_dir(directory)
    return f"{state.init_path} is the old init file again"


def new_state(
    tree: str,
    init_argv: list[str],
    old_init: str,
    old_link: str,
    init_path: str,
    revert_minutes: float | None,
    image: str,
) -> BootState:
    state = BootState(
        tree=tree,
        init_argv=list(init_argv),
        old_init=old_init,
        old_link=old_link,
        init_path=init_path,
        revert_after_seconds=(revert_minutes or 0.0) * 60,
        image=image,
        installed_at=time.time(),
    )
    state.noted(f"installed {image} into {tree}")
    return state


def _replace_with_link(directory: str, name: str, target: str) -> None:
    temp = os.path.join(directory, f".{name}.dboot-new")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    os.symlink(target, temp)
    os.rename(temp, os.path.join(directory, name))
    _fsync_dir(directory)


def _write_atomically(path: str, text: str, mode: int) -> None:
    temp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp{os.getpid()}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(temp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
