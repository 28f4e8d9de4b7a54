"""rtnetlink messages built and parsed back (initstage/netlink.py), the kernel's own dumps
read without changing anything, and when the stage may keep a network (initstage/netkeep.py)."""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest

from initstage import netlink
from initstage.netkeep import refusal
from initstage.netlink import (
    IFA_F_DADFAILED,
    IFA_F_NOPREFIXROUTE,
    IFA_F_PERMANENT,
    INFINITY_LIFE_TIME,
    NLMSG_ERROR,
    RTA_METRICS,
    RTA_PREF,
    RTNH_F_ONLINK,
    Address,
    Route,
)
from initstage.plan import Plan, PlanError

RTNH_F_LINKDOWN = 0x10  # a state flag the kernel reports and must not be sent back


def test_attributes_are_padded_to_four_bytes_and_parse_back_in_order():
    packed = netlink.pack_attribute(3, b"eth0\0") + netlink.pack_attribute(4, b"\x01\x02")
    assert len(packed) == 12 + 8  # 4 + 5 padded to 12, then 4 + 2 padded to 8
    assert netlink.parse_attributes(packed) == [(3, b"eth0\0"), (4, b"\x01\x02")]
    assert netlink.parse_attributes(packed[:-9]) == [(3, b"eth0\0")], "a truncated one ends it"


def test_messages_parse_back_one_by_one():
    data = netlink.pack_message(20, 5, 7, b"abc") + netlink.pack_message(3, 2, 8, b"")
    messages = list(netlink.parse_messages(data))
    assert [(m.kind, m.flags, m.sequence, m.payload) for m in messages] == [
        (20, 5, 7, b"abc"),
        (3, 2, 8, b""),
    ]


def test_an_address_request_parses_back_as_the_same_address_with_lifetimes_forever():
    leased = Address(
        family=socket.AF_INET,
        index=2,
        address="10.0.2.15",
        prefixlen=24,
        flags=IFA_F_NOPREFIXROUTE | IFA_F_DADFAILED,  # one to keep, one of the kernel's state
        broadcast="10.0.2.255",
        label="eth0",
        valid=3542,
        preferred=3542,
    )
    back = netlink.parse_address(netlink.address_request(leased))
    assert back == Address(
        family=socket.AF_INET,
        index=2,
        address="10.0.2.15",
        prefixlen=24,
        flags=IFA_F_NOPREFIXROUTE,
        broadcast="10.0.2.255",
        label="eth0",
        valid=INFINITY_LIFE_TIME,
        preferred=INFINITY_LIFE_TIME,
    )
    assert str(back) == "10.0.2.15/24"
    # A kept lease gets a bound instead (initstage.netkeep.kept_lifetime), never forever.
    bounded = netlink.parse_address(netlink.address_request(leased, 3842))
    assert (bounded.valid, bounded.preferred) == (3842, 3842)


def test_an_ipv6_point_to_point_address_keeps_its_peer():
    address = Address(socket.AF_INET6, 3, "fd00::2", 128, peer="fd00::1")
    back = netlink.parse_address(netlink.address_request(address))
    assert (back.address, back.peer, back.family) == ("fd00::2", "fd00::1", socket.AF_INET6)


def test_the_permanent_flag_and_link_local_and_privacy_addresses_are_told_apart():
    assert Address(socket.AF_INET, 2, "10.0.2.15", 24, flags=IFA_F_PERMANENT).permanent
    assert not Address(socket.AF_INET, 2, "10.0.2.15", 24).permanent
    assert Address(socket.AF_INET6, 2, "fe80::1", 64).link_local
    assert Address(socket.AF_INET6, 2, "2001:db8::5", 64, flags=0x01).privacy
    assert not Address(socket.AF_INET, 2, "10.0.2.16", 24, flags=0x01).privacy  # secondary


