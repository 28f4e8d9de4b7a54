"""Carry-over: the host's SSH identity and access into the new root, so that the machine
answers with the same host key and lets the same people in.

What goes in (``carry_ssh``): the host keys (``/etc/ssh/ssh_host_*``), root's
authorized_keys, and ``$SUDO_USER``'s when the image has that user. machine-id and the
upstream resolv.conf are host files (``injector.ramroot.rootfs.add_host_files``), written for every
run. Every file written is named in the returned lines; a file the image had is named as
replaced, or, for authorized_keys, merged (the image's own keys stay, the host's are added).

Writes happen inside the RAM root without following any symlink the image has on the way
(``/root`` -> ``/home/x`` in an image must not lead the write onto the host).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Mapping
from pathlib import Path

from injector.access.facts import (
    Interface,
    Route,
    authorized_keys_users,
    home_of,
    parse_public_key,
)
from injector.ramroot.rootfs import replace_file

# Private host keys are read by sshd only; the public halves by anyone.
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
SSH_DIR_MODE = 0o700
AUTHORIZED_KEYS_MODE = 0o600
HOST_KEY_MAX = 64 << 10  # a host key file bigger than this is not a key


def carry_ssh(
    root: Path, *, host_root: Path = Path("/"), environ: Mapping[str, str] | None = None
) -> list[str]:
    """Copy the host's SSH host keys and authorized_keys into ``root``; returns one line per
    file written or left out, for the log."""
    environ = os.environ if environ is None else environ
    lines: list[str] = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            lines += _carry_host_keys(root_fd, host_root / "etc" / "ssh")
        except OSError as error:  # the image's /etc/ssh is a symlink, or no directory
            lines.append(f"host keys left out: the image's /etc/ssh is unusable ({error})")
        for user in authorized_keys_users(environ):
            try:
                lines += _carry_authorized_keys(root_fd, root, user, host_root)
            except OSError as error:  # a symlink on the way to the image's home
                lines.append(
                    f"authorized_keys of {user} left out: its home in the image is unusable "
                    f"({error})"
                )
    finally:
        os.close(root_fd)
    return lines


def _carry_host_keys(root_fd: int, host_ssh: Path) -> list[str]:
    try:
        names = sorted(
            name
            for name in os.listdir(host_ssh)
            if name.startswith("ssh_host_") and (name.endswith("_key") or name.endswith(".pub"))
        )
    except OSError:
        return ["no host keys carried over: the host has no readable /etc/ssh"]
    if not names:
        return ["no host keys carried over: the host's /etc/ssh has none"]
    lines = []
    dir_fd = open_dir(root_fd, "etc/ssh", 0o755, (0, 0))
    try:
        for name in names:
            content = _read_small(host_ssh / name)
            if content is None:
                lines.append(f"host key /etc/ssh/{name} left out: not a readable regular file")
                continue
            existed = _exists(dir_fd, name)
            mode = PUBLIC_KEY_MODE if name.endswith(".pub") else PRIVATE_KEY_MODE
            replace_file(dir_fd, name, content, mode, (0, 0))
            lines.append(
                f"host key /etc/ssh/{name}" + (" (replaced the image's own)" if existed else "")
            )
    finally:
        os.close(dir_fd)
    return lines


def _carry_authorized_keys(root_fd: int, root: Path, user: str, host_root: Path) -> list[str]:
    host_home = home_of(user, host_root / "etc" / "passwd")
    if host_home is None:
        return []
    source = host_root / host_home.lstrip("/") / ".ssh" / "authorized_keys"
    content = _read_small(source)
    if content is None or not _keys(content):
        return []  # nothing to carry: the facts already say how many keys there are
    account = _image_account(root / "etc" / "passwd", user)
    if account is None:
        return [f"authorized_keys of {user} left out: the image has no user {user}"]
    home, uid, gid = account
    relative = home.strip("/")
    if not relative:
        return [f"authorized_keys of {user} left out: the image gives {user} the home /"]
    target = f"{home.rstrip('/')}/.ssh/authorized_keys"
    home_fd = open_dir(root_fd, relative, 0o700 if user == "root" else 0o755, (uid, gid))
    try:
        ssh_fd = _open_ssh_dir(home_fd, uid, gid)
    finally:
        os.close(home_fd)
    try:
        existed = _exists(ssh_fd, "authorized_keys")
        existing = _read_at(ssh_fd, "authorized_keys")
        merged, added = _merge_keys(existing, content)
        replace_file(ssh_fd, "authorized_keys", merged, AUTHORIZED_KEYS_MODE, (uid, gid))
    finally:
        os.close(ssh_fd)
    if existing is None:
        replaced = " (replaced the image's, which was not a regular file)" if existed else ""
        return [f"{target} ({added} keys of the host's {user}){replaced}"]
    return [f"{target} (merged: {added} keys of the host's {user} added to the image's own)"]


def _keys(content: bytes) -> list[str]:
    return [
        line
        for line in content.decode(errors="replace").splitlines()
        if parse_public_key(line) is not None
    ]


def _blob(line: str) -> str:
    parsed = parse_public_key(line)
    return "" if parsed is None else parsed[1]


def _merge_keys(existing: bytes | None, host: bytes) -> tuple[bytes, int]:
    """The image's lines as they are, then the host's keys it does not have yet."""
    have = {_blob(line) for line in _keys(existing or b"")}
    added = [line for line in _keys(host) if _blob(line) not in have]
    text = (existing or b"").decode(errors="replace")
    if text and not text.endswith("\n"):
        text += "\n"
    return (text + "".join(line + "\n" for line in added)).encode(), len(added)


def _image_account(passwd: Path, user: str) -> tuple[str, int, int] | None:
    """(home, uid, gid) of ``user`` in the image's passwd; None when it has no such user."""
    try:
        text = passwd.read_text(errors="replace") if not passwd.is_symlink() else ""
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[0] == user and fields[2].isdigit() and fields[3].isdigit():
            return fields[5], int(fields[2]), int(fields[3])
    if user == "root":
        return "/root", 0, 0  # an image without a passwd still runs as root
    return None


