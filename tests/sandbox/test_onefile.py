"""The single file (issue 18, section 2): ``dist/dboot``, built by scripts/build-onefile.py (what
``make dist`` runs), run as a user would after ``scp``: by a clean interpreter (``python3 -I``,
never the venv), on the host's own python3 and on the oldest and newest CPython supported, with
nothing installed, in an empty environment, without site-packages, and without a network.

The rehearsals here are real: the stage that becomes the sandbox's PID 1 is the file's own copy of
initstage, extracted to a folder that is gone from the new root once the stage has pivoted, so an
init that runs at all proves the stage ran from memory after the old root was detached.

The aarch64 half is checked in the file (every compiled module of every CPython is there, an
aarch64 ELF of the right Python), not run: no aarch64 CPython exists on this machine.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app import onefile
from tests.images import build_tinybox

pytestmark = [pytest.mark.root, pytest.mark.engine]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build-onefile.py"
ONEFILE = REPO / "dist" / "dboot"
# What a user's sudo leaves: no PYTHON* variables, no venv on PATH. Lab mode, as in every test.
CLEAN_ENV = {
    "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    "DBOOT_REHEARSAL_ONLY": "1",
    "DBOOT_LOG_FILE": "/tmp/dboot-tests.log",
}
PYTHONS = ("3.9", "3.10", "3.11", "3.12", "3.13")
MACHINES = {"x86_64": 62, "aarch64": 183}  # ELF e_machine
NOBODY = 65534
TOP_LEVEL = {"textual", "docker", "psutil", "python-ptrace", "zstandard", "pyte"}
TRANSITIVE = {"rich", "requests", "urllib3", "certifi", "idna", "charset-normalizer", "pygments"}
TRANSITIVE |= {"markdown-it-py", "mdurl", "platformdirs", "typing-extensions", "wcwidth"}
COMPILED = {"psutil", "zstandard"}  # no pure fallback: a build per machine at least
# The init's own words: it is PID 1, and the folder the stage's code came from is not there.
REHEARSED_INIT = (
    "echo init-pid=$$; [ -e /run/dboot-onefile ] || echo extracted-code-not-here; exit 7"
)


def find_python(version: str) -> str | None:
    """CPython ``version`` as scripts/python-matrix.sh finds it: DBOOT_PYTHON_3_9 names one,
    else PATH, pyenv's builds, Debian's."""
    override = os.environ.get(f"DBOOT_PYTHON_{version.replace('.', '_')}")
    pyenv = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    candidates = [override] if override else [
        shutil.which(f"python{version}"),
        *sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}"), reverse=True),
        f"/usr/bin/python{version}",
    ]  # fmt: skip
    for candidate in filter(None, candidates):
        check = [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        try:
            found = subprocess.run(check, capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
        if found.strip() == version:
            return candidate
    return None


INTERPRETERS: dict[str, Callable[[], str | None]] = {
    "host python3": lambda: "/usr/bin/python3",
    "3.9": lambda: find_python("3.9"),
    "3.13": lambda: find_python("3.13"),
}


@pytest.fixture(scope="module")
def built() -> dict[str, Any]:
    """dist/dboot as ``make dist`` builds it; its wheels come from .cache/onefile after the first
    build, and an unchanged file is not built again."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(BUILD), "--out", str(ONEFILE)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr
    print(f"build: {time.monotonic() - started:.1f} s: {result.stderr.strip()}")
    return manifest_of(ONEFILE)


@pytest.fixture(scope="module")
def tinybox() -> str:
    return build_tinybox()


@pytest.fixture(params=list(INTERPRETERS), scope="module")
def python(request: pytest.FixtureRequest) -> str:
    found = INTERPRETERS[request.param]()
    if found is None:
        pytest.fail(
            f"no CPython {request.param} (PATH, ~/.pyenv/versions, /usr/bin): install one"
            f" or set DBOOT_PYTHON_{request.param.replace('.', '_')}=/path/to/python"
        )
    return found


def manifest_of(path: Path) -> dict[str, Any]:
    with zipfile.ZipFile(path) as archive:
        manifest: dict[str, Any] = json.loads(archive.read(onefile.MANIFEST))
    return manifest