def test_a_route_request_parses_back_with_onlink_and_without_the_kernels_state_flags():
    route = Route(
        family=socket.AF_INET,
        dst="",
        dst_len=0,
        gateway="10.99.7.1",
        oif=2,
        priority=100,
        prefsrc="10.99.0.2",
        protocol=16,
        flags=RTNH_F_ONLINK | RTNH_F_LINKDOWN,
        extra=((RTA_METRICS, netlink.pack_attribute(2, struct.pack("=I", 1400))),),
    )
    back = netlink.parse_route(netlink.route_request(route))
    assert back == Route(**{**route.__dict__, "flags": RTNH_F_ONLINK})
    assert (
        back.describe({2: "eth0"}) == "default via 10.99.7.1 dev eth0 proto dhcp metric 100 onlink"
    )


def test_an_ipv6_route_keeps_its_preference_and_a_table_above_255_goes_in_rta_table():
    route = Route(
        family=socket.AF_INET6,
        dst="2001:db8::",
        dst_len=32,
        gateway="fe80::1",
        oif=3,
        priority=1024,
        table=1000,
        extra=((RTA_PREF, b"\x01"),),
    )
    body = netlink.route_request(route)
    assert body[4] == 0, "a table above 255 is RT_TABLE_UNSPEC in the header"
    assert netlink.parse_route(body) == route
    assert Route(socket.AF_INET6, "fe80::", 64).link_local
    assert not Route(socket.AF_INET6, "", 0).link_local


def error_message(code: int, text: str, *, capped: bool) -> netlink.Message:
    request = netlink.pack_message(24, 0x405, 9, b"x" * 12)
    echoed = request[: netlink.NLMSGHDR.size] if capped else request
    payload = struct.pack("=i", -code) + echoed
    payload += netlink.pack_attribute(netlink.NLMSGERR_ATTR_MSG, text.encode() + b"\0")
    flags = netlink.NLM_F_ACK_TLVS | (netlink.NLM_F_CAPPED if capped else 0)
    return netlink.Message(NLMSG_ERROR, flags, 9, payload)


@pytest.mark.parametrize("capped", [True, False], ids=["capped", "whole-request"])
def test_an_error_gives_the_errno_and_the_kernels_own_text(capped: bool):
    message = error_message(errno.ENETUNREACH, "Nexthop has invalid gateway", capped=capped)
    assert netlink.error_of(message) == (errno.ENETUNREACH, "Nexthop has invalid gateway")
    ack = netlink.Message(NLMSG_ERROR, 0, 9, struct.pack("=i", 0) + bytes(16))
    assert netlink.error_of(ack) == (0, "")


def test_the_kernels_dumps_show_loopback_and_its_permanent_address():
    """Read-only dumps of the test's own network namespace: no root needed, nothing changed."""
    with netlink.Rtnetlink() as kernel:
        links = kernel.links()
        addresses = kernel.addresses()
        routes = kernel.routes()
    loopback = next(link for link in links if link.name == "lo")
    assert loopback.loopback and loopback.up and loopback.index == 1
    ours = {(a.index, str(a)): a for a in addresses}
    assert ours[(1, "127.0.0.1/8")].permanent
    assert ours[(1, "127.0.0.1/8")].valid == INFINITY_LIFE_TIME
    names = {link.index for link in links}
    assert all(route.table == netlink.RT_TABLE_MAIN for route in routes)
    assert all(route.oif in names for route in routes if route.oif)


def plan(**fields: object) -> Plan:
    return Plan(new_root="/run/dboot/root", init_argv=["/sbin/init"], **fields)  # type: ignore[arg-type]


def test_a_sandbox_keeps_only_the_network_namespace_its_plan_names():
    here = os.readlink("/proc/self/ns/net")
    assert refusal(plan(), machine_init=True) is None
    assert refusal(plan(sandbox_netns=here), machine_init=False) is None
    unnamed = refusal(plan(), machine_init=False)
    assert unnamed is not None and "names no network namespace" in unnamed
    other = refusal(plan(sandbox_netns="net:[1]"), machine_init=False)
    assert other == f"a sandbox in {here}, not in its own net:[1]"
    off = refusal(plan(keep_network=False), machine_init=True)
    assert off == "the plan says keep_network false"


def test_a_plan_refuses_a_sandbox_netns_that_names_no_namespace():
    plan(sandbox_netns="net:[4026532000]").validate()
    with pytest.raises(PlanError, match="is not a namespace name like net:"):
        plan(sandbox_netns="/proc/1/ns/net").validate()
