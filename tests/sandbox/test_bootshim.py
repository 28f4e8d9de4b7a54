"""The boot shim as PID 1, the way the kernel starts it at every boot of an installed machine.

Each boot is a new PID and mount namespace whose root is a disk laid out as
``dboot install`` leaves it (``deploy``'s own functions write it): the old system's init,
``/dboot/state.json``, the shim's entry script and its copy of ``initstage``, a tree under
``/dboot/trees``. The host's ``/usr`` is bound read-only into both roots for ``/bin/sh`` and
``python3``. What is real: the shim's choice, its writes, its pivot into the tree, the
keeper's deadline (a sandbox's keeper leaves ``/run/dboot/revert-due`` where a machine's
would reboot), and the exec of either init. What is not: firmware, kernel and initramfs,
which the VM tier's install scenarios boot for real.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from initstage import bootstate
from initstage.bootstate import BootState
from injector import testhooks
from injector.install import deploy

pytestmark = pytest.mark.root

PROJECT = Path(__file__).resolve().parents[2]
TREE = "/dboot/trees/test-0123456789ab"
OLD_INIT = """\
#!/bin/sh
echo "old system: pid $$ args $*" > /old-ran
"""
# The new system's init: says where it runs, then waits for what the test asks.
NEW_INIT = """\
#!/bin/sh
{{ echo "pid $$"; ls /sysroot/dboot; }} > /sysroot/new-ran
{action}
"""


def python3() -> str:
    for path in ("/usr/bin/python3",):
        if os.path.exists(path):
            return path
    pytest.fail("the shim runs on the distribution's /usr/bin/python3: apt-get install python3")


def make_root(root: Path) -> None:
    for name in ("usr", "proc", "dev", "sys", "run", "etc", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64"),
                         ("sbin", "usr/sbin")):  # fmt: skip
        if not (root / link).exists():
            (root / link).symlink_to(target)


@dataclasses.dataclass
class Bed:
    disk: Path

    def install(self, new_init_action: str = "exit 0", **state: object) -> BootState:
        make_root(self.disk)
        (self.disk / "old-init").write_text(OLD_INIT)
        (self.disk / "old-init").chmod(0o755)
        disk = deploy.Disk(str(self.disk))
        deploy.make_dirs(disk)
        tree = self.disk / TREE.lstrip("/")
        make_root(tree)
        deploy.make_sysroot(tree)
        (tree / "init").write_text(NEW_INIT.format(action=new_init_action))
        (tree / "init").chmod(0o755)
        deploy.write_shim(disk, python3(), "/old-init", "/sbin/init")
        values = {
            "tree": TREE,
            "init_argv": ["/init"],
            "old_init": "/old-init",
            "init_path": "/sbin/init",
            "revert_after_seconds": 3.0,
            "image": "test",
            **state,
        }
        installed = BootState(**values)  # type: ignore[arg-type]
        bootstate.write_state(installed, disk.path(bootstate.STATE_FILE))
        return installed

    def boot(
        self,
        *kernel_args: str,
        entry: str = bootstate.SHIM_ENTRY,
        timeout: float = 60,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """PID 1 of new namespaces, chrooted into the disk as the kernel would exec it."""
        script = (
            f"mount --rbind /usr {self.disk}/usr && mount -o remount,bind,ro {self.disk}/usr"
            f" && {{ [ ! -d {self.disk}{TREE}/usr ] || mount --bind {self.disk}/usr"
            f" {self.disk}{TREE}/usr; }}"
            f" && mount --rbind {self.disk} {self.disk}"
            f' && exec chroot {self.disk} {entry} "$@"'
        )
        return subprocess.run(
            [
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "shim",
                *kernel_args,
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **(env or {})},
        )

    def state(self) -> BootState:
        return bootstate.read_state(str(self.disk / bootstate.STATE_FILE.lstrip("/")))

    def report(self) -> dict[str, object]:
        data = json.loads((self.disk / bootstate.REPORT_FILE.lstrip("/")).read_text())
        assert isinstance(data, dict)
        return data

    def read(self, relative: str) -> str:
        path = self.disk / relative
        return path.read_text() if path.exists() else ""


@pytest.fixture
def bed(tmp_path: Path) -> Bed:
    return Bed(tmp_path / "disk")


def test_refuses_unless_pid1() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "from initstage.bootshim import main; main([])"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1 and "refusing to run as pid" in result.stderr


def test_probation_boot_runs_the_tree_then_the_next_boot_is_the_old_system(bed: Bed) -> None:
    # The new system waits for its keeper's deadline (3 s), which in a sandbox leaves the
    # revert-due marker where a machine's keeper reboots.
    wait = "for i in $(seq 100); do [ -e /run/dboot/revert-due ] && break; sleep 0.1; done\n"
    wait += "[ -e /run/dboot/revert-due ] && echo due > /sysroot/revert-seen"
    bed.install(new_init_action=wait)
    first = bed.boot()
    assert first.returncode == 0, first.stdout + first.stderr
    ran = bed.read("new-ran")
    assert "pid 1" in ran, first.stderr
    assert "state.json" in ran  # the disk is at /sysroot in the new system
    assert bed.read("revert-seen") == "due\n", first.stderr
    assert bed.read("old-ran") == ""
    state = bed.state()
    assert state.state == bootstate.PROBATION and state.boots_left == 0
    report = bed.report()
    assert report["booted"] == "new" and report["probation"] is True

    # Nobody kept it: the next boot is the old system's, with the kernel's arguments.
    (bed.disk / "new-ran").unlink()
    second = bed.boot("single")
    assert second.returncode == 0, second.stderr
    assert bed.read("old-ran").startswith("old system: pid 1 args single")
    assert bed.read("new-ran") == ""
    assert bed.state().state == bootstate.REVERTED
    assert "not kept in time" in bed.state().reason
    assert bed.report()["booted"] == "old"


def test_a_kept_probation_boot_is_written_to_the_disk_and_boots_again(bed: Bed) -> None:
    # The user's `touch /run/dboot/keep`, then the new system waits for its keeper to
    # have written "kept" through /sysroot (up to 25 s on a busy machine), with a deadline
    # long enough not to revert first.
    keep = (
        "mkdir -p /run/dboot; touch /run/dboot/keep\n"
        "for i in $(seq 250); do grep -q kept /sysroot/dboot/state.json && break; sleep 0.1; done"
    )
    bed.install(new_init_action=keep, revert_after_seconds=30.0)
    first = bed.boot()
    assert first.returncode == 0, first.stderr
    state = bed.state()
    assert state.state == bootstate.KEPT, first.stderr
    assert state.history[-1].endswith("kept")
    (bed.disk / "new-ran").unlink()
    second = bed.boot()
    assert second.returncode == 0, second.stderr
    assert "pid 1" in bed.read("new-ran") and bed.read("old-ran") == ""


def test_kept_boots_the_tree_without_a_deadline(bed: Bed) -> None:
    # Longer than the 3 s a probation would have had: no keeper, no revert marker.
    bed.install(
        state=bootstate.KEPT,
        boots_left=0,
        new_init_action="sleep 5; ls -a /run/dboot > /sysroot/run-dboot 2>&1; exit 0",
    )
    result = bed.boot()
    assert result.returncode == 0, result.stderr
    assert "pid 1" in bed.read("new-ran")
    assert "No such file" in bed.read("run-dboot"), bed.read("run-dboot")
    assert "keeper" not in result.stderr
    assert bed.state().state == bootstate.KEPT


def test_the_boot_report_gets_what_the_system_came_up_with(bed: Bed) -> None:
    # The kernel command line's DBOOT_REPORT_SETTLE=0 (PID 1's environment): a shell init has
    # no "up" of its own, so the reporter reads the addresses at once. The init waits for it.
    wait = "for i in $(seq 100); do grep -q up_after /sysroot/dboot/last-boot.json && break;"
    wait += " sleep 0.1; done"
    bed.install(state=bootstate.KEPT, boots_left=0, new_init_action=wait)
    result = bed.boot(env={"DBOOT_REPORT_SETTLE": "0"})
    assert result.returncode == 0, result.stderr
    report = bed.report()
    assert report["booted"] == "new" and report["tree"] == TREE, report
    up = report["up"]
    assert isinstance(up, dict), report
    assert up["state"] == "not systemd" and up["failed_units"] is None, up
    # The sandbox shares this machine's network namespace: its global addresses, by name.
    host = subprocess.run(["ip", "-o", "addr", "show", "scope", "global"], capture_output=True,
                          text=True, check=True).stdout.split("\n")  # fmt: skip
    expected = [f"{line.split()[1]} {line.split()[3]}" for line in host if line.split()]
    assert sorted(up["addresses"]) == sorted(expected), (up, host)
    assert "boot report: not systemd after 0 s; addresses: " in result.stderr, result.stderr


def test_a_tree_without_its_init_boots_the_old_system_at_once(bed: Bed) -> None:
    bed.install()
    (bed.disk / TREE.lstrip("/") / "init").unlink()
    result = bed.boot()
    assert result.returncode == 0, result.stderr
    assert bed.read("old-ran").startswith("old system: pid 1")
    state = bed.state()
    assert state.state == bootstate.REVERTED and "/init is missing" in state.reason


@pytest.mark.parametrize("damage", ["garbage", "missing", "world-writable"])
def test_an_unusable_state_boots_the_old_system(bed: Bed, damage: str) -> None:
    bed.install()
    path = bed.disk / bootstate.STATE_FILE.lstrip("/")
    if damage == "garbage":
        path.write_text("{")
    elif damage == "missing":
        path.unlink()
    else:
        path.chmod(0o666)
    result = bed.boot()
    assert result.returncode == 0, result.stderr
    assert bed.read("old-ran").startswith("old system: pid 1"), result.stderr
    assert bed.read("new-ran") == ""


def test_a_shim_that_cannot_be_imported_still_boots_the_old_system(bed: Bed) -> None:
    bed.install()
    shutil.rmtree(bed.disk / bootstate.SHIM_DIR.lstrip("/") / "initstage")
    result = bed.boot()
    assert result.returncode == 0, result.stderr
    assert "no boot shim" in result.stderr
    assert bed.read("old-ran").startswith("old system: pid 1")


# --- `dboot install` killed at each of its steps --------------------------------------------


def image_archive(path: Path) -> Path:
    """A rootfs tarball whose /init is NEW_INIT (exit 0), with the mount points it needs."""
    staging = path.parent / "image-tree"
    make_root(staging)
    (staging / "init").write_text(NEW_INIT.format(action="exit 0"))
    (staging / "init").chmod(0o755)
    with tarfile.open(path, "w") as archive:
        archive.add(staging, arcname=".")
    return path


def run_driver(disk: Path, archive: Path, pause: str = "", tmp: Path | None = None) -> None:
    """The install's disk part; with ``pause``, SIGKILLed at that pause point."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    announce = (tmp or disk.parent) / f"paused-{pause}"
    if pause:
        env[testhooks.PAUSE_ENV] = f"{pause}:{announce}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "tests.sandbox.install_driver", str(disk), str(archive)],
        env=env,
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if not pause:
        out, err = driver.communicate(timeout=120)
        assert driver.returncode == 0, out + err
        return
    deadline = time.monotonic() + 120
    while not announce.exists():
        assert driver.poll() is None, driver.communicate()
        assert time.monotonic() < deadline, f"{pause} never reached"
        time.sleep(0.02)
    driver.kill()  # by its own pid: the process this test started
    driver.communicate(timeout=30)


