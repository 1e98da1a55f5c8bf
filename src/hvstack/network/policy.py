"""Network decisions of the host service, as pure functions (no I/O, worked examples in
``tests/unit/test_network_policy.py``).

- :func:`choose_subnet`: the Default Switch's subnet, the first ``172.(16..31).X.0/24``
  that overlaps no network of the host and no other switch.
- :class:`MacPool` and :func:`allocate_mac`: MACs from a configurable range, random in
  it, never one any VM of the host has.
- :func:`host_interface`, :func:`dhcp_range`: a NAT or internal switch's host address
  and the addresses DHCP hands out.
- :func:`check_overlap`, :func:`check_mapping`, :func:`check_external_adapter`,
  :func:`check_interface_name`: what the kernel would refuse or what would cut the
  host off, checked before anything is made.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from hvstack.errors import Conflict, InsufficientResources, InvalidInput
from hvstack.network.backend import InterfaceInfo
from hvstack.network.model import NatMapping, parse_mac
from hvstack.network.names import IFNAMSIZ

DEFAULT_MAC_POOL = "52:54:00:00:00:00-52:54:00:ff:ff:ff"  # QEMU's range, as before


# -- subnets ------------------------------------------------------------------------

def subnet_candidates() -> Iterable[ipaddress.IPv4Network]:
    """172.16.0.0/24, 172.16.1.0/24, ... 172.31.255.0/24 (Hyper-V's Default Switch
    also takes a /24 from 172.16.0.0/12)."""
    for second in range(16, 32):
        for third in range(256):
            yield ipaddress.IPv4Network(f"172.{second}.{third}.0/24")


def choose_subnet(host_networks: Iterable[ipaddress.IPv4Network],
                  taken: Iterable[ipaddress.IPv4Network] = ()) -> ipaddress.IPv4Network:
    """The first candidate that overlaps none of ``host_networks`` (routes and
    addresses of the host; a default route 0.0.0.0/0 is ignored, it overlaps all)
    and none of ``taken`` (other switches)."""
    avoid = [n for n in host_networks if n.prefixlen > 0] + list(taken)
    for candidate in subnet_candidates():
        if not any(candidate.overlaps(n) for n in avoid):
            return candidate
    raise InsufficientResources("every subnet of 172.16.0.0/12 overlaps a network of "
                                "this host; give the switch a --subnet")


def check_overlap(subnet: ipaddress.IPv4Network,
                  others: Mapping[str, ipaddress.IPv4Network]) -> None:
    """Conflict if ``subnet`` overlaps the subnet of another switch (by name)."""
    for name, other in others.items():
        if subnet.overlaps(other):
            raise Conflict(f"subnet {subnet} overlaps {other} of switch '{name}'",
                           subnet=str(subnet), switch=name)


def host_interface(subnet: ipaddress.IPv4Network,
                   address: str | None = None) -> ipaddress.IPv4Interface:
    """The host's address on the switch: ``address`` (an address in ``subnet``, not
    its network or broadcast address), else the subnet's first host address."""
    if address is None:
        return ipaddress.IPv4Interface(f"{next(subnet.hosts())}/{subnet.prefixlen}")
    try:
        ip = ipaddress.IPv4Address(address.split("/")[0].strip())
    except ValueError:
        raise InvalidInput(f"host address '{address}' is not an IPv4 address",
                           value=address) from None
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
        raise InvalidInput(f"host address {ip} is not a host address of subnet {subnet}",
                           value=address)
    return ipaddress.IPv4Interface(f"{ip}/{subnet.prefixlen}")


def dhcp_range(interface: ipaddress.IPv4Interface) -> tuple[str, str]:
    """The addresses DHCP hands out: every host address of the subnet after the
    host's own (before it, if the host has the last one)."""
    hosts = list(interface.network.hosts())
    after = [h for h in hosts if h > interface.ip]
    pool = after or [h for h in hosts if h < interface.ip]
    if not pool:
        raise InvalidInput(f"subnet {interface.network} leaves no address for VMs")
    return str(pool[0]), str(pool[-1])


