"""The running kernel's modules and firmware, carried into the new root.

The kernel stays across a switch; its modules live on the old disk. An image built for
containers has no ``/lib/modules/$(uname -r)``, so without a copy the new system could not
load ``vfat``, ``dm-crypt``, ``nf_tables`` and the rest. The firmware files that the loaded
modules name go in too (a NIC or GPU driver reloaded by the new system asks for them).

Everything takes the host's root as a parameter, so tests build a fake tree; a host without
a modules directory (a container, a kernel built without modules) is a fact, not an error.
"""

from __future__ import annotations

import bz2
import contextlib
import dataclasses
import gzip
import lzma
import os
import posixpath
import re
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from injector.image.imageindex import INODE_BYTES, ImageIndex, pages

try:
    import zstandard
except ImportError:  # pragma: no cover - depends on the interpreter
    zstandard = None  # type: ignore[assignment]

# Where the kernel looks for firmware, in its order (drivers/base/firmware_loader/main.c).
FIRMWARE_DIRS = ("lib/firmware/updates/{release}", "lib/firmware/updates", "lib/firmware/{release}")
FIRMWARE_ROOT = "lib/firmware"
COMPRESSED_SUFFIXES = ("", ".zst", ".xz")
# A module's .modinfo section holds NUL-separated key=value strings.
MODINFO_FIRMWARE = re.compile(rb"(?:^|\x00)firmware=([^\x00]+)")
MODULE_SUFFIX = re.compile(r"\.ko(\.xz|\.zst|\.gz|\.bz2)?$")


@dataclasses.dataclass
class FirmwareFile:
    name: str  # as the module names it, e.g. "iwlwifi-9000-pu-b0-jf-b0-46.ucode"
    source: str  # the host file (decompressed name + suffix as found)
    destination: str  # where it goes inside the image (symlinks of the image resolved)
    bytes: int  # its cost in the tmpfs


@dataclasses.dataclass
class ModulesFacts:
    """What goes into the new root. ``copy`` is False when nothing is copied, and
    ``state`` says why (``--no-modules``, the image has its own, the host has none)."""

    release: str
    source: str  # /lib/modules/RELEASE on the host
    destination: str  # its place inside the image, e.g. /usr/lib/modules/RELEASE
    copy: bool
    state: str
    files: int = 0
    bytes: int = 0  # what the modules cost in the tmpfs (pages + per-inode charge)
    loaded: int = 0  # modules loaded now
    supported: bool = True  # False: the kernel has no module support (no /proc/modules)
    firmware: list[FirmwareFile] = dataclasses.field(default_factory=list)
    firmware_missing: list[str] = dataclasses.field(default_factory=list)

    @property
    def firmware_bytes(self) -> int:
        return sum(item.bytes for item in self.firmware)

    @property
    def total_bytes(self) -> int:
        """The RAM the copy adds: modules and firmware."""
        return (self.bytes + self.firmware_bytes) if self.copy else 0


def gather_modules(
    index: ImageIndex | None,
    *,
    wanted: bool = True,
    host_root: Path = Path("/"),
    release: str | None = None,
    proc: Path = Path("/proc"),
) -> ModulesFacts:
    """The facts about the running kernel's modules and what a switch would add."""
    release = release or os.uname().release
    source = host_root / "lib" / "modules" / release
    destination = resolve_in_image(index, f"/lib/modules/{release}")
    facts = ModulesFacts(release, str(source), destination or "", copy=False, state="")
    loaded = _loaded_modules(proc)
    facts.loaded = len(loaded or [])
    facts.supported = loaded is not None
    if not source.is_dir():
        facts.state = (
            "this kernel has no loadable modules (no /proc/modules)"
            if loaded is None
            else f"the host has no {source} (a container, or modules not installed)"
        )
        return facts
    if not wanted:
        facts.state = "left out (--no-modules)"
        return facts
    if index is not None and index.lookup(f"/lib/modules/{release}") is not None:
        facts.state = f"the image has its own /lib/modules/{release}"
        return facts
    if destination is None or (index is not None and index.get(destination) is not None):
        # A file, or a symlink that leads nowhere, where the modules would go.
        facts.state = f"the image's /lib/modules/{release} cannot hold them (not a directory)"
        return facts
    facts.files, facts.bytes = _tree_cost(source)
    facts.firmware, facts.firmware_missing = _firmware(index, host_root, source, loaded or [])
    # The directories the copy makes on the way, each an inode in the tmpfs.
    destinations = [destination] + [item.destination for item in facts.firmware]
    facts.bytes += len(_missing_parents(index, destinations)) * INODE_BYTES
    facts.copy = True
    facts.state = "copied into the new root"
    return facts


