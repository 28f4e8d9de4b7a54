"""The access facts on crafted trees: addresses with their lifetimes, routes, the DNS
servers behind a local stub, the SSH session (ours or an ancestor's environment), host key
fingerprints as ssh-keygen prints them, authorized_keys counted but never shown, and the
image's init. A minimal host (nothing there at all) gives empty facts, never an error."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from injector.access import facts
from injector.image.imageindex import ImageIndex, IndexEntry

LINKS = [
    {"ifname": "lo", "address": "00:00:00:00:00:00", "operstate": "UNKNOWN", "addr_info": [
        {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host",
         "valid_life_time": 4294967295, "preferred_life_time": 4294967295},
    ]},
    {"ifname": "eth0", "address": "52:54:00:12:34:56", "operstate": "UP", "addr_info": [
        {"family": "inet", "local": "10.0.2.15", "prefixlen": 24, "scope": "global",
         "dynamic": True, "valid_life_time": 86190, "preferred_life_time": 86190},
        {"family": "inet", "local": "192.0.2.7", "prefixlen": 24, "scope": "global",
         "valid_life_time": 4294967295, "preferred_life_time": 4294967295},
        {"family": "inet6", "local": "2001:db8::5", "prefixlen": 64, "scope": "global",
         "dynamic": True, "valid_life_time": 2591990, "preferred_life_time": 604790},
    ]},
]  # fmt: skip
ROUTES4 = [
    {"dst": "default", "gateway": "172.31.1.1", "dev": "eth0", "flags": ["onlink"],
     "protocol": "dhcp"},
    {"dst": "10.0.2.0/24", "dev": "eth0", "protocol": "kernel", "flags": []},
    {"type": "broadcast", "dst": "10.0.2.255", "dev": "eth0", "flags": []},
]  # fmt: skip
ROUTES6 = [{"dst": "default", "gateway": "fe80::1", "dev": "eth0", "flags": [], "protocol": "ra"}]


def test_addresses_are_static_or_dynamic_with_their_lifetime(tmp_path: Path) -> None:
    (tmp_path / "eth0" / "device").mkdir(parents=True)
    (tmp_path / "eth0" / "device" / "driver").symlink_to("../../../bus/pci/drivers/virtio_net")
    lo, eth0 = facts.parse_addresses(LINKS, tmp_path)
    assert (lo.name, lo.driver, eth0.driver, eth0.mac) == (
        "lo",
        "",
        "virtio_net",
        LINKS[1]["address"],
    )
    dhcp, static, slaac = eth0.addresses
    assert (dhcp.address, dhcp.dynamic, dhcp.valid_seconds) == ("10.0.2.15/24", True, 86190)
    assert (static.dynamic, static.valid_seconds, static.preferred_seconds) == (False, None, None)
    assert (slaac.family, slaac.valid_seconds, slaac.preferred_seconds) == (
        "inet6",
        2591990,
        604790,
    )


def test_routes_keep_default_on_link_and_ipv6_gateways() -> None:
    routes = facts.parse_routes(ROUTES4, "inet") + facts.parse_routes(ROUTES6, "inet6")
    assert [(r.family, r.destination, r.gateway, r.onlink) for r in routes] == [
        ("inet", "default", "172.31.1.1", True),
        ("inet", "10.0.2.0/24", "", False),
        ("inet6", "default", "fe80::1", False),
    ]  # the broadcast route is the kernel's own, not configuration


RESOLVED_UPSTREAM = "# resolved\nnameserver 192.0.2.53\nnameserver 2001:db8::53\n"


@pytest.mark.parametrize(
    ("resolv_conf", "state_files", "servers", "stub", "source"),
    [
        ("nameserver 198.51.100.1\n", {}, ["198.51.100.1"], "", "/etc/resolv.conf"),
        (
            "nameserver 127.0.0.53\noptions edns0\n",
            {"run/systemd/resolve/resolv.conf": RESOLVED_UPSTREAM},
            ["192.0.2.53", "2001:db8::53"],
            "127.0.0.53",
            "/run/systemd/resolve/resolv.conf",
        ),
        (  # NetworkManager's dnsmasq on Debian/Ubuntu desktops
            "nameserver 127.0.1.1\n",
            {"run/NetworkManager/no-stub-resolv.conf": "nameserver 203.0.113.3\n"},
            ["203.0.113.3"],
            "127.0.1.1",
            "/run/NetworkManager/no-stub-resolv.conf",
        ),
        (  # a local cache first, a real server after it
            "nameserver 127.0.0.1\nnameserver 203.0.113.9\n",
            {},
            ["203.0.113.9"],
            "127.0.0.1",
            "/etc/resolv.conf",
        ),
    ],
)
def test_dns_servers_behind_a_local_resolver(
    tmp_path: Path,
    resolv_conf: str,
    state_files: dict[str, str],
    servers: list[str],
    stub: str,
    source: str,
) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").write_text(resolv_conf)
    for name, text in state_files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    dns = facts.dns_facts(tmp_path)
    assert (dns.servers, dns.local_stub, dns.state) == (servers, stub, "ok")
    assert dns.source.endswith(source)


def test_a_local_resolver_without_upstreams_says_so(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/resolv.conf").write_text("nameserver 127.0.0.53\n")
    dns = facts.dns_facts(tmp_path)
    assert dns.servers == [] and dns.local_stub == "127.0.0.53"
    assert "points at the local resolver 127.0.0.53" in dns.state
    notices = facts.verdicts(empty_facts(dns=dns), remote=False, image_has_ssh=False)
    assert [n.code for n in notices] == ["dns-no-upstream"]


def crafted_proc(tmp_path: Path, chain: list[tuple[int, int, str, str]]) -> Path:
    proc = tmp_path / "proc"
    for pid, ppid, comm, environ in chain:
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 0 0 0 0\n")
        (proc / str(pid) / "environ").write_text(
            "".join(f"{pair}\0" for pair in environ.split("|") if pair)
        )
    return proc


def test_the_session_survives_sudo_through_an_ancestor(tmp_path: Path) -> None:
    """sudo reset our environment; the shell that ran sudo still has SSH_CONNECTION."""
    proc = crafted_proc(
        tmp_path,
        [
            (40, 30, "dboot", "SUDO_USER=ann"),
            (30, 20, "sudo", "SSH_CONNECTION=198.51.100.20 50122 192.0.2.7 22"),
            (20, 1, "bash", ""),
        ],
    )
    interfaces = facts.parse_addresses(LINKS, tmp_path)
    report = facts.gather(
        None, [], host_root=tmp_path, environ={}, our_pid=40, proc=proc,
        network=(interfaces, [], "ok"),
    )  # fmt: skip
    assert report.session == facts.SshSession(
        "198.51.100.20", 50122, "192.0.2.7", 22, "eth0", "the environment of pid 30 (sudo)"
    )


def test_our_own_environment_comes_first(tmp_path: Path) -> None:
    environ = {"SSH_CONNECTION": "2001:db8::9 41000 2001:db8::5 2222"}
    interfaces = facts.parse_addresses(LINKS, tmp_path)
    found = facts.ssh_connection(environ, 1, tmp_path)
    assert found is not None
    session = facts.parse_ssh_connection(*found, interfaces)
    assert session is not None
    assert (session.client, session.local_port, session.interface) == ("2001:db8::9", 2222, "eth0")


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (openssh-client)")
def test_host_key_fingerprints_are_ssh_keygens(tmp_path: Path) -> None:
    etc_ssh = tmp_path / "etc/ssh"
    etc_ssh.mkdir(parents=True)
    key = etc_ssh / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (etc_ssh / "ssh_host_rsa_key.pub").write_text("ssh-rsa !!notbase64 root@x\n")
    expected = subprocess.run(
        ["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    keys = facts.read_host_keys(etc_ssh)
    assert [(k.type, k.fingerprint) for k in keys] == [
        ("ssh-ed25519", expected),
        ("ssh-rsa", "unreadable key"),
    ]
    assert keys[0].path == str(key)


ANN_KEYS = (
    "# ann's keys\n"
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGFubnNrZXlhbm5za2V5YW5uc2tleWFubnNrZXk ann@laptop\n"
    'from="10.0.0.0/8",no-pty ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTY= backup\n'
    "\n"
)


def test_authorized_keys_are_counted_never_shown(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/bash\nann:x:1000:1000::/home/ann:/bin/bash\n"
    )
    (tmp_path / "home/ann/.ssh").mkdir(parents=True)
    (tmp_path / "home/ann/.ssh/authorized_keys").write_text(ANN_KEYS)
    report = facts.gather(
        None, [], host_root=tmp_path, environ={"SUDO_USER": "ann"}, our_pid=1,
        proc=tmp_path / "noproc", network=([], [], "ok"),
    )  # fmt: skip
    root, ann = report.authorized_keys
    assert (root.user, root.count) == ("root", 0)
    assert (ann.path, ann.count) == ("/home/ann/.ssh/authorized_keys", 2)
    assert ann.types == ["ecdsa-sha2-nistp256", "ssh-ed25519"]
    assert ann.comments == ["ann@laptop", "backup"]
    assert "AAAAC3Nza" not in json.dumps(dataclasses.asdict(report))


def index_of(paths: dict[str, str]) -> ImageIndex:
    """``paths``: path -> "x" (executable) or "-> target"."""
    entries = []
    for number, (path, kind) in enumerate(paths.items(), start=1):
        if kind.startswith("-> "):
            entries.append(IndexEntry(path, "symlink", 0o777, 0, 0, 0, 0, kind[3:], number))
        else:
            entries.append(IndexEntry(path, "file", 0o755, 0, 0, 10, 0, None, number))
    dirs = {str(Path(p).parent) for p in paths} | {"/usr", "/usr/lib", "/usr/lib/systemd"}
    entries += [IndexEntry(d, "dir", 0o755, 0, 0, 0, 0) for d in sorted(dirs) if d != "/"]
    return ImageIndex(entries)


@pytest.mark.parametrize(
    ("paths", "init", "kind", "starts"),
    [
        ({"/sbin/init": "-> /lib/systemd/systemd", "/lib": "-> usr/lib",
          "/usr/lib/systemd/systemd": "x"}, "/sbin/init", "systemd", True),
        ({"/bin/busybox": "x", "/sbin/init": "-> /bin/busybox"}, "/sbin/init", "busybox init",
         False),
        ({"/bin/busybox": "x", "/bin/sh": "-> busybox"}, "/bin/sh", "shell", False),
        ({"/bin/bash": "x"}, "/bin/bash", "shell", False),
        ({"/sbin/init": "x", "/etc/inittab": "x"}, "/sbin/init", "sysvinit", True),
        ({"/sbin/openrc-init": "x"}, "/sbin/openrc-init", "openrc", True),
        ({"/sbin/runit-init": "x"}, "/sbin/runit-init", "runit", True),
        ({"/opt/start": "x"}, "/opt/start", "unknown", False),
    ],
)  # fmt: skip
def test_the_images_init(paths: dict[str, str], init: str, kind: str, starts: bool) -> None:
    found = facts.image_init(index_of(paths), [init])
    assert found is not None
    assert (found.kind, found.starts_services) == (kind, starts)


def empty_facts(**changes: object) -> facts.AccessFacts:
    keys = [facts.AuthorizedKeys("root", "/root/.ssh/authorized_keys", 1, ["ssh-ed25519"], [])]
    dns = facts.DnsFacts(["192.0.2.53"], "", "", "ok")
    base = facts.AccessFacts([], [], dns, None, [], keys, None)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_remote_session_into_an_init_that_starts_nothing_warns() -> None:
    shell = facts.ImageInit("/bin/sh", "/bin/busybox", "busybox init", False)
    notices = facts.verdicts(empty_facts(image_init=shell), remote=True, image_has_ssh=True)
    assert [(n.level, n.code) for n in notices] == [("warning", "remote-init-starts-no-sshd")]
    assert facts.verdicts(empty_facts(image_init=shell), remote=False, image_has_ssh=True) == []


def test_no_carry_in_a_remote_session_warns() -> None:
    assert [n.code for n in facts.carry_verdicts(remote=True, carry=False)] == ["remote-no-carry"]
    assert facts.carry_verdicts(remote=True, carry=True) == []
    assert facts.carry_verdicts(remote=False, carry=False) == []


def test_a_minimal_host_gives_empty_facts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ip command, no /etc at all, no /proc to walk: facts, never an exception."""
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    report = facts.gather(None, [], host_root=tmp_path, environ={}, our_pid=1, proc=tmp_path)
    assert report.network_state.startswith("unknown: no ip command")
    assert (report.interfaces, report.routes, report.host_keys, report.session) == (
        [],
        [],
        [],
        None,
    )
    assert report.dns.state.startswith("no readable /etc/resolv.conf")
    assert [keys.user for keys in report.authorized_keys] == []


