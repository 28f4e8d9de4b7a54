"""The start of the single file, ``dist/dboot``: a zip archive behind a ``#!/usr/bin/env python3``
line (a zipapp), of which this module is the ``__main__`` (scripts/build-onefile.py makes it).

The file holds docker-boot's own code and every dependency, the compiled ones once per CPython
(3.9 to 3.13) and machine (x86_64, aarch64): ``dboot --targets`` lists them. Python cannot load
an extension module from inside a zip; zipimport compiles the pure modules again at every
start (2.5 to 3.5 s for the wizard's imports, against 0.8 s from bytecode on disk); and the
init stage, which PID 1 runs as ``python -I -S`` with the folder that holds ``initstage``
appended to its path, needs real files too. So the first start extracts what this interpreter
and machine need into a private folder, root's alone and mode 0700 (PID 1 runs code from it as
root): ``/run/dboot-onefile/<build>-<target>``, or under ``/var/cache`` where ``/run`` is
mounted noexec (initramfs-tools mounts it so; the kernel then refuses to map a ``.so`` from
it). Every later start of the same file uses that folder as it is. Each start holds a shared
lock on its folder, so that a newer file's first start removes only older builds nobody runs.

A dependency with no build for this target (none on PyPI when the file was built, or this
host's C library is too old for it) is left out: importing it raises an ImportError that says
so, and each start warns once. An interpreter or machine the file holds nothing for is
refused, exit 2, in one line.

Standard library only. The code up to the version check keeps to Python 3.7, so that an
older interpreter gets that line and not a SyntaxError.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import json
import os
import secrets
import shutil
import stat
import sys
import sysconfig
import types
import zipfile
from collections.abc import Sequence
from typing import Any

MANIFEST = "dboot-onefile.json"
FORMAT = 1
CODE_PREFIX = "code/"  # our packages, as they sit in the wheel
LIB_PREFIX = "lib/"  # lib/<key>/...: one dependency's wheel, processed by the build
# Where root's extracted copies go, first usable wins; DBOOT_ONEFILE_DIR overrides.
ROOT_CACHES = ("/run/dboot-onefile", "/var/cache/dboot-onefile")
MACHINE_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}
# What a 32-bit interpreter on a 64-bit kernel is: the 64-bit builds would not load in it.
THIRTY_TWO_BIT = {"x86_64": "i686", "aarch64": "armv7l"}
EXIT_ENVIRONMENT = 2  # the CLI's code for an environment failure (injector.errors)
# Dependencies our code imports in a try, with what it does without them. Without any other,
# nothing runs: every command needs psutil, docker and python-ptrace, the wizard textual.
OPTIONAL = {"zstandard": "zstd-compressed images and kernel modules need zstd(1) instead"}

# Keeps the shared lock on the folder in use for as long as this process lives.
_held_lock: int | None = None


class OnefileError(Exception):
    """This file cannot run here; one line naming the cause and the fix."""


# --- Which build this interpreter needs ----------------------------------------------------


def machine() -> str:
    name = MACHINE_ALIASES.get(os.uname().machine, os.uname().machine)
    return THIRTY_TWO_BIT.get(name, name) if sys.maxsize <= 2**32 else name


def this_target() -> str:
    """``cp311-x86_64``: the implementation's tag, its version, the machine."""
    implementation = "cp" if sys.implementation.name == "cpython" else sys.implementation.name
    return f"{implementation}{sys.version_info[0]}{sys.version_info[1]}-{machine()}"


def describe(target: str) -> str:
    """``cp311-x86_64`` -> ``CPython 3.11 on x86_64``."""
    tag, _, arch = target.partition("-")
    if tag.startswith("cp") and tag[2:].isdigit():
        return f"CPython {tag[2]}.{tag[3:]} on {arch}"
    return f"{tag} on {arch}"


