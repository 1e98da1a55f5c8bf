"""The seam between the host service and the host's network stack.

The host service decides (switches from the store, ports from VM settings) and hands
the backend *plans*: everything needed to realise one switch or one port, with kernel
names already chosen (:mod:`.names`). The backend makes the host match a plan and is
idempotent: applying a plan twice changes nothing, and ``ensure_switch`` on a host
where the bridge is gone (after a reboot) rebuilds it.

Failure contract: an operation that fails leaves nothing of what it created (bridge,
tap, rules, dnsmasq) and never cuts the host's own connectivity (an external switch
gives the adapter its addresses and routes back). Errors are
:class:`~hvstack.errors.HvError` subclasses whose message says what failed.

:class:`hvstack.network.linux.LinuxNetwork` is the real backend (netlink via pyroute2,
nftables, tc, dnsmasq); tests above the network layer use a fake.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from hvstack.network.model import NatMapping, PortSettings, SwitchType


@dataclass(frozen=True)
class DhcpPlan:
    """DHCP and DNS (dnsmasq) on a NAT switch's bridge. ``hosts`` pairs a MAC with
    the DNS label (:func:`hvstack.network.hostnames.dns_label`) its lease and DNS name
    take, whatever name the guest sends."""

    first: str  # first address handed out
    last: str
    domain: str  # VMs' names resolve as NAME and NAME.domain
    state_dir: Path  # pid file, lease file, log (the backend's own files)
    hosts: tuple[tuple[str, str], ...] = ()  # (MAC, label)


@dataclass(frozen=True)
class SwitchPlan:
    switch_id: str
    name: str  # the user's name, for messages only
    type: SwitchType
    bridge: str  # kernel name
    table: str  # nftables table of this service
    adapter: str | None = None  # external: the host interface bridged
    host_address: ipaddress.IPv4Interface | None = None  # internal and NAT
    subnet: ipaddress.IPv4Network | None = None  # NAT: what is masqueraded
    mappings: tuple[NatMapping, ...] = ()
    dhcp: DhcpPlan | None = None


@dataclass(frozen=True)
class PortPlan:
    """One VM adapter's port. ``bridge`` None: not connected (the tap exists, link
    down, in no bridge). ``mirror_to`` is the tap of the switch's mirror destination
    when ``settings.mirror`` is SOURCE."""

    tap: str
    mac: str
    vm_name: str  # for messages only
    settings: PortSettings
    table: str
    bridge: str | None = None
    switch_type: SwitchType | None = None
    mirror_to: str | None = None


@dataclass(frozen=True)
class AclCounter:
    """Packets and bytes an ACL matched, by its place in the port's ACL list."""

    index: int
    direction: str  # "inbound" or "outbound"
    packets: int
    bytes: int


@dataclass(frozen=True)
class InterfaceInfo:
    name: str
    exists: bool
    master: str | None = None  # the bridge (or bond) it is enslaved to
    is_bridge: bool = False


class NetworkBackend(Protocol):
    def missing_privilege(self) -> str | None:
        """None if the service can manage network devices, else why not (to be shown
        to the user: e.g. it lacks CAP_NET_ADMIN)."""
        ...

    async def host_networks(self) -> list[ipaddress.IPv4Network]:
        """Every IPv4 network the host has a route or an address in (for choosing a
        Default Switch subnet that overlaps none)."""
        ...

    async def interface(self, name: str) -> InterfaceInfo: ...

    async def ensure_switch(self, plan: SwitchPlan) -> None:
        """Make the switch exist as planned (create, or repair after a reboot)."""
        ...

    async def update_hosts(self, plan: SwitchPlan) -> None:
        """Give a running NAT switch's DHCP and DNS the names of ``plan.dhcp.hosts``
        (dnsmasq re-reads them only when they changed); nothing for a plan without
        DHCP. ``ensure_switch`` applies them too."""
        ...

    async def remove_switch(self, plan: SwitchPlan) -> None:
        """Remove the bridge, its rules and its dnsmasq; an external adapter gets its
        addresses and routes back. Ports must have been closed or disconnected."""
        ...

    async def open_port(self, plan: PortPlan) -> int:
        """Create the tap (vnet header on), attach it as planned and return an open
        descriptor for QEMU; the caller closes its copy once QEMU has it. The tap
        lives as long as some process holds it open."""
        ...

    async def update_port(self, plan: PortPlan) -> None:
        """Apply changed settings, or another switch, to an existing tap."""
        ...

    async def close_port(self, tap: str, table: str) -> None:
        """Remove the port's rules and shaping, and the tap if it still exists."""
        ...

    async def port_exists(self, tap: str) -> bool: ...

    async def acl_counters(self, tap: str, table: str) -> tuple[AclCounter, ...]: ...

    async def cleanup(self, table: str, keep: set[str]) -> None:
        """Remove this service's bridges, taps and rules not named in ``keep`` (left
        by a crash or by switches deleted while the service was down)."""
        ...
