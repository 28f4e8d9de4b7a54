"""rtnetlink with the standard library only: read the kernel's links, addresses and routes,
and put addresses and routes back.

``socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)`` and :mod:`struct`, as ``ip`` itself does:
the stage runs as PID 1 of a machine whose ``ip`` may be gone with the old root. Every
request waits for the kernel's answer (a dump's NLMSG_DONE, a change's ACK) under a
timeout, and a refusal raises :class:`NetlinkError` naming the request, the errno and, where
the kernel gives one, its own explanation (extended ACK).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import TracebackType

# include/uapi/linux/netlink.h
NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10  # the table changed during the dump: ask again
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLM_F_REPLACE = 0x100
NLM_F_CREATE = 0x400
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: only the request's header is echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended-ACK attributes follow the echo
NLMSGERR_ATTR_MSG = 1

# include/uapi/linux/rtnetlink.h
RTM_NEWLINK = 16
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_KERNEL = 2
RTPROT_BOOT = 3  # what ip route add says unless told: not shown, as ip does
RT_SCOPE_UNIVERSE = 0
RTNH_F_ONLINK = 0x4
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_METRICS = 8
RTA_MULTIPATH = 9
RTA_TABLE = 15
RTA_PREF = 20
# Sent back as they came: MTU and other metrics, ECMP next hops, IPv6 router preference.
# Not RTA_CACHEINFO or RTA_EXPIRES: a route put back does not expire.
ROUTE_ATTRIBUTES_KEPT = (RTA_METRICS, RTA_MULTIPATH, RTA_PREF)

# include/uapi/linux/if.h, if_link.h
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFLA_ADDRESS = 1
IFLA_IFNAME = 3

# include/uapi/linux/if_addr.h
IFA_ADDRESS = 1  # IPv4: the peer (the local address again unless point-to-point)
IFA_LOCAL = 2
IFA_LABEL = 3
IFA_BROADCAST = 4
IFA_CACHEINFO = 6
IFA_FLAGS = 8  # all 32 bits of the flags; the header holds the low 8
IFA_F_SECONDARY = 0x01  # IPv4; the same bit is IFA_F_TEMPORARY (a privacy address) in IPv6
IFA_F_TEMPORARY = 0x01
IFA_F_NODAD = 0x02
IFA_F_DADFAILED = 0x08
IFA_F_HOMEADDRESS = 0x10
IFA_F_PERMANENT = 0x80
IFA_F_MANAGETEMPADDR = 0x100
IFA_F_NOPREFIXROUTE = 0x200
IFA_F_MCAUTOJOIN = 0x400
# The flags one configures (the rest are the kernel's state: tentative, deprecated ...).
ADDRESS_FLAGS_KEPT = (
    IFA_F_NODAD | IFA_F_HOMEADDRESS | IFA_F_MANAGETEMPADDR | IFA_F_NOPREFIXROUTE | IFA_F_MCAUTOJOIN
)
INFINITY_LIFE_TIME = 0xFFFFFFFF  # "forever"

NLMSGHDR = struct.Struct("=IHHII")  # length, type, flags, sequence, port id
NLMSGERR = struct.Struct("=i")  # -errno, then the request echoed
RTATTR = struct.Struct("=HH")  # length, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, device type, index, flags, change mask
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
IFA_CACHEINFO_STRUCT = struct.Struct("=IIII")  # preferred, valid, created, updated
RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst len, src len, tos, table, proto, scope, type, flags
U32 = struct.Struct("=I")

RECEIVE_BYTES = 1 << 17  # more than the kernel puts in one datagram of a dump
DEFAULT_TIMEOUT = 2.0
DUMP_ATTEMPTS = 3
FAMILIES = {socket.AF_INET: "inet", socket.AF_INET6: "inet6"}
# "ip" names of the common route protocols (include/uapi/linux/rtnetlink.h, RTPROT_*).
PROTOCOL_NAMES = {2: "kernel", 3: "boot", 4: "static", 9: "ra", 16: "dhcp"}


class NetlinkError(OSError):
    """The kernel refused a request, or did not answer it. ``str()`` is one line."""


def align(length: int) -> int:
    return (length + 3) & ~3


def pack_attribute(kind: int, payload: bytes) -> bytes:
    body = RTATTR.pack(RTATTR.size + len(payload), kind) + payload
    return body + bytes(align(len(body)) - len(body))


def parse_attributes(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) pairs, in order; a truncated one ends the list."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size or offset + length > len(data):
            break
        found.append((kind, data[offset + RTATTR.size : offset + length]))
        offset += align(length)
    return found


def pack_message(kind: int, flags: int, sequence: int, body: bytes) -> bytes:
    length = NLMSGHDR.size + len(body)
    padding = bytes(align(length) - length)
    return NLMSGHDR.pack(length, kind, flags, sequence, 0) + body + padding


@dataclass(frozen=True)
class Message:
    kind: int
    flags: int
    sequence: int
    payload: bytes


def parse_messages(data: bytes) -> Iterator[Message]:
    offset = 0
    while offset + NLMSGHDR.size <= len(data):
        length, kind, flags, sequence, _port = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > len(data):
            return
        yield Message(kind, flags, sequence, data[offset + NLMSGHDR.size : offset + length])
        offset += align(length)


def error_of(message: Message) -> tuple[int, str]:
    """(errno, the kernel's extended-ACK text or "") of an NLMSG_ERROR; errno 0 is an ACK."""
    (negative,) = NLMSGERR.unpack_from(message.payload)
    text = ""
    if message.flags & NLM_F_ACK_TLVS:
        echoed = NLMSGHDR.size
        if not message.flags & NLM_F_CAPPED:
            echoed = NLMSGHDR.unpack_from(message.payload, NLMSGERR.size)[0]
        for kind, payload in parse_attributes(message.payload[NLMSGERR.size + align(echoed) :]):
            if kind == NLMSGERR_ATTR_MSG:
                text = payload.rstrip(b"\0").decode("utf-8", "replace")
    return -negative, text


def _text(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    flags: int
    mac: str = ""

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)

    @property
    def loopback(self) -> bool:
        return bool(self.flags & IFF_LOOPBACK)


def parse_link(payload: bytes) -> Link:
    _family, _type, index, flags, _change = IFINFOMSG.unpack_from(payload)
    attributes = dict(parse_attributes(payload[IFINFOMSG.size :]))
    name = attributes.get(IFLA_IFNAME, b"").rstrip(b"\0").decode("utf-8", "replace")
    mac = ":".join(f"{byte:02x}" for byte in attributes.get(IFLA_ADDRESS, b""))
    return Link(index, name, flags, mac)


@dataclass(frozen=True)
class Address:
    family: int
    index: int
    address: str  # the local address
    prefixlen: int
    flags: int = 0  # all 32 bits (IFA_FLAGS where the kernel sends it)
    scope: int = RT_SCOPE_UNIVERSE
    peer: str = ""  # point-to-point only
    broadcast: str = ""
    label: str = ""
    valid: int = INFINITY_LIFE_TIME  # seconds left; INFINITY_LIFE_TIME is forever
    preferred: int = INFINITY_LIFE_TIME

    @property
    def key(self) -> tuple[int, int, str, int]:
        return (self.family, self.index, self.address, self.prefixlen)

    @property
    def permanent(self) -> bool:
        """Not kept alive by a client: IFA_F_PERMANENT, set whenever valid_lft is forever."""
        return bool(self.flags & IFA_F_PERMANENT)

    @property
    def link_local(self) -> bool:
        return ipaddress.ip_address(self.address).is_link_local

    @property
    def privacy(self) -> bool:
        """An IPv6 temporary (privacy) address: short-lived by design, re-made by the kernel."""
        return self.family == socket.AF_INET6 and bool(self.flags & IFA_F_TEMPORARY)

    def __str__(self) -> str:
        return f"{self.address}/{self.prefixlen}"


def parse_address(payload: bytes) -> Address:
    family, prefixlen, flags, scope, index = IFADDRMSG.unpack_from(payload)
    attributes = dict(parse_attributes(payload[IFADDRMSG.size :]))
    local = attributes.get(IFA_LOCAL)
    address = attributes.get(IFA_ADDRESS)
    own = local if local is not None else address
    if own is None:
        raise NetlinkError(errno.EPROTO, "RTM_NEWADDR without IFA_LOCAL or IFA_ADDRESS")
    peer = address if local is not None and address not in (None, local) else None
    if IFA_FLAGS in attributes:
        (flags,) = U32.unpack(attributes[IFA_FLAGS][: U32.size])
    preferred = valid = INFINITY_LIFE_TIME
    if IFA_CACHEINFO in attributes:
        preferred, valid, _created, _updated = IFA_CACHEINFO_STRUCT.unpack(
            attributes[IFA_CACHEINFO][: IFA_CACHEINFO_STRUCT.size]
        )
    broadcast = attributes.get(IFA_BROADCAST)
    return Address(
        family=family,
        index=index,
        address=_text(family, own),
        prefixlen=prefixlen,
        flags=flags,
        scope=scope,
        peer=_text(family, peer) if peer else "",
        broadcast=_text(family, broadcast) if broadcast else "",
        label=attributes.get(IFA_LABEL, b"").rstrip(b"\0").decode("utf-8", "replace"),
        valid=valid,
        preferred=preferred,
    )


def address_request(address: Address, lifetime: int = INFINITY_LIFE_TIME) -> bytes:
    """The body of an RTM_NEWADDR that (re)makes ``address``, valid and preferred for
    ``lifetime`` seconds (forever by default: a permanent address)."""
    family = address.family
    local = socket.inet_pton(family, address.address)
    flags = address.flags & ADDRESS_FLAGS_KEPT
    body = IFADDRMSG.pack(family, address.prefixlen, flags & 0xFF, address.scope, address.index)
    body += pack_attribute(IFA_LOCAL, local)
    peer = socket.inet_pton(family, address.peer) if address.peer else local
    body += pack_attribute(IFA_ADDRESS, peer)
    if address.broadcast:
        body += pack_attribute(IFA_BROADCAST, socket.inet_pton(family, address.broadcast))
    if address.label:
        body += pack_attribute(IFA_LABEL, address.label.encode() + b"\0")
    lifetimes = IFA_CACHEINFO_STRUCT.pack(lifetime, lifetime, 0, 0)
    body += pack_attribute(IFA_CACHEINFO, lifetimes)
    return body + pack_attribute(IFA_FLAGS, U32.pack(flags))


@dataclass(frozen=True)
class Route:
    family: int
    dst: str  # "" for the default route
    dst_len: int
    gateway: str = ""
    oif: int = 0
    priority: int = 0
    prefsrc: str = ""
    table: int = RT_TABLE_MAIN
    protocol: int = RTPROT_KERNEL
    scope: int = RT_SCOPE_UNIVERSE
    kind: int = RTN_UNICAST
    tos: int = 0
    flags: int = 0  # RTNH_F_ONLINK matters; the kernel's state flags are dropped on the way back
    extra: tuple[tuple[int, bytes], ...] = field(default=())  # ROUTE_ATTRIBUTES_KEPT

    @property
    def key(self) -> tuple[object, ...]:
        """What tells two routes apart: the next hop too, as IPv6 keeps one prefix's routes
        through different gateways side by side."""
        return (
            self.family, self.table, self.dst, self.dst_len, self.tos, self.priority,
            self.oif, self.gateway,
        )  # fmt: skip

    @property
    def onlink(self) -> bool:
        return bool(self.flags & RTNH_F_ONLINK)

    @property
    def link_local(self) -> bool:
        return (
            self.family == socket.AF_INET6 and ipaddress.ip_address(self.dst or "::").is_link_local
        )

    def describe(self, names: dict[int, str]) -> str:
        """As ``ip route`` says it: ``default via 10.0.2.2 dev eth0 onlink``."""
        words = [f"{self.dst}/{self.dst_len}" if self.dst_len else "default"]
        if self.gateway:
            words += ["via", self.gateway]
        if self.oif:
            words += ["dev", names.get(self.oif, f"#{self.oif}")]
        if self.protocol in PROTOCOL_NAMES and self.protocol not in (RTPROT_KERNEL, RTPROT_BOOT):
            words += ["proto", PROTOCOL_NAMES[self.protocol]]
        if self.priority:
            words += ["metric", str(self.priority)]
        if self.onlink:
            words.append("onlink")
        return " ".join(words)


def parse_route(payload: bytes) -> Route:
    family, dst_len, _src_len, tos, table, protocol, scope, kind, flags = RTMSG.unpack_from(payload)
    attributes = parse_attributes(payload[RTMSG.size :])
    values = dict(attributes)
    if RTA_TABLE in values:
        (table,) = U32.unpack(values[RTA_TABLE][: U32.size])

    def number(kind: int) -> int:
        return U32.unpack(values[kind][: U32.size])[0] if kind in values else 0

    def text(kind: int) -> str:
        return _text(family, values[kind]) if kind in values else ""

    return Route(
        family=family,
        dst=text(RTA_DST),
        dst_len=dst_len,
        gateway=text(RTA_GATEWAY),
        oif=number(RTA_OIF),
        priority=number(RTA_PRIORITY),
        prefsrc=text(RTA_PREFSRC),
        table=table,
        protocol=protocol,
        scope=scope,
        kind=kind,
        tos=tos,
        flags=flags,
        extra=tuple((k, v) for k, v in attributes if k in ROUTE_ATTRIBUTES_KEPT),
    )


def route_request(route: Route) -> bytes:
    """The body of an RTM_NEWROUTE that (re)makes ``route``."""
    family = route.family
    table_in_header = route.table if route.table < 256 else 0  # RT_TABLE_UNSPEC + RTA_TABLE
    body = RTMSG.pack(
        family,
        route.dst_len,
        0,
        route.tos,
        table_in_header,
        route.protocol,
        route.scope,
        route.kind,
        route.flags & RTNH_F_ONLINK,
    )
    body += pack_attribute(RTA_TABLE, U32.pack(route.table))
    if route.dst:
        body += pack_attribute(RTA_DST, socket.inet_pton(family, route.dst))
    if route.gateway:
        body += pack_attribute(RTA_GATEWAY, socket.inet_pton(family, route.gateway))
    if route.oif:
        body += pack_attribute(RTA_OIF, U32.pack(route.oif))
    if route.priority:
        body += pack_attribute(RTA_PRIORITY, U32.pack(route.priority))
    if route.prefsrc:
        body += pack_attribute(RTA_PREFSRC, socket.inet_pton(family, route.prefsrc))
    return body + b"".join(pack_attribute(kind, payload) for kind, payload in route.extra)


def link_up_request(index: int) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, IFF_UP, IFF_UP)