def run(
    *command: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(command),
        capture_output=True,
        text=True,
        env=env or CLEAN_ENV,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def target_of(python: str) -> str:
    code = "import sys; sys.path.insert(0, sys.argv[1]); from app import onefile as o"
    code += "; print(o.this_target())"
    return run(python, "-I", "-c", code, str(REPO)).stdout.strip()


def extracted(manifest: dict[str, Any], target: str) -> Path:
    """Where a root start of the file put this target's code (this machine's /run is exec)."""
    return Path(onefile.ROOT_CACHES[0]) / f"{manifest['build'][:16]}-{target}"


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("dboot: ") and "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


# --- What the file holds --------------------------------------------------------------------


def test_the_file_holds_every_dependency_for_every_cpython_on_both_machines(
    built: dict[str, Any],
) -> None:
    targets = {f"cp{v.replace('.', '')}-{m}" for v in PYTHONS for m in MACHINES}
    assert set(built["targets"]) == targets
    with zipfile.ZipFile(ONEFILE) as archive:
        names = archive.namelist()
        for target, entry in built["targets"].items():
            version, machine = target.split("-")
            assert entry["missing"] == {}, target
            libs = [built["libs"][key] for key in entry["libs"]]
            assert {lib["dist"] for lib in libs} >= TOP_LEVEL | TRANSITIVE, target
            compiled = [lib for lib in libs if lib["glibc"]]
            assert {lib["dist"] for lib in compiled} >= COMPILED, target
            for key in entry["libs"]:
                for name in (n for n in names if n.startswith(f"lib/{key}/")):
                    if name.endswith(".so"):
                        header = archive.read(name)[:20]
                        assert header[:5] == b"\x7fELF\x02", name  # 64-bit ELF
                        assert int.from_bytes(header[18:20], "little") == MACHINES[machine], name
                        assert f"{machine}-linux-gnu" in name or ".abi3." in name, name
                        if ".abi3." not in name:
                            assert f".cpython-{version[2:]}-" in name, name
            zstd = [n for n in names if n.startswith("lib/zstandard-") and "backend_c" in n]
            assert any(n.split("/")[1] in entry["libs"] for n in zstd), target
    assert "__main__.py" in names and "code/initstage/stage.py" in names
    assert "code/app/tui/dboot.tcss" in names  # package data, as the wheel has it
    size = ONEFILE.stat().st_size
    print(f"dist/dboot: {size / 1e6:.1f} MB")
    assert size < 20e6


def test_an_unchanged_file_is_not_built_again(built: dict[str, Any]) -> None:
    before = ONEFILE.stat().st_mtime_ns
    started = time.monotonic()
    result = run(sys.executable, str(BUILD), "--out", str(ONEFILE), timeout=300)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stderr
    assert ONEFILE.stat().st_mtime_ns == before
    assert time.monotonic() - started < 30


def test_targets_and_version_say_what_the_file_holds(built: dict[str, Any]) -> None:
    version = run("/usr/bin/python3", "-I", str(ONEFILE), "--version")
    assert version.returncode == 0, version.stderr
    assert "CPython 3.9 to 3.13 on aarch64 and x86_64" in version.stdout
    targets = run("/usr/bin/python3", "-I", str(ONEFILE), "--targets")
    assert targets.returncode == 0, targets.stderr
    for target in built["targets"]:
        assert f"{target} " in targets.stdout
    assert targets.stdout.count(": everything") == len(built["targets"])
    assert "(held)" in targets.stdout.splitlines()[-1]


# --- Runs, on each interpreter ---------------------------------------------------------------


def test_help_version_and_the_wizards_help(built: dict[str, Any], python: str) -> None:
    usage = run(python, "-I", str(ONEFILE), "--help")
    assert usage.returncode == 0, usage.stderr
    assert usage.stdout.startswith("usage: dboot ")
    wizard = run(python, "-I", str(ONEFILE), "tui", "--help")
    assert wizard.returncode == 0, wizard.stderr
    assert wizard.stdout.startswith("usage: dboot-tui ")


def test_images_and_check_on_the_engine(built: dict[str, Any], python: str, tinybox: str) -> None:
    images = run(python, "-I", str(ONEFILE), "images", "--json")
    assert images.returncode == 0, images.stderr
    rows = [json.loads(line) for line in images.stdout.splitlines()]
    assert any(f"{row['repository']}:{row['tag']}" == tinybox for row in rows)
    check = run(python, "-I", str(ONEFILE), "check", "--json", tinybox, "/bin/sh")
    assert check.returncode in (0, 3), check.stderr
    events = [json.loads(line) for line in check.stdout.splitlines()]
    assert events[-1]["event"] == "verdict"
    assert {"ram", "processes", "pid1"} <= {e["section"] for e in events if e["event"] == "fact"}


def test_the_compiled_modules_load_from_the_extracted_copy(
    built: dict[str, Any], python: str
) -> None:
    """zstandard is imported in a try (zstd(1) is the fallback), so a build that did not load
    would go unnoticed in a run: import each compiled module from the file's copy, isolated."""
    assert run(python, "-I", str(ONEFILE), "--help").returncode == 0
    folder = extracted(built, target_of(python))
    info = folder.lstat()
    assert stat.S_ISDIR(info.st_mode) and info.st_uid == 0
    assert stat.S_IMODE(info.st_mode) == 0o700
    code = (
        "import sys; sys.path.append(sys.argv[1]); import psutil, zstandard, initstage.stage;"
        " print(zstandard.backend, psutil.__file__, initstage.stage.__file__)"
    )
    loaded = run(python, "-I", "-S", "-c", code, str(folder))
    assert loaded.returncode == 0, loaded.stderr
    backend, psutil_file, stage_file = loaded.stdout.split()
    assert backend == "cext"
    assert psutil_file.startswith(f"{folder}/") and stage_file.startswith(f"{folder}/")


def test_a_rehearsal_from_the_file_runs_the_stage_from_memory(
    built: dict[str, Any], python: str, tinybox: str
) -> None:
    result = run(
        python, "-I", str(ONEFILE), "rehearse", "--grace", "0", tinybox,
        "/bin/sh", "-c", REHEARSED_INIT,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 7, output
    assert "init-pid=1" in result.stdout
    assert "extracted-code-not-here" in result.stdout
    assert "now in the new root (pivot_root, old root detached)" in output


# --- Nothing but python3 ----------------------------------------------------------------------


def test_an_empty_environment_no_site_packages_and_no_network(
    built: dict[str, Any], tinybox: str
) -> None:
    """``env -i``: no PATH, no HOME; ``-I -S``: no site-packages, no user site; ``unshare
    --net``: a network namespace with a loopback that is down. The engine is a unix socket."""
    bare = ["unshare", "--net", "env", "-i", "DBOOT_REHEARSAL_ONLY=1"]
    python = [*bare, "/usr/bin/python3", "-I", "-S", str(ONEFILE)]
    links = run(
        *bare, "/usr/bin/python3", "-I", "-S", "-c", "import socket; print(socket.if_nameindex())"
    )
    assert links.stdout.strip() == "[(1, 'lo')]", links
    images = run(*python, "images", "--json")
    assert images.returncode == 0, images.stderr
    assert tinybox.split(":")[0] in images.stdout
    rehearsal = run(*python, "rehearse", "--grace", "0", tinybox, "/bin/sh", "-c", REHEARSED_INIT)
    assert rehearsal.returncode == 7, rehearsal.stdout + rehearsal.stderr
    assert "init-pid=1" in rehearsal.stdout


def test_run_by_its_shebang_and_as_dboot_tui(built: dict[str, Any], tmp_path: Path) -> None:
    assert run(str(ONEFILE), "--version").stdout.startswith("dboot ")
    link = tmp_path / "dboot-tui"
    link.symlink_to(ONEFILE)
    copy = tmp_path / "copies" / "dboot-tui"
    copy.parent.mkdir()
    shutil.copy2(ONEFILE, copy)
    for wizard in (link, copy):
        result = run(str(wizard), "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: dboot-tui "), result.stdout


# --- A file that lacks something, and the folder it extracts to -------------------------------


def variant(tmp_path: Path, name: str, edit: Callable[[dict[str, Any], str], None]) -> Path:
    """A copy of the file whose manifest ``edit`` changed (for this host's target), with a build
    id of its own: as a build made when PyPI lacked something would be."""
    host_target = target_of("/usr/bin/python3")
    manifest = manifest_of(ONEFILE)
    edit(manifest, host_target)
    manifest["build"] = hashlib.sha256(json.dumps(manifest).encode()).hexdigest()
    buffer = io.BytesIO()
    with zipfile.ZipFile(ONEFILE) as source, zipfile.ZipFile(buffer, "w") as out:
        for info in source.infolist():
            if info.filename != onefile.MANIFEST:
                out.writestr(info, source.read(info))
        out.writestr(onefile.MANIFEST, json.dumps(manifest))
    path = tmp_path / name
    path.write_bytes(b"#!/usr/bin/env python3\n" + buffer.getvalue())
    path.chmod(0o755)
    return path


def in_cache(cache: Path) -> dict[str, str]:
    return {**CLEAN_ENV, "DBOOT_ONEFILE_DIR": str(cache)}


def test_an_interpreter_the_file_holds_nothing_for_is_one_line(
    built: dict[str, Any], tmp_path: Path
) -> None:
    def without_host(manifest: dict[str, Any], target: str) -> None:
        del manifest["targets"][target]

    path = variant(tmp_path, "dboot", without_host)
    result = run("/usr/bin/python3", "-I", str(path), "images", env=in_cache(tmp_path / "cache"))
    line = one_line_error(result, 2, "holds no build for CPython 3.", "3.9 to 3.13")
    assert "NOT held" in run("/usr/bin/python3", "-I", str(path), "--targets").stdout
    assert not (tmp_path / "cache").exists(), line  # nothing extracted


def test_a_dependency_without_a_build_degrades_with_a_warning(
    built: dict[str, Any], tmp_path: Path, tinybox: str
) -> None:
    why = "No matching distribution found for zstandard (as if PyPI had no wheel)"

    def without_zstandard(manifest: dict[str, Any], target: str) -> None:
        entry = manifest["targets"][target]
        entry["libs"] = [k for k in entry["libs"] if manifest["libs"][k]["dist"] != "zstandard"]
        entry["missing"] = {"zstandard": {"modules": ["zstandard"], "why": why}}

    path = variant(tmp_path, "dboot", without_zstandard)
    listing = run("/usr/bin/python3", "-I", str(path), "--targets").stdout
    assert "without zstandard" in listing and why in listing
    images = run("/usr/bin/python3", "-I", str(path), "images", env=in_cache(tmp_path / "c"))
    assert images.returncode == 0, images.stderr
    warning = images.stderr.strip().splitlines()
    assert len(warning) == 1 and "holds no zstandard for CPython 3." in warning[0], warning
    assert "need zstd(1) instead" in warning[0]
    assert tinybox.split(":")[0] in images.stdout
    (folder,) = (tmp_path / "c").iterdir()
    assert not (folder / "zstandard").exists() and (folder / "psutil").is_dir()


def test_compiled_modules_a_hosts_glibc_cannot_load_are_one_line(
    built: dict[str, Any], tmp_path: Path
) -> None:
    def needs_future_glibc(manifest: dict[str, Any], target: str) -> None:
        for key in manifest["targets"][target]["libs"]:
            if manifest["libs"][key]["dist"] == "psutil":
                manifest["libs"][key]["glibc"] = [2, 999]

    path = variant(tmp_path, "dboot", needs_future_glibc)
    result = run("/usr/bin/python3", "-I", str(path), "images", env=in_cache(tmp_path / "c"))
    one_line_error(result, 2, "holds no psutil for CPython 3.", "needs glibc 2.999 or newer")
    assert "this host has glibc 2." in result.stderr


def test_a_cache_folder_not_ours_alone_is_made_again_or_refused(
    built: dict[str, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    cache.chmod(0o755)
    env = in_cache(cache)
    first = run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=env)
    assert first.returncode == 0, first.stderr
    assert "mode 0755, not 0700: made again" in first.stderr
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    (folder,) = cache.iterdir()
    folder.chmod(0o750)  # the build's folder: made again too
    again = run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=env)
    assert again.returncode == 0 and "made again" in again.stderr, again.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    quiet = run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=env)
    assert quiet.returncode == 0 and quiet.stderr == ""
    os.chown(cache, 65534, 65534)
    one_line_error(
        run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=env), 2, str(cache), "uid 65534"
    )
    shutil.rmtree(cache)
    cache.symlink_to(tmp_path)
    one_line_error(run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=env), 2, "a symlink")


