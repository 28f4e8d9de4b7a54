"""The stage keeps the kernel's network state across its kill phase (issue 9, section 3).

Each test makes a network namespace of its own (``ip netns add``) holding a veth pair, so no
packet and no change leaves it. In it: a "DHCP-like" address with a finite lifetime, a
static one, a leased one no daemon touches, IPv6 ones, and routes via an on-link gateway.
A stand-in "network daemon" deletes the leased address and its routes when it gets SIGTERM,
as systemd-networkd does by default. The stage runs as PID 1 of a fresh PID namespace, as in
test_stage.py, entering the network namespace through its interpreter (``nsenter --net``
then the real bootstrap). The new init (busybox) prints ``ip addr`` and ``ip route`` as it
finds them: everything must be back, every leased address for a bounded time.

The other side: a stage that shares the host's network namespace, or is not in the one its
plan names, leaves the network alone, and the rehearsal sandbox has a namespace of its own.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from initstage.netkeep import TAKE_OVER_SECONDS
from injector.events import Console
from injector.preflight.procinfo import namespace_of
from injector.rehearsal.sandbox import Sandbox
from injector.switch import SwitchOptions, run
from tests.sandbox.test_stage import StageRun, busybox_tree, plan_for, run_stage

__all__ = ["busybox_tree"]  # the fixture, re-exported for pytest

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: namespaces, mounts, netlink"),
]

DEVICE = "dbk0"
LEASED = "10.77.0.2/24"  # the daemon removes it, and the routes through it
STATIC = "10.77.1.2/24"
UNTOUCHED_LEASE = "10.77.2.2/24"  # dynamic, but left there: it must be kept, for a while
LEASED6 = "fd77::2/64"
ONLINK_GATEWAY = "10.77.9.1"
SETUP = f"""
set -e
ip link set lo up
ip link add {DEVICE} type veth peer name dbk1
ip link set dbk1 up
ip link set {DEVICE} up
ip addr add {LEASED} dev {DEVICE} valid_lft 300 preferred_lft 300
ip addr add {STATIC} dev {DEVICE}
ip addr add {UNTOUCHED_LEASE} dev {DEVICE} valid_lft 200 preferred_lft 100
ip -6 addr add {LEASED6} dev {DEVICE} valid_lft 600 preferred_lft 300
ip route add default via {ONLINK_GATEWAY} dev {DEVICE} onlink
ip route add 10.66.0.0/16 via 10.77.0.1 dev {DEVICE} proto dhcp metric 50
ip -6 route add default via fd77::1 dev {DEVICE} metric 1024
"""
# On SIGTERM, as a networkd with KeepConfiguration=no: drop the lease and its routes, exit.
# The "ifupdown" one then takes the link down as well, as `ifdown -a` does at shutdown.
DAEMON = """
trap 'ip route del 10.66.0.0/16; ip route del default; ip -6 route del default;
      ip addr del {leased} dev {device}; ip -6 addr del {leased6} dev {device};{more}
      echo DAEMON-CLEANED-UP; exit 0' TERM
