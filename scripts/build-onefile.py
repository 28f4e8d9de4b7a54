#!/usr/bin/env python3
"""Build dist/dboot: docker-boot and every dependency in one file that runs on the host's own
python3, CPython 3.9 to 3.13 on x86_64 and aarch64, with nothing installed and no network.

The file is a zipapp: ``#!/usr/bin/env python3``, then a zip whose ``__main__.py`` is
app/onefile.py (which extracts what this interpreter needs at its first start: see there).
Inside the zip:
- ``code/``: our packages (app, injector, initstage) and their package data, as the wheel has them;
- ``lib/<key>/``: one dependency's wheel each. A pure one is stored once for every target; a
  compiled one once per wheel (psutil's abi3 build serves every CPython of a machine, zstandard
  has one per CPython);
- ``dboot-onefile.json``: the manifest: which libs each target uses, which dependencies it lacks
  and why, the glibc its compiled modules need, the console scripts.

The wheels come from PyPI (``pip download --only-binary=:all: --platform ... --python-version
...``), one resolution per target, cached under .cache/onefile/wheels/<target>/ with the inputs
that made it: a later build with the same dependencies needs no network. pip runs isolated from
the machine's pip configuration (an extra index that does not publish Requires-Python sends
pip's resolver backtracking through every release for the older Pythons); ``--index-url`` or
DBOOT_WHEEL_INDEX names another index. A dependency that has no wheel for a target is left out
of that target, with pip's reason in the manifest. Nothing is built from source.

What the build changes in a wheel, each to keep the file small (each is said in the log):
- an extension module with its own pure-Python source beside it (charset_normalizer's and
  wcwidth's accelerators) is dropped: the source serves, and the dependency becomes pure;
- zstandard's cffi backend is dropped: it needs the cffi package, which nothing here pulls in,
  so zstandard uses its C backend, as it does when both exist;
- debug information is stripped from the remaining extension modules when the machine's
  ``strip`` is there (``aarch64-linux-gnu-strip`` for aarch64): zstandard's C backend goes from
  10.5 MB to 0.8 MB.

The output is rebuilt only when its inputs changed (our code, this script, the resolutions).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # the test extra brings tomli to the older Pythons
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
FORMAT = 1  # app/onefile.py's FORMAT: the manifest's layout
MANIFEST = "dboot-onefile.json"
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
MACHINES = ("x86_64", "aarch64")
# Oldest first: pip prefers a wheel for an older glibc when a dependency has several. pip also
# takes manylinux2010 and manylinux1 wheels for x86_64 as manylinux2014 ones.
PLATFORMS = ("manylinux2014_{}", "manylinux_2_17_{}", "manylinux_2_28_{}")
DEFAULT_INDEX = "https://pypi.org/simple"
NO_WHEEL = ("No matching distribution found", "Could not find a version that satisfies")
# The glibc each legacy manylinux name stands for (PEP 600).
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
# Parts of a wheel that can never work from this file (see the module's docstring).
DEAD_FILES = {"zstandard": ("zstandard/_cffi.*", "zstandard/backend_cffi.py")}
EXTENSION = re.compile(r"^(?P<stem>.+?)\.(?:cpython-\d+[^.]*|abi3)\.so$")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every entry's: the same inputs make the same file


def log(text: str) -> None:
    print(f"build-onefile: {text}", file=sys.stderr, flush=True)


def pyproject() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


# --- Resolving the wheels of each target ------------------------------------------------------


def pip_download(
    target: str, requirements: list[str], dest: Path, index: str
) -> subprocess.CompletedProcess[str]:
    python, machine = target_parts(target)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p.format(machine))]
    command = [
        sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", "download",
        "--quiet", "--only-binary=:all:", "--index-url", index, *platforms,
        "--python-version", python, "--implementation", "cp",
        "--abi", f"cp{python.replace('.', '')}", "--dest", str(dest), *requirements,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, check=False)


def target_parts(target: str) -> tuple[str, str]:
    """``cp311-x86_64`` -> ("3.11", "x86_64")."""
    tag, machine = target.split("-", 1)
    return f"{tag[2]}.{tag[3:]}", machine


def pip_reason(result: subprocess.CompletedProcess[str]) -> str:
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("ERROR")]
    return (lines or ["pip failed"])[0].removeprefix("ERROR: ")


def resolve(target: str, requirements: list[str], cache: Path, index: str) -> dict[str, Any]:
    """The wheels of one target: ``{"key": ..., "wheels": [files], "missing": {req: why}}``,
    from the cache when the same inputs made it, else from the index."""
    folder = cache / "wheels" / target
    key = hashlib.sha256(json.dumps([FORMAT, target, requirements, PLATFORMS, index]).encode())
    stamp = folder / "resolved.json"
    try:
        known: dict[str, Any] = json.loads(stamp.read_text())
        if known["key"] == key.hexdigest() and all((folder / w).exists() for w in known["wheels"]):
            return known
    except (OSError, ValueError, KeyError):
        pass
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{target}-", dir=cache))
    missing: dict[str, str] = {}
    result = pip_download(target, requirements, work, index)
    if result.returncode != 0:
        # One requirement without a wheel fails the whole resolution: find which, keep the rest.
        # Only a missing wheel leaves a dependency out; anything else (the network) stops here.
        for requirement in requirements:
            alone = pip_download(target, [requirement], work, index)
            if alone.returncode == 0:
                continue
            if not any(words in alone.stderr for words in NO_WHEEL):
                raise SystemExit(f"build-onefile: {target}: {pip_reason(alone)}")
            missing[requirement] = pip_reason(alone)
        kept = [r for r in requirements if r not in missing]
        shutil.rmtree(work)
        work.mkdir()
        if kept:
            result = pip_download(target, kept, work, index)
            if result.returncode != 0:
                raise SystemExit(f"build-onefile: {target}: {pip_reason(result)}")
    wheels = sorted(path.name for path in work.glob("*.whl"))
    resolved: dict[str, Any] = {"key": key.hexdigest(), "wheels": wheels, "missing": missing}
    (work / stamp.name).write_text(json.dumps(resolved, indent=1))
    folder.parent.mkdir(exist_ok=True)
    if folder.exists():  # an older resolution: set aside, so that no build sees it half gone
        folder.rename(folder.with_name(f".{target}-old-{os.getpid()}"))
        shutil.rmtree(folder.with_name(f".{target}-old-{os.getpid()}"))
    try:
        work.rename(folder)
    except OSError:  # a build running beside this one got there first: its wheels are as good
        shutil.rmtree(work)
    took = time.monotonic() - started
    log(f"{target}: {len(resolved['wheels'])} wheels from {index} in {took:.1f} s")
    return resolved


# --- What goes into the file ------------------------------------------------------------------


def wheel_glibc(filename: str) -> tuple[int, int] | None:
    """The oldest glibc that one of the wheel's platform tags allows; None for a pure wheel."""
    floors = []
    for tag in filename[: -len(".whl")].split("-")[-1].split("."):
        match = re.match(r"manylinux_(\d+)_(\d+)_", tag)
        if match:
            floors.append((int(match[1]), int(match[2])))
        elif tag.split("_")[0] in LEGACY_MANYLINUX:
            floors.append(LEGACY_MANYLINUX[tag.split("_")[0]])
    return min(floors) if floors else None


