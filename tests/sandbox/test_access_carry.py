"""Carry-over into a real RAM root (a tmpfs, as a switch mounts it) from a crafted host tree:
the host keys with their modes, authorized_keys merged into the image's, $SUDO_USER's only
when the image has that user, every file named, and nothing written through a symlink of
the image. The host's own /etc/ssh and authorized_keys are never read here."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from injector.access.carry import carry_network, carry_ssh
from injector.access.facts import Address, Interface, Route, fingerprint, parse_public_key
from injector.ramroot.rootfs import RamRoot

pytestmark = pytest.mark.root

HOST_ROOT_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJvb3Rrb290cm9vdHJvb3Ryb290cm9vdHJvb3Q admin@desk"
)
HOST_ANN_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFubmFubmFubmFubmFubmFubmFubmFubmFubmFubmE ann@laptop"
)
IMAGE_KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDimage image@builder"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host tree: two host keys, root's and ann's authorized_keys (root's holds the image's
    key too, which must not be added twice)."""
    root = tmp_path / "host"
    (root / "etc/ssh").mkdir(parents=True)
    for kind in ("ed25519", "ecdsa"):
        key = root / f"etc/ssh/ssh_host_{kind}_key"
        subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(key)], check=True)
    (root / "etc/ssh/sshd_config").write_text("# not a key: stays the image's\n")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nann:x:1000:1000::/home/ann:/bin/bash\n"
    )
    (root / "root/.ssh").mkdir(parents=True)
    (root / "root/.ssh/authorized_keys").write_text(f"{HOST_ROOT_KEY}\n{IMAGE_KEY}\n")
    (root / "home/ann/.ssh").mkdir(parents=True)
    (root / "home/ann/.ssh/authorized_keys").write_text(f"# ann\n{HOST_ANN_KEY}\n")
    return root


@pytest.fixture
def ram_root(tmp_path: Path) -> Iterator[Path]:
    with RamRoot(tmp_path / "state", 16 << 20) as ram:
        yield ram.path


def make_image(root: Path, passwd: str) -> None:
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/passwd").write_text(passwd)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("the image's own key\n")
    (root / "root/.ssh").mkdir(parents=True, mode=0o755)
    (root / "root/.ssh").chmod(0o775)  # too loose for sshd's StrictModes
    (root / "root/.ssh/authorized_keys").write_text(IMAGE_KEY)  # no final newline


IMAGE_PASSWD = "root:x:0:0:root:/root:/bin/sh\nann:x:1001:1002::/home/ann:/bin/sh\n"


def test_keys_and_authorized_keys_go_in_with_their_modes(host: Path, ram_root: Path) -> None:
    make_image(ram_root, IMAGE_PASSWD)
    lines = carry_ssh(ram_root, host_root=host, environ={"SUDO_USER": "ann"})
    assert lines == [
        "host key /etc/ssh/ssh_host_ecdsa_key",
        "host key /etc/ssh/ssh_host_ecdsa_key.pub",
        "host key /etc/ssh/ssh_host_ed25519_key (replaced the image's own)",
        "host key /etc/ssh/ssh_host_ed25519_key.pub",
        "/root/.ssh/authorized_keys (merged: 1 keys of the host's root added to the image's own)",
        "/home/ann/.ssh/authorized_keys (1 keys of the host's ann)",
    ]
    ssh = ram_root / "etc/ssh"
    for kind in ("ed25519", "ecdsa"):
        private, public = ssh / f"ssh_host_{kind}_key", ssh / f"ssh_host_{kind}_key.pub"
        assert private.read_bytes() == (host / f"etc/ssh/ssh_host_{kind}_key").read_bytes()
        assert (mode(private), mode(public)) == (0o600, 0o644)
        assert os.lstat(private).st_uid == 0
    # The host's fingerprint is what a client will see (StrictHostKeyChecking=yes passes).
    blob = parse_public_key((ssh / "ssh_host_ed25519_key.pub").read_text())
    host_blob = parse_public_key((host / "etc/ssh/ssh_host_ed25519_key.pub").read_text())
    assert blob is not None and host_blob is not None
    assert fingerprint(blob[1]) == fingerprint(host_blob[1])
    assert not (ssh / "sshd_config").exists()

    root_keys = ram_root / "root/.ssh/authorized_keys"
    assert root_keys.read_text() == f"{IMAGE_KEY}\n{HOST_ROOT_KEY}\n"  # no duplicate
    assert (mode(root_keys.parent), mode(root_keys)) == (0o700, 0o600)
    ann_keys = ram_root / "home/ann/.ssh/authorized_keys"
    assert ann_keys.read_text() == HOST_ANN_KEY + "\n"
    assert (mode(ann_keys.parent), mode(ann_keys)) == (0o700, 0o600)
    # The image's ids for ann, not the host's 1000.
    for path in (ann_keys, ann_keys.parent, ann_keys.parent.parent):
        assert (os.lstat(path).st_uid, os.lstat(path).st_gid) == (1001, 1002)
    assert not list(ram_root.rglob(".*.dboot"))  # no temporary left behind


