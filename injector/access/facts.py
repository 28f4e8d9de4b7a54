"""How this machine is reached: its network, its DNS servers, the SSH session we run in, and
the SSH access the new system would offer. Read-only, and never fatal: a minimal host (no
``ip``, no /etc/ssh, no resolv.conf) gives empty facts and a word on why.

Addresses come from ``ip -j addr``, not psutil: psutil's ``net_if_addrs`` has neither an
address's lifetime nor the kernel's "dynamic" flag (IFA_F_PERMANENT unset), and those are
what tell an address a DHCP or SLAAC client keeps alive from one that stays by itself.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from initstage.plan import KEEP_FILE
from injector import labmode
from injector.events import Notice

# The kernel's "forever" lifetime (INFINITY_LIFE_TIME), as ``ip -j`` prints it.
FOREVER = 0xFFFFFFFF
IP_TIMEOUT = 5.0
# Local resolvers that die with the old userspace: systemd-resolved's stub (and its
# proxy-only twin), Debian's dnsmasq for NetworkManager, and anything else on 127.0.0.1.
LOCAL_RESOLVERS = ("127.0.0.53", "127.0.0.54", "127.0.1.1", "127.0.0.1", "::1")
# Where the local resolvers keep the servers they forward to, most specific first.
UPSTREAM_FILES = (
    "run/systemd/resolve/resolv.conf",
    "run/NetworkManager/no-stub-resolv.conf",
    "run/NetworkManager/resolv.conf",
)
KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-ssh-", "sk-ecdsa-")

# The image's init, by what its path resolves to inside the image: (name, starts services).
# busybox init only runs what /etc/inittab names and supervises nothing, so it counts as no
# service manager, like a shell.
INIT_KINDS: tuple[tuple[str, str, bool], ...] = (
    ("/systemd", "systemd", True),
    ("/openrc-init", "openrc", True),
    ("/runit-init", "runit", True),
    ("/runit", "runit", True),
    ("/s6-svscan", "s6", True),
    ("/s6-linux-init", "s6", True),
    ("/busybox", "busybox init", False),
    ("/dinit", "dinit", True),
)
SHELLS = frozenset({"sh", "bash", "ash", "dash", "zsh", "ksh", "mksh"})
NO_SERVICE_KINDS = frozenset({"shell", "busybox init"})


class ImageTree(Protocol):
    """What the facts need from ``injector.image.imageindex.ImageIndex``."""

    def lookup(self, path: str) -> Any: ...


@dataclasses.dataclass
class Address:
    """``valid_seconds`` / ``preferred_seconds``: lifetime left, None for forever."""

    address: str  # with its prefix: 192.0.2.10/24
    family: str  # inet, inet6
    scope: str
    dynamic: bool
    valid_seconds: int | None
    preferred_seconds: int | None


@dataclasses.dataclass
class Interface:
    name: str
    mac: str
    driver: str  # "" for virtual ones (lo, veth, bridges)
    state: str
    addresses: list[Address]


@dataclasses.dataclass
class Route:
    family: str
    destination: str  # "default" or a prefix
    gateway: str
    device: str
    onlink: bool
    protocol: str


@dataclasses.dataclass
class DnsFacts:
    """``servers``: the upstream ones a new system should use; ``local_stub`` the local
    resolver resolv.conf points at ("" when none); ``source``: the file they came from."""

    servers: list[str]
    local_stub: str
    source: str
    state: str  # "ok", or why no servers were found


@dataclasses.dataclass
class SshSession:
    """The SSH connection we run in. ``witness``: where it was learnt."""

    client: str
    client_port: int
    local_address: str
    local_port: int
    interface: str
    witness: str


@dataclasses.dataclass
class HostKey:
    path: str
    type: str
    fingerprint: str  # SHA256:..., as ssh-keygen -l prints it


@dataclasses.dataclass
class AuthorizedKeys:
    """Never the keys themselves: how many, of which types, with which comments."""

    user: str
    path: str
    count: int
    types: list[str]
    comments: list[str]


@dataclasses.dataclass
class ImageInit:
    path: str  # as given
    resolved: str  # what it leads to in the image
    kind: str  # systemd, sysvinit, openrc, runit, s6, busybox init, shell, unknown
    starts_services: bool


@dataclasses.dataclass
class AccessFacts:
    interfaces: list[Interface]
    routes: list[Route]
    dns: DnsFacts
    session: SshSession | None
    host_keys: list[HostKey]
    authorized_keys: list[AuthorizedKeys]
    image_init: ImageInit | None
    network_state: str = "ok"  # or why the interfaces/routes are missing


# --- The network ----------------------------------------------------------------------------


def run_ip(args: list[str]) -> Any:
    """``ip -j ARGS`` parsed; raises OSError (no ip, a failure) or ValueError (bad JSON)."""
    ip = shutil.which("ip") or next(
        (path for path in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.path.exists(path)),
        None,
    )
    if ip is None:
        raise FileNotFoundError("no ip command (iproute2)")
    try:
        done = subprocess.run(
            [ip, "-j", *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as error:
        raise OSError(f"ip {' '.join(args)} timed out") from error
    if done.returncode != 0:
        raise OSError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return json.loads(done.stdout or "[]")


def _lifetime(value: Any) -> int | None:
    return None if value is None or int(value) >= FOREVER else int(value)


def parse_addresses(links: list[dict[str, Any]], sys_class_net: Path) -> list[Interface]:
    interfaces = []
    for link in links:
        name = str(link.get("ifname", "?"))
        addresses = [
            Address(
                address=f"{info.get('local', '?')}/{info.get('prefixlen', '?')}",
                family=str(info.get("family", "")),
                scope=str(info.get("scope", "")),
                dynamic=bool(info.get("dynamic", False)),
                valid_seconds=_lifetime(info.get("valid_life_time")),
                preferred_seconds=_lifetime(info.get("preferred_life_time")),
            )
            for info in link.get("addr_info", [])
        ]
        interfaces.append(
            Interface(
                name=name,
                mac=str(link.get("address", "")),
                driver=interface_driver(name, sys_class_net),
                state=str(link.get("operstate", "")),
                addresses=addresses,
            )
        )
    return interfaces


def interface_driver(name: str, sys_class_net: Path = Path("/sys/class/net")) -> str:
    try:
        return os.path.basename(os.readlink(sys_class_net / name / "device" / "driver"))
    except OSError:
        return ""


def parse_routes(routes: list[dict[str, Any]], family: str) -> list[Route]:
    return [
        Route(
            family=family,
            destination=str(route.get("dst", "")),
            gateway=str(route.get("gateway", "")),
            device=str(route.get("dev", "")),
            onlink="onlink" in route.get("flags", []),
            protocol=str(route.get("protocol", "")),
        )
        for route in routes
        if route.get("type", "unicast") == "unicast"
    ]


def read_network(
    sys_class_net: Path = Path("/sys/class/net"),
) -> tuple[list[Interface], list[Route], str]:
    """(interfaces, routes of the main table, "ok" or why they are missing)."""
    try:
        interfaces = parse_addresses(run_ip(["addr"]), sys_class_net)
        routes = parse_routes(run_ip(["-4", "route"]), "inet")
        routes += parse_routes(run_ip(["-6", "route"]), "inet6")
    except (OSError, ValueError) as error:
        return [], [], f"unknown: {error}"
    return interfaces, routes, "ok"


# --- DNS ------------------------------------------------------------------------------------


def nameservers(text: str) -> list[str]:
    servers = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[0] == "nameserver":
            servers.append(fields[1])
    return servers


def is_local_resolver(server: str) -> bool:
    try:
        address = ipaddress.ip_address(server.split("%")[0])
    except ValueError:
        return False
    return server in LOCAL_RESOLVERS or address.is_loopback


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def choose_resolv_conf(content: bytes, upstream_files: list[Path]) -> tuple[bytes | None, DnsFacts]:
    """The one rule for the resolv.conf a new system gets (``injector.ramroot.rootfs`` writes it,
    the preflight reports it): ``content`` (the host's) when its servers are real; when it
    points at a local resolver, the first of ``upstream_files`` (the state files of
    systemd-resolved and NetworkManager) that names real servers. None when no real server
    can be found."""
    servers = nameservers(content.decode(errors="replace"))
    local = [server for server in servers if is_local_resolver(server)]
    if not local:
        state = "ok" if servers else "/etc/resolv.conf names no server"
        return (content if servers else None), DnsFacts(servers, "", "/etc/resolv.conf", state)
    for path in upstream_files:
        upstream = _read(path)
        real = [server for server in nameservers(upstream or "") if not is_local_resolver(server)]
        if upstream is not None and real:
            return upstream.encode(), DnsFacts(real, local[0], str(path), "ok")
    remote = [server for server in servers if not is_local_resolver(server)]
    if remote:  # a local cache first, real servers after it: those, and search and options
        kept = [
            line
            for line in content.decode(errors="replace").splitlines(keepends=True)
            if nameservers(line) not in ([server] for server in local)
        ]
        return "".join(kept).encode(), DnsFacts(remote, local[0], "/etc/resolv.conf", "ok")
    return None, DnsFacts(
        [],
        local[0],
        "",
        f"resolv.conf points at the local resolver {local[0]}, and none of "
        + ", ".join(str(path) for path in upstream_files)
        + " names its upstream servers",
    )


def upstream_files(root: Path = Path("/")) -> list[Path]:
    return [root / name for name in UPSTREAM_FILES]


def dns_facts(root: Path = Path("/")) -> DnsFacts:
    try:
        content = (root / "etc" / "resolv.conf").read_bytes()
    except OSError as error:
        return DnsFacts([], "", "", f"no readable /etc/resolv.conf ({error.strerror or error})")
    return choose_resolv_conf(content, upstream_files(root))[1]


# --- The session ----------------------------------------------------------------------------


def ssh_connection(
    environ: Mapping[str, str], our_pid: int, proc: Path | None = None
) -> tuple[str, str] | None:
    """(SSH_CONNECTION's value, where it was found): ours, else the nearest ancestor's
    (sudo resets the environment of what it runs, not its own)."""
    if environ.get("SSH_CONNECTION"):
        return environ["SSH_CONNECTION"], "our environment"
    found = labmode.ancestor_variable(our_pid, "SSH_CONNECTION", proc)
    if found is None:
        return None
    pid, comm, value = found
    return value, f"the environment of pid {pid} ({comm})"


def parse_ssh_connection(
    value: str, witness: str, interfaces: list[Interface]
) -> SshSession | None:
    fields = value.split()
    if len(fields) != 4 or not fields[1].isdigit() or not fields[3].isdigit():
        return None
    client, client_port, local, local_port = fields
    return SshSession(
        client=client,
        client_port=int(client_port),
        local_address=local,
        local_port=int(local_port),
        interface=interface_of(local, interfaces),
        witness=witness,
    )


def interface_of(address: str, interfaces: list[Interface]) -> str:
    bare = address.split("%")[0].removeprefix("::ffff:")
    for interface in interfaces:
        for item in interface.addresses:
            if item.address.split("/")[0] == bare:
                return interface.name
    return ""


def session_from_sockets(pids: list[int], interfaces: list[Interface]) -> SshSession | None:
    """The established TCP connection of an sshd in our session chain, when no environment
    kept SSH_CONNECTION (``sudo -i`` under a login that cleared it)."""
    # Imported here, as the fallback it is: most sessions are found by their environment.
    import psutil

    for pid in pids:
        try:
            process = psutil.Process(pid)
            # psutil 6 renamed connections() to net_connections(); pyproject allows 5.9, and
            # Debian 12's python3-psutil is 5.9.4.
            list_connections = getattr(process, "net_connections", None) or process.connections
            connections = list_connections(kind="tcp")
        except (psutil.Error, OSError):
            continue
        for connection in connections:
            if connection.status != psutil.CONN_ESTABLISHED or not connection.raddr:
                continue
            return SshSession(
                client=connection.raddr.ip,
                client_port=connection.raddr.port,
                local_address=connection.laddr.ip,
                local_port=connection.laddr.port,
                interface=interface_of(connection.laddr.ip, interfaces),
                witness=f"the socket of pid {pid}",
            )
    return None


# --- SSH access -----------------------------------------------------------------------------


def fingerprint(blob_base64: str) -> str:
    """``SHA256:...`` of a public key, as ``ssh-keygen -lf`` prints it (unpadded base64)."""
    blob = base64.b64decode(blob_base64, validate=True)
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def parse_public_key(line: str) -> tuple[str, str, str] | None:
    """(type, base64 blob, comment) of an authorized_keys or .pub line; options before the
    type (``from="..." ssh-ed25519 AAAA... me@laptop``) are skipped. None for other lines."""
    fields = line.strip().split()
    if not fields or fields[0].startswith("#"):
        return None
    for at, field in enumerate(fields[:-1]):
        if field.startswith(KEY_TYPE_PREFIXES):
            return field, fields[at + 1], " ".join(fields[at + 2 :])
    return None


def read_host_keys(etc_ssh: Path) -> list[HostKey]:
    keys = []
    try:
        names = sorted(os.listdir(etc_ssh))
    except OSError:
        return []
    for name in names:
        if not (name.startswith("ssh_host_") and name.endswith("_key.pub")):
            continue
        parsed = parse_public_key(_read(etc_ssh / name) or "")
        if parsed is None:
            continue
        try:
            print_ = fingerprint(parsed[1])
        except (binascii.Error, ValueError):
            print_ = "unreadable key"
        keys.append(HostKey(str(etc_ssh / name.removesuffix(".pub")), parsed[0], print_))
    return keys


def home_of(user: str, passwd: Path) -> str | None:
    """``user``'s home directory in a passwd file (the host's, or an image's)."""
    for line in (_read(passwd) or "").splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == user:
            return fields[5]
    return None


def authorized_keys_users(environ: Mapping[str, str]) -> list[str]:
    sudo_user = environ.get("SUDO_USER", "")
    return ["root"] + ([sudo_user] if sudo_user and sudo_user != "root" else [])


def read_authorized_keys(user: str, root: Path) -> AuthorizedKeys | None:
    home = home_of(user, root / "etc" / "passwd")
    if home is None:
        return None
    path = Path(home) / ".ssh" / "authorized_keys"
    keys = [
        parsed
        for line in (_read(root / path.relative_to("/")) or "").splitlines()
        if (parsed := parse_public_key(line)) is not None
    ]
    return AuthorizedKeys(
        user=user,
        path=str(path),
        count=len(keys),
        types=sorted({key[0] for key in keys}),
        comments=[key[2] for key in keys if key[2]],
    )


def image_init(index: ImageTree, init_argv: list[str]) -> ImageInit | None:
    """What the image's init is, judged by what its path leads to inside the image."""
    if not init_argv or not init_argv[0].startswith("/"):
        return None
    path = init_argv[0]
    entry = index.lookup(path)
    resolved = str(getattr(entry, "path", "")) if entry is not None else ""
    name = resolved.rsplit("/", 1)[-1]
    # A multi-call binary runs what it is called as: /bin/sh -> busybox is a shell.
    if name in SHELLS or path.rsplit("/", 1)[-1] in SHELLS:
        return ImageInit(path, resolved, "shell", False)
    for suffix, kind, starts in INIT_KINDS:
        if resolved.endswith(suffix):
            return ImageInit(path, resolved, kind, starts)
    if name == "init" and index.lookup("/etc/inittab") is not None:
        return ImageInit(path, resolved, "sysvinit", True)
    return ImageInit(path, resolved, "unknown", False)


# --- All of it ------------------------------------------------------------------------------


def gather(
    index: ImageTree | None,
    init_argv: list[str],
    *,
    host_root: Path = Path("/"),
    environ: Mapping[str, str] | None = None,
    our_pid: int | None = None,
    proc: Path | None = None,
    session_pids: list[int] | None = None,
    network: tuple[list[Interface], list[Route], str] | None = None,
) -> AccessFacts:
    """The access facts. ``host_root`` (its etc/ and run/), ``environ``, ``proc`` and
    ``network`` (instead of running ``ip``) let tests use crafted trees; ``session_pids``
    are the session chain's sshd processes, whose sockets witness a connection no
    environment kept."""
    environ = os.environ if environ is None else environ
    our_pid = os.getpid() if our_pid is None else our_pid
    interfaces, routes, network_state = network if network is not None else read_network()
    dns = dns_facts(host_root)
    found = ssh_connection(environ, our_pid, proc)
    session = parse_ssh_connection(*found, interfaces) if found is not None else None
    if session is None and session_pids:
        session = session_from_sockets(session_pids, interfaces)
    authorized = [
        keys
        for user in authorized_keys_users(environ)
        if (keys := read_authorized_keys(user, host_root)) is not None
    ]
    return AccessFacts(
        interfaces=interfaces,
        routes=routes,
        dns=dns,
        session=session,
        host_keys=read_host_keys(host_root / "etc" / "ssh"),
        authorized_keys=authorized,
        image_init=image_init(index, init_argv) if index is not None else None,
        network_state=network_state,
    )


# --- Verdicts -------------------------------------------------------------------------------


def verdicts(facts: AccessFacts, *, remote: bool, image_has_ssh: bool) -> list[Notice]:
    """What the access facts mean for a switch. The blocker for a remote session into an
    image without an SSH server is ``preflight``'s (it knows the session); these are the rest."""
    notices: list[Notice] = []
    if facts.dns.state != "ok":
        notices.append(
            Notice(
                "warning",
                "dns-no-upstream",
                f"no DNS server for the new system: {facts.dns.state}",
                "the new root keeps what /etc/resolv.conf says; write its nameserver lines "
                "yourself once it runs",
            )
        )
    init = facts.image_init
    # Only an init known to start nothing: an unknown one may well run sshd (a script).
    if remote and image_has_ssh and init is not None and init.kind in NO_SERVICE_KINDS:
        notices.append(
            Notice(
                "warning",
                "remote-init-starts-no-sshd",
                f"the image has an SSH server, but its init {init.path} ({init.kind}) starts no "
                "services: nothing will run sshd after the switch",
                "use the image's service manager as init (e.g. /sbin/init), or start sshd "
                "from the init command",
                scope="host",
            )
        )
    root_keys = sum(keys.count for keys in facts.authorized_keys if keys.user == "root")
    if remote and image_has_ssh and not root_keys:
        # A sudo user's keys go in only when the image has that user (a rescue image has
        # only root): say so, rather than hand root to a key nobody chose to give it.
        others = [keys for keys in facts.authorized_keys if keys.user != "root" and keys.count]
        unless = "".join(
            f"; {keys.user}'s {keys.count} keys go in only if the image has the user {keys.user}"
            for keys in others
        )
        notices.append(
            Notice(
                "warning",
                "remote-no-keys",
                "root has no authorized_keys on this machine to carry over: the new system's "
                f"sshd lets root in only with the keys the image has{unless}",
                "add your public key to /root/.ssh/authorized_keys before the switch",
                scope="host",
            )
        )
    return notices


def carry_verdicts(remote: bool, carry: bool, revert_minutes: float | None = None) -> list[Notice]:
    """A remote session with neither carry-over nor a revert timer: nothing brings it back."""
    if not remote or carry or revert_minutes is not None:
        return []
    return [
        Notice(
            "warning",
            "remote-no-carry",
            "remote session with --no-carry and no revert timer: the new system gets neither "
            "this machine's SSH host keys nor its authorized_keys, and nothing reverts the switch",
            "leave carry-over on, or give --revert-after MINUTES, or make sure the image has "
            "your keys",
            scope="host",
        )
    ]


def ssh_keeper_notices(ssh_argv: list[str], init: ImageInit | None) -> list[Notice]:
    """``--ssh`` with an init that starts services: two SSH servers for one port."""
    if not ssh_argv or init is None or not init.starts_services:
        return []
    return [
        Notice(
            "warning",
            "keeper-ssh-twice",
            f"--ssh with an init that starts services ({init.path}, {init.kind}): the keeper's"
            f" {ssh_argv[0]} and the image's own SSH service compete for port 22 (the first"
            " to start wins; both let the same keys in)",
            "leave out --ssh: the image's init starts its SSH server itself",
            scope="host",
        )
    ]


def revert_notices(revert_minutes: float | None) -> list[Notice]:
    """The revert timer of the keeper (initstage.keeper), and how to keep the new system."""
    if revert_minutes is None:
        return []
    return [
        Notice(
            "info",
            "revert-timer",
            f"the new system reboots into this one {revert_minutes:g} min after the switch"
            f" unless {KEEP_FILE} exists by then",
            f"log in to the new system and run `touch {KEEP_FILE}`, before you wipe or"
            " repartition the old disk: after that there is nothing to revert to",
        )
    ]