def wheel_dist(filename: str) -> tuple[str, str]:
    name, version = filename.split("-")[:2]
    return name.lower().replace("_", "-"), version


def normalized(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def strip_tool(machine: str) -> str | None:
    names = [f"{machine}-linux-gnu-strip"] + (["strip"] if platform.machine() == machine else [])
    return next((found for name in names if (found := shutil.which(name))), None)


def stripped(data: bytes, machine: str, name: str) -> bytes:
    tool = strip_tool(machine)
    if tool is None:
        log(f"no strip for {machine}: {name} keeps its debug information")
        return data
    with tempfile.TemporaryDirectory() as work:
        source, out = Path(work, "in.so"), Path(work, "out.so")
        source.write_bytes(data)
        subprocess.run([tool, "--strip-debug", "-o", str(out), str(source)], check=True)
        return out.read_bytes()


def wheel_files(path: Path, machine: str) -> dict[str, bytes]:
    """The wheel's files as this file holds them (see the module's docstring)."""
    dist, _ = wheel_dist(path.name)
    with zipfile.ZipFile(path) as wheel:
        files = {info.filename: wheel.read(info) for info in wheel.infolist() if not info.is_dir()}
    for name in list(files):
        # <dist>.data/purelib and platlib go where an install puts them; its scripts are not ours.
        top, _, rest = name.partition("/")
        if top.endswith(".data"):
            kind, _, inner = rest.partition("/")
            if kind in ("purelib", "platlib"):
                files[inner] = files[name]
            del files[name]
    for name in list(files):
        extension = EXTENSION.match(name)
        dead = any(fnmatch.fnmatch(name, pattern) for pattern in DEAD_FILES.get(dist, ()))
        if dead or (extension and f"{extension['stem']}.py" in files):
            del files[name]
        elif extension:
            files[name] = stripped(files[name], machine, name)
    return files


def our_code(project: dict[str, Any]) -> dict[str, bytes]:
    """Our packages' modules and package data, found as setuptools finds them for the wheel."""
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    data = project["tool"]["setuptools"].get("package-data", {})
    files = {}
    tops = [top for top in sorted(REPO.iterdir()) if (top / "__init__.py").exists()]
    for init in sorted(path for top in tops for path in top.rglob("__init__.py")):
        package = init.parent.relative_to(REPO)
        dotted = ".".join(package.parts)
        if not any(fnmatch.fnmatch(dotted, pattern) for pattern in include):
            continue
        patterns = ["*.py", *data.get(dotted, [])]
        for path in sorted(init.parent.iterdir()):
            if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns):
                files[str(path.relative_to(REPO))] = path.read_bytes()
    return files