def glibc() -> tuple[int, int] | None:
    """This host's glibc version; None for another C library (musl has no such confstr)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        return None
    name, _, version = text.partition(" ")
    parts = version.split(".")
    if name != "glibc" or len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        return None
    return int(parts[0]), int(parts[1])


def summary(manifest: dict[str, Any]) -> str:
    """``CPython 3.9 to 3.13 on aarch64 and x86_64``, from the targets the file holds."""
    targets = list(manifest["targets"])
    versions = sorted({target.split("-")[0] for target in targets}, key=lambda tag: int(tag[2:]))
    machines = sorted({target.split("-")[1] for target in targets})
    span = describe(versions[0] + "-x").split(" on ")[0]
    if len(versions) > 1:
        span += f" to {describe(versions[-1] + '-x').split(' ')[1]}"
    return f"{span} on {' and '.join(machines)}"


def missing_here(manifest: dict[str, Any], target: str) -> dict[str, dict[str, Any]]:
    """Dependencies this target lacks, by distribution name: ``{"modules": [...], "why": ...}``.
    Those the file has no build of, and the compiled ones this host's glibc cannot load."""
    entry = manifest["targets"][target]
    missing = {name: dict(info) for name, info in entry["missing"].items()}
    have = glibc()
    for key in entry["libs"]:
        lib = manifest["libs"][key]
        needed = lib.get("glibc")
        if needed is None or (have is not None and have >= tuple(needed)):
            continue
        host = "not glibc" if have is None else f"glibc {have[0]}.{have[1]}"
        why = f"its build needs glibc {needed[0]}.{needed[1]} or newer and this host has {host}"
        missing[lib["dist"]] = {"modules": lib["modules"], "why": why}
    return missing


def libs_here(manifest: dict[str, Any], target: str) -> list[str]:
    missing = missing_here(manifest, target)
    entry = manifest["targets"][target]
    return [key for key in entry["libs"] if manifest["libs"][key]["dist"] not in missing]


# --- Where it goes ------------------------------------------------------------------------


def cache_candidates() -> list[str]:
    chosen = os.environ.get("DBOOT_ONEFILE_DIR")
    if chosen:
        return [chosen]
    if os.geteuid() == 0:
        return list(ROOT_CACHES)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    home = os.path.expanduser("~/.cache/dboot-onefile")
    return ([os.path.join(runtime, "dboot-onefile")] if runtime else []) + [home]


def nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def choose_cache(candidates: Sequence[str]) -> str:
    """The first candidate on a filesystem that lets code be mapped (not mounted noexec)."""
    for path in candidates:
        if not os.statvfs(nearest_existing(path)).f_flag & os.ST_NOEXEC:
            return path
    raise OnefileError(
        f"{' and '.join(candidates)} are all on filesystems mounted noexec, where Python cannot"
        " load the file's compiled modules: set DBOOT_ONEFILE_DIR to a folder on another one"
    )


def why_not_private(path: str) -> str | None:
    """Why ``path`` is not a folder of ours that nobody else can read or change; None if it is."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "a symlink"
    if not stat.S_ISDIR(info.st_mode):
        return "not a directory"
    if info.st_uid != os.geteuid():
        return f"owned by uid {info.st_uid}, not {os.geteuid()}"
    if stat.S_IMODE(info.st_mode) != 0o700:
        return f"mode {stat.S_IMODE(info.st_mode):04o}, not 0700"
    return None


def why_parent_unsafe(path: str) -> tuple[str, str] | None:
    """The first directory above ``path`` that someone other than us (or root) could change,
    with why: whoever can rename an entry there could swap in code of their own. Those still
    to be made are made by us, below the nearest that exists."""
    parent = nearest_existing(os.path.dirname(os.path.abspath(path)))
    while True:
        info = os.stat(parent)
        if info.st_uid not in (0, os.geteuid()):
            return parent, f"owned by uid {info.st_uid}"
        writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not info.st_mode & stat.S_ISVTX:
            return parent, f"group- or world-writable (mode {stat.S_IMODE(info.st_mode):04o})"
        if parent == "/":
            return None
        parent = os.path.dirname(parent)


def remove_tree(path: str) -> None:
    """Rename ``path`` aside first, so that no start ever sees it half removed."""
    doomed = f"{path}.stale-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def private_dir(path: str) -> None:
    """``path`` exists as a folder only we can use: made if missing, made again (after removing
    it) if it is ours but wrong, refused if it is someone else's."""
    try:
        reason = why_not_private(path)
    except FileNotFoundError:
        reason = None
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
    if reason is None:
        return
    info = os.lstat(path)
    if info.st_uid != os.geteuid() or stat.S_ISLNK(info.st_mode):
        raise OnefileError(
            f"{path} is {reason}, and this file would run code from it: remove it (rm -rf {path})"
            " or set DBOOT_ONEFILE_DIR to a folder of your own"
        )
    warn(f"{path} was {reason}: made again")
    if stat.S_ISDIR(info.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)
    private_dir(path)


def warn(text: str) -> None:
    print(f"dboot: {text}", file=sys.stderr)