touch "$1"
while :; do sleep 1 & wait $!; done
"""
DAEMON_EXTRAS = {"networkd": "", "ifupdown": f" ip link set {DEVICE} down;"}
INIT = (
    f"echo INIT-UP; ip addr show {DEVICE}; echo ROUTES; ip route; echo ROUTES6;"
    f" ip -6 route; echo INIT-DONE"
)


@dataclass
class NetNamespace:
    name: str
    identity: str  # net:[inode], as /proc/PID/ns/net reads

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"

    def ip(self, *args: str) -> object:
        done = subprocess.run(
            ["ip", "-n", self.name, "-j", *args], capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout)

    def addresses(self) -> dict[str, dict[str, object]]:
        found = {}
        for link in self.ip("addr", "show", "dev", DEVICE):  # type: ignore[attr-defined]
            for info in link["addr_info"]:
                found[f"{info['local']}/{info['prefixlen']}"] = info
        return found


@pytest.fixture
def netns() -> Iterator[NetNamespace]:
    name = f"dboot-netkeep-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        identity = f"net:[{os.stat(f'/run/netns/{name}').st_ino}]"
        subprocess.run(["ip", "netns", "exec", name, "sh", "-c", SETUP], check=True)
        yield NetNamespace(name, identity)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def python_in(tmp_path: Path, netns: NetNamespace) -> str:
    """An interpreter that runs in ``netns``: nsenter, then exec the real one, so the stage's
    PID 1 is still one process running the real bootstrap."""
    script = tmp_path / "python-in-netns"
    script.write_text(f'#!/bin/sh\nexec nsenter --net={netns.path} {sys.executable} "$@"\n')
    script.chmod(0o755)
    return str(script)


def start_daemon(tmp_path: Path, netns: NetNamespace, daemon: str) -> str:
    """Shell for the wrapper: the daemon in the namespace, waited for until its trap is set."""
    script = tmp_path / "networkd.sh"
    extra = DAEMON_EXTRAS[daemon]
    script.write_text(DAEMON.format(leased=LEASED, leased6=LEASED6, device=DEVICE, more=extra))
    ready = tmp_path / "daemon-ready"
    return (
        f"nsenter --net={netns.path} sh {script} {ready} &\n"
        f"until [ -e {ready} ]; do sleep 0.02; done\n"
    )


def run_with_daemon(
    tmp_path: Path,
    busybox_tree: Path,
    netns: NetNamespace,
    daemon: str = "networkd",
    **plan_fields: object,
) -> StageRun:
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/sh", "-c", INIT], **plan_fields),
        before=start_daemon(tmp_path, netns, daemon),
        python=python_in(tmp_path, netns),
    )
    assert run.returncode == 0, run.err
    assert "DAEMON-CLEANED-UP" in run.out, "the stand-in daemon did not remove its lease"
    assert "INIT-DONE" in run.out, run.out
    return run


def init_saw(run: StageRun, start: str, end: str) -> str:
    return run.out.split(f"{start}\n", 1)[1].split(f"{end}\n", 1)[0]


def network_lines(run: StageRun) -> list[str]:
    return [line.split("s network: ", 1)[1] for line in run.log_lines if "s network: " in line]


@pytest.mark.parametrize(
    ("daemon", "revert_after"),
    [("networkd", 0.0), ("ifupdown", 0.0), ("networkd", 1200.0)],
    ids=["networkd", "ifupdown", "networkd-revert-timer"],
)
def test_what_a_dying_daemon_removed_is_back_for_a_bounded_time_when_the_new_init_starts(
    tmp_path: Path, busybox_tree: Path, netns: NetNamespace, daemon: str, revert_after: float
):
    run = run_with_daemon(
        tmp_path,
        busybox_tree,
        netns,
        daemon,
        sandbox_netns=netns.identity,
        revert_after_seconds=revert_after,
    )
    addresses = init_saw(run, "INIT-UP", "ROUTES")
    # Each lease is kept until it ends or the revert timer fires, whichever is later, plus
    # the time the new system's own DHCP client gets to take it over; never forever.
    bounds = {
        address: max(lease, revert_after) + TAKE_OVER_SECONDS
        for address, lease in ((LEASED, 300), (UNTOUCHED_LEASE, 200), (LEASED6, 600))
    }
    for address in (LEASED, STATIC, UNTOUCHED_LEASE, LEASED6):
        line = re.search(rf"inet6? {re.escape(address)} .*\n\s+valid_lft (\S+)", addresses)
        assert line is not None, f"{address} is not there when the new init starts:\n{addresses}"
        if address == STATIC:
            assert line.group(1) == "forever", line.group(0)
        else:
            assert bounds[address] - 30 < int(line.group(1).rstrip("sec")) <= bounds[address]
        # Put back without duplicate address detection: not tentative (unusable) for a second.
        assert "tentative" not in line.group(0), line.group(0)
    routes = init_saw(run, "ROUTES", "ROUTES6")
    assert re.search(rf"default via {ONLINK_GATEWAY} dev {DEVICE}\s+onlink", routes), routes
    assert re.search(rf"10\.66\.0\.0/16 via 10\.77\.0\.1 dev {DEVICE}\s.*metric 50", routes)
    assert "10.77.0.0/24 dev dbk0" in routes, "the lease's prefix route came back with it"
    routes6 = init_saw(run, "ROUTES6", "INIT-DONE")
    assert re.search(rf"default via fd77::1 dev {DEVICE}\s.*metric 1024", routes6), routes6

    # The kernel agrees, seen from outside: dynamic, and it ages them.
    kernel = netns.addresses()
    for address, bound in bounds.items():
        lifetime = kernel[address]["valid_life_time"]
        assert isinstance(lifetime, int) and bound - 30 < lifetime <= bound, kernel[address]
        assert kernel[address]["preferred_life_time"] == kernel[address]["valid_life_time"]
        assert kernel[address].get("dynamic") is True, kernel[address]

    changes = network_lines(run)
    assert changes[0].startswith("snapshot of 3 links, 6 addresses (3 dynamic), ")
    removed = "(removed while the old system stopped)"
    for address in (LEASED, LEASED6):
        valid = rf"re-added {re.escape(address)} on {DEVICE} \(removed .*\), valid (\d+) s"
        said = [int(match[1]) for line in changes if (match := re.fullmatch(valid, line))]
        assert len(said) == 1 and bounds[address] - 30 < said[0] <= bounds[address], changes
    kept = rf"{UNTOUCHED_LEASE} on {DEVICE} kept (\d+) s \(was valid (\d+) s\)"
    extended = [
        (int(match[1]), int(match[2])) for line in changes if (match := re.fullmatch(kept, line))
    ]
    assert len(extended) == 1 and 190 < extended[0][1] <= 200, changes
    assert bounds[UNTOUCHED_LEASE] - 30 < extended[0][0] <= bounds[UNTOUCHED_LEASE], changes
    assert f"re-added route default via {ONLINK_GATEWAY} dev {DEVICE} onlink {removed}" in changes
    dhcp_route = "10.66.0.0/16 via 10.77.0.1 dev dbk0 proto dhcp metric 50"
    assert f"re-added route {dhcp_route} {removed}" in changes
    assert f"re-added route default via fd77::1 dev dbk0 metric 1024 {removed}" in changes
    link_up = f"{DEVICE} set up again (taken down while the old system stopped)"
    assert (link_up in changes) == (daemon == "ifupdown"), changes
    count = 7 if daemon == "ifupdown" else 6
    assert re.fullmatch(rf"restored in [\d.]+ ms: {count} changes, 0 failed", changes[-1]), changes
    # Not put back: loopback, IPv6 link-local (the kernel's own), the lease's prefix route
    # (it came back with the address).
    assert not [line for line in changes if "fe80" in line or " lo " in line or "/24 dev" in line]
    print(f"\nnetwork {changes[0]}; {changes[-1]}")


def test_a_sandbox_whose_plan_names_no_network_namespace_leaves_the_network_alone(
    tmp_path: Path, busybox_tree: Path, netns: NetNamespace
):
    """The same stage, the same daemon, but the plan does not name this namespace as the
    sandbox's own: the stage changes nothing, so the lease stays removed."""
    run = run_with_daemon(tmp_path, busybox_tree, netns)
    assert network_lines(run) == [
        f"not kept: a sandbox whose plan names no network namespace of its own ({netns.identity}"
        " may be the host's)"
    ]
    assert LEASED not in netns.addresses()
    assert netns.addresses()[UNTOUCHED_LEASE]["valid_life_time"] != 0xFFFFFFFF