def test_a_local_cache_before_real_servers_is_dropped_search_and_options_stay() -> None:
    content = b"search lan\nnameserver 127.0.0.1\nnameserver 203.0.113.9\noptions rotate\n"
    chosen, dns = facts.choose_resolv_conf(content, [])
    assert chosen == b"search lan\nnameserver 203.0.113.9\noptions rotate\n"
    assert (dns.servers, dns.local_stub) == (["203.0.113.9"], "127.0.0.1")


def test_a_remote_session_with_no_keys_for_root_warns() -> None:
    none = [facts.AuthorizedKeys("root", "/root/.ssh/authorized_keys", 0, [], [])]
    notices = facts.verdicts(empty_facts(authorized_keys=none), remote=True, image_has_ssh=True)
    assert [(n.level, n.code) for n in notices] == [("warning", "remote-no-keys")]
    ann = facts.AuthorizedKeys("ann", "/home/ann/.ssh/authorized_keys", 2, ["ssh-ed25519"], [])
    notices = facts.verdicts(empty_facts(authorized_keys=[*none, ann]), remote=True,
                             image_has_ssh=True)  # fmt: skip
    assert "ann's 2 keys go in only if the image has the user ann" in notices[0].message
    some = [dataclasses.replace(none[0], count=1)]
    assert facts.verdicts(empty_facts(authorized_keys=some), remote=True, image_has_ssh=True) == []


