"""The access facts against a real kernel: addresses and routes made in a network namespace
of our own (a veth pair, no traffic leaves it), one address with a lifetime as a DHCP client
leaves it and one static; and the remote-session blocker with SSH_CONNECTION in an
ancestor's environment only, as under sudo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root

DBOOT = str(Path(sys.executable).with_name("dboot"))

SETUP = """
set -e
ip link add dbt0 type veth peer name dbt1
ip link set dbt1 up
ip link set dbt0 up
ip addr add 10.99.0.2/24 dev dbt0 valid_lft 300 preferred_lft 240
ip addr add 10.99.1.2/24 dev dbt0
ip -6 addr add fd99::2/64 dev dbt0 nodad valid_lft 600 preferred_lft 300
ip route add default via 10.99.7.1 dev dbt0 onlink
ip -6 route add default via fd99::1 dev dbt0
exec "$@"
"""

READ = """
import dataclasses, json
from injector.access import facts
interfaces, routes, state = facts.read_network()
print(json.dumps({"interfaces": [dataclasses.asdict(i) for i in interfaces],
                  "routes": [dataclasses.asdict(r) for r in routes], "state": state}))
"""


def test_lifetimes_and_routes_from_the_kernel() -> None:
    result = subprocess.run(
        ["unshare", "--net", "sh", "-c", SETUP, "setup", sys.executable, "-c", READ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 0, result.stderr
    network = json.loads(result.stdout)
    assert network["state"] == "ok"
    by_name = {interface["name"]: interface for interface in network["interfaces"]}
    assert set(by_name) == {"lo", "dbt0", "dbt1"}  # only the namespace's own
    addresses = {item["address"]: item for item in by_name["dbt0"]["addresses"]}
    leased = addresses["10.99.0.2/24"]
    assert leased["dynamic"] is True
    assert 290 <= leased["valid_seconds"] <= 300 and 230 <= leased["preferred_seconds"] <= 240
    static = addresses["10.99.1.2/24"]
    assert (static["dynamic"], static["valid_seconds"], static["preferred_seconds"]) == (
        False,
        None,
        None,
    )
    slaac_like = addresses["fd99::2/64"]
    assert slaac_like["dynamic"] is True and 590 <= slaac_like["valid_seconds"] <= 600
    assert by_name["dbt0"]["driver"] == ""  # a veth has no device behind it
    defaults = [
        (route["family"], route["gateway"], route["device"], route["onlink"])
        for route in network["routes"]
        if route["destination"] == "default"
    ]
    assert defaults == [("inet", "10.99.7.1", "dbt0", True), ("inet6", "fd99::1", "dbt0", False)]


@pytest.mark.engine
def test_a_remote_session_into_an_image_without_sshd_blocks() -> None:
    """SSH_CONNECTION is only in the environment of dboot's parent (sudo resets dboot's)."""
    ssh_connection = "198.51.100.20 50122 192.0.2.77 22"
    result = subprocess.run(
        [
            "sh",
            "-c",
            'env -u SSH_CONNECTION "$0" check --json tinybox /bin/sh; exit $?',
            DBOOT,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "DBOOT_REHEARSAL_ONLY": "1", "SSH_CONNECTION": ssh_connection},
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 3, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    facts = {(e["section"], e["key"]): e["value"] for e in events if e["event"] == "fact"}
    session = facts[("access", "session")]
    assert (session["client"], session["local_port"]) == ("198.51.100.20", 22)
    assert session["witness"].endswith("(sh)")
    assert facts[("session", "remote")] is True
    assert facts[("access", "image_init")]["kind"] == "shell"
    notices = {e["code"]: e["level"] for e in events if e["event"] == "notice"}
    assert notices["session-remote-no-ssh"] == "blocker"