def add(archive: zipfile.ZipFile, digest: Any, name: str, data: bytes, mode: int = 0o644) -> None:
    info = zipfile.ZipInfo(name, ZIP_TIME)
    info.external_attr = (0o100000 | mode) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    archive.writestr(info, data, compresslevel=6)
    digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())


def inputs_key(code: dict[str, bytes], resolutions: dict[str, dict[str, Any]]) -> str:
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(json.dumps(resolutions, sort_keys=True).encode())
    for machine in MACHINES:
        digest.update(str(strip_tool(machine)).encode())
    for name, data in sorted(code.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def built_inputs(out: Path) -> str | None:
    try:
        with zipfile.ZipFile(out) as archive:
            return str(json.loads(archive.read(MANIFEST)).get("inputs"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def build(out: Path, targets: list[str], cache: Path, index: str, force: bool) -> None:
    started = time.monotonic()
    project = pyproject()
    requirements = list(project["project"]["dependencies"])
    cache.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {t: pool.submit(resolve, t, requirements, cache, index) for t in targets}
        resolutions = {target: future.result() for target, future in futures.items()}
    code = our_code(project)
    key = inputs_key(code, resolutions)
    if not force and out.exists() and built_inputs(out) == key:
        log(f"{out} is up to date ({out.stat().st_size / 1e6:.1f} MB)")
        return

    libs: dict[str, dict[str, Any]] = {}
    by_wheel: dict[str, str] = {}
    manifest_targets: dict[str, dict[str, Any]] = {}
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        add(archive, digest, "__main__.py", (REPO / "app" / "onefile.py").read_bytes())
        for name, data in sorted(code.items()):
            add(archive, digest, f"code/{name}", data)
        for target in targets:
            _, machine = target_parts(target)
            keys = []
            for wheel in resolutions[target]["wheels"]:
                if wheel not in by_wheel:
                    path = cache / "wheels" / target / wheel
                    by_wheel[wheel] = store_wheel(archive, digest, path, machine, libs)
                keys.append(by_wheel[wheel])
            floors = [libs[k]["glibc"] for k in keys if libs[k]["glibc"]]
            manifest_targets[target] = {
                "libs": keys,
                "glibc": max(floors) if floors else None,
                "missing": missing_info(resolutions[target]["missing"], libs),
            }
        manifest = {
            "format": FORMAT,
            "project": project["project"]["name"],
            "version": project["project"]["version"],
            "build": digest.hexdigest(),
            "inputs": key,
            "scripts": project["project"]["scripts"],
            "targets": manifest_targets,
            "libs": libs,
        }
        add(archive, hashlib.sha256(), MANIFEST, json.dumps(manifest, indent=1).encode())
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    partial.write_bytes(b"#!/usr/bin/env python3\n" + buffer.getvalue())
    partial.chmod(0o755)
    partial.rename(out)
    held = [t for t in targets if not manifest_targets[t]["missing"]]
    log(
        f"{out}: {out.stat().st_size / 1e6:.1f} MB, {len(targets)} targets ({len(held)} with"
        f" every dependency), {len(libs)} libs, in {time.monotonic() - started:.1f} s"
    )
    for target in targets:
        for dist, info in manifest_targets[target]["missing"].items():
            log(f"{target} has no {dist}: {info['why']}")


def store_wheel(
    archive: zipfile.ZipFile, digest: Any, path: Path, machine: str, libs: dict[str, Any]
) -> str:
    """Adds one wheel under lib/<key>/ (unless an identical pure one is there) and returns key."""
    files = wheel_files(path, machine)
    dist, version = wheel_dist(path.name)
    compiled = any(EXTENSION.match(name) for name in files)
    key = path.name[: -len(".whl")] if compiled else f"{dist}-{version}"
    if key in libs:
        return key
    top = {name.split("/")[0] for name in files if not name.split("/")[0].endswith(".dist-info")}
    libs[key] = {
        "dist": dist,
        "version": version,
        "wheel": path.name,
        "modules": sorted(name.removesuffix(".py") for name in top),
        "glibc": wheel_glibc(path.name) if compiled else None,
    }
    for name, data in sorted(files.items()):
        add(archive, digest, f"lib/{key}/{name}", data)
    return key


def missing_info(missing: dict[str, str], libs: dict[str, Any]) -> dict[str, Any]:
    """What a target lacks, by distribution, with the modules another target's build of it
    provides (the name the runtime recognizes an import by)."""
    info = {}
    for requirement, why in missing.items():
        dist = normalized(requirement)
        modules = next((lib["modules"] for lib in libs.values() if lib["dist"] == dist), None)
        info[dist] = {"modules": modules or [dist.replace("-", "_")], "why": why}
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "dboot", help="dist/dboot")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("DBOOT_ONEFILE_CACHE", REPO / ".cache" / "onefile")),
        help="where the wheels are kept (default: .cache/onefile, or $DBOOT_ONEFILE_CACHE)",
    )
    parser.add_argument(
        "--targets",
        default=",".join(f"cp{p.replace('.', '')}-{m}" for m in MACHINES for p in PYTHONS),
        help="comma-separated, e.g. cp311-x86_64 (default: CPython 3.9-3.13 on x86_64, aarch64)",
    )
    parser.add_argument(
        "--index-url",
        default=os.environ.get("DBOOT_WHEEL_INDEX", DEFAULT_INDEX),
        help=f"where pip finds the wheels (default: {DEFAULT_INDEX}, or $DBOOT_WHEEL_INDEX)",
    )
    parser.add_argument("--force", action="store_true", help="build even if up to date")
    args = parser.parse_args()
    build(args.out, args.targets.split(","), args.cache, args.index_url, args.force)


if __name__ == "__main__":
    main()