def resolve_in_image(index: ImageIndex | None, path: str) -> str | None:
    """``path`` with the image's symlinks resolved (``/lib`` -> ``/usr/lib`` on merged-/usr
    images); the part that does not exist yet is kept as written. None when a component is
    something other than a directory, or a symlink that leads nowhere: nothing can be
    created there without writing through it."""
    if index is None:
        return path
    parts = [part for part in path.split("/") if part]
    for cut in range(len(parts), -1, -1):
        entry = index.lookup("/" + "/".join(parts[:cut]))
        if entry is None:
            continue
        if entry.kind != "dir":
            return None
        resolved = "/".join([entry.path.rstrip("/"), *parts[cut:]]) or "/"
        if cut < len(parts) and index.get(posixpath.join(entry.path, parts[cut])) is not None:
            return None  # the first missing component is there after all: a dangling link
        return resolved
    return path


def _missing_parents(index: ImageIndex | None, paths: list[str]) -> set[str]:
    missing = set()
    for path in paths:
        parent = os.path.dirname(path)
        while parent not in ("/", "") and (index is None or index.lookup(parent) is None):
            missing.add(parent)
            parent = os.path.dirname(parent)
    return missing


def _loaded_modules(proc: Path) -> list[str] | None:
    """Names of the loaded modules; None when the kernel has no module support."""
    try:
        text = (proc / "modules").read_text()
    except OSError:
        return None
    return [line.split()[0] for line in text.splitlines() if line.strip()]


def _tree_cost(top: Path) -> tuple[int, int]:
    """(entries, bytes in a tmpfs) of a directory tree, itself included, symlinks not
    followed."""
    entries = 1
    cost = INODE_BYTES
    for path, info in _walk(top):
        entries += 1
        cost += INODE_BYTES
        if stat.S_ISREG(info.st_mode):
            cost += pages(info.st_size)
        elif stat.S_ISLNK(info.st_mode) and len(os.fsencode(os.readlink(path))) > 127:
            cost += pages(1)
    return entries, cost


def _walk(top: Path) -> Iterator[tuple[str, os.stat_result]]:
    pending = [str(top)]
    while pending:
        directory = pending.pop()
        with contextlib.suppress(OSError), os.scandir(directory) as listing:
            for entry in listing:
                info = entry.stat(follow_symlinks=False)
                yield entry.path, info
                if stat.S_ISDIR(info.st_mode):
                    pending.append(entry.path)


def _module_files(source: Path) -> dict[str, Path]:
    """Module name -> file, from modules.dep ("kernel/fs/fat/vfat.ko.xz: deps...")."""
    files: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for line in (source / "modules.dep").read_text(errors="replace").splitlines():
            relative = line.partition(":")[0].strip()
            name = MODULE_SUFFIX.sub("", os.path.basename(relative)).replace("-", "_")
            if relative:
                files[name] = source / relative
    return files


def _module_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(raw)
    if path.suffix == ".gz":
        return gzip.decompress(raw)
    if path.suffix == ".bz2":
        return bz2.decompress(raw)
    if path.suffix == ".zst":
        if zstandard is None:
            return b""
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(raw))
    return raw