class Rtnetlink:
    """One NETLINK_ROUTE socket; ``with Rtnetlink() as kernel: kernel.addresses()``."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        try:
            self.socket.settimeout(timeout)
            self.socket.bind((0, 0))
            with contextlib.suppress(OSError):  # before Linux 4.12: errors without the text
                self.socket.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        except BaseException:
            self.socket.close()
            raise
        self.sequence = 0

    def __enter__(self) -> Rtnetlink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close()

    def request(self, kind: int, flags: int, body: bytes, what: str) -> list[Message]:
        """Send one request; return the answers up to NLMSG_DONE or the ACK."""
        self.sequence += 1
        self.socket.send(pack_message(kind, NLM_F_REQUEST | flags, self.sequence, body))
        answers: list[Message] = []
        while True:
            try:
                data = self.socket.recv(RECEIVE_BYTES)
            except TimeoutError:
                raise NetlinkError(errno.ETIMEDOUT, f"{what}: the kernel did not answer") from None
            for message in parse_messages(data):
                if message.sequence != self.sequence:
                    continue  # a late answer to an earlier request
                if message.kind == NLMSG_DONE:
                    if message.flags & NLM_F_DUMP_INTR:
                        raise InterruptedDump
                    return answers
                if message.kind == NLMSG_ERROR:
                    code, text = error_of(message)
                    if code == 0:
                        return answers
                    name = errno.errorcode.get(code, str(code))
                    explained = f": {text}" if text else ""
                    raise NetlinkError(code, f"{what}: {name} ({os.strerror(code)}){explained}")
                answers.append(message)
                if not message.flags & NLM_F_MULTI and not flags & NLM_F_ACK:
                    return answers

    def dump(self, kind: int, body: bytes, what: str) -> list[Message]:
        for _attempt in range(DUMP_ATTEMPTS - 1):
            try:
                return self.request(kind, NLM_F_DUMP, body, what)
            except InterruptedDump:
                continue  # the table changed under the dump: the kernel says start over
        try:
            return self.request(kind, NLM_F_DUMP, body, what)
        except InterruptedDump:
            raise NetlinkError(errno.EAGAIN, f"{what}: the table kept changing") from None

    def links(self) -> list[Link]:
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        return [parse_link(m.payload) for m in self.dump(RTM_GETLINK, body, "RTM_GETLINK dump")]

    def addresses(self) -> list[Address]:
        body = IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        messages = self.dump(RTM_GETADDR, body, "RTM_GETADDR dump")
        return [
            address
            for address in (parse_address(m.payload) for m in messages)
            if address.family in FAMILIES
        ]

    def routes(self) -> list[Route]:
        """The main table's unicast routes, IPv4 and IPv6."""
        body = RTMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0, 0, 0, 0)
        messages = self.dump(RTM_GETROUTE, body, "RTM_GETROUTE dump")
        return [
            route
            for route in (parse_route(m.payload) for m in messages)
            if route.family in FAMILIES
            and route.table == RT_TABLE_MAIN
            and route.kind == RTN_UNICAST
        ]

    def add_address(
        self, address: Address, device: str, lifetime: int = INFINITY_LIFE_TIME
    ) -> None:
        """Add ``address`` for ``lifetime`` seconds (forever by default), or set the
        existing one's lifetimes so."""
        what = f"RTM_NEWADDR {address} on {device}"
        flags = NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK
        self.request(RTM_NEWADDR, flags, address_request(address, lifetime), what)

    def add_route(self, route: Route, names: dict[int, str]) -> None:
        what = f"RTM_NEWROUTE {route.describe(names)}"
        flags = NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK
        self.request(RTM_NEWROUTE, flags, route_request(route), what)

    def set_up(self, link: Link) -> None:
        self.request(RTM_NEWLINK, NLM_F_ACK, link_up_request(link.index), f"set {link.name} up")


class InterruptedDump(Exception):
    """A dump ended with NLM_F_DUMP_INTR: its answers may be inconsistent."""
