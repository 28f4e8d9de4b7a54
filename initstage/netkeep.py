"""Keep the kernel's network state across the kill phase (issue 9, section 3).

The kernel outlives the switch, and with it every interface, address and route. What
does not survive is userspace's care of them: a stopping systemd-networkd removes the
DHCP and SLAAC addresses it made (``KeepConfiguration=no``), NetworkManager and dhclient
scripts do the same, ifupdown takes links down, and once the DHCP client is dead the
kernel drops a leased address when its ``valid_lft`` runs out. So the stage takes a
:func:`snapshot` before the kill phase and :func:`restore` s it after: links that were up
are up again, addresses and routes that vanished are put back, and every dynamic address
is kept for a bounded time (:func:`kept_lifetime`) so that the new system's own client can
take it over. Never forever: in a new system without a DHCP client, an address that
outlived its lease would clash with its next holder.

Each change is one line in the stage log. Nothing here may stop the switch: a failure is
logged and the next change is tried. Loopback is left alone, and so are IPv6 link-local
addresses and routes (the kernel makes them itself) and IPv6 privacy addresses.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from collections.abc import Callable

from initstage.netlink import IFA_F_NODAD, Address, Link, Route, Rtnetlink
from initstage.plan import Plan

Log = Callable[[str], None]
REMOVED = "removed while the old system stopped"
WENT_DOWN = "taken down while the old system stopped"
# How long past its lease (or the revert deadline, if later) a kept dynamic address stays,
# for the new system's own DHCP client to start and take it over.
TAKE_OVER_SECONDS = 300


@dataclasses.dataclass(frozen=True)
class NetworkState:
    links: list[Link]
    addresses: list[Address]
    routes: list[Route]
    taken_at: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def names(self) -> dict[int, str]:
        return {link.index: link.name for link in self.links}


def refusal(plan: Plan, machine_init: bool) -> str | None:
    """Why the stage must leave this network namespace alone, or None when it may keep it.

    On the machine it is the machine's network. In a sandbox only the network namespace
    the injector checked is the sandbox's own (``plan.sandbox_netns``): one shared with the
    host (a test's bare PID namespace, a ``--target-pid`` lab) is the host's network."""
    if not plan.keep_network:
        return "the plan says keep_network false"
    if machine_init:
        return None
    try:
        here = os.readlink("/proc/self/ns/net")
    except OSError as error:
        return f"cannot tell which network namespace this is ({error.strerror})"
    if not plan.sandbox_netns:
        return (
            f"a sandbox whose plan names no network namespace of its own ({here} may be the host's)"
        )
    if plan.sandbox_netns != here:
        return f"a sandbox in {here}, not in its own {plan.sandbox_netns}"
    return None


def read_state(kernel: Rtnetlink) -> NetworkState:
    return NetworkState(kernel.links(), kernel.addresses(), kernel.routes())


def snapshot(plan: Plan, machine_init: bool, log: Log) -> NetworkState | None:
    """The network as the old system left it, before anything is stopped; None to keep nothing."""
    why_not = refusal(plan, machine_init)
    if why_not is not None:
        log(f"network: not kept: {why_not}")
        return None
    started = time.monotonic()
    try:
        with Rtnetlink() as kernel:
            state = read_state(kernel)
    except Exception as error:  # nothing here may stop the switch
        log(
            f"warning: network: no snapshot ({type(error).__name__}: {error}): what a stopping"
            " network daemon removes stays removed; the new system must configure the network"
        )
        return None
    loopback = {link.index for link in state.links if link.loopback}
    kept = [address for address in state.addresses if address.index not in loopback]
    dynamic = sum(1 for address in kept if not address.permanent)
    log(
        f"network: snapshot of {len(state.links)} links, {len(kept)} addresses ({dynamic}"
        f" dynamic), {len(state.routes)} routes in {(time.monotonic() - started) * 1000:.1f} ms"
    )
    return state


def kept_lifetime(lease_left: float, revert_left: float) -> int:
    """Seconds a kept dynamic address stays valid: until its lease ends or the revert timer
    fires, whichever is later, plus :data:`TAKE_OVER_SECONDS`. After a revert the machine
    has rebooted; a kept system's own client renews the lease long before this runs out."""
    return int(max(lease_left, revert_left, 0)) + TAKE_OVER_SECONDS


def restore(saved: NetworkState, log: Log, revert_left: float = 0.0) -> None:
    """Put back what the kill phase took; every change logged, no failure raised.
    ``revert_left``: seconds until the revert timer fires (0: none)."""
    started = time.monotonic()
    elapsed = started - saved.taken_at
    changes = Changes(log)
    try:
        with Rtnetlink() as kernel:
            now = read_state(kernel)
            same = same_links(saved.links, now.links)
            for link in saved.links:
                if link.up and link.index in same and not same[link.index].up:
                    changes.apply(f"{link.name} set up again ({WENT_DOWN})", kernel.set_up, link)
            current = {address.key: address for address in now.addresses}
            for address in saved.addresses:
                if not keeps(address, same):
                    continue
                device = saved.names[address.index]
                present = current.get(address.key)
                if present is None and address.permanent:
                    changes.apply(
                        f"re-added {address} on {device} ({REMOVED})",
                        kernel.add_address,
                        without_dad(address),
                        device,
                    )
                elif present is None:
                    lifetime = kept_lifetime(address.valid - elapsed, revert_left)
                    changes.apply(
                        f"re-added {address} on {device} ({REMOVED}), valid {lifetime} s",
                        kernel.add_address,
                        without_dad(address),
                        device,
                        lifetime,
                    )
                elif not present.permanent:
                    lifetime = kept_lifetime(present.valid, revert_left)
                    changes.apply(
                        f"{address} on {device} kept {lifetime} s (was valid {present.valid} s)",
                        kernel.add_address,
                        present,
                        device,
                        lifetime,
                    )
            # Read again: a re-added address brought its prefix route back with it.
            routes = {route.key for route in kernel.routes()}
            missing = [
                route
                for route in saved.routes
                if route.key not in routes and route.oif in same and not route.link_local
            ]
            # Routes to the link first: a route via a gateway needs the gateway reachable.
            for route in sorted(missing, key=lambda route: -route.scope):
                changes.apply(
                    f"re-added route {route.describe(saved.names)} ({REMOVED})",
                    kernel.add_route,
                    route,
                    saved.names,
                )
    except Exception as error:  # nothing here may stop the switch
        log(
            f"warning: network: cannot restore ({type(error).__name__}: {error}): left as the"
            " old system left it; the new system must configure the network"
        )
    elapsed = (time.monotonic() - started) * 1000
    if changes.done or changes.failed:
        log(
            f"network: restored in {elapsed:.1f} ms: {changes.done} changes,"
            f" {changes.failed} failed"
        )
    else:
        log(f"network: nothing to restore, checked in {elapsed:.1f} ms")


def same_links(saved: list[Link], now: list[Link]) -> dict[int, Link]:
    """The saved links still there now (index and name both), by index, as they are now:
    an index whose link went away and came back as another is not ours to fill."""
    current = {link.index: link for link in now}
    return {
        link.index: current[link.index]
        for link in saved
        if link.index in current and current[link.index].name == link.name and not link.loopback
    }


def keeps(address: Address, links: dict[int, Link]) -> bool:
    """Whether ``address`` is ours to keep: not on loopback or a link that went away, and
    not one the kernel makes and ages by itself (IPv6 link-local, privacy addresses)."""
    return address.index in links and not address.link_local and not address.privacy


def without_dad(address: Address) -> Address:
    """An IPv6 address put back is ours already: duplicate address detection would keep it
    tentative (unusable) for a second or more, at the moment the machine must stay reachable."""
    if address.family != socket.AF_INET6:
        return address
    return dataclasses.replace(address, flags=address.flags | IFA_F_NODAD)


class Changes:
    """Applies one change at a time, logging it; a refusal is logged and counted."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.done = 0
        self.failed = 0

    def apply(self, what: str, change: Callable[..., None], *arguments: object) -> None:
        try:
            change(*arguments)
        except Exception as error:  # one refusal must not stop the rest
            self.failed += 1
            self.log(f"warning: network: not done: {what}: {error}")
            return
        self.done += 1
        self.log(f"network: {what}")