def open_dir(root_fd: int, relative: str, mode: int, owner: tuple[int, int]) -> int:
    """A directory fd for ``relative`` under ``root_fd``, made (with ``mode`` and ``owner``
    for the last one, 0755 root for those on the way) where missing. Never follows a
    symlink: an image that has one on the way gets an OSError (ELOOP, ENOTDIR)."""
    current = os.dup(root_fd)
    parts = [part for part in relative.split("/") if part not in ("", ".")]
    try:
        for at, part in enumerate(parts):
            if part == "..":
                raise OSError(f"{relative}: '..' in a path inside the image")
            last = at == len(parts) - 1
            made = False
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, mode if last else 0o755, dir_fd=current)
                made = True
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=current)
            os.close(current)
            current = child
            if made:
                os.fchown(current, *(owner if last else (0, 0)))
                os.fchmod(current, mode if last else 0o755)  # not the umask's
    except BaseException:
        os.close(current)
        raise
    return current


def _open_ssh_dir(home_fd: int, uid: int, gid: int) -> int:
    """``.ssh`` in a home: made 0700 for its user, or tightened to 0700 when the image has
    it looser (sshd's StrictModes refuses keys in a group- or world-writable one)."""
    fd = open_dir(home_fd, ".ssh", SSH_DIR_MODE, (uid, gid))
    info = os.fstat(fd)
    if stat.S_IMODE(info.st_mode) & 0o022:
        os.fchmod(fd, SSH_DIR_MODE)
    return fd


def _read_small(path: Path) -> bytes | None:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > HOST_KEY_MAX:
            return None
        return path.read_bytes()
    except OSError:
        return None


def _read_at(dir_fd: int, name: str) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError:
        return None  # a symlink or worse: replaced, not read through
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


# --- The network, for the image's own network manager ----------------------------------------

# Where an image enables systemd-networkd, and where ifupdown keeps its configuration.
NETWORKD_WANTS = (
    "etc/systemd/system/multi-user.target.wants/systemd-networkd.service",
    "etc/systemd/system/sockets.target.wants/systemd-networkd.socket",
)
IFUPDOWN_PROGRAMS = ("sbin/ifup", "usr/sbin/ifup")
# Default routes a client learnt (DHCP, router advertisements) come back with the client.
LEARNT_PROTOCOLS = frozenset({"dhcp", "ra"})


def image_network_manager(root: Path) -> str:
    """``networkd`` when the image enables systemd-networkd, ``ifupdown`` when it has ifup
    and an interfaces file, else ``""``: then nothing is written, and the kernel keeps the
    addresses and routes as they are (no daemon of the new system takes them down)."""
    if any(os.path.lexists(root / path) for path in NETWORKD_WANTS):
        return "networkd"
    if any(os.path.lexists(root / path) for path in IFUPDOWN_PROGRAMS) and os.path.lexists(
        root / "etc/network/interfaces"
    ):
        return "ifupdown"
    return ""


def _configured(interfaces: list[Interface]) -> list[Interface]:
    return [
        interface
        for interface in interfaces
        if interface.name != "lo"
        and interface.mac
        and any(item.scope == "global" for item in interface.addresses)
    ]