def lock(path: str, how: int) -> int | None:
    """An open descriptor of folder ``path`` holding ``how`` (an flock mode), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        return None
    return fd


def extract(archive: zipfile.ZipFile, manifest: dict[str, Any], keys: list[str], dest: str) -> None:
    prefixes = (CODE_PREFIX, *(f"{LIB_PREFIX}{key}/" for key in keys))
    for info in archive.infolist():
        prefix = next((prefix for prefix in prefixes if info.filename.startswith(prefix)), None)
        if prefix is None or info.is_dir():
            continue
        relative = info.filename[len(prefix) :]
        if relative.startswith("/") or ".." in relative.split("/"):
            raise OnefileError(f"{info.filename}: a path out of its folder: build the file again")
        path = os.path.join(dest, relative)
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        executable = (info.external_attr >> 16) & 0o111
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755 if executable else 0o644)
        with os.fdopen(fd, "wb") as out, archive.open(info) as source:
            shutil.copyfileobj(source, out, 1 << 20)
    with open(os.path.join(dest, MANIFEST), "w") as out:
        json.dump({"build": manifest["build"], "libs": keys}, out)


def prune(cache: str, build: str) -> None:
    """Remove the folders of other builds that no running dboot holds, and what a start that
    died left half made or half removed."""
    for name in os.listdir(cache):
        path = os.path.join(cache, name)
        if ".partial-" in name or ".stale-" in name:
            pid = name.rsplit("-", 2)[-2]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                shutil.rmtree(path, ignore_errors=True)
            continue
        if name.startswith(build):
            continue
        fd = lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if fd is not None:
            try:
                remove_tree(path)
            except OSError:
                pass
            finally:
                os.close(fd)


def prepare(archive_path: str, manifest: dict[str, Any], target: str) -> str:
    """The folder that holds this target's code as real files, extracted if it is not there."""
    global _held_lock
    keys = libs_here(manifest, target)
    cache = choose_cache(cache_candidates())
    unsafe = why_parent_unsafe(cache)
    if unsafe is not None:
        where, why = unsafe
        raise OnefileError(
            f"{where} is {why}, and this file would run code from below it:"
            f" chown root and chmod go-w {where}, or set DBOOT_ONEFILE_DIR elsewhere"
        )
    private_dir(cache)
    build = manifest["build"][:16]
    name = f"{build}-{target}"
    if keys != manifest["targets"][target]["libs"]:  # a libc too old for some: its own copy
        name += "-" + hashlib.sha256(",".join(keys).encode()).hexdigest()[:8]
    final = os.path.join(cache, name)
    for _attempt in range(3):
        if os.path.lexists(final):
            if why_not_private(final) is not None or not os.path.exists(
                os.path.join(final, MANIFEST)
            ):
                warn(f"{final} was {why_not_private(final) or 'incomplete'}: made again")
                remove_tree(final)
                continue
            fd = lock(final, fcntl.LOCK_SH)
            if fd is not None and not os.path.isdir(final):  # pruned between our look and lock
                os.close(fd)
                fd = None
            if fd is None:
                continue
            _held_lock = fd
            return final
        partial = os.path.join(cache, f".partial-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(partial, 0o700)
        os.chmod(partial, 0o700)
        try:
            with zipfile.ZipFile(archive_path) as archive:
                extract(archive, manifest, keys, partial)
            os.rename(partial, final)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
            if not os.path.isdir(final):  # not a concurrent start that got there first
                raise
        prune(cache, build)
    raise OnefileError(f"{final} keeps changing under this start: run it again")


# --- Running ----------------------------------------------------------------------------


class MissingDependency(importlib.abc.MetaPathFinder):
    """Consulted last: an import of a module this file lacks here fails with the reason."""

    def __init__(self, missing: dict[str, dict[str, Any]], target: str) -> None:
        self.missing = {
            module: (dist, info["why"])
            for dist, info in missing.items()
            for module in info["modules"]
        }
        self.target = target

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        found = self.missing.get(fullname.partition(".")[0])
        if found is None:
            return None
        dist, why = found
        raise ModuleNotFoundError(
            f"this file holds no {dist} for {describe(self.target)} ({why}): what needs it"
            " cannot run here; `dboot --targets` lists what the file holds",
            name=fullname,
        )


def isolate_path(code_dir: str) -> None:
    """sys.path: the stdlib, then our folder; nothing from the host's site-packages (its own
    docker or psutil, or a package named injector) and not the archive itself."""
    stdlib = os.path.dirname(getattr(os, "__file__", None) or sysconfig.get_path("stdlib"))
    stdlib_zip = f"python{sys.version_info[0]}{sys.version_info[1]}.zip"

    def is_stdlib(entry: str) -> bool:
        parts = entry.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts:
            return False
        return entry == stdlib or entry.startswith(stdlib + os.sep) or entry.endswith(stdlib_zip)

    sys.path[:] = [entry for entry in sys.path if entry and is_stdlib(entry)] + [code_dir]


def read_manifest(archive_path: str) -> dict[str, Any]:
    with zipfile.ZipFile(archive_path) as archive:
        manifest: dict[str, Any] = json.loads(archive.read(MANIFEST))
    if manifest.get("format") != FORMAT:
        raise OnefileError(f"{archive_path} is a single file of another format: build it again")
    return manifest


def archive_path() -> str:
    loader = globals().get("__loader__")
    archive = getattr(loader, "archive", None)
    return str(archive) if archive else os.path.abspath(sys.argv[0])


def version_line(manifest: dict[str, Any]) -> str:
    return (
        f"dboot {manifest['version']} (single file, build {manifest['build'][:12]};"
        f" holds {summary(manifest)})"
    )


def targets_text(manifest: dict[str, Any]) -> str:
    lines = [version_line(manifest), "target          what it holds"]
    for target, entry in manifest["targets"].items():
        floor = entry.get("glibc")
        needs = f", needs glibc {floor[0]}.{floor[1]}+" if floor else ""
        missing = entry["missing"]
        held = "everything" if not missing else "without " + ", ".join(sorted(missing))
        lines.append(f"{target:<15} {describe(target)}{needs}: {held}")
        for dist, info in sorted(missing.items()):
            lines.append(f"{'':<15}   {dist}: {info['why']}")
    here = this_target()
    state = "held" if here in manifest["targets"] else "NOT held: this file cannot run here"
    lines.append(f"this host: {here}, {describe(here)} ({state})")
    return "\n".join(lines)


def pick_script(
    scripts: dict[str, str], invoked_as: str, words: list[str]
) -> tuple[str, list[str]]:
    """``dboot-tui ARGS`` (by its name: a link or a copy) or ``dboot tui ARGS`` is the wizard;
    anything else is ``dboot ARGS``."""
    for script in scripts:
        if script != "dboot" and invoked_as.startswith(script):
            return script, words
    if words and f"dboot-{words[0]}" in scripts:
        return f"dboot-{words[0]}", words[1:]
    return "dboot", words


def main(argv: list[str] | None = None, archive: str | None = None) -> int:
    words = list(sys.argv if argv is None else argv)
    archive = archive or archive_path()
    try:
        manifest = read_manifest(archive)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        warn(f"cannot read {archive} as docker-boot's single file ({error}): copy it again")
        return EXIT_ENVIRONMENT
    if words[1:2] == ["--version"]:
        print(version_line(manifest))
        return 0
    if words[1:2] == ["--targets"]:
        print(targets_text(manifest))
        return 0
    target = this_target()
    if target not in manifest["targets"]:
        warn(
            f"this file holds no build for {describe(target)}: it holds {summary(manifest)};"
            " run it with one of those Pythons (python3.N ./dboot), or install docker-boot"
            " with pip"
        )
        return EXIT_ENVIRONMENT
    missing = missing_here(manifest, target)
    for dist, info in sorted(missing.items()):
        lacking = f"this file holds no {dist} for {describe(target)} ({info['why']})"
        if dist not in OPTIONAL:
            warn(f"{lacking}: run it on a host `dboot --targets` lists, or install docker-boot")
            return EXIT_ENVIRONMENT
        warn(f"{lacking}: {OPTIONAL[dist]}")
    try:
        code_dir = prepare(archive, manifest, target)
    except OnefileError as error:
        warn(str(error))
        return EXIT_ENVIRONMENT
    except OSError as error:
        warn(f"cannot extract this file's code ({error}): set DBOOT_ONEFILE_DIR to a folder")
        return EXIT_ENVIRONMENT
    isolate_path(code_dir)
    sys.meta_path.append(MissingDependency(missing, target))
    script, rest = pick_script(manifest["scripts"], os.path.basename(words[0]), words[1:])
    sys.argv = [script, *rest]
    module, _, function = manifest["scripts"][script].partition(":")
    result = getattr(importlib.import_module(module), function)()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