SOCKET_SESSION_PROBE = """
import json, os, socket, sys
sys.path.insert(0, sys.argv[1])
from injector.access import facts
server = socket.create_server(("127.0.0.1", 0))
client = socket.create_connection(server.getsockname())
accepted, _ = server.accept()
session = facts.session_from_sockets([os.getpid()], [])
print(json.dumps(None if session is None else [session.client, session.local_address]))
"""


@pytest.mark.parametrize("python", ["venv", "debian"])
def test_the_session_is_found_by_its_socket_with_either_psutil(python: str) -> None:
    """The fallback reads an established TCP socket of a process in the session chain, through
    psutil: 6 and later call it net_connections(), Debian 12's python3-psutil (5.9.4)
    connections(). A loopback connection of the probe's own stands in for sshd's."""
    interpreter = sys.executable if python == "venv" else "/usr/bin/python3"
    if not Path(interpreter).exists():
        pytest.fail(
            f"{interpreter} is missing: scripts/setup.sh installs python3 and python3-psutil"
        )
    repo = str(Path(__file__).resolve().parents[2])
    probe = subprocess.run(
        [interpreter, "-c", SOCKET_SESSION_PROBE, repo],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    assert json.loads(probe.stdout) == ["127.0.0.1", "127.0.0.1"]