def networkd_unit(interface: Interface, routes: list[Route]) -> str:
    """A ``.network`` file matched by MAC: static addresses as they are, DHCP asking for the
    same address where it was dynamic, gateways (on-link ones too) kept.

    Never ``KeepConfiguration=yes`` or ``dhcp`` where a lease is involved: networkd then gives
    every address it leases an infinite lifetime, and an address that outlives its lease
    clashes with its next holder. With ``dhcp-on-stop`` networkd drops the address the stage
    kept when it starts and asks the server for the same one at once (a gap of a DHCP
    exchange, which TCP sessions ride out), and a later stop leaves the lease in place."""
    global_addresses = [item for item in interface.addresses if item.scope == "global"]
    dhcp4 = [item for item in global_addresses if item.dynamic and item.family == "inet"]
    dynamic6 = any(item.dynamic and item.family == "inet6" for item in global_addresses)
    lines = [
        f"# Written by dboot: {interface.name} as it was before the switch.",
        "[Match]",
        f"MACAddress={interface.mac}",
        "",
        "[Network]",
        f"KeepConfiguration={'dhcp-on-stop' if dhcp4 or dynamic6 else 'static'}",
        f"DHCP={'ipv4' if dhcp4 else 'no'}",
        f"IPv6AcceptRA={'yes' if dynamic6 else 'no'}",
    ]
    lines += [f"Address={item.address}" for item in global_addresses if not item.dynamic]
    if dhcp4:
        lines += ["", "[DHCPv4]", f"RequestAddress={dhcp4[0].address.split('/')[0]}"]
    for route in routes:
        if route.device != interface.name or not route.gateway:
            continue
        if route.protocol in LEARNT_PROTOCOLS and (dhcp4 or dynamic6):
            continue
        lines += ["", "[Route]", f"Gateway={route.gateway}"]
        if route.destination != "default":
            lines.append(f"Destination={route.destination}")
        if route.onlink:
            lines.append("GatewayOnLink=yes")
    return "\n".join(lines) + "\n"


def ifupdown_stanza(interface: Interface, routes: list[Route]) -> str:
    """``interfaces`` stanzas for one interface (ifupdown matches names; the kernel, and so
    the names, stay across a switch)."""
    global_addresses = [item for item in interface.addresses if item.scope == "global"]
    lines = [f"# Written by dboot: {interface.name} as it was before the switch.",
             f"auto {interface.name}"]  # fmt: skip
    for family in ("inet", "inet6"):
        of_family = [item for item in global_addresses if item.family == family]
        if not of_family:
            continue
        gateway = next(
            (
                route.gateway
                for route in routes
                if route.family == family
                and route.device == interface.name
                and route.destination == "default"
            ),
            "",
        )
        if any(item.dynamic for item in of_family):
            lines.append(
                f"iface {interface.name} {family} {'dhcp' if family == 'inet' else 'auto'}"
            )
            continue
        lines.append(f"iface {interface.name} {family} static")
        lines.append(f"    address {of_family[0].address}")
        if gateway:
            lines.append(f"    gateway {gateway}")
        for extra in of_family[1:]:
            lines.append(f"    up ip addr add {extra.address} dev {interface.name} || true")
    return "\n".join(lines) + "\n"


def carry_network(root: Path, interfaces: list[Interface], routes: list[Route]) -> list[str]:
    """Configuration for the image's own network manager, one file per interface with a
    global address; returns the log lines."""
    manager = image_network_manager(root)
    configured = _configured(interfaces)
    if not manager:
        return ["no network configuration written: the image enables no network manager "
                "(the kernel keeps the addresses and routes)"]  # fmt: skip
    if not configured:
        return ["no network configuration written: no interface has a global address"]
    if manager == "networkd":
        directory = "etc/systemd/network"
        files = {f"10-dboot-{i.name}.network": networkd_unit(i, routes) for i in configured}
    else:
        directory = "etc/network/interfaces.d"
        files = {f"dboot-{i.name}": ifupdown_stanza(i, routes) for i in configured}
    lines = []
    root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        dir_fd = open_dir(root_fd, directory, 0o755, (0, 0))
    except OSError as error:
        os.close(root_fd)
        return [f"no network configuration written: the image's /{directory} is unusable "
                f"({error})"]  # fmt: skip
    try:
        for name, content in files.items():
            existed = _exists(dir_fd, name)
            replace_file(dir_fd, name, content.encode(), 0o644, (0, 0))
            replaced = " (replaced the image's own)" if existed else ""
            lines.append(f"{manager} configuration /{directory}/{name}{replaced}")
    finally:
        os.close(dir_fd)
        os.close(root_fd)
    if manager == "ifupdown" and "interfaces.d" not in _text(root / "etc/network/interfaces"):
        lines.append("the image's /etc/network/interfaces does not read interfaces.d: add "
                     "`source /etc/network/interfaces.d/*` there for these to count")  # fmt: skip
    return lines


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace") if not path.is_symlink() else ""
    except OSError:
        return ""