def check_mapping(mapping: NatMapping, interface: ipaddress.IPv4Interface,
                  existing: Mapping[str, Iterable[NatMapping]]) -> None:
    """A static mapping must point into the switch's subnet at a VM's address, and
    its external port may be mapped once per protocol on the host (``existing``:
    the mappings of each NAT switch, by name)."""
    try:
        ip = ipaddress.IPv4Address(mapping.internal_ip)
    except ValueError:
        raise InvalidInput(f"internal IP '{mapping.internal_ip}' is not an IPv4 "
                           "address", value=mapping.internal_ip) from None
    subnet = interface.network
    if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address,
                                  interface.ip):
        raise InvalidInput(f"internal IP {ip} is not an address a VM can have on "
                           f"subnet {subnet} (the host has {interface.ip})",
                           value=mapping.internal_ip)
    for name, mappings in existing.items():
        for other in mappings:
            if (other.protocol, other.external_port) == (mapping.protocol,
                                                         mapping.external_port):
                raise Conflict(f"{mapping.protocol.value} port {mapping.external_port} is "
                               f"already mapped by switch '{name}'", switch=name,
                               port=mapping.external_port)


# -- interfaces ---------------------------------------------------------------------

_IFNAME_BAD = re.compile(r"[\s/:%]|^\.{1,2}$")


def check_interface_name(name: str) -> str:
    """A host interface name as the kernel allows it (1-15 bytes, no blanks, '/',
    ':' or '%', not '.' or '..')."""
    if not name or len(name.encode()) > IFNAMSIZ or _IFNAME_BAD.search(name) or \
            not name.isprintable():
        raise InvalidInput(f"'{name}' is not a network interface name (1-{IFNAMSIZ} "
                           "bytes, no blanks, '/', ':' or '%')", value=name)
    return name


def check_external_adapter(info: InterfaceInfo, *, ours: bool,
                           used_by: Mapping[str, str]) -> None:
    """Whether ``info`` may be bridged by a new external switch: it exists, is not a
    bridge or one of this service's devices, in no bridge already, and no other
    switch uses it (``used_by``: adapter -> switch name)."""
    if not info.exists:
        raise InvalidInput(f"this host has no network interface named '{info.name}'",
                           adapter=info.name)
    if info.name in used_by:
        raise Conflict(f"network interface '{info.name}' is already used by switch "
                       f"'{used_by[info.name]}'", adapter=info.name)
    if ours or info.is_bridge:
        raise InvalidInput(f"'{info.name}' is a bridge; an external switch bridges a "
                           "physical (or virtual Ethernet) interface", adapter=info.name)
    if info.master:
        raise Conflict(f"network interface '{info.name}' is already in bridge "
                       f"'{info.master}'", adapter=info.name, master=info.master)


# -- MAC addresses ------------------------------------------------------------------

def _mac_int(mac: str) -> int:
    return int(mac.replace(":", ""), 16)


def _mac_text(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i:i + 2] for i in range(0, 12, 2))


@dataclass(frozen=True)
class MacPool:
    """An inclusive range of unicast MACs that share their first byte (so that no
    multicast address is inside)."""

    first: int
    last: int

    @staticmethod
    def parse(text: str) -> MacPool:
        """``"52:54:00:00:00:00-52:54:00:ff:ff:ff"``."""
        low, dash, high = text.strip().partition("-")
        if not dash:
            raise InvalidInput(f"MAC pool '{text}' is not FIRST-LAST, e.g. "
                               f"{DEFAULT_MAC_POOL}", value=text)
        first, last = _mac_int(parse_mac(low)), _mac_int(parse_mac(high))
        if first > last:
            raise InvalidInput(f"MAC pool '{text}' runs backwards", value=text)
        if first >> 40 != last >> 40:
            raise InvalidInput(f"MAC pool '{text}' must keep the first byte the same "
                               "(every other first byte holds multicast addresses)",
                               value=text)
        return MacPool(first, last)

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def __contains__(self, mac: str) -> bool:
        return self.first <= _mac_int(mac) <= self.last

    def __str__(self) -> str:
        return f"{_mac_text(self.first)}-{_mac_text(self.last)}"


def allocate_mac(pool: MacPool, used: Iterable[str],
                 randbelow: Callable[[int], int] = secrets.randbelow) -> str:
    """A MAC of ``pool`` that is not in ``used`` (every MAC of every VM of the host):
    a random one, else, when the random pick is taken, the next free one after it
    (so a nearly full pool still finds its last addresses)."""
    taken = {_mac_int(m) for m in used}
    start = randbelow(pool.size)
    for step in range(pool.size):
        candidate = pool.first + (start + step) % pool.size
        if candidate not in taken:
            return _mac_text(candidate)
    raise InsufficientResources(f"every MAC of the pool {pool} is in use; widen it "
                                "with hv serve --mac-pool")