def old_disk(bed: Bed) -> None:
    """The disk as the old system leaves it: /sbin a real directory whose init is a link."""
    (bed.disk / "sbin").mkdir(parents=True)
    make_root(bed.disk)
    (bed.disk / "old-init").write_text(OLD_INIT)
    (bed.disk / "old-init").chmod(0o755)
    (bed.disk / "sbin" / "init").symlink_to("/old-init")


@pytest.mark.parametrize(
    "phase", [p for p in testhooks.INSTALL_PHASES if p != "install-shim-aside"]
)
def test_install_killed_at_each_step_boots_a_working_system(
    bed: Bed, tmp_path: Path, phase: str
) -> None:
    old_disk(bed)
    archive = image_archive(tmp_path / "image.tar")
    run_driver(bed.disk, archive, phase, tmp_path)
    committed = phase == "install-committed"
    boot = bed.boot(entry="/sbin/init")
    assert boot.returncode == 0, boot.stderr
    if committed:
        assert "pid 1" in bed.read("new-ran"), boot.stderr
        assert bed.read("old-ran") == ""
    else:
        assert bed.read("old-ran").startswith("old system: pid 1"), boot.stderr
        assert bed.read("new-ran") == ""
    # A retry needs no cleaning up by hand, and ends with the new system on probation.
    for marker in ("old-ran", "new-ran"):
        (bed.disk / marker).unlink(missing_ok=True)
    if not committed:
        run_driver(bed.disk, archive)
        assert not list((bed.disk / "dboot" / "trees").glob(".partial-*"))
        boot = bed.boot(entry="/sbin/init")
        assert "pid 1" in bed.read("new-ran"), boot.stderr
        assert bed.state().boots_left == 0