def host_network() -> tuple[object, object]:
    """The host's addresses (without the lifetimes, which count down) and routes."""
    addresses = json.loads(
        subprocess.run(["ip", "-j", "addr"], capture_output=True, check=True).stdout
    )
    for link in addresses:
        for info in link.get("addr_info", []):
            info.pop("valid_life_time", None)
            info.pop("preferred_life_time", None)
    routes = [
        json.loads(
            subprocess.run(["ip", "-j", family, "route"], capture_output=True, check=True).stdout
        )
        for family in ("-4", "-6")
    ]
    return addresses, routes


@pytest.mark.parametrize("named", ["none", "another"])
def test_a_stage_in_the_hosts_network_namespace_never_touches_it(
    tmp_path: Path, busybox_tree: Path, netns: NetNamespace, named: str
):
    """test_stage.py's bare PID namespace shares the host's network: the stage must see that
    it is not its own (named nowhere, or another namespace named) and change nothing."""
    before = host_network()
    sandbox_netns = netns.identity if named == "another" else ""
    run = run_stage(
        tmp_path,
        busybox_tree,
        plan_for(tmp_path, ["/bin/echo", "INIT-UP"], sandbox_netns=sandbox_netns),
    )
    assert run.returncode == 0, run.err
    here = namespace_of("self", "net")
    expected = {
        "none": f"not kept: a sandbox whose plan names no network namespace of its own ({here}"
        " may be the host's)",
        "another": f"not kept: a sandbox in {here}, not in its own {netns.identity}",
    }[named]
    assert network_lines(run) == [expected]
    assert host_network() == before


def test_the_rehearsal_sandbox_has_a_network_namespace_of_its_own():
    with Sandbox(services=0) as sandbox:
        assert namespace_of(sandbox.pid, "net") != namespace_of("self", "net")


def test_a_rehearsal_keeps_the_network_of_its_own_sandbox_only(tmp_path: Path) -> None:
    """The engine names the sandbox's network namespace in the plan, so its stage keeps that
    one (the log says what it found there) and the host's network is what it was."""
    before = host_network()
    events = list(
        run(
            SwitchOptions(
                image="dboot-test/tinybox",
                init_argv=["/bin/true"],
                rehearse=True,
                services=0,
                state_dir=tmp_path / "state",
            )
        )
    )
    network = [e.text for e in events if isinstance(e, Console) and "network:" in e.text]
    assert any("network: snapshot of" in line for line in network), network
    assert not any("not kept" in line for line in network), network
    assert host_network() == before