def test_a_user_the_image_lacks_gets_nothing(host: Path, ram_root: Path) -> None:
    (ram_root / "etc").mkdir()
    (ram_root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    lines = carry_ssh(ram_root, host_root=host, environ={"SUDO_USER": "ann"})
    assert "authorized_keys of ann left out: the image has no user ann" in lines
    assert "/root/.ssh/authorized_keys (2 keys of the host's root)" in lines
    assert not (ram_root / "home").exists()
    assert mode(ram_root / "root") == 0o700


def test_symlinks_of_the_image_are_never_followed(
    host: Path, ram_root: Path, tmp_path: Path
) -> None:
    """An image whose /root and /etc/ssh point at absolute paths: on the host, those would
    be the host's own directories."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (ram_root / "etc").mkdir()
    (ram_root / "etc/passwd").write_text(IMAGE_PASSWD)
    (ram_root / "etc/ssh").symlink_to(victim)
    (ram_root / "root").symlink_to(victim)
    lines = carry_ssh(ram_root, host_root=host, environ={})
    assert os.listdir(victim) == []
    assert lines[0].startswith("host keys left out: the image's /etc/ssh is unusable")
    assert lines[1].startswith("authorized_keys of root left out: its home in the image")


def test_a_host_without_ssh_carries_nothing_and_says_so(tmp_path: Path, ram_root: Path) -> None:
    (tmp_path / "bare/etc").mkdir(parents=True)
    lines = carry_ssh(ram_root, host_root=tmp_path / "bare", environ={"SUDO_USER": "ann"})
    assert lines == ["no host keys carried over: the host has no readable /etc/ssh"]
    assert os.listdir(ram_root) == []


# A --target-pid switch carries over what its target's mount namespace shows as the host's
# /etc/ssh and root's home: crafted ones, bound over the real ones in a mount namespace of ours that
# the sandbox (and so the switch's worker) inherits. Prints the events and the new root's files.
TARGET_RUN = """
import json, os, subprocess, sys, time
from injector.rehearsal.sandbox import Sandbox
dboot, = sys.argv[1:]
with Sandbox(services=1, console="capture") as sandbox:
    done = subprocess.run(
        [dboot, "switch", "--json", "--yes", "--grace", "1", "--target-pid", str(sandbox.pid),
         "tinybox", "/bin/sh", "-c", "exec sleep 60"],
        capture_output=True, text=True, timeout=120,
    )
    root = f"/proc/{sandbox.pid}/root"
    for _ in range(100):  # the stage pivots, then execs the init
        if os.readlink(f"/proc/{sandbox.pid}/exe") == "/bin/busybox":
            break
        time.sleep(0.1)
    files = {}
    for name in ("etc/ssh/ssh_host_ed25519_key", "root/.ssh/authorized_keys"):
        path = os.path.join(root, name)
        info = os.lstat(path)
        files[name] = [open(path).read(), oct(info.st_mode & 0o777)]
    print(json.dumps({"returncode": done.returncode, "stderr": done.stderr,
                      "events": done.stdout, "files": files}))
"""


@pytest.mark.engine
def test_a_target_pid_switch_carries_the_keys_in(host: Path, tmp_path: Path) -> None:
    # Not /root itself (this venv's interpreter may live there): a passwd naming another home.
    (host / "etc/passwd").write_text(f"root:x:0:0:root:{host}/root:/bin/sh\n")
    script = 'for f in ssh passwd; do mount --bind "$0/etc/$f" "/etc/$f"; done && exec "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(host),
         sys.executable, "-c", TARGET_RUN, str(Path(sys.executable).with_name("dboot"))],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1"},
        cwd=Path(__file__).parents[2],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout.splitlines()[-1])
    assert outcome["returncode"] == 0, outcome["stderr"]
    logs = [
        event["text"]
        for line in outcome["events"].splitlines()
        if (event := json.loads(line))["event"] == "log"
    ]
    assert "carry-over: host key /etc/ssh/ssh_host_ed25519_key" in logs
    assert "carry-over: /root/.ssh/authorized_keys (2 keys of the host's root)" in logs
    # tinybox has no network manager: nothing written, and the log says why.
    assert any(line.startswith("carry-over: no network configuration written") for line in logs)
    key, key_mode = outcome["files"]["etc/ssh/ssh_host_ed25519_key"]
    assert key == (host / "etc/ssh/ssh_host_ed25519_key").read_text() and key_mode == "0o600"
    keys, keys_mode = outcome["files"]["root/.ssh/authorized_keys"]
    assert keys == f"{HOST_ROOT_KEY}\n{IMAGE_KEY}\n" and keys_mode == "0o600"


def network() -> tuple[list[Interface], list[Route]]:
    leased = Address("10.0.2.15/24", "inet", "global", True, 86190, 86190)
    static = Address("192.0.2.7/24", "inet", "global", False, None, None)
    slaac = Address("2001:db8::5/64", "inet6", "global", True, 2591990, 604790)
    link_local = Address("fe80::1/64", "inet6", "link", False, None, None)
    eth0 = Interface("eth0", "52:54:00:12:34:56", "virtio_net", "UP", [leased, static, slaac])
    eth1 = Interface("eth1", "52:54:00:ab:cd:ef", "e1000", "UP", [static, link_local])
    lo = Interface("lo", "00:00:00:00:00:00", "", "UNKNOWN", [])
    routes = [
        Route("inet", "default", "10.0.2.2", "eth0", False, "dhcp"),  # comes back with DHCP
        Route("inet", "default", "172.31.1.1", "eth1", True, "static"),
        Route("inet", "198.51.100.0/24", "192.0.2.1", "eth1", False, "boot"),
        Route("inet6", "default", "fe80::1", "eth0", False, "ra"),
    ]
    return [lo, eth0, eth1], routes


NETWORKD_ETH1 = """\
# Written by dboot: eth1 as it was before the switch.
[Match]
MACAddress=52:54:00:ab:cd:ef

[Network]
KeepConfiguration=static
DHCP=no
IPv6AcceptRA=no
Address=192.0.2.7/24

[Route]
Gateway=172.31.1.1
GatewayOnLink=yes

[Route]
Gateway=192.0.2.1
Destination=198.51.100.0/24
"""


def test_networkd_files_matched_by_mac(ram_root: Path) -> None:
    wants = ram_root / "etc/systemd/system/multi-user.target.wants"
    wants.mkdir(parents=True)
    (wants / "systemd-networkd.service").symlink_to("/lib/systemd/system/systemd-networkd.service")
    (ram_root / "etc/systemd/network").mkdir()
    (ram_root / "etc/systemd/network/10-dboot-eth1.network").write_text("old\n")
    lines = carry_network(ram_root, *network())
    assert lines == [
        "networkd configuration /etc/systemd/network/10-dboot-eth0.network",
        "networkd configuration /etc/systemd/network/10-dboot-eth1.network"
        " (replaced the image's own)",
    ]
    eth0 = (ram_root / "etc/systemd/network/10-dboot-eth0.network").read_text()
    assert "MACAddress=52:54:00:12:34:56\n" in eth0
    # Not yes or dhcp: networkd would make the lease it gets never expire.
    assert "KeepConfiguration=dhcp-on-stop\n" in eth0
    assert "DHCP=ipv4\nIPv6AcceptRA=yes\nAddress=192.0.2.7/24\n" in eth0
    assert "[DHCPv4]\nRequestAddress=10.0.2.15\n" in eth0
    assert "Gateway=" not in eth0  # both defaults of eth0 come back with DHCP and RAs
    eth1 = ram_root / "etc/systemd/network/10-dboot-eth1.network"
    assert eth1.read_text() == NETWORKD_ETH1
    assert mode(eth1) == 0o644


def test_ifupdown_stanzas_and_no_manager(ram_root: Path, tmp_path: Path) -> None:
    (ram_root / "sbin").mkdir()
    (ram_root / "sbin/ifup").write_text("")
    (ram_root / "etc/network").mkdir(parents=True)
    (ram_root / "etc/network/interfaces").write_text("source /etc/network/interfaces.d/*\n")
    lines = carry_network(ram_root, *network())
    assert lines == [
        "ifupdown configuration /etc/network/interfaces.d/dboot-eth0",
        "ifupdown configuration /etc/network/interfaces.d/dboot-eth1",
    ]
    assert (ram_root / "etc/network/interfaces.d/dboot-eth0").read_text().splitlines()[1:] == [
        "auto eth0",
        "iface eth0 inet dhcp",
        "iface eth0 inet6 auto",
    ]
    assert (ram_root / "etc/network/interfaces.d/dboot-eth1").read_text().splitlines()[1:] == [
        "auto eth1",
        "iface eth1 inet static",
        "    address 192.0.2.7/24",
        "    gateway 172.31.1.1",
    ]
    bare = tmp_path / "bare"
    bare.mkdir()
    assert carry_network(bare, *network())[0].startswith("no network configuration written")
    assert os.listdir(bare) == []


@pytest.mark.engine
def test_no_carry_carries_nothing_and_a_namespace_keeps_the_session() -> None:
    """--no-carry writes nothing; and over SSH, a --target-pid run into an image without
    sshd is not blocked: only the machine's own PID 1 takes the session with it."""
    from injector.rehearsal.sandbox import Sandbox

    with Sandbox(services=1, console="capture") as sandbox:
        result = subprocess.run(
            [str(Path(sys.executable).with_name("dboot")), "switch", "--json", "--yes",
             "--dry-run", "--no-carry", "--target-pid", str(sandbox.pid), "tinybox", "/bin/sh"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1",
                 "SSH_CONNECTION": "198.51.100.20 50122 192.0.2.77 22"},
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    facts = {(e["section"], e["key"]): e["value"] for e in events if e["event"] == "fact"}
    assert facts[("session", "remote")] is True
    codes = {e["code"] for e in events if e["event"] == "notice"}
    assert not codes & {"session-remote-no-ssh", "remote-no-carry", "session-remote-ends"}
    assert not [e for e in events if e["event"] == "log" and e["text"].startswith("carry-over")]