def installed_once(bed: Bed, tmp_path: Path) -> Path:
    """The old system's disk with the image installed on it; returns the image's archive."""
    old_disk(bed)
    archive = image_archive(tmp_path / "image.tar")
    run_driver(bed.disk, archive)
    return archive


def test_a_reinstall_killed_between_the_shim_renames_boots_the_old_system(
    bed: Bed, tmp_path: Path
) -> None:
    archive = installed_once(bed, tmp_path)
    # Reverted on purpose, as `dboot install --revert` does it, then installed again.
    state = bed.state()
    deploy.uncommit(deploy.Disk(str(bed.disk)), state)
    state.state = bootstate.REVERTED
    bootstate.write_state(state, str(bed.disk / bootstate.STATE_FILE.lstrip("/")))
    run_driver(bed.disk, archive, "install-shim-aside", tmp_path)
    boot = bed.boot(entry="/sbin/init")
    assert bed.read("old-ran").startswith("old system: pid 1"), boot.stderr
    (bed.disk / "old-ran").unlink()
    run_driver(bed.disk, archive)
    boot = bed.boot(entry="/sbin/init")
    assert "pid 1" in bed.read("new-ran"), boot.stderr


def test_a_reinstall_after_a_first_boot_nobody_kept_needs_no_revert_first(
    bed: Bed, tmp_path: Path
) -> None:
    # The first boot on probation is spent and not kept: the next boot is the old system's,
    # while the init path still runs the shim. An install again must just work.
    archive = installed_once(bed, tmp_path)
    bed.boot(entry="/sbin/init")
    assert "pid 1" in bed.read("new-ran")
    bed.boot(entry="/sbin/init")
    assert bed.read("old-ran").startswith("old system: pid 1")
    assert bed.state().state == bootstate.REVERTED
    assert os.readlink(bed.disk / "sbin/init") != "/old-init"  # still the shim
    for marker in ("old-ran", "new-ran"):
        (bed.disk / marker).unlink()
    run_driver(bed.disk, archive)
    state = bed.state()
    assert state.state == bootstate.PROBATION and state.old_init == "/old-init", state
    boot = bed.boot(entry="/sbin/init")
    assert "pid 1" in bed.read("new-ran") and bed.read("old-ran") == "", boot.stderr
    # And the way back still leads to the old init.
    deploy.uncommit(deploy.Disk(str(bed.disk)), bed.state())
    assert os.readlink(bed.disk / "sbin/init") == "/old-init"