def firmware_names(module: Path) -> list[str]:
    """The firmware files a module declares (``modinfo -F firmware``), read from its
    .modinfo strings; [] when the file cannot be read or decompressed."""
    try:
        data = _module_bytes(module)
    except (OSError, lzma.LZMAError, EOFError, ValueError):
        return []
    except Exception:  # zstandard.ZstdError
        return []
    return sorted({os.fsdecode(match) for match in MODINFO_FIRMWARE.findall(data)})


def _firmware(
    index: ImageIndex | None, host_root: Path, source: Path, loaded: list[str]
) -> tuple[list[FirmwareFile], list[str]]:
    files = _module_files(source)
    release = source.name
    search = [host_root / d.format(release=release) for d in FIRMWARE_DIRS]
    search.append(host_root / FIRMWARE_ROOT)
    found: dict[str, FirmwareFile] = {}
    missing: set[str] = set()
    for module in loaded:
        path = files.get(module.replace("-", "_"))
        if path is None:
            continue
        for name in firmware_names(path):
            if name in found or name in missing:
                continue
            item = _find_firmware(index, host_root, search, name)
            if item is None:
                missing.add(name)
            elif item.destination:
                found[name] = item
    return sorted(found.values(), key=lambda item: item.name), sorted(missing)


def _find_firmware(
    index: ImageIndex | None, host_root: Path, search: list[Path], name: str
) -> FirmwareFile | None:
    for directory in search:
        for suffix in COMPRESSED_SUFFIXES:
            candidate = directory / f"{name}{suffix}"
            try:
                info = candidate.stat()
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            inside = "/" + str(candidate.relative_to(host_root))
            if index is not None and index.lookup(inside) is not None:
                return FirmwareFile(name, str(candidate), "", 0)  # the image has it
            destination = resolve_in_image(index, inside) or ""
            return FirmwareFile(
                name, str(candidate), destination, pages(info.st_size) + INODE_BYTES
            )
    return None


# --- The copy (in the RAM root, after the image) ----------------------------------------------


def add_kernel_modules(root: Path, facts: ModulesFacts) -> list[str]:
    """Copy the modules tree and the firmware files into ``root``; returns what was done,
    in words, for the log. Does nothing unless ``facts.copy``.

    The destinations come from the image's index with its symlinks resolved, so every
    existing component is a real directory of the image: nothing is written through a
    symlink. Modules' own symlinks (``build``, ``source``) are copied as symlinks.
    """
    if not facts.copy:
        return []
    if not Path(facts.source).is_dir():
        # The copy runs in the target's mount namespace (a lab namespace may not show it).
        return [f"no kernel modules: {facts.source} is not visible from the target"]
    done = []
    target = _inside(root, facts.destination)
    _make_parents(root, target.parent)
    shutil.copytree(facts.source, target, symlinks=True)
    done.append(f"kernel modules {facts.source} -> {facts.destination} ({facts.files} entries)")
    for item in facts.firmware:
        destination = _inside(root, item.destination)
        if destination.exists() or destination.is_symlink() or not Path(item.source).is_file():
            continue
        _make_parents(root, destination.parent)
        shutil.copy2(item.source, destination)
        done.append(f"firmware {item.name} -> {item.destination}")
    return done


def _inside(root: Path, path: str) -> Path:
    relative = os.path.normpath(path).lstrip("/")
    if relative.startswith(".."):
        raise ValueError(f"{path} leads outside the root")
    return root / relative


def _make_parents(root: Path, directory: Path) -> None:
    """Create missing directories (0755, root-owned) without following symlinks."""
    missing = []
    current = directory
    while current != root and not (current.exists() or current.is_symlink()):
        missing.append(current)
        current = current.parent
    if current.is_symlink():
        raise ValueError(f"{current} is a symlink in the new root")
    for path in reversed(missing):
        path.mkdir(mode=0o755)
        os.chmod(path, 0o755)