@pytest.fixture
def noexec_mount(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "noexec"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "noexec,size=64m", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_noexec_filesystem_is_passed_over(
    built: dict[str, Any], tmp_path: Path, noexec_mount: Path
) -> None:
    """/run is mounted noexec by initramfs-tools: the kernel would refuse to map a .so there."""
    elsewhere = str(tmp_path / "exec" / "dboot-onefile")
    assert onefile.choose_cache([str(noexec_mount / "x"), elsewhere]) == elsewhere
    result = run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=in_cache(noexec_mount / "x"))
    one_line_error(result, 2, "noexec", "DBOOT_ONEFILE_DIR")


def test_a_new_build_removes_the_old_ones_nobody_runs(
    built: dict[str, Any], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old, running = cache / "0123456789abcdef-cp311-x86_64", cache / "fedcba9876543210-cp39-x86_64"
    dead_partial = cache / ".partial-999999999-00000000"
    for folder in (old, running, dead_partial):
        folder.mkdir(mode=0o700)
        (folder / "module.py").write_text("")
    holder = os.open(running, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(holder, fcntl.LOCK_SH)  # as a dboot of that build holds it while it runs
        result = run("/usr/bin/python3", "-I", str(ONEFILE), "--help", env=in_cache(cache))
        assert result.returncode == 0, result.stderr
    finally:
        os.close(holder)
    left = sorted(path.name for path in cache.iterdir())
    assert left == sorted([running.name, f"{built['build'][:16]}-{target_of('/usr/bin/python3')}"])


def test_a_user_not_root_gets_a_cache_of_its_own(built: dict[str, Any]) -> None:
    """Not root: the copy goes under the user's ~/.cache (made with its parents); ``check``
    then says in one line that it needs root, as the installed dboot does."""
    home = Path(tempfile.mkdtemp(prefix="dboot-onefile-user-"))
    try:
        os.chown(home, NOBODY, NOBODY)
        home.chmod(0o755)
        copy = home / "dboot"
        shutil.copy(ONEFILE, copy)
        as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
        env = {**CLEAN_ENV, "HOME": str(home / "home")}
        usage = run(*as_nobody, "/usr/bin/python3", "-I", str(copy), "--help", env=env)
        assert usage.returncode == 0, usage.stderr
        cache = home / "home" / ".cache" / "dboot-onefile"
        assert cache.stat().st_uid == NOBODY and stat.S_IMODE(cache.stat().st_mode) == 0o700
        check = run(*as_nobody, "/usr/bin/python3", "-I", str(copy), "check", "tinybox", env=env)
        one_line_error(check, 2, "root")
    finally:
        shutil.rmtree(home)


def test_the_file_holds_our_code_as_the_wheel_does(built: dict[str, Any], tmp_path: Path) -> None:
    """The build collects our packages itself (no wheel needed first): the same files as the
    wheel ``make dist`` builds beside it, package data included."""
    result = run(
        sys.executable, "-m", "build", "--no-isolation", "--wheel", "--outdir", str(tmp_path),
        str(REPO), env={**CLEAN_ENV, "PATH": f"{Path(sys.executable).parent}:{CLEAN_ENV['PATH']}"},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("docker_boot-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if ".dist-info/" not in name}
    with zipfile.ZipFile(ONEFILE) as archive:
        held = {name[len("code/") :] for name in archive.namelist() if name.startswith("code/")}
    assert held == packaged
